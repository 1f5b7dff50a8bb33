"""Per-client token buckets for the RPCs that cost real work (Start*, Generate, Score).

A client is its API key (hashed; never stored in clear) or, without one, its peer host. Each
client has one bucket per group: ``per_min`` tokens a minute, up to ``burst`` saved up. An
empty bucket is RESOURCE_EXHAUSTED with a RetryInfo saying when the next token comes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from services.runtime.errors import ResourceExhausted
from services.runtime.settings import Limits

START = frozenset(
    {
        "StartSFT",
        "StartExport",
        "StartRewardModel",
        "StartDPO",
        "StartPPO",
        "StartGRPO",
        "StartDistillation",
        "StartTraining",
        "RunPipeline",
        "CreatePipeline",
        "CreatePipelineFromTemplate",
    }
)
GENERATE = frozenset({"Generate", "ScoreCompletions", "Score", "TopLogprobs", "SampleTokens"})
MAX_CLIENTS = 10_000  # buckets kept (least recently used dropped): memory stays bounded


def group_of(method: str) -> str | None:
    name = method.rsplit("/", 1)[-1]
    if name in START:
        return "start"
    if name in GENERATE:
        return "generate"
    return None


def client_id(api_key: str | None, peer: str) -> str:
    if api_key:
        return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555": the host, not the (per-connection) port.
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
    return "peer:" + host


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, limits: Limits, clock=time.monotonic) -> None:  # noqa: ANN001
        self.rates = {
            "start": (limits.rate_start_per_min, limits.rate_start_burst),
            "generate": (limits.rate_generate_per_min, limits.rate_generate_burst),
        }
        self.clock = clock
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, group: str, client: str) -> None:
        """Spend one token of ``client``'s ``group`` bucket, or raise ResourceExhausted."""
        per_min, burst = self.rates.get(group, (0, 0))
        if per_min <= 0:
            return  # this limit is off
        burst = max(burst, 1)
        rate = per_min / 60.0
        now = self.clock()
        with self._lock:
            b = self._buckets.pop((group, client), None) or _Bucket(float(burst), now)
            b.tokens = min(float(burst), b.tokens + (now - b.stamp) * rate)
            b.stamp = now
            self._buckets[(group, client)] = b
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            wait = (1.0 - b.tokens) / rate
        env = f"MLXU_RATE_{group.upper()}_PER_MIN"
        raise ResourceExhausted(
            f"rate limit: at most {per_min} {group} calls a minute per client (burst {burst}, "
            f"{env}); retry in {wait:.1f} s",
            reason="RATE_LIMITED",
            retry_after_s=wait,
        )
