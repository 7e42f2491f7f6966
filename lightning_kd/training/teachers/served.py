"""The served teacher: a teacher run by a vLLM server (other GPUs, other machines), no model here.

For each batch the teacher's top-k log-probabilities at every position come from the server's
``prompt_logprobs`` (:class:`~lightning_kd.rollout.vllm_logprobs.PromptLogprobsClient`) and go
through :class:`~lightning_kd.losses.TopKKDLoss`, the sparse path of a top-k teacher cache:
the k tokens plus one bucket for the rest, any divergence (the tail's mass is implied by the
top-k, ``1 − Σ P_i``, to float32).

Throughput: a batch is split into requests of ``request_size`` sequences sent concurrently
(``concurrency`` at a time), and while the student computes step ``i`` the request of batch
``i + 1`` is already in flight (prefetch): its sequences come from the train loader's
:meth:`~lightning_kd.data.sampler.ResumableDataLoader.upcoming_indices`. A prefetched answer is
used only if the batch that arrives has exactly the tokens that were sent.

Failures: a server that stops answering is retried with backoff; if batch ``i + 1``'s request
still fails, the run saves ``last.ckpt`` at the end of step ``i`` (a step boundary, as on
SIGTERM: the resumed run continues with batch ``i + 1``) and stops with a one-line
:class:`~lightning_kd.rollout.vllm_logprobs.ServedTeacherError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import default_collate

from lightning_kd.callbacks.checkpoint_on_stop import CheckpointOnStop
from lightning_kd.data.sampler import ResumableDataLoader
from lightning_kd.losses.kd_loss import KDLoss, KDLossOutput
from lightning_kd.losses.topk_kd_loss import TopKKDLoss
from lightning_kd.models.contract import lm_head_width
from lightning_kd.rollout.vllm_logprobs import PromptLogprobsClient, ServedTeacherError
from lightning_kd.rollout.vllm_server import VLLMServer
from lightning_kd.teacher_cache import CachedTeacher
from lightning_kd.training.loss_terms import logits_of
from lightning_kd.training.teachers.base import TeacherBackend

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    return value


def served_vocab_size(model_dir: str | None) -> int | None:
    """``vocab_size`` of the Hugging Face config in ``model_dir`` (None if not readable)."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    return size if isinstance(size, int) else None


class _Request:
    """The concurrent requests of one batch: its tokens and their futures."""

    def __init__(self, input_ids: Tensor, futures: list[Future]) -> None:
        self.input_ids, self.futures = input_ids, futures

    def result(self) -> tuple[Tensor, Tensor]:
        parts = [f.result() for f in self.futures]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def failure(self) -> BaseException | None:
        for future in self.futures:
            error = future.exception()
            if error is not None:
                return error
        return None


