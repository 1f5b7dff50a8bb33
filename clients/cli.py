"""`mlxu`: run the services, submit and follow jobs and pipelines, sample from checkpoints.

    mlxu up                                               # the four services + HTTP gateway
    mlxu train sft --config run.yaml --iters 200          # submit, live progress, checkpoint path
    mlxu jobs list | show JOB | watch JOB | cancel JOB
    mlxu generate --model smollm2-135m-instruct --chat --prompt "Hello"
    mlxu pipeline create --template {template} --model M --data D --run
    mlxu templates                  # what --template takes: {templates}
    mlxu models list | show NAME | tag NAME ALIAS VERSION   # the model registry

Exit codes: 0 success, 1 the job/run FAILED or was CANCELLED, 2 a usage, config or RPC error
(one line per problem on stderr, never a traceback; MLXU_DEBUG=1 shows one), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from clients import cli_models, config

# The commands live in cli_*.py by area; their public names (and helpers callers use) are
# re-exported here, the module `mlxu` and earlier code import them from.
from clients.cli_common import eprint, make_client, to_json  # noqa: F401
from clients.cli_generate import cmd_generate
from clients.cli_jobs import (  # noqa: F401
    TRAIN_KINDS,
    _train_overrides,
    cmd_export,
    cmd_jobs,
    cmd_train,
    follow_job,
)
from clients.cli_pipelines import cmd_pipeline, cmd_templates, follow_run  # noqa: F401
from clients.cli_serve import SERVABLE, cmd_serve, cmd_up
from clients.client import TRAINER_SERVICES, ClientError
from services import registry

JOB_STATES = ["pending", "running", "succeeded", "failed", "cancelled"]


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
    from orchestrator import templates  # the real template names, for the help text

    names = templates.names()
    parser = argparse.ArgumentParser(
        prog="mlxu",
        description=__doc__.format(template=names[0], templates=", ".join(names)),
        parents=[_global_flags()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _cmd(sub, "serve", cmd_serve, "run one service in the foreground")
    p.add_argument("service", choices=SERVABLE, help="a gRPC service, or the HTTP gateway")
    p.add_argument("--host", help="bind address (default: $MLXU_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: $MLXU_<SERVICE>_PORT or the standard)")
    p.add_argument("--home", help="data dir (default: $MLXU_HOME or ~/.mlxu)")

    p = _cmd(sub, "up", cmd_up, "run all services until Ctrl-C")
    p.add_argument("--host")
    p.add_argument("--home")
    p.add_argument("--services", help="comma-separated subset (default: all, gateway too)")
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
    p.add_argument("--template", help=f"template name: {', '.join(names)} (`mlxu templates`)")
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
    cli_models.add_parser(sub, _cmd)

    p = _cmd(sub, "demo", cmd_demo, "the quick start: chatbot template on SmolLM2-135M")
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--dpo-steps", type=int, default=4)
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
