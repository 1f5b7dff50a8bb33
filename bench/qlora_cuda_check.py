"""Where does QLoRA's NaN on CUDA come from (docs/parity.md, "QLoRA on CUDA")?

Quantized matmul against the dequantized one, forward and backward, per dtype, group size and
shape (each line says how long its case took: on CUDA every new quantized kernel is
JIT-compiled), then one tiny QLoRA step per setting: loss and whether any gradient is NaN.

    python3 bench/qlora_cuda_check.py        # on the GPU machine (see docs/benchmarks.md)
"""

# ruff: noqa: E402, I001 - `import services` must come first: it loads the BLAS before mlx.core.
from __future__ import annotations

import services  # noqa: F401

import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from services.runtime import adapters, models
from services.runtime.model_build import build_tiny_model
from services.schema.common import LoraSettings, QuantizationSettings
from services.training.trainers import sft

SHAPES = ((64, 64), (128, 64), (1536, 576), (576, 1536))
TINY = ((64, "bfloat16", 64), (64, "float32", 64), (64, "bfloat16", 32), (256, "bfloat16", 64))


def _f32_max_gap(a: mx.array, b: mx.array) -> float:
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def kernel_case(dt: mx.Dtype, gs: int, n: int, k: int) -> str:
    w = (mx.random.normal((n, k)) * 0.05).astype(dt)
    x = mx.random.normal((8, k)).astype(dt)
    qw, s, b = mx.quantize(w, group_size=gs, bits=4)

    def quantized(x_: mx.array) -> mx.array:
        return mx.quantized_matmul(x_, qw, s, b, transpose=True, group_size=gs, bits=4)

    def dense(x_: mx.array) -> mx.array:
        return x_ @ mx.dequantize(qw, s, b, group_size=gs, bits=4).T

    yq, yd = quantized(x), dense(x)
    gq = mx.grad(lambda x_: quantized(x_).astype(mx.float32).sum())(x)
    gd = mx.grad(lambda x_: dense(x_).astype(mx.float32).sum())(x)
    mx.eval(yq, yd, gq, gd)
    return (
        f"fwd |q-d| {_f32_max_gap(yq, yd):.3g} nan {mx.isnan(yq).any().item()}  "
        f"bwd |q-d| {_f32_max_gap(gq, gd):.3g} nan {mx.isnan(gq).any().item()}"
    )


def tiny_step(tmp: Path, hidden: int, dtype: str, gs: int) -> str:
    path = build_tiny_model(
        tmp / f"m{hidden}", hidden_size=hidden, intermediate_size=2 * hidden, num_kv_heads=2
    )
    model, _ = models.load_model(str(path), None, dtype, field="m")
    lora = LoraSettings(rank=8, scale=20.0, num_layers=-1)
    adapters.apply(model, "qlora", lora, QuantizationSettings(bits=4, group_size=gs))
    x = mx.random.randint(0, 512, (2, 32))
    batch = {"inputs": x, "targets": x, "loss_mask": mx.ones((2, 32))}
    logits = model(x)
    (loss, _, _), grads = nn.value_and_grad(model, lambda m: sft.loss_fn(m, batch))(model)
    mx.eval(logits, loss, grads)
    flat = tree_flatten(grads)
    bad = [k for k, v in flat if mx.isnan(v).any().item()]
    return (
        f"logits nan {mx.isnan(logits).any().item()}; loss {loss.item():.4f}; "
        f"NaN gradients {len(bad)}/{len(flat)} {bad[:3]}"
    )


def main() -> None:
    print("device", mx.default_device(), flush=True)
    mx.random.seed(0)
    for dt in (mx.float32, mx.bfloat16, mx.float16):
        for gs in (32, 64):
            for n, k in SHAPES:
                t = time.perf_counter()
                try:
                    said = kernel_case(dt, gs, n, k)
                except Exception as e:  # noqa: BLE001 - a diagnosis prints every failure
                    said = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"{dt} g{gs} {n}x{k}: {said}  ({time.perf_counter() - t:.1f} s)", flush=True)
    tmp = Path(tempfile.mkdtemp())
    for hidden, dtype, gs in TINY:
        print(f"tiny qlora hidden {hidden} {dtype} g{gs}: {tiny_step(tmp, hidden, dtype, gs)}")


if __name__ == "__main__":
    main()
