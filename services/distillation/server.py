"""Distillation service (port 8300): StartDistillation + JobService, thin over the job host."""

from __future__ import annotations

from typing import Any

from grpc import aio

from mlx_unified.v1 import common_pb2, common_pb2_grpc, distillation_pb2, distillation_pb2_grpc
from services import registry
from services.runtime import specs
from services.runtime.errors import InvalidArgument, Violations
from services.runtime.refs import resolve_dataset, resolve_model_ref
from services.runtime.rpc.jobs_servicer import JobServicer, JobsHost
from services.runtime.rpc.server import ServiceHandle
from services.runtime.rpc.starts import add_start_handlers
from services.runtime.settings import Settings

FORMATS = registry.get("distill").formats


def check_spec(spec: distillation_pb2.DistillationSpec, prefix: str = "spec") -> None:
    """Every distillation rule that needs no file (the orchestrator runs it on its stages)."""
    from services.distillation.validate import parse

    try:
        parse(specs.to_dict(spec))
    except InvalidArgument as e:
        raise InvalidArgument(specs.reprefix(e.violations, prefix)) from None


def distill_config(spec: distillation_pb2.DistillationSpec, settings: Settings) -> dict[str, Any]:
    """Validate a DistillationSpec (every field, every file it names) into the trainer config."""
    from services.distillation.validate import parse, validate

    config = specs.to_dict(spec)
    v = Violations()  # every problem at once: the references', then the fields' and files'
    if spec.student.model:
        student = v.attempt(resolve_model_ref, spec.student, settings, "spec.student")
        if student is not None:
            config["student"] = student
    for i, teacher in enumerate(spec.teachers):
        if teacher.endpoint:
            continue  # the schema refuses it, named spec.teachers[i].endpoint
        where = f"spec.teachers[{i}].model"
        ref = v.attempt(resolve_model_ref, teacher.model, settings, where)
        if ref is not None:
            config["teachers"][i]["model"] = ref
    dataset = v.attempt(resolve_dataset, spec.dataset, settings, "spec.dataset", FORMATS)
    if dataset is not None:
        config["dataset"] = dataset
    if v.items:  # a reference did not resolve: the fields still, no files
        v.attempt(parse, config)
        v.raise_if_any()
    validate(config)  # the one validation: every field, then every file it names
    return config


@add_start_handlers("distillation")
class DistillationServicer(distillation_pb2_grpc.DistillationServiceServicer):
    """StartDistillation, from services.registry (see rpc/starts.py)."""

    def __init__(self, host: JobsHost) -> None:
        self.host = host


async def register(server: aio.Server, settings: Settings) -> ServiceHandle:
    host = JobsHost.open(settings)
    distillation_pb2_grpc.add_DistillationServiceServicer_to_server(
        DistillationServicer(host), server
    )
    common_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(host), server)
    names = [
        distillation_pb2.DESCRIPTOR.services_by_name["DistillationService"].full_name,
        common_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    ]
    return ServiceHandle(names=names, on_start=host.on_start, on_stop=host.on_stop)
