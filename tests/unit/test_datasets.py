"""Dataset layer: loading, validation errors, rendering + masking, splitting, batching."""

from __future__ import annotations

import json
from pathlib import Path

import services  # noqa: F401  (BLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from services.runtime.datasets import (
    Batches,
    PreferenceBatches,
    PromptBatches,
    Tokenized,
    bucket_for,
    buckets,
    detect_format,
    load_rows,
    prepare,
    split,
    tokenize_rows,
    validate_rows,
)
from services.runtime.errors import InvalidArgument

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while"]
WORDS += ["a", "cat", "sleeps", "in", "the", "warm", "sun"]


def _tokenizer(template: str | None):
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
    )
    return TokenizerWrapper(hf)


@pytest.fixture(scope="module")
def tok():
    return _tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(None)


def _write(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def _err(fn, *args, **kw) -> str:
    with pytest.raises(InvalidArgument) as e:
        fn(*args, **kw)
    (v,) = e.value.violations
    return f"{v.field}: {v.description}"


def _chat(tok, messages, gen=False) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)


# ---------------------------------------------------------------- files


def test_loads_jsonl_json_list_examples_and_directory(tmp_path, tok):
    rows = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "l.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "e.json").write_text(json.dumps({"examples": rows}, indent=2))
    (tmp_path / "e1.json").write_text(json.dumps({"examples": rows}))
    _write(tmp_path / "r.jsonl", [rows[0], {}, rows[1]][::2])
    for name in ("l.json", "e.json", "e1.json", "r.jsonl"):
        assert load_rows(tmp_path / name, "f") == rows, name

    d = tmp_path / "dir"
    _write(d / "train.jsonl", [{"text": _text(i, 5)} for i in range(6)])
    _write(d / "valid.jsonl", [{"text": "valid one"}])
    _write(d / "test.jsonl", [{"text": "t1"}, {"text": "t2"}])
    data = prepare(
        {"path": str(d)},
        tok,
        allowed_formats=("text",),
        max_seq_length=64,
        mask_prompt=None,
        seed=0,
    )
    assert (data.format, data.stats.rows, data.stats.valid_rows, len(data.test)) == (
        "text",
        6,
        1,
        2,
    )
    assert data.valid[0].tokens == tok.encode("valid one") + [tok.eos_token_id]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "f: file not found: "),
        ("", "f: x.jsonl is empty"),
        ("  \n\n", "f: x.jsonl is empty"),
        ("[]", "f: x.jsonl has no rows"),
        ('{"examples": []}', "f: x.jsonl has no rows"),
        (
            "".join('{"text": "ok"}\n' for _ in range(6)) + '{"text": "a" "b"}\n',
            "f: line 7: invalid JSON (Expecting ',' delimiter: column 14)",
        ),
        ('{"text": "ok"}\n\n[1]\n', "f: line 3: expected a JSON object, got list"),
        ('[\n {"text": "a"},\n {"text": "b",}\n]', "f: line 3: invalid JSON (Expecting "),
        ('[{"text": "a"}, 3]', "f: row 2: expected a JSON object, got int"),
    ],
)
def test_file_errors_say_where(tmp_path, content, expected):
    p = tmp_path / "x.jsonl"
    if content is not None:
        p.write_text(content)
    assert _err(load_rows, p, "f").startswith(expected)


def test_directory_without_train_and_errors_name_the_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    assert "has no train.jsonl" in _err(
        prepare,
        {"path": str(d)},
        None,
        allowed_formats=("text",),
        max_seq_length=32,
        mask_prompt=None,
        seed=0,
    )
    _write(d / "train.jsonl", [{"text": "a"}])
    (d / "valid.jsonl").write_text('{"text": 1,}\n')
    msg = _err(
        prepare,
        {"path": str(d)},
        None,
        allowed_formats=("text",),
        max_seq_length=32,
        mask_prompt=None,
        seed=0,
    )
    assert msg.startswith("spec.dataset.path: valid.jsonl: line 1: invalid JSON")


# ---------------------------------------------------------------- formats


