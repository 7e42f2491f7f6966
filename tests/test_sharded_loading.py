"""Sharded loading (``DistillationModule(sharded_loading=True)``,
:mod:`lightning_kd.parallel.meta_init`): meta construction, and real multi-process runs (gloo)
whose losses equal those of the same runs loading the teacher in full on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_kd import TinyLlama
from lightning_kd.parallel.meta_init import (
    WeightSource,
    build_on_meta,
    load_hf_directory,
    materialize,
    recompute_buffers,
)
from tests.helpers.distributed import parallelize, run_workers
from tests.helpers.runs import BatchedRuns, launch

SCRIPT = Path(__file__).parent / "scripts" / "sharded_loading_run.py"


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def tiny() -> TinyLlama:
    return TinyLlama(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)


def test_a_random_init_is_not_built_on_meta_and_the_rng_is_untouched():
    torch.manual_seed(0)
    assert build_on_meta(tiny, "student") is None  # the caller builds it in full
    after_meta_build = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after_meta_build, torch.rand(3), rtol=0, atol=0)
    assert build_on_meta(tiny(), "student") is None  # an instance is already materialised


def save_checkpoint(
    state: dict[str, torch.Tensor], path: Path, kind: str, loop_state: bool = True
) -> str:
    """``state`` under ``state_dict.model.*`` as a Lightning checkpoint file (``torch``) or a
    distributed checkpoint directory (``dcp``): as ModelParallelStrategy writes it, or without
    ``loop_state`` a bare ``dcp.save`` of the weights."""
    import torch.distributed.checkpoint as dcp

    nested = {"state_dict": {f"model.{k}": v for k, v in state.items()}}
    if kind == "torch":
        torch.save(nested, path)
    else:
        dcp.save(nested, checkpoint_id=str(path), no_dist=True)
        if loop_state:
            torch.save({"global_step": 0}, path / "meta.pt")  # Lightning's loop state file
    return str(path)


@pytest.mark.parametrize("kind", ["torch", "dcp"])
def test_a_checkpointed_model_builds_on_meta_and_materialises_equal(tmp_path, kind):
    torch.manual_seed(0)
    reference = tiny()
    reference.restrict_vocab(37)  # the file holds 40 rows; a reconciled model keeps 37
    full = tiny()
    full.load_state_dict(
        {k: v for k, v in reference.state_dict().items()} | _padded(reference, full)
    )
    path = save_checkpoint(full.state_dict(), tmp_path / "w.ckpt", kind)
    built = build_on_meta(tiny, "teacher", path, "model.")
    assert built is not None
    model, source = built
    assert is_meta(model) and source == WeightSource(kind, path, "model.", "teacher")
    model.restrict_vocab(37)
    materialize(model, torch.device("cpu"), source)
    assert not is_meta(model)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_cos, reference.rope_cos, rtol=0, atol=0)
    ids = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


def _padded(reference: nn.Module, full: nn.Module) -> dict[str, torch.Tensor]:
    """The reference's first rows with ``full``'s extra rows below them."""
    out = {}
    for key in ("embed.weight", "lm_head.weight"):
        rows = reference.state_dict()[key]
        out[key] = torch.cat([rows, full.state_dict()[key][rows.shape[0] :]])
    return out


def test_a_distributed_checkpoint_loads_in_full_and_bad_ones_are_refused(tmp_path):
    from lightning_kd.training.teacher import TeacherSource

    torch.manual_seed(0)
    reference = tiny()
    path = save_checkpoint(reference.state_dict(), tmp_path / "teacher.ckpt", "dcp")
    built = TeacherSource(tiny, path, "model.").build()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(built.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"holds no teacher weights \(no 'state_dict\.student\."):
        TeacherSource(tiny, path, "student.").build()
    (tmp_path / "empty.ckpt").mkdir()
    with pytest.raises(ValueError, match="neither a file nor a distributed checkpoint"):
        TeacherSource(tiny, str(tmp_path / "empty.ckpt"))
    model, source = build_on_meta(tiny, "teacher", path, "student.")
    with pytest.raises(ValueError, match="holds no teacher weights"):
        materialize(model, torch.device("cpu"), source)
    wider = TinyLlama(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)
    model, source = build_on_meta(lambda: wider, "teacher", path, "model.")
    with pytest.raises(ValueError, match="shape"):
        materialize(model, torch.device("cpu"), source)
    # A checkpoint with more layers than the model is refused (strict, as loading in full).
    shallow = TinyLlama(vocab_size=40, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64)
    model, source = build_on_meta(lambda: shallow, "teacher", path, "model.")
    with pytest.raises(ValueError, match=r"unexpected \['layers\.1\."):
        materialize(model, torch.device("cpu"), source)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        TeacherSource(lambda: shallow, path, "model.").build()


def test_a_bare_dcp_save_of_the_weights_is_a_teacher_checkpoint_too(tmp_path):
    """No Lightning loop state (meta.pt) to verify: DCP's .metadata, written last, is enough."""
    from lightning_kd.training.teacher import TeacherSource

    torch.manual_seed(0)
    reference = tiny()
    path = save_checkpoint(reference.state_dict(), tmp_path / "weights", "dcp", loop_state=False)
    for model in (TeacherSource(tiny, path, "model.").build(), None):
        if model is None:  # sharded loading's reader
            model, source = build_on_meta(tiny, "teacher", path, "model.")
            materialize(model, torch.device("cpu"), source)
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_tied_weights_survive_and_mismatches_are_refused(tmp_path):
    torch.manual_seed(0)
    reference = TinyLlama(vocab_size=37, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                          hidden_dim=32, tie_embeddings=True)  # fmt: skip
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    with torch.device("meta"):
        model = TinyLlama(vocab_size=37, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                          hidden_dim=32, tie_embeddings=True)  # fmt: skip
    materialize(model, torch.device("cpu"), WeightSource("torch", str(tmp_path / "w.pt")))
    assert model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(model.embed.weight, reference.embed.weight, rtol=0, atol=0)
    with torch.device("meta"):
        wider = TinyLlama(vocab_size=37, dim=32, n_layers=1, n_heads=2, n_kv_heads=2)
    with pytest.raises(ValueError, match="shape"):
        materialize(wider, torch.device("cpu"), WeightSource("torch", str(tmp_path / "w.pt")))


