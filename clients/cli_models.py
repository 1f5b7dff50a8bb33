"""`mlxu models`: the model registry (list, show, tag, untag, register, rm).

    mlxu models list
    mlxu models show chat-bot            # versions, aliases (chat-bot@2, chat-bot:prod: one)
    mlxu models register chat-bot --run RUN_ID        # or --path CHECKPOINT_DIR
    mlxu models tag chat-bot production 2             # then base_model: chat-bot:production
    mlxu models rm chat-bot@1

Split from cli.py by area; cli.py calls ``add_parser`` and re-exports ``cmd_models``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from clients import config
from clients.cli_common import _table, _when, eprint, make_client, to_json
from clients.client import MLXUClient
from mlx_unified.v1 import common_pb2 as cpb
from mlx_unified.v1 import registry_pb2 as rpb
from orchestrator.model_refs import parse


def add_parser(sub: Any, cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """The `models` subcommands, on ``sub`` (``cmd`` is cli.py's ``_cmd``)."""
    models = cmd(sub, "models", cmd_models, "the model registry: named, versioned checkpoints")
    msub = models.add_subparsers(dest="models_cmd", required=True, metavar="ACTION")
    cmd(msub, "list", cmd_models, "list registered models")
    p = cmd(msub, "show", cmd_models, "a model's versions and aliases, or one version")
    p.add_argument("ref", help="NAME, NAME@VERSION or NAME:ALIAS")
    p = cmd(msub, "tag", cmd_models, "point an alias at a version")
    p.add_argument("name")
    p.add_argument("alias")
    p.add_argument("version", type=int)
    p = cmd(msub, "untag", cmd_models, "remove an alias")
    p.add_argument("name")
    p.add_argument("alias")
    p = cmd(msub, "register", cmd_models, "register a checkpoint or a run's result")
    p.add_argument("name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--path", help="checkpoint directory (under an allowed root)")
    src.add_argument("--run", help="a run id: its result, with lineage")
    p.add_argument("--stage", default="", help="with --run: this stage's result")
    p.add_argument("--description", default="")
    p = cmd(msub, "rm", cmd_models, "delete a version (refused while a live run uses it)")
    p.add_argument("ref", help="NAME@VERSION")


_KIND = {cpb.CHECKPOINT_KIND_ADAPTER: "adapter", cpb.CHECKPOINT_KIND_FULL: "full"}


def _ref(text: str) -> tuple[str, int, str]:
    parsed = parse(text)
    if parsed is None:
        raise config.ConfigError("ref", f"{text!r} is not NAME, NAME@VERSION or NAME:ALIAS")
    name, version, alias, _ = parsed
    return name, version, alias


def _version_lines(v: rpb.ModelVersion) -> list[str]:
    c = v.checkpoint
    lines = [
        f"{v.name}@{v.version}" + (f"  ({', '.join(v.aliases)})" if v.aliases else ""),
        f"  checkpoint: {c.path}  [{_KIND.get(c.kind, '-')}]",
        f"  sha256:     {c.sha256 or '-'}",
        f"  base model: {v.base_model or '-'}",
        f"  registered: {_when(v.create_time)}",
    ]
    if c.metrics:
        lines.append(
            "  metrics:    " + ", ".join(f"{k}={m:.4g}" for k, m in sorted(c.metrics.items()))
        )
    lin = v.lineage
    if lin.run_id:
        lines.append(f"  lineage:    run {lin.run_id} (pipeline {lin.pipeline_id})")
        for s in lin.stages:
            lines.append(
                f"    {s.stage}: job {s.job_id or '-'} on {s.service}  {s.checkpoint.path}"
            )
    return lines


def _show(client: MLXUClient, args: argparse.Namespace) -> int:
    name, version, alias = _ref(args.ref)
    if version or alias:
        v = client.get_model_version(name, version or None, alias or None)
        print(to_json(v) if args.json else "\n".join(_version_lines(v)))
        return 0
    m = client.get_model(name)
    if args.json:
        print(to_json(m))
        return 0
    tags = ", ".join(f"{a} -> {n}" for a, n in sorted(m.aliases.items())) or "none"
    print(f"{m.name}: {len(m.versions)} version(s), aliases: {tags}")
    for v in m.versions:
        print("\n".join(_version_lines(v)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        cmd = args.models_cmd
        if cmd == "list":
            models = list(client.list_models())
            if args.json:
                print(json.dumps([json.loads(to_json(m, None)) for m in models], indent=2))
                return 0
            rows = [
                [m.name, str(m.latest_version or "-"),
                 ", ".join(f"{a}->{n}" for a, n in sorted(m.aliases.items())) or "-",
                 _when(m.create_time)]
                for m in models
            ]  # fmt: skip
            _table(rows, ["NAME", "LATEST", "ALIASES", "CREATED"])
            return 0
        if cmd == "show":
            return _show(client, args)
        if cmd == "tag":
            v = client.set_alias(args.name, args.alias, args.version)
            eprint(f"{args.name}:{args.alias} -> {v.version}")
            return 0
        if cmd == "untag":
            client.delete_alias(args.name, args.alias)
            eprint(f"removed {args.name}:{args.alias}")
            return 0
        if cmd == "register":
            v = client.register_model(
                args.name, path=args.path or "", run_id=args.run or "", stage=args.stage,
                description=args.description,
            )  # fmt: skip
            print(to_json(v) if args.json else f"{v.name}@{v.version}")
            return 0
        name, version, _ = _ref(args.ref)
        if not version:
            raise config.ConfigError("ref", "rm takes NAME@VERSION")
        client.delete_model_version(name, version)
        eprint(f"deleted {name}@{version}")
        return 0
