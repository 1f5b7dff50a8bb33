"""Remote teachers with two real processes: the KD trainer here, the teacher in
`mlxu serve generation` (our GenerationService) or in `python -m mlx_lm.server` (the
OpenAI completions API). A remote teacher must give the loss curve of the same job with
the local teacher and the top-k cache of the same k: it is the same teacher computation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from services.distillation import validate as V
from services.distillation.trainers import kd
from services.runtime import remote
from services.runtime.contract import JobContext
from services.runtime.errors import InvalidArgument
from services.runtime.models import build_tiny_model
from tests.conftest import REPO, ServiceProcess, free_port

ROWS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("When did the train leave?", "The morning train left the station at seven."),
    ("What does the recipe need?", "Two cups of flour, one egg and a pinch of salt."),
    ("Who waters the tomatoes?", "The old man next door waters his tomatoes."),
]
KEY_ENV = "MLXU_TEST_TEACHER_KEY"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import mlx.core as mx

    root = tmp_path_factory.mktemp("remote-kd")
    t = build_tiny_model(
        root / "teacher", num_layers=2, hidden_size=64, seed=1, tie_word_embeddings=False
    )
    f = t / "model.safetensors"
    w = dict(mx.load(str(f)))
    w["lm_head.weight"] = w["lm_head.weight"] * 20.0  # a peaked, informative teacher
    mx.save_safetensors(str(f), w, metadata={"format": "mlx"})
    s = build_tiny_model(
        root / "student", num_layers=2, hidden_size=32, intermediate_size=64, seed=3
    )
    other = build_tiny_model(root / "other", num_layers=1, hidden_size=32, vocab_size=300)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in ROWS * 2))
    return {"root": root, "teacher": t, "student": s, "other": other, "data": data}


def config(m: dict, teacher: dict, **over: object) -> dict:
    c = {
        "student": {"model": str(m["student"])},
        "teachers": [teacher],
        "dataset": {"path": str(m["data"]), "valid_fraction": 0.25},
        "method": "full",
        "alpha": 0.9,
        "temperature": {"initial": 2.0},
        "optimizer": {"learning_rate": 3e-3, "schedule": "constant", "name": "adam"},
        "loop": {
            "batch_size": 3,
            "max_steps": 5,
            "max_seq_length": 48,
            "steps_per_report": 1,
            "steps_per_eval": 5,
            "val_batches": 1,
            "steps_per_checkpoint": 100,
        },
    }
    c.update(over)
    return c


def run(cfg: dict, out: Path) -> list:
    reports: list = []
    V.validate(cfg)  # what Start does (for a grpc teacher: probes its tokenizer)
    kd.run(cfg, JobContext(job_id="kd-remote", output_dir=out, report=reports.append))
    return [r.metrics for r in reports]


def curve(reports: list, key: str = "train_loss") -> list[float]:
    return [r[key] for r in reports if key in r]


@pytest.fixture
def generation_server(models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`mlxu serve generation` in its own process, with an API key."""
    home = tmp_path / "gen-home"
    home.mkdir()
    env = dict(os.environ)
    env.update(
        MLXU_HOME=str(home),
        MLXU_API_KEYS="teacher-key",
        MLXU_ALLOWED_ROOTS=os.pathsep.join([str(models["root"]), str(REPO)]),
    )
    sp = ServiceProcess("generation", home, free_port(), env)
    sp.start()
    monkeypatch.setenv(KEY_ENV, "teacher-key")
    yield sp
    if sp.proc and sp.proc.poll() is None:
        os.killpg(sp.proc.pid, signal.SIGKILL)
        sp.proc.wait()


