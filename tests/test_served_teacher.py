"""The served teacher (a vLLM server's top-k prompt log-probabilities through TopKKDLoss).

Without a server: argument checks, the loader's look-ahead the prefetch relies on, and a dead
server's one-line error after its retries. Against a real server (marked ``vllm``; skipped
without ``LIGHTNING_KD_VLLM_PYTHON``, ``make test-vllm`` sets it; one server per session, 1-2
minutes to start on 2 CPU cores): served log-probabilities equal the in-process teacher's,
4 training steps equal 4 steps from the in-process top-k of the same k, and a server killed
mid-run stops the run with a clear error and a complete checkpoint that a resumed run (with a
server it launches itself) continues exactly.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset

from lightning_kd import DistillationModule, KDLoss, TinyLlama
from lightning_kd.data.sampler import ResumableDataLoader, ResumableSampler
from lightning_kd.export import export_student
from lightning_kd.rollout.vllm_logprobs import PromptLogprobsClient, ServedTeacherError
from lightning_kd.rollout.vllm_server import VLLMServer
from lightning_kd.teacher_cache import CachedTeacher, topk_logprobs
from lightning_kd.training.teachers import LiveTeacher, ServedTeacher
from lightning_kd.training.teachers.served import served_vocab_size

PYTHON = os.environ.get("LIGHTNING_KD_VLLM_PYTHON")
V, SEQ, K = 128, 16, 8


class _Tokens(Dataset):
    """Random sequences with an ``index`` (first two labels ignored)."""

    def __init__(self, count: int = 24, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (count, SEQ + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i, 1:].clone()
        labels[:2] = -100
        return {"input_ids": self.ids[i, :-1], "labels": labels, "index": torch.tensor(i)}


def _loader(dataset: Dataset, batch_size: int = 4) -> ResumableDataLoader:
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler)


# ------------------------------------------------------------------------------ no server
def test_upcoming_indices_predict_the_next_batch_without_moving_the_loader():
    loader = _loader(_Tokens(10), batch_size=3)
    assert loader.upcoming_indices() is None  # no pass yet
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        seen = []
        batch = next(it)
        while True:
            upcoming = loader.upcoming_indices()
            seen.append(batch["index"].tolist())
            try:
                batch = next(it)
            except StopIteration:
                assert upcoming is None
                break
            assert upcoming == batch["index"].tolist()
        assert sorted(i for batch_indices in seen for i in batch_indices) == list(range(10))


def test_bad_arguments_are_refused():
    for kwargs, match in (
        ({}, "exactly one of url"),
        ({"url": "http://x", "model_dir": "/m"}, "exactly one of url"),
        ({"url": "http://x", "top_k": 0}, "top_k must be"),
        ({"url": "http://x", "request_size": 1.5}, "request_size must be"),
        ({"url": "http://x", "retries": -1}, "retries and backoff"),
    ):
        with pytest.raises(ValueError, match=match):
            ServedTeacher(**kwargs)
    with pytest.raises(ValueError, match="temperature 1 only"):
        ServedTeacher(url="http://x").setup(KDLoss(temperature=2.0))
    assert served_vocab_size("/nowhere") is None


def test_a_dead_server_gives_one_line_after_its_retries():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServedTeacherError) as info:
        PromptLogprobsClient(f"http://127.0.0.1:{port}", 4, retries=2, backoff=0.0)
    message = str(info.value)
    assert "\n" not in message and "did not answer GET /v1/models after 3 tries" in message
    assert "Connection" in message or "refused" in message


# ------------------------------------------------------------------------------ real server
def _teacher() -> TinyLlama:
    torch.manual_seed(0)
    # head size 64: vLLM's CPU attention has kernels for some head sizes only (not 16)
    return TinyLlama(vocab_size=V, dim=128, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=256,
                     max_seq_len=64, init_std=0.2).eval()  # fmt: skip


def _student() -> TinyLlama:
    torch.manual_seed(1)
    return TinyLlama(vocab_size=V, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=64,
                     max_seq_len=64)  # fmt: skip


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One server for the session: ``(server, teacher model dir)``."""
    tmp = tmp_path_factory.mktemp("served")
    teacher = _teacher()
    directory = export_student(teacher, teacher.state_dict(), tmp / "teacher")
    with VLLMServer(str(directory), python=PYTHON, max_model_len=64,
                    extra_args=("--skip-tokenizer-init",)) as server:  # fmt: skip
        yield server, str(directory)


