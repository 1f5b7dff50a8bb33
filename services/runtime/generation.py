"""Sampling and scoring on any checkpoint (full model, or base + adapter), no gRPC.

Used by the Generate, ScoreCompletions and SampleTokens RPCs of the training service.
SampleTokens runs services.runtime.sampler, the batched sampler PPO / GRPO use locally.

Every call is bounded: prompt tokens (``max_prompt_tokens``), new tokens (``max_tokens``),
and time: ``should_stop`` is asked between prefill chunks of ``prefill_chunk`` tokens and
between new tokens, so a caller whose deadline passed or who went away stops costing MLX
time within one chunk (the service passes the client's deadline and cancellation).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from services.runtime import sampler
from services.runtime.errors import InvalidArgument, Violations
from services.runtime.models import confine_local, load_model
from services.runtime.sampler import Stopped

MAX_TOKENS_LIMIT = 4096  # default of Limits.generate_max_tokens
MAX_STOP_CHARS = 256
# A token is rarely longer than this many characters: a prompt longer than
# max_prompt_tokens * this is refused without being tokenized at all.
CHARS_PER_TOKEN_BOUND = 64
StopCheck = Callable[[], str | None]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 0.0

    def validate(self, prefix: str = "sampling", max_tokens: int = MAX_TOKENS_LIMIT) -> None:
        v = Violations()
        v.check(0 <= self.temperature <= 10, f"{prefix}.temperature", "must be in [0, 10]")
        v.check(0 <= self.top_p <= 1, f"{prefix}.top_p", "must be in [0, 1]")
        v.check(0 <= self.top_k <= 1_000_000, f"{prefix}.top_k", "must be >= 0")
        v.check(
            1 <= self.max_tokens <= max_tokens,
            f"{prefix}.max_tokens",
            f"must be between 1 and {max_tokens} (MLXU_GENERATE_MAX_TOKENS)",
        )
        v.check(0 <= self.repetition_penalty <= 10, f"{prefix}.repetition_penalty", "0..10")
        v.check(all(self.stop), f"{prefix}.stop", "stop strings must be non-empty")
        v.check(
            all(len(s) <= MAX_STOP_CHARS for s in self.stop),
            f"{prefix}.stop",
            f"stop strings are at most {MAX_STOP_CHARS} characters",
        )
        v.check(self.seed is None or self.seed >= 0, f"{prefix}.seed", "must be >= 0")
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
    """A small LRU of loaded models; MLX work is serialised by one lock per process.
    ``roots`` (when set) confine every local model / adapter file again right before load.

    A new adapter over a cached base with an adapter of the same configuration (the next
    policy version of a rollout job) is loaded into that model in place: a weights read,
    not a model load. The entry is then keyed by the new adapter."""

    def __init__(self, size: int = 2, roots: tuple[Path, ...] | None = None) -> None:
        self.size = size
        self.roots = roots
        self._models: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._adapter_configs: dict[tuple[str, str], dict] = {}
        self.lock = threading.Lock()

    def get(self, path: str, adapter: str | None) -> tuple:
        key = (path, adapter or "")
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        config = _adapter_config(adapter) if adapter else None
        loaded = self._swap(path, adapter, config) if adapter and config else None
        if loaded is None:
            loaded = load_model(path, adapter_path=adapter or None, roots=self.roots)
        self._models[key] = loaded
        if config:
            self._adapter_configs[key] = config
        while len(self._models) > self.size:
            old, _ = self._models.popitem(last=False)
            self._adapter_configs.pop(old, None)
        return loaded

    def _swap(self, path: str, adapter: str, config: dict) -> tuple | None:
        same = [k for k in self._models if k[0] == path and self._adapter_configs.get(k) == config]
        if not same:
            return None
        confine_local(path, adapter, self.roots, "model")
        model, tokenizer = self._models.pop(same[-1])
        self._adapter_configs.pop(same[-1], None)
        dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
        weights = mx.load(str(Path(adapter) / "adapters.safetensors"))
        try:
            model.load_weights([(k, v.astype(dtypes.get(k, v.dtype))) for k, v in weights.items()],
                               strict=False)  # fmt: skip
        except ValueError as exc:
            raise InvalidArgument.one("model.adapter_path", f"cannot load adapters: {exc}") from exc
        mx.eval(model.parameters())
        return model, tokenizer


def _adapter_config(adapter: str) -> dict | None:
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None


def _check_chars(n_chars: int, max_prompt_tokens: int, field: str) -> None:
    if n_chars > max_prompt_tokens * CHARS_PER_TOKEN_BOUND:
        raise InvalidArgument.one(
            field,
            f"is {n_chars} characters: far more than the {max_prompt_tokens} prompt tokens "
            "allowed (MLXU_GENERATE_MAX_PROMPT_TOKENS)",
        )


def render_prompt(
    tokenizer,  # noqa: ANN001
    prompt: str | None,
    messages: list[dict] | None,
    max_prompt_tokens: int = 1 << 30,
) -> list[int]:
    """Prompt token ids; an empty or over-long prompt is InvalidArgument."""
    field = "chat.messages" if messages else "prompt"
    text = sum(len(m.get("content") or "") for m in messages) if messages else len(prompt or "")
    _check_chars(text, max_prompt_tokens, field)
    if messages:
        try:
            tokens = list(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            )
        except Exception as e:  # noqa: BLE001 - a template that rejects these roles / turns
            raise InvalidArgument.one(field, f"the chat template rejects them: {e}"[:300]) from None
    else:
        tokens = list(tokenizer.encode(prompt or ""))
    if not tokens:
        raise InvalidArgument.one(field, "is empty (no tokens)")
    if len(tokens) > max_prompt_tokens:
        raise InvalidArgument.one(
            field,
            f"is {len(tokens)} tokens; at most {max_prompt_tokens} "
            "(MLXU_GENERATE_MAX_PROMPT_TOKENS)",
        )
    return tokens


def _never() -> str | None:
    return None


def generate(
    cache: ModelCache,
    path: str,
    adapter: str | None,
    sampling: Sampling,
    *,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    return_logprobs: bool = False,
    should_stop: StopCheck = _never,
    max_prompt_tokens: int = 1 << 30,
    prefill_chunk: int = 512,
) -> Iterator[Chunk]:
    """Stream chunks; the last one carries finish_reason. Holds the cache lock throughout.
    Raises Stopped when ``should_stop`` answers (between prefill chunks and tokens)."""

    def progress(_done: int, _total: int) -> None:
        if reason := should_stop():
            raise Stopped(reason)

    with cache.lock:
        progress(0, 0)  # the time spent waiting for the lock counts
        model, tokenizer = cache.get(path, adapter)
        tokens = render_prompt(tokenizer, prompt, messages, max_prompt_tokens)
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
        stream = stream_generate(
            model,
            tokenizer,
            tokens,
            max_tokens=sampling.max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prefill_step_size=max(prefill_chunk, 1),
            prompt_progress_callback=progress,
        )
        for n, resp in enumerate(stream, start=1):
            progress(n, n)
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
    cache: ModelCache,
    path: str,
    adapter: str | None,
    items: list[tuple[str, str]],
    *,
    should_stop: StopCheck = _never,
    max_tokens: int = 1 << 30,
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt."""
    out: list[list[float]] = []
    with cache.lock:
        model, tokenizer = cache.get(path, adapter)
        for i, (prompt, completion) in enumerate(items):
            if reason := should_stop():
                raise Stopped(reason)
            _check_chars(len(prompt) + len(completion), max_tokens, f"items[{i}]")
            p = list(tokenizer.encode(prompt))
            c = list(tokenizer.encode(completion, add_special_tokens=False))
            if not p or not c:
                what = "prompt" if not p else "completion"
                raise InvalidArgument.one(f"items[{i}].{what}", "is empty (no tokens)")
            if len(p) + len(c) > max_tokens:
                raise InvalidArgument.one(
                    f"items[{i}]",
                    f"is {len(p) + len(c)} tokens; at most {max_tokens} "
                    "(MLXU_GENERATE_MAX_PROMPT_TOKENS)",
                )
            ids = mx.array([p + c])
            logits = model(ids[:, :-1]).astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tgt = ids[:, 1:]
            tok = mx.take_along_axis(logp, tgt[..., None], axis=-1)[0, :, 0]
            out.append(tok[len(p) - 1 :].tolist())
    return out


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


