"""The Serve deployments' parallel paths equal the single-process path: a denoiser replica
hosting a context-parallel group of 2 ranks in its own placement group, and a video's tiles
decoded as shares by 2 decoder replicas (CPU, gloo, the tiny model)."""

import pytest
import torch
from conftest import served

from cluster.executor import LocalExecutor
from cluster.serving import ServeArgs, ServeExecutor
from stages.decoder import assemble_frames, plan_decode
from stages.request import build_request

TOL = 1e-5  # as tests/test_context_parallel.py: fp32 attention merged across ranks


@pytest.fixture(scope="module")
def deployments(serve_base_url, tmp_path_factory):
    from ray import serve

    args = ServeArgs(model="tiny", workers=2, decoders=2, data_dir=str(tmp_path_factory.mktemp("serve-cp")))
    with served(args, "framecast-cp"):
        names = ("Encoder", "DenoiserGroup", "Decoder")
        yield {name: serve.get_deployment_handle(name, app_name="framecast-cp") for name in names}


def test_a_served_group_and_its_decoders_equal_one_process(deployments, tiny_spec, tiny_weights):
    from ray import serve

    served = ServeExecutor(deployments["Encoder"], deployments["DenoiserGroup"], deployments["Decoder"], decoders=2)
    r = build_request(tiny_spec, "a red fox", steps=3, seed=5, num_frames=17)
    plan = plan_decode(tiny_spec, r.height, r.width, 2, None, None)
    assert plan.tiled and len(plan.tiles) >= 2

    encoded = served.call("encode", "encode", r.prompt, r.negative_prompt, True)
    steps = []
    denoised = served.call("denoise", "denoise", encoded, r, progress=lambda done, total: steps.append(done))
    decoded = served.call("decode", "decode_tiles", denoised, plan)
    tiles = [tile for share in served.gather(decoded) for tile in share]
    latents = served.get(denoised)

    local = LocalExecutor(tiny_spec, tiny_weights)
    expected = local.get(local.call("denoise", "denoise", local.call("encode", "encode", r.prompt,
                                                                     r.negative_prompt, True), r))  # fmt: skip
    assert (latents - expected).abs().max().item() <= TOL
    assert sorted(t.index for t in tiles) == list(range(len(plan.tiles)))  # each tile once, over 2 shares
    frames = assemble_frames(plan, tiles)
    assert (frames - local.stages["decode"].decode_float(latents, plan)).abs().max().item() <= TOL
    assert torch.isfinite(frames).all()

    assert len(served.reports(denoised)) == 2  # both ranks of the group worked on the video
    shares = served.reports(decoded)
    assert [report["tiles"] for report in shares] == [len(s) for s in plan_shares(plan)]
    assert len({report["pid"] for report in shares}) == 2, "each share went to a replica of its own"
    assert steps and steps[-1] == 3  # denoising progress came back from rank 0
    status = serve.status().applications["framecast-cp"].deployments
    assert status["Decoder"].replica_states.get("RUNNING") == 2


def plan_shares(plan):
    return [plan.share(rank, 2) for rank in range(2)]
