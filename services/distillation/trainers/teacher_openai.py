"""A remote teacher behind an OpenAI-compatible completions API (vLLM, mlx_lm.server).

Two ways to get a teacher's top-k at every position of a sequence, picked on first use:

* ``echo`` (vLLM): one request per sequence, the token ids as the prompt, ``echo: true``,
  ``logprobs: k``, ``max_tokens: 1`` and ``return_tokens_as_token_ids``: the server returns
  the top-k of every prompt position (position j's entry is the distribution of token j
  given tokens < j).
* ``prefix`` (servers without prompt log-probs, e.g. mlx_lm.server, which takes only text
  prompts and returns ``top_logprobs`` (at most 10 here) for generated tokens only): one
  request per position, the prefix as text, ``max_tokens: 1``, ``top_logprobs: k``. The
  prefix is the student's tokens decoded with the student's (= the teacher's) tokenizer and
  must re-encode to the same ids, or the job fails with the reason. n positions cost n
  requests; the server's prompt cache makes each a one-token prefill. docs/remote.md gives
  the measured cost.

The API returns the top-k only: the mass outside it is ``1 - sum(top-k)``, and ids past the
shared vocabulary are folded into it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from services.runtime import remote
from services.schema.common import RemoteSettings

PROBE = "The quick brown fox jumps over the lazy dog. 0123456789"
PREFIX_MAX_TOP_K = 10  # mlx_lm.server accepts top_logprobs <= 11; OpenAI's own limit is 20
ECHO_MAX_TOP_K = 20  # vLLM's default max_logprobs
MEMO_PREFIXES = 200_000  # remembered prefixes (~1 KB each at k = 10)


class OpenAIBackend:
    kind = "openai"
    hidden_states = False

    def __init__(self, settings: RemoteSettings, model: str, index: int, tokenizer: Any) -> None:
        self.settings, self.index, self.tokenizer = settings, index, tokenizer
        self.model = settings.model or model
        self.what = f"teachers[{index}] {settings.address}"
        self.mode: str | None = None  # "echo" | "prefix", found on first use
        self.requests = 0
        # prefix -> its top-k (prefix mode): a prefix shared by rows (a system prompt) or
        # seen in an earlier batch is not asked again; and the prompts the server has cached.
        self.memo: OrderedDict[tuple[int, ...], dict[int, float]] = OrderedDict()
        self.cached: OrderedDict[tuple[int, ...], None] = OrderedDict()

    @property
    def max_top_k(self) -> int:
        return ECHO_MAX_TOP_K if self._mode() == "echo" else PREFIX_MAX_TOP_K

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.model:
            body = {"model": self.model, **body}
        self.requests += 1
        return remote.with_retry(
            lambda: remote.post_json(self.settings, "completions", body), self.settings, self.what
        )

    def _mode(self) -> str:
        if self.mode is None:
            ids = list(self.tokenizer.encode(PROBE))
            try:
                r = self._post(
                    {
                        "prompt": ids,
                        "echo": True,
                        "logprobs": 1,
                        "max_tokens": 1,
                        "return_tokens_as_token_ids": True,
                    }
                )
                lp = (r.get("choices") or [{}])[0].get("logprobs") or {}
                echoed = lp.get("top_logprobs") or []
                self.mode = "echo" if len(echoed) >= len(ids) else "prefix"
            except remote.RemoteRejected:  # e.g. mlx_lm.server: logprobs must be a bool
                self.mode = "prefix"
        return self.mode

    def vocab_size(self) -> int:
        return 1 << 30  # not served: the student's width bounds the shared vocabulary

    def same_tokenizer(self, student_sig: dict) -> bool:
        """The server must give the probe text the student's ids: echoed ids (echo), or
        the prompt's token count plus the id -> token string of generated tokens (prefix)."""
        ids = list(self.tokenizer.encode(PROBE))
        if self._mode() == "echo":
            r = self._post(
                {
                    "prompt": PROBE,
                    "echo": True,
                    "logprobs": 1,
                    "max_tokens": 1,
                    "return_tokens_as_token_ids": True,
                }
            )
            toks = (r["choices"][0].get("logprobs") or {}).get("tokens") or []
            return [_token_id(t) for t in toks[: len(ids)]] == ids
        r = self._post(
            {
                "prompt": PROBE,
                "max_tokens": 8,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": 1,
            }
        )
        if int((r.get("usage") or {}).get("prompt_tokens", -1)) != len(ids):
            return False
        content = (r["choices"][0].get("logprobs") or {}).get("content") or []
        for entry in content:
            for t in entry.get("top_logprobs") or [entry]:
                if "id" in t and self.tokenizer.convert_ids_to_tokens(int(t["id"])) != t["token"]:
                    return False
        return True

    def topk(self, seqs: Sequence[np.ndarray], k: int, vocab: int) -> list:
        if self._mode() == "echo":
            return [self._echo(s, k, vocab) for s in seqs]
        return self._prefixes_all(seqs, k, vocab)

    def _echo(self, seq: np.ndarray, k: int, vocab: int) -> tuple:
        body = {
            "prompt": seq.tolist() + [0],  # one more: position j is scored by entry j + 1
            "echo": True,
            "logprobs": k,
            "max_tokens": 1,
            "return_tokens_as_token_ids": True,
        }
        lp = self._post(body)["choices"][0]["logprobs"]["top_logprobs"]
        rows = [{_token_id(t): v for t, v in (d or {}).items()} for d in lp[1 : len(seq) + 1]]
        return _buckets(rows, k, vocab)

    def _prefixes_all(self, seqs: Sequence[np.ndarray], k: int, vocab: int) -> list:
        """Every distinct prefix of the call once, longest first (a remembered one not at
        all). Longest first, each request finds a longer cached prompt on the server and
        prefills one token; and no request can equal a prompt the server cached earlier in
        the call (mlx_lm.server's generation thread dies on such an exact hit: it caches
        prompt + generated token and then has nothing left to prefill)."""
        wanted = {tuple(q[: j + 1].tolist()) for q in seqs for j in range(len(q))}
        for p in sorted((p for p in wanted if p not in self.memo), key=len, reverse=True):
            self.memo[p] = self._one(list(p), k)
        while len(self.memo) > MEMO_PREFIXES:
            self.memo.popitem(last=False)
        return [
            _buckets([self.memo[tuple(q[: j + 1].tolist())] for j in range(len(q))], k, vocab)
            for q in seqs
        ]

    def _one(self, prefix: list[int], k: int) -> dict[int, float]:
        body = {
            "prompt": self._text(prefix),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": k,
        }
        if tuple(prefix) in self.cached:
            # The server may hold exactly this prompt (an earlier call's prompt + its greedy
            # token): asked with a seed, mlx_lm.server serves it outside its batch loop,
            # where an exact hit fails this request only, not the server.
            try:
                self.requests += 1
                r = remote.post_json(self.settings, "completions", {"seed": 0, **body})
            except Exception as e:  # noqa: BLE001 - named in the reason
                raise remote.RemoteRejected(
                    f"{self.what}: the server failed on a prompt it had cached exactly "
                    f"({remote.describe(e)}); restart mlx_lm.server with "
                    "--prompt-cache-size 0, or use kind grpc"
                ) from e
        else:
            r = self._post(body)
        content = r["choices"][0]["logprobs"]["content"][0]
        self.cached[(*prefix, int(content["id"]))] = None
        while len(self.cached) > MEMO_PREFIXES:
            self.cached.popitem(last=False)
        return {int(t["id"]): float(t["logprob"]) for t in content["top_logprobs"]}

    def _text(self, prefix: list[int]) -> str:
        """Text that the server's tokenizer (= ours) encodes to exactly ``prefix``."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        tries = [prefix[1:]] if bos is not None and prefix and prefix[0] == bos else []
        for ids in [*tries, prefix]:
            text = tok.decode(ids, skip_special_tokens=False)
            if list(tok.encode(text)) == prefix:
                return text
        raise remote.RemoteRejected(
            f"{self.what}: the prefix {prefix[-8:]}… does not survive decode + re-encode with the "
            "student's tokenizer, and this server takes text prompts only; use a server with "
            "prompt log-probs (echo) or our GenerationService (kind grpc)"
        )

    def close(self) -> None:
        return None


def _token_id(t: str | int) -> int:
    if isinstance(t, int):
        return t
    return int(str(t).rsplit(":", 1)[-1])  # "token_id:123"


def _buckets(rows: list[dict[int, float]], k: int, vocab: int) -> tuple:
    """[n, k] ids / log-probs (the top k of each row within the vocabulary) and the log of
    the rest (1 - their mass)."""
    n = len(rows)
    idx = np.zeros((n, k), np.int32)
    top = np.full((n, k), -1e30, np.float32)
    rest = np.zeros((n,), np.float32)
    for j, row in enumerate(rows):
        best = sorted(((v, t) for t, v in row.items() if t < vocab), reverse=True)[:k]
        for c, (v, t) in enumerate(best):
            idx[j, c], top[j, c] = t, v
        mass = sum(math.exp(v) for v, _ in best)
        rest[j] = math.log(max(1.0 - mass, 1e-30))
    return idx, top, rest
