"""The parallelize pipeline (:mod:`lightning_kd.parallel.pipeline`) and the model contract's
``init_non_persistent_buffers``: the order TP → head owner → activation checkpointing → FSDP2
→ materialise on a 2-rank gloo mesh (against a single-process reference), buffers recomputed
through the contract for any model, and models that import nothing above them."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd import TinyLlama
from lightning_kd.parallel.block_wrappers import CheckpointedForward
from lightning_kd.parallel.meta_init import WeightSource, materialize, recompute_buffers
from lightning_kd.parallel.pipeline import parallelize_model
from tests.helpers.distributed import run_workers

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 48


def tiny() -> TinyLlama:
    return TinyLlama(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)


def _loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Cross-entropy of next tokens on full logits, and every gradient as a full tensor."""
    from torch.distributed.tensor import DTensor

    logits = model(ids)
    if isinstance(logits, DTensor):
        logits = logits.full_tensor()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return loss.item(), grads


# ------------------------------------------------------------------ the order, on two ranks
def _order_worker(rank: int, world_size: int, weights_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    from lightning_kd.parallel import pipeline
    from lightning_kd.parallel.mesh import DP_DIM, TP_DIM

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=(DP_DIM, TP_DIM))
    torch.manual_seed(0)
    reference = tiny()
    model = copy.deepcopy(reference)
    seen: dict[str, bool] = {}

    def head_owner(m: nn.Module) -> nn.Module:
        seen["head is tensor-parallel"] = isinstance(m.lm_head.weight, DTensor)
        seen["blocks checkpointed"] = isinstance(m.layers[0].forward, CheckpointedForward)
        seen["sharded by FSDP2"] = isinstance(m, FSDPModule)
        return m.lm_head

    parallelize_model(model, tp_mesh=mesh[TP_DIM], dp_mesh=mesh[DP_DIM], head_owner=head_owner,
                      activation_checkpointing=True, fsdp=True)  # fmt: skip
    # The head owner is asked after TP, before the block options and FSDP2.
    assert seen == {
        "head is tensor-parallel": True,
        "blocks checkpointed": False,
        "sharded by FSDP2": False,
    }
    # Checkpointed blocks inside FSDP2 units; the head owner is a unit of its own.
    for block in model.layers:
        assert isinstance(block, FSDPModule) and isinstance(block.forward, CheckpointedForward)
    assert isinstance(model.lm_head, FSDPModule) and isinstance(model, FSDPModule)
    # TP before FSDP2: FSDP2 sharded the TP DTensors, so they span both mesh dimensions with
    # TP's placement on the tensor-parallel one.
    for name, tp_placement in (("attn.wq", Shard(0)), ("attn.wo", Shard(1))):
        weight = model.layers[0].get_submodule(name).weight
        assert weight.device_mesh.mesh_dim_names == (DP_DIM, TP_DIM), name
        assert weight.placements[1] == tp_placement, (name, weight.placements)
    # Same loss and gradients as one process.
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = _loss_and_grads(reference, ids)
    loss, grads = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Materialisation comes last: a meta-built model is allocated after FSDP2 has sharded it.
    calls: list[bool] = []
    real = pipeline.materialize

    def recording(m: nn.Module, device: torch.device, source: WeightSource) -> None:
        calls.append(isinstance(m, FSDPModule) and isinstance(m.layers[0], FSDPModule))
        real(m, device, source)

    pipeline.materialize = recording
    with torch.device("meta"):
        meta = tiny()
    parallelize_model(meta, tp_mesh=mesh[TP_DIM], dp_mesh=mesh[DP_DIM], fsdp=True,
                      weights=WeightSource("torch", weights_path))  # fmt: skip
    pipeline.materialize = real
    assert calls == [True]
    for name, value in meta.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        torch.testing.assert_close(full, reference.state_dict()[name], rtol=0, atol=0)
    for name in ("rope_cos", "rope_sin"):  # non-persistent: recomputed, not loaded
        torch.testing.assert_close(getattr(meta, name), getattr(reference, name), rtol=0, atol=0)


