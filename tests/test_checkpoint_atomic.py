"""Crash-safe distributed checkpoints (lightning_kd.checkpoint).

The in-process tests drive ``AtomicModelParallelStrategy.save_checkpoint`` in one process
(DCP saves without a process group) and simulate interrupted saves with exceptions. The
distributed tests run ``tests/scripts/atomic_ckpt_run.py`` on 2 processes (TP=2, gloo) and
SIGKILL the whole job at each moment of a save: one chain of runs, each resuming from what
``resolve_last_checkpoint`` picks after the previous kill, shared by the per-phase tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_kd.checkpoint import (
    MARKER_FILENAME,
    METADATA_FILENAME,
    TornCheckpointWarning,
    UnverifiedCheckpointWarning,
    inspect_checkpoint,
    resolve_last_checkpoint,
    verify_checkpoint,
)
from lightning_kd.checkpoint.strategy import AtomicModelParallelStrategy

SCRIPT = Path(__file__).parent / "scripts" / "atomic_ckpt_run.py"
ROOT = Path(__file__).resolve().parents[1]

# DCP without a process group says it saves in one process: that is the point here.
single_process = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def checkpoint(step: int, value: float | None = None) -> dict[str, Any]:
    """A Lightning-shaped checkpoint dict small enough to save in a test."""
    value = float(step) if value is None else value
    return {
        "state_dict": {"w": torch.full((4, 3), value)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.full((4, 3), value)}}}],
        "global_step": step,
        "epoch": step // 2,
        "loops": {"fit_loop": {"step": step}},
    }


class Interrupted(Exception):
    pass


class Interrupting(AtomicModelParallelStrategy):
    """Raises after ``phase`` (one process: what a SIGKILL there leaves on disk)."""

    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase

    def _write_shards(self, checkpoint, staged):
        super()._write_shards(checkpoint, staged)
        if self.phase == "after_shards":
            raise Interrupted

    def _write_metadata(self, checkpoint, staged):
        super()._write_metadata(checkpoint, staged)
        if self.phase == "after_metadata":
            raise Interrupted

    def _write_marker(self, checkpoint, staged, **kwargs):
        super()._write_marker(checkpoint, staged, **kwargs)
        if self.phase == "after_marker":
            raise Interrupted

    def _move_aside(self, path, aside):
        super()._move_aside(path, aside)
        if self.phase == "between_renames":
            raise Interrupted


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def torn_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, TornCheckpointWarning)]


def resolve(folders: list[Path]) -> tuple[str | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = resolve_last_checkpoint(folders)
    return chosen, torn_warnings(caught)


# ============================================================================ in one process
@single_process
def test_save_seals_the_directory_then_swaps_it_in(tmp_path):
    strategy = AtomicModelParallelStrategy()
    path = tmp_path / "last.ckpt"
    for step in (2, 4):
        strategy.save_checkpoint(checkpoint(step), path)
        assert names(tmp_path) == {"last.ckpt"}  # no .partial / .aside left behind
        marker = json.loads((path / MARKER_FILENAME).read_text())
        assert marker["global_step"] == step and marker["version"] == 2
        assert marker["files"] == {
            p.name: p.stat().st_size for p in path.iterdir() if p.name != MARKER_FILENAME
        }
        assert set(marker["sha256"]) == set(marker["files"])  # every file hashed
        assert {".metadata", METADATA_FILENAME} <= set(marker["files"]) <= names(path)
        info = verify_checkpoint(path)
        assert info.complete and info.kind == "directory" and info.global_step == step
    assert torch.load(path / METADATA_FILENAME, weights_only=True)["global_step"] == 4


@single_process
@pytest.mark.parametrize(
    ("phase", "chosen", "step", "torn"),
    [
        ("after_shards", "last.ckpt", 2, True),
        ("after_metadata", "last.ckpt", 2, True),
        ("after_marker", "last.ckpt.partial", 4, False),
        ("between_renames", "last.ckpt.partial", 4, False),
    ],
)
def test_an_interrupted_save_leaves_a_complete_checkpoint(tmp_path, phase, chosen, step, torn):
    path = tmp_path / "last.ckpt"
    AtomicModelParallelStrategy().save_checkpoint(checkpoint(2), path)
    with pytest.raises(Interrupted):
        Interrupting(phase).save_checkpoint(checkpoint(4), path)
    found, warned = resolve([tmp_path])
    assert Path(found).name == chosen and inspect_checkpoint(found).global_step == step
    if torn:
        assert len(warned) == 1 and "last.ckpt.partial" in warned[0] and chosen in warned[0]
        with pytest.raises(ValueError, match=r"not a complete checkpoint") as refused:
            AtomicModelParallelStrategy().load_checkpoint(path.with_name("last.ckpt.partial"))
        assert f"{path} (global step 2)" in str(refused.value)
    else:
        assert warned == []
    # The next save finishes a sealed leftover before writing (nothing is lost if it is cut
    # short in turn), or removes a torn one.
    with pytest.raises(Interrupted):
        Interrupting("after_shards").save_checkpoint(checkpoint(6), path)
    assert inspect_checkpoint(path).global_step == step
    AtomicModelParallelStrategy().save_checkpoint(checkpoint(6), path)
    assert names(tmp_path) == {"last.ckpt"} and inspect_checkpoint(path).global_step == 6


@single_process
def test_a_stale_sealed_leftover_older_than_the_checkpoint_is_discarded(tmp_path):
    strategy = AtomicModelParallelStrategy()
    strategy.save_checkpoint(checkpoint(2), tmp_path / "old.ckpt")
    strategy.save_checkpoint(checkpoint(6), tmp_path / "last.ckpt")
    (tmp_path / "old.ckpt").rename(tmp_path / "last.ckpt.partial")
    with pytest.raises(Interrupted):
        Interrupting("after_shards").save_checkpoint(checkpoint(8), tmp_path / "last.ckpt")
    assert inspect_checkpoint(tmp_path / "last.ckpt").global_step == 6  # not rolled back


@single_process
def test_marker_and_meta_pt_must_agree(tmp_path):
    strategy = AtomicModelParallelStrategy()
    strategy.save_checkpoint(checkpoint(2), tmp_path / "a.ckpt")
    strategy.save_checkpoint(checkpoint(4), tmp_path / "b.ckpt")
    b = tmp_path / "b.ckpt"
    # meta.pt of another save (what an in-place rewrite cut short leaves)
    shutil.copy(tmp_path / "a.ckpt" / METADATA_FILENAME, b / METADATA_FILENAME)
    with pytest.raises(
        ValueError, match=r"meta\.pt says global_step 2, the completion marker says 4"
    ):
        strategy.load_checkpoint(b)
    # meta.pt edited in place: same check; the cheap check (SHA-256) catches it as well
    meta = torch.load(tmp_path / "a.ckpt" / METADATA_FILENAME, weights_only=True)
    meta["global_step"] = 3
    torch.save(meta, b / METADATA_FILENAME)
    with pytest.raises(ValueError, match="global_step 3, the completion marker says 4") as refused:
        strategy.load_checkpoint(b)
    assert str(b) in str(refused.value) and f"{tmp_path / 'a.ckpt'} (global step 2)" in str(
        refused.value
    )
    found, warned = resolve([tmp_path])
    assert Path(found).name == "a.ckpt" and "b.ckpt" in warned[0] and "SHA-256" in warned[0]


@single_process
def test_resolver_ranks_complete_checkpoints_and_names_torn_ones(tmp_path):
    strategy = AtomicModelParallelStrategy()
    assert resolve([tmp_path, tmp_path / "missing"]) == (None, [])
    strategy.save_checkpoint(checkpoint(2), tmp_path / "dir2.ckpt")
    strategy.save_checkpoint(checkpoint(5), tmp_path / "dir5.ckpt")
    torch.save({"global_step": 3, "state_dict": {}}, tmp_path / "file3.ckpt")
    good = (tmp_path / "file3.ckpt").read_bytes()
    (tmp_path / "truncated9.ckpt").write_bytes(good[: len(good) // 2])  # a cut-short copy
    with pytest.raises(Interrupted):
        Interrupting("after_metadata").save_checkpoint(checkpoint(9), tmp_path / "torn9.ckpt")
    strategy.save_checkpoint(checkpoint(9), tmp_path / "short9.ckpt")
    shard = next((tmp_path / "short9.ckpt").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1])
    (tmp_path / "gone.ckpt.aside").mkdir()  # a removal cut short: skipped without a word
    (tmp_path / "notes.txt").write_text("not a checkpoint")

    found, warned = resolve([tmp_path])
    assert Path(found).name == "dir5.ckpt"
    (message,) = warned
    for torn in ("truncated9.ckpt", "torn9.ckpt.partial", "short9.ckpt"):
        assert str(tmp_path / torn) in message
    assert "gone.ckpt.aside" not in message and "bytes, the marker says" in message
    assert f"Using {tmp_path / 'dir5.ckpt'} (global step 5)" in message

    torch.save({"global_step": 5}, tmp_path / "file5.ckpt")  # same step: the newest wins
    os.utime(tmp_path / "file5.ckpt", (1e9, 1e9))
    assert Path(resolve([tmp_path])[0]).name == "dir5.ckpt"
    os.utime(tmp_path / "file5.ckpt", (4e9, 4e9))
    assert Path(resolve([tmp_path])[0]).name == "file5.ckpt"


@single_process
def test_a_directory_without_marker_loads_with_a_warning(tmp_path):
    """Lightning's ModelParallelStrategy writes the same layout without the marker."""
    AtomicModelParallelStrategy().save_checkpoint(checkpoint(4), tmp_path / "plain.ckpt")
    (tmp_path / "plain.ckpt" / MARKER_FILENAME).unlink()
    with pytest.warns(UnverifiedCheckpointWarning, match="cannot be verified"):
        info = verify_checkpoint(tmp_path / "plain.ckpt")
    assert info.kind == "legacy" and info.global_step == 4
    assert resolve([tmp_path]) == (str(tmp_path / "plain.ckpt"), [])
    shard = next((tmp_path / "plain.ckpt").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])  # what an in-place rewrite cut short leaves
    with pytest.raises(ValueError, match=r"shard __0_0\.distcp is missing or shorter"):
        AtomicModelParallelStrategy().load_checkpoint(tmp_path / "plain.ckpt")


