"""framecast-shapes, the trained demo model shipped in models/framecast-shapes: it loads through
the code real weights use, equals stock diffusers, splits over a Ulysses group exactly, and makes
videos the shapes detector reads back as the prompt asked (held-out prompts included)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from test_diffusers_equality import TOL, framecast

from cluster.cli import main
from cluster.executor import LocalExecutor
from cluster.process_group import ActorGroup
from cluster.runtime import plan_resources
from stages import shapes
from stages.context_parallel import ParallelLayout
from stages.denoiser import DenoiserStage
from stages.encoder import EncoderStage
from stages.families import family_for
from stages.models import DEFAULT_MODEL, ComponentSpec, load_spec
from stages.request import build_request
from stages.video_io import DecodedVideo
from stages.weights import resolve_weights, weights_status

ROOT = Path(__file__).resolve().parents[1]
# Two held-out prompts (never shown in training) and a seed at which the model, at its default
# settings, gets their colour and direction right (docs/models.md has the rates over 4 seeds).
HELD_OUT_PROMPTS = [
    "a yellow triangle moving right on a black background",
    "a white square moving up on a gray background",
]
SEED = 0


@pytest.fixture(scope="module")
def spec():
    return load_spec("framecast-shapes")


@pytest.fixture(scope="module")
def weights(spec):
    return resolve_weights(spec)


def test_is_the_default_and_its_weights_are_committed(spec, weights):
    assert DEFAULT_MODEL == "framecast-shapes"
    assert weights == ROOT / "models" / "framecast-shapes"
    assert weights_status(spec) == {"source": "path", "location": str(weights), "present": True}
    files = [p for p in weights.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    tensors = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert tensors and all(p.suffix == ".safetensors" for p in tensors)
    record = json.loads((weights / "TRAINING.json").read_text())
    assert record["command"].startswith("python -m tools.train_shapes")
    assert record["seed"] == 0 and record["minutes"] <= 90
    assert record["vae"]["steps"] > 0 and record["transformer"]["steps"] > 0
    assert record["vae"]["final_weighted_l1"] > 0 and record["transformer"]["final_mse"] > 0
    assert sorted(record["held_out"]) == sorted(shapes.Scene(*t).prompt for t in shapes.HELD_OUT)


def stock_pipeline_latents_and_frames(spec, weights, r):
    pipe = ComponentSpec(spec.pipeline).load_class().from_pretrained(weights, dtype=spec.torch_dtype())
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt=r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
        guidance_scale=r.guidance_scale, num_frames=r.num_frames, height=r.height, width=r.width,
        max_sequence_length=family_for(spec).max_text_tokens,  # 16: the model's text length, not the pipeline's 226
    )  # fmt: skip
    latents = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="latent").frames
    frames = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np").frames[0]
    return latents, frames


@pytest.mark.parametrize("guidance", [6.0, 1.0], ids=["cfg", "no-cfg"])
def test_equals_stock_diffusers(spec, weights, guidance):
    r = build_request(spec, HELD_OUT_PROMPTS[0], steps=5, guidance_scale=guidance, seed=3)
    ours_latents, ours_frames = framecast(LocalExecutor(spec, weights), r)
    ref_latents, ref_frames = stock_pipeline_latents_and_frames(spec, weights, r)
    assert ours_latents.shape == ref_latents.shape == (1, 5, 8, 16, 16)  # 17 frames of 64x64, 4x in time and space
    assert ours_latents.abs().max() > 0.1
    assert (ours_latents - ref_latents).abs().max().item() <= TOL
    assert np.abs(ours_frames.numpy() - ref_frames).max() <= TOL


def test_ulysses_group_equals_single_process(ray_session, spec, weights):
    """4 heads: Ulysses 2 runs on it, and its latents equal one process's."""
    r = build_request(spec, HELD_OUT_PROMPTS[1], steps=3, seed=5)
    embeddings = EncoderStage(spec, weights).encode(r.prompt, r.negative_prompt, True)
    expected = DenoiserStage(spec, weights).denoise(embeddings, r)
    layout = ParallelLayout(ulysses=2)
    plan = plan_resources(workers=layout.world_size)
    group = ActorGroup(DenoiserStage, (spec, weights), {"layout": layout}, layout.world_size, plan.denoise, plan.bundle)
    try:
        ray_session.get(group.start())
        results = ray_session.get([actor.call.remote("denoise", embeddings, r)[0] for actor in group.actors])
    finally:
        group.close()
    for latents in results:
        assert (latents - expected).abs().max().item() <= TOL