def test_grpc_teacher_matches_local_teacher_with_topk_cache(models, generation_server, tmp_path):
    k = 16
    local = config(
        models,
        {"model": {"model": str(models["teacher"])}},
        teacher_cache={"enabled": True, "top_k": k},
    )
    remote_teacher = {
        "model": {"model": str(models["teacher"])},
        "remote": {"kind": "grpc", "address": generation_server.address, "api_key_env": KEY_ENV},
    }
    far = config(models, remote_teacher, teacher_cache={"top_k": k})
    t0 = time.monotonic()
    a = run(local, tmp_path / "local")
    t1 = time.monotonic()
    b = run(far, tmp_path / "remote")
    t2 = time.monotonic()
    la, lb = curve(a), curve(b)
    assert len(la) == len(lb) == 5
    rel = max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True))
    print(f"grpc vs local+cache: max rel diff {rel:.2e}")
    assert rel < 1e-3, (la, lb)
    assert (
        abs(curve(a, "val_kd_loss")[-1] - curve(b, "val_kd_loss")[-1])
        < 1e-3 * curve(a, "val_kd_loss")[-1]
    )
    print(f"local+cache {t1 - t0:.1f}s, grpc {t2 - t1:.1f}s")


def test_grpc_teacher_with_cache_on_and_wrong_key_and_tokenizer(
    models, generation_server, tmp_path, monkeypatch
):
    teacher = {
        "model": {"model": str(models["teacher"])},
        "remote": {"address": generation_server.address, "api_key_env": KEY_ENV},
    }
    cached = run(
        config(models, teacher, teacher_cache={"enabled": True, "top_k": 8}), tmp_path / "c"
    )
    assert (tmp_path / "c" / "teacher_cache" / "train.safetensors").is_file()
    assert len(curve(cached)) == 5
    # The server refuses a wrong key at Start (validate probes it) ...
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(InvalidArgument) as e:
        V.validate(config(models, teacher))
    assert "UNAUTHENTICATED" in str(e.value.violations)
    # ... and a teacher whose tokenizer is not the student's.
    monkeypatch.setenv(KEY_ENV, "teacher-key")
    other = {**teacher, "model": {"model": str(models["other"])}}
    with pytest.raises(InvalidArgument) as e:
        V.validate(config(models, other))
    assert [v.field for v in e.value.violations] == ["spec.teachers[0].model"]
    assert "different tokenizer" in e.value.violations[0].description


def test_unreachable_teacher_fails_the_job_with_the_reason(models, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    teacher = {
        "model": {"model": str(models["teacher"])},
        "remote": {"address": dead, "retry_deadline_seconds": 1.5, "timeout_seconds": 1},
    }
    cfg = config(models, teacher)
    V.validate(cfg)  # unreachable at Start is no violation: it may come up before the job
    t0 = time.monotonic()
    with pytest.raises(remote.RemoteUnavailable, match="unreachable for 1.5 s") as e:
        run(cfg, tmp_path / "dead")
    assert e.value.reason == "REMOTE_UNAVAILABLE"
    assert 1.4 < time.monotonic() - t0 < 30


@pytest.fixture
def mlx_lm_server(models, tmp_path: Path):
    """A real `python -m mlx_lm.server` on loopback serving the tiny teacher."""
    port = free_port()
    log = open(tmp_path / "mlx_lm_server.log", "wb")  # noqa: SIM115 - closed at teardown
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(models["teacher"])]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/models", timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "mlx_lm_server.log").read_text()[-2000:]) from None
            time.sleep(0.2)  # waiting for the server to come up
    yield base
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()


def test_openai_teacher_on_mlx_lm_server_matches_local_cache(models, mlx_lm_server, tmp_path):
    k = 10  # mlx_lm.server's top_logprobs limit: the prefix fallback
    local = config(
        models,
        {"model": {"model": str(models["teacher"])}},
        teacher_cache={"enabled": True, "top_k": k},
    )
    # The request's "model": mlx_lm.server's name for the model it was started with.
    teacher = {
        "model": {"model": "default_model"},
        "remote": {"kind": "openai", "address": mlx_lm_server},
    }
    far = config(models, teacher, teacher_cache={"top_k": 32})  # capped to 10, logged
    a, b = run(local, tmp_path / "local"), run(far, tmp_path / "openai")
    la, lb = curve(a), curve(b)
    assert len(la) == len(lb) == 5
    rel = max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True))
    print(f"openai (prefix fallback) vs local+cache: max rel diff {rel:.2e}")
    # Same teacher, same k: only the rest mass differs (1 - sum of the top-k, in float32)
    # and the server's incremental (prompt-cached) forward.
    assert rel < 1e-3, (la, lb)