@single_process
def test_remove_and_single_file_saves(tmp_path):
    strategy = AtomicModelParallelStrategy()
    path = tmp_path / "x.ckpt"
    strategy.save_checkpoint(checkpoint(2), path)
    with pytest.raises(Interrupted):
        Interrupting("after_shards").save_checkpoint(checkpoint(4), path)
    strategy.remove_checkpoint(path)
    assert names(tmp_path) == set()  # the torn leftover went with it
    # save_distributed_checkpoint=False: Lightning's single-file save, over a directory too
    strategy.save_checkpoint(checkpoint(2), path)
    AtomicModelParallelStrategy(save_distributed_checkpoint=False).save_checkpoint(
        checkpoint(4), path
    )
    assert names(tmp_path) == {"x.ckpt"} and path.is_file()
    assert inspect_checkpoint(path).global_step == 4
    strategy.remove_checkpoint(path)
    assert names(tmp_path) == set()


# ============================================================================ 2 processes
@dataclass
class Run:
    out: Path
    returncode: int
    output: str

    def losses(self) -> dict[int, float]:
        lines = (self.out / "losses.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}

    def killed(self) -> dict | None:
        file = self.out / "killed.json"
        return json.loads(file.read_text()) if file.exists() else None

    def tail(self) -> str:
        return self.output[-6000:]


def launch(tmp: Path, name: str, *args: str) -> Run:
    """Run the script (both ranks) in a session of its own: its SIGKILL of its process group
    reaches every rank and nothing else; a hung run is killed the same way."""
    out = tmp / name
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name} did not finish in 10 minutes:\n{output[-6000:]}")
    return Run(out, proc.returncode, output)


