"""The SFT trainer end to end on a tiny llama, and the export trainer on its results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.utils import load

from services.runtime import adapters, checkpoints, datasets, models
from services.runtime.contract import JobContext, Report
from services.runtime.errors import InvalidArgument
from services.runtime.loop import evaluate
from services.training.trainers import export, sft

TEXT = [
    "The garden was quiet in the evening. Bees moved between the flowers.",
    "The morning train left the station at seven, and most passengers slept.",
    "Mix the dry things first, then add the milk slowly and stir until smooth.",
    "Question: What is the capital of France? Answer: The capital is Paris.",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama with embeddings scaled up 8x: at the default init (std 0.02)
    its tied output layer is too flat for adapters on the blocks to move the loss much."""
    root = tmp_path_factory.mktemp("models")
    tiny = models.build_tiny_model(root / "tiny")
    sharp = root / "tiny-sharp"
    shutil.copytree(tiny, sharp)
    weights = mx.load(str(sharp / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 8
    mx.save_safetensors(str(sharp / "model.safetensors"), weights, metadata={"format": "mlx"})
    return sharp


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": TEXT[i % len(TEXT)]} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(base: Path, data: Path, method: str, **loop) -> dict:
    return {
        "model": {"model": str(base)},
        "dataset": {"path": str(data), "valid_fraction": 0.2},
        "method": method,
        "lora": {"rank": 8, "num_layers": -1},
        "optimizer": {"learning_rate": 3e-3 if method == "full" else 1e-2, "warmup_steps": 2},
        "loop": {
            "batch_size": 4,
            "max_steps": 24,
            "steps_per_report": 4,
            "steps_per_eval": 12,
            "steps_per_checkpoint": 12,
            **loop,
        },
    }


_RUNS: dict[str, tuple] = {}


def trained(base: Path, data: Path, out: Path, method: str):
    """Train once per method per module; returns (final CheckpointInfo, reports, config)."""
    if method not in _RUNS:
        reports: list[Report] = []
        ctx = JobContext(job_id=f"job-{method}", output_dir=out / method, report=reports.append)
        cfg = config(base, data, method)
        _RUNS[method] = (sft.run(cfg, ctx), reports, cfg)
    return _RUNS[method]


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _RUNS.clear()
    return tmp_path_factory.mktemp("runs")


def _val_loss(model: nn.Module, tokenizer, cfg: dict) -> float:
    """The validation loss of a loaded model on the trainer's validation split."""
    parsed = sft.SFTConfig.from_dict(cfg)
    prepared = datasets.prepare(
        parsed.dataset.to_dict(),
        tokenizer,
        allowed_formats=sft.FORMATS,
        max_seq_length=parsed.loop.max_seq_length,
        mask_prompt=None,
        seed=0,
    )
    batches = prepared.batches("valid", 4, seed=0, shuffle=False, sort_chunk=sft.SORT_CHUNK)
    return evaluate(model, sft.loss_fn, batches, -1)


@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora"])
def test_loss_falls_and_result_loads_in_mlx_lm(base, data, out, method) -> None:
    final, reports, cfg = trained(base, data, out, method)
    before, first, last = reports[0].metrics, reports[1].metrics, reports[-1].metrics
    print(method, "train_loss", round(first["train_loss"], 3), "->", round(last["train_loss"], 3))
    untrained = _val_loss(*models.load_model(str(base)), cfg)
    print(method, "val_loss untrained", round(untrained, 3), "->", round(last["val_loss"], 3))
    # The step-0 report is the validation of the untouched model (QLoRA: once quantised).
    assert reports[0].step == 0 and "train_loss" not in before
    if method != "qlora":
        assert before["val_loss"] == pytest.approx(untrained, rel=1e-4)
    assert last["train_loss"] < first["train_loss"] - 1.0
    assert last["val_loss"] < untrained - 1.0
    assert reports[-1].step == 24 and reports[-1].total_steps == 24

    assert final.path == out / method / "final" and final.step == 24
    for key in ("train_loss", "val_loss", "val_ppl", "tokens", "tokens_per_second"):
        assert key in final.metrics, key
    assert final.metrics["val_loss"] == pytest.approx(last["val_loss"])
    checkpoints.verify(final.path)
    assert not (final.path / "trainer_state").exists()
    saved = checkpoints.list_checkpoints(out / method)
    assert [p.name for p in saved] == ["step_0000012", "step_0000024"]

    if method == "full":
        assert final.kind == "full"
        model, tokenizer = load(str(final.path))
    else:
        assert final.kind == "adapter" and final.base_model == str(base)
        adapter_cfg = json.loads((final.path / "adapter_config.json").read_text())
        assert adapter_cfg["base_model"] == str(base)
        assert adapter_cfg["fine_tune_type"] == ("dora" if method == "dora" else "lora")
        model, tokenizer = load(adapter_cfg["base_model"], adapter_path=str(final.path))
    steps = list(stream_generate(model, tokenizer, "The garden was", max_tokens=8))
    assert 1 <= len(steps) <= 8 and all(0 <= r.token < 512 for r in steps)
    if method != "qlora":  # a QLoRA adapter loads onto the full-precision base here
        assert _val_loss(model, tokenizer, cfg) == pytest.approx(last["val_loss"], abs=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fuse_equals_base_plus_adapter(base, data, out, tmp_path, method) -> None:
    final, _, _ = trained(base, data, out, method)
    ctx = JobContext(job_id="export", output_dir=tmp_path)
    spec = {"model": {"model": str(base), "adapter_path": str(final.path)}, "mode": "fuse"}
    info = export.run(spec, ctx)
    assert info.path == tmp_path / "final" and info.kind == "full"
    assert info.metrics["fused_layers"] == 14  # 7 linear layers x 2 blocks
    fused, _ = load(str(info.path))
    adapted, tokenizer = load(str(base), adapter_path=str(final.path))
    plain, _ = load(str(base))
    ids = mx.array([tokenizer.encode(TEXT[0])])
    assert mx.allclose(fused(ids), adapted(ids), atol=1e-4)
    assert not mx.allclose(plain(ids), adapted(ids), atol=1e-2)  # the adapter matters
    assert not any(hasattr(m, "lora_a") for _, m in fused.named_modules())


def test_quantize_then_dequantize(base, tmp_path) -> None:
    q = export.run(
        {"model": {"model": str(base)}, "mode": "quantize", "quantization": {"bits": 8}},
        JobContext(job_id="q", output_dir=tmp_path / "q"),
    )
    q_cfg = json.loads((q.path / "config.json").read_text())
    assert q_cfg["quantization"]["bits"] == 8 and q_cfg["quantization"]["group_size"] == 64
    qmodel, tokenizer = load(str(q.path))
    assert adapters.is_quantized(qmodel)
    plain, _ = load(str(base))
    ids = mx.array([tokenizer.encode(TEXT[1])])
    assert mx.allclose(qmodel(ids), plain(ids), atol=0.5)  # 8-bit stays close

    d = export.run(
        {"model": {"model": str(q.path)}, "mode": "dequantize"},
        JobContext(job_id="d", output_dir=tmp_path / "d"),
    )
    assert "quantization" not in json.loads((d.path / "config.json").read_text())
    dmodel, _ = load(str(d.path))
    assert not adapters.is_quantized(dmodel)
    assert mx.allclose(dmodel(ids), qmodel(ids), atol=1e-4)
    with pytest.raises(Exception, match="not quantized"):
        export.run(
            {"model": {"model": str(d.path)}, "mode": "dequantize"},
            JobContext(job_id="e", output_dir=tmp_path / "e"),
        )
    assert not (tmp_path / "e" / "final").exists()


def test_config_defaults_and_errors(base, data) -> None:
    lora = sft.SFTConfig.from_dict({"model": {"model": "m"}, "dataset": {"path": "d"}})
    assert lora.method == "lora" and lora.optimizer.learning_rate == 1e-4
    assert lora.lora.rank == 8 and lora.lora.scale == 20.0 and lora.lora.num_layers == 16
    assert lora.quantization.bits == 4 and lora.dataset.valid_fraction == 0.1
    assert lora.loop.batch_size == 4 and lora.optimizer.schedule == "cosine"
    assert sft.SFTConfig.from_dict(lora.to_dict()) == lora
    full = sft.SFTConfig.from_dict(
        {"model": {"model": "m"}, "dataset": {"path": "d"}, "method": "full"}
    )
    assert full.optimizer.learning_rate == 1e-5
    with pytest.raises(InvalidArgument, match="spec.loop.bogus"):
        sft.SFTConfig.from_dict({**config(base, data, "lora"), "loop": {"bogus": 1}}, prefix="spec")
    with pytest.raises(InvalidArgument, match="spec.method"):
        sft.SFTConfig.from_dict({**config(base, data, "lora"), "method": "ia3"}, prefix="spec")
    with pytest.raises(InvalidArgument, match="spec.dataset.path"):
        sft.SFTConfig.from_dict({"model": {"model": "m"}}, prefix="spec")


def test_lora_keys_matching_nothing_is_an_error(base) -> None:
    model, _ = models.load_model(str(base))
    bad = adapters.LoraSettings.from_dict({"keys": ["no_such.layer"]})
    with pytest.raises(InvalidArgument, match="spec.lora.keys"):
        adapters.apply(model, "lora", bad)
    qmodel, _ = models.load_model(str(base))
    models.quantize(qmodel, 4, 64)
    with pytest.raises(InvalidArgument, match="full fine-tuning needs an unquantized model"):
        adapters.apply(qmodel, "full", adapters.LoraSettings())


def test_continue_from_an_adapter_loads_its_weights(base, tmp_path) -> None:
    model, _ = models.load_model(str(base))
    cfg = adapters.apply(model, "lora", adapters.LoraSettings.from_dict({"rank": 4}))
    trained_weights = {k: v + 0.5 for k, v in adapters.adapter_weights(model).items()}
    model.load_weights(list(trained_weights.items()), strict=False)
    adapters.save_adapter(tmp_path, model, cfg)
    again, _ = models.load_model(str(base))
    cfg2 = adapters.apply(again, "lora", adapters.LoraSettings(), init_adapter=tmp_path)
    assert cfg2["lora_parameters"]["rank"] == 4  # the adapter's own layout wins
    for k, v in adapters.adapter_weights(again).items():
        assert mx.array_equal(v, trained_weights[k]), k
    with pytest.raises(InvalidArgument, match="adapter_path"):
        adapters.apply(
            models.load_model(str(base))[0], "dora", adapters.LoraSettings(), init_adapter=tmp_path
        )


@pytest.mark.parametrize("rows_per_chunk", [3, 1000])
def test_cross_entropy_is_fp32_for_bf16_logits(monkeypatch, rows_per_chunk: int) -> None:
    monkeypatch.setattr(sft, "EXACT_HALF_LOGSUMEXP", True)
    monkeypatch.setattr(sft, "CE_CHUNK_ELEMENTS", 300 * rows_per_chunk)
    mx.random.seed(0)
    logits = (mx.random.normal((2, 5, 300)) * 4).astype(mx.bfloat16)
    targets = mx.random.randint(0, 300, (2, 5))
    ref = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    ours = sft.cross_entropy(logits, targets)
    assert ours.dtype == mx.float32
    assert mx.allclose(ours, ref, atol=1e-5)

    def f(x, fn):
        return fn(x, targets).sum()

    g_ours = mx.grad(lambda x: f(x, sft.cross_entropy))(logits.astype(mx.float32))
    g_ref = mx.grad(lambda x: f(x, nn.losses.cross_entropy))(logits.astype(mx.float32))
    assert mx.allclose(g_ours, g_ref, atol=1e-6)
    assert mx.grad(lambda x: f(x, sft.cross_entropy))(logits).dtype == mx.bfloat16
    compiled = mx.compile(mx.value_and_grad(lambda x: f(x, sft.cross_entropy)))
    value, grad = compiled(logits.astype(mx.float32))
    assert float(value) == pytest.approx(float(ref.sum()), rel=1e-6)
    assert mx.allclose(grad, g_ref, atol=1e-6)


def test_cross_entropy_half_default_is_close_and_memory_light() -> None:
    """By default (EXACT_HALF_LOGSUMEXP False) bf16 logits give mlx-lm's precision: the
    per-token logsumexp rounded to bf16, the mean and the gradient still close to fp32."""
    assert sft.EXACT_HALF_LOGSUMEXP is False
    mx.random.seed(1)
    logits = (mx.random.normal((4, 32, 500)) * 3).astype(mx.bfloat16)
    targets = mx.random.randint(0, 500, (4, 32))
    ref = nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    ours = sft.cross_entropy(logits, targets)
    assert ours.dtype == mx.float32
    assert float(mx.abs(ours - ref).max()) < 0.07  # half a bf16 ulp at |lse| < 16
    assert float(ours.mean()) == pytest.approx(float(ref.mean()), abs=5e-3)
    g = mx.grad(lambda x: sft.cross_entropy(x, targets).sum())(logits)
    g_ref = mx.grad(lambda x: nn.losses.cross_entropy(x, targets).sum())(logits.astype(mx.float32))
    assert g.dtype == mx.bfloat16
    assert float(mx.abs(g.astype(mx.float32) - g_ref).max()) < 0.03
    # rows of the gradient sum to ~0 (softmax - onehot): the normalisation survived bf16
    assert float(mx.abs(g.astype(mx.float32).sum(-1)).max()) < 0.05
