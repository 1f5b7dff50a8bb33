"""`mlxu pipeline` and `mlxu templates`: create pipelines, start, list, show and follow runs.

Split from cli.py by area: everything that talks to the orchestrator.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from clients import config, progress, progress_runs
from clients.cli_common import _pairs, _table, _when, eprint, make_client, to_json
from clients.client import ClientError, MLXUClient
from mlx_unified.v1 import orchestrator_pb2


def follow_run(client: MLXUClient, run_id: str, args: argparse.Namespace) -> int:
    run = client.get_run(run_id)
    display = progress_runs.RunProgress(run, sys.stderr)

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
    lines += ["  " + progress_runs.stage_line(s, name_width=w) for s in run.stages]
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
