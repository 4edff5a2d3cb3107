"""Each family adapter, alone: one denoising step through the shared loop (`DenoiserStage`)
equals the first step of the family's stock diffusers pipeline (same weights, seed, settings),
and the registry finds every family by the name its YAML gives."""

import numpy as np
import pytest
import torch
from conftest import variant
from test_diffusers_equality import picture
from test_diffusers_equality import stock_diffusers as stock_cogvideox
from test_image_to_video import stock_i2vgen
from test_text_to_image import stock as stock_zimage
from test_wan import stock as stock_wan

from stages.denoiser import DenoiserStage
from stages.encoder import EncoderStage
from stages.errors import InvalidRequest
from stages.families import ModelFamily, family_class, family_for, known_families
from stages.models import known_models, load_spec
from stages.request import build_request
from stages.weights import resolve_weights

TOL = 1e-5
IMAGE = picture(80, 120)


def one_step(spec, weights, r, image=None):
    """The shared loop run for one step; returns the latents and the progress it reported."""
    encoder, denoiser = EncoderStage(spec, weights), DenoiserStage(spec, weights)
    sized = (image, (r.height, r.width)) if image is not None else ()
    conditioning = encoder.encode(r.prompt, r.negative_prompt, r.do_classifier_free_guidance, *sized)
    progress = []
    latents = denoiser.denoise(conditioning, r, on_step=lambda done, total: progress.append((done, total)))
    return latents, progress


def stock_first_step(spec, weights, r, image=None):
    """The stock pipeline's latents after its first (and only) step."""
    if spec.family == "zimage":
        return stock_zimage(spec, weights, r)[0]
    if spec.family == "wan":
        return stock_wan(spec, weights, r, image)[0]
    if spec.family == "i2vgen-xl":
        return stock_i2vgen(spec, weights, r, image, threads=torch.get_num_threads())[0]
    return stock_cogvideox(spec, weights, r, image)[0]


CASES = {
    "tiny": dict(guidance_scale=6.0, negative_prompt="blurry"),  # CogVideoX 1.0, sin-cos, DDIM
    "tiny-rope": dict(guidance_scale=6.0),  # 3D RoPE, DPM
    "tiny-i2v": dict(guidance_scale=6.0, image="picture.png"),  # the image joined along channels
    "tiny-zimage": dict(guidance_scale=3.0, negative_prompt="blurry"),  # flow matching, cond + g (cond - uncond)
    "tiny-i2vgen": dict(guidance_scale=9.0, image="picture.png"),  # a UNet, frame by frame
    "tiny-wan": dict(guidance_scale=5.0, negative_prompt="blurry"),  # diffusers' own attention, UniPC flow
    "tiny-wan22": dict(guidance_scale=4.0),  # per-token timesteps; one step is the high-noise expert's
}


@pytest.mark.parametrize("model", list(CASES))
def test_one_step_of_the_shared_loop_equals_the_stock_pipelines_first_step(model):
    spec = load_spec(model)
    weights = resolve_weights(spec)
    r = build_request(spec, "a red fox running through fresh snow", steps=1, seed=11, **CASES[model])
    image = IMAGE if r.image else None
    ours, progress = one_step(spec, weights, r, image)
    reference = stock_first_step(spec, weights, r, image)
    assert progress == [(1, 1)]
    assert ours.shape == reference.shape
    assert reference.abs().max() > 0.1  # a real signal, not two empty tensors
    assert (ours.float() - reference.float()).abs().max().item() <= TOL


def test_cogvideox15_pads_and_drops_frames_in_its_first_step(tiny_spec, tiny_weights):
    """CogVideoX 1.5's frame pairs: 9 frames -> 3 latent frames, padded to 4 for the step, 3 out."""
    spec = variant(tiny_spec, "tiny-1.5", transformer={"patch_size_t": 2, "patch_bias": False,
                                                      "use_rotary_positional_embeddings": True})  # fmt: skip
    weights = resolve_weights(spec)
    r = build_request(spec, "a cat", steps=1, guidance_scale=6.0, num_frames=9, seed=3)
    ours, _ = one_step(spec, weights, r)
    reference = stock_cogvideox(spec, weights, r)[0][:, 1:]  # diffusers keeps the padding frame first
    assert ours.shape == reference.shape == (1, 3, 4, 8, 12)
    assert (ours - reference).abs().max().item() <= TOL


def test_every_configured_model_has_its_adapter():
    families = {load_spec(name).family for name in known_models()}
    assert families == {"cogvideox", "zimage", "i2vgen-xl", "wan"}
    for name in known_models():
        spec = load_spec(name)
        family = family_for(spec)
        assert isinstance(family, ModelFamily) and family.name == spec.family and family.spec is spec
    assert set(known_families()) == {"cogvideox", "zimage", "i2vgen_xl", "wan"}
    assert family_class("i2vgen-xl").denoiser_key == "unet"


def test_an_unknown_family_is_refused_with_the_known_ones():
    known = "cogvideox, i2vgen_xl, wan, zimage"
    with pytest.raises(InvalidRequest, match=rf"no adapter for model family 'ltx'; known: {known}"):
        family_class("ltx")


def test_family_facts_are_the_pipelines():
    """What the shared code asks of a family, against what each diffusers pipeline does."""
    tiny, zimage, i2vgen = (family_for(load_spec(n)) for n in ("tiny", "tiny-zimage", "tiny-i2vgen"))
    assert (tiny.guidance_off, zimage.guidance_off, i2vgen.guidance_off) == (1.0, 0.0, 1.0)
    assert (tiny.image_fit, i2vgen.image_fit) == ("stretch", "crop")
    assert tiny.tiled_decode and not zimage.tiled_decode and not i2vgen.tiled_decode
    assert tiny.splits_sequence and zimage.splits_sequence and not i2vgen.splits_sequence
    assert tiny.dynamic_guidance and not zimage.dynamic_guidance
    assert (tiny.vae_scale_spatial, tiny.vae_scale_temporal) == (8, 4)
    assert np.isclose(zimage.vae_scale_temporal, 1)