class _InProcessTopK(LiveTeacher):
    """The in-process teacher's exact top-k (what a top-k cache holds before compression),
    through the same TopKKDLoss as the served teacher."""

    def setup(self, loss):
        super().setup(loss)
        self._served = ServedTeacher(url="http://unused", top_k=K)
        self._served.setup(loss)

    def run_teacher(self, module, batch):
        logits = super().run_teacher(module, batch).float()
        ids, logprobs = topk_logprobs(logits.reshape(-1, V), K, 1.0)
        return CachedTeacher(ids.view(*logits.shape[:2], K), logprobs.view(*logits.shape[:2], K))

    def loss(self, student_output, teacher_output, batch):
        return self._served.loss(student_output, teacher_output, batch)


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, *args) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/kd_loss"])


def _fit(backend, steps: int, root: Path, callbacks=(), ckpt_path=None) -> _Losses:
    from lightning_kd.callbacks import CheckpointOnStop

    L.seed_everything(0, verbose=False)
    module = DistillationModule(_student(), teacher_backend=backend,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))  # fmt: skip
    record = _Losses()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        default_root_dir=str(root), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[record, CheckpointOnStop(), *callbacks])  # fmt: skip
    trainer.fit(module, _loader(_Tokens()), ckpt_path=ckpt_path)
    return record


def _in_process_topk(teacher: TinyLlama, rows: torch.Tensor):
    with torch.no_grad():
        logits = teacher(rows).double()
    values, ids = torch.log_softmax(logits, -1).topk(K)
    return ids, values


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not PYTHON, reason="set LIGHTNING_KD_VLLM_PYTHON (make test-vllm)")
def test_served_topk_equals_the_in_process_teachers(served):
    server, directory = served
    rows = _Tokens(6, seed=5).ids[:, :SEQ]
    ids, logprobs = PromptLogprobsClient(server.url, K).topk(rows.tolist())
    ref_ids, ref_values = _in_process_topk(_teacher(), rows)
    # The same tokens, except where two neighbours at the k-th place nearly tie.
    same = (ids == ref_ids).all(-1)
    assert same.float().mean() > 0.95, same.float().mean()
    err = (logprobs.double() - ref_values)[same].abs().max().item()
    assert err < 1e-4, err
    print(f"served vs in-process top-{K} log-probabilities: max |diff| {err:.2e}")
    assert served_vocab_size(directory) == V


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not PYTHON, reason="set LIGHTNING_KD_VLLM_PYTHON (make test-vllm)")
def test_four_steps_from_the_served_teacher_equal_the_in_process_topk(served, tmp_path):
    from lightning_kd.training.teacher import TeacherSource

    server, _ = served
    backend = ServedTeacher(url=server.url, top_k=K, request_size=2, concurrency=2)
    from_server = _fit(backend, 4, tmp_path / "served").losses
    backend.close()
    in_process = _fit(_InProcessTopK(TeacherSource(_teacher(), None, "")), 4,
                      tmp_path / "local").losses  # fmt: skip
    assert len(from_server) == 4 and from_server.keys() == in_process.keys()
    for step, value in in_process.items():
        assert from_server[step] == pytest.approx(value, abs=1e-4), step
    # A student of another vocabulary is refused before training.
    with pytest.raises(ValueError, match="vocabulary of 128 tokens, the student 64"):
        ServedTeacher(url=server.url, top_k=K).connect(student_vocab=64)


