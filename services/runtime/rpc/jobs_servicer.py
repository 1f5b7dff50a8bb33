"""JobService (shared by every trainer service) and JobsHost, the one way a Start* RPC
turns a validated config into a job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from mlx_unified.v1 import common_pb2, common_pb2_grpc
from services.runtime import logs
from services.runtime.errors import InvalidArgument
from services.runtime.jobs.runner import JobRunner
from services.runtime.jobs.store import JobStore, follow, new_job_id
from services.runtime.paths import check_name, check_output_dir, confine, read_json
from services.runtime.rpc import convert
from services.runtime.settings import Settings

# Response metadata of CancelJob / CancelRun: "cancelled" (this call cancelled it) or
# "already-cancelled" (it was cancelled before; the call changed nothing).
CANCEL_OUTCOME = "x-mlxu-cancel"


@dataclass
class JobsHost:
    """A service's job store + runner, and how Start* RPCs create jobs."""

    store: JobStore
    runner: JobRunner
    settings: Settings

    @classmethod
    def open(cls, settings: Settings, max_concurrent: int | None = None) -> JobsHost:
        import os

        settings.ensure_dirs()
        store = JobStore(settings.db_path)
        n = max_concurrent or int(os.environ.get("MLXU_MAX_CONCURRENT_JOBS", "1"))
        return cls(store, JobRunner(store, settings, max_concurrent=n), settings)

    async def start_job(
        self,
        kind: str,
        entry: str,
        config: dict,
        *,
        request_id: str,
        output_name: str,
        labels: dict[str, str],
        field_prefix: str = "spec",
    ) -> tuple[common_pb2.Job, bool]:
        job_id = new_job_id()
        name = check_name(output_name, f"{field_prefix}.output_name") if output_name else job_id
        output_dir = self.settings.checkpoints_dir / name
        if output_name:
            await asyncio.to_thread(self._check_output_dir, output_dir, request_id, field_prefix)
        await asyncio.to_thread(self._check_hostfile, config, field_prefix)
        record, created = await asyncio.to_thread(
            self.store.create,
            kind,
            entry,
            config,
            str(output_dir),
            request_id or None,
            dict(labels),
            job_id=job_id,
        )
        if created:
            logs.get().info("job_created", job_id=record.job_id, kind=kind)
            await self.runner.submit(record.job_id)
        return convert.job(record), created

    def _check_output_dir(self, output_dir: Path, request_id: str, prefix: str) -> None:
        """A named output dir may be reused to resume from its checkpoints (an orchestrator
        retrying a stage whose job was lost or failed), never while another job owns it or
        after a job finished it successfully."""
        same = self.store.by_request_id(request_id) if request_id else None
        if same is not None and same.output_dir == str(output_dir):
            return  # the same request retried: the store returns the same job
        # A symlink at (or inside) checkpoints/<name> would make the job write elsewhere.
        check_output_dir(output_dir, self.settings.checkpoints_dir, f"{prefix}.output_name")
        for owner in self.store.by_output_dir(str(output_dir)):
            if not owner.terminal or owner.state == "SUCCEEDED":
                raise InvalidArgument.one(
                    f"{prefix}.output_name",
                    f"{output_dir.name!r} belongs to job {owner.job_id} ({owner.state})",
                )
        if output_dir.exists():
            logs.get().info("output_dir_adopted", output_dir=str(output_dir))

    def _check_hostfile(self, config: dict, prefix: str) -> None:
        """A job's hostfile is confined and read at Start (a regular file of JSON host
        entries), not first when the job launches; the config keeps its real path."""
        res = config.get("resources")
        raw = (res or {}).get("hostfile") if isinstance(res, dict) else None
        if not raw:
            return
        field = f"{prefix}.resources.hostfile"
        path = confine(str(raw), self.settings.allowed_roots, field)
        data = read_json(path, self.settings.allowed_roots, field)
        entries = data.get("hosts") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not entries:
            raise InvalidArgument.one(field, 'must hold a JSON list of hosts (or {"hosts": [...]})')
        res["hostfile"] = str(path)

    async def on_start(self) -> None:
        await self.runner.recover()

    async def on_stop(self, grace: float) -> None:
        await self.runner.shutdown(grace)


class JobServicer(common_pb2_grpc.JobServiceServicer):
    def __init__(self, host: JobsHost, poll_s: float = 0.02) -> None:
        self.host = host
        self.poll_s = poll_s

    async def GetJob(
        self, request: common_pb2.GetJobRequest, context: aio.ServicerContext
    ) -> common_pb2.GetJobResponse:
        _require_id(request.job_id)
        record = await asyncio.to_thread(self.host.store.get, request.job_id)
        return common_pb2.GetJobResponse(job=convert.job(record))

    async def ListJobs(
        self, request: common_pb2.ListJobsRequest, context: aio.ServicerContext
    ) -> common_pb2.ListJobsResponse:
        if request.page_size < 0:
            raise InvalidArgument.one("page_size", "must be >= 0")
        states = [convert.STATE_NAME[s] for s in request.states if s in convert.STATE_NAME]
        records, token = await asyncio.to_thread(
            self.host.store.list,
            states=states,
            kind=request.kind,
            page_size=request.page_size or 50,
            page_token=request.page_token,
        )
        return common_pb2.ListJobsResponse(
            jobs=[convert.job(r) for r in records], next_page_token=token or ""
        )

    async def WatchJob(
        self, request: common_pb2.WatchJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[common_pb2.WatchJobResponse]:
        _require_id(request.job_id)
        if request.after_seq < 0:
            raise InvalidArgument.one("after_seq", "must be >= 0")
        await asyncio.to_thread(self.host.store.get, request.job_id)  # NOT_FOUND up front
        # Events carry the BASIC view unless FULL is asked for: the resolved config is
        # kilobytes that never change, and GetJob returns it.
        full = request.view == common_pb2.JOB_VIEW_FULL
        snap, seen = None, None
        async for ev, job in follow(
            self.host.store, request.job_id, request.after_seq, poll_s=self.poll_s
        ):
            if job is not seen:  # one snapshot per poll, however many events it read
                snap, seen = convert.job(job, full=full), job
            yield common_pb2.WatchJobResponse(event=convert.event(ev), job=snap)

    async def CancelJob(
        self, request: common_pb2.CancelJobRequest, context: aio.ServicerContext
    ) -> common_pb2.CancelJobResponse:
        _require_id(request.job_id)
        record = await asyncio.to_thread(self.host.store.get, request.job_id)
        if record.state == "CANCELLED":
            # Idempotent, and says so: nothing was cancelled by this call.
            await context.send_initial_metadata(((CANCEL_OUTCOME, "already-cancelled"),))
            return common_pb2.CancelJobResponse(job=convert.job(record))
        record = await self.host.runner.cancel(request.job_id, request.reason or "cancelled")
        await context.send_initial_metadata(((CANCEL_OUTCOME, "cancelled"),))
        return common_pb2.CancelJobResponse(job=convert.job(record))


def _require_id(job_id: str) -> None:
    if not job_id:
        raise InvalidArgument.one("job_id", "is required")