def test_detects_each_format():
    cases = {
        "text": {"text": "x"},
        "chat": {"messages": [{"role": "user", "content": "x"}]},
        "completion": {"prompt": "p", "completion": "c"},
        "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "prompt": {"prompt": "p", "answer": "42"},
    }
    for fmt, row in cases.items():
        assert detect_format([row, row], "f") == fmt


@pytest.mark.parametrize(
    ("rows", "fmt", "expected"),
    [
        (
            [{"prompt": "p", "completion": "c"}] * 11 + [{"prompt": "p"}],
            None,
            "row 12: missing 'completion'",
        ),
        (
            [{"prompt": "p", "completion": "c"}] * 11 + [{"prompt": "p"}],
            "completion",
            "row 12: missing 'completion'",
        ),
        (
            [{"messages": [{"role": "user", "content": "x"}]}] * 4 + [{"text": "t"}],
            None,
            "row 5: missing 'messages' (row 1 is 'chat' data, row 5 looks like 'text')",
        ),
        (
            [{"text": "a"}, {"text": "b"}, {"text": "c", "chosen": "x", "rejected": "y"}],
            None,
            "row 3: mixed formats (row 1 is 'text' data, row 3 looks like 'preference')",
        ),
        (
            [{"messages": []}] * 2 + [{"messages": [{"role": "user", "content": "x"}, {"a": 1}]}],
            "chat",
            "row 1: 'messages' must be a list of {role, content} (it is empty)",
        ),
        (
            [{"messages": [{"role": "user", "content": "x"}]}] * 2
            + [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}],
            "chat",
            "row 3: 'messages' must be a list of {role, content} (message 2 has no 'content')",
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
            + [{"prompt": "p", "chosen": "same", "rejected": "same"}],
            "preference",
            "row 4: 'chosen' and 'rejected' are identical",
        ),
        (
            [{"prompt": "p", "chosen": " ", "rejected": "b"}],
            "preference",
            "row 1: 'chosen' is empty",
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}],
            "preference",
            "row 1: 'margin' must be a number",
        ),
        ([{"text": ""}], "text", "row 1: 'text' must be a non-empty string"),
        ([{"x": 1}], None, "row 1: unknown format (keys: x)"),
    ],
)
def test_row_errors_name_the_row(rows, fmt, expected):
    def check():
        validate_rows(rows, fmt or detect_format(rows, "spec.dataset.path"), "spec.dataset.path")

    assert _err(check).startswith(f"spec.dataset.path: {expected}")


def test_wrong_format_for_method(tmp_path, tok):
    p = _write(tmp_path / "d.jsonl", [{"text": "hello"}] * 3)
    ref = {"path": str(p)}
    kw = {"allowed_formats": ("preference",), "max_seq_length": 32, "mask_prompt": None, "seed": 0}
    assert _err(prepare, ref, tok, **kw) == (
        "spec.dataset.path: rows are 'text' data (detected from row 1) but this method needs "
        "'preference'"
    )
    assert _err(prepare, {**ref, "format": "text"}, tok, **kw).startswith(
        "spec.dataset.format: format 'text' is not accepted here"
    )
    assert _err(prepare, {**ref, "format": "csv"}, tok, **kw).startswith(
        "spec.dataset.format: unknown format 'csv'"
    )


# ---------------------------------------------------------------- rendering and masking


def test_text_rows_get_eos_and_no_mask(tok):
    (t,) = tokenize_rows(
        [{"text": "the lazy dog"}], "text", tok, max_seq_length=64, mask_prompt=True
    )
    assert t.tokens == tok.encode("the lazy dog") + [tok.eos_token_id]
    assert t.prompt_len == 0


