"""GenerationService.SampleTokens: batched token-level sampling for remote rollouts. The same
seed, model and prompts give exactly the tokens and log-probs of the trainers' own sampler."""

from __future__ import annotations

import grpc
import pytest

from mlx_unified.v1 import common_pb2, generation_pb2, generation_pb2_grpc


def _request(model, prompts, n=2, seed=7, **sampling) -> generation_pb2.SampleTokensRequest:  # noqa: ANN001
    return generation_pb2.SampleTokensRequest(
        model=common_pb2.ModelRef(model=str(model)),
        prompts=[generation_pb2.TokenSequence(token_ids=p) for p in prompts],
        n=n,
        sampling=generation_pb2.SamplingParams(
            max_tokens=sampling.pop("max_tokens", 6), **sampling
        ),
        seed=seed,
        policy_version=3,
    )


def test_sample_tokens_matches_the_local_sampler(serve, tiny_model) -> None:  # noqa: ANN001
    from services.runtime import sampler
    from services.runtime.models import load_model
    from services.schema.rollouts import RolloutSampling

    srv = serve("training", limits=_limits())
    prompts = [[1, 5, 9, 13], [2, 7]]
    with grpc.insecure_channel(srv.address) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        out = stub.SampleTokens(_request(tiny_model, prompts, n=3), timeout=60)
    assert out.policy_version == 3 and len(out.completions) == 6

    model, tok = load_model(str(tiny_model))
    local = sampler.generate(
        model,
        [p for p in prompts for _ in range(3)],
        RolloutSampling(max_tokens=6),
        sampler.key_from_seed(7),
        eos_ids=sampler.eos_ids(tok),
        pad_id=sampler.pad_id(tok),
        tokenizer=tok,
    )
    assert [list(c.token_ids) for c in out.completions] == local.completion_ids
    got = [x for c in out.completions for x in c.logprobs]
    assert got == pytest.approx([x for lp in local.logprobs for x in lp], abs=1e-6)  # float32
    assert all(len(c.token_ids) == len(c.logprobs) > 0 for c in out.completions)


def test_sample_tokens_refuses_bad_requests(serve, tiny_model) -> None:  # noqa: ANN001
    srv = serve("training", limits=_limits())
    with grpc.insecure_channel(srv.address) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        for req in (
            _request(tiny_model, []),
            _request(tiny_model, [[]]),
            _request(tiny_model, [[1, 10**7]]),
            _request(tiny_model, [[1]], n=1000),
            _request(tiny_model, [[1]], repetition_penalty=1.3),
            _outside(_request(tiny_model, [[1]])),  # a policy dir outside the roots
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.SampleTokens(req, timeout=60)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def _limits():  # noqa: ANN202
    from services.runtime.settings import Limits

    return Limits(rate_start_per_min=0, rate_generate_per_min=0)


def test_a_new_adapter_version_is_loaded_into_the_cached_model(tiny_model, tmp_path) -> None:  # noqa: ANN001
    """The next policy version of a rollout job costs a weights read, not a model load, and
    answers exactly as a fresh load of base + that adapter."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from services.runtime import adapters, generation
    from services.runtime.models import load_model
    from services.schema.common import LoraSettings

    model, _ = load_model(str(tiny_model))
    cfg = adapters.apply(model, "lora", LoraSettings(rank=4), base_model=str(tiny_model))
    dirs = []
    for v in range(2):  # two versions: random LoRA weights
        trained = tree_flatten(model.trainable_parameters())
        model.update(tree_unflatten([(k, mx.random.normal(x.shape) * 0.1) for k, x in trained]))
        adapters.save_adapter(tmp_path / f"v{v}", model, cfg)
        dirs.append(str(tmp_path / f"v{v}"))
    cache = generation.ModelCache(size=2)
    first, _ = cache.get(str(tiny_model), dirs[0])
    second, _ = cache.get(str(tiny_model), dirs[1])
    assert second is first  # swapped in place
    fresh, _ = load_model(str(tiny_model), dirs[1])
    x = mx.array([[1, 5, 9, 13, 2]])
    assert mx.array_equal(second(x), fresh(x)).item()


def _outside(req: generation_pb2.SampleTokensRequest) -> generation_pb2.SampleTokensRequest:
    req.model.adapter_path = "/etc"
    return req


def test_a_rollout_batch_of_many_prompt_tokens_is_admitted(serve, tiny_model) -> None:  # noqa: ANN001
    """64 prompts of 400 token ids (25,600 values: over the generic 20,000-value bound)."""
    srv = serve("training", limits=_limits())
    prompts = [[1 + (i + j) % 300 for j in range(400)] for i in range(64)]
    with grpc.insecure_channel(srv.address) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        out = stub.SampleTokens(_request(tiny_model, prompts, n=1, max_tokens=1), timeout=120)
    assert len(out.completions) == 64
