"""The Wan family on test models built offline: Wan 2.1 text-to-video (tiny-wan), 2.2's two
experts (tiny-wan22) and image-to-video (tiny-wan-i2v, tiny-wan22-i2v) equal stock diffusers'
WanPipeline / WanImageToVideoPipeline in-process, through Ray, and split over a denoiser group of
2 or 4 ranks by diffusers' own context parallelism (Ulysses, ring and both, with and without
CFG-parallel); tiles over M decoders equal diffusers' tiling; a sweep over guidance_2; clear
errors for frame counts, layouts, settings and weights that do not fit."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from cluster.executor import LocalExecutor
from stages.context_parallel import ParallelLayout
from stages.decoder import DecoderStage, TileSettings, assemble_frames, plan_decode, plan_tiles, postprocess
from stages.denoiser import plan_layout
from stages.errors import InvalidRequest
from stages.families import family_for
from stages.models import load_spec
from stages.request import build_request
from stages.weights import check_architecture, resolve_weights

TOL = 1e-5
CASES = {
    "guided": dict(prompt="a red fox running through the snow", negative_prompt="blurry, low quality", seed=3),
    "unguided": dict(prompt="a cat playing piano", guidance_scale=1.0, seed=1, num_frames=13, height=48, width=80),
}


@pytest.fixture(scope="module")
def wan():
    spec = load_spec("tiny-wan")
    return spec, resolve_weights(spec)


@pytest.fixture(scope="module")
def wan22():
    spec = load_spec("tiny-wan22")
    return spec, resolve_weights(spec)


def picture(height: int, width: int) -> np.ndarray:
    """A smooth picture, not the video's size: the pipelines fit it (and CLIP crops its own)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)


def stock(spec, weights, r, image=None):
    pipeline = WanImageToVideoPipeline if spec.takes_image else WanPipeline
    pipe = pipeline.from_pretrained(weights, dtype=spec.torch_dtype())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=r.prompt, negative_prompt=r.negative_prompt, height=r.height, width=r.width,
                  num_frames=r.num_frames, num_inference_steps=r.steps, guidance_scale=r.guidance_scale,
                  max_sequence_length=family_for(spec).max_text_tokens)  # fmt: skip
    if r.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = r.guidance_scale_2
    if image is not None:
        kwargs["image"] = Image.fromarray(image)
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="latent").frames
    video = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np").frames
    return latents, video[0]