def test_chat_masks_everything_before_the_last_assistant_turn(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the quick fox"},
        {"role": "assistant", "content": "jumps"},
        {"role": "user", "content": "over the"},
        {"role": "assistant", "content": "lazy dog in the sun"},
    ]
    (t,) = tokenize_rows([{"messages": msgs}], "chat", tok, max_seq_length=256, mask_prompt=True)
    prefix = _chat(tok, msgs[:-1], gen=True)
    assert t.tokens == _chat(tok, msgs)
    assert t.tokens[: len(prefix)] == prefix and t.prompt_len == len(prefix)
    b = next(iter(Batches([t], 1, pad_id=0, max_seq_length=256, seed=0, shuffle=False)))
    mask = np.array(b["loss_mask"][0])
    # Target j is token j + 1: counted exactly from the first answer token to the last token.
    expected = [1.0 if len(prefix) <= j + 1 < len(t.tokens) else 0.0 for j in range(mask.size)]
    assert mask.tolist() == expected
    assert b["ntokens"] == len(t.tokens) - len(prefix) > 0
    answer = tok.decode([t.tokens[j + 1] for j in range(mask.size) if mask[j]])
    assert answer == "lazy dog in the sun<|im_end|>\n"

    (u,) = tokenize_rows([{"messages": msgs}], "chat", tok, max_seq_length=256, mask_prompt=False)
    assert (u.tokens, u.prompt_len) == (t.tokens, 0)


def test_completion_through_template_or_concatenated(tok, plain_tok):
    row = {"prompt": "the quick fox", "completion": "jumps over"}
    (t,) = tokenize_rows([row], "completion", tok, max_seq_length=128, mask_prompt=True)
    user = [{"role": "user", "content": row["prompt"]}]
    assert t.tokens == _chat(tok, user + [{"role": "assistant", "content": row["completion"]}])
    assert t.prompt_len == len(_chat(tok, user, gen=True))

    (p,) = tokenize_rows([row], "completion", plain_tok, max_seq_length=128, mask_prompt=True)
    head = plain_tok.encode(row["prompt"])
    assert p.tokens == head + plain_tok.encode("jumps over", add_special_tokens=False) + [
        plain_tok.eos_token_id
    ]
    assert p.prompt_len == len(head)
    assert "needs a tokenizer with a chat template" in _err(
        tokenize_rows, [{"messages": user}], "chat", plain_tok, max_seq_length=64, mask_prompt=True
    )


def test_truncation_is_counted_and_rows_without_targets_dropped(tmp_path, tok):
    rows = [
        {"prompt": "sun", "completion": _text(0, 60)},
        {"prompt": _text(1, 80), "completion": "dog"},
    ]
    rows += [{"prompt": "fox", "completion": "cat"}] * 3
    p = _write(tmp_path / "c.jsonl", rows)
    data = prepare(
        {"path": str(p), "valid_fraction": 0},
        tok,
        allowed_formats=("completion",),
        max_seq_length=32,
        mask_prompt=None,
        seed=0,
    )
    assert data.mask_prompt is True
    assert (data.stats.truncated, data.stats.dropped, data.stats.rows) == (2, 1, 4)
    assert max(len(t.tokens) for t in data.train) == 32
    assert data.stats.tokens == sum(len(t.tokens) for t in data.train)


def test_prompt_rows_keep_raw_prompt_and_generation_prompt(tok):
    rows = [
        {"prompt": "the cat", "answer": "42"},
        {"prompt": [{"role": "user", "content": "a dog"}]},
    ]
    items = tokenize_rows(rows, "prompt", tok, max_seq_length=64, mask_prompt=False)
    assert items[0].tokens == _chat(tok, [{"role": "user", "content": "the cat"}], gen=True)
    assert items[1].prompt == rows[1]["prompt"] and items[0].row["answer"] == "42"
    b = next(iter(PromptBatches(items, 2, seed=0, shuffle=False)))
    assert b["tokens"] == [items[0].tokens, items[1].tokens]
    assert b["prompts"] == ["the cat", rows[1]["prompt"]]


# ---------------------------------------------------------------- split


def test_split_is_deterministic_and_keeps_one_valid_row():
    rows = list(range(50))
    a, b = split(rows, 0.2, seed=3), split(rows, 0.2, seed=3)
    assert a == b and len(a[1]) == 10 and sorted(a[0] + a[1]) == rows
    assert split(rows, 0.2, seed=4)[1] != a[1]
    assert len(split([1, 2], 0.1, 0)[1]) == 1
    assert split([1], 0.1, 0) == ([1], [])
    assert split(rows, 0.0, 0) == (rows, [])
    assert "must be in [0, 1)" in _err(split, rows, 1.5, 0)


