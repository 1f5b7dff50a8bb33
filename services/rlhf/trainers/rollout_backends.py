"""Where PPO / GRPO rollouts are sampled: here (``local``, the default), our
GenerationService (``grpc``: SampleTokens) or an OpenAI-compatible completions API
(``openai``: mlx_lm.server, vLLM).

A backend samples ``group`` completions per prompt (token ids in, prompt-major out) and
returns their token ids, the per-token log-probs as *it* computed them, and the policy
version that made them. The trainers never train on those log-probs: they recompute them
with their own model (PPO's ratio and GRPO's old log-probs) and only report the gap.

Remote backends name the policy by reference: ``PolicyVersions`` writes it under the job's
output dir every ``rollout.sync_every`` steps, and each request names that directory, which
the server must be able to read (the same filesystem, or the same path mounted).
This is the only trainer module that talks to another process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx

from services.rlhf.trainers import Policy, eos_ids, pad_id
from services.rlhf.trainers.policy_versions import PolicyVersion, PolicyVersions
from services.runtime import remote
from services.runtime.sampler import generate, seed_of_key
from services.schema.common import RemoteSettings
from services.schema.rollouts import RolloutSampling, RolloutSettings


@dataclass
class Samples:
    """``len(prompts) * group`` completions, prompt-major (completion j of prompt i at
    ``i * group + j``); a final end-of-sequence token is kept."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # as the backend computed them (NaN where it gave none)
    finished: list[bool]
    version: int  # the policy version (step) whose weights sampled them


class RolloutBackend(Protocol):
    name: str

    def sample(self, prompts: list[list[int]], group: int, key: mx.array, step: int) -> Samples:
        """Completions of ``prompts`` by the policy as of ``step`` (or an older version)."""
        ...

    def close(self) -> None: ...


def make_backend(rollout: RolloutSettings, policy: Policy, output_dir: Path) -> RolloutBackend:
    backend = rollout.backend
    if not backend.enabled:
        return LocalBackend(policy, rollout.sampling)
    versions = PolicyVersions(output_dir, policy, rollout.sync_every)
    if backend.kind == "openai":
        return OpenAIBackend(backend, policy, rollout.sampling, versions)
    return GrpcBackend(backend, policy, rollout.sampling, versions)


class LocalBackend:
    """The in-memory policy, batched (services.runtime.sampler): always the current step."""

    name = "local"

    def __init__(self, policy: Policy, sampling: RolloutSampling) -> None:
        self.policy, self.sampling = policy, sampling

    def sample(self, prompts: list[list[int]], group: int, key: mx.array, step: int) -> Samples:
        tok = self.policy.tokenizer
        out = generate(
            self.policy.model,
            [p for p in prompts for _ in range(group)],
            self.sampling,
            key,
            eos_ids=eos_ids(tok),
            pad_id=pad_id(tok),
            tokenizer=tok,
        )
        return Samples(out.completion_ids, out.logprobs, out.finished, step)

    def close(self) -> None:
        pass


class _Remote:
    def __init__(
        self,
        settings: RemoteSettings,
        policy: Policy,
        sampling: RolloutSampling,
        versions: PolicyVersions,
    ) -> None:
        self.settings, self.policy = settings, policy
        self.sampling, self.versions = sampling, versions

    def close(self) -> None:
        pass


class GrpcBackend(_Remote):
    """GenerationService.SampleTokens: one call per rollout batch, the sampler's key as its
    seed, so a server running our sampler returns the local backend's exact tokens."""

    name = "grpc"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from mlx_unified.v1 import generation_pb2, generation_pb2_grpc

        self.pb = generation_pb2
        self.channel = remote.grpc_channel(self.settings, "spec.rollout.remote")
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)

    def _model_ref(self, v: PolicyVersion) -> Any:
        from mlx_unified.v1 import common_pb2

        if v.kind == "full":
            return common_pb2.ModelRef(model=str(v.path))
        return common_pb2.ModelRef(model=self.settings.model or v.base, adapter_path=str(v.path))

    def sample(self, prompts: list[list[int]], group: int, key: mx.array, step: int) -> Samples:
        v = self.versions.at(step)
        s = self.sampling
        req = self.pb.SampleTokensRequest(
            model=self._model_ref(v),
            prompts=[self.pb.TokenSequence(token_ids=p) for p in prompts],
            n=group,
            sampling=self.pb.SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                max_tokens=s.max_tokens,
                stop=list(s.stop),
            ),
            seed=seed_of_key(key),
            policy_version=v.step,
        )
        timeout = self.settings.timeout_seconds
        resp = remote.with_retry(
            lambda: self.stub.SampleTokens(req, timeout=timeout), self.settings, "rollout"
        )
        got = list(resp.completions)
        if len(got) != len(prompts) * group:
            raise remote.RemoteRejected(
                f"rollout server answered {len(got)} completions for "
                f"{len(prompts)} prompts x {group}"
            )
        stop = self.pb.FINISH_REASON_STOP
        return Samples(
            [list(c.token_ids) for c in got],
            [list(c.logprobs) for c in got],
            [c.finish_reason == stop for c in got],
            int(resp.policy_version),
        )

    def close(self) -> None:
        self.channel.close()


