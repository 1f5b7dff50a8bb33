"""The orchestrator: multi-stage pipelines sequenced across the trainer services.

pipeline    PipelineSpec validation, stage kinds, binding resolution -> Plan
autoconfig  auto_configure rules (model size, data size, memory) -> filled stage specs
templates   chatbot, efficient_llm, aligned_model, research, and overrides
store       SQLite (WAL) pipelines, runs, stages, attempts, append-only run events
scheduler   Scheduler (runs, retries, cancel, recovery, cache) over a StageBackend

Nothing here imports grpc: the servicer adapts requests to ``Scheduler`` calls and
implements ``StageBackend`` with the services' gRPC clients.
"""
