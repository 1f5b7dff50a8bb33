"""The HTTP gateway over real services on loopback, every one its own process (uvicorn for
the gateway): the original API's example script (create -> run -> status until the run
ends), API keys, 400s with field violations (the gateway's own and a service's), 404s, and
Server-Sent Events resumed with Last-Event-ID."""

from __future__ import annotations

import contextlib
import json as _json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, ServiceProcess, _kill_workers, free_port, write_jsonl

KEY = "gateway-test-key"
BACKENDS = ("training", "distillation", "rlhf", "orchestrator")
CHAT = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {a}?"},
            {"role": "assistant", "content": f"{a} plus {a} is {2 * a}."},
        ]
    }
    for a in range(1, 25)
]
PREFS = [
    {"prompt": f"What is {a} plus {a}?", "chosen": f"{2 * a}.", "rejected": f"{a}."}
    for a in range(1, 17)
]
TERMINAL = {"succeeded", "failed", "cancelled"}


class Gateway:
    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home, self.port, self.env = home, port, env
        self.log = home / "gateway-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Gateway:
        cmd = [sys.executable, "-m", "services.gateway.app", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)  # waiting for the server to come up, not faking work
        raise RuntimeError(f"gateway not healthy in {timeout}s: {self.log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    """Four services and the gateway, all with API key KEY; yields (gateway, data dir)."""
    home = tmp_path_factory.mktemp("gateway-home")
    data = tmp_path_factory.mktemp("gateway-data")
    ports = {name: free_port() for name in BACKENDS}
    env = dict(os.environ)
    env.update({f"MLXU_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()})
    base = tmp_path_factory.getbasetemp().resolve()
    env.update(
        MLXU_HOME=str(home),
        MLXU_ALLOWED_ROOTS=os.pathsep.join([str(base), str(REPO)]),
        MLXU_API_KEYS=KEY,
    )
    procs = [ServiceProcess(n, home, ports[n], env) for n in BACKENDS]
    gateway = Gateway(home, free_port(), env)
    errors: list[BaseException] = []

    def start(sp: ServiceProcess) -> None:
        try:
            sp.start(timeout=120)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(sp,)) for sp in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield gateway.start(), data
    finally:
        for p in [*(sp.proc for sp in procs), gateway.proc]:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        _kill_workers(home)


@pytest.fixture(scope="module")
def http(stack: tuple[Gateway, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack[0].url, headers={"X-API-Key": KEY}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def datasets(stack: tuple[Gateway, Path]) -> dict[str, str]:
    data = stack[1]
    return {
        "chat": str(write_jsonl(data / "chat.jsonl", CHAT)),
        "prefs": str(write_jsonl(data / "prefs.jsonl", PREFS)),
    }


@pytest.fixture(scope="module")
def finished_run(http: httpx.Client, tiny_model: Path, datasets: dict[str, str]) -> dict:
    """The issue's script: create a three-stage pipeline, run it, poll its status."""
    pipeline = {
        "name": "my_aligned_model",
        "stages": ["sft", "distillation", "rlhf"],
        "base_model": str(tiny_model),
        "dataset_path": datasets["chat"],
        "auto_configure": True,
        "datasets": {"rlhf": datasets["prefs"]},  # chat rows cannot train a preference method
    }
    r = http.post("/v1/pipelines/create", json=pipeline)
    assert r.status_code == 200, r.text
    pipeline_id = r.json()["pipeline_id"]
    r = http.post(f"/v1/pipelines/{pipeline_id}/run")
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    live: dict[str, list] = {}

    def follow() -> None:
        # While it runs: read 3 events, hang up, come back with Last-Event-ID.
        with httpx.Client(base_url=str(http.base_url), headers={"X-API-Key": KEY}) as c:
            live["first"] = sse(c, f"/v1/runs/{run_id}/events", stop_after=3)
            live["rest"] = sse(c, f"/v1/runs/{run_id}/events", last_id=live["first"][-1][1])

    follower = threading.Thread(target=follow)
    follower.start()
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = http.get(f"/v1/pipelines/{pipeline_id}/status").json()
        seen.append(status["current_stage"] or "")
        if status["status"] in TERMINAL:
            break
        time.sleep(0.5)  # polling as the original API's users do
    follower.join(120)
    return {
        "pipeline_id": pipeline_id,
        "run_id": run_id,
        "status": status,
        "seen": seen,
        "live": live,
    }


def sse(
    http: httpx.Client,
    path: str,
    last_id: int | None = None,
    method: str = "GET",
    json: dict | None = None,
    stop_after: int | None = None,
) -> list[tuple[str, int | None, dict]]:
    """(event, id, data) of every SSE event until the stream ends (or ``stop_after`` events
    have come: then the connection is closed)."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    out: list[tuple[str, int | None, dict]] = []
    with http.stream(method, path, headers=headers, json=json, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event, seq, data = "message", None, ""
        for line in r.iter_lines():
            if not line:
                if data:
                    out.append((event, seq, _json.loads(data)))
                    if stop_after is not None and len(out) >= stop_after:
                        break
                event, seq, data = "message", None, ""
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                seq = int(line[4:])
            elif line.startswith("data: "):
                data += line[6:]
    return out


def test_example_script_runs_a_real_pipeline(
    http: httpx.Client, finished_run: dict, tiny_model: Path
) -> None:
    status = finished_run["status"]
    assert status["status"] == "succeeded", status
    assert [s["name"] for s in status["stages"]] == ["sft", "distillation", "rlhf"]
    assert [s["kind"] for s in status["stages"]] == ["sft", "distill", "dpo"]
    assert all(s["status"] == "succeeded" and s["step"] >= 1 for s in status["stages"]), status
    assert (
        Path(status["result"], "adapter_config.json").exists()
        or Path(status["result"], "config.json").exists()
    )
    assert "sft" in finished_run["seen"]  # a stage was seen running
    p = http.get(f"/v1/pipelines/{finished_run['pipeline_id']}").json()
    assert p["name"] == "my_aligned_model" and p["base_model"] == str(tiny_model)
    resolved = p["pipeline"]["resolved"]["stages"]
    assert resolved[1]["spec"]["student_init"]["num_layers"] == 1  # half the tiny model's 2
    listed = http.get("/v1/pipelines").json()["pipelines"]
    assert finished_run["pipeline_id"] in [x["pipeline_id"] for x in listed]
    run = http.get(f"/v1/runs/{finished_run['run_id']}").json()["run"]
    assert run["state"] == "RUN_STATE_SUCCEEDED"
    job = status["stages"][0]
    got = http.get(f"/v1/jobs/{job['service']}/{job['job_id']}").json()["job"]
    assert got["state"] == "JOB_STATE_SUCCEEDED" and got["kind"] == "sft"


def test_run_events_resume_after_last_event_id(http: httpx.Client, finished_run: dict) -> None:
    path = f"/v1/runs/{finished_run['run_id']}/events"
    everything = sse(http, path)
    # Followed live (hung up after 3 events, resumed): every event once, in order.
    live = finished_run["live"]
    assert [e[1] for e in live["first"]] == [1, 2, 3]
    assert live["first"] + live["rest"] == everything
    assert everything[-1][0] == "end"
    events = everything[:-1]
    seqs = [seq for _, seq, _ in events]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 5
    assert events[-1][0] == "run_state_change"
    assert events[-1][2]["run_state_change"]["to_state"] == "RUN_STATE_SUCCEEDED"
    cut = len(seqs) // 2
    resumed = sse(http, path, last_id=cut)[:-1]
    assert [s for _, s, _ in resumed] == seqs[cut:]
    assert resumed == events[cut:]
    q = sse(http, f"{path}?after_seq={len(seqs) - 1}")  # EventSource's first connect
    assert [s for _, s, _ in q] == [len(seqs), None]


def test_job_events_are_sse_with_seq_ids(http: httpx.Client, finished_run: dict) -> None:
    job = finished_run["status"]["stages"][2]  # the DPO job on the rlhf service
    events = sse(http, f"/v1/jobs/rlhf/{job['job_id']}/events", last_id=1)
    assert events[0][1] == 2 and events[-1][0] == "end"
    kinds = {e for e, _, _ in events}
    assert {"progress", "state_change"} <= kinds
    last = events[-2][2]
    assert last["job"]["state"] == "JOB_STATE_SUCCEEDED"


def test_prometheus_metrics_count_jobs_and_requests(
    stack: tuple[Gateway, Path], http: httpx.Client, finished_run: dict
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert httpx.get(f"{stack[0].url}/metrics").status_code == 401  # a key, as any caller
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }
    up = {dict(k[1])["service"]: v for k, v in samples.items() if k[0] == "mlxu_service_up"}
    assert up == dict.fromkeys(BACKENDS, 1.0)
    done = {
        (dict(k[1])["service"], dict(k[1])["kind"]): v
        for k, v in samples.items()
        if k[0] == "mlxu_jobs" and dict(k[1])["state"] == "succeeded"
    }
    # The finished run's three stages, each a job on its own service.
    assert done[("training", "sft")] >= 1 and done[("rlhf", "dpo")] >= 1
    assert done[("distillation", "distill")] >= 1
    assert samples[("mlxu_queue_depth", (("service", "training"),))] == 0
    routes = {
        dict(k[1]).get("route") for k, _ in samples.items() if k[0] == "mlxu_http_requests_total"
    }
    assert "/v1/pipelines/create" in routes and "/v1/jobs/{service}/{job_id}/events" in routes


def test_api_key_is_required(stack: tuple[Gateway, Path]) -> None:
    url = stack[0].url
    r = httpx.get(f"{url}/v1/pipelines")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "UNAUTHENTICATED"
    r = httpx.post(f"{url}/v1/pipelines/create", json={}, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401 and "invalid API key" in r.json()["error"]["message"]
    health = httpx.get(f"{url}/healthz")  # open, and it reflects the services behind it
    assert health.status_code == 200
    assert health.json()["services"] == dict.fromkeys(BACKENDS, "SERVING")
    doc = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/pipelines/create" in doc["paths"] and "/v1/runs/{run_id}/events" in doc["paths"]
    assert httpx.get(f"{url}/docs").status_code == 200


def test_bad_requests_are_400s_with_violations(
    http: httpx.Client, tiny_model: Path, datasets: dict[str, str]
) -> None:
    # The body as is, on chat rows: "rlhf" has no preference data to train on.
    body = {
        "name": "x",
        "stages": ["sft", "distillation", "rlhf"],
        "base_model": str(tiny_model),
        "dataset_path": datasets["chat"],
        "auto_configure": True,
    }
    r = http.post("/v1/pipelines/create", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in err["violations"]] == ["stages[2]"]
    assert "preference" in err["violations"][0]["description"]
    # Every problem in one answer: an unknown stage, a dataset outside the allowed roots.
    body.update(stages=["sft", "rlhf-ish"], dataset_path="/etc/passwd")
    fields = {
        v["field"]
        for v in http.post("/v1/pipelines/create", json=body).json()["error"]["violations"]
    }
    assert fields == {"dataset_path", "stages[1]"}
    # A missing required field of the original shape.
    r = http.post("/v1/pipelines/create", json={"stages": ["sft"]})
    assert r.status_code == 400
    assert {v["field"] for v in r.json()["error"]["violations"]} == {"name", "base_model"}
    # A service's own validation, relayed with its field violations (contract JSON).
    spec = {
        "model": {"model": str(tiny_model)},
        "dataset": {"path": datasets["chat"]},
        "loop": {"batch_size": -1},
    }
    r = http.post("/v1/methods/sft/jobs", json={"spec": spec})
    assert r.status_code == 400, r.text
    fields = [v["field"] for v in r.json()["error"]["violations"]]
    assert any(f.endswith("loop.batch_size") for f in fields), fields
    # A body that is not the contract's message.
    r = http.post("/v1/methods/sft/jobs", json={"spec": {"no_such_field": 1}})
    assert r.status_code == 400 and r.json()["error"]["violations"]


def test_missing_things_are_404s(http: httpx.Client) -> None:
    for path in ("/v1/runs/nope", "/v1/pipelines/nope", "/v1/jobs/training/nope"):
        r = http.get(path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "NOT_FOUND"
    assert http.get("/v1/runs/nope/events").status_code == 404
    r = http.get("/v1/jobs/orchestrator")
    assert r.status_code == 400  # jobs live on the trainer services only


def test_generate_as_json_and_as_sse(http: httpx.Client, tiny_model: Path) -> None:
    body = {"model": {"model": str(tiny_model)}, "prompt": "hello", "sampling": {"max_tokens": 4}}
    r = http.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["completion_tokens"] == len(out["token_ids"]) <= 4 and out["prompt_tokens"] > 0
    chunks = sse(http, "/v1/generate?stream=true", method="POST", json=body)
    assert chunks[-1][0] == "end"
    assert [t for _, _, c in chunks[:-1] for t in c["token_ids"]] == out["token_ids"]  # greedy
    r = http.post("/v1/generate?stream=true", json={**body, "model": {"model": "/nope"}})
    assert r.status_code == 400, r.text  # refused before the stream starts


def test_model_registry_over_http(http: httpx.Client, finished_run: dict) -> None:
    # The three-stage run, registered: its lineage names every stage that made it.
    body = {"name": "aligned", "run": {"run_id": finished_run["run_id"]}}
    r = http.post("/v1/models", json=body)
    assert r.status_code == 200, r.text
    v = r.json()["version"]
    assert v["version"] == 1 and v["checkpoint"]["path"] == finished_run["status"]["result"]
    stages = finished_run["status"]["stages"]
    assert [(s["stage"], s["job_id"]) for s in v["lineage"]["stages"]] == [
        (s["name"], s["job_id"]) for s in stages
    ]
    r = http.post("/v1/models/aligned/aliases/production", json={"version": 1})
    assert r.status_code == 200 and r.json()["version"]["aliases"] == ["production"], r.text
    got = http.get("/v1/models/aligned/aliases/production").json()["version"]
    assert got["version"] == 1
    assert http.get("/v1/models/aligned/versions/1").json()["version"]["lineage"]["run_id"]
    model = http.get("/v1/models/aligned").json()["model"]
    assert model["aliases"] == {"production": 1} and len(model["versions"]) == 1
    assert "aligned" in [m["name"] for m in http.get("/v1/models").json()["models"]]
    assert http.get("/v1/models/aligned/versions/9").status_code == 404
    r = http.post("/v1/models", json={"name": "tiny-llama", "run": {"run_id": "x"}})
    assert r.status_code == 400 and r.json()["error"]["violations"][0]["field"] == "name"
    assert http.delete("/v1/models/aligned/aliases/production").status_code == 200
    assert http.delete("/v1/models/aligned/versions/1").status_code == 200
    assert http.get("/v1/models/aligned").json()["model"]["versions"] == []
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/models/{name}/versions/{version}"} <= set(paths)
    assert "delete" in paths["/v1/models/{name}/aliases/{alias}"]