def assert_same_losses(run: Run, reference: Run, steps: range) -> None:
    got = run.losses()
    assert sorted(got) == list(steps), (sorted(got), list(steps))
    want = reference.losses()
    torch.testing.assert_close(
        torch.tensor([got[s] for s in steps]), torch.tensor([want[s] for s in steps]),
        rtol=1e-5, atol=0,
    )  # fmt: skip


def assert_same_student(run: Run, reference: Run) -> None:
    got = torch.load(run.out / "student.pt", weights_only=True)
    want = torch.load(reference.out / "student.pt", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-8, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Run, Path]:
    """10 uninterrupted steps, every checkpoint kept (steps 2, 4, ..., 10)."""
    tmp = tmp_path_factory.mktemp("reference")
    run = launch(tmp, "run", "--ckpt-dir", str(tmp / "ckpt"), "--top-k", "-1")
    assert run.returncode == 0, run.tail()
    return run, tmp / "ckpt"


# Each run resumes from what the resolver picked after the previous kill and is killed at
# its first save of last.ckpt (the first run at its second: there must be one to replace).
# phase: (step of the killed save, what is on disk after, resolved name, its step, torn ones)
CHAIN = {
    "shards": (4, {"last.ckpt", "last.ckpt.partial"}, "last.ckpt", 2, ["last.ckpt.partial"]),
    "after_shards": (4, {"last.ckpt", "last.ckpt.partial"}, "last.ckpt", 2, ["last.ckpt.partial"]),
    "after_metadata": (
        4, {"last.ckpt", "last.ckpt.partial"}, "last.ckpt", 2, ["last.ckpt.partial"]
    ),
    "after_marker": (4, {"last.ckpt", "last.ckpt.partial"}, "last.ckpt.partial", 4, []),
    "between_renames": (6, {"last.ckpt.aside", "last.ckpt.partial"}, "last.ckpt.partial", 6, []),
    "after_renames": (8, {"last.ckpt", "last.ckpt.aside"}, "last.ckpt", 8, []),
}  # fmt: skip


