"""The model layer: tiny model builds, resolution, loading, quantization, GGUF conversion."""

from __future__ import annotations

import services  # noqa: F401  (OpenBLAS before mlx.core)

# isort: split
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from services.runtime import gguf, model_build, models
from services.runtime.errors import InvalidArgument
from services.runtime.models import (
    build_tiny_model,
    load_model,
    param_count,
    quantize,
    resolve_model,
)

# Parameters of the default tiny model: 512x64 tied embedding + 2 x (attn 64*64*2 + 64*32*2,
# mlp 3*64*128, two norms of 64) + final norm.
TINY_PARAMS = 512 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def _violation(exc: pytest.ExceptionInfo[InvalidArgument]) -> tuple[str, str]:
    (v,) = exc.value.violations
    return v.field, v.description


# ---------------------------------------------------------------- tiny model
def test_tiny_model_loads_with_mlx_lm_and_chats(tiny: Path) -> None:
    from mlx_lm import load

    model, tok = load(str(tiny))
    assert models.model_config(tiny)["model_type"] == "llama"
    assert param_count(model) == TINY_PARAMS
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert len(tok.get_vocab()) == 512

    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages)
    assert ids[0] == 1 and ids.count(2) == 2  # specials are single tokens
    assert tok.decode(ids) == text
    # BPE learned real merges: far fewer tokens than bytes.
    assert len(tok.encode("The capital of France is Paris.")) < 20

    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), 512)
    assert logits.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(logits)))


def test_tiny_model_is_deterministic_and_reused(tmp_path: Path, tiny: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    other_seed = build_tiny_model(tmp_path / "seed1", seed=1)
    a = mx.load(str(tiny / "model.safetensors"))
    b = mx.load(str(other_seed / "model.safetensors"))
    assert not mx.array_equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])

    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt

    # Other parameters into the same directory replace the stale build.
    bigger = build_tiny_model(again, num_layers=3)
    assert models.model_config(bigger)["num_hidden_layers"] == 3
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_tiny_model_never_replaces_foreign_directories(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".tmp-*"))


def test_concurrent_publish_keeps_the_first_build(tmp_path: Path) -> None:
    stamp = {"builder": "test", "version": 1}
    final = tmp_path / "m"
    first, second = tmp_path / "a", tmp_path / "b"
    for d, tag in ((first, "first"), (second, "second")):
        d.mkdir()
        (d / "config.json").write_text(tag)
        (d / model_build._STAMP).write_text(json.dumps(stamp))
    model_build._publish(first, final, stamp)
    model_build._publish(second, final, stamp)  # lost the race: must not raise or clobber
    assert (final / "config.json").read_text() == "first"


# ---------------------------------------------------------------- resolution
def test_resolve_registered_tiny_builds_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    path = Path(resolve_model("tiny-llama", home, (home,)))
    assert path == home / "models" / "tiny-llama"
    assert (path / "config.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("Tiny-Llama", home, (home,)) == str(path)
    # The registry's stamp is the default build's: a direct build sees it as current.
    build_tiny_model(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_resolve_paths_and_hub_ids(tmp_path: Path, tiny: Path) -> None:
    roots = (tiny.parent.resolve(),)
    assert resolve_model(str(tiny), tmp_path, roots) == str(tiny.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path, roots) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )

    with pytest.raises(InvalidArgument) as exc:
        resolve_model(str(tiny), tmp_path, (tmp_path / "elsewhere",), field="spec.base_model")
    field, desc = _violation(exc)
    assert field == "spec.base_model" and "outside the allowed roots" in desc

    empty = tiny.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(InvalidArgument) as exc:
        resolve_model(str(empty), tmp_path, roots, field="spec.model")
    assert _violation(exc) == (
        "spec.model",
        f"{str(empty)!r} is not an mlx-lm model directory (no config.json)",
    )

    with pytest.raises(InvalidArgument, match="does not exist"):
        resolve_model(str(tiny.parent / "missing"), tmp_path, roots)


@pytest.mark.parametrize("ref", ["gpt-17", "a/b/c", "../x", ""])
def test_resolve_unknown_names(tmp_path: Path, ref: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        resolve_model(ref, tmp_path, (tmp_path,), field="spec.model")
    field, desc = _violation(exc)
    assert field == "spec.model"
    if ref and not ref.startswith("."):
        assert "smollm2-135m-instruct" in desc and "tiny-llama" in desc


# ---------------------------------------------------------------- loading
def test_load_model_casts_and_reports_errors(tiny: Path, tmp_path: Path) -> None:
    model, tok = load_model(str(tiny), dtype="bfloat16")
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.bfloat16}
    model, _ = load_model(str(tiny))
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    assert tok.eos_token_id == 2

    with pytest.raises(InvalidArgument) as exc:
        load_model(str(tmp_path), field="spec.model")
    field, desc = _violation(exc)
    assert field == "spec.model" and "cannot load model" in desc
    with pytest.raises(InvalidArgument) as exc:
        load_model(str(tiny), dtype="int8")
    assert _violation(exc)[0] == "model.dtype"


def test_load_model_applies_adapters(tiny: Path, tmp_path: Path) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    model, _ = load_model(str(tiny))
    model.freeze()
    linear_to_lora_layers(model, 2, lora)
    # Every linear of both blocks gets A (in x 4) and B (4 x out): q, k, v, o, gate, up, down.
    per_block = 4 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64)])
    per_block += 4 * 3 * (64 + 128)
    assert param_count(model, trainable=True) == 2 * per_block
    assert param_count(model) == TINY_PARAMS + param_count(model, trainable=True)
    for layer in model.model.layers:
        layer.self_attn.q_proj.lora_b = mx.full(layer.self_attn.q_proj.lora_b.shape, 0.01)
    ids = mx.array([[1, 87, 85, 265, 201, 57, 286, 2]])
    adapted = model(ids)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    mx.save_safetensors(
        str(adapters / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    (adapters / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora})
    )

    base, _ = load_model(str(tiny))
    loaded, _ = load_model(str(tiny), adapter_path=str(adapters))
    assert float(mx.abs(base(ids) - adapted).max()) > 1e-3
    np.testing.assert_allclose(np.array(loaded(ids)), np.array(adapted), atol=1e-5)
    with pytest.raises(InvalidArgument, match="with adapters"):
        load_model(str(tiny), adapter_path=str(tmp_path / "nope"))