def assert_equal_to_stock(spec, weights, executor, settings):
    image = picture(80, 120) if spec.takes_image else None
    r = build_request(spec, **settings, image="picture.png" if spec.takes_image else None)
    scale = family_for(spec).vae_scale_spatial
    with_image = (image, (r.height, r.width), r.num_frames) if spec.takes_image else ()
    encoded = executor.call("encode", "encode", r.prompt, r.negative_prompt, r.do_classifier_free_guidance,
                            *with_image)  # fmt: skip
    denoised = executor.call("denoise", "denoise", encoded, r)
    decoded = executor.call("decode", "decode_float", denoised)
    latents, video = executor.get(denoised), executor.get(decoded)
    ref_latents, ref_video = stock(spec, weights, r, image)
    frames = (r.num_frames - 1) // 4 + 1
    channels = spec.components["vae"].config["z_dim"]
    assert latents.shape == ref_latents.shape == (1, channels, frames, r.height // scale, r.width // scale)
    assert latents.abs().max() > 0.1
    assert (latents - ref_latents).abs().max().item() <= TOL
    assert tuple(video.shape) == ref_video.shape == (r.num_frames, r.height, r.width, 3)
    assert np.abs(np.asarray(video) - ref_video).max() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_in_one_process_equals_diffusers(wan, case):
    spec, weights = wan
    assert_equal_to_stock(spec, weights, LocalExecutor(spec, weights), CASES[case])


@pytest.mark.parametrize(
    "layout, case",
    [(ParallelLayout(), "guided"), (ParallelLayout(cfg=2), "guided"), (ParallelLayout(ulysses=2), "unguided"),
     (ParallelLayout(ring=2), "guided"), (ParallelLayout(cfg=2, ulysses=2), "guided"),
     (ParallelLayout(cfg=2, ring=2), "guided"), (ParallelLayout(ulysses=2, ring=2), "unguided"),
     (ParallelLayout(ring=4), "guided")],
    ids=str,
)  # fmt: skip
def test_through_ray_and_cfg_parallel_equals_diffusers(executors, wan, layout, case):
    spec, weights = wan
    assert_equal_to_stock(spec, weights, executors.get(spec, weights, layout), CASES[case])


def test_frames_and_layouts_are_checked_before_any_work(wan):
    spec, _ = wan
    with pytest.raises(InvalidRequest, match=r"frames must be 4k\+1 for tiny-wan \(got 12; nearest valid: 9 or 13\)"):
        build_request(spec, "a fox", num_frames=12)
    guided = build_request(spec, "a fox")
    assert plan_layout(spec, guided, workers=2) == ParallelLayout(cfg=2)
    assert plan_layout(spec, guided, workers=8) == ParallelLayout(cfg=2, ulysses=4)
    assert plan_layout(spec, guided, workers=4, ring=2) == ParallelLayout(cfg=2, ring=2)
    heads = "the Ulysses degree must divide the model's 4 attention heads"
    listed = "valid layouts for 8 workers: cfg2xulysses4xring1, cfg2xulysses2xring2, "
    with pytest.raises(InvalidRequest, match=rf"invalid parallel layout cfg1xulysses8xring1: {heads}; {listed}"):
        plan_layout(spec, guided, ulysses=8)
    # 9 frames at 48x80 are 3 x 3 x 5 = 45 tokens: no even split over 2 ranks
    odd = build_request(spec, "a fox", height=48, width=80, guidance_scale=1.0)
    assert plan_layout(spec, odd, workers=1) == ParallelLayout()
    with pytest.raises(InvalidRequest, match=r"cfg1xulysses2xring1 for this request: tiny-wan splits a video's "
                                             r"tokens into equal shards, and 9 frames at 80x48 are 45 tokens, "
                                             r"which 2 ranks do not divide"):  # fmt: skip
        plan_layout(spec, odd, workers=2)


# Wan 2.2 (tiny-wan22): two experts handed over at boundary_ratio x 1000, the 2.2 VAE (16x in
# space) and a timestep per token. Its 6 steps run t = 999, 961, 909 on the high-noise expert and
# 833, 714, 501 on the low-noise one.
CASES_22 = {
    "guided": dict(prompt="a red fox running through the snow", negative_prompt="blurry", seed=2, guidance_scale_2=2.0),
    "unguided": dict(prompt="a cat playing piano", guidance_scale=1.0, seed=1, num_frames=13, height=64, width=96),
}


@pytest.mark.parametrize("case", CASES_22)
def test_two_experts_in_one_process_equal_diffusers(wan22, case):
    spec, weights = wan22
    assert_equal_to_stock(spec, weights, LocalExecutor(spec, weights), CASES_22[case])


def test_the_low_noise_expert_and_its_guidance_make_the_last_steps(wan22):
    """The hand-over is real: the experts' weights differ, and guidance_2 changes the video."""
    spec, weights = wan22
    executor = LocalExecutor(spec, weights)
    stage = executor.stages["denoise"]
    high, low = stage.network.high, stage.network.low
    assert (high.proj_out.weight - low.proj_out.weight).abs().max() > 0.1

    def latents(**settings):
        r = build_request(spec, "a red fox", seed=2, **settings)
        encoded = executor.call("encode", "encode", r.prompt, r.negative_prompt, r.do_classifier_free_guidance)
        return executor.get(executor.call("denoise", "denoise", encoded, r))

    assert (latents(guidance_scale_2=2.0) - latents(guidance_scale_2=4.0)).abs().max() > 1e-3
    assert build_request(spec, "a fox").guidance_scale_2 == 3.0  # the model's default pair: 5.0, 3.0
    with pytest.raises(InvalidRequest, match="guidance_2 is the low-noise expert's guidance scale, for two-expert "
                                             "models .*; tiny-wan has one denoiser"):  # fmt: skip
        build_request(load_spec("tiny-wan"), "a fox", guidance_scale_2=3.0)
    # guidance off: WanPipeline guides neither expert, so there is no guidance_2 to record or to set
    unguided = build_request(spec, "a fox", guidance_scale=1.0)
    assert unguided.guidance_scale_2 is None and "guidance_scale_2" not in unguided.as_dict()
    with pytest.raises(InvalidRequest, match=r"guidance_2 \(3\) does nothing while guidance is off \(1\): both "
                                             r"experts are then unguided; set guidance above 1, or leave"):  # fmt: skip
        build_request(spec, "a fox", guidance_scale=1.0, guidance_scale_2=3.0)


def test_a_second_expert_and_its_boundary_go_together(tmp_path, monkeypatch):
    """One definition of "two experts": a YAML with transformer_2 but no boundary_ratio (or the
    other way round) is refused when it is read, not mid-denoise."""
    import yaml

    from stages import models

    raw = yaml.safe_load(load_spec("tiny-wan22").source.read_text())
    del raw["pipeline_config"]["boundary_ratio"]
    (tmp_path / "half-wan22.yaml").write_text(yaml.safe_dump({**raw, "name": "half-wan22"}))
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"half-wan22.yaml: a second expert \(component transformer_2\) and where "
                                         r"it takes over \(pipeline_config.boundary_ratio\) go together"):  # fmt: skip
        load_spec("half-wan22")