class OpenAIBackend(_Remote):
    """``POST <address>/completions`` per completion with ``logprobs``; the policy version's
    adapter as mlx_lm.server's ``adapters`` field (full weights: as ``model``).

    The API takes text, so each prompt is decoded (a leading BOS dropped when the server
    will add its own) and re-tokenised by the server; the trainer keeps its own prompt ids, and the
    log-prob gap shows any mismatch. Token ids come from mlx_lm.server's
    ``logprobs.content[].id`` or vLLM's ``return_tokens_as_token_ids``. The log-probs are
    the server's (mlx_lm: the untempered distribution; equal to ours at temperature 1)."""

    name = "openai"
    WORKERS = 4

    def sample(self, prompts: list[list[int]], group: int, key: mx.array, step: int) -> Samples:
        v = self.versions.at(step)
        tok = self.policy.tokenizer
        base_seed = seed_of_key(key)
        texts = [self._prompt_text(p) for p in prompts]
        jobs = [(texts[i], (base_seed + i * group + j) % 2**63) for i in range(len(prompts))
                for j in range(group)]  # fmt: skip
        with ThreadPoolExecutor(self.WORKERS) as pool:
            outs = list(pool.map(lambda job: self._one(job[0], job[1], v), jobs))
        eos = eos_ids(tok)
        ids, lps, done = [], [], []
        for toks, lp, reason in outs:
            if reason == "stop" and not self.sampling.stop and (not toks or toks[-1] not in eos):
                # A server that drops the end-of-sequence token (vLLM): ours keep it.
                toks, lp = [*toks, int(tok.eos_token_id)], [*lp, float("nan")]
            ids.append(toks)
            lps.append(lp)
            done.append(reason == "stop")
        return Samples(ids, lps, done, v.step)

    def _prompt_text(self, ids: list[int]) -> str:
        tok = self.policy.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        # Drop a leading BOS only when encoding adds one (the server will): in a ChatML
        # tokenizer the "BOS" may be <|im_start|>, the template's own first token.
        if bos is not None and ids and ids[0] == bos and tok.encode("x")[:1] == [bos]:
            ids = ids[1:]
        return tok.decode(ids)

    def _body(self, prompt: str, seed: int, v: PolicyVersion) -> dict[str, Any]:
        s = self.sampling
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p if 0 < s.top_p < 1 else 1.0,
            "logprobs": True,
            "seed": seed,
            "return_tokens_as_token_ids": True,  # vLLM: tokens as "token_id:<id>"
        }
        if s.top_k > 0:
            body["top_k"] = s.top_k
        if s.stop:
            body["stop"] = list(s.stop)
        if v.kind == "full":
            body["model"] = str(v.path)
        else:  # mlx_lm.server only applies `adapters` to a model named explicitly
            body["model"] = self.settings.model or v.base
            body["adapters"] = str(v.path)
        return body

    def _one(self, prompt: str, seed: int, v: PolicyVersion) -> tuple[list[int], list[float], str]:
        body = self._body(prompt, seed, v)
        answer = remote.with_retry(
            lambda: remote.post_json(self.settings, "completions", body), self.settings, "rollout"
        )
        try:
            choice = answer["choices"][0]
            return (*parse_logprobs(choice.get("logprobs") or {}), choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise remote.RemoteRejected(
                f"rollout server's completion has no token ids / logprobs: {e}"
            ) from e


def parse_logprobs(lp: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Token ids and log-probs of one choice: mlx_lm.server's ``content: [{id, logprob}]``
    or the legacy ``tokens`` ("token_id:<id>") + ``token_logprobs`` (vLLM)."""
    if "content" in lp:
        items = lp["content"] or []
        return [int(t["id"]) for t in items], [float(t["logprob"]) for t in items]
    tokens = lp["tokens"]
    ids = [int(str(t).rsplit(":", 1)[1]) for t in tokens]
    return ids, [float("nan") if x is None else float(x) for x in lp["token_logprobs"]]


def staleness_error(step: int, version: int, bound: int) -> str:
    return (
        f"rollouts of policy version {version} are {step - version} steps behind step {step}; "
        f"rollout.max_staleness is {bound}"
    )