@dataclass
class Link:
    resumed_from: int  # the step the killed run started from (0: fresh)
    killed: Run
    snapshot: Path  # a copy of the checkpoint folder right after the kill
    resolved: str | None = None
    warned: list[str] = field(default_factory=list)
    resumed: Run | None = None  # the next run, from `resolved`


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[dict[str, Link], Run | None]:
    tmp = tmp_path_factory.mktemp("chain")
    ckpt = tmp / "ckpt"
    links: dict[str, Link] = {}
    resume: list[str] = []
    start = 0
    previous: Link | None = None
    for i, phase in enumerate(CHAIN):
        run = launch(
            tmp, f"{i}-{phase}", "--ckpt-dir", str(ckpt), *resume,
            "--kill-phase", phase, "--kill-at-save", "2" if i == 0 else "1",
        )  # fmt: skip
        if previous is not None:
            previous.resumed = run
        snapshot = tmp / "snapshots" / phase
        if ckpt.exists():
            shutil.copytree(ckpt, snapshot, symlinks=True)
        link = previous = links[phase] = Link(start, run, snapshot)
        if run.killed() is None:
            return links, None  # the per-phase tests report it
        link.resolved, link.warned = resolve([ckpt])
        if link.resolved is None:
            return links, None
        start = inspect_checkpoint(link.resolved).global_step
        resume = ["--resume", link.resolved]
    final = launch(tmp, "final", "--ckpt-dir", str(ckpt), *resume)
    previous.resumed = final
    return links, final


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("phase", list(CHAIN))
def test_sigkill_at_each_moment_of_a_save(chain, reference, phase):
    """(a) the resolver picks the newest complete checkpoint and names the torn one, (b) a
    resumed run trains the same losses as an uninterrupted one, (c) loading the torn
    directory is refused, naming the checkpoint to use instead."""
    links, _ = chain
    assert phase in links, "an earlier run of the chain failed: see its test"
    link = links[phase]
    killed_step, on_disk, chosen, chosen_step, torn = CHAIN[phase]
    assert link.killed.returncode == -signal.SIGKILL, link.killed.tail()
    assert link.killed.killed()["phase"] == phase
    assert_same_losses(link.killed, reference[0], range(link.resumed_from + 1, killed_step + 1))
    assert names(link.snapshot) == on_disk

    # (a), on the copy taken right after the kill (the live folder moved on)
    found, warned = resolve([link.snapshot])
    assert found == str(link.snapshot / chosen)
    assert inspect_checkpoint(found).global_step == chosen_step
    assert Path(link.resolved).name == chosen and len(link.warned) == len(warned)
    if torn:
        (message,) = warned
        assert all(str(link.snapshot / name) in message for name in torn), message
        assert f"Using {found} (global step {chosen_step})" in message
    else:
        assert warned == []
    # (c)
    for name in torn:
        with pytest.raises(ValueError, match="not a complete checkpoint") as refused:
            AtomicModelParallelStrategy().load_checkpoint(link.snapshot / name)
        assert str(link.snapshot / name) in str(refused.value)
        assert f"{found} (global step {chosen_step})" in str(refused.value)
    for name in on_disk - set(torn):  # every other directory left is complete and consistent
        assert verify_checkpoint(link.snapshot / name).complete
    # (b)
    resumed = link.resumed
    assert resumed is not None, "the chain stopped here"
    next_kill = list(CHAIN).index(phase) + 1
    end = CHAIN[list(CHAIN)[next_kill]][0] if next_kill < len(CHAIN) else 10
    if resumed.killed() is None:
        assert resumed.returncode == 0, resumed.tail()
    assert_same_losses(resumed, reference[0], range(chosen_step + 1, end + 1))