def test_unknown_non_persistent_buffers_are_refused():
    model = nn.Linear(2, 2)
    model.register_buffer("table", torch.zeros(2), persistent=False)
    with pytest.raises(ValueError, match="non-persistent"):
        recompute_buffers(model)


def small_hf(tmp_path: Path):
    """A two-layer HF Llama saved to ``tmp_path / "hf"``; returns the model."""
    from lightning_kd.models.hf import HFCausalLM

    config = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    reference = HFCausalLM(config=config)
    reference.model.save_pretrained(tmp_path / "hf")
    return reference


def test_hf_model_under_meta_reads_only_the_config(tmp_path):
    pytest.importorskip("transformers")
    from lightning_kd.models.hf import HFCausalLM

    small_hf(tmp_path)
    with torch.device("meta"):
        model = HFCausalLM(pretrained_path=str(tmp_path / "hf"))
    assert is_meta(model)
    assert model.model.config.hidden_size == 32 and model.vocab_size == 40


def test_an_hf_directory_loads_exactly_through_dcp_in_one_process(tmp_path):
    pytest.importorskip("transformers")
    from lightning_kd.models.hf import HFCausalLM

    reference = small_hf(tmp_path)
    built = build_on_meta(lambda: HFCausalLM(pretrained_path=str(tmp_path / "hf")), "teacher")
    assert built is not None and built[1] == WeightSource(
        "hf", str(tmp_path / "hf"), role="teacher"
    )
    model, source = built
    materialize(model, torch.device("cpu"), source)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    tokens = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=0)


