"""The shared training loop: accumulation, exact resume, stop, NaN, reporting, optimizers."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs

from services.runtime import adapters, checkpoints
from services.runtime.contract import Interrupted, JobContext, Report
from services.runtime.data_batches import Batches, Tokenized
from services.runtime.errors import InvalidArgument
from services.runtime.loop import (
    Artifact,
    LoopSettings,
    NonFiniteLoss,
    enable_grad_checkpoint,
    total_steps,
    train,
)
from services.runtime.optim import OPTIMIZERS, OptimizerSettings, build_lr_schedule, build_optimizer

VOCAB = 64


def tiny_llama(seed: int = 0) -> Model:
    mx.random.seed(seed)
    args = ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
    )
    model = Model(args)
    # Sharper embeddings than the default init, so a few steps move the loss visibly.
    model.model.embed_tokens.weight = model.model.embed_tokens.weight * 4
    mx.eval(model.parameters())
    return model


def items(n: int = 16, seed: int = 0) -> list[Tokenized]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(8, 40))
        # A learnable pattern: an arithmetic sequence mod VOCAB from a random start.
        start, stride = int(rng.integers(0, VOCAB)), int(rng.integers(1, 4))
        tokens = [(start + stride * i) % VOCAB for i in range(length)]
        out.append(Tokenized(tokens, prompt_len=int(rng.integers(0, 4))))
    return out


def batches(micro: int, seed: int = 0, data: list[Tokenized] | None = None) -> Batches:
    return Batches(data or items(), micro, pad_id=0, max_seq_length=64, seed=seed)


def loss_fn(model: nn.Module, batch: dict[str, mx.array]):
    logits = model(batch["inputs"]).astype(mx.float32)
    mask = batch["loss_mask"]
    ce = nn.losses.cross_entropy(logits, batch["targets"]) * mask
    ntoks = mask.sum()
    acc = ((logits.argmax(-1) == batch["targets"]) * mask).sum() / ntoks
    return ce.sum() / ntoks, ntoks, {"accuracy": acc}


def artifact(model: nn.Module) -> Artifact:
    def write(d: Path) -> None:
        weights = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(d / "model.safetensors"), weights)

    return Artifact(kind="full", write=write, base_model="tiny", config={"test": True})


def context(out: Path, reports: list[Report], **kw) -> JobContext:
    return JobContext(job_id="job", output_dir=out, report=reports.append, **kw)


def settings(**kw) -> LoopSettings:
    base = {"batch_size": 4, "max_steps": 8, "steps_per_report": 1, "steps_per_eval": -1}
    return LoopSettings.from_dict({**base, **kw})


def losses(reports: list[Report]) -> dict[int, float]:
    return {r.step: r.metrics["train_loss"] for r in reports}


def test_loss_falls_and_metrics_are_reported(tmp_path: Path) -> None:
    model, reports = tiny_llama(), []
    loop = settings(max_steps=20, steps_per_report=5, steps_per_eval=10, val_batches=2)
    opt = OptimizerSettings.from_dict({"learning_rate": 3e-3, "warmup_steps": 2})
    valid = Batches(items(8, seed=1), 4, pad_id=0, max_seq_length=64, seed=0, shuffle=False)
    ctx = context(tmp_path, reports)
    result = train(
        model, loss_fn, batches(4), valid, loop, opt, ctx, artifact(model), perplexity=True
    )
    # Step 0 is the validation of the starting weights: the "before" figure, nothing trained.
    assert [r.step for r in reports] == [0, 5, 10, 15, 20]
    before, first, last = reports[0].metrics, reports[1].metrics, reports[-1].metrics
    assert set(before) == {"val_loss", "val_accuracy", "val_ppl"}, before
    assert last["train_loss"] < first["train_loss"] - 0.5, (first, last)
    assert last["val_loss"] < before["val_loss"]
    # train_* are means over training batches, val_* the same loss_fn on the validation set.
    for key in ("learning_rate", "tokens_per_second", "peak_memory_gb", "train_accuracy"):
        assert key in last, key
    assert "accuracy" not in last and "val_accuracy" in last
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    # transformers' cosine: update 19 of 20 (warmup 2) still moves the weights.
    assert last["learning_rate"] == pytest.approx(
        3e-3 * 0.5 * (1 + math.cos(math.pi * 17 / 18)), rel=1e-5
    )
    assert reports[-1].tokens == result.metrics["tokens"] > 0
    assert reports[1].eta_seconds > 0 and reports[-1].eta_seconds == 0
    assert result.step == 20 and result.checkpoint is not None
    assert result.checkpoint.path == tmp_path / "checkpoints" / "step_0000020"
    print("loss", first["train_loss"], "->", last["train_loss"], "val", last["val_loss"])


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    # SGD's update is linear in the gradient, so this compares the gradients themselves.
    def one_step(accum: int) -> dict[str, mx.array]:
        model = tiny_llama()
        loop = settings(max_steps=1, grad_accumulation_steps=accum)
        opt = OptimizerSettings.from_dict(
            {"name": "sgd", "learning_rate": 0.1, "schedule": "constant"}
        )
        # Micro-batches of 2 then 4 rows come from the same epoch permutation.
        data = batches(loop.micro_batch_size)
        train(
            model,
            loss_fn,
            data,
            None,
            loop,
            opt,
            context(tmp_path / str(accum), []),
            artifact(model),
        )
        return dict(tree_flatten(model.parameters()))

    big, accumulated = one_step(1), one_step(2)
    start = dict(tree_flatten(tiny_llama().parameters()))
    moved = max(float(mx.abs(big[k] - start[k]).max()) for k in big)
    assert moved > 1e-3  # the step did something
    for k in big:
        assert mx.allclose(big[k], accumulated[k], atol=1e-5, rtol=1e-4), k


def _lora_model(lora_seed: int = 0) -> Model:
    model = tiny_llama()
    mx.random.seed(lora_seed)
    lora = adapters.LoraSettings.from_dict({"rank": 4, "dropout": 0.2, "num_layers": -1})
    adapters.apply(model, "lora", lora)
    return model


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """8 steps with a checkpoint at 4 == resume from that checkpoint for steps 5..8 (LoRA with
    dropout, accumulation, warmup + cosine: RNG, data position and optimizer state all count)."""
    loop = settings(grad_accumulation_steps=2, steps_per_checkpoint=4, keep_last_checkpoints=-1)
    opt = OptimizerSettings.from_dict({"learning_rate": 1e-2, "warmup_steps": 3})

    model, full = _lora_model(), []
    train(
        model, loss_fn, batches(2), None, loop, opt, context(tmp_path / "a", full), artifact(model)
    )
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000004"
    assert checkpoints.read_manifest(ckpt)["step"] == 4

    resumed_model, resumed = _lora_model(lora_seed=1), []  # other LoRA init: the checkpoint wins
    ctx = context(tmp_path / "b", resumed, resume_from=ckpt)
    result = train(
        resumed_model, loss_fn, batches(2), None, loop, opt, ctx, artifact(resumed_model)
    )
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [5, 6, 7, 8] and result.step == 8
    print("uninterrupted", [round(a[s], 6) for s in range(5, 9)])
    print("resumed      ", [round(b[s], 6) for s in range(5, 9)])
    for step in range(5, 9):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert a[8] != a[5]  # the run trains: equal numbers are not a constant
    for (k, v), (_, w) in zip(
        tree_flatten(model.trainable_parameters()),
        tree_flatten(resumed_model.trainable_parameters()),
        strict=True,
    ):
        assert mx.allclose(v, w, atol=1e-6), k


def test_should_stop_saves_then_interrupts(tmp_path: Path) -> None:
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    model, reports = tiny_llama(), []
    ctx = context(tmp_path, reports, should_stop=stop)
    with pytest.raises(Interrupted):
        train(
            model, loss_fn, batches(4), None, settings(), OptimizerSettings(), ctx, artifact(model)
        )
    latest = checkpoints.latest(tmp_path)
    assert latest == tmp_path / "checkpoints" / "step_0000003"
    state = (latest / "trainer_state" / "state.json").read_text()
    assert '"step": 3' in state
    assert (latest / "trainer_state" / "optimizer.safetensors").is_file()
    checkpoints.verify(latest)


class Poisoned:
    """Batches whose third batch turns the loss into NaN."""

    def __init__(self, inner: Batches) -> None:
        self.inner, self.steps_per_epoch = inner, inner.steps_per_epoch

    def state(self) -> dict:
        return self.inner.state()

    def restore(self, state: dict) -> None:
        self.inner.restore(state)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == 2:
                batch["loss_mask"] = batch["loss_mask"] * float("nan")
            yield batch


def test_nan_loss_fails_clearly_without_a_checkpoint(tmp_path: Path) -> None:
    data = Poisoned(batches(4))
    model = tiny_llama()
    loop = settings(steps_per_checkpoint=1)
    with pytest.raises(NonFiniteLoss, match="loss became NaN at step 3; lower the learning rate"):
        train(
            model,
            loss_fn,
            data,
            None,
            loop,
            OptimizerSettings(),
            context(tmp_path, []),
            artifact(model),
        )
    assert checkpoints.latest(tmp_path) == tmp_path / "checkpoints" / "step_0000002"


def test_grad_checkpoint_same_loss_and_only_this_model(tmp_path: Path) -> None:
    plain, ckpt = tiny_llama(), tiny_llama()
    other = tiny_llama()
    enable_grad_checkpoint(ckpt)
    assert type(other.layers[0]).__call__ is not type(ckpt.layers[0]).__call__
    assert type(other.layers[0]) is type(plain.layers[0])
    runs = []
    for i, model in enumerate((plain, ckpt)):
        reports: list[Report] = []
        loop = settings(max_steps=2, grad_checkpoint=i == 1)
        train(
            model,
            loss_fn,
            batches(4),
            None,
            loop,
            OptimizerSettings(),
            context(tmp_path / str(i), reports),
            artifact(model),
        )
        runs.append(losses(reports))
    assert runs[0][2] == pytest.approx(runs[1][2], abs=1e-5)


def test_total_steps_from_epochs() -> None:
    data = batches(2)  # 16 rows / 2 = 8 micro-batches per epoch
    assert total_steps(settings(max_steps=0, epochs=3, grad_accumulation_steps=2), data) == 12
    assert total_steps(settings(max_steps=5), data) == 5


def test_loop_settings_from_dict() -> None:
    s = LoopSettings.from_dict({"batch_size": 8, "grad_accumulation_steps": 2, "max_seq_length": 0})
    assert s.micro_batch_size == 4 and s.max_seq_length == 512 and s.steps_per_report == 10
    assert s.dtype == "float32" and s.mask_prompt is None
    assert LoopSettings.from_dict(s.to_dict()) == s
    with pytest.raises(InvalidArgument, match="spec.loop.bogus"):
        LoopSettings.from_dict({"bogus": 1}, prefix="spec.loop")
    with pytest.raises(InvalidArgument, match="multiple of grad_accumulation_steps"):
        LoopSettings.from_dict({"batch_size": 6, "grad_accumulation_steps": 4})
    with pytest.raises(InvalidArgument, match="loop.seed"):
        LoopSettings.from_dict({"seed": "x"}, prefix="loop")


def test_optimizer_defaults_and_schedule() -> None:
    assert OptimizerSettings.from_dict({}).weight_decay == 0.01
    assert OptimizerSettings.from_dict({"weight_decay": 0.0}).weight_decay == 0.0
    assert OptimizerSettings.from_dict({"name": "muon"}).momentum == 0.95
    assert OptimizerSettings.from_dict({"name": "lion"}).beta2 == 0.99
    with pytest.raises(InvalidArgument, match="optimizer.name"):
        OptimizerSettings.from_dict({"name": "rmsprop"}, prefix="optimizer")

    s = OptimizerSettings.from_dict({"learning_rate": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1})
    lr = build_lr_schedule(s, 111)  # updates 0..110; as get_cosine_with_min_lr_schedule_...

    def hf(k: int) -> float:  # transformers' lr_lambda, written out
        if k < 10:
            return k / 10
        f = 0.5 * (1 + math.cos(math.pi * min((k - 10) / 101, 1.0)))
        return f * 0.9 + 0.1

    steps = (0, 5, 10, 60, 110, 200)
    assert [float(lr(mx.array(k))) for k in steps] == pytest.approx([hf(k) for k in steps])
    assert float(lr(mx.array(110))) > 0.1  # the last update is not wasted at the floor
    flat = OptimizerSettings.from_dict({"schedule": "constant", "warmup_steps": 4})
    assert [float(build_lr_schedule(flat, 10)(mx.array(i))) for i in (2, 4, 9)] == pytest.approx(
        [5e-5, 1e-4, 1e-4]
    )
    linear = build_lr_schedule(
        OptimizerSettings.from_dict({"learning_rate": 1.0, "schedule": "linear"}), 11
    )
    assert float(linear(mx.array(5))) == pytest.approx(6 / 11)  # (T - k) / (T - warmup)
    assert float(linear(mx.array(10))) == pytest.approx(1 / 11)
    assert build_lr_schedule(OptimizerSettings.from_dict({"schedule": "constant"}), 10) == 1e-4


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(tmp_path: Path, name: str) -> None:
    lr = {"sgd": 0.5, "muon": 0.02, "lion": 3e-4}.get(name, 3e-3)
    model, reports = tiny_llama(), []
    opt = OptimizerSettings.from_dict({"name": name, "learning_rate": lr, "schedule": "constant"})
    assert type(build_optimizer(opt, 10)).__name__.lower().lstrip("_") in (name, "multioptimizer")
    train(
        model,
        loss_fn,
        batches(4),
        None,
        settings(max_steps=6),
        opt,
        context(tmp_path, reports),
        artifact(model),
    )
    seen = losses(reports)
    assert seen[6] < seen[1], (name, seen)
