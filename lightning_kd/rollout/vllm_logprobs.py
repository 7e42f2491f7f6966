"""A teacher's top-k log-probabilities at every position, from a vLLM OpenAI-compatible server.

One ``POST /v1/completions`` scores a list of sequences: the token ids as ``prompt``,
``"prompt_logprobs": k``, ``"max_tokens": 1``. vLLM returns, for every prompt position but the
first (null), a dict keyed by token id with the top k entries plus the actual prompt token when
it is outside them (its ``rank`` > k). Position ``t`` of the answer is the distribution of token
``t`` given the tokens before it, so the distribution after the last input token comes from one
extra token appended to each prompt (its identity does not matter).

Failures: connection errors, timeouts and 5xx answers are retried with exponential backoff; after
the last try, and at once for a 4xx answer (a bad request: the server's message says why),
:class:`ServedTeacherError` is raised with one line naming the server, the tries and the
server's own message. Token ids outside the served model's vocabulary crash vLLM's CPU engine
(a 500, then the server is gone), so the caller must check ids before sending.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from typing import Any

import torch
from torch import Tensor


class ServedTeacherError(RuntimeError):
    """A served teacher did not answer (after its retries), or answered with an error."""


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class PromptLogprobsClient:
    """Top-k prompt log-probabilities of token-id sequences from one vLLM server.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        top_k: k, entries per position (``prompt_logprobs``).
        model: the served model's name (default: the first of ``GET /v1/models``).
        timeout: seconds per request.
        retries: tries after the first for connection errors, timeouts and 5xx answers.
        backoff: seconds before the first retry, doubled at every further one.

    Raises:
        ServedTeacherError: when ``GET /v1/models`` fails after the retries.
    """

    def __init__(
        self,
        url: str,
        top_k: int,
        model: str | None = None,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 1.0,
    ) -> None:
        self.url, self.top_k = url.rstrip("/"), int(top_k)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.info: dict[str, Any] = {}
        if model is None:
            self.info = self.request("GET", "/v1/models")["data"][0]
            model = str(self.info["id"])
        self.model = model

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """One JSON request with retries (see the module docstring).

        Raises:
            ServedTeacherError: in one line, after the last try or on a 4xx answer.
        """
        data = None if body is None else json.dumps(body).encode()
        where = f"{method} {self.url}{path}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            headers = {"Content-Type": "application/json"}
            request = urllib.request.Request(
                f"{self.url}{path}", data=data, method=method, headers=headers
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode() or "null")
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    detail = json.loads(detail)["error"]["message"]
                last = f"HTTP {error.code}: {_one_line(detail)}"
                if error.code < 500:
                    message = f"the served teacher refused {where}: {last}"
                    raise ServedTeacherError(message) from None
            except (urllib.error.URLError, OSError, TimeoutError) as error:
                reason = getattr(error, "reason", error)
                last = _one_line(f"{type(reason).__name__}: {reason}")
        waited = sum(self.backoff * 2**i for i in range(self.retries))
        raise ServedTeacherError(
            f"the served teacher at {self.url} did not answer {method} {path} after "
            f"{self.retries + 1} tries over {waited:.0f} s of backoff (last: {last})"
        )

    def topk(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """The top-k of the distribution after each prefix of each row.

        Args:
            rows: B sequences of token ids (equal lengths S).

        Returns:
            ``(ids [B, S, k] int64, logprobs [B, S, k] float32)``: position ``t`` is the
            teacher's distribution of the token after ``rows[b][: t + 1]``, by decreasing
            probability.

        Raises:
            ServedTeacherError: when the server fails, or answers with fewer than k entries.
        """
        k = self.top_k
        body = {
            "model": self.model, "prompt": [[*map(int, r), 0] for r in rows],
            "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k,
            "return_tokens_as_token_ids": True,
        }  # fmt: skip
        choices = sorted(self.request("POST", "/v1/completions", body)["choices"],
                         key=lambda c: c["index"])  # fmt: skip
        seq = len(rows[0]) if rows else 0
        ids = torch.zeros(len(rows), seq, k, dtype=torch.int64)
        logprobs = torch.zeros(len(rows), seq, k, dtype=torch.float32)
        for b, choice in enumerate(choices):
            positions = choice.get("prompt_logprobs") or []
            if len(positions) != seq + 1:
                raise ServedTeacherError(
                    f"the served teacher at {self.url} returned {len(positions)} prompt "
                    f"positions for a prompt of {seq + 1} tokens"
                )
            for t, entries in enumerate(positions[1:]):
                top = sorted(
                    ((v["rank"], int(key.removeprefix("token_id:")), v["logprob"])
                     for key, v in entries.items() if v["rank"] <= k),
                )  # fmt: skip
                if len(top) < k:
                    raise ServedTeacherError(
                        f"the served teacher at {self.url} returned {len(top)} of the top-{k} "
                        f"entries at position {t} (is prompt_logprobs capped by the server's "
                        "--max-logprobs?)"
                    )
                top = top[:k]  # ties at the k-th rank: any k of them
                ids[b, t] = torch.tensor([i for _, i, _ in top])
                logprobs[b, t] = torch.tensor([lp for _, _, lp in top])
        return ids, logprobs


__all__ = ["PromptLogprobsClient", "ServedTeacherError"]
