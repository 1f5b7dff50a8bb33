"""Sampling and scoring on any checkpoint (full model, or base + adapter), no gRPC.

Used by the Generate RPC of the training service; RLHF rollouts and on-policy distillation
use mlx-lm's batched generation directly inside their workers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from services.runtime.errors import Violations
from services.runtime.models import load_model

MAX_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 0.0

    def validate(self, prefix: str = "sampling") -> None:
        v = Violations()
        v.check(0 <= self.temperature <= 10, f"{prefix}.temperature", "must be in [0, 10]")
        v.check(0 <= self.top_p <= 1, f"{prefix}.top_p", "must be in [0, 1]")
        v.check(self.top_k >= 0, f"{prefix}.top_k", "must be >= 0")
        v.check(
            1 <= self.max_tokens <= MAX_TOKENS_LIMIT,
            f"{prefix}.max_tokens",
            f"must be between 1 and {MAX_TOKENS_LIMIT}",
        )
        v.check(0 <= self.repetition_penalty <= 10, f"{prefix}.repetition_penalty", "0..10")
        v.check(all(self.stop), f"{prefix}.stop", "stop strings must be non-empty")
        v.raise_if_any()


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_second: float = 0.0


class ModelCache:
    """A small LRU of loaded models; MLX work is serialised by one lock per process."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._models: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: str, adapter: str | None) -> tuple:
        key = (path, adapter or "")
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model, tokenizer = load_model(path, adapter_path=adapter or None)
        self._models[key] = (model, tokenizer)
        while len(self._models) > self.size:
            self._models.popitem(last=False)
        return model, tokenizer


def render_prompt(tokenizer, prompt: str | None, messages: list[dict] | None) -> list[int]:
    if messages:
        return list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        )
    return list(tokenizer.encode(prompt or ""))


def generate(
    cache: ModelCache,
    path: str,
    adapter: str | None,
    sampling: Sampling,
    *,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    return_logprobs: bool = False,
) -> Iterator[Chunk]:
    """Stream chunks; the last one carries finish_reason. Holds the cache lock throughout."""
    with cache.lock:
        model, tokenizer = cache.get(path, adapter)
        tokens = render_prompt(tokenizer, prompt, messages)
        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        sampler = make_sampler(sampling.temperature, sampling.top_p, top_k=sampling.top_k)
        processors = (
            make_logits_processors(repetition_penalty=sampling.repetition_penalty)
            if sampling.repetition_penalty > 0
            else None
        )
        text = ""
        sent = 0  # characters of `text` already sent (held back while a stop may be forming)
        hold = max((len(s) for s in sampling.stop), default=1) - 1
        for n, resp in enumerate(
            stream_generate(
                model,
                tokenizer,
                tokens,
                max_tokens=sampling.max_tokens,
                sampler=sampler,
                logits_processors=processors,
            ),
            start=1,
        ):
            text += resp.text
            logprobs = [float(resp.logprobs[resp.token])] if return_logprobs else []
            hit = min((i for s in sampling.stop if (i := text.find(s, sent)) >= 0), default=-1)
            if hit >= 0:
                yield Chunk(text[sent:hit], [resp.token], logprobs, "stop", resp.prompt_tokens, n)
                return
            finish = resp.finish_reason
            upto = len(text) if finish else max(sent, len(text) - hold)
            yield Chunk(
                text[sent:upto],
                [resp.token],
                logprobs,
                finish,
                resp.prompt_tokens,
                n,
                resp.generation_tps,
            )
            sent = upto
            if finish:
                return


def score(
    cache: ModelCache, path: str, adapter: str | None, items: list[tuple[str, str]]
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt."""
    out: list[list[float]] = []
    with cache.lock:
        model, tokenizer = cache.get(path, adapter)
        for prompt, completion in items:
            p = list(tokenizer.encode(prompt))
            c = list(tokenizer.encode(completion, add_special_tokens=False))
            ids = mx.array([p + c])
            logits = model(ids[:, :-1]).astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tgt = ids[:, 1:]
            tok = mx.take_along_axis(logp, tgt[..., None], axis=-1)[0, :, 0]
            out.append(tok[len(p) - 1 :].tolist())
    return out