@pytest.mark.distributed
def test_pipeline_order_tp_head_owner_checkpointing_fsdp2_materialise_on_two_ranks(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "weights.pt"
    torch.save(tiny().state_dict(), path)
    run_workers(_order_worker, 2, str(path))


# ------------------------------------------------------------------ one process
def test_without_a_mesh_only_the_block_options_apply_and_the_head_owner_is_asked():
    model = tiny()
    asked = []
    out = parallelize_model(model, activation_checkpointing=True, head_owner=asked.append)
    assert out is model and asked == [model]
    assert all(isinstance(block.forward, CheckpointedForward) for block in model.layers)
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def test_inconsistent_options_are_refused():
    with pytest.raises(ValueError, match="dp_mesh"):
        parallelize_model(tiny(), fsdp=True)
    with pytest.raises(ValueError, match="fsdp=True"):
        parallelize_model(tiny(), offload=True)


# ------------------------------------------------------------------ non-persistent buffers
class Scaled(nn.Module):
    """Not a TinyLlama: a linear map scaled by a non-persistent table it can recompute."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(1.0, 5.0), persistent=False)
        self.calls = 0

    def init_non_persistent_buffers(self) -> None:
        self.calls += 1
        with torch.no_grad():
            self.table.copy_(torch.arange(1.0, 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.table


class Opaque(nn.Module):
    """A non-persistent buffer and no way to recompute it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("table", torch.ones(4), persistent=False)


@pytest.mark.parametrize("nested", [False, True], ids=["model", "inside a wrapper"])
def test_materialize_recomputes_buffers_through_the_contract(tmp_path, nested):
    torch.manual_seed(0)
    reference = nn.Sequential(Scaled()) if nested else Scaled()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    with torch.device("meta"):
        model = nn.Sequential(Scaled()) if nested else Scaled()
    materialize(model, torch.device("cpu"), WeightSource("torch", str(tmp_path / "w.pt")))
    scaled = model[0] if nested else model
    assert scaled.calls == 1
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_a_model_whose_buffers_nothing_recomputes_is_refused_before_allocation(tmp_path):
    torch.save(Opaque().state_dict(), tmp_path / "w.pt")
    with torch.device("meta"):
        model = Opaque()
    with pytest.raises(ValueError, match=r"init_non_persistent_buffers\(\) on Opaque"):
        materialize(model, torch.device("cpu"), WeightSource("torch", str(tmp_path / "w.pt")))
    assert model.proj.weight.is_meta  # nothing allocated or read
    with pytest.raises(ValueError, match="'table'"):
        recompute_buffers(nn.Sequential(Opaque()))


def test_tiny_llama_recomputes_its_rope_tables():
    model, fresh = tiny(), tiny()
    model.rope_cos.fill_(float("nan"))
    model.rope_sin.fill_(float("nan"))
    model.init_non_persistent_buffers()
    torch.testing.assert_close(model.rope_cos, fresh.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, fresh.rope_sin, rtol=0, atol=0)


def test_hf_causal_lm_recomputes_its_rotary_buffers():
    pytest.importorskip("transformers")
    from lightning_kd.models.contract import non_persistent_buffers
    from lightning_kd.models.hf import HFCausalLM

    config = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model, fresh = HFCausalLM(config=config), HFCausalLM(config=config)
    fresh_buffers = dict(fresh.named_buffers())
    names = [
        f"{prefix}.{b}" if prefix else b
        for prefix, m in model.named_modules()
        for b in non_persistent_buffers(m)
    ]
    assert any(name.endswith("inv_freq") for name in names), names
    for name in names:
        model.get_buffer(name).fill_(float("nan"))
    model.init_non_persistent_buffers()
    for name in names:
        torch.testing.assert_close(model.get_buffer(name), fresh_buffers[name], rtol=0, atol=0)


# ------------------------------------------------------------------ imports point down
def test_models_import_nothing_from_the_layers_above_them():
    """``lightning_kd.models`` depends on torch and the leaf layer only (``io``, ``checks``,
    ``compat``): parallel/ and training/ import it."""
    offenders = []
    for path in sorted((ROOT / "lightning_kd" / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            for name in names:
                leaf = name.startswith(
                    ("lightning_kd.io", "lightning_kd.checks", "lightning_kd.compat")
                )
                if (
                    name.startswith("lightning_kd")
                    and not name.startswith("lightning_kd.models")
                    and not leaf
                ):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders
