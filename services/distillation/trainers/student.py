"""The student side: hidden states layer by layer, feature projections, and student init.

`hidden_states` runs an mlx-lm llama-family model block by block (embed -> layers -> norm) so
that intermediate layers can be read without patching any model class; `logits` applies the
head. `init_student` writes a smaller copy of a teacher that keeps a subset of its layers, as a
plain mlx-lm model directory the trainer then distils into.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask

from services.runtime.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from services.runtime.data_batches import Tokenized, bucket_for

PROJECTIONS_FILE = "projections.safetensors"
# The student's attribute holding the feature projections while it trains.
PROJ = "kd_projections"


# --- forward, block by block -------------------------------------------------------------------


def trunk(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(
            f"model type {getattr(model, 'model_type', type(model).__name__)!r} is not a "
            "llama-family model (embed_tokens -> layers -> norm); feature distillation and "
            "student init need one"
        )
    return inner


def num_layers(model: nn.Module) -> int:
    return len(trunk(model).layers)


def hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "args", None), "hidden_size", None)
    return int(size) if size else int(trunk(model).norm.weight.shape[-1])


def hidden_states(
    model: nn.Module, inputs: mx.array, capture: Sequence[int] = ()
) -> tuple[mx.array, dict[int, mx.array]]:
    """Final normed hidden states [B, L, H] and the outputs of the blocks in `capture`.

    Same computation as mlx-lm's LlamaModel.__call__ without a cache: one causal mask (and one
    sliding-window mask for models that mix window and full attention layers).
    """
    inner = trunk(model)
    h = inner.embed_tokens(inputs)
    full = create_attention_mask(h, None)
    window = getattr(inner, "sliding_window", None)
    swa = create_attention_mask(h, None, window_size=window) if window else None
    wanted = set(capture)
    captured: dict[int, mx.array] = {}
    for i, layer in enumerate(inner.layers):
        mask = swa if getattr(layer, "use_sliding", False) and swa is not None else full
        h = layer(h, mask, cache=None)
        if i in wanted:
            captured[i] = h
    return inner.norm(h), captured


def logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """The LM head on final hidden states (tied embeddings or `lm_head`), as model(x) does."""
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    return trunk(model).embed_tokens.as_linear(hidden)


def blockwise_ok(model: nn.Module) -> bool:
    """Whether `logits(hidden_states(x))` reproduces `model(x)`: true for the llama layout;
    false for families that add to it (embedding scales, logit soft-capping, ...), which are
    then distilled from their full logits (no feature matching, less memory saving)."""
    try:
        trunk(model)
    except ValueError:
        return False
    x = mx.array([[1, 2, 3, 4, 5, 6]])
    want = model(x).astype(mx.float32)
    got = logits(model, hidden_states(model, x)[0]).astype(mx.float32)
    return bool(mx.allclose(got, want, rtol=1e-2, atol=1e-2 * (1.0 + mx.abs(want).max().item())))


def forward(
    model: nn.Module, inputs: mx.array, capture: Sequence[int] = (), blockwise: bool = True
) -> tuple[mx.array, dict[int, mx.array]]:
    """(final hidden states, captured blocks) — or (full logits, {}) when not blockwise."""
    return hidden_states(model, inputs, capture) if blockwise else (model(inputs), {})


def head(model: nn.Module, h: mx.array, blockwise: bool = True) -> mx.array:
    return logits(model, h) if blockwise else h


def head_module(model: nn.Module) -> nn.Module:
    """The module that owns the head weights (for gradient checkpointing of the loss)."""
    return model.lm_head if hasattr(model, "lm_head") else trunk(model).embed_tokens


# --- layer maps and projections ----------------------------------------------------------------


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block i -> teacher block round((i + 1) * Lt / Ls) - 1: the last blocks align."""
    return [
        (i, max(0, round((i + 1) * teacher_layers / student_layers) - 1))
        for i in range(student_layers)
    ]


def evenly_spaced(n: int, total: int) -> list[int]:
    """`n` layer indices spread over `total`, first and last included."""
    if not 1 <= n <= total:
        raise ValueError(f"cannot keep {n} of {total} layers")
    if n == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


class Projections(nn.Module):
    """One learned Linear(student_hidden -> teacher_hidden) per mapped student layer, or the
    identity when the sizes agree (then there is nothing to learn or to save)."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.identity = student_hidden == teacher_hidden
        self.layers = (
            []
            if self.identity
            else [nn.Linear(student_hidden, teacher_hidden, bias=False) for _ in self.pairs]
        )

    def __call__(self, k: int, h: mx.array) -> mx.array:
        return h if self.identity else self.layers[k](h)

    def save(self, directory: Path, prefix: str = "") -> Path | None:
        """Write the projections (keys under `prefix`) beside a checkpoint's model files."""
        if self.identity:
            return None
        path = Path(directory) / PROJECTIONS_FILE
        meta = {"pairs": json.dumps(self.pairs), "note": "training-only; not part of the model"}
        weights = {prefix + k: v for k, v in tree_flatten(self.parameters())}
        mx.save_safetensors(str(path), weights, metadata=meta)
        return path


# --- on-policy completions ---------------------------------------------------------------------