@pytest.fixture
def in_process_teacher(serve, models):
    """The standalone GenerationService in this process (its own loop thread)."""
    from services.runtime.rpc import generation_server

    def make(**kw: object):
        return serve("generation", generation_server.register, roots=(models["root"],), **kw)

    return make


def test_resumed_job_keeps_its_remote_teacher(models, in_process_teacher, tmp_path):
    """The backend is part of the stored spec: a job resumed from its checkpoint (as after a
    kill -9 of its worker) scores with the same remote teacher and ends where an
    uninterrupted job ends."""
    from services.runtime import checkpoints
    from services.runtime.contract import Interrupted

    srv = in_process_teacher()
    teacher = {"model": {"model": str(models["teacher"])}, "remote": {"address": srv.address}}
    cfg = config(models, teacher, teacher_cache={"top_k": 8})
    cfg["loop"] = {**cfg["loop"], "max_steps": 6, "steps_per_checkpoint": 3, "steps_per_eval": -1}
    full = run(cfg, tmp_path / "a")
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    part: list = []
    ctx = JobContext(job_id="kd-r", output_dir=tmp_path / "b", report=part.append)
    with pytest.raises(Interrupted):
        kd.run(cfg, dataclasses.replace(ctx, should_stop=stop))
    resume = checkpoints.latest(tmp_path / "b")
    assert resume is not None
    kd.run(cfg, dataclasses.replace(ctx, resume_from=resume))
    assert part[-1].metrics["train_loss"] == pytest.approx(full[-1]["train_loss"], rel=1e-5)


