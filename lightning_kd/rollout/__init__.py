"""In-process generation: batched sampling with a KV cache from the models being trained.

- :class:`SamplingOptions` and :func:`sample_tokens` (``sampling.py``): temperature (0 is
  greedy), top-k, top-p, drawn from a given ``torch.Generator``.
- ``decoders.py``: a cached forward for :class:`~lightning_kd.TinyLlama` (its own KV cache,
  built from the model's modules so TP hooks still fire) and for
  :class:`~lightning_kd.models.hf.HFCausalLM` (transformers' ``DynamicCache``).
- :func:`generate` (``generate.py``): left-padded prompts in, completions out (padded and
  masked after EOS), under no-grad; FSDP2-sharded models are unsharded once per rollout.

- ``vllm_server.py`` / ``vllm_client.py``: a vLLM OpenAI-compatible server launched on
  127.0.0.1 (:class:`~lightning_kd.rollout.vllm_server.VLLMServer`) and a client that samples
  by token ids and reloads weights (:class:`~lightning_kd.rollout.vllm_client.VLLMGenerator`).

Used by :class:`~lightning_kd.training.on_policy.OnPolicySequences` (on-policy distillation).
"""

from lightning_kd.rollout.decoders import Decoder, decoder_for
from lightning_kd.rollout.generate import Rollout, gathered_parameters, generate
from lightning_kd.rollout.sampling import SamplingOptions, sample_tokens

__all__ = [
    "Decoder",
    "Rollout",
    "SamplingOptions",
    "decoder_for",
    "gathered_parameters",
    "generate",
    "sample_tokens",
]