class _KillAfterFirstStep(L.Callback):
    def __init__(self, server: VLLMServer) -> None:
        self.server = server

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 1 and self.server.process is not None:
            os.killpg(self.server.process.pid, signal.SIGKILL)
            self.server.process.wait()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not PYTHON, reason="set LIGHTNING_KD_VLLM_PYTHON (make test-vllm)")
def test_a_killed_server_stops_the_run_with_a_checkpoint_and_the_resume_continues(served, tmp_path):
    reference_server, directory = served
    straight = _fit(ServedTeacher(url=reference_server.url, top_k=K), 5, tmp_path / "a").losses
    doomed = VLLMServer(directory, python=PYTHON, max_model_len=64,
                        extra_args=("--skip-tokenizer-init",)).start()  # fmt: skip
    try:
        backend = ServedTeacher(url=doomed.url, top_k=K, retries=2, backoff=0.2, timeout=60)
        with pytest.raises(ServedTeacherError) as info:
            _fit(backend, 5, tmp_path / "b", callbacks=[_KillAfterFirstStep(doomed)])
    finally:
        doomed.stop()
    message = str(info.value)
    assert "\n" not in message and "did not answer" in message and "saved" in message
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    stopped_at = saved["global_step"]
    assert stopped_at in (1, 2), stopped_at
    assert "optimizer_states" in saved and saved["loops"]
    # Resume with a server launched by the backend itself: the remaining steps are the
    # uninterrupted run's.
    relaunched = ServedTeacher(model_dir=directory, top_k=K, python=PYTHON, max_model_len=64,
                               server_args=["--skip-tokenizer-init"])  # fmt: skip
    try:
        resumed = _fit(relaunched, 5, tmp_path / "b", ckpt_path=str(last)).losses
    finally:
        relaunched.close()
    assert sorted(resumed) == list(range(stopped_at + 1, 6))
    for step, value in resumed.items():
        assert value == pytest.approx(straight[step], abs=1e-5), step


class _TokensData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size, self.seq_len = 4, SEQ
        self.train_dataset = _Tokens(10, seed=7)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not PYTHON, reason="set LIGHTNING_KD_VLLM_PYTHON (make test-vllm)")
def test_cache_teacher_from_the_served_teacher(served, tmp_path):
    """The cache holds the served top-k: the in-process teacher's ids, its log-probabilities
    within the codec's rounding, and the tail its top-k implies."""
    from lightning_kd.teacher_cache import TeacherCache, write_teacher_cache

    server, _ = served
    backend = ServedTeacher(url=server.url, top_k=K)
    module = DistillationModule(_student(), teacher_backend=backend)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    data = _TokensData()
    with pytest.raises(ValueError, match="top-8 only"):
        write_teacher_cache(module, data, trainer, tmp_path / "bad", K + 1, splits=["train"])
    meta = write_teacher_cache(module, data, trainer, tmp_path / "cache", K, splits=["train"])
    backend.close()
    assert meta.complete and meta.vocab_size == V and "vLLM-served" in meta.teacher
    dataset = data.train_dataset
    index = torch.arange(len(dataset))
    labels = torch.stack([dataset[i]["labels"] for i in range(len(dataset))])
    out = TeacherCache(tmp_path / "cache").read("train", index, labels != -100)
    ref_ids, ref_values = _in_process_topk(_teacher(), dataset.ids[:, :SEQ])
    valid = labels != -100
    order = ref_ids.argsort(-1)
    same = (out.ids == ref_ids.gather(-1, order)).all(-1) & valid
    assert same.sum() > 0.95 * valid.sum()
    expected = ref_values.gather(-1, order)
    step = (ref_values[..., 0] - ref_values[..., -1]) / 255
    assert ((out.logprobs.double() - expected).abs() <= step[..., None] + 1e-4)[same].all()
    implied = (1 - expected.exp().sum(-1)).log()
    torch.testing.assert_close(out.tail_logprob.double()[same], implied[same], rtol=0, atol=1e-4)