def test_grpc_teacher_over_tls(models, in_process_teacher, tmp_path):
    """A server with a certificate; the teacher verifies it with remote.tls_ca."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    srv = in_process_teacher(tls_cert=str(cert), tls_key=str(key))
    from services.distillation.trainers import teacher_backends, teachers
    from services.schema.common import RemoteSettings

    def backend(**r: object) -> teacher_backends.GrpcBackend:
        s = RemoteSettings.from_dict(
            {
                "address": f"localhost:{srv.port}",
                "timeout_seconds": 5,
                "retry_deadline_seconds": 1,
                **r,
            }
        )
        return teacher_backends.GrpcBackend(s, str(models["teacher"]), "", 0)

    b = backend(tls_ca=str(cert))
    assert b.vocab_size() == 512
    sig = teachers.signature_from_dir(models["student"])
    assert sig is not None and b.same_tokenizer(sig)
    b.close()
    plain = backend()  # no TLS against a TLS server: unreachable, then the reason
    with pytest.raises(remote.RemoteUnavailable):
        plain.vocab_size()
    plain.close()


def _proto_spec(m: dict, remote_backend) -> object:  # noqa: ANN001
    from mlx_unified.v1 import common_pb2, distillation_pb2

    return distillation_pb2.DistillationSpec(
        teachers=[
            distillation_pb2.Teacher(
                model=common_pb2.ModelRef(model=str(m["teacher"])), remote=remote_backend
            )
        ],
        student=common_pb2.ModelRef(model=str(m["student"])),
        dataset=common_pb2.DatasetRef(path=str(m["data"])),
        method=common_pb2.FINETUNE_METHOD_FULL,
        optimizer=common_pb2.OptimizerConfig(learning_rate=2e-3),
        loop=common_pb2.LoopConfig(
            batch_size=3, max_steps=3, steps_per_report=1, steps_per_eval=-1, max_seq_length=48
        ),
        alpha=0.9,
        teacher_cache=distillation_pb2.TeacherCacheConfig(top_k=8),
    )


def test_distillation_service_job_with_remote_teacher(models, generation_server, serve):
    """StartDistillation on the real service: its worker process reads the key from the
    service's environment and scores with the generation server; a dead teacher fails the
    job with the reason; validate_only (the orchestrator's precheck) asks the server."""
    from mlx_unified.v1 import common_pb2, distillation_pb2, distillation_pb2_grpc
    from tests.integration.helpers import Stubs, violations

    srv = serve("distillation", roots=(models["root"],))
    stubs = Stubs(srv.address)
    stub = distillation_pb2_grpc.DistillationServiceStub(stubs.channel)
    try:
        good = common_pb2.RemoteBackend(address=generation_server.address, api_key_env=KEY_ENV)
        job = stub.StartDistillation(
            distillation_pb2.StartDistillationRequest(spec=_proto_spec(models, good)), timeout=60
        ).job
        final, _events = stubs.wait(job.job_id, timeout=120)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error

        dead = common_pb2.RemoteBackend(
            address=f"127.0.0.1:{free_port()}", retry_deadline_seconds=1, timeout_seconds=1
        )
        job = stub.StartDistillation(
            distillation_pb2.StartDistillationRequest(spec=_proto_spec(models, dead)), timeout=60
        ).job
        final, _ = stubs.wait(job.job_id, timeout=120)
        assert final.state == common_pb2.JOB_STATE_FAILED
        assert "RemoteUnavailable" in final.error and "unreachable for 1 s" in final.error

        wrong = _proto_spec(models, good)
        wrong.teachers[0].model.model = str(models["other"])
        req = distillation_pb2.StartDistillationRequest(spec=wrong, validate_only=True)
        with pytest.raises(grpc.RpcError) as e:
            stub.StartDistillation(req, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "different tokenizer" in violations(e.value)["spec.teachers[0].model"]
    finally:
        stubs.close()


def test_kill9_worker_resumes_with_its_remote_teacher(models, generation_server, serve):
    """kill -9 of the job's worker mid-run: the service restarts it from the last
    checkpoint, with the remote teacher of the stored spec, and it ends where an
    uninterrupted job with that teacher ends."""
    from mlx_unified.v1 import common_pb2, distillation_pb2, distillation_pb2_grpc
    from tests.integration.helpers import Stubs, losses
    from tests.integration.test_resume import run_until_checkpoint, worker_pids

    srv = serve("distillation", roots=(models["root"],))
    stubs = Stubs(srv.address)
    stub = distillation_pb2_grpc.DistillationServiceStub(stubs.channel)

    def start(name: str) -> str:
        backend = common_pb2.RemoteBackend(address=generation_server.address, api_key_env=KEY_ENV)
        s = _proto_spec(models, backend)
        s.loop.max_steps, s.loop.steps_per_checkpoint, s.output_name = 24, 8, name
        req = distillation_pb2.StartDistillationRequest(spec=s)
        return stub.StartDistillation(req, timeout=60).job.job_id

    try:
        ref, ref_events = stubs.wait(start("reference"), timeout=180)
        assert ref.state == common_pb2.JOB_STATE_SUCCEEDED, ref.error
        job_id = start("killed")
        run_until_checkpoint(stubs, job_id)
        pids = worker_pids(job_id)
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        final, events = stubs.wait(job_id, timeout=180)
        assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
        assert final.attempts == 2
        logs = [e.log.text for e in events if e.WhichOneof("payload") == "log"]
        assert any("resuming from" in t for t in logs), logs
        want, got = dict(losses(ref_events)), dict(losses(events))
        assert got[24] == pytest.approx(want[24], rel=1e-4)
    finally:
        stubs.close()