@pytest.mark.parametrize(
    "layout, case",
    [(ParallelLayout(cfg=2, ulysses=2), "guided"), (ParallelLayout(ring=2), "unguided")],
    ids=str,
)  # fmt: skip
def test_two_experts_split_over_a_group_equal_diffusers(executors, wan22, layout, case):
    spec, weights = wan22
    assert_equal_to_stock(spec, weights, executors.get(spec, weights, layout), CASES_22[case])


def test_weights_whose_pipeline_config_differs_are_refused_before_loading(wan, wan22, tmp_path):
    """A14B weights are checked for their hand-over point too, as the components' configs are."""
    spec, weights = wan22
    for config in weights.rglob("*.json"):
        target = tmp_path / config.relative_to(weights)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config.read_text())
    assert check_architecture(spec, tmp_path) == tmp_path
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.9}))
    with pytest.raises(InvalidRequest, match=r"are not tiny-wan22: model_index.json's boundary_ratio is 0.9 there "
                                             r"but 0.875 in tiny-wan22.yaml"):  # fmt: skip
        check_architecture(spec, tmp_path)
    # Both ways: a one-expert model (here tiny-wan's spec over its own configs) refuses weights
    # whose pipeline hands over to a second expert, as Wan 2.1 14B must refuse A14B's.
    one_expert, one_expert_weights = wan
    index = json.loads((one_expert_weights / "model_index.json").read_text())
    assert index["boundary_ratio"] is None and index["expand_timesteps"] is False  # diffusers' own "unset"
    for config in one_expert_weights.rglob("*.json"):
        target = tmp_path / "one" / config.relative_to(one_expert_weights)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config.read_text())
    assert check_architecture(one_expert, tmp_path / "one") == tmp_path / "one"
    (tmp_path / "one" / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    with pytest.raises(InvalidRequest, match=r"model_index.json's boundary_ratio is 0.875 there but unset in "
                                             r"tiny-wan.yaml"):  # fmt: skip
        check_architecture(one_expert, tmp_path / "one")
    (tmp_path / "one" / "model_index.json").unlink()
    with pytest.raises(InvalidRequest, match=r"has no model_index.json: it is not a diffusers copy of tiny-wan$"):
        check_architecture(one_expert, tmp_path / "one")


def stock_tiled_decode(spec, weights, latents, s: TileSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock AutoencoderKLWan as WanPipeline decodes, post-processed as the pipeline does: (frames
    with `enable_tiling` at these settings, frames untiled)."""
    vae = AutoencoderKLWan.from_pretrained(weights, subfolder="vae").eval()
    z = family_for(spec).vae_input(vae, latents)
    with torch.no_grad():
        untiled = postprocess(vae.decode(z).sample)
        vae.enable_tiling(tile_sample_min_height=s.height, tile_sample_min_width=s.width,
                          tile_sample_stride_height=s.height - s.overlap_height,
                          tile_sample_stride_width=s.width - s.overlap_width)  # fmt: skip
        return postprocess(vae.decode(z).sample), untiled


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-wan22"])
def test_tiles_on_m_decoders_equal_diffusers_tiling(executors, model):
    """The Wan VAEs (2.1: 8x; 2.2: 16x with 2x2 patches folded into channels) decode their tiles
    frame by frame with a causal cache; shared over 3 decoder actors and blended by the driver,
    and all on one actor, the frames equal diffusers' `enable_tiling` decode."""
    spec = load_spec(model)
    weights = resolve_weights(spec)
    settings, scale = TileSettings(32, 48, 16, 16), family_for(spec).vae_scale_spatial
    z_dim = spec.components["vae"].config["z_dim"]
    latents = torch.randn(1, z_dim, 3, 64 // scale, 96 // scale, generator=torch.Generator().manual_seed(0))
    expected, untiled = stock_tiled_decode(spec, weights, latents, settings)
    assert (expected - untiled).abs().max() > 1e-2  # tiling changes the frames: the comparison means something
    plan = plan_tiles(spec, 64, 96, settings)
    assert plan.grid == (4, 3) and plan.patch == (2 if model == "tiny-wan22" else 1) and plan.clamp
    executor = executors.get(spec, weights, decoders=3, encoder=False)
    call = executor.call("decode", "decode_tiles", latents, plan)
    shared = assemble_frames(plan, [tile for share in executor.gather(call) for tile in share])
    assert [r["tiles"] for r in executor.reports(call)] == [4, 4, 4]
    whole = DecoderStage(spec, weights).decode_float(latents, plan)
    for ours in (shared, whole):
        assert ours.shape == expected.shape == (9, 64, 96, 3)
        assert (ours - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-wan22"])
def test_an_untiled_plans_one_tile_is_finished_as_the_vae_finishes_it(model):
    """A plan of one tile (the video fits it) decoded as shares and assembled equals stock
    untiled decoding: 2.2's folded patches are unfolded and the clamp applied there too."""
    spec = load_spec(model)
    weights = resolve_weights(spec)
    z_dim, scale = spec.components["vae"].config["z_dim"], family_for(spec).vae_scale_spatial
    latents = torch.randn(1, z_dim, 3, 64 // scale, 96 // scale, generator=torch.Generator().manual_seed(1))
    _, expected = stock_tiled_decode(spec, weights, latents, TileSettings(64, 96, 16, 16))
    plan = plan_tiles(spec, 64, 96, TileSettings(64, 96, 16, 16))
    assert not plan.tiled and plan.patch == (2 if model == "tiny-wan22" else 1) and plan.clamp
    ours = assemble_frames(plan, DecoderStage(spec, weights).decode_tiles(latents, plan))
    assert ours.shape == expected.shape == (9, 64, 96, 3)
    assert (ours - expected).abs().max().item() <= TOL


def test_wan_tiles_default_to_diffusers_own():
    """256 px tiles every 192 px, diffusers' AutoencoderKLWan defaults: a 3x5 grid at 832x480."""
    plan = plan_decode(load_spec("tiny-wan"), 480, 832, decoders=4)
    assert plan.settings == TileSettings(256, 256, 64, 64) and plan.grid == (3, 5)


# Image-to-video: Wan 2.1 (tiny-wan-i2v: the image's latents as more channels, its CLIP states as
# more context) and Wan 2.2 (tiny-wan22-i2v: the image's latents as the first latent frame).
@pytest.mark.parametrize("model", ["tiny-wan-i2v", "tiny-wan22-i2v"])
def test_image_to_video_in_one_process_equals_diffusers(model):
    spec = load_spec(model)
    weights = resolve_weights(spec)
    assert_equal_to_stock(spec, weights, LocalExecutor(spec, weights), CASES_22["guided"] if spec.two_experts
                          else CASES["guided"])  # fmt: skip


@pytest.mark.parametrize(
    "model, layout",
    [("tiny-wan-i2v", ParallelLayout(cfg=2, ulysses=2)), ("tiny-wan22-i2v", ParallelLayout(ulysses=2, ring=2))],
    ids=str,
)  # fmt: skip
def test_image_to_video_split_over_a_group_equals_diffusers(executors, model, layout):
    spec = load_spec(model)
    weights = resolve_weights(spec)
    settings = CASES_22["guided"] if spec.two_experts else CASES["guided"]
    assert_equal_to_stock(spec, weights, executors.get(spec, weights, layout), settings)


def test_a_sweep_over_the_low_noise_experts_guidance(tmp_path, capsys):
    """guidance_2 is a sweep axis for a two-expert model: each cell is an MLflow run with the
    setting, the layout and the clarity panel's figures, and the cells' frames differ."""
    from mlflow import MlflowClient

    from cluster.cli import main

    argv = ["sweep", "--model", "tiny-wan22", "--local", "--prompt", "a red fox", "--grid", "guidance_2=2,4",
            "--steps", "4", "--json", "--experiment", "wan-sweep", "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    outcomes = json.loads(capsys.readouterr().out)["outcomes"]
    assert sorted(o["label"] for o in outcomes) == ["guidance_2=2.0", "guidance_2=4.0"]
    runs = [MlflowClient().get_run(o["run_id"]) for o in outcomes]
    assert sorted(run.data.params["guidance_scale_2"] for run in runs) == ["2.0", "4.0"]
    assert all(run.data.params["model"] == "tiny-wan22" and run.data.params["ulysses_degree"] == "1" for run in runs)
    assert all("clarity/sharpness_laplacian_var" in run.data.metrics for run in runs)
    assert len({run.data.tags["framecast.frames_sha256"] for run in runs}) == 2
