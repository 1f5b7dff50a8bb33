"""Where PPO / GRPO rewards come from: a built-in function or a reward-model checkpoint.

Built-in functions (``RewardSource.reward_function``):

    token_count:<token>   how many completion tokens equal <token> (a token id, or a string
                          that the policy's tokenizer encodes to exactly one token)
    length                number of completion tokens (end-of-sequence excluded)
    contains:<text>       1.0 when the decoded completion contains <text>, else 0.0

A reward checkpoint (base or adapter + ``value_head.safetensors``, see heads.py) scores the
(prompt, completion) pair rendered exactly as the reward model saw its preference rows. The
Score RPC uses the same scorer through services.rlhf.scoring, which keeps it loaded between
calls; ``score_pairs`` loads it for one call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from services.rlhf.trainers import heads
from services.runtime.errors import InvalidArgument
from services.schema.rollouts import reward_function_problem as function_problem

# (prompts as in the dataset rows, completion token ids without EOS, their decoded text)
RewardFn = Callable[[Sequence[Any], Sequence[list[int]], Sequence[str]], list[float]]


def _single_token(tokenizer: Any, token: str, field: str) -> int:
    if token.strip().isdigit():
        tid = int(token)
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and tid >= vocab:
            raise InvalidArgument.one(field, f"token id {tid} is outside the vocabulary ({vocab})")
        return tid
    ids = list(tokenizer.encode(token, add_special_tokens=False))
    if len(ids) != 1:
        raise InvalidArgument.one(
            field,
            f"{token!r} is {len(ids)} tokens for this tokenizer ({ids}); give one token "
            "or its id, e.g. token_count:42",
        )
    return ids[0]


def parse_reward_function(spec: str, tokenizer: Any, field: str) -> RewardFn:
    """Build a reward function from its name; unknown names are InvalidArgument."""
    problem = function_problem(spec)
    if problem:
        raise InvalidArgument.one(field, problem)
    name, _, arg = spec.partition(":")
    if name == "token_count":
        tid = _single_token(tokenizer, arg, field)
        return lambda _p, ids, _t: [float(sum(1 for t in c if t == tid)) for c in ids]
    if name == "length":
        return lambda _p, ids, _t: [float(len(c)) for c in ids]
    return lambda _p, _ids, texts: [1.0 if arg in t else 0.0 for t in texts]


# -- reward-model checkpoints ------------------------------------------------------------------


def checkpoint_base(path: Path, field: str = "reward_model.model") -> tuple[str, str | None]:
    """(model path, adapter path or None) for a full or an adapter checkpoint directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        return str(path), None
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise InvalidArgument.one(field, f"{path} is not a model checkpoint")
    cfg = json.loads(cfg_file.read_text())
    manifest = path / "manifest.json"
    extra = json.loads(manifest.read_text()) if manifest.is_file() else {}
    base = cfg.get("base_model") or cfg.get("model") or extra.get("base_model")
    if not base:
        raise InvalidArgument.one(field, f"{cfg_file} does not name its base model")
    return str(base), str(path)


def load_reward_model(
    path: str | Path, dtype: str = "float32", field: str = "reward_model.model"
) -> tuple[Any, Any]:
    """A reward checkpoint as (LM with its head attached, tokenizer), frozen, in eval mode."""
    from services.runtime.models import load_model

    path = Path(path)
    if heads.head_metadata(path) is None:
        raise InvalidArgument.one(
            field, f"{path} has no value head ({heads.HEAD_FILE}): not a reward checkpoint"
        )
    base, adapter = checkpoint_base(path, field)
    lm, tokenizer = load_model(base, adapter_path=adapter, dtype=dtype, field=field)
    heads.load_head(lm, path)
    lm.freeze()
    lm.eval()
    return lm, tokenizer


def render(tokenizer: Any, prompt: Any, completion: str, max_seq_length: int) -> list[int]:
    """Tokens of (prompt, completion) exactly as preference rows are rendered for training."""
    from services.runtime.datasets import tokenize_rows

    row = {"prompt": prompt, "completion": completion}
    (item,) = tokenize_rows(
        [row], "completion", tokenizer, max_seq_length=max_seq_length, mask_prompt=True
    )
    return list(item.tokens)


def score_tokens(model: Any, seqs: list[list[int]], pad_id: int, batch_size: int = 8):
    """Rewards of token sequences (right-padded in batches), read at each last token."""
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s in chunk)
        arr = np.full((len(chunk), width), pad_id, np.int32)
        for r, s in enumerate(chunk):
            arr[r, : len(s)] = s
        lengths = mx.array([len(s) for s in chunk])
        r = heads.rewards(model, mx.array(arr), lengths).astype(mx.float32)
        out.extend(r.tolist())
    return out


@dataclass
class RewardModelScorer:
    """Scores (prompt, completion) text pairs with a loaded reward model."""

    model: Any  # an LM with its head attached
    tokenizer: Any
    max_seq_length: int = 2048
    batch_size: int = 8

    @classmethod
    def load(cls, path: str | Path, **kw: Any) -> RewardModelScorer:
        model, tokenizer = load_reward_model(path, dtype=kw.pop("dtype", "float32"))
        return cls(model, tokenizer, **kw)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        seqs = [
            render(self.tokenizer, p, c, self.max_seq_length)
            for p, c in zip(prompts, completions, strict=True)
        ]
        return score_tokens(self.model, seqs, self.pad_id, self.batch_size)

    def as_reward_fn(self) -> RewardFn:
        return lambda prompts, _ids, texts: self.score(prompts, texts)


def score_pairs(
    path: str | Path, items: Sequence[tuple[Any, str]], *, batch_size: int = 8
) -> list[float]:
    """The Score RPC: one reward per (prompt, completion), from a reward checkpoint."""
    scorer = RewardModelScorer.load(path, batch_size=batch_size)
    return scorer.score([p for p, _ in items], [c for _, c in items])
