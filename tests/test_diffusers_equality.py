"""The correctness anchor: framecast's latents and frames equal stock diffusers' CogVideoXPipeline
for the same saved weights, seed and settings (max abs difference <= 1e-5), in-process and
through the Ray stage actors."""

import numpy as np
import pytest
import torch
from conftest import variant
from PIL import Image

from cluster.executor import LocalExecutor
from stages.context_parallel import ParallelLayout
from stages.models import ComponentSpec, load_spec
from stages.request import build_request
from stages.weights import resolve_weights

TOL = 1e-5
CASES = [
    dict(prompt="a red fox running through fresh snow", steps=4, guidance_scale=6.0, seed=42),
    dict(prompt="a cat playing piano", negative_prompt="blurry, low quality", steps=3, guidance_scale=1.0, seed=7,
         num_frames=17, height=48, width=80),
]  # fmt: skip


def stock_diffusers(spec, weights, r, image=None):
    pipe = ComponentSpec(spec.pipeline).load_class().from_pretrained(weights, dtype=spec.torch_dtype())
    pipe.scheduler = spec.scheduler_class(r.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        num_inference_steps=r.steps,
        guidance_scale=r.guidance_scale,
        num_frames=r.num_frames,
        height=r.height,
        width=r.width,
        use_dynamic_cfg=r.dynamic_guidance,
        **({"image": Image.fromarray(image)} if image is not None else {}),
    )
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="latent").frames
    frames = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np").frames[0]
    return latents, frames


def framecast(executor, r, image=None):
    guidance = r.do_classifier_free_guidance
    sized = (image, (r.height, r.width)) if image is not None else ()
    embeds = executor.call("encode", "encode", r.prompt, r.negative_prompt, guidance, *sized)
    latents = executor.call("denoise", "denoise", embeds, r)
    frames = executor.call("decode", "decode_float", latents)
    return executor.get(latents), executor.get(frames)


def assert_equal_to_stock(spec, weights, executor, case, padding=0, image=None):
    r = build_request(spec, **case)
    ours_latents, ours_frames = framecast(executor, r, image)
    ref_latents, ref_frames = stock_diffusers(spec, weights, r, image)
    ref_latents = ref_latents[:, padding:]  # diffusers' latent output keeps CogVideoX 1.5's padding frames
    assert ours_latents.shape == ref_latents.shape
    assert ours_latents.abs().max() > 0.1  # a real signal, not two empty tensors
    assert (ours_latents.float() - ref_latents.float()).abs().max().item() <= TOL
    assert ours_frames.shape == ref_frames.shape == (r.num_frames, r.height, r.width, 3)
    assert np.abs(ours_frames.numpy() - ref_frames).max() <= TOL


@pytest.mark.parametrize("case", CASES, ids=["cfg", "no-cfg"])
def test_local_equals_diffusers(tiny_spec, tiny_weights, case):
    assert_equal_to_stock(tiny_spec, tiny_weights, LocalExecutor(tiny_spec, tiny_weights), case)


def test_dynamic_guidance_equals_diffusers(tiny_spec, tiny_weights):
    """`--dynamic-guidance` is diffusers' use_dynamic_cfg, and it changes the video."""
    case = dict(CASES[0], dynamic_guidance=True)
    executor = LocalExecutor(tiny_spec, tiny_weights)
    assert_equal_to_stock(tiny_spec, tiny_weights, executor, case)
    plain, dynamic = (framecast(executor, build_request(tiny_spec, **c))[0] for c in (CASES[0], case))
    assert (plain - dynamic).abs().max() > 1e-3


def test_chosen_scheduler_equals_diffusers(tiny_spec, tiny_weights):
    """A request's scheduler (tiny's weights ship DDIM; DPM chosen) is built from the weights'
    config, as diffusers' docs swap it in."""
    case = dict(CASES[0], scheduler="dpm")
    executor = LocalExecutor(tiny_spec, tiny_weights)
    assert build_request(tiny_spec, **case).scheduler == "CogVideoXDPMScheduler"
    assert_equal_to_stock(tiny_spec, tiny_weights, executor, case)
    ddim, dpm = (framecast(executor, build_request(tiny_spec, **c))[0] for c in (CASES[0], case))
    assert (ddim - dpm).abs().max() > 1e-3