@pytest.mark.distributed
@pytest.mark.slow
def test_the_chain_of_resumes_ends_with_the_uninterrupted_weights(chain, reference):
    _, final = chain
    assert final is not None, "the chain stopped early: see the per-phase tests"
    assert final.returncode == 0, final.tail()
    assert json.loads((final.out / "result.json").read_text())["global_step"] == 10
    assert_same_student(final, reference[0])


@pytest.mark.distributed
@pytest.mark.slow
def test_resuming_from_a_torn_checkpoint_fails_on_every_rank(chain, tmp_path):
    """The issue's case: new shards and old (or no) loop state; nothing trains."""
    links, _ = chain
    torn = links["after_metadata"].snapshot / "last.ckpt.partial"
    run = launch(tmp_path, "torn", "--ckpt-dir", str(tmp_path / "ckpt"), "--resume", str(torn))
    assert run.returncode not in (0, -signal.SIGKILL), run.tail()
    assert f"ValueError: Refusing to load {torn}, which is not a complete checkpoint" in run.output
    assert f"{torn.parent / 'last.ckpt'} (global step 2)" in run.output
    assert not (run.out / "losses.jsonl").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_checkpoint_without_marker_resumes_exactly_with_a_warning(reference, tmp_path):
    """The layout of Lightning's ModelParallelStrategy (no marker) still resumes."""
    run_ref, ckpt = reference
    plain = tmp_path / "plain" / "epoch=0-step=4.ckpt"
    shutil.copytree(ckpt / "epoch=0-step=4.ckpt", plain)
    (plain / MARKER_FILENAME).unlink()
    run = launch(tmp_path, "legacy", "--ckpt-dir", str(tmp_path / "ckpt"), "--resume", str(plain))
    assert run.returncode == 0, run.tail()
    assert f"{plain} has no completion marker" in run.output  # (Lightning prints no category)
    assert "cannot be verified" in run.output
    assert_same_losses(run, run_ref, range(5, 11))
    assert_same_student(run, run_ref)


@pytest.mark.distributed
@pytest.mark.slow
def test_meta_pt_of_another_save_is_refused(reference, tmp_path):
    """A 2-rank checkpoint whose meta.pt comes from another step (the issue's torn state)."""
    _, ckpt = reference
    mixed = tmp_path / "epoch=0-step=6.ckpt"
    shutil.copytree(ckpt / "epoch=0-step=6.ckpt", mixed)
    shutil.copytree(ckpt / "epoch=0-step=4.ckpt", tmp_path / "epoch=0-step=4.ckpt")
    shutil.copy(ckpt / "epoch=0-step=2.ckpt" / METADATA_FILENAME, mixed / METADATA_FILENAME)
    with pytest.raises(
        ValueError, match=r"meta\.pt says global_step 2, the completion marker says 6"
    ):
        AtomicModelParallelStrategy().load_checkpoint(mixed)
    found, warned = resolve([tmp_path])
    assert Path(found).name == "epoch=0-step=4.ckpt" and str(mixed) in warned[0]
