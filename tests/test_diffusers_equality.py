"""The correctness anchor: framecast's latents and frames equal stock diffusers' CogVideoXPipeline
for the same saved weights, seed and settings (fp32, max abs difference <= 1e-5), in-process and
through the Ray stage actors."""

import numpy as np
import pytest
import torch
from diffusers import CogVideoXPipeline

from cluster.executor import LocalExecutor, RayExecutor
from stages.request import build_request

TOL = 1e-5
CASES = [
    dict(prompt="a red fox running through fresh snow", steps=4, guidance_scale=6.0, seed=42),
    dict(
        prompt="a cat playing piano",
        negative_prompt="blurry, low quality",
        steps=3,
        guidance_scale=1.0,
        seed=7,
        num_frames=17,
        height=48,
        width=80,
    ),
]


def stock_diffusers(weights, r):
    pipe = CogVideoXPipeline.from_pretrained(weights, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        num_inference_steps=r.steps,
        guidance_scale=r.guidance_scale,
        num_frames=r.num_frames,
        height=r.height,
        width=r.width,
    )
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="latent").frames
    frames = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np").frames[0]
    return latents, frames


def framecast(executor, r):
    embeds = executor.call("encode", "encode", r.prompt, r.negative_prompt, r.do_classifier_free_guidance)
    latents = executor.call("denoise", "denoise", embeds.value, r)
    frames = executor.call("decode", "decode_float", latents.value)
    return executor.get(latents.value), executor.get(frames.value)


def assert_equal_to_stock(spec, weights, executor, case):
    r = build_request(spec, **case)
    ours_latents, ours_frames = framecast(executor, r)
    ref_latents, ref_frames = stock_diffusers(weights, r)
    assert ours_latents.shape == ref_latents.shape
    assert (ours_latents - ref_latents).abs().max().item() <= TOL
    assert ours_frames.shape == ref_frames.shape == (r.num_frames, r.height, r.width, 3)
    assert np.abs(ours_frames.numpy() - ref_frames).max() <= TOL


@pytest.mark.parametrize("case", CASES, ids=["cfg", "no-cfg"])
def test_local_equals_diffusers(tiny_spec, tiny_weights, case):
    assert_equal_to_stock(tiny_spec, tiny_weights, LocalExecutor(tiny_spec, tiny_weights), case)


def test_rope_and_dpm_equal_diffusers(rope_spec, rope_weights):
    """CogVideoX-5b's path: 3D rotary embeddings and the DPM scheduler (which draws noise every step)."""
    assert_equal_to_stock(rope_spec, rope_weights, LocalExecutor(rope_spec, rope_weights), CASES[0])


def test_ray_actors_equal_diffusers(ray_session, tiny_spec, tiny_weights):
    executor = RayExecutor(tiny_spec, tiny_weights)
    try:
        for case in CASES:
            assert_equal_to_stock(tiny_spec, tiny_weights, executor, case)
    finally:
        executor.close()
