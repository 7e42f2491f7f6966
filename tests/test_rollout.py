"""In-process generation (lightning_kd.rollout) against plain references: a cache-free greedy
loop for TinyLlama, transformers' ``generate`` for a Hugging Face Llama, uncached logits."""

from __future__ import annotations

import pytest
import torch

from lightning_kd import TinyLlama
from lightning_kd.models.hf import HFCausalLM
from lightning_kd.rollout import SamplingOptions, generate, sample_tokens
from lightning_kd.rollout.decoders import decoder_for

V = 53


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float64) -> TinyLlama:
    torch.manual_seed(seed)
    model = TinyLlama(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=64, max_seq_len=64, init_std=0.2)  # fmt: skip
    return model.to(dtype).eval()


def _hf(dtype: str = "float64") -> HFCausalLM:
    torch.manual_seed(0)
    config = {"model_type": "llama", "vocab_size": V, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}  # fmt: skip
    model = HFCausalLM(config=config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.to(getattr(torch, dtype)).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 4, 7 and 6."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, :1] = False
    return ids.masked_fill(~mask, 0), mask


def _greedy_reference(model: torch.nn.Module, ids, mask, steps: int) -> torch.Tensor:
    """Cache-free greedy loop, one unpadded row at a time."""
    rows = []
    for b in range(ids.shape[0]):
        seq = ids[b][mask[b]].tolist()
        for _ in range(steps):
            logits = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        rows.append(seq[-steps:])
    return torch.tensor(rows)


def test_tiny_llama_greedy_equals_cache_free_loop():
    model = _tiny()
    ids, mask = _prompts()
    out = generate(model, ids, mask, SamplingOptions(max_new_tokens=12, temperature=0))
    assert torch.equal(out.tokens, _greedy_reference(model, ids, mask, 12))
    assert out.mask.all()


def test_hf_greedy_equals_transformers_generate():
    model = _hf()
    ids, mask = _prompts()
    out = generate(model, ids, mask, SamplingOptions(max_new_tokens=12, temperature=0))
    expected = model.model.generate(
        input_ids=ids, attention_mask=mask.long(), max_new_tokens=12, min_new_tokens=12,
        do_sample=False, pad_token_id=0, eos_token_id=None,
    )[:, ids.shape[1]:]  # fmt: skip
    assert torch.equal(out.tokens, expected)
    assert torch.equal(out.tokens, _greedy_reference(model, ids, mask, 12))


@pytest.mark.parametrize("build", [_tiny, _hf], ids=["tiny_llama", "hf"])
def test_cached_logits_equal_uncached(build):
    model = build(dtype=torch.float32) if build is _tiny else build("float32")
    ids, mask = _prompts()
    decoder = decoder_for(model, 7 + 5)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    key_mask = mask
    logits = decoder.step(ids, positions, key_mask)
    seqs = [ids[b][mask[b]].tolist() for b in range(3)]
    for _ in range(5):
        for b in range(3):
            uncached = model(torch.tensor([seqs[b]]))[0, -1].float()
            torch.testing.assert_close(logits[b], uncached, atol=1e-5, rtol=0)
        token = logits.argmax(-1)
        for b in range(3):
            seqs[b].append(int(token[b]))
        positions = positions[:, -1:] + 1
        key_mask = torch.cat([key_mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
        logits = decoder.step(token[:, None], positions, key_mask)


def test_eos_stops_a_row_and_pads_after_it():
    model = _tiny()
    ids, mask = _prompts()
    free = generate(model, ids, mask, SamplingOptions(max_new_tokens=12, temperature=0))
    eos = int(free.tokens[1, 2])  # row 1 emits it at step 2 (maybe other rows too)
    out = generate(model, ids, mask, SamplingOptions(max_new_tokens=12, temperature=0),
                   eos_token_id=eos, pad_token_id=V - 1)  # fmt: skip
    for b in range(3):
        hits = (free.tokens[b] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else free.tokens.shape[1]
        n = out.tokens.shape[1]
        assert torch.equal(out.tokens[b, :stop], free.tokens[b, :stop][:n])
        assert out.mask[b, :stop].all() and not out.mask[b, stop:].any()
        assert (out.tokens[b, stop:] == V - 1).all()
    assert not out.mask[1, 3:].any()


def test_sampling_is_seeded_and_respects_top_k_top_p_and_vocab_limit():
    model = _tiny()
    ids, mask = _prompts()
    opts = SamplingOptions(max_new_tokens=10, temperature=1.5)

    def draw(seed: int, **kw) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, ids, mask, kw.pop("options", opts), gen, **kw).tokens

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert draw(5, vocab_limit=7).max() < 7
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    top2 = sample_tokens(logits, SamplingOptions(temperature=1.0, top_k=2), gen)
    allowed = logits.topk(2, dim=-1).indices
    assert (allowed == top2[:, None]).any(-1).all()
    peaked = logits.clone()
    peaked[:, 5] = 50.0  # holds > 0.999 of the mass: top_p=0.9 keeps it alone
    assert (sample_tokens(peaked, SamplingOptions(top_p=0.9), gen) == 5).all()
    # top_p=1 and top_k=0 draw from the full softmax: some other token shows up
    assert (sample_tokens(logits, SamplingOptions(top_p=1.0), gen) != logits.argmax(-1)).any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
     ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k")],
)  # fmt: skip
def test_bad_sampling_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kwargs)


def test_bad_inputs_are_refused():
    model = _tiny()
    ids, mask = _prompts()
    right_padded = mask.flip(-1)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, right_padded, SamplingOptions(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, ids, mask, SamplingOptions(max_new_tokens=60))
    with pytest.raises(ValueError, match="TinyLlama and HFCausalLM"):
        generate(torch.nn.Linear(2, 2), ids, mask, SamplingOptions(max_new_tokens=2))


def _sharded_generation(rank: int, world: int, family: str, dp: int, tp: int) -> None:
    from tests.helpers.distributed import CollectiveRecorder, parallelize

    build = _tiny if family == "tiny" else _hf
    reference = build(dtype=torch.float32) if family == "tiny" else build("float32")
    model = parallelize(build(dtype=torch.float32) if family == "tiny" else build("float32"),
                        dp, tp)  # fmt: skip
    ids, mask = _prompts()
    calls = []
    for steps in (2, 6):
        opts = SamplingOptions(max_new_tokens=steps, temperature=0)
        with CollectiveRecorder() as recorder:
            out = generate(model, ids, mask, opts, lockstep=dp > 1)
        calls.append(len(recorder.calls))
        expected = generate(reference, ids, mask, opts)
        assert torch.equal(out.tokens, expected.tokens), (family, dp, tp, steps)
    if tp == 1:  # FSDP2 only: gathered once per rollout, whatever the number of tokens
        assert calls[0] == calls[1] > 0, calls
    # the model trains on afterwards: its forward still works, resharded
    model(ids).sum()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "dp", "tp"), [("tiny", 2, 1), ("hf", 2, 1), ("tiny", 1, 2), ("hf", 1, 2)]
)
def test_sharded_greedy_generation_equals_one_process(family, dp, tp):
    from tests.helpers.distributed import run_workers

    run_workers(_sharded_generation, 2, family, dp, tp)
