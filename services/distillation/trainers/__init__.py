"""Distillation trainers; each exposes ``run(config, ctx) -> CheckpointInfo``.

Dotted names for the job runner: ``services.distillation.trainers.kd:run`` (job kind
"distill"). The config is the DistillationSpec as a plain dict; see services.distillation.validate.
"""

from services import registry

TRAINERS = {m.name: m.trainer for m in registry.of_service("distillation")}
