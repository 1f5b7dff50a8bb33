"""Where a teacher runs: here (``local``, the default) or in another process (``grpc``: our
GenerationService; ``openai``: the completions API, in teacher_openai.py).

A backend answers one question: for token sequences of the student's tokenizer, the
teacher's top-k next-token log-probabilities at every position, plus the log of the mass
outside them — the format of the top-k teacher cache (teachers.TeacherCache), so a remote
teacher feeds the same loss (losses.cached_token_terms) as a cached local one. Only a local
teacher has hidden states (feature matching); validation refuses features otherwise.

The gRPC imports of the distillation trainers live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import mlx.core as mx
import numpy as np

from mlx_unified.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.distillation.trainers import losses, teachers
from services.runtime import remote
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.tokenizer_sig import fingerprint, same_tokenizer, signature_from_text
from services.schema.common import RemoteSettings

# One array triple per sequence: idx int32 [n, k], top float32 [n, k], rest float32 [n].
SeqTopK = tuple[np.ndarray, np.ndarray, np.ndarray]
TOKENIZER_MISMATCH = "teachers[{i}] uses a different tokenizer than the student"


class TeacherBackend(Protocol):
    kind: str
    hidden_states: bool  # can give block outputs (feature matching)
    max_top_k: int

    def vocab_size(self) -> int:
        """Width of the teacher's output distribution."""
        ...

    def same_tokenizer(self, student_sig: dict) -> bool:
        """Whether the teacher gives the student's token ids to the same text."""
        ...

    def topk(self, seqs: Sequence[np.ndarray], k: int, vocab: int) -> list[SeqTopK]:
        """Top-k over the first ``vocab`` ids at every position of each sequence."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """A teacher loaded in this process (what every job did before remote teachers)."""

    kind = "local"
    hidden_states = True
    max_top_k = 1 << 30

    def __init__(self, teacher: teachers.Teacher) -> None:
        self.teacher = teacher

    def vocab_size(self) -> int:
        return teachers.output_vocab(self.teacher.model)

    def same_tokenizer(self, student_sig: dict) -> bool:
        return same_tokenizer(student_sig, teachers.tokenizer_signature(self.teacher.tokenizer))

    def topk(self, seqs: Sequence[np.ndarray], k: int, vocab: int) -> list[SeqTopK]:
        toks, lengths = pad(seqs)
        w = mx.ones((len(seqs), 1), mx.float32)
        idx, top, rest = teachers.combined_topk([self.teacher], w, mx.array(toks), vocab, k)
        return [(idx[r, :n], top[r, :n], rest[r, :n]) for r, n in enumerate(lengths)]

    def close(self) -> None:
        return None


def pad(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    lengths = [len(s) for s in seqs]
    toks = np.zeros((len(seqs), max(max(lengths, default=1), 1)), np.int32)
    for r, s in enumerate(seqs):
        toks[r, : len(s)] = s
    return toks, lengths


@dataclass
class _Described:
    fingerprint: str
    vocab_size: int


class GrpcBackend:
    """GenerationService.TopLogprobs / DescribeModel on another process (docs/remote.md)."""

    kind = "grpc"
    hidden_states = False
    max_top_k = 1024
    SEQS_PER_CALL = 64  # keeps requests far below the 4 MiB request limit

    def __init__(self, settings: RemoteSettings, model: str, adapter: str, index: int) -> None:
        self.settings, self.index = settings, index
        self.field = f"spec.teachers[{index}]"
        self.ref = common_pb2.ModelRef(model=settings.model or model, adapter_path=adapter)
        self.channel = remote.grpc_channel(settings, f"{self.field}.remote")
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self._info: _Described | None = None

    def _call(self, method: str, request: object) -> object:
        fn = getattr(self.stub, method)
        what = f"teachers[{self.index}] {method}"
        try:
            return remote.with_retry(
                lambda: fn(request, timeout=self.settings.timeout_seconds), self.settings, what
            )
        except grpc.RpcError as e:  # permanent: the server refused this request
            code = e.code().name if callable(getattr(e, "code", None)) else ""
            msg = f"{what} at {self.settings.address}: {remote.describe(e)}"
            if code == "NOT_FOUND":
                raise NotFound(msg) from None
            if code == "INVALID_ARGUMENT":
                raise InvalidArgument.one(f"{self.field}.model", msg) from None
            raise remote.RemoteRejected(msg) from None

    def describe(self, include_tokenizer: bool = False) -> generation_pb2.DescribeModelResponse:
        req = generation_pb2.DescribeModelRequest(
            model=self.ref, include_tokenizer=include_tokenizer
        )
        resp = self._call("DescribeModel", req)
        self._info = _Described(resp.tokenizer_fingerprint, resp.vocab_size)  # type: ignore[attr-defined]
        return resp  # type: ignore[return-value]

    def vocab_size(self) -> int:
        if self._info is None:
            self.describe()
        return self._info.vocab_size  # type: ignore[union-attr]

    def same_tokenizer(self, student_sig: dict) -> bool:
        if self._info is None:
            self.describe()
        if self._info.fingerprint == fingerprint(student_sig):  # type: ignore[union-attr]
            return True
        # Not identical: the teacher may only add tokens after the student's (padding).
        text = self.describe(include_tokenizer=True).tokenizer_json
        return bool(text) and same_tokenizer(student_sig, signature_from_text(text))

    def topk(self, seqs: Sequence[np.ndarray], k: int, vocab: int) -> list[SeqTopK]:
        out: list[SeqTopK] = []
        for s in range(0, len(seqs), self.SEQS_PER_CALL):
            part = seqs[s : s + self.SEQS_PER_CALL]
            req = generation_pb2.TopLogprobsRequest(
                model=self.ref,
                sequences=[generation_pb2.TokenSequence(token_ids=q.tolist()) for q in part],
                top_k=k,
                vocab_limit=vocab,
            )
            resp = self._call("TopLogprobs", req)
            for r in resp.results:  # type: ignore[attr-defined]
                n = r.positions
                out.append(
                    (
                        np.asarray(r.token_ids, np.int32).reshape(n, k),
                        np.asarray(r.logprobs, np.float32).reshape(n, k),
                        np.asarray(r.rest_logprob, np.float32),
                    )
                )
        return out

    def close(self) -> None:
        self.channel.close()


def open_backend(
    spec: teachers.TeacherSpec, index: int, dtype: str, student_tokenizer: object = None
) -> TeacherBackend:
    """The backend of one teacher spec (loads a local teacher)."""
    r = spec.remote
    if r is None or not r.enabled:
        return LocalBackend(teachers.load_teacher(spec, index, dtype))
    if r.kind == "openai":
        from services.distillation.trainers.teacher_openai import OpenAIBackend

        return OpenAIBackend(r, spec.model, index, student_tokenizer)
    return GrpcBackend(r, spec.model, spec.adapter_path, index)


def check_tokenizers(backends: Sequence[TeacherBackend], student_sig: dict) -> None:
    bad = [i for i, b in enumerate(backends) if not b.same_tokenizer(student_sig)]
    if bad:
        raise InvalidArgument(
            [
                teachers._violation(f"spec.teachers[{i}].model", TOKENIZER_MISMATCH.format(i=i))
                for i in bad
            ]
        )


class TopKScorer:
    """The combined teacher top-k of a batch, in the cache's layout. All local: the mixture
    (teachers.combined_topk, as before). With a remote teacher every row has one teacher
    (a single teacher, or routing: validation refuses a mixture) and each backend scores
    only its rows, only up to each row's last scored position."""

    def __init__(self, backends: Sequence[TeacherBackend], vocab: int, k: int) -> None:
        self.backends, self.vocab, self.k = list(backends), vocab, k
        self.local = all(isinstance(b, LocalBackend) for b in backends)

    def __call__(
        self, weights: mx.array, inputs: mx.array, positions: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.local:
            ts = [b.teacher for b in self.backends]  # type: ignore[attr-defined]
            return teachers.combined_topk(ts, weights, inputs, self.vocab, self.k)
        b, length = inputs.shape
        idx = np.zeros((b, length, self.k), np.int32)
        top = np.full((b, length, self.k), losses.LOG_ZERO, np.float32)
        rest = np.zeros((b, length), np.float32)
        toks = np.array(inputs)
        owner = np.argmax(np.array(weights), axis=1)
        for t, backend in enumerate(self.backends):
            rows = [r for r in range(b) if owner[r] == t and positions[r] > 0]
            if not rows:
                continue
            seqs = [toks[r, : positions[r]] for r in rows]
            for r, (i, p, q) in zip(rows, backend.topk(seqs, self.k, self.vocab), strict=True):
                n = len(q)
                idx[r, :n], top[r, :n], rest[r, :n] = i, p, q
        return idx, top, rest


def positions_of(batch: dict) -> list[int]:
    """Positions of each row worth scoring: up to its last counted target (the rest of a
    row is padding, or masked)."""
    mask = np.array(batch["loss_mask"])
    counted = mask > 0
    last = np.where(counted.any(axis=1), mask.shape[1] - np.argmax(counted[:, ::-1], axis=1), 0)
    if "lengths" in batch:
        n = np.maximum(np.array(batch["lengths"]) - 1, 0)
        last = np.minimum(np.maximum(last, n), mask.shape[1])
    return [int(x) for x in last]