# ---------------------------------------------------------------- batches


def _items(n: int, seed: int = 0) -> list[Tokenized]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 150))
        out.append(
            Tokenized(
                list(range(1000 * i + 1, 1000 * i + 1 + length)), int(rng.integers(0, length))
            )
        )
    return out


def _np(b):
    return {k: (np.array(v) if isinstance(v, mx.array) else v) for k, v in b.items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_buckets():
    assert buckets(512) == tuple(range(32, 513, 32))
    assert buckets(100) == (32, 64, 96, 100)
    assert buckets(16) == (16,)
    assert buckets(1024)[-5:] == (512, 640, 768, 896, 1024)
    assert len(buckets(8192)) < 45
    assert [bucket_for(n, 100) for n in (1, 32, 33, 64, 65, 97)] == [32, 32, 64, 64, 96, 100]


def test_batch_layout_and_bucket_lengths():
    lengths = [5, 20, 33, 10, 64, 3, 65, 2, 300, 7, 2, 2]
    items = [
        Tokenized(list(range(1000 * i + 1, 1000 * i + 1 + n)), (i * 7) % n)
        for i, n in enumerate(lengths)
    ]
    seen = []
    for b in Batches(items, 2, pad_id=7, max_seq_length=128, seed=1, shuffle=False):
        b = _np(b)
        seen.append(b["inputs"].shape[1])
        assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].shape == b["inputs"].shape
        assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for r in range(2):
            t = items[int(b["inputs"][r, 0]) // 1000]
            n = min(len(t.tokens), 128)
            assert b["inputs"][r, :n].tolist() == t.tokens[:n] and b["lengths"][r] == n
            assert (b["inputs"][r, n:] == 7).all() and (b["targets"][r, n - 1 :] == 7).all()
            assert b["loss_mask"][r].sum() == max(0, n - max(t.prompt_len, 1))
        assert b["ntokens"] == int(b["loss_mask"].sum()) == b["global_ntokens"]
    # The smallest bucket holding the longest row; 300 tokens are cut to max_seq_length.
    assert seen == [32, 64, 64, 96, 128, 32]


def test_determinism_and_reshuffle_per_epoch():
    items = _items(24)

    def run(seed):
        it = iter(Batches(items, 4, pad_id=0, max_seq_length=128, seed=seed))
        return [_np(next(it)) for _ in range(12)]

    a, b, c = run(5), run(5), run(6)
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    firsts = [[int(x) // 1000 for x in batch["inputs"][:, 0]] for batch in a]
    assert sorted(sum(firsts[:6], [])) == list(range(24))  # epoch 1 covers every item once
    assert sorted(sum(firsts[6:], [])) == list(range(24))
    assert firsts[:6] != firsts[6:]
    assert not all(_same(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("sort_chunk", [0, 3])
def test_resume_mid_epoch_continues_with_the_same_batches(sort_chunk):
    items = _items(30)
    kw = {"pad_id": 0, "max_seq_length": 128, "seed": 9, "sort_chunk": sort_chunk}
    ref = Batches(items, 4, **kw)
    it = iter(ref)
    for _ in range(9):  # 7 steps per epoch: this crosses into epoch 2
        next(it)
    state = ref.state()
    assert state == {"epoch": 1, "index": 2} and ref.epoch == pytest.approx(1 + 2 / 7)
    expected = [_np(next(it)) for _ in range(8)]

    resumed = Batches(items, 4, **kw)
    resumed.restore(json.loads(json.dumps(state)))
    got = [_np(b) for b, _ in zip(resumed, range(8), strict=False)]
    assert all(_same(x, y) for x, y in zip(expected, got, strict=True))


def test_sort_chunk_cuts_padding_and_keeps_every_item():
    items = _items(64)

    def padded(sort_chunk):
        bs = Batches(items, 4, pad_id=0, max_seq_length=128, seed=0, sort_chunk=sort_chunk)
        batches = [_np(b) for b, _ in zip(bs, range(bs.steps_per_epoch), strict=False)]
        ids = sorted(int(x) // 1000 for b in batches for x in b["inputs"][:, 0])
        return sum(b["inputs"].size for b in batches), ids

    (plain, ids0), (sorted_, ids1) = padded(0), padded(4)
    assert ids0 == ids1 == list(range(64)) and sorted_ < plain


def test_data_parallel_slices_concatenate_to_the_single_process_batch():
    items = _items(32)
    kw = {"pad_id": 3, "max_seq_length": 128, "seed": 2}
    one = iter(Batches(items, 8, **kw))
    ranks = [iter(Batches(items, 8, rank=r, world_size=2, **kw)) for r in range(2)]
    for _ in range(6):
        g = _np(next(one))
        parts = [_np(next(r)) for r in ranks]
        for key in ("inputs", "targets", "loss_mask", "lengths"):
            assert np.array_equal(np.concatenate([p[key] for p in parts]), g[key])
        assert parts[0]["inputs"].shape[0] == 4
        assert sum(p["ntokens"] for p in parts) == g["ntokens"]
        assert parts[0]["global_ntokens"] == parts[1]["global_ntokens"] == g["ntokens"]
    assert "must be divisible by the number of processes (3)" in _err(
        Batches, items, 8, rank=0, world_size=3, **kw
    )
    assert "larger than the dataset (32 rows)" in _err(Batches, items, 64, **kw)


def test_validation_pass_covers_each_item_once_with_fixed_shape():
    items = _items(10)
    v = Batches(items, 4, pad_id=0, max_seq_length=128, seed=0, shuffle=False, world_size=2, rank=1)
    batches = [_np(b) for b in v]
    assert len(v) == len(batches) == 3 and all(b["inputs"].shape[0] == 2 for b in batches)
    # Global batch 3 holds items 8, 9 (rank 0) and two empty rows (rank 1).
    assert batches[2]["loss_mask"].sum() == 0 and batches[2]["ntokens"] == 0
    assert batches[2]["global_ntokens"] == items[8].ntargets + items[9].ntargets
    assert [_np(b)["inputs"][0, 0] for b in v] == [b["inputs"][0, 0] for b in batches]
    limited = Batches(items, 4, pad_id=0, max_seq_length=128, seed=0, shuffle=False, limit=2)
    assert len(list(limited)) == len(limited) == 2


# ---------------------------------------------------------------- preference


def test_preference_batches_stack_chosen_then_rejected(tmp_path, tok):
    rows = [
        {
            "prompt": _text(i, 3),
            "chosen": _text(i + 1, 2 + i % 3),
            "rejected": _text(i + 5, 1 + i % 4),
            "margin": float(i),
        }
        for i in range(8)
    ]
    rows[1]["system"] = "be kind"
    rows[2]["prompt"] = [{"role": "user", "content": "cats?"}]
    del rows[3]["margin"]
    p = _write(tmp_path / "pref.jsonl", rows)
    data = prepare(
        {"path": str(p), "valid_fraction": 0},
        tok,
        allowed_formats=("preference",),
        max_seq_length=64,
        mask_prompt=False,
        seed=0,
    )
    pairs = data.train
    head1 = [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": rows[1]["prompt"]},
    ]
    assert pairs[1].chosen.tokens == _chat(
        tok, head1 + [{"role": "assistant", "content": rows[1]["chosen"]}]
    )
    assert (
        pairs[1].chosen.prompt_len
        == pairs[1].rejected.prompt_len
        == len(_chat(tok, head1, gen=True))
    )  # always masked, whatever mask_prompt says

    batches = data.batches("train", 4, seed=0)
    assert isinstance(batches, PreferenceBatches)
    b = _np(next(iter(batches)))
    assert b["inputs"].shape[0] == 8 and b["margin"].shape == (4,)
    single = Batches(
        [q for pr in pairs for q in (pr.chosen, pr.rejected)],
        1,
        pad_id=0,
        max_seq_length=64,
        seed=0,
        shuffle=False,
    )
    by_first = {}
    for x in single:
        x = _np(x)
        by_first[tuple(x["inputs"][0, : x["lengths"][0]])] = x
    order = []
    for r in range(4):
        chosen = tuple(b["inputs"][r, : b["lengths"][r]])
        k = next(i for i, pr in enumerate(pairs) if tuple(pr.chosen.tokens) == chosen)
        order.append(k)
        rejected = tuple(b["inputs"][4 + r, : b["lengths"][4 + r]])
        assert rejected == tuple(pairs[k].rejected.tokens)
        for row, seq in ((r, chosen), (4 + r, rejected)):
            n = len(seq)
            assert (
                b["loss_mask"][row, : n - 1].tolist()
                == by_first[seq]["loss_mask"][0, : n - 1].tolist()
            )
    assert b["margin"].tolist() == [0.0 if k == 3 else float(k) for k in order]
    assert b["ntokens"] == int(b["loss_mask"].sum())


# ---------------------------------------------------------------- prepare


def test_prepare_valid_sources_and_defaults(tmp_path, tok):
    rows = [{"prompt": _text(i, 3), "completion": _text(i + 2, 4)} for i in range(20)]
    p = _write(tmp_path / "c.jsonl", rows)
    kw = {"allowed_formats": ("completion", "chat"), "max_seq_length": 64, "seed": 1}
    data = prepare({"path": str(p)}, tok, mask_prompt=None, **kw)
    assert (data.stats.rows, data.stats.valid_rows) == (18, 2)  # default valid_fraction 0.1
    assert data.stats.target_tokens == sum(t.ntargets for t in data.train)
    assert 0 < data.stats.target_tokens < data.stats.tokens  # prompts are masked
    assert prepare({"path": str(p)}, tok, mask_prompt=None, **kw).train == data.train

    v = _write(tmp_path / "v.jsonl", rows[:3])
    data = prepare({"path": str(p), "valid_path": str(v)}, tok, mask_prompt=False, **kw)
    assert (data.stats.rows, data.stats.valid_rows, data.mask_prompt) == (20, 3, False)
    assert all(t.prompt_len == 0 for t in data.train)
    assert isinstance(data.batches("valid", 2, seed=0), Batches)
    assert not data.batches("valid", 2, seed=0).shuffle

    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    msg = _err(prepare, {"path": str(p), "valid_path": str(bad)}, tok, mask_prompt=None, **kw)
    assert msg == "spec.dataset.valid_path: row 1: missing 'completion'"
    msg = _err(prepare, {"path": str(p), "valid_fraction": 0.7}, tok, mask_prompt=None, **kw)
    assert msg == "spec.dataset.valid_fraction: must be in [0, 0.5), got 0.7"
    assert _err(prepare, {"path": ""}, tok, mask_prompt=None, **kw) == (
        "spec.dataset.path: is required"
    )

    # Rollout methods may take the prompts of completion rows; the whole row stays available.
    data = prepare(
        {"path": str(p), "valid_fraction": 0},
        tok,
        allowed_formats=("prompt",),
        max_seq_length=64,
        mask_prompt=None,
        seed=0,
    )
    assert data.format == "prompt" and data.train[0].row == rows[0]
    batch = next(iter(data.batches("train", 4, seed=0)))
    assert len(batch["tokens"]) == 4 and all(isinstance(x, str) for x in batch["prompts"])


def test_with_the_tiny_model_tokenizer(tmp_path, tiny_model):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer number {i}"},
            ]
        }
        for i in range(6)
    ]
    p = _write(tmp_path / "chat.jsonl", rows)
    data = prepare(
        {"path": str(p), "valid_fraction": 0},
        tokenizer,
        allowed_formats=("chat",),
        max_seq_length=128,
        mask_prompt=None,
        seed=0,
    )
    for t, row in zip(data.train, rows, strict=True):
        learned = tokenizer.decode(t.tokens[t.prompt_len :])
        assert learned.startswith(row["messages"][1]["content"])
        assert "question" not in learned