def test_quantize_round_trip(tiny: Path, tmp_path: Path) -> None:
    from mlx_lm.utils import save_config, save_model

    model, _ = load_model(str(tiny))
    ids = mx.array([[1, 87, 85, 265, 201, 57, 286, 300, 262, 2]])
    full = model(ids)

    q = quantize(model, bits=4, group_size=32)
    assert q == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert param_count(model) == TINY_PARAMS
    assert param_count(model, trainable=True) > 0
    quantized = model(ids)
    err = float(mx.abs(quantized - full).max())
    assert 0 < err < 0.1 * float(mx.abs(full).max())

    out = tmp_path / "q4"
    save_model(out, model)
    save_config({**models.model_config(tiny), "quantization": q}, config_path=out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, out / name)
    reloaded, _ = load_model(str(out))
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == mx.uint32
    np.testing.assert_allclose(np.array(reloaded(ids)), np.array(quantized), atol=1e-5)

    with pytest.raises(InvalidArgument) as exc:
        quantize(model, bits=7, group_size=32, field="spec.qlora")
    assert _violation(exc)[0] == "spec.qlora.bits"


# ---------------------------------------------------------------- GGUF conversion
def _gguf_from(tiny: Path, path: Path) -> None:
    """Write the tiny model as llama.cpp would: GGUF names, Q/K permuted, vocab in metadata."""
    from mlx_lm.gguf import permute_weights, translate_weight_names

    cfg = models.model_config(tiny)
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    weights = {}
    for k, v in mx.load(str(tiny / "model.safetensors")).items():
        if "q_proj" in k:
            v = permute_weights(v, h, h)
        elif "k_proj" in k:
            v = permute_weights(v, h, kv)
        weights[translate_weight_names(k)] = v
    tok = json.loads((tiny / "tokenizer.json").read_text())
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    special = {t["content"] for t in tok["added_tokens"]}
    u32 = mx.uint32
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": mx.array(cfg["hidden_size"], dtype=u32),
        "llama.feed_forward_length": mx.array(cfg["intermediate_size"], dtype=u32),
        "llama.block_count": mx.array(cfg["num_hidden_layers"], dtype=u32),
        "llama.attention.head_count": mx.array(h, dtype=u32),
        "llama.attention.head_count_kv": mx.array(kv, dtype=u32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5),
        "llama.rope.freq_base": mx.array(cfg["rope_theta"]),
        "llama.context_length": mx.array(2048, dtype=u32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array([3 if t in special else 1 for t in tokens]),
        "tokenizer.ggml.merges": [" ".join(m) for m in tok["model"]["merges"]],
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=u32),
        "tokenizer.ggml.padding_token_id": mx.array(0, dtype=u32),
        "tokenizer.chat_template": models.CHATML_TEMPLATE,
    }
    mx.save_gguf(str(path), weights, meta)


def test_gguf_conversion_reproduces_the_model(tiny: Path, tmp_path: Path) -> None:
    from mlx_lm import load

    _gguf_from(tiny, tmp_path / "tiny.gguf")
    out = gguf.convert(tmp_path / "tiny.gguf", tmp_path / "converted", dtype="float32")
    cfg = models.model_config(out)
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-5
    assert cfg["eos_token_id"] == 2 and cfg["vocab_size"] == 512

    ref_model, ref_tok = load(str(tiny))
    model, tok = load(str(out))
    text = "The old man said that the weather would change soon, in 1650."
    assert tok.encode(text) == ref_tok.encode(text)
    messages = [{"role": "user", "content": "Hello there"}]
    assert tok.apply_chat_template(messages) == ref_tok.apply_chat_template(messages)
    ids = mx.array([ref_tok.encode(text)])
    np.testing.assert_allclose(np.array(model(ids)), np.array(ref_model(ids)), atol=1e-5)


def test_unpermute_inverts_llama_cpp() -> None:
    from mlx_lm.gguf import permute_weights

    w = mx.arange(12 * 8 * 3, dtype=mx.float32).reshape(12 * 8, 3)
    assert mx.array_equal(gguf.unpermute(permute_weights(w, 12), 12), w)
    assert not mx.array_equal(permute_weights(w, 12), w)
    assert gguf.hf_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert gguf.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf.hf_name("rope_freqs.weight") is None


def test_smollm2_converts_and_answers(tmp_path: Path) -> None:
    from mlx_lm import generate

    home = tmp_path / "home"
    path = resolve_model(models.DEFAULT_MODEL, home, (home,))
    model, tok = load_model(path)
    cfg = models.model_config(path)
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert param_count(model) == 134_515_008

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert "Paris" in generate(model, tok, prompt, max_tokens=12)

    text = (
        "The city council met on Tuesday evening to discuss the budget for the coming year. "
        "Several residents spoke about the need for better roads and more frequent buses, "
        "while others asked the council to keep taxes low."
    )
    ids = mx.array([tok.encode(text)])
    loss = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="mean")
    assert 1.5 < loss.item() < 3.5