def test_held_out_prompts_at_default_settings(tmp_path, capsys):
    """One real generation per test run: two prompts the model never saw, at its default settings
    (the CLI's default model), read by the detector from the frames as made; the panel's adherence
    figures are in the MLflow runs."""
    argv = ["generate", "--local", "--seed", str(SEED), "--output-dir", str(tmp_path), "--json"]
    for prompt in HELD_OUT_PROMPTS:
        argv += ["--prompt", prompt]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == HELD_OUT_PROMPTS
    client = MlflowClient()
    for line in lines:
        scene = shapes.parse_prompt(line["prompt"])
        found = shapes.detect(DecodedVideo.read(line["video"], planes=("rgb",)).rgb)
        assert (found.color, found.direction) == (scene.color, scene.direction), line["prompt"]
        metrics = client.get_run(line["run_id"]).data.metrics
        assert metrics["adherence/color"] == metrics["adherence/direction"] == 1.0
        assert metrics["adherence/shape"] in (0.0, 1.0)
        assert metrics["adherence/score"] == pytest.approx((2 + metrics["adherence/shape"]) / 3)
        assert line["params"]["model"] == "framecast-shapes" and line["params"]["steps"] == "20"


def test_other_models_have_no_adherence(tmp_path):
    out = tmp_path / "fox.mp4"
    assert main(["generate", "--model", "tiny", "--local", "--prompt", "a red fox", "--steps", "1",
                 "--output", str(out)]) == 0  # fmt: skip
    (run,) = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("framecast").experiment_id],
        filter_string="params.model = 'tiny'", order_by=["attributes.start_time DESC"], max_results=1,
    )
    assert "clarity/sharpness_laplacian_var" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("adherence/")]


@pytest.mark.own_ray
def test_make_demo_makes_a_moving_shape(tmp_path):
    """`make demo` uses the committed weights at once (no training) and prints the video, whose
    object is somewhere else in its last frame than in its first."""
    video = tmp_path / "demo.mp4"
    done = subprocess.run(
        ["make", "-C", str(ROOT), "demo", f"DEMO_OUTPUT={video}"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train_shapes" not in done.stdout + done.stderr
    assert str(video) in done.stdout
    rgb = DecodedVideo.read(video, planes=("rgb",)).rgb
    centroids = []
    for frame in (rgb[0], rgb[-1]):
        distance = np.linalg.norm(frame.astype(float) - np.median(frame.reshape(-1, 3), axis=0), axis=-1)
        centroids.append(np.argwhere(distance > 60).mean(axis=0))
    assert np.linalg.norm(centroids[1] - centroids[0]) >= 8, centroids


def test_sweep_shows_adherence_and_recommend_ranks_by_it(tmp_path, capsys, mlflow_uri):
    """A sweep of framecast-shapes has adherence in its table, a heatmap per adherence figure and
    a best cell for it; `recommend --metric adherence/score` ranks the cells' runs by it."""
    argv = ["sweep", "--local", "--prompt", HELD_OUT_PROMPTS[0], "--grid", "steps=2,8", "--seed", "0", "--json",
            "--output-dir", str(tmp_path / "out"), "--tracking-uri", mlflow_uri]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    summary = {name: Path(path) for name, path in result["summary"].items()}
    header = summary["table.md"].read_text().splitlines()[0]
    assert all(f"adherence/{k}" in header for k in ("color", "shape", "direction", "score"))
    for key in ("color", "shape", "direction", "score"):
        assert summary[f"heatmaps/adherence_{key}.png"].is_file()
    assert "adherence/score" in result["best"]
    scores = {o["label"]: o["metrics"]["adherence/score"] for o in result["outcomes"]}
    assert main(["recommend", "--prompt", HELD_OUT_PROMPTS[0], "--tracking-uri", mlflow_uri, "--json",
                 "--metric", "adherence/score"]) == 0  # fmt: skip
    ranked = json.loads(capsys.readouterr().out)
    assert ranked["better"] == "higher" and ranked["data"]["runs"] == 2
    means = [s["mean"] for s in ranked["data"]["settings"]]
    assert means == sorted(scores.values(), reverse=True)
