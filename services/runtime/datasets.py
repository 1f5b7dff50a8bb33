"""Datasets for every trainer: load, validate, tokenize, split; batches in data_batches.py.

Row formats (one per dataset, detected from row 1 unless the caller names it):

    text        {"text": str}
    chat        {"messages": [{"role", "content"}, ...], "tools"?: [...]}
    completion  {"prompt": str | messages, "completion": str | messages, "tools"?: [...]}
    preference  {"prompt", "chosen", "rejected": str | messages, "system"?: str, "margin"?: num}
    unpaired_preference  {"prompt", "completion": str | messages, "label": bool, "system"?: str}
                (TRL's unpaired preference rows, for KTO: label true = desirable)
    prompt      {"prompt": str | messages, ...anything else is kept for reward functions}

Files are JSONL, a JSON list, or {"examples": [...]}; a directory holds train.jsonl and
optionally valid.jsonl / test.jsonl (as mlx-lm). Rendering follows mlx_lm/tuner/datasets.py:
chat and completion go through the chat template, and with mask_prompt the loss starts after
the template of all but the last message (plus the generation prompt), as mlx-lm computes it.

    data = prepare({"path": "data/"}, tokenizer, allowed_formats=("chat", "completion"),
                   max_seq_length=512, mask_prompt=None, seed=0)
    for batch in data.batches("train", 8, seed=0): ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime import paths
from services.runtime.data_batches import (
    Batches,
    PreferenceBatches,
    PreferencePair,
    PromptBatches,
    PromptItem,
    Tokenized,
    UnpairedBatches,
    UnpairedItem,
    bucket_for,
    buckets,
)
from services.runtime.errors import InvalidArgument

__all__ = [
    "FORMATS",
    "Batches",
    "DataStats",
    "PreferenceBatches",
    "PreferencePair",
    "PreparedData",
    "PromptBatches",
    "PromptItem",
    "Tokenized",
    "UnpairedBatches",
    "UnpairedItem",
    "bucket_for",
    "buckets",
    "detect_format",
    "has_chat_template",
    "load_dir",
    "load_rows",
    "normalize_format",
    "prepare",
    "split",
    "tokenize_rows",
    "unpair",
    "validate_rows",
]

FORMATS = ("text", "chat", "completion", "preference", "prompt", "unpaired_preference")
_REQUIRED = {
    "text": ("text",),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "unpaired_preference": ("prompt", "completion", "label"),
}
DEFAULT_VALID_FRACTION = 0.1


# ---------------------------------------------------------------- loading


def _fail(field_name: str, description: str) -> InvalidArgument:
    return InvalidArgument.one(field_name, description)


def _json_error(line: int, e: json.JSONDecodeError) -> str:
    return f"line {line}: invalid JSON ({e.msg}: column {e.colno})"


def load_rows(
    path: Path, field: str, roots: tuple[Path, ...] | None = None
) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a JSON list, or a JSON object {"examples": [...]}.

    The file is opened confined to ``roots`` (default: the roots this process was started
    with, see paths.process_roots) and checked by the real path of the open descriptor."""
    path = Path(path)
    roots = roots if roots is not None else paths.process_roots()
    with paths.open_confined(path, roots, field) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(field, f"{path.name} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise _fail(field, f"{path.name} is empty")
    lines = text.splitlines()
    first = next(ln for ln in lines if ln.strip())
    if first.lstrip().startswith("{") and _parses(first):
        rows = _jsonl(lines, field)
        if len(rows) == 1 and isinstance(rows[0].get("examples"), list):
            rows = rows[0]["examples"]
        return _listed(rows, path, field)
    # A JSON document spread over lines: errors point into it.
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(field, _json_error(e.lineno, e)) from None
    except RecursionError:
        raise _fail(field, f"{path.name}: JSON nested too deeply") from None
    if isinstance(whole, dict):
        whole = whole.get("examples", [whole])
        if not isinstance(whole, list):
            raise _fail(field, '"examples" must be a list of rows')
    if not isinstance(whole, list):
        raise _fail(field, 'expected JSON lines, a JSON list or {"examples": [...]}')
    return _listed(whole, path, field)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _jsonl(lines: list[str], field: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(field, _json_error(n, e)) from None
        except RecursionError:
            raise _fail(field, f"line {n}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise _fail(field, f"line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _listed(rows: list[Any], path: Path, field: str) -> list[dict[str, Any]]:
    if not rows:
        raise _fail(field, f"{path.name} has no rows")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise _fail(field, f"row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def load_dir(
    path: Path, field: str, roots: tuple[Path, ...] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """{"train": rows, "valid"?: rows, "test"?: rows} from a directory, as mlx-lm lays it out.
    Each member file is confined by its own real path (see load_rows)."""
    path = Path(path)
    if not os.path.lexists(path / "train.jsonl"):
        raise _fail(field, f"directory {path} has no train.jsonl")
    out = {}
    for name in ("train", "valid", "test"):
        f = path / f"{name}.jsonl"
        if os.path.lexists(f):
            try:
                out[name] = load_rows(f, field, roots)
            except InvalidArgument as e:
                v = e.violations[0]
                raise _fail(field, f"{f.name}: {v.description}") from None
    return out


# ---------------------------------------------------------------- formats


def _row_format(row: dict[str, Any]) -> str | None:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "label" in row and "completion" in row:
        return "unpaired_preference"
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    if "prompt" in row:
        return "prompt"
    return None


def normalize_format(raw: str, field: str) -> str:
    """ "" (detect) or a format name; accepts the proto's DATASET_FORMAT_* names too."""
    fmt = (raw or "").strip().lower().removeprefix("dataset_format_")
    if fmt in ("", "unspecified"):
        return ""
    if fmt not in FORMATS:
        raise _fail(field, f"unknown format {raw!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def detect_format(rows: Sequence[dict[str, Any]], field: str) -> str:
    """The format of row 1; every other row must have the same keys (else which row is off)."""
    if not rows:
        raise _fail(field, "the dataset has no rows")
    fmt = _row_format(rows[0])
    if fmt is None:
        keys = ", ".join(sorted(rows[0])) or "none"
        raise _fail(
            field,
            "row 1: unknown format (keys: "
            f"{keys}); expected 'text', 'messages', 'prompt'+'completion', "
            "'prompt'+'chosen'+'rejected', 'prompt'+'completion'+'label' or 'prompt'",
        )
    for i, row in enumerate(rows[1:], 2):
        other = _row_format(row)
        if other == fmt:
            continue
        missing = [k for k in _REQUIRED[fmt] if k not in row]
        what = f"missing {missing[0]!r}" if missing else "mixed formats"
        raise _fail(field, f"row {i}: {what} (row 1 is {fmt!r} data, row {i} looks like {other!r})")
    return fmt


def _messages_problem(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return "it is empty" if isinstance(v, list) else f"got {type(v).__name__}"
    for j, m in enumerate(v, 1):
        if not isinstance(m, dict):
            return f"message {j} is a {type(m).__name__}"
        if not isinstance(m.get("role"), str) or not m["role"]:
            return f"message {j} has no 'role'"
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            return f"message {j} has no 'content'"
        if content is not None and not isinstance(content, str | list):
            return f"message {j}: 'content' must be a string"
    return None


def _check_turns(row: dict[str, Any], key: str) -> str | None:
    """A string or a message list, non-empty."""
    v = row.get(key)
    if isinstance(v, str):
        return None if v.strip() else f"{key!r} is empty"
    problem = _messages_problem(v)
    if problem:
        return f"{key!r} must be a string or a list of {{role, content}} ({problem})"
    return None


def validate_rows(
    rows: Sequence[dict[str, Any]], fmt: str, field: str, *, source: str = ""
) -> None:
    """Every row has the keys and value types of ``fmt``; errors name the 1-based row."""
    if not rows:
        raise _fail(field, f"{source}the dataset has no rows")
    for i, row in enumerate(rows, 1):
        missing = [k for k in _REQUIRED[fmt] if k not in row]
        if missing:
            raise _fail(field, f"{source}row {i}: missing {missing[0]!r}")
        problem = _row_problem(row, fmt)
        if problem:
            raise _fail(field, f"{source}row {i}: {problem}")


def _row_problem(row: dict[str, Any], fmt: str) -> str | None:
    if fmt == "text":
        t = row["text"]
        return None if isinstance(t, str) and t.strip() else "'text' must be a non-empty string"
    if "tools" in row and row["tools"] is not None and not isinstance(row["tools"], list):
        return "'tools' must be a list"
    if fmt == "chat":
        problem = _messages_problem(row["messages"])
        return f"'messages' must be a list of {{role, content}} ({problem})" if problem else None
    keys = {
        "completion": ("prompt", "completion"),
        "prompt": ("prompt",),
        "unpaired_preference": ("prompt", "completion"),
    }.get(fmt, ("prompt", "chosen", "rejected"))
    for key in keys:
        problem = _check_turns(row, key)
        if problem:
            return problem
    if fmt == "unpaired_preference":
        if not isinstance(row["label"], bool):
            return f"'label' must be true (desirable) or false, got {json.dumps(row['label'])}"
        if row.get("system") is not None and not isinstance(row["system"], str):
            return "'system' must be a string"
        return None
    if fmt != "preference":
        return None
    if row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are identical"
    if row.get("system") is not None and not isinstance(row["system"], str):
        return "'system' must be a string"
    m = row.get("margin")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int | float)):
        return "'margin' must be a number"
    if m is not None and not np.isfinite(m):
        return "'margin' must be finite"
    return None


# ---------------------------------------------------------------- tokenizing


def has_chat_template(tokenizer: Any) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if flag is not None:
        return bool(flag)
    return getattr(tokenizer, "chat_template", None) is not None


def _chat(tokenizer: Any, messages: list, tools: Any, add_generation_prompt: bool) -> list[int]:
    kw: dict[str, Any] = {"add_generation_prompt": add_generation_prompt, "return_dict": False}
    if tools:
        kw["tools"] = tools
    out = tokenizer.apply_chat_template(messages, **kw)
    if hasattr(out, "keys"):  # a raw transformers tokenizer may still hand back a dict
        out = out["input_ids"]
    return [int(t) for t in out]


def _as_messages(v: str | list, role: str) -> list[dict[str, Any]]:
    return [{"role": role, "content": v}] if isinstance(v, str) else list(v)


def _plain(v: str | list) -> str:
    """Text of a turn for tokenizers without a chat template."""
    if isinstance(v, str):
        return v
    return "\n\n".join(str(m.get("content") or "") for m in v)


def _with_eos(tokens: list[int], eos: int | None) -> list[int]:
    if eos is not None and (not tokens or tokens[-1] != eos):
        tokens.append(eos)
    return tokens


def _render_chat(row: dict[str, Any], tokenizer: Any, mask_prompt: bool) -> tuple[list[int], int]:
    messages, tools = row["messages"], row.get("tools")
    tokens = _chat(tokenizer, messages, tools, False)
    if not mask_prompt:
        return tokens, 0
    # As mlx-lm: the loss covers the last message; the generation prompt belongs to the prompt.
    gen = messages[-1].get("role") == "assistant"
    return tokens, len(_chat(tokenizer, messages[:-1], tools, gen))


def _render_pair(
    tokenizer: Any,
    prompt: str | list,
    answer: str | list,
    *,
    system: str | None = None,
    tools: Any = None,
) -> tuple[list[int], int]:
    """Tokens of prompt + answer and the number of prompt tokens."""
    if has_chat_template(tokenizer):
        head = [{"role": "system", "content": system}] if system else []
        head += _as_messages(prompt, "user")
        tokens = _chat(tokenizer, head + _as_messages(answer, "assistant"), tools, False)
        return tokens, len(_chat(tokenizer, head, tools, True))
    text = f"{system}\n\n{_plain(prompt)}" if system else _plain(prompt)
    head = list(tokenizer.encode(text))
    body = list(tokenizer.encode(_plain(answer), add_special_tokens=False))
    return _with_eos(head + body, tokenizer.eos_token_id), len(head)


def _render_prompt(row: dict[str, Any], tokenizer: Any) -> list[int]:
    if has_chat_template(tokenizer):
        head = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return _chat(tokenizer, head + _as_messages(row["prompt"], "user"), row.get("tools"), True)
    return list(tokenizer.encode(_plain(row["prompt"])))


def _cut(tokens: list[int], prompt_len: int, max_seq_length: int) -> Tokenized:
    cut = len(tokens) > max_seq_length
    tokens = tokens[:max_seq_length]
    return Tokenized(tokens, min(prompt_len, len(tokens)), cut)


def tokenize_rows(
    rows: Sequence[dict[str, Any]],
    fmt: str,
    tokenizer: Any,
    *,
    max_seq_length: int,
    mask_prompt: bool,
    field: str = "spec.dataset.path",
) -> list[Tokenized] | list[PreferencePair] | list[PromptItem]:
    """Tokenize validated rows. Sequences are cut to max_seq_length tokens (prompts for
    rollouts keep their *last* tokens, where the generation prompt is). Preference pairs
    and unpaired rows always mask the prompt; text rows have none to mask; EOS is appended
    to text rows (as mlx-lm) and to completions when there is no chat template."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be >= 2, got {max_seq_length}")
    eos = tokenizer.eos_token_id
    out: list[Any] = []
    for i, row in enumerate(rows, 1):
        try:
            if fmt == "text":
                out.append(
                    _cut(_with_eos(list(tokenizer.encode(row["text"])), eos), 0, max_seq_length)
                )
            elif fmt == "chat":
                if not has_chat_template(tokenizer):
                    raise _fail(field, "chat data needs a tokenizer with a chat template")
                tokens, offset = _render_chat(row, tokenizer, mask_prompt)
                out.append(_cut(tokens, offset, max_seq_length))
            elif fmt == "completion":
                tokens, offset = _render_pair(
                    tokenizer, row["prompt"], row["completion"], tools=row.get("tools")
                )
                out.append(_cut(tokens, offset if mask_prompt else 0, max_seq_length))
            elif fmt == "preference":
                kw = {"system": row.get("system"), "tools": row.get("tools")}
                c, cp = _render_pair(tokenizer, row["prompt"], row["chosen"], **kw)
                r, rp = _render_pair(tokenizer, row["prompt"], row["rejected"], **kw)
                m = row.get("margin")
                out.append(
                    PreferencePair(
                        _cut(c, cp, max_seq_length),
                        _cut(r, rp, max_seq_length),
                        None if m is None else float(m),
                    )
                )
            elif fmt == "unpaired_preference":
                kw = {"system": row.get("system"), "tools": row.get("tools")}
                tokens, p = _render_pair(tokenizer, row["prompt"], row["completion"], **kw)
                seq = _cut(tokens, p, max_seq_length)
                out.append(UnpairedItem(seq, tuple(tokens[p:]), row["label"]))
            elif fmt == "prompt":
                tokens = _render_prompt(row, tokenizer)
                out.append(
                    PromptItem(
                        tokens[-max_seq_length:], row["prompt"], row, len(tokens) > max_seq_length
                    )
                )
            else:
                raise ValueError(f"unknown format {fmt!r}")
        except InvalidArgument:
            raise
        except Exception as e:  # a chat template that rejects the row (roles, tool schema...)
            raise _fail(field, f"row {i}: cannot render ({type(e).__name__}: {e})") from None
    return out


# ---------------------------------------------------------------- splitting


def split(
    rows: Sequence[Any],
    valid_fraction: float,
    seed: int,
    *,
    field: str = "spec.dataset.valid_fraction",
) -> tuple[list[Any], list[Any]]:
    """Hold out round(n * fraction) rows (at least 1 when n >= 2 and fraction > 0), chosen by
    a permutation seeded with ``seed``; both parts keep the original row order."""
    if not 0.0 <= valid_fraction < 1.0:
        raise _fail(field, f"must be in [0, 1), got {valid_fraction}")
    n = len(rows)
    k = round(n * valid_fraction)
    if valid_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    if k == 0:
        return list(rows), []
    held = set(np.random.default_rng([seed % 2**64]).permutation(n)[:k].tolist())
    train = [r for i, r in enumerate(rows) if i not in held]
    valid = [r for i, r in enumerate(rows) if i in held]
    return train, valid


# ---------------------------------------------------------------- prepare


@dataclass(frozen=True)
class DataStats:
    rows: int  # training rows (after drops)
    valid_rows: int
    tokens: int  # training tokens after truncation (both answers for preference data)
    target_tokens: int  # training tokens that carry loss
    truncated: int  # rows (train + valid) cut to max_seq_length
    dropped: int  # rows left with no token to learn from once truncated

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class PreparedData:
    format: str
    train: list[Any]  # Tokenized | PreferencePair | UnpairedItem | PromptItem, by format
    valid: list[Any]
    test: list[Any]
    mask_prompt: bool
    pad_id: int
    max_seq_length: int
    stats: DataStats

    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        sort_chunk: int = 0,
        limit: int | None = None,
        field: str = "spec.loop.batch_size",
    ) -> Batches | PreferenceBatches | UnpairedBatches | PromptBatches:
        """Batches of the right kind for ``split`` ("train" shuffles and repeats by default)."""
        items = {"train": self.train, "valid": self.valid, "test": self.test}[split]
        shuffle = split == "train" if shuffle is None else shuffle
        common = {
            "seed": seed,
            "shuffle": shuffle,
            "rank": rank,
            "world_size": world_size,
            "limit": limit,
            "field": field,
        }
        if self.format == "prompt":
            return PromptBatches(items, batch_size, **common)
        kind = {"preference": PreferenceBatches, "unpaired_preference": UnpairedBatches}.get(
            self.format, Batches
        )
        return kind(
            items,
            batch_size,
            pad_id=self.pad_id,
            max_seq_length=self.max_seq_length,
            sort_chunk=sort_chunk,
            **common,
        )


def unpair(data: PreparedData) -> PreparedData:
    """Preference pairs as unpaired rows, chosen desirable and rejected not (TRL's
    ``unpair_preference_dataset``). A completion cut by max_seq_length stays cut in the KL
    rows it lends (TRL cuts those afresh from the whole completion)."""

    def rows(pairs: list[PreferencePair]) -> list[UnpairedItem]:
        return [
            UnpairedItem(s, tuple(s.tokens[s.prompt_len :]), label)
            for p in pairs
            for s, label in ((p.chosen, True), (p.rejected, False))
        ]

    return replace(
        data,
        format="unpaired_preference",
        train=rows(data.train),
        valid=rows(data.valid),
        test=rows(data.test),
    )


def _resolve_format(
    rows: list[dict[str, Any]], requested: str, allowed: Sequence[str], field: str
) -> str:
    path_f = f"{field}.path"
    if requested:
        if requested not in allowed:
            raise _fail(
                f"{field}.format",
                f"format {requested!r} is not accepted here; expected one of "
                + ", ".join(repr(a) for a in allowed),
            )
        return requested
    fmt = detect_format(rows, path_f)
    if fmt not in allowed:
        # Prompt-only methods can take the prompts of richer rows when the caller allows it.
        if "prompt" in allowed and "prompt" in rows[0]:
            return "prompt"
        # A "label" that is no KTO label (not a bool) is just another column of completions.
        label = rows[0].get("label")
        if fmt == "unpaired_preference" and "completion" in allowed and not isinstance(label, bool):
            return "completion"
        raise _fail(
            path_f,
            f"rows are {fmt!r} data (detected from row 1) but this method needs "
            + " or ".join(repr(a) for a in allowed),
        )
    return fmt


def _usable(item: Any) -> bool:
    if isinstance(item, UnpairedItem):
        return item.seq.ntargets > 0
    if isinstance(item, PreferencePair):
        return item.chosen.ntargets > 0 and item.rejected.ntargets > 0
    if isinstance(item, Tokenized):
        return item.ntargets > 0
    return bool(item.tokens)


def _truncated(item: Any) -> bool:
    if isinstance(item, UnpairedItem):
        return item.seq.truncated
    if isinstance(item, PreferencePair):
        return item.chosen.truncated or item.rejected.truncated
    return item.truncated


def _counts(items: list[Any]) -> tuple[int, int]:
    seqs: list[Any] = []
    for it in items:
        if isinstance(it, UnpairedItem):
            seqs.append(it.seq)
        else:
            seqs += [it.chosen, it.rejected] if isinstance(it, PreferencePair) else [it]
    tokens = sum(len(s.tokens) for s in seqs)
    targets = sum(s.ntargets for s in seqs if isinstance(s, Tokenized))
    return tokens, targets


def prepare(
    dataset_ref: dict[str, Any],
    tokenizer: Any,
    *,
    allowed_formats: Sequence[str],
    max_seq_length: int,
    mask_prompt: bool | None,
    seed: int,
    field: str = "spec.dataset",
) -> PreparedData:
    """Load, validate, split and tokenize a dataset reference for one trainer.

    dataset_ref: {"path", "format" ("" = detect), "valid_path", "valid_fraction"}. The
    validation rows come from valid_path, else the directory's valid.jsonl, else a seeded
    hold-out of valid_fraction (default 0.1; 0 = none) of the training rows. mask_prompt None
    means the default: True for chat and completion. Rows that keep no token to learn from
    after truncation are dropped (stats.dropped); none left is an error.
    """
    path_f = f"{field}.path"
    raw = dataset_ref.get("path") or ""
    if not raw:
        raise _fail(path_f, "is required")
    path = Path(raw)
    requested = normalize_format(dataset_ref.get("format") or "", f"{field}.format")
    parts = load_dir(path, path_f) if path.is_dir() else {"train": load_rows(path, path_f)}
    fmt = _resolve_format(parts["train"], requested, allowed_formats, field)
    source = "train.jsonl: " if path.is_dir() else ""
    validate_rows(parts["train"], fmt, path_f, source=source)
    train_rows, valid_rows = parts["train"], parts.get("valid", [])
    if dataset_ref.get("valid_path"):
        valid_f = f"{field}.valid_path"
        valid_rows = load_rows(Path(dataset_ref["valid_path"]), valid_f)
        validate_rows(valid_rows, fmt, valid_f)
    elif "valid" in parts:
        validate_rows(valid_rows, fmt, path_f, source="valid.jsonl: ")
    else:
        frac = dataset_ref.get("valid_fraction")
        frac = DEFAULT_VALID_FRACTION if frac is None else float(frac)
        if not 0.0 <= frac < 0.5:
            raise _fail(f"{field}.valid_fraction", f"must be in [0, 0.5), got {frac}")
        train_rows, valid_rows = split(train_rows, frac, seed)
    test_rows = parts.get("test", [])
    if test_rows:
        validate_rows(test_rows, fmt, path_f, source="test.jsonl: ")

    mask = fmt in ("chat", "completion") if mask_prompt is None else bool(mask_prompt)
    kw = {"max_seq_length": max_seq_length, "mask_prompt": mask, "field": path_f}
    tokenized = {
        name: tokenize_rows(rows, fmt, tokenizer, **kw)
        for name, rows in (("train", train_rows), ("valid", valid_rows), ("test", test_rows))
    }
    truncated = sum(_truncated(t) for t in tokenized["train"] + tokenized["valid"])
    kept = {name: [t for t in items if _usable(t)] for name, items in tokenized.items()}
    dropped = sum(len(tokenized[n]) - len(kept[n]) for n in ("train", "valid"))
    if not kept["train"]:
        raise _fail(
            path_f,
            f"no row keeps a token to learn from within max_seq_length={max_seq_length} "
            "(the prompts fill it); raise max_seq_length or shorten the prompts",
        )
    tokens, targets = _counts(kept["train"])
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stats = DataStats(len(kept["train"]), len(kept["valid"]), tokens, targets, truncated, dropped)
    return PreparedData(
        format=fmt,
        train=kept["train"],
        valid=kept["valid"],
        test=kept["test"],
        mask_prompt=mask,
        pad_id=int(pad),
        max_seq_length=max_seq_length,
        stats=stats,
    )
