"""Helpers for integration tests: stubs over a loopback channel, waiting on job streams."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mlx_unified.v1 import common_pb2, common_pb2_grpc, training_pb2, training_pb2_grpc

TERMINAL = {
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
}


class Stubs:
    def __init__(self, address: str, api_key: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.md = (("x-api-key", api_key),) if api_key else ()
        self.training = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.jobs = common_pb2_grpc.JobServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def start_sft(self, spec: training_pb2.SFTSpec, request_id: str = "") -> common_pb2.Job:
        req = training_pb2.StartSFTRequest(request_id=request_id, spec=spec)
        return self.training.StartSFT(req, metadata=self.md, timeout=120).job

    def watch(self, job_id: str, after_seq: int = 0, timeout: float = 240):
        req = common_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq)
        return self.jobs.WatchJob(req, metadata=self.md, timeout=timeout)

    def wait(self, job_id: str, timeout: float = 240) -> tuple[common_pb2.Job, list]:
        """Follow the job to a terminal state; returns the final job and every event seen."""
        events = []
        job = None
        for resp in self.watch(job_id, timeout=timeout):
            events.append(resp.event)
            job = resp.job
        final = self.jobs.GetJob(common_pb2.GetJobRequest(job_id=job_id), metadata=self.md)
        assert final.job.state in TERMINAL, (job, final)
        return final.job, events


def violations(err: grpc.RpcError) -> dict[str, str]:
    """field -> description from the google.rpc.BadRequest detail of an error."""
    status = rpc_status.from_call(err)
    out: dict[str, str] = {}
    if status is None:
        return out
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def losses(events) -> list[tuple[int, float]]:
    return [
        (e.progress.step, e.progress.metrics["train_loss"])
        for e in events
        if e.WhichOneof("payload") == "progress" and "train_loss" in e.progress.metrics
    ]


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars from the event files in ``directory``, by tag, in write order.

    Reads the TFRecord framing (8-byte length, 4-byte CRC, payload, 4-byte CRC) and the Event
    protos themselves, so the files are checked as the format, not through our writer."""
    import struct
    from pathlib import Path

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(Path(directory).glob("events.out.tfevents.*"))
    assert files, f"no event files in {directory}"
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out


def read_wandb_records(run_dir) -> list:
    """The records of an offline W&B run (``<run_dir>/run-<id>.wandb``) as wandb's own
    ``Record`` protos, read through the file's LevelDB-log framing (a 7-byte ``:W&B`` file
    header, 32 KiB blocks, each chunk behind a 7-byte CRC/length/type header) so the test
    checks what wandb wrote, not what our sink meant to send."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    [path] = Path(run_dir).glob("run-*.wandb")
    data, block, i = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, parts = [], b""
    while i + 7 <= len(data):
        if block - i % block < 7:  # the rest of a block is padding
            i += block - i % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[i : i + 7])
        parts += data[i + 7 : i + 7 + length]
        i += 7 + length
        if kind in (1, 4):  # FULL, LAST (FIRST=2 and MIDDLE=3 continue)
            records.append(wandb_internal_pb2.Record.FromString(parts))
            parts = b""
    return records