def test_the_hf_reader_maps_the_file_for_one_tensor_at_a_time(tmp_path, monkeypatch):
    """A safetensors handle maps the whole file and keeps every page a read touched resident
    until it closes: one handle per tensor bounds that to the largest tensor."""
    pytest.importorskip("transformers")
    import safetensors

    from lightning_kd.models.hf import HFCausalLM

    small_hf(tmp_path)
    reads_per_handle: list[int] = []
    real_open = safetensors.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs) -> None:
            self.handle = real_open(*args, **kwargs)
            self.reads = 0

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            reads_per_handle.append(self.reads)
            return self.handle.__exit__(*exc)

        def get_slice(self, key):
            stored = self.handle.get_slice(key)
            handle = self

            class CountingSlice:  # shapes and dtypes are metadata; indexing reads data
                def __getitem__(self, index):
                    handle.reads += 1
                    return stored[index]

                def __getattr__(self, name):
                    return getattr(stored, name)

            return CountingSlice()

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    model, source = build_on_meta(
        lambda: HFCausalLM(pretrained_path=str(tmp_path / "hf")), "teacher"
    )
    model.to_empty(device="cpu")
    with torch.no_grad():
        load_hf_directory(model, source.path)
    data_reads = [reads for reads in reads_per_handle if reads]
    assert len(data_reads) == len(model.state_dict()) and max(data_reads) == 1


def run(tmp_path: Path, name: str, *args: str) -> dict:
    """One launch of the script; its JSON result."""
    out = tmp_path / f"{name}.json"
    launch(SCRIPT, [[*args, "--out", str(out)]], tmp_path, f"case_{name}")
    return json.loads(out.read_text()) if out.exists() else {}


def make_teacher(source: Path, *args: str) -> None:
    """The script's ``--make-teacher``, in this process (no interpreter start)."""
    from tests.scripts import sharded_loading_run

    if not source.exists():
        sharded_loading_run.make_teacher(
            sharded_loading_run.parse(["--make-teacher", str(source), *args])
        )


ONLY_SHARDED = ("--teacher-offload", "--compile", "--fused-head")
# (id, teacher, teacher vocabulary, devices, DP, options). 4 ranks where the DP=2 x TP=2 mesh
# is the subject; offload and compile are FSDP2 matters (DP=2, TP=1).
CASES = [
    ("tiny-padded-tp2", "tiny", "40", "2", "1", ()),  # teacher_checkpoint (torch.save), padded
    ("tiny-padded-dp2xtp2", "tiny", "40", "4", "2", ()),
    ("tiny-tied-dp2", "tiny", "37", "2", "2", ("--tied", "--tp", "1")),  # a tied head, FSDP2
    ("dcp-padded-dp2xtp2", "tiny-dcp", "40", "4", "2", ()),  # a DCP checkpoint directory
    ("hf-tp2", "hf", "37", "2", "1", ()),  # save_pretrained directory through DCP
    ("hf-dp2xtp2", "hf", "37", "4", "2", ()),
    ("hf-padded-dp2xtp2", "hf", "40", "4", "2", ()),  # ... with a padded vocabulary
    ("hf-offload-dp2", "hf", "37", "2", "2", ("--tp", "1", "--teacher-offload")),  # CPUOffload
    ("hf-compile-dp2", "hf", "37", "2", "2", ("--tp", "1", "--compile")),  # compiled blocks
    ("hf-fused-dp2xtp2", "hf", "37", "4", "2", ("--fused-head",)),  # heads: own FSDP2 units
]  # fmt: skip


def _compiles() -> bool:
    from lightning_kd.parallel.block_wrappers import compiler_available

    return compiler_available()