class ServedTeacher(TeacherBackend):
    """Distil from a teacher served by vLLM: its top-k log-probabilities, no model in process.

    Give exactly one of ``url`` (a running server) and ``model_dir`` (a Hugging Face directory:
    lightning_kd launches ``vllm.entrypoints.openai.api_server`` on 127.0.0.1 with the Python
    ``python`` or ``$LIGHTNING_KD_VLLM_PYTHON``). At the start the served model's vocabulary
    (its ``config.json``: ``model_dir``, the server's model path when readable, or
    ``vocab_size``) must equal the student's, and its name must match ``expect_model`` when
    given; the batches must not be packed (``position_ids``).

    Args:
        top_k: k, the teacher's entries per position (``prompt_logprobs``; vLLM caps it with
            ``--max-logprobs``, default 20).
        url: a running vLLM OpenAI-compatible server, e.g. ``http://10.0.0.5:8000``.
        model_dir: a model directory to serve from a server launched here.
        vocab_size: the served model's vocabulary, when its config is not readable here.
        expect_model: the served model name (``GET /v1/models``) the run must see.
        request_size: sequences per request.
        concurrency: requests in flight at once.
        prefetch: send the next training batch's requests while the student computes.
        timeout: seconds per request.
        retries: tries after the first when the server does not answer.
        backoff: seconds before the first retry, doubled at every further one.
        python: the interpreter with vLLM for a launched server.
        max_model_len: a launched server's longest sequence (>= the run's seq_len + 2: one
            token is appended to every prompt and one generated; allowed past the model's
            own length).
        kv_cache_gib: a launched server's KV cache (GiB, CPU builds).
        server_args: more command-line arguments for a launched server.

    Raises:
        ValueError: for none or both of ``url`` / ``model_dir``, or a bad number.
    """

    def __init__(
        self,
        top_k: int = 20,
        url: str | None = None,
        model_dir: str | None = None,
        vocab_size: int | None = None,
        expect_model: str | None = None,
        request_size: int = 8,
        concurrency: int = 4,
        prefetch: bool = True,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 2.0,
        python: str | None = None,
        max_model_len: int = 2048,
        kv_cache_gib: int = 1,
        server_args: tuple[str, ...] | list[str] = (),
    ) -> None:
        if (url is None) == (model_dir is None):
            raise ValueError(
                "ServedTeacher needs exactly one of url (a running vLLM server) and model_dir "
                f"(a model to serve from here), got url={url!r}, model_dir={model_dir!r}."
            )
        self.top_k = _positive("top_k", top_k)
        self.request_size = _positive("request_size", request_size)
        self.concurrency = _positive("concurrency", concurrency)
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(
                f"retries and backoff must be >= 0 and timeout > 0, got retries={retries}, "
                f"backoff={backoff}, timeout={timeout}."
            )
        self.url, self.model_dir, self.vocab_size = url, model_dir, vocab_size
        self.expect_model, self.prefetch = expect_model, bool(prefetch)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self._launch = dict(python=python, max_model_len=max_model_len,
                            kv_cache_gib=kv_cache_gib, extra_args=tuple(server_args))  # fmt: skip
        self.server: VLLMServer | None = None
        self.client: PromptLogprobsClient | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: _Request | None = None
        self._student_vocab: int | None = None
        self.served_vocab: int | None = None  # known once connected

    # ------------------------------------------------------------------ set-up
    def setup(self, loss: KDLoss) -> None:
        """Raises: ValueError for a temperature other than 1 (vLLM's prompt log-probabilities
        are at temperature 1; those at T need the whole vocabulary's normaliser)."""
        if loss.temperature != 1.0:
            raise ValueError(
                "a served teacher gives log-probabilities at temperature 1 only (vLLM's "
                f"prompt_logprobs), got temperature={loss.temperature}; use temperature 1."
            )
        self._loss = loss
        self._top_k = TopKKDLoss.from_options(loss)

    def connect(self, student_vocab: int | None = None) -> PromptLogprobsClient:
        """Launch the server (``model_dir``) if needed, connect, and check the served model.

        Raises:
            ValueError: when the served vocabulary differs from ``student_vocab``, cannot be
                read (pass ``vocab_size``), or the model name differs from ``expect_model``.
            ServedTeacherError: when the server does not answer.
        """
        if self.client is not None:
            return self.client
        url = self.url
        if url is None:
            server = VLLMServer(str(self.model_dir), **self._launch)
            # The token appended to each prompt (for the distribution after the last input
            # token) and the one generated may sit past the model's trained length; only
            # earlier positions are read, and they do not depend on them (causal attention).
            server.env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
            self.server = server.start()
            url = server.url
        client = PromptLogprobsClient(url, self.top_k, timeout=self.timeout,
                                      retries=self.retries, backoff=self.backoff)  # fmt: skip
        if self.expect_model is not None and client.model != self.expect_model:
            raise ValueError(
                f"the server at {url} serves {client.model!r}, expected {self.expect_model!r} "
                "(expect_model)."
            )
        served = self.vocab_size
        if served is None:
            served = served_vocab_size(self.model_dir or client.info.get("root"))
        if served is None:
            raise ValueError(
                f"cannot read the vocabulary of the model served at {url} ({client.model!r}: "
                "no readable config.json here); pass vocab_size= (the served model's)."
            )
        if student_vocab is not None and served != student_vocab:
            raise ValueError(
                f"the served teacher {client.model!r} has a vocabulary of {served} tokens, the "
                f"student {student_vocab}: they must share one tokenizer and vocabulary."
            )
        if self.top_k > served:
            raise ValueError(f"top_k={self.top_k} exceeds the served vocabulary ({served}).")
        self.served_vocab = served
        self.client = client
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="served-teacher")
        return client

    def prepare(self, module: DistillationModule) -> None:
        """Connect (launching the server if asked) and check it against the student."""
        self._student_vocab = lm_head_width(module.student)
        self.connect(self._student_vocab)

    def close(self) -> None:
        """Stop the launched server and the request threads (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.client, self._pending = None, None

    # ------------------------------------------------------------------ requests
    def _send(self, input_ids: Tensor) -> _Request:
        """The requests of ``input_ids`` [B, S], sent now (``request_size`` rows each)."""
        client = self.connect(self._student_vocab)
        assert self._pool is not None
        rows = input_ids.cpu()
        bad = (rows < 0) | (rows >= self.served_vocab)
        if bool(bad.any()):  # out-of-vocabulary ids crash vLLM's engine: never send them
            raise ValueError(
                f"input_ids hold {int(rows[bad][0])}, outside the served vocabulary "
                f"[0, {self.served_vocab})."
            )
        limit = client.info.get("max_model_len")
        if isinstance(limit, int) and rows.shape[-1] + 2 > limit:
            raise ValueError(
                f"sequences of {rows.shape[-1]} tokens need a server with max_model_len >= "
                f"{rows.shape[-1] + 2} (one token is appended to score the last position, and "
                f"vLLM generates one), the server at {client.url} has {limit}; raise its "
                "--max-model-len (with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 past the model's own "
                "length)."
            )
        chunks = rows.split(self.request_size)
        futures = [self._pool.submit(client.topk, chunk.tolist()) for chunk in chunks]
        return _Request(rows, futures)

    def fetch(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(ids [B, S, k], logprobs [B, S, k])`` of ``input_ids`` [B, S] (CPU), from the
        prefetched request when it holds exactly these tokens."""
        rows = input_ids.cpu()
        pending = self._pending
        if pending is not None and torch.equal(pending.input_ids, rows):
            self._pending = None
            return pending.result()
        return self._send(rows).result()  # (a validation batch keeps the training prefetch)

    def _prefetch(self, module: DistillationModule) -> None:
        """Send the next training batch's requests (when the train loader can tell them)."""
        try:
            trainer = module.trainer
        except RuntimeError:  # not attached to a trainer
            return
        if not self.prefetch or not trainer.training:
            return
        loader = trainer.train_dataloader
        if not isinstance(loader, ResumableDataLoader):
            return
        upcoming = loader.upcoming_indices()
        if upcoming is None:
            return
        items = [loader.dataset[i] for i in upcoming]
        batch = (loader.collate_fn or default_collate)(items)
        if isinstance(batch, Mapping) and "input_ids" in batch:
            self._pending = self._send(batch["input_ids"])

    # ------------------------------------------------------------------ backend
    def run_teacher(self, module: DistillationModule, batch: Mapping[str, Tensor]) -> CachedTeacher:
        """The batch's top-k from the server (prefetched when possible); the next training
        batch's requests are sent before returning.

        Raises:
            ValueError: for packed batches (``position_ids``) or ids outside the vocabulary.
            ServedTeacherError: when the server fails after its retries.
        """
        if "position_ids" in batch:
            raise ValueError(
                "a served teacher scores whole sequences: packed batches (position_ids) are "
                "not supported; turn packing off in the data module."
            )
        input_ids = batch["input_ids"]
        ids, logprobs = self.fetch(input_ids)
        self._prefetch(module)
        device = input_ids.device
        return CachedTeacher(ids.to(device), logprobs.to(device))

    def after_train_batch(self, module: DistillationModule) -> None:
        """Wait for the prefetched request; if it failed, save ``last.ckpt`` at this step and
        stop with the server's error (every rank together)."""
        pending = self._pending
        error = pending.failure() if pending is not None else None
        failed = torch.tensor([0 if error is None else 1])
        if dist.is_available() and dist.is_initialized():
            failed = failed.to(module.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not int(failed.item()):
            return
        trainer = module.trainer
        saver = next((c for c in trainer.callbacks if isinstance(c, CheckpointOnStop)), None)
        saver = saver or CheckpointOnStop()
        path = saver.save_last(trainer)
        self._pending = None
        reason = str(error) if error is not None else "another rank's served teacher failed"
        rank_zero_info(f"Served teacher failed: saved {path} at step {trainer.global_step}.")
        raise ServedTeacherError(
            f"{reason}; saved {path} at step {trainer.global_step}: restart the server and "
            "resume with --ckpt_path last."
        )

    def loss(
        self, student_output: Any, teacher_output: CachedTeacher, batch: Mapping[str, Tensor]
    ) -> KDLossOutput:
        return self._top_k(
            logits_of(student_output), teacher_output.ids, teacher_output.logprobs,
            batch["labels"], return_per_token=True,
        )  # fmt: skip

    def teacher_cross_entropy(
        self, teacher_output: CachedTeacher, batch: Mapping[str, Tensor]
    ) -> Tensor | None:
        """None: the top-k does not know every label's probability."""
        return None

    def settings(self) -> dict[str, Any]:
        # Not the url: a resumed run may reach the same model at another address.
        return {"teacher_served_top_k": self.top_k, "teacher_served_model": self.expect_model}

    def describe(self) -> str:
        where = self.url or f"a server launched here for {self.model_dir}"
        return f"distilling from a vLLM-served teacher at {where}: its top-{self.top_k} per token"


__all__ = ["ServedTeacher", "ServedTeacherError", "served_vocab_size"]
