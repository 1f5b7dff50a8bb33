"""Job metrics as TensorBoard event files: tags, resume purging, never failing a job."""

from __future__ import annotations

import struct
from pathlib import Path

from services.runtime.jobs.scalars import ScalarLog, resume_step, tag
from tests.integration.helpers import read_scalars


def _events(path: Path) -> list:
    from tensorboardX.proto import event_pb2

    data, i, out = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return out


def test_tags_group_by_split():
    assert [tag(n) for n in ("train_loss", "val_accuracy", "learning_rate")] == [
        "train/loss",
        "val/accuracy",
        "run/learning_rate",
    ]
    assert resume_step(Path("/x/checkpoints/step_0000040")) == 40
    assert resume_step(None) is None


def test_a_resumed_attempt_purges_the_steps_after_its_checkpoint(tmp_path: Path):
    first = ScalarLog(tmp_path)
    for step in range(1, 11):
        first.add(step, {"train_loss": 10.0 - step, "bad": float("nan")})
    first.close()
    second = ScalarLog(tmp_path, resume_from=tmp_path / "checkpoints" / "step_0000005")
    for step in range(6, 9):
        second.add(step, {"train_loss": 1.0})
    second.close()
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    # TensorBoard drops the first attempt's steps > 5 when it meets this SessionLog START.
    purge = [e for e in _events(files[1]) if e.HasField("session_log")]
    assert purge and purge[0].step == 5
    scalars = read_scalars(tmp_path / "tensorboard")
    assert "run/bad" not in scalars  # NaN is not written
    assert scalars["train/loss"][:10] == [(s, 10.0 - s) for s in range(1, 11)]


def test_a_writer_failure_switches_the_sink_off(tmp_path: Path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    log = ScalarLog(blocked)  # <file>/tensorboard cannot be created
    log.add(1, {"train_loss": 1.0})
    assert not log.enabled
    log.add(2, {"train_loss": 1.0})  # no second failure
    log.close()