@pytest.fixture(scope="module")
def loading_runs(tmp_path_factory) -> BatchedRuns:
    """Each case loading in full and sharded (``--teacher-offload``, ``--compile`` and
    ``--fused-head`` only on the sharded run: none may change the numbers; other options on
    both); every case of one world size in one launch."""
    directory = tmp_path_factory.mktemp("loading")
    runs = BatchedRuns(SCRIPT, directory)
    for name, teacher, vocab, devices, dp, options in CASES:
        if "--compile" in options and not _compiles():
            continue
        only_sharded = [o for o in options if o in ONLY_SHARDED]
        both = [o for o in options if o not in only_sharded]
        common = ("--teacher", teacher, "--teacher-vocab", vocab, *both)
        source = directory / "-".join(["src", teacher, vocab, *both]).replace("--", "")
        make_teacher(source, *common)
        layout = ("--source", str(source), "--devices", devices, "--dp", dp, *common)
        runs.add(f"{name}-full", *layout)
        runs.add(f"{name}-sharded", *layout, "--sharded", *only_sharded)
    return runs


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_sharded_loading_gives_the_same_run(loading_runs, case):
    """Loading in full vs sharded, the same run."""
    if "--compile" in case[-1] and not _compiles():
        pytest.skip("torch.compile needs a C++ compiler on CPU; none found")
    full, sharded = loading_runs[f"{case[0]}-full"], loading_runs[f"{case[0]}-sharded"]
    assert full["materialized"] == [] and len(sharded["materialized"]) == 1
    assert len(full["losses"]) == 4
    torch.testing.assert_close(
        torch.tensor(sharded["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=1e-5
    )
    assert sharded["teacher_digest"] == pytest.approx(full["teacher_digest"], rel=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_loading_holds_about_a_quarter_of_the_teacher_per_rank_at_dp2_x_tp2(tmp_path):
    """``benchmarks/sharded_loading.py`` at a smaller size (a 72 MiB HF Llama teacher): the
    teacher's share of each rank's peak resident memory when training starts (big-teacher run
    minus tiny-teacher run) is about its quarter (0.29x measured; 2.1x loading in full). Each
    run in a fresh launch: a process's peak is the largest since it started."""
    pytest.importorskip("transformers")
    peaks = {}
    for name, hidden, layers in (("big", "512", "6"), ("tiny", "32", "2")):
        source = tmp_path / name
        make_teacher(source, "--teacher", "hf", "--hf-hidden", hidden, "--hf-layers", layers)
        peaks[name] = run(tmp_path, name, "--source", str(source), "--teacher", "hf",
                          "--devices", "4", "--dp", "2", "--steps", "1", "--sharded")  # fmt: skip
    teacher_mib = peaks["big"]["teacher_numel"] * 4 / 2**20
    added = [
        big - tiny
        for big, tiny in zip(
            peaks["big"]["start_peak_rss_mib"], peaks["tiny"]["start_peak_rss_mib"], strict=True
        )
    ]
    assert len(added) == 4 and teacher_mib > 60
    assert max(added) <= 0.4 * teacher_mib, (added, teacher_mib)


# ------------------------------------------------------------------ resharding a DCP checkpoint
def _save_under_tp2(rank: int, world_size: int, path: str) -> None:
    """A checkpoint as a TP=2 ModelParallelStrategy run writes it: each rank its shards."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = parallelize(tiny(), 1, world_size)
    dcp.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
             checkpoint_id=path)  # fmt: skip
    if rank == 0:
        torch.save({"global_step": 0}, Path(path) / "meta.pt")


def _load_resharded(rank: int, world_size: int, path: str, dp: int, vocab: int) -> None:
    """Sharded loading of that checkpoint under another layout equals the weights saved."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    reference = tiny()
    reference.restrict_vocab(vocab)
    model, source = build_on_meta(tiny, "teacher", path, "model.")
    model.restrict_vocab(vocab)
    parallelize(model, dp, world_size // dp)
    materialize(model, torch.device("cpu"), source)
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        torch.testing.assert_close(full, reference.state_dict()[name], rtol=0, atol=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_tp2_written_checkpoint_loads_sharded_under_other_layouts(tmp_path):
    path = str(tmp_path / "tp2.ckpt")
    run_workers(_save_under_tp2, 2, path)
    run_workers(_load_resharded, 4, path, 2, 40)  # DP=2 x TP=2
    run_workers(_load_resharded, 2, path, 2, 37)  # FSDP2 over DP=2, a restricted vocabulary
