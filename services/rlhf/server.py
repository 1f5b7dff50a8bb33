"""RLHF service (port 8400): the RLHF methods' jobs (services.registry: reward model, DPO,
PPO, GRPO, ...) and Score; thin servicers over the shared job host. Every config is validated
by the trainer's own config class (the same code the worker runs) plus every dataset row,
before a job exists."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from mlx_unified.v1 import common_pb2, common_pb2_grpc, rlhf_pb2, rlhf_pb2_grpc
from services import registry
from services.runtime import specs
from services.runtime.errors import InvalidArgument, Violations
from services.runtime.paths import confine, confine_tree
from services.runtime.refs import resolve_dataset, resolve_model_ref
from services.runtime.rpc.jobs_servicer import JobServicer, JobsHost
from services.runtime.rpc.server import ServiceHandle
from services.runtime.rpc.starts import add_start_handlers
from services.runtime.settings import Settings


def _unresolved(method: registry.Method, spec: Any) -> dict[str, Any]:
    """The spec as a trainer config dict, model references as given (not resolved)."""
    config = specs.to_dict(spec)
    if method.has_reference and "reference" not in config:
        config["reference"] = dict(config.get(method.model_field) or {})
    return config


def check_spec(spec: Any, prefix: str = "spec") -> None:
    """Every rule of the spec's trainer that needs no file: its config schema (the
    orchestrator runs this on its stages too)."""
    from services.rlhf import validate

    method = registry.by_spec(spec)
    try:
        validate.check(method.name, _unresolved(method, spec), rows=False)
    except InvalidArgument as e:
        raise InvalidArgument(specs.reprefix(e.violations, prefix)) from None


def _reward_checkpoint(raw: str, settings: Settings, field: str) -> str:
    """A reward checkpoint directory, confined by its real path and every file's in it."""
    path = confine(raw, settings.allowed_roots, field)
    if path.is_dir():
        confine_tree(path, settings.allowed_roots, field, raw=raw)
    return str(path)


def rlhf_config(spec: Any, settings: Settings) -> dict[str, Any]:
    """An RLHF spec (any method's) as its trainer's config: model references resolved and
    confined, the reference made explicit, every field and dataset row validated."""
    from services.rlhf import validate

    method = registry.by_spec(spec)
    model = method.model_field
    config = specs.to_dict(spec)
    found = Violations()  # every problem at once: the references', the fields', the rows'
    policy = found.attempt(resolve_model_ref, getattr(spec, model), settings, f"spec.{model}")
    if policy is not None:
        config[model] = policy
    if method.has_reference:
        # The reference is explicit in the resolved config: the given one, else the policy's
        # starting checkpoint (base + its adapter), never silently the bare base model.
        if spec.reference.model:
            ref = found.attempt(resolve_model_ref, spec.reference, settings, "spec.reference")
        else:
            ref = dict(config.get(model) or {})
        if ref is not None:
            config["reference"] = ref
    if method.rollouts and spec.reward.reward_model.model:
        # A reward checkpoint (adapter or full dir + value head), not a plain model.
        field = "spec.reward.reward_model.model"
        path = found.attempt(_reward_checkpoint, spec.reward.reward_model.model, settings, field)
        if path is not None:
            config["reward"]["reward_model"] = {"model": path, "adapter_path": ""}
    counts: dict[str, int] = {}
    dataset = found.attempt(
        resolve_dataset, spec.dataset, settings, "spec.dataset", method.formats, counts
    )
    if dataset is not None:
        config["dataset"] = dataset
    if method.rollouts and "rows" in counts:
        found.check(
            spec.rollout.batch_size <= counts["rows"],
            "spec.rollout.batch_size",
            f"{spec.rollout.batch_size} is larger than the dataset ({counts['rows']} prompts)",
        )
    # Rows are read only from a dataset that resolved.
    built = found.attempt(validate.check, method.name, config, rows=dataset is not None)
    found.raise_if_any()
    return built.to_dict()


@add_start_handlers("rlhf")
class RLHFServicer(rlhf_pb2_grpc.RLHFServiceServicer):
    """Every RLHF method's Start RPC from services.registry (see rpc/starts.py), and Score."""

    def __init__(self, host: JobsHost) -> None:
        from services.rlhf.scoring import ScorerCache
        from services.runtime.rpc.generation_servicer import Admission

        self.host = host
        limits = host.settings.limits
        self.scorers = ScorerCache()
        self.admission = Admission(limits.generate_concurrency, limits.generate_queue)

    async def Score(
        self, request: rlhf_pb2.ScoreRequest, context: aio.ServicerContext
    ) -> rlhf_pb2.ScoreResponse:
        """Bounded as Generate is: items by count and tokens, the call by its deadline (or
        MLXU_GENERATE_MAX_SECONDS), admission by the generation queue's limits."""
        from services.rlhf import scoring
        from services.rlhf.validate import check_score
        from services.runtime.rpc.generation_servicer import CallBudget

        if not request.items:
            raise InvalidArgument.one("items", "must not be empty")
        for n, item in enumerate(request.items):
            if not (item.prompt or item.completion):
                raise InvalidArgument.one(f"items[{n}]", "needs a prompt or a completion")
        limits = self.host.settings.limits
        path = _reward_checkpoint(
            request.reward_model.model, self.host.settings, "reward_model.model"
        )
        check_score({"model": path})
        items = [(i.prompt, i.completion) for i in request.items]
        call = CallBudget(context, float(limits.generate_max_seconds))
        await self.admission.acquire()

        def work() -> list[float]:
            try:
                return scoring.score(
                    self.scorers,
                    path,
                    items,
                    max_tokens=limits.generate_max_prompt_tokens,
                    should_stop=call.should_stop,
                )
            finally:
                self.admission.release()

        try:
            scores = await asyncio.to_thread(work)
        except scoring.Stopped as exc:
            raise call.stopped(exc) from None
        return rlhf_pb2.ScoreResponse(scores=scores)


async def register(server: aio.Server, settings: Settings) -> ServiceHandle:
    host = JobsHost.open(settings)
    rlhf_pb2_grpc.add_RLHFServiceServicer_to_server(RLHFServicer(host), server)
    common_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(host), server)
    names = [
        rlhf_pb2.DESCRIPTOR.services_by_name["RLHFService"].full_name,
        common_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    ]
    return ServiceHandle(names=names, on_start=host.on_start, on_stop=host.on_stop)
