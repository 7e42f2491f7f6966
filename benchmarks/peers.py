"""lightning_kd next to its peers on the same inputs: TRL, torchtune, NeMo AutoModel, Liger.

Each peer's loss is loaded from its own file inside its pinned wheel (``make bench-peers``
downloads the wheels with ``pip download --no-deps`` into ``.cache/peers``); nothing is
installed, so the peers' dependencies (transformers, accelerate, triton, ...) never enter the
environment:

* TRL 1.16.0 ``GKDTrainer.generalized_jsd_loss`` (``trl/experimental/gkd/gkd_trainer.py``; the
  function alone is taken from the file's syntax tree, the trainer module is not imported);
* torchtune 0.6.1 ``torchtune/modules/loss/kd_losses.py`` (``ForwardKLLoss``, ``ReverseKLLoss``
  and their ``*WithChunkedOutputLoss`` forms, 8 chunks);
* NeMo AutoModel 0.7.0 ``nemo_automodel/components/loss/kd_loss.py`` (``KDLoss``, unchunked and
  ``chunk_size=512``);
* Liger Kernel 0.8.5 ``liger_kernel/chunked_loss/{fused_linear_distillation,jsd_loss}.py``
  (``LigerFusedLinearJSDLoss``, eager: ``compiled=False``, no Triton, ``weight_hard_loss=0``).

Two settings, fp32, one thread:

* logits: student and teacher logits [N=4096, V=32000] (every 17th token ignored), forward KL,
  reverse KL and JSD(0.5); ours is ``KDLoss(chunk_size=512)`` (and unchunked);
* fused head: hidden states [N=8192, d=512] and heads [V=32000, d=512], forward KL (Liger's
  ``beta=0``) and JSD(0.5); ours is ``LinearKDLoss(chunk_size=1024)``, Liger's chunk 1024.

For each candidate: memory, the growth of the peak RSS (``VmHWM`` after the peak is reset
through ``/proc/self/clear_refs``) over one forward+backward in a fresh process, in units of
one fp32 [N, V] matrix (the student gradient alone is 1.0 in the logits setting); time,
forward+backward in one process at a smaller N, candidates interleaved over several rounds,
the median, relative to ours; agreement, the loss value and the gradient (student logits, or
hidden states and weight) against ours at that size, as max |difference| / max |ours|. Where a
peer computes something else it says so: torchtune's forward KL value is the soft
cross-entropy (KL plus the teacher's entropy; same gradient).

Usage: python benchmarks/peers.py --wheels .cache/peers [--quick] [--only logits|fused]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_kd import KDLoss, LinearKDLoss
from lightning_kd.losses import JSD

#: The pinned peers: distribution, version, wheel file name.
WHEELS = {
    "trl": ("trl", "1.16.0", "trl-1.16.0-py3-none-any.whl"),
    "torchtune": ("torchtune", "0.6.1", "torchtune-0.6.1-py3-none-any.whl"),
    "nemo": ("nemo-automodel", "0.7.0", "nemo_automodel-0.7.0-py3-none-any.whl"),
    "liger": ("liger-kernel", "0.8.5", "liger_kernel-0.8.5-py3-none-any.whl"),
}
V = 32000
LOGITS_N, LOGITS_CHUNK = 4096, 512
FUSED_N, FUSED_D, FUSED_CHUNK = 8192, 512, 1024


# --- loading single files out of the wheels -----------------------------------------------


def _source(wheels: Path, peer: str, member: str) -> str:
    path = wheels / WHEELS[peer][2]
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make bench-peers` (it downloads the wheels).")
    with zipfile.ZipFile(path) as whl:
        return whl.read(member).decode()


def _module(name: str, source: str, filename: str) -> types.ModuleType:
    """Execute ``source`` as module ``name`` (registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_loader(name, loader=None, origin=filename)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def _package(name: str) -> None:
    """An empty package ``name`` (its real ``__init__`` imports far more than the loss)."""
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = []
        sys.modules[name] = package


@dataclass
class Peers:
    trl_jsd: Callable
    torchtune: types.ModuleType
    nemo: types.ModuleType
    liger: types.ModuleType


def load_peers(wheels: Path) -> Peers:
    # TRL: only the static method, from the file's syntax tree (the trainer imports half of TRL).
    member = "trl/experimental/gkd/gkd_trainer.py"
    tree = ast.parse(_source(wheels, "trl", member))
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GKDTrainer")
    func = next(
        n
        for n in trainer.body
        if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss"
    )
    func.decorator_list = []
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=[func], type_ignores=[]), member, "exec"), namespace)

    member = "torchtune/modules/loss/kd_losses.py"
    torchtune = _module("peer_torchtune_kd_losses", _source(wheels, "torchtune", member), member)
    member = "nemo_automodel/components/loss/kd_loss.py"
    nemo = _module("peer_nemo_kd_loss", _source(wheels, "nemo", member), member)
    for name in ("liger_kernel", "liger_kernel.chunked_loss"):
        _package(name)
    for leaf in ("fused_linear_distillation", "jsd_loss"):
        member = f"liger_kernel/chunked_loss/{leaf}.py"
        liger = _module(
            f"liger_kernel.chunked_loss.{leaf}", _source(wheels, "liger", member), member
        )
    return Peers(namespace["generalized_jsd_loss"], torchtune, nemo, liger)


