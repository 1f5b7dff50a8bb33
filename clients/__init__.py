"""Python client and `mlxu` CLI for the MLX Unified Training services.

from clients import MLXUClient, build_spec
spec = build_spec("sft", {"model": "smollm2-135m-instruct", "data": "train.jsonl"}).spec
with MLXUClient() as client:
    job = client.start_sft(spec)
    final = client.wait_job(job.job_id)
"""

from clients.client import TLS, ClientError, FieldViolation, MLXUClient, Started, health_status
from clients.config import ConfigError, build_pipeline, build_spec, load_spec, load_yaml

__all__ = [
    "TLS",
    "ClientError",
    "ConfigError",
    "FieldViolation",
    "MLXUClient",
    "Started",
    "build_pipeline",
    "build_spec",
    "health_status",
    "load_spec",
    "load_yaml",
]
