"""Remote teachers without a model server: which specs validation accepts, how the OpenAI
backend reads a vLLM-style echo answer (a fake server on loopback), the top-k buckets."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from services.distillation.trainers import teacher_backends
from services.distillation.trainers.teacher_openai import OpenAIBackend, _buckets
from services.runtime.errors import InvalidArgument
from services.schema.common import RemoteSettings
from services.schema.distill import DistillSettings

REMOTE = {"model": {"model": "teacher"}, "remote": {"address": "127.0.0.1:50061"}}


def spec(**over: object) -> dict:
    return {"student": {"model": "s"}, "dataset": {"path": "d.jsonl"}, "teachers": [REMOTE], **over}


def fields(d: dict) -> set[str]:
    with pytest.raises(InvalidArgument) as e:
        DistillSettings.from_dict(d, prefix="spec")
    return {v.field for v in e.value.violations}


def test_remote_teachers_are_accepted_and_their_limits_named() -> None:
    s = DistillSettings.from_dict(spec(), prefix="spec")
    assert s.teachers[0].backend.kind == "grpc"
    DistillSettings.from_dict(spec(teachers=[{"model": {"model": "m"}, "endpoint": "h:1"}]))
    assert fields(spec(features={"enabled": True})) == {"spec.features.enabled"}
    assert fields(spec(student_init={"num_layers": 2})) == {"spec.student_init"}
    assert fields(spec(teachers=[REMOTE, {"model": {"model": "t2"}}])) == {
        "spec.teachers[0].remote"
    }
    routed = [
        {**REMOTE, "route_value": "a"},
        {"model": {"model": "t2"}, "route_value": "b"},
    ]
    DistillSettings.from_dict(spec(teachers=routed, route_field="domain"), prefix="spec")
    assert fields(spec(teachers=[{**REMOTE, "quantize_bits": 4}])) == {
        "spec.teachers[0].quantize_bits"
    }


def test_buckets_keep_the_top_k_within_the_vocabulary_and_the_rest_mass() -> None:
    rows = [{5: math.log(0.5), 7: math.log(0.2), 900: math.log(0.25)}]
    idx, top, rest = _buckets(rows, 2, vocab=512)  # id 900 is past the shared vocabulary
    assert idx.tolist() == [[5, 7]]
    np.testing.assert_allclose(np.exp(top), [[0.5, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(rest), [0.3], rtol=1e-5)


class _Tok:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]


class _Echo(BaseHTTPRequestHandler):
    """vLLM's answer to echo + logprobs + return_tokens_as_token_ids."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else _Tok().encode(prompt)
        k = body["logprobs"]
        tops = [None] + [
            {f"token_id:{(t + j) % 50}": math.log(0.5 / (j + 1)) for j in range(k)} for t in ids[1:]
        ]
        out = {
            "choices": [
                {"logprobs": {"tokens": [f"token_id:{t}" for t in ids], "top_logprobs": tops}}
            ]
        }
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        return None


def test_openai_echo_mode_reads_prompt_logprobs() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s = RemoteSettings.from_dict(
            {"kind": "openai", "address": f"http://127.0.0.1:{server.server_port}/v1"}
        )
        b = OpenAIBackend(s, "m", 0, _Tok())
        assert b.max_top_k == 20 and b.mode == "echo"
        assert b.same_tokenizer({})
        ((idx, top, rest),) = b.topk([np.array([3, 9, 4])], 2, vocab=512)
        # Position j is the distribution after tokens[0..j]: the echo entry of token j + 1.
        assert idx.tolist() == [[9, 10], [4, 5], [0, 1]]
        np.testing.assert_allclose(np.exp(top[0]), [0.5, 0.25], rtol=1e-6)
        np.testing.assert_allclose(np.exp(rest), [0.25] * 3, rtol=1e-5)
    finally:
        server.shutdown()


def test_scorer_fills_positions_past_a_row_like_the_cache() -> None:
    class Fake:
        kind, hidden_states, max_top_k = "grpc", False, 8

        def topk(self, seqs, k, vocab):  # noqa: ANN001, ANN202
            return [
                (
                    np.ones((len(q), k), np.int32),
                    np.zeros((len(q), k), np.float32),
                    np.zeros(len(q), np.float32),
                )
                for q in seqs
            ]

    import mlx.core as mx

    sc = teacher_backends.TopKScorer([Fake()], 512, 2)
    idx, top, rest = sc(mx.ones((2, 1)), mx.zeros((2, 4), mx.int32), [3, 0])
    assert idx.shape == (2, 4, 2) and top[0, :3].max() == 0 and top[0, 3].max() == -1e30
    assert top[1].max() == -1e30
    batch = {"loss_mask": mx.array([[0, 1, 1, 0], [0, 0, 0, 0]]), "lengths": mx.array([5, 2])}
    assert teacher_backends.positions_of(batch) == [4, 1]