# --- the candidates ------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    run: Callable  # (inputs) -> loss
    note: str = ""


def logits_inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, V, generator=gen) * 2).requires_grad_()
    teacher = torch.randn(n, V, generator=gen) * 2
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::17] = -100
    return student, teacher, labels


def fused_inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, FUSED_D, generator=gen).requires_grad_()
    w = (torch.randn(V, FUSED_D, generator=gen) * FUSED_D**-0.5 * 4).requires_grad_()
    ht = torch.randn(n, FUSED_D, generator=gen)
    wt = torch.randn(V, FUSED_D, generator=gen) * FUSED_D**-0.5 * 4
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::17] = -100
    return hs, w, ht, wt, labels


def _tt_chunks(x: torch.Tensor, k: int = 8) -> list[torch.Tensor]:
    return list(x.unsqueeze(0).chunk(k, dim=1))


def groups(peers: Peers) -> dict[str, list[Candidate]]:
    tt, nemo, liger, trl = peers.torchtune, peers.nemo, peers.liger, peers.trl_jsd
    soft_ce = "value is the soft CE (KL + teacher entropy)"

    def ours(divergence, chunk=LOGITS_CHUNK):
        loss = KDLoss(chunk_size=chunk, divergence=divergence)
        return lambda s, t, y: loss(s, t, y)

    def tt_chunked(cls):
        loss = cls(num_output_chunks=8)
        return lambda s, t, y: loss(_tt_chunks(s), _tt_chunks(t), y.unsqueeze(0))

    def trl_loss(beta):
        return lambda s, t, y: trl(s, t, labels=y, beta=beta)

    def liger_loss(beta):
        loss = liger.LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False,
            chunk_size=FUSED_CHUNK,
        )  # fmt: skip
        return lambda hs, w, ht, wt, y: loss(hs, w, ht, wt, y)

    def ours_fused(divergence):
        loss = LinearKDLoss(chunk_size=FUSED_CHUNK, divergence=divergence)
        return lambda hs, w, ht, wt, y: loss(hs, w, ht, wt, y)

    tt_fkl_chunked = tt_chunked(tt.ForwardKLWithChunkedOutputLoss)
    tt_rkl_chunked = tt_chunked(tt.ReverseKLWithChunkedOutputLoss)
    return {
        "forward KL (logits)": [
            Candidate("ours KDLoss chunk 512", ours("forward_kl")),
            Candidate("ours KDLoss unchunked", ours("forward_kl", 0)),
            Candidate("torchtune ForwardKLLoss", tt.ForwardKLLoss(), soft_ce),
            Candidate("torchtune ForwardKL chunked (8)", tt_fkl_chunked, soft_ce),
            Candidate("NeMo AutoModel KDLoss", nemo.KDLoss()),
            Candidate("NeMo AutoModel KDLoss chunk 512", nemo.KDLoss(chunk_size=LOGITS_CHUNK)),
            Candidate("TRL generalized_jsd beta=0", trl_loss(0.0)),
        ],
        "reverse KL (logits)": [
            Candidate("ours KDLoss chunk 512", ours("reverse_kl")),
            Candidate("torchtune ReverseKLLoss", tt.ReverseKLLoss()),
            Candidate("torchtune ReverseKL chunked (8)", tt_rkl_chunked),
            Candidate("TRL generalized_jsd beta=1", trl_loss(1.0)),
        ],
        "JSD(0.5) (logits)": [
            Candidate("ours KDLoss chunk 512", ours(JSD(0.5))),
            Candidate("ours KDLoss unchunked", ours(JSD(0.5), 0)),
            Candidate("TRL generalized_jsd beta=0.5", trl_loss(0.5)),
        ],
        "forward KL (fused head)": [
            Candidate("ours LinearKDLoss chunk 1024", ours_fused("forward_kl")),
            Candidate("Liger FusedLinearJSD beta=0", liger_loss(0.0), "eager (compiled=False)"),
        ],
        "JSD(0.5) (fused head)": [
            Candidate("ours LinearKDLoss chunk 1024", ours_fused(JSD(0.5))),
            Candidate("Liger FusedLinearJSD beta=0.5", liger_loss(0.5), "eager (compiled=False)"),
        ],
    }


