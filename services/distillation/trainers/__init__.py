"""Distillation trainers; each exposes ``run(config, ctx) -> CheckpointInfo``.

Dotted names for the job runner: ``services.distillation.trainers.kd:run`` (job kind
"distill"). The config is the DistillationSpec as a plain dict; see services.distillation.validate.
"""

TRAINERS = {"distill": "services.distillation.trainers.kd:run"}
