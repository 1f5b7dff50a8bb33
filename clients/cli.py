"""`mlxu`: run the services, submit and follow jobs and pipelines, sample from checkpoints.

    mlxu up                                               # all four services
    mlxu train sft --config run.yaml --iters 200          # submit, live progress, checkpoint path
    mlxu jobs list | show JOB | watch JOB | cancel JOB
    mlxu generate --model smollm2-135m-instruct --chat --prompt "Hello"
    mlxu pipeline create --template sft-dpo --model M --data D --run

Exit codes: 0 success, 1 the job/run FAILED or was CANCELLED, 2 a usage, config or RPC error
(one line per problem on stderr, never a traceback; MLXU_DEBUG=1 shows one), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from clients import config, progress
from clients.client import (
    DEFAULT_PORTS,
    SERVICE_OF_KIND,
    SERVICES,
    TLS,
    TRAINER_SERVICES,
    ClientError,
    MLXUClient,
    health_status,
)
from mlx_unified.v1 import common_pb2, generation_pb2, orchestrator_pb2
from services import registry

JOB_STATES = ["pending", "running", "succeeded", "failed", "cancelled"]
TRAIN_KINDS = {m.cli: m.name for m in registry.METHODS if m.cli}  # CLI name -> job kind


def eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def to_json(msg: Message, indent: int | None = 2) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=indent)


def _when(ts: Any) -> str:
    return ts.ToDatetime().astimezone().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def _pairs(items: Iterable[str] | None, flag: str, parse: bool = True) -> dict[str, Any]:
    """KEY=VALUE flags; with ``parse`` values read as YAML scalars (10, 1e-4, true, [a, b])."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise config.ConfigError(flag, f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = config.parse_scalar(value) if parse else value
    return out


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    if not rows:
        eprint("(none)")
        return
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def make_client(args: argparse.Namespace) -> MLXUClient:
    tls: bool | TLS = False
    if args.tls or args.tls_ca or args.tls_cert:
        tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    return MLXUClient(args.address, api_key=args.api_key, timeout=args.timeout, tls=tls)


# ---- following jobs and runs --------------------------------------------------------------


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


def follow_run(client: MLXUClient, run_id: str, args: argparse.Namespace) -> int:
    run = client.get_run(run_id)
    display = progress.RunProgress(run, sys.stderr)

    def on_retry(err: ClientError, delay: float) -> None:
        display.message(f"connection lost ({err.code.name}); reconnecting in {delay:.1f}s")

    try:
        for event in client.watch_run(run_id, on_retry=on_retry):
            if args.json:
                print(to_json(event, None), flush=True)
            else:
                display.update(event)
    except KeyboardInterrupt:
        display.message(
            f"stopped watching; run {run_id} keeps going (`mlxu pipeline cancel {run_id}`)"
        )
        return 130
    final = client.get_run(run_id)
    ok = final.state == orchestrator_pb2.RUN_STATE_SUCCEEDED
    if not args.json:
        display.finish(final)
        if ok and final.result.path:
            print(final.result.path)
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


# ---- commands -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from services.runtime.rpc.server import main as serve_main  # heavy: only when serving

    serve_main(args.service, host=args.host, port=args.port, home=args.home)
    return 0