def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[list[int]]:
    """Student-generated completions (mlx-lm batched generation, dropout off), ending with EOS
    when the model stopped by itself. Sampling is seeded, so a resumed run regenerates them."""
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    training = model.training
    model.eval()
    try:
        out = batch_generate(
            model,
            tokenizer,
            prompts,
            max_tokens=max_new_tokens,
            sampler=make_sampler(temp=temperature),
            return_token_ids=True,
        )
    finally:
        if training:
            model.train()
    eos = tokenizer.eos_token_id
    return [
        list(ids) + ([eos] if eos is not None and len(ids) < max_new_tokens else [])
        for ids in out.token_ids
    ]


# --- student init ------------------------------------------------------------------------------

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def init_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    *,
    keep_layers: Sequence[int] = (),
    num_layers: int = 0,
) -> tuple[Path, list[int]]:
    """Copy `teacher_dir` (an mlx-lm directory) keeping only some transformer blocks.

    `keep_layers` are teacher block indices (kept in ascending order), or `num_layers` evenly
    spaced ones. Embeddings, final norm and head are copied as they are; quantized teachers stay
    quantized. The copy is written to a temp dir and renamed, so a reader never sees half of it.
    Returns the directory and the kept teacher indices (student block i = teacher keep[i]).
    """
    from mlx_lm.utils import load_config, load_model, save_config, save_model

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    config = load_config(teacher_dir)
    total = int(config["num_hidden_layers"])
    keep = (
        sorted(set(int(i) for i in keep_layers))
        if keep_layers
        else evenly_spaced(num_layers, total)
    )
    if not keep or keep[0] < 0 or keep[-1] >= total:
        raise ValueError(f"keep_layers {keep} out of range for a {total}-layer teacher")
    model, _ = load_model(teacher_dir, lazy=True, strict=True)
    inner = trunk(model)
    inner.layers = [inner.layers[i] for i in keep]
    if hasattr(inner, "num_hidden_layers"):
        inner.num_hidden_layers = len(keep)
    for name in ("layer_types",):
        if isinstance(config.get(name), list) and len(config[name]) == total:
            config[name] = [config[name][i] for i in keep]
            if hasattr(inner, name):
                setattr(inner, name, config[name])
    config["num_hidden_layers"] = len(keep)
    config["mlxu_student_init"] = {"teacher": str(teacher_dir), "kept_teacher_layers": keep}

    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, donate_model=False)
    save_config(config, config_path=tmp / "config.json")
    for name in _TOKENIZER_FILES:
        if (teacher_dir / name).exists():
            shutil.copy2(teacher_dir / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir, keep


@dataclass
class OnPolicy:
    """GKD's on-policy batches: the prompts of the batch rows completed by the student."""

    fraction: float
    model: Any
    tokenizer: Any
    items: list[Tokenized]
    max_new_tokens: int
    temperature: float
    pad_id: int
    max_seq_length: int

    def replace(self, rows: list[int], seed: int) -> dict:
        """A new batch for item indices `rows` (-1 = padding row): prompt + sampled completion,
        the loss on the completion."""
        prompts = {i: self.prompt(self.items[i]) for i in rows if i >= 0}
        order = list(prompts)
        gens = sample_completions(
            self.model,
            self.tokenizer,
            [prompts[i] for i in order],
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            seed=seed % 2**63,
        )
        done = dict(zip(order, gens, strict=True))
        seqs = [
            Tokenized((prompts[i] + done[i])[: self.max_seq_length], len(prompts[i]))
            if i >= 0
            else None
            for i in rows
        ]
        return collate(seqs, self.pad_id, self.max_seq_length)

    @staticmethod
    def prompt(item: Tokenized) -> list[int]:
        # Text rows have no prompt: the first half of the row prompts the student.
        n = item.prompt_len if item.prompt_len > 0 else max(1, len(item.tokens) // 2)
        return list(item.tokens[:n])


def collate(seqs: list[Tokenized | None], pad_id: int, msl: int) -> dict:
    """The batch layout of services.runtime.data_batches for in-memory sequences."""
    length = bucket_for(min(max((len(s.tokens) for s in seqs if s), default=2), msl), msl)
    toks = np.full((len(seqs), length + 1), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.float32)
    for r, s in enumerate(seqs):
        if s is not None:
            toks[r, : len(s.tokens)] = s.tokens
            mask[r, max(s.prompt_len, 1) - 1 : len(s.tokens) - 1] = 1.0
    return {
        "inputs": mx.array(toks[:, :-1]),
        "targets": mx.array(toks[:, 1:]),
        "loss_mask": mx.array(mask),
        "ntokens": int(mask.sum()),
    }


# --- saving the student ------------------------------------------------------------------------


def writer(
    model: nn.Module,
    tokenizer: Any,
    adapter_config: dict | None,
    model_config: dict,
    *,
    with_projections: bool,
) -> Callable[[Path], None]:
    """write(dir) for checkpoints: an mlx-lm adapter dir (adapter_config given) or a full model
    dir. The projections (model[PROJ]) never go into the model files: checkpoints get them as
    projections.safetensors (for exact resume), the final export not at all."""

    def write(tmp: Path) -> None:
        def plain(tree: dict) -> dict:
            return {k: v for k, v in tree_flatten(tree) if not k.startswith(PROJ + ".")}

        if adapter_config is not None:
            mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), plain(model.trainable_parameters()))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        else:
            from mlx_lm.utils import save_config

            weights = plain(model.parameters())
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "mlx"})
            save_config(dict(model_config), config_path=tmp / "config.json")
            tokenizer.save_pretrained(str(tmp))
        if with_projections and PROJ in model:
            model[PROJ].save(tmp, prefix=PROJ + ".")

    return write