def sample_tokens(
    cache: ModelCache,
    path: str,
    adapter: str | None,
    prompts: list[list[int]],
    n: int,
    sampling: Sampling,
    seed: int | None,
    *,
    should_stop: StopCheck = _never,
) -> list[Sampled]:
    """``n`` completions per prompt (prompt-major) with the rollout sampler: the prompts
    repeated ``n`` times each, one batch, one key (``mx.random.key(seed)``)."""
    if sampling.repetition_penalty not in (0.0, 1.0):
        raise InvalidArgument.one(
            "sampling.repetition_penalty", "is not supported: it would bias the log-probs"
        )
    key = sampler.key_from_seed(seed) if seed is not None else mx.random.key(time_seed())
    with cache.lock:
        if reason := should_stop():
            raise Stopped(reason)
        model, tokenizer = cache.get(path, adapter)
        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        for i, p in enumerate(prompts):
            if vocab is not None and any(t < 0 or t >= vocab for t in p):
                raise InvalidArgument.one(
                    f"prompts[{i}].token_ids", f"has a token id outside [0, {vocab})"
                )
        rows = [p for p in prompts for _ in range(n)]
        eos = sampler.eos_ids(tokenizer)
        out = sampler.generate(
            model,
            rows,
            sampling,
            key,
            eos_ids=eos,
            pad_id=sampler.pad_id(tokenizer),
            tokenizer=tokenizer,
            should_stop=should_stop,
        )
    return [
        Sampled(c, lp, "stop" if done else "length")
        for c, lp, done in zip(out.completion_ids, out.logprobs, out.finished, strict=True)
    ]


def time_seed() -> int:
    import secrets

    return secrets.randbits(63)
