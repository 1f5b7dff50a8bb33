"""`mlxu train`, `mlxu export` and `mlxu jobs`: submit jobs, find them, follow them.

Split from cli.py by area: everything about one job on a trainer service (building its spec
from YAML + flags, submitting it, locating it across services, showing its progress).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.message import Message

from clients import config, progress
from clients.cli_common import _pairs, _table, _when, eprint, make_client, to_json
from clients.client import SERVICE_OF_KIND, TRAINER_SERVICES, ClientError, MLXUClient
from mlx_unified.v1 import common_pb2
from services import registry

TRAIN_KINDS = {m.cli: m.name for m in registry.METHODS if m.cli}  # CLI name -> job kind


def follow_job(
    client: MLXUClient,
    job: common_pb2.Job,
    service: str,
    args: argparse.Namespace,
    after_seq: int = 0,
    events_as_json: bool = False,
) -> int:
    """Show a job's events until it ends; 0 if it SUCCEEDED, 1 otherwise."""
    display = progress.JobProgress(sys.stderr)
    quiet = args.json and not events_as_json

    def on_retry(err: ClientError, delay: float) -> None:
        display.message(f"connection lost ({err.code.name}); reconnecting in {delay:.1f}s")

    try:
        for event, snap in client.watch_job(job.job_id, after_seq, service, on_retry=on_retry):
            if events_as_json:
                ev = json.loads(to_json(event, None))
                print(json.dumps({"event": ev, "job": json.loads(to_json(snap, None))}), flush=True)
            elif not quiet:
                display.update(event, snap)
    except KeyboardInterrupt:
        display.message(
            f"stopped watching; job {job.job_id} keeps running "
            f"(`mlxu jobs cancel {job.job_id} --service {service}` stops it)"
        )
        return 130
    final = client.get_job(job.job_id, service)
    ok = final.state == common_pb2.JOB_STATE_SUCCEEDED
    if args.json:
        if not events_as_json:
            print(to_json(final))
        return 0 if ok else 1
    display.finish(final, checkpoint=False)  # the path goes to stdout, alone
    cp = final.result if final.result.path else final.latest_checkpoint
    if ok and cp.path:
        print(cp.path)  # stdout: `path=$(mlxu train sft ...)`
    return 0 if ok else 1


def _submitted(client: MLXUClient, kind: str, spec: Message, args: argparse.Namespace) -> int:
    started = client.start(kind, spec, args.request_id)
    job, service = started.job, SERVICE_OF_KIND[kind]
    verb = "started" if started.created else "found existing"
    eprint(f"{verb} {kind} job {job.job_id} on {service} ({client.address_of(service)})")
    if args.no_wait:
        print(to_json(job) if args.json else job.job_id)
        return 0
    return follow_job(client, job, service, args)


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [
        "model",
        "data",
        "method",
        "iters",
        "batch_size",
        "learning_rate",
        "max_seq_length",
        "num_layers",
        "seed",
        "output_name",
        "adapter",
    ]
    keys += sorted({f.name.replace("-", "_") for m in registry.METHODS for f in m.flags})
    out = {k: getattr(args, k, None) for k in keys}
    out.update(_pairs(args.set, "--set"))
    return out


def _with_labels(data: dict[str, Any], labels: list[str] | None) -> dict[str, Any]:
    if labels:  # flags add to the YAML's labels rather than replace them
        extra = _pairs(labels, "--label", parse=False)
        data = {**data, "labels": {**(data.get("labels") or {}), **extra}}
    return data


def cmd_train(args: argparse.Namespace) -> int:
    kind = TRAIN_KINDS[args.train_kind]
    data = _with_labels(config.load_yaml(args.config) if args.config else {}, args.label)
    built = config.build_spec(kind, data, _train_overrides(args))
    config.absolutize_paths(built.spec)
    for note in built.notes:
        eprint(f"note: {note}")
    if args.dry_run:
        print(to_json(built.spec))
        return 0
    with make_client(args) as client:
        return _submitted(client, kind, built.spec, args)


def cmd_export(args: argparse.Namespace) -> int:
    overrides = {
        "model": args.model,
        "adapter": getattr(args, "adapter", None),
        "mode": args.mode,
        "bits": getattr(args, "bits", None),
        "group_size": getattr(args, "group_size", None),
        "output_name": args.output_name,
    }
    built = config.build_spec("export", _with_labels({}, args.label), overrides)
    config.absolutize_paths(built.spec)
    if args.dry_run:
        print(to_json(built.spec))
        return 0
    with make_client(args) as client:
        return _submitted(client, "export", built.spec, args)


