"""Text-to-image with Z-Image (tiny-zimage): equal to stock diffusers' ZImagePipeline in-process,
through Ray and sequence-parallel over 2 ranks whose heads they cannot split; PNG out, measured
with the clarity figures that apply to one picture."""

import json

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from mlflow import MlflowClient
from PIL import Image

from cluster.cli import EXIT_INVALID, main
from cluster.executor import LocalExecutor
from stages.clarity import METRICS, PAIRWISE
from stages.context_parallel import ParallelLayout
from stages.denoiser import plan_layout
from stages.errors import InvalidRequest
from stages.families import family_for
from stages.models import load_spec
from stages.request import build_request
from stages.weights import resolve_weights

TOL = 1e-5
CASES = {
    "turbo": dict(prompt="a red fox in the snow", seed=5),  # the model's defaults: 4 steps, guidance off
    "guided": dict(prompt="a cat playing piano", negative_prompt="blurry, low quality", steps=3, guidance_scale=4.0,
                   seed=7, height=48, width=80),
}  # fmt: skip


@pytest.fixture(scope="module")
def zimage():
    spec = load_spec("tiny-zimage")
    return spec, resolve_weights(spec)


def stock(spec, weights, r):
    pipe = ZImagePipeline.from_pretrained(weights, dtype=spec.torch_dtype())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=r.prompt, negative_prompt=r.negative_prompt, height=r.height, width=r.width,
                  num_inference_steps=r.steps, guidance_scale=r.guidance_scale,
                  max_sequence_length=family_for(spec).max_text_tokens)  # fmt: skip
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="latent").images
    picture = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np").images
    return latents, picture


def framecast(executor, r):
    encoded = executor.call("encode", "encode", r.prompt, r.negative_prompt, r.do_classifier_free_guidance)
    latents = executor.call("denoise", "denoise", encoded, r)
    picture = executor.call("decode", "decode_float", latents)
    return executor.get(latents), executor.get(picture)


def assert_equal_to_stock(spec, weights, executor, case):
    r = build_request(spec, **case)
    ours_latents, ours_picture = framecast(executor, r)
    ref_latents, ref_picture = stock(spec, weights, r)
    assert ours_latents.shape == ref_latents.shape == (1, 4, r.height // 8, r.width // 8)
    assert ours_latents.abs().max() > 0.1
    assert (ours_latents - ref_latents).abs().max().item() <= TOL
    assert ours_picture.shape == ref_picture.shape == (1, r.height, r.width, 3)
    assert np.abs(ours_picture.numpy() - ref_picture).max() <= TOL


def test_turbo_defaults_are_the_models():
    """Few steps and guidance off (Z-Image's guidance 0: cond + g (cond - uncond))."""
    spec = load_spec("z-image-turbo")
    r = build_request(spec, "a fox")
    assert (r.steps, r.guidance_scale, r.do_classifier_free_guidance) == (9, 0.0, False)
    assert (r.height, r.width, r.num_frames) == (1024, 1024, 1) and spec.default_codec == "png"
    assert build_request(spec, "a fox", guidance_scale=0.5).do_classifier_free_guidance
    with pytest.raises(InvalidRequest, match=r"guidance scale must be at least 0 for z-image-turbo"):
        build_request(spec, "a fox", guidance_scale=-1)
    with pytest.raises(InvalidRequest, match=r"frames must be between 1 and 1 for z-image-turbo"):
        build_request(spec, "a fox", num_frames=9)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_local_equals_diffusers(zimage, case):
    spec, weights = zimage
    assert_equal_to_stock(spec, weights, LocalExecutor(spec, weights), CASES[case])


@pytest.mark.parametrize(
    "layout, case",
    [(ParallelLayout(), "turbo"), (ParallelLayout(ring=2), "turbo"), (ParallelLayout(ring=2), "guided"),
     (ParallelLayout(cfg=2), "guided"), (ParallelLayout(ulysses=3), "turbo")],
    ids=["ray-1-worker", "ring2-turbo", "ring2-guided", "cfg2-guided", "ulysses3-turbo"],
)  # fmt: skip
def test_through_ray_and_across_workers_equals_diffusers(executors, zimage, layout, case):
    spec, weights = zimage
    assert_equal_to_stock(spec, weights, executors.get(spec, weights, layout), CASES[case])


def test_heads_that_the_degree_does_not_divide_go_by_ring(zimage):
    """tiny-zimage has 3 heads: 2 workers cannot split them (Ulysses), so the tokens go round a
    ring; Z-Image-Turbo's 30 heads split over 2 but not 4: 4 workers are Ulysses 2 x ring 2."""
    spec, _ = zimage
    assert plan_layout(spec, build_request(spec, "a fox"), workers=2) == ParallelLayout(ring=2)
    with pytest.raises(InvalidRequest, match="Ulysses degree must divide the model's 3 attention heads"):
        plan_layout(spec, build_request(spec, "a fox"), workers=2, ulysses=2)
    turbo = load_spec("z-image-turbo")
    assert plan_layout(turbo, build_request(turbo, "a fox"), workers=4) == ParallelLayout(ulysses=2, ring=2)


def test_generate_writes_a_png_measured_as_one_picture(tmp_path, capsys, zimage, mlflow_uri):
    out = tmp_path / "fox.png"
    code = main(["generate", "--model", "tiny-zimage", "--prompt", "a red fox", "--output", str(out),
                 "--tracking-uri", mlflow_uri, "--local", "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    picture = np.asarray(Image.open(out))
    assert picture.shape == (64, 64, 3) and result["video"] == str(out)
    clarity = {k.removeprefix("clarity/") for k in result["metrics"] if k.startswith("clarity/")}
    assert {"sharpness_laplacian_var", "tenengrad", "blur_effect", "noise_sigma"} <= clarity
    assert not clarity & set(PAIRWISE) and clarity <= set(METRICS)  # nothing that compares frames
    run = MlflowClient(mlflow_uri).get_run(result["run_id"])
    assert (run.data.params["guidance_scale"], run.data.params["steps"]) == ("0.0", "4")
    assert "fox.png" in {a.path for a in MlflowClient(mlflow_uri).list_artifacts(result["run_id"])}


def test_serve_refuses_a_picture_model(tmp_path):
    from cluster.serving import ServeArgs, resolve_served

    with pytest.raises(InvalidRequest, match="tiny-zimage is text-to-image; framecast serve runs the Videos API"):
        resolve_served(ServeArgs(model="tiny-zimage", data_dir=str(tmp_path)))


def test_bad_input_for_a_picture_model(tmp_path, capsys):
    for args, message in (
        (["--output", str(tmp_path / "fox.mp4")], "tiny-zimage makes a PNG picture: --output must end in .png"),
        (["--frames", "9"], "frames must be between 1 and 1 for tiny-zimage"),
        (["--image", str(tmp_path / "x.png")], "tiny-zimage is text-to-image and takes no image"),
        (["--workers", "2", "--ulysses", "2"], "Ulysses degree must divide the model's 3 attention heads"),
        (["--decoders", "2"], "decodes with an image VAE, which framecast does not tile or share"),
    ):
        assert main(["generate", "--model", "tiny-zimage", "--prompt", "a fox", *args]) == EXIT_INVALID
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
