"""`mlxu generate`: stream a completion from a model (and adapter) to stdout.

Split from cli.py by area: the one command that samples rather than trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clients import config
from clients.cli_common import eprint, make_client
from mlx_unified.v1 import generation_pb2


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