def _distinct(client: MLXUClient, services: Iterable[str]) -> list[str]:
    """One service name per distinct address (with --address all names share one)."""
    seen: dict[str, str] = {}
    for s in services:
        seen.setdefault(client.address_of(s), s)
    return list(seen.values())


def _locate(client: MLXUClient, job_id: str, service: str | None) -> tuple[str, common_pb2.Job]:
    """The job and its service: the one given, else the first trainer service that has it."""
    if service:
        return service, client.get_job(job_id, service)
    errors: list[ClientError] = []
    for s in _distinct(client, TRAINER_SERVICES):
        try:
            return s, client.get_job(job_id, s)
        except ClientError as e:
            if e.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            errors.append(e)
    if all(e.code == grpc.StatusCode.UNAVAILABLE for e in errors):
        raise errors[0]
    raise ClientError(grpc.StatusCode.NOT_FOUND, f"job {job_id} not found on any trainer service")


def _job_details(job: common_pb2.Job) -> list[str]:
    state = progress.state_name(job.state)
    lines = [f"job:        {job.job_id}", f"kind:       {job.kind}", f"state:      {state}"]
    if job.request_id:
        lines.append(f"request id: {job.request_id}")
    lines += [
        f"created:    {_when(job.create_time)}",
        f"started:    {_when(job.start_time)}",
        f"ended:      {_when(job.end_time)}",
        f"progress:   {progress.progress_text(job, with_bar=False) or '-'}",
        f"attempts:   {job.attempts}",
    ]
    if job.output_dir:
        lines.append(f"output:     {job.output_dir}")
    if job.latest_checkpoint.path:
        lines.append(f"latest:     {progress.checkpoint_text(job.latest_checkpoint)}")
    if job.result.path:
        lines.append(f"result:     {progress.checkpoint_text(job.result)}")
    if job.error:
        lines.append(f"error:      {job.error}")
    lines += [f"label:      {k}={v}" for k, v in sorted(job.labels.items())]
    return lines


def cmd_jobs(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        if args.jobs_cmd == "list":
            return _jobs_list(client, args)
        service, job = _locate(client, args.job_id, args.service)
        if args.jobs_cmd == "show":
            print(
                to_json(job)
                if args.json
                else "\n".join([*_job_details(job), f"service:    {service}"])
            )
            return 0
        if args.jobs_cmd == "cancel":
            job = client.cancel_job(args.job_id, args.reason, service)
            print(to_json(job) if args.json else f"{job.job_id} {progress.state_name(job.state)}")
            return 0
        return follow_job(client, job, service, args, args.after_seq, events_as_json=args.json)


def _jobs_list(client: MLXUClient, args: argparse.Namespace) -> int:
    states = [common_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in args.state or ()]
    jobs: list[tuple[str, common_pb2.Job]] = []
    failures: list[ClientError] = []
    services = [args.service] if args.service else _distinct(client, TRAINER_SERVICES)
    for s in services:
        try:
            jobs += [(s, j) for j in client.list_jobs(s, states=states, kind=args.kind or "")]
        except ClientError as e:
            if args.service or e.code != grpc.StatusCode.UNAVAILABLE:
                raise
            failures.append(e)
    if failures and len(failures) == len(services):
        raise failures[0]
    for e in failures:
        eprint(f"note: no answer from {e.address} ({e.code.name}); its jobs are not listed")
    if len(services) < len(TRAINER_SERVICES) and not args.service:
        # One address serves several names (--address): name the service by the job's kind.
        jobs = [(SERVICE_OF_KIND.get(j.kind, s), j) for s, j in jobs]
    jobs.sort(key=lambda sj: sj[1].create_time.ToNanoseconds(), reverse=True)
    jobs = jobs[: args.limit] if args.limit else jobs
    if args.json:
        print(
            json.dumps([{"service": s, **json.loads(to_json(j, None))} for s, j in jobs], indent=2)
        )
        return 0
    rows = []
    for s, j in jobs:
        step = f"{j.step}/{j.total_steps}" if j.total_steps else str(j.step or "-")
        value = progress.loss_of(j.metrics)  # train_loss, or a rollout method's loss
        loss = "-" if value is None else progress.format_value(value)
        rows.append(
            [j.job_id, s, j.kind, progress.state_name(j.state), step, loss, _when(j.create_time)]
        )
    _table(rows, ["JOB", "SERVICE", "KIND", "STATE", "STEP", "LOSS", "CREATED"])
    return 0