def test_rope_and_dpm_equal_diffusers(rope_spec, rope_weights):
    """CogVideoX-5b's path (`tiny-rope`): 3D rotary embeddings, and the DPM scheduler (which draws
    noise every step) that its requests get by default, built from the DDIM config the weights ship."""
    assert build_request(rope_spec, "a fox").scheduler == "CogVideoXDPMScheduler"
    assert rope_spec.components["scheduler"].class_path == "diffusers.CogVideoXDDIMScheduler"
    assert_equal_to_stock(rope_spec, rope_weights, LocalExecutor(rope_spec, rope_weights), CASES[0])


def test_cogvideox15_padding_equals_diffusers(tiny_spec):
    """CogVideoX 1.5's path: latent frames patched in pairs, an odd count padded at the front."""
    spec = variant(tiny_spec, "tiny-1.5", transformer={"patch_size_t": 2, "patch_bias": False,
                                                      "use_rotary_positional_embeddings": True})  # fmt: skip
    weights = resolve_weights(spec)
    assert_equal_to_stock(spec, weights, LocalExecutor(spec, weights), CASES[0], padding=1)  # 3 latents -> 4


def test_bfloat16_equals_diffusers(tiny_spec):
    """Half precision, as CogVideoX-5b runs: the same casts in the same places."""
    spec = variant(tiny_spec, "tiny-bf16", dtype="bfloat16")
    weights = resolve_weights(spec)
    assert_equal_to_stock(spec, weights, LocalExecutor(spec, weights), CASES[0])


def test_ray_actors_equal_diffusers(executors, tiny_spec, tiny_weights):
    executor = executors.get(tiny_spec, tiny_weights)
    for case in CASES:
        assert_equal_to_stock(tiny_spec, tiny_weights, executor, case)


def picture(height=80, width=112, seed=3):
    """A smooth test picture (a gradient and a disc), not the video's size: the encoder resizes it."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05)[..., None]
    rgb = np.stack([x, y, 1 - x], axis=-1) * 200 + disc * 55
    return (rgb + np.random.default_rng(seed).uniform(0, 1, rgb.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def i2v():
    spec = load_spec("tiny-i2v")
    return spec, resolve_weights(spec)


@pytest.mark.parametrize("case", CASES[:1] + [dict(CASES[1], height=64, width=96)], ids=["cfg", "no-cfg"])
def test_image_to_video_equals_diffusers(i2v, case):
    """CogVideoX-5b-I2V's path: the image's latents (drawn from the VAE encoder's distribution
    with the job's generator) joined to the video latents along channels."""
    spec, weights = i2v
    case = dict(case, image="picture.png")
    assert_equal_to_stock(spec, weights, LocalExecutor(spec, weights), case, image=picture())


def test_image_changes_the_video(i2v):
    spec, weights = i2v
    executor = LocalExecutor(spec, weights)
    r = build_request(spec, **CASES[0], image="picture.png")
    one, other = (framecast(executor, r, picture(seed=s))[0] for s in (1, 2))
    assert (one - other).abs().max() > 1e-3


@pytest.mark.parametrize(
    "layout", [ParallelLayout(), ParallelLayout(ring=2), ParallelLayout(cfg=2)], ids=["1-worker", "ring-2", "cfg-2"]
)
def test_image_to_video_through_ray_equals_diffusers(executors, i2v, layout):
    """Through the stage actors, and over a 2-rank group: the video's frames split (ring
    attention, 3 latent frames: one rank's shard padded), or one guidance branch per rank (the
    image's latents joined to each branch's input)."""
    spec, weights = i2v
    case = dict(CASES[0], image="picture.png")
    assert_equal_to_stock(spec, weights, executors.get(spec, weights, layout), case, image=picture())
