"""The job model every trainer service shares: a durable store, a runner of worker processes.

store = JobStore(settings.db_path)
runner = JobRunner(store, settings)
await runner.recover()                         # at service start
job, created = store.create(kind, entry, config, output_dir, request_id, labels)
if created:
    await runner.submit(job.job_id)
async for event, job in follow(store, job_id, after_seq):   # WatchJob
    ...
await runner.cancel(job_id, reason)
await runner.shutdown(grace_s)                 # on SIGTERM of the service
"""

from typing import Any

from services.runtime.jobs.store import (
    TERMINAL,
    TRANSITIONS,
    EventRecord,
    JobRecord,
    JobState,
    JobStore,
    follow,
    new_job_id,
)

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "EventRecord",
    "JobRecord",
    "JobRunner",
    "JobState",
    "JobStore",
    "build_command",
    "follow",
    "new_job_id",
]


def __getattr__(name: str) -> Any:
    # Lazy: ``python -m services.runtime.jobs.worker`` imports this package first, and the
    # worker needs nothing of the runner (asyncio, launch planning) on every job start.
    if name in ("JobRunner", "build_command"):
        from services.runtime.jobs import runner

        return getattr(runner, name)
    raise AttributeError(name)
