"""Offline access to Hugging Face ``transformers``: the optional import and local paths only.

``transformers`` is an optional extra (``pip install 'lightning_kd[hf]'``); these helpers import
it on demand with a clear message, and refuse anything but a local directory so that nothing is
ever fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def require_transformers() -> Any:
    """The ``transformers`` module, or an ImportError that names the extra to install."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Hugging Face models need the optional extra: pip install 'lightning_kd[hf]'."
        ) from error
    return transformers


def local_directory(path: str, what: str) -> Path:
    """``path`` as an existing local directory.

    Raises:
        ValueError: naming ``what`` when ``path`` is not a local directory.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"{what} {path!r} is not a local directory; lightning_kd loads Hugging Face "
            "models and tokenizers from local paths only (nothing is downloaded)."
        )
    return directory