def _fused(group: str) -> bool:
    return "fused" in group


def _inputs(group: str, n: int):
    return fused_inputs(n) if _fused(group) else logits_inputs(n)


def _leaves(inputs) -> list[torch.Tensor]:
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def _step(candidate: Candidate, inputs) -> torch.Tensor:
    for x in _leaves(inputs):
        x.grad = None
    loss = candidate.run(*inputs)
    loss.backward()
    return loss.detach()


# --- measurements --------------------------------------------------------------------------


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _child_memory(wheels: Path, group: str, name: str) -> None:
    torch.set_num_threads(1)
    candidate = next(c for c in groups(load_peers(wheels))[group] if c.name == name)
    n = FUSED_N if _fused(group) else LOGITS_N
    inputs = _inputs(group, n)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS
    before = _kib("VmRSS")
    _step(candidate, inputs)
    print(json.dumps({"growth": (_kib("VmHWM") - before) * 1024 / (n * V * 4)}))


def memory(wheels: Path, group: str, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, "--wheels", str(wheels), "--child-memory", group, name],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"  ({name}: memory run failed: {proc.stderr.strip().splitlines()[-1:]})")
            out[name] = float("nan")
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    return out


def _grads(inputs) -> list[torch.Tensor]:
    return [x.grad.detach().clone() for x in _leaves(inputs)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def speed_and_agreement(candidates: list[Candidate], group: str, n: int, rounds: int):
    """Median time of each candidate (interleaved rounds, after a warm-up round) and its value
    and gradient difference from the first candidate (ours)."""
    inputs = _inputs(group, n)
    values, grads = {}, {}
    for c in candidates:  # warm-up, and the values and gradients compared
        values[c.name] = _step(c, inputs)
        grads[c.name] = _grads(inputs)
    times = {c.name: [] for c in candidates}
    for _ in range(rounds):
        for c in candidates:
            start = time.perf_counter()
            _step(c, inputs)
            times[c.name].append(time.perf_counter() - start)
    ref = candidates[0].name
    out = {}
    for c in candidates:
        value_diff = _rel(values[c.name], values[ref])
        grad_diff = max(_rel(g, r) for g, r in zip(grads[c.name], grads[ref], strict=True))
        out[c.name] = (statistics.median(times[c.name]), value_diff, grad_diff)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, default=Path(".cache/peers"))
    parser.add_argument("--quick", action="store_true", help="smaller timing size, 2 rounds")
    parser.add_argument("--only", choices=["logits", "fused"])
    parser.add_argument("--child-memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(args.wheels, *args.child_memory)
        return 0
    torch.set_num_threads(1)
    peers = load_peers(args.wheels)
    speed_n = {"logits": 512 if args.quick else 2048, "fused": 1024 if args.quick else 2048}
    rounds = 2 if args.quick else 5
    versions = ", ".join(f"{dist} {ver}" for dist, ver, _ in WHEELS.values())
    print(f"torch {torch.__version__}, 1 thread, fp32; peers: {versions}")
    print(
        f"memory: logits N={LOGITS_N}, fused N={FUSED_N} (d={FUSED_D}), V={V}, fresh process "
        f"each, peak-RSS growth in fp32 [N, V] matrices; time: N={speed_n['logits']} (logits), "
        f"{speed_n['fused']} (fused), median of {rounds} interleaved rounds, relative to ours; "
        f"diff: max |x - ours| / max |ours| of the loss and of the gradients at that N"
    )
    for group, candidates in groups(peers).items():
        kind = "fused" if _fused(group) else "logits"
        if args.only and args.only != kind:
            continue
        mem = memory(args.wheels, group, [c.name for c in candidates])
        speed = speed_and_agreement(candidates, group, speed_n[kind], rounds)
        ref_time = speed[candidates[0].name][0]
        print(f"\n{group}")
        print(f"  {'candidate':34s} {'memory':>8s} {'time':>7s} {'value diff':>11s} "
              f"{'grad diff':>10s}  note")  # fmt: skip
        for c in candidates:
            t, value_diff, grad_diff = speed[c.name]
            print(f"  {c.name:34s} {mem[c.name]:7.3f}x {t / ref_time:6.2f}x {value_diff:11.1e} "
                  f"{grad_diff:10.1e}  {c.note}")  # fmt: skip
        print(f"  (ours: {ref_time:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
