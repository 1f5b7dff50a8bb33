"""Policy versions for remote rollouts: the policy written, by reference, where a rollout
server can load it.

Every ``sync_every`` steps the trainer writes its current policy (the LoRA adapter, or the
full weights for full fine-tuning) to ``<output_dir>/policy/step_<step>`` atomically (a
temp dir renamed into place, with a manifest, as checkpoints are), and keeps the newest
``KEEP`` of them. A rollout request names that directory; the version *is* its step: the
number of updates the weights have had. Weights never travel over the wire.

Resume: versions newer than the resumed step were written by the killed attempt and are
removed; the version the resumed step should sample from (its last sync step) is reused
when it is still on disk, so a resumed run samples from the weights an uninterrupted run
would have.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.rlhf.trainers import Policy, write_policy
from services.runtime import checkpoints

log = structlog.get_logger(__name__)

POLICY_DIR = "policy"
KEEP = 2  # the current version and the one before (a server may still be loading it)


@dataclass(frozen=True)
class PolicyVersion:
    step: int  # updates applied to these weights: the version
    path: Path | None  # its directory (None: the in-memory policy, local rollouts)
    kind: str  # "adapter" | "full"
    base: str  # the base model an adapter applies to


class PolicyVersions:
    """The versions of one job's policy under ``<output_dir>/policy``."""

    def __init__(self, output_dir: Path, policy: Policy, sync_every: int) -> None:
        self.root = Path(output_dir) / POLICY_DIR
        self.policy, self.sync_every = policy, max(sync_every, 1)
        self.current: PolicyVersion | None = None
        self.started = False

    def _start(self, step: int) -> None:
        """Forget versions from beyond ``step`` (a killed attempt's future)."""
        for p in checkpoints.list_checkpoints(self.root):
            if _step(p) > step:
                shutil.rmtree(p, ignore_errors=True)
        self.started = True

    def at(self, step: int) -> PolicyVersion:
        """The version that samples step ``step``'s rollouts, written when it is due."""
        if not self.started:  # the first step of this attempt (after any resume)
            self._start(step)
        due = step - step % self.sync_every
        if self.current is not None and self.current.step == due:
            return self.current
        path = checkpoints.step_dir(self.root, due)
        if due == step or not (path / checkpoints.MANIFEST).is_file():
            if due != step:  # resumed between syncs and that version was pruned
                log.warning("policy_version_rewritten", due=due, step=step)
                due = step
            path = self.write(due)
        self.current = PolicyVersion(due, path, self.policy.kind, self.policy.base)
        return self.current

    def write(self, step: int) -> Path:
        manifest = {"kind": self.policy.kind, "base_model": self.policy.base, "step": step}
        info = checkpoints.save(
            self.root, step, lambda dst: write_policy(dst, self.policy), manifest, KEEP
        )
        return Path(info.path)


def _step(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[-1])
