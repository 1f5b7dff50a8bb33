"""What every `mlxu` command shares: printing, JSON output, KEY=VALUE flags, the client.

Split from cli.py with the commands (cli_serve, cli_jobs, cli_generate, cli_pipelines), which
all import these helpers; cli.py keeps the parser and main() and re-exports the public names.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from clients import config
from clients.client import TLS, MLXUClient


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
