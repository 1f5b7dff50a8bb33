"""What `mlxu` shows of real jobs on real services (loopback): every number true and
labelled, every line said once (issue 14)."""

from __future__ import annotations

import re

import pytest

from clients import cli
from clients.client import MLXUClient
from tests.conftest import DEMO_DATA, REPO

PREFS = REPO / "examples" / "data" / "mlxu_faq_prefs"


@pytest.fixture
def services(serve, monkeypatch: pytest.MonkeyPatch):
    training, rlhf = serve("training"), serve("rlhf")
    monkeypatch.setenv("MLXU_TRAINING_ADDR", training.address)
    monkeypatch.setenv("MLXU_RLHF_ADDR", rlhf.address)
    monkeypatch.setenv("MLXU_DISTILLATION_ADDR", "127.0.0.1:1")  # not running: listed as such
    monkeypatch.delenv("MLXU_DEBUG", raising=False)
    return training, rlhf


def mlxu(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def printed_path(out: str) -> str:
    """The checkpoint path `mlxu` printed (stdout also carries the in-process servers' logs)."""
    return next(line for line in reversed(out.splitlines()) if line.startswith("/"))


def steps(err: str) -> dict[int, str]:
    """step -> its progress line (the job id prefix removed)."""
    got = {}
    for line in err.splitlines():
        m = re.match(r"job-\w+ (step (\d+)/\d+.*)", line)
        if m:
            got[int(m.group(2))] = m.group(1)
    return got


def val_loss(line: str) -> str:
    m = re.search(r"val loss (\S+)", line)
    assert m, line
    return m.group(1)


def test_sft_live_replay_list_and_export_tell_the_truth(services, tiny_model, capsys) -> None:
    train = ["train", "sft", "--model", str(tiny_model), "--data", str(DEMO_DATA)]
    train += ["--iters", "6", "--batch-size", "4", "--max-seq-length", "128"]
    train += ["--set", "loop.steps_per_report=1", "--set", "loop.steps_per_eval=3"]
    rc, out, err = mlxu(capsys, *train)
    assert rc == 0, err
    adapter = printed_path(out)
    job_id = re.search(r"started sft job (job-\w+)", err).group(1)
    live = steps(err)
    # The "before" figure: validation of the untouched model, at step 0.
    assert live[0].startswith("step 0/6  val loss ") and "loss" not in live[0].split("val")[0]
    assert "state PENDING: created" in err and "UNSPECIFIED" not in err
    for step in (1, 2, 4, 5, 6):
        assert re.search(r"  loss \d", live[step]), live[step]  # SFT's train loss is shown

    rc, _, replay = mlxu(capsys, "jobs", "watch", job_id, "--service", "training")
    assert rc == 0
    again = steps(replay)
    # Replayed steps show the metrics as they were: before the step-3 evaluation, the
    # step-0 validation loss, not the final one; nothing says "steps 6".
    assert val_loss(again[1]) == val_loss(again[2]) == val_loss(live[0])
    assert val_loss(again[3]) != val_loss(live[0]) and val_loss(again[6]) == val_loss(live[6])
    assert again == live
    assert "steps 6" not in replay and "ETA" not in again[6]

    rc, out, _ = mlxu(capsys, "jobs", "list", "--service", "training")
    row = next(line for line in out.splitlines() if line.startswith(job_id))
    assert row.split()[4:6] == ["6/6", row.split()[5]] and row.split()[5] != "-", row

    rc, out, err = mlxu(capsys, "export", "fuse", "--model", str(tiny_model), "--adapter", adapter)
    assert rc == 0, err
    assert f"exported model: {printed_path(out)} (full)" in err and "step 0" not in err

    # A server error is printed once: the violation, not the message and then the violation.
    bad = ["train", "sft", "--model", str(tiny_model / "nope"), "--data", str(DEMO_DATA)]
    rc, _, err = mlxu(capsys, *bad)
    assert rc == 2
    assert err.splitlines() == [
        f"error: INVALID_ARGUMENT: spec.model.model: '{tiny_model / 'nope'}' does not exist"
    ]


def test_dpo_shows_held_out_and_batch_metrics_apart(services, tiny_model, capsys) -> None:
    argv = ["train", "dpo", "--model", str(tiny_model), "--data", str(PREFS), "--iters", "4"]
    argv += ["--batch-size", "4", "--max-seq-length", "128"]
    argv += ["--set", "loop.steps_per_report=2", "--set", "loop.steps_per_eval=2"]
    rc, _, err = mlxu(capsys, *argv)
    assert rc == 0, err
    job_id = re.search(r"started dpo job (job-\w+)", err).group(1)
    lines = steps(err)
    # Held-out accuracy and margin from step 0; the batch figures say they are the batch's.
    assert lines[0].startswith("step 0/4  val loss 0.6931  val acc ")
    assert "val margin " in lines[0] and "train acc" not in lines[0]
    for step in (2, 4):
        line = lines[step]
        assert re.search(r"  loss \S+  val loss \S+  val acc \S+  val margin ", line), line
        assert " train acc " in line and " train margin " in line, line
        rate = re.search(r"  (\S+) tok/s", line).group(1)
        assert float(rate.rstrip("k")) >= 1, line  # tokens, not pairs: never "0 tok/s"
    assert "ppl" not in err and "accuracies" not in err
    assert re.search(r"scoring reference log-probs: 128 answers", err)

    rc, out, _ = mlxu(capsys, "jobs", "list", "--service", "rlhf")
    row = next(line for line in out.splitlines() if line.startswith(job_id)).split()
    assert row[4] == "4/4" and row[5] != "-", row
    with MLXUClient() as client:
        metrics = dict(client.get_job(job_id, "rlhf").metrics)
    assert {"val_accuracies", "val_margins", "train_accuracies"} <= set(metrics)
    assert "val_ppl" not in metrics and "accuracies" not in metrics
