"""The runner's view of one worker process (group): is it alive, did a rank die, and how
to say what happened to it.

Everything here reads the outside world only (``/proc`` or ``ps``, worker.log, the ranks'
status files) or signals a process group; the runner's queue and the job database stay in
runner.py, which decides what a finding means for the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.jobs.protocol import EXIT_INTERRUPTED, WORKER_MODULE, read_rank_statuses

__all__ = [
    "Worker",
    "describe_exit",
    "describe_ranks",
    "log_tail",
    "pid_runs_job",
    "signal_group",
]


def pid_runs_job(pid: int, job_id: str) -> bool:
    """True when pid is alive and is a worker of job_id (not a reused pid, not a zombie)."""
    try:
        if sys.platform.startswith("linux"):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            args = [a.decode(errors="replace") for a in cmdline]
        else:
            out = subprocess.run(
                ["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True
            )
            args = out.stdout.split()
    except OSError:
        return False
    return job_id in args and any(WORKER_MODULE in a for a in args)


def signal_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; one that is already gone is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def describe_exit(code: int | None) -> str:
    """A worker's exit as a reason a user reads (signal names, not negative codes)."""
    if code is None:
        return "worker exited (status unknown: it was reattached after a service restart)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        return f"worker exited with signal {-code} ({name})"
    return f"worker exited with code {code}"


def log_tail(path: Path, lines: int = 20, max_chars: int = 4000) -> str:
    """The last lines of worker.log, for a failed job's reason ("" if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-max_chars:]


_NODE_EXIT = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was (killed))")


def describe_ranks(
    statuses: dict[int, dict], world: int, launcher_log: str = "", killed: str = ""
) -> tuple[str, str | None]:
    """(what happened to a data-parallel group, reason to fail without retry or None).

    ``statuses`` are the ranks' status files of this attempt; ``launcher_log`` the worker.log
    text of this attempt, where mlx.launch reports each rank's exit code; ``killed`` what
    the runner did to ranks still running when it killed the group, if it did.
    """
    codes: dict[int, str] = {}
    for m in _NODE_EXIT.finditer(launcher_log):
        codes[int(m.group(1))] = "killed" if m.group(3) else m.group(2)
    errors = sorted(
        (s.get("time", 0.0), r, s.get("reason") or "error")
        for r, s in statuses.items()
        if s.get("state") == "exited" and s.get("kind") == "error"
    )
    if errors:
        _, rank, reason = errors[0]
        return f"rank {rank} of {world} failed", f"rank {rank} of {world} failed: {reason}"
    exited = {r: s for r, s in statuses.items() if s.get("state") == "exited"}
    if len(exited) == world and all(s.get("code") == EXIT_INTERRUPTED for s in exited.values()):
        return "interrupted", None
    died, lost, stuck = [], [], []
    for r in range(world):
        s = statuses.get(r)
        code = codes.get(r)
        if s is not None and s.get("state") == "exited":
            if s.get("kind") == "peer_lost":
                lost.append(str(r))
            continue
        if code is None and s is not None and killed:
            stuck.append(str(r))
            continue
        if code is None:
            how = "died without reporting an exit (killed, out of memory, or its host lost)"
            if s is None:
                how = "never reported (it did not start, or it died at once)"
        elif code == "killed":
            how = "was killed by mlx.launch"
        else:
            how = describe_exit(int(code)).replace("worker exited", "exited")
        died.append(f"rank {r} {how}")
    parts = died
    if lost:
        parts.append(f"rank(s) {', '.join(lost)} lost their peers")
    if stuck:
        parts.append(f"rank(s) {', '.join(stuck)} {killed}")
    return "; ".join(parts) or "all ranks exited, but the job did not finish", None


@dataclass
class Worker:
    """A worker the runner watches: started by it, or reattached by pid after a restart."""

    pid: int  # also the process group id (start_new_session)
    log_path: Path
    popen: subprocess.Popen | None = None  # None when reattached after a restart
    task: asyncio.Task | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    # Data-parallel jobs: ranks, attempt (whose status files count), where this attempt's
    # lines start in worker.log, and why the runner killed the group (if it did).
    world: int = 1
    output_dir: Path | None = None
    attempt: int = 0
    log_offset: int = 0
    scanned: int = 0  # how far the watchdog has read worker.log for mlx.launch's lines
    dead: str = ""  # the first rank death the watchdog saw
    note: str = ""

    def exit_status(self, job_id: str) -> tuple[bool, int | None]:
        """(alive, exit code); the code of a reattached worker is unknowable (None)."""
        if self.popen is not None:
            code = self.popen.poll()
            return code is None, code
        return pid_runs_job(self.pid, job_id), None

    def dead_rank(self, job_id: str) -> str | None:
        """A rank of this attempt that failed or vanished, or None: from mlx.launch's exit
        lines (any host), the ranks' status files and this host's rank pids."""
        assert self.output_dir is not None
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset + self.scanned)
                text = f.read(1 << 20).decode(errors="replace")
        except OSError:
            text = ""
        # Only whole lines: a half-written one is read again next time.
        text = text[: text.rfind("\n") + 1]
        self.scanned += len(text.encode())
        for m in _NODE_EXIT.finditer(text):
            code = m.group(2)
            if m.group(3) or int(code) not in (0, EXIT_INTERRUPTED):
                return f"mlx.launch saw rank {m.group(1)} exit ({m.group(3) or code})"
        host = socket.gethostname()
        for r, s in read_rank_statuses(self.output_dir, self.attempt).items():
            if s.get("state") == "exited" and s.get("code") not in (0, EXIT_INTERRUPTED):
                return f"rank {r} exited with code {s.get('code')}"
            mine = s.get("state") == "running" and s.get("host") == host
            if mine and not pid_runs_job(int(s.get("pid", 0)), job_id):
                return f"rank {r} (pid {s.get('pid')}) died"
        return None

    def attempt_log(self) -> str:
        """worker.log since this attempt started (mlx.launch reports rank exits there)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read(4 << 20).decode(errors="replace")
        except OSError:
            return ""