def _up_address(service: str, host: str | None) -> str:
    host = host or os.environ.get("MLXU_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    port = os.environ.get(f"MLXU_{service.upper()}_PORT") or DEFAULT_PORTS[service]
    return f"{host}:{port}"


def cmd_up(args: argparse.Namespace) -> int:
    """Start the services as child processes, wait until healthy, stop them on Ctrl-C/SIGTERM."""
    names = args.services.split(",") if args.services else list(SERVICES)
    for n in names:
        if n not in SERVICES:
            raise config.ConfigError("--services", f"unknown service {n!r}")
    tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if args.tls else None
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name in names:
            argv = [sys.executable, "-m", "clients.cli", "serve", name]
            argv += [f"--{k}={v}" for k, v in (("host", args.host), ("home", args.home)) if v]
            # Own session: a terminal's Ctrl-C reaches only us, and we forward it once.
            procs[name] = subprocess.Popen(argv, start_new_session=True)
        pending = set(names)
        deadline = time.monotonic() + args.wait_timeout
        while pending and not received:
            for name in sorted(pending):
                if procs[name].poll() is not None:
                    eprint(f"{name} exited with code {procs[name].returncode} while starting")
                    return _stop(procs, signal.SIGTERM, args.grace) or 1
                if health_status(_up_address(name, args.host), tls=tls) == "SERVING":
                    eprint(f"{name:<13} serving on {_up_address(name, args.host)}")
                    pending.discard(name)
            if time.monotonic() > deadline:
                eprint(f"not healthy after {args.wait_timeout:.0f}s: {', '.join(sorted(pending))}")
                return _stop(procs, signal.SIGTERM, args.grace) or 1
            time.sleep(0.2)
        if not received:
            eprint("all services up; Ctrl-C stops them")
        while not received:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                eprint(f"{dead[0]} exited with code {procs[dead[0]].returncode}; stopping the rest")
                return _stop(procs, signal.SIGTERM, args.grace) or 1
            time.sleep(0.3)
        return _stop(procs, received[0], args.grace)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for p in procs.values():  # whatever path we left by, no orphans
            if p.poll() is None:
                p.kill()


def _stop(procs: dict[str, subprocess.Popen], sig: int, grace: float) -> int:
    """Forward ``sig`` to every live child, wait ``grace`` seconds, then kill what is left."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.monotonic() + grace
    for name, p in procs.items():
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            eprint(f"{name} did not stop within {grace:.0f}s; killing it")
            p.kill()
            p.wait()
    return 0


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
        loss = progress.format_value(j.metrics["loss"]) if "loss" in j.metrics else "-"
        rows.append(
            [j.job_id, s, j.kind, progress.state_name(j.state), step, loss, _when(j.create_time)]
        )
    _table(rows, ["JOB", "SERVICE", "KIND", "STATE", "STEP", "LOSS", "CREATED"])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    kw: dict[str, Any] = {
        "adapter": config.local_path(args.adapter or ""),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop or (),
    }
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        kw["messages"] = [*system, {"role": "user", "content": prompt}]
    else:
        kw["prompt"] = prompt
    text, last = [], None
    with make_client(args) as client:
        for chunk in client.generate_stream(config.local_path(args.model), **kw):
            last = chunk
            text.append(chunk.text)
            if not args.json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    name = generation_pb2.FinishReason.Name(last.finish_reason) if last else "NONE"
    reason = name.removeprefix("FINISH_REASON_").lower()
    stats = {
        "finish_reason": reason,
        "prompt_tokens": last.prompt_tokens if last else 0,
        "completion_tokens": last.completion_tokens if last else 0,
        "tokens_per_second": round(last.tokens_per_second, 2) if last else 0.0,
    }
    if args.json:
        print(json.dumps({"text": "".join(text), **stats}))
        return 0
    if text and not text[-1].endswith("\n"):
        print()
    if sys.stderr.isatty():
        eprint(
            f"[{stats['completion_tokens']} tokens, {stats['tokens_per_second']} tok/s, {reason}]"
        )
    return 0


def _pipeline_summary(p: orchestrator_pb2.Pipeline) -> str:
    stages = ", ".join(
        f"{st.name}({progress.state_name(st.kind, _KIND).lower()})" for st in p.spec.stages
    )
    return f"{p.pipeline_id}  {p.spec.name or '-'}  [{stages}]"


_KIND = orchestrator_pb2.StageKind
_RUN = orchestrator_pb2.RunState
_STAGE = orchestrator_pb2.StageState


def _run_lines(run: orchestrator_pb2.Run) -> list[str]:
    lines = [
        f"run:      {run.run_id}",
        f"pipeline: {run.pipeline_id}",
        f"state:    {progress.state_name(run.state, _RUN)}",
        f"created:  {_when(run.create_time)}",
    ]
    w = max([len(s.name) for s in run.stages] + [5])
    lines += ["  " + progress.stage_line(s, name_width=w) for s in run.stages]
    if run.result.path:
        lines.append(f"result:   {progress.checkpoint_text(run.result)}")
    if run.error:
        lines.append(f"error:    {run.error}")
    return lines


def _create_pipeline(
    client: MLXUClient, args: argparse.Namespace
) -> orchestrator_pb2.Pipeline | None:
    if bool(args.config) == bool(args.template):
        raise config.ConfigError("pipeline create", "give exactly one of --config or --template")
    if args.template:
        return client.create_pipeline_from_template(
            args.template,
            base_model=config.local_path(args.model or ""),
            dataset=config.local_path(args.data or ""),
            overrides=_nested(_pairs(args.set, "--set")),
            name=args.name or "",
            auto_configure=args.auto_configure,
            request_id=args.request_id,
        )
    data = config.load_yaml(args.config)
    if args.auto_configure is not None:
        data["auto_configure"] = args.auto_configure
    overrides = {"model": args.model, "data": args.data, "name": args.name}
    spec, notes = config.build_pipeline(data, overrides)
    config.absolutize_paths(spec)
    for note in notes:
        eprint(f"note: {note}")
    if args.dry_run:
        print(to_json(spec))
        return None
    return client.create_pipeline(spec, args.request_id)


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}} (template overrides are JSON-shaped PipelineSpec)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _start_run(client: MLXUClient, pipeline_id: str, args: argparse.Namespace) -> int:
    request_id = args.request_id
    if request_id and args.pipeline_cmd == "create":
        request_id += "/run"  # the same flag made the pipeline: keep both idempotent
    run = client.run_pipeline(pipeline_id, request_id)
    eprint(f"run {run.run_id} of pipeline {pipeline_id}: {progress.state_name(run.state, _RUN)}")
    if args.no_wait:
        print(to_json(run) if args.json else run.run_id)
        return 0
    return follow_run(client, run.run_id, args)


def cmd_pipeline(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        cmd = args.pipeline_cmd
        if cmd == "create":
            pipeline = _create_pipeline(client, args)
            if pipeline is None:  # --dry-run
                return 0
            if args.json and not args.run:
                print(to_json(pipeline))
            elif not args.run:
                print(pipeline.pipeline_id)
            eprint(f"created pipeline {_pipeline_summary(pipeline)}")
            return _start_run(client, pipeline.pipeline_id, args) if args.run else 0
        if cmd == "run":
            return _start_run(client, args.pipeline_id, args)
        if cmd == "list":
            return _pipeline_list(client, args)
        if cmd == "show":
            return _pipeline_show(client, args)
        if cmd == "watch":
            return follow_run(client, args.run_id, args)
        run = client.cancel_run(args.run_id, args.reason)
        print(to_json(run) if args.json else f"{run.run_id} {progress.state_name(run.state, _RUN)}")
        return 0


def _pipeline_list(client: MLXUClient, args: argparse.Namespace) -> int:
    if args.runs or args.pipeline:
        runs = list(client.list_runs(args.pipeline or ""))
        if args.json:
            print(json.dumps([json.loads(to_json(r, None)) for r in runs], indent=2))
            return 0
        rows = [
            [
                r.run_id,
                r.pipeline_id,
                progress.state_name(r.state, _RUN),
                " ".join(
                    f"{s.name}:{progress.state_name(s.state, _STAGE).lower()}" for s in r.stages
                ),
                _when(r.create_time),
            ]
            for r in runs
        ]
        _table(rows, ["RUN", "PIPELINE", "STATE", "STAGES", "CREATED"])
        return 0
    pipelines = list(client.list_pipelines())
    if args.json:
        print(json.dumps([json.loads(to_json(p, None)) for p in pipelines], indent=2))
        return 0
    rows = [
        [
            p.pipeline_id,
            p.spec.name or "-",
            " -> ".join(s.name for s in p.spec.stages),
            _when(p.create_time),
        ]
        for p in pipelines
    ]
    _table(rows, ["PIPELINE", "NAME", "STAGES", "CREATED"])
    return 0


def _pipeline_show(client: MLXUClient, args: argparse.Namespace) -> int:
    """ID may name a pipeline or a run: whichever exists."""
    try:
        pipeline = client.get_pipeline(args.id)
    except ClientError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
        run = client.get_run(args.id)
        print(to_json(run) if args.json else "\n".join(_run_lines(run)))
        return 0
    if args.json:
        print(to_json(pipeline))
    else:
        print(_pipeline_summary(pipeline))
        print(json.dumps(json_format.MessageToDict(pipeline.resolved), indent=2))
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        templates = client.list_templates()
    if args.json:
        print(json.dumps([json.loads(to_json(t, None)) for t in templates], indent=2))
        return 0
    rows = [[t.name, " -> ".join(s.name for s in t.spec.stages), t.description] for t in templates]
    _table(rows, ["TEMPLATE", "STAGES", "DESCRIPTION"])
    return 0


# ---- parser -------------------------------------------------------------------------------

# Global flags work before or after the subcommand: every parser declares them with SUPPRESS
# defaults (so a subparser never overwrites a value given earlier); main() fills the defaults.
GLOBAL_DEFAULTS = {
    "address": None,
    "api_key": None,
    "json": False,
    "timeout": 30.0,
    "tls": False,
    "tls_ca": None,
    "tls_cert": None,
    "tls_key": None,
}


def _global_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    s = argparse.SUPPRESS
    g.add_argument(
        "--address",
        default=s,
        help="host:port of the service to call "
        "(default: MLXU_<SERVICE>_ADDR, else 127.0.0.1:<service port>)",
    )
    g.add_argument("--api-key", default=s, help="sent as x-api-key (default: $MLXU_API_KEY)")
    g.add_argument("--json", action="store_true", default=s, help="machine-readable output")
    g.add_argument("--timeout", type=float, default=s, help="seconds per unary call (30)")
    g.add_argument("--tls", action="store_true", default=s, help="connect with TLS")
    g.add_argument("--tls-ca", default=s, help="CA bundle that signed the server's cert")
    g.add_argument("--tls-cert", default=s, help="client certificate (mTLS)")
    g.add_argument("--tls-key", default=s, help="client private key (mTLS)")
    return p


def _submit_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--output-name", help="checkpoint directory name (default: the job id)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="job label (repeat)")
    p.add_argument("--request-id", help="idempotency key: the same id returns the same job")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--dry-run", action="store_true", help="print the spec as JSON, submit nothing")
    return p


def _train_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", help="YAML config: native spec keys or mlx-lm lora keys")
    p.add_argument("--model", help="base model: registered name, mlx-lm dir or hub id")
    p.add_argument("--adapter", help="start from this adapter directory on top of --model")
    p.add_argument("--data", help="dataset file or directory with train.jsonl / valid.jsonl")
    p.add_argument("--method", choices=["full", "lora", "dora", "qlora"])
    p.add_argument("--iters", type=int, help="optimiser steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--num-layers", type=int, help="adapt the last N blocks (-1: all)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config key, dotted for nesting: --set loop.steps_per_eval=50",
    )
    return p


def _cmd(
    sub: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    parents: Sequence[argparse.ArgumentParser] = (),
    **kw: Any,
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, parents=[_global_flags(), *parents], **kw)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxu",
        description=__doc__,
        parents=[_global_flags()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _cmd(sub, "serve", cmd_serve, "run one service in the foreground")
    p.add_argument("service", choices=SERVICES)
    p.add_argument("--host", help="bind address (default: $MLXU_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: $MLXU_<SERVICE>_PORT or the standard)")
    p.add_argument("--home", help="data dir (default: $MLXU_HOME or ~/.mlxu)")

    p = _cmd(sub, "up", cmd_up, "run all services until Ctrl-C")
    p.add_argument("--host")
    p.add_argument("--home")
    p.add_argument("--services", help="comma-separated subset (default: all four)")
    p.add_argument("--wait-timeout", type=float, default=120.0, help="seconds to become healthy")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to stop before a kill")

    train = _cmd(sub, "train", cmd_train, "submit a training job and follow it")
    tsub = train.add_subparsers(dest="train_kind", required=True, metavar="KIND")
    flags = [_train_flags(), _submit_flags()]
    for m in registry.METHODS:  # one subcommand per method, with its own flags
        if not m.cli:
            continue
        p = _cmd(tsub, m.cli, cmd_train, m.cli_help, flags)
        for f in m.flags:
            kw: dict[str, Any] = {"help": f.help, "type": f.type}
            p.add_argument(f"--{f.name}", action="append" if f.repeat else "store", **kw)

    export = _cmd(sub, "export", cmd_export, "fuse an adapter, or (de)quantise a model")
    esub = export.add_subparsers(dest="export_mode", required=True, metavar="MODE")
    eflags = [_submit_flags()]
    p = _cmd(esub, "fuse", cmd_export, "merge an adapter into its base model", eflags)
    p.add_argument("--adapter", required=True)
    p = _cmd(esub, "quantize", cmd_export, "quantise a model", eflags)
    p.add_argument("--bits", type=int, choices=[4, 8])
    p.add_argument("--group-size", type=int, choices=[32, 64, 128])
    _cmd(esub, "dequantize", cmd_export, "dequantise a model", eflags)
    for mode, ep in esub.choices.items():
        ep.add_argument("--model", required=True)
        ep.set_defaults(mode=mode)

    jobs = _cmd(sub, "jobs", cmd_jobs, "list, show, follow or cancel jobs")
    jsub = jobs.add_subparsers(dest="jobs_cmd", required=True, metavar="ACTION")
    p = _cmd(jsub, "list", cmd_jobs, "list jobs (newest first)")
    p.add_argument("--state", action="append", choices=JOB_STATES)
    p.add_argument("--kind", help=", ".join(registry.names()))
    p.add_argument("--limit", type=int, default=50, help="at most N jobs (0: all)")
    for action, help in (
        ("show", "a job's details"),
        ("watch", "follow a job's progress"),
        ("cancel", "cancel a job"),
    ):
        p = _cmd(jsub, action, cmd_jobs, help)
        p.add_argument("job_id")
        if action == "watch":
            p.add_argument("--after-seq", type=int, default=0, help="replay events after N")
        if action == "cancel":
            p.add_argument("--reason", default="cancelled from the CLI")
    for jp in jsub.choices.values():
        jp.add_argument("--service", choices=TRAINER_SERVICES, help="default: look in all three")

    p = _cmd(sub, "generate", cmd_generate, "stream a completion to stdout")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", help="adapter directory applied on top of --model")
    p.add_argument("--prompt", "-p", required=True, help='the prompt ("-": read stdin)')
    p.add_argument("--chat", action="store_true", help="send as a user message (chat template)")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=0, help="default: the server's (128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeat)")

    pipe = _cmd(sub, "pipeline", cmd_pipeline, "multi-stage pipelines and their runs")
    psub = pipe.add_subparsers(dest="pipeline_cmd", required=True, metavar="ACTION")
    p = _cmd(psub, "create", cmd_pipeline, "create a pipeline from YAML or a template")
    p.add_argument("--config", "-c", help="pipeline YAML")
    p.add_argument("--template", help="template name (see `mlxu templates`)")
    p.add_argument("--model", help="base model")
    p.add_argument("--data", help="default dataset")
    p.add_argument("--name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="template override")
    p.add_argument("--auto-configure", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--request-id")
    p.add_argument("--run", action="store_true", help="run it at once and follow the run")
    p.add_argument("--no-wait", action="store_true", help="with --run: print the run id")
    p.add_argument("--dry-run", action="store_true", help="with --config: print the spec")
    p = _cmd(psub, "run", cmd_pipeline, "start a run of a pipeline and follow it")
    p.add_argument("pipeline_id")
    p.add_argument("--request-id")
    p.add_argument("--no-wait", action="store_true")
    p = _cmd(psub, "list", cmd_pipeline, "list pipelines (or runs)")
    p.add_argument("--runs", action="store_true", help="list runs instead")
    p.add_argument("--pipeline", help="runs of this pipeline")
    p = _cmd(psub, "show", cmd_pipeline, "show a pipeline or a run")
    p.add_argument("id", help="pipeline id or run id")
    p = _cmd(psub, "watch", cmd_pipeline, "follow a run")
    p.add_argument("run_id")
    p = _cmd(psub, "cancel", cmd_pipeline, "cancel a run")
    p.add_argument("run_id")
    p.add_argument("--reason", default="cancelled from the CLI")

    _cmd(sub, "templates", cmd_templates, "list pipeline templates")

    p = _cmd(sub, "demo", cmd_demo, "the quick start: chatbot template on SmolLM2-135M")
    p.add_argument("--sft-steps", type=int, default=50)
    p.add_argument("--dpo-steps", type=int, default=8)
    p.add_argument("--sft-only", action="store_true", help="one SFT job, no orchestrator")
    p.add_argument("--home", help="data dir (default: $MLXU_HOME or ~/.mlxu)")
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from clients import demo

    return demo.run(args.sft_steps, args.dpo_steps, home=args.home, sft_only=args.sft_only)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in GLOBAL_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    try:
        return args.func(args)
    except ClientError as e:
        eprint(f"error: {e}")
    except config.ConfigError as e:
        eprint(f"config error: {e}")
    except KeyboardInterrupt:
        eprint("interrupted")
        return 130
    except BrokenPipeError:  # `mlxu jobs list | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except Exception as e:  # noqa: BLE001 - a user sees one line, not a traceback
        if os.environ.get("MLXU_DEBUG"):
            raise
        eprint(f"error: {type(e).__name__}: {e} (MLXU_DEBUG=1 shows a traceback)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
