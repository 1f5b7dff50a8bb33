"""The generation calls of MLXUClient: sampling and scoring on a model, rewards from an RM.

Split from client.py so the request building for generation (model refs, chat turns,
prompt / completion pairs) sits with the calls that use it. ``GenerationCalls`` is a base
class of MLXUClient; client.py re-exports ``model_ref``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from clients.client_connection import ClientError, Connection
from mlx_unified.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    rlhf_pb2,
    rlhf_pb2_grpc,
)


def model_ref(model: str | common_pb2.ModelRef, adapter: str | None = None) -> common_pb2.ModelRef:
    ref = common_pb2.ModelRef()
    if isinstance(model, common_pb2.ModelRef):
        ref.CopyFrom(model)
    else:
        ref.model = model
    if adapter:
        ref.adapter_path = adapter
    return ref


def _chat(messages: Iterable[Any]) -> generation_pb2.ChatConversation:
    conv = generation_pb2.ChatConversation()
    for m in messages:
        if isinstance(m, generation_pb2.ChatMessage):
            conv.messages.append(m)
        elif isinstance(m, Mapping):
            conv.messages.add(role=str(m["role"]), content=str(m["content"]))
        else:
            role, content = m
            conv.messages.add(role=str(role), content=str(content))
    return conv


def _pairs(items: Iterable[Any]) -> list[generation_pb2.PromptCompletion]:
    out = []
    for it in items:
        if isinstance(it, generation_pb2.PromptCompletion):
            out.append(it)
        elif isinstance(it, Mapping):
            out.append(
                generation_pb2.PromptCompletion(prompt=it["prompt"], completion=it["completion"])
            )
        else:
            prompt, completion = it
            out.append(generation_pb2.PromptCompletion(prompt=prompt, completion=completion))
    return out


class GenerationCalls(Connection):
    """Generate / ScoreCompletions on the training service and Score on the RLHF service."""

    def generate_stream(
        self,
        model: str | common_pb2.ModelRef,
        prompt: str | None = None,
        *,
        messages: Iterable[Any] | None = None,
        adapter: str | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        repetition_penalty: float = 0.0,
        return_logprobs: bool = False,
        service: str = "training",
    ) -> Iterator[generation_pb2.GenerateResponse]:
        """The raw response chunks (text, token ids, finish reason, token counts, speed)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        sampling = generation_pb2.SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            stop=list(stop),
            repetition_penalty=repetition_penalty,
        )
        if seed is not None:
            sampling.seed = seed
        req = generation_pb2.GenerateRequest(
            model=model_ref(model, adapter), sampling=sampling, return_logprobs=return_logprobs
        )
        if messages is not None:
            req.chat.CopyFrom(_chat(messages))
        else:
            req.prompt = prompt or ""
        stub = generation_pb2_grpc.GenerationServiceStub
        call = self._stream(service, stub, "Generate", req)
        try:
            yield from call
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e, self.address_of(service)) from None
        finally:
            call.cancel()

    def generate(
        self, model: str | common_pb2.ModelRef, prompt: str | None = None, **kw: Any
    ) -> Iterator[str]:
        """The completion as text chunks, as they are sampled (see generate_stream)."""
        for chunk in self.generate_stream(model, prompt, **kw):
            if chunk.text:
                yield chunk.text

    def score_completions(
        self,
        model: str | common_pb2.ModelRef,
        items: Iterable[Any],
        adapter: str | None = None,
        service: str = "training",
    ) -> list[generation_pb2.CompletionScore]:
        """Log-probabilities of (prompt, completion) pairs under a model."""
        req = generation_pb2.ScoreCompletionsRequest(
            model=model_ref(model, adapter), items=_pairs(items)
        )
        stub = generation_pb2_grpc.GenerationServiceStub
        return list(self._call(service, stub, "ScoreCompletions", req).scores)

    def score(self, reward_model: str | common_pb2.ModelRef, items: Iterable[Any]) -> list[float]:
        """Rewards of (prompt, completion) pairs from a reward-model checkpoint (RLHF service)."""
        req = rlhf_pb2.ScoreRequest(reward_model=model_ref(reward_model), items=_pairs(items))
        return list(self._call("rlhf", rlhf_pb2_grpc.RLHFServiceStub, "Score", req).scores)
