"""Tokenizing validated rows: chat-template rendering, prompt masking, truncation.

Split from datasets.py (which re-exports ``has_chat_template`` and ``tokenize_rows``): the
rendering rules follow mlx_lm/tuner/datasets.py and are compared against it, so they are kept
apart from loading and from the split / prepare bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.runtime.data_batches import PreferencePair, PromptItem, Tokenized, UnpairedItem
from services.runtime.data_rows import _fail
from services.runtime.errors import InvalidArgument


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
