"""`framecast generate` end to end: in-process (--local), through local Ray, and its failure modes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from cluster.cli import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_INVALID, main
from stages.clarity import METRICS, measure_file, measure_frames
from stages.video_io import DecodedVideo, contact_sheet, read_frames


def run_cli(capsys, *args):
    """`framecast generate` on tiny unless the args name another --model (the last one wins)."""
    code = main(["generate", "--model", "tiny", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_local_generation_json_and_mlflow_run(tmp_path, capsys, tiny_weights, mlflow_uri):
    video = tmp_path / "out" / "fox.mp4"
    code, out, err = run_cli(
        capsys, "--model", "tiny", "--prompt", "a red fox in the snow", "--negative-prompt", "blurry",
        "--steps", "3", "--guidance", "7.5", "--frames", "17", "--fps", "12", "--height", "48", "--width", "80",
        "--seed", "5", "--output", str(video), "--experiment", "cli-test", "--tracking-uri", mlflow_uri,
        "--local", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["video"] == str(video) and video.is_file()
    assert read_frames(video).shape == (17, 48, 80, 3)
    assert list(result["stages"]) == ["encode", "denoise", "decode", "write", "measure"]
    enc, den, dec, mea, wri = (result["stages"][s] for s in ("encode", "denoise", "decode", "measure", "write"))
    assert enc[0] <= enc[1] <= den[0] <= den[1] <= dec[0] <= dec[1] <= wri[0] <= wri[1] <= mea[0] <= mea[1]
    assert "denoising" in err and "3/3" in err  # the progress bar went to stderr

    run = MlflowClient(mlflow_uri).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == result["params"]
    expected = {
        "model": "tiny", "prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": "3",
        "guidance_scale": "7.5", "num_frames": "17", "fps": "12", "height": "48", "width": "80", "seed": "5",
        "scheduler": "CogVideoXDDIMScheduler", "dtype": "float32", "device_encode": "cpu",
        "device_denoise": "cpu", "device_decode": "cpu", "executor": "local",
    }  # fmt: skip
    assert expected.items() <= run.data.params.items()
    metrics = run.data.metrics
    for key in ("encode_s", "denoise_s", "decode_s", "write_s", "measure_s", "total_s", "s_per_step"):
        assert metrics[key] == pytest.approx(result["metrics"][key]) and metrics[key] > 0
    assert metrics["s_per_step"] == pytest.approx(metrics["denoise_s"] / 3)
    # The clarity panel measured the frames as made (clarity/...), and the MP4 as saved
    # (encoded/clarity/...): measuring the file again gives the same figures.
    again = measure_file(video)
    assert {f"encoded/{k}": v for k, v in again.metrics().items()} == {
        k: v for k, v in metrics.items() if k.startswith("encoded/clarity/")
    }
    assert {k for k in metrics if k.startswith("clarity/")} == {f"clarity/{k}" for k in again.summary}
    assert set(again.summary) == set(METRICS) - {"psnr_y", "ssim_y"}  # no reference, no fidelity figures
    assert {"encoded/psnr_y", "encoded/ssim_y"} <= set(metrics)  # the file against the frames
    assert result["clarity_csv"] == str(video.with_suffix(".clarity.csv")) and result["clarity_error"] is None
    artifacts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id)}
    assert artifacts == {"fox.mp4", "fox.sheet.png", "fox.clarity.csv", "config.yaml"}
    csv_path = MlflowClient(mlflow_uri).download_artifacts(run.info.run_id, "fox.clarity.csv", str(tmp_path))
    assert Path(csv_path).read_text() == video.with_suffix(".clarity.csv").read_text()
    config_path = MlflowClient(mlflow_uri).download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    config = yaml.safe_load(Path(config_path).read_text())
    assert config["model"]["name"] == "tiny" and config["weights"] == result["params"]["weights"]
    assert config["request"]["num_frames"] == 17 and config["request"]["negative_prompt"] == "blurry"
    assert config["model"]["components"]["transformer"]["class"] == "diffusers.CogVideoXTransformer3DModel"


def test_plain_output_names_video_and_run(tmp_path, capsys, tiny_weights, mlflow_uri):
    code, out, _ = run_cli(capsys, "--prompt", "a cat", "--steps", "2", "--output", str(tmp_path / "c.mp4"),
                           "--tracking-uri", mlflow_uri, "--local")  # fmt: skip
    assert code == 0
    assert f"video: {tmp_path / 'c.mp4'}" in out
    run_id = next(line.split()[2] for line in out.splitlines() if line.startswith("mlflow run:"))
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "24"], "frames must be 8k+1 for tiny (got 24; nearest valid: 17 or 25)"),
        (["--height", "70"], "height must be a multiple of 16 for tiny (got 70; nearest valid: 64 or 80)"),
        (["--width", "4096"], "width must be between 32 and 256 for tiny (got 4096)"),
        (["--steps", "0"], "steps must be at least 1 (got 0)"),
        (["--guidance", "0.5"], "guidance scale must be at least 1"),
        (["--model", "sora"], "unknown model 'sora'; known models: cogvideox-2b, cogvideox-5b, cogvideox-5b-i2v"),
        (["--model", "cogvideox-2b", "--weights", "/nonexistent"], "no diffusers weights for cogvideox-2b at"),
        (["--negative-prompt", "cat " * 250], "negative prompt is 251 tokens long; tiny's text encoder takes at most"),
        (["--ulysses", "4"], "invalid parallel layout cfg1xulysses4xring1: the Ulysses degree must divide the "
         "model's 2 attention heads; valid layouts for 4 workers: cfg2xulysses2xring1, cfg2xulysses1xring2, "
         "cfg1xulysses2xring2, cfg1xulysses1xring4"),
        (["--cfg-parallel", "--guidance", "1"], "CFG-parallel needs classifier-free guidance (guidance scale > 1)"),
        (["--workers", "2"], "--local runs in one process; the layout cfg2xulysses1xring1 needs 2 Ray actors"),
        (["--cluster", "moon"], "unknown cluster layout 'moon'; known: multi-node, single-node"),
        (["--decoders", "0"], "decoders must be at least 1 (got 0)"),
        (["--decoders", "10"], "decoders 10 is more than the 9 tile(s) of a 64x96 video in 32x48 px tiles "
         "overlapping by 8x8 px; use at most 9 decoder(s) or smaller tiles (tile_size)"),
        (["--decoders", "2"], "--local runs in one process; --decoders 2 needs 2 Ray actors"),
        (["--tile-size", "32x48", "--tile-overlap", "32x8"], "tile height (32 px) must be larger than the tile "
         "overlap (32 px)"),
        (["--tile-size", "30x48"], "tile height must be a positive multiple of 8 px for tiny (got 30)"),
        (["--tile-overlap", "8x12"], "tile overlap (width) must be a multiple of 8 px for tiny (got 12)"),
        (["--interpolate", "8"], "interpolate must be above the video's 8 fps and at most 64"),
        (["--codec", "av1"], "codec must be one of h264, h264-lossless, ffv1, prores, webm, gif (got 'av1')"),
        (["--crf", "60"], "crf must be between 0 and 51 for h264 (got 60)"),
        (["--codec", "ffv1"], "codec ffv1 writes .mkv files: --output must end in .mkv (got "),
        (["--prompt", "a dog"], "--output names one video but there are 2 prompts; use --output-dir"),
        (["--prompt", "a dog", "--prompt", "cat " * 250, "--output-dir", "."],
         "prompt 3 of 3: prompt is 251 tokens long; tiny's text encoder takes at most 226"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, monkeypatch, tiny_weights, args, message):
    def no_model_work(*a, **k):
        raise AssertionError("bad input reached the stages")

    monkeypatch.setattr("cluster.driver.make_executor", no_model_work)
    output = [] if "--output-dir" in args else ["--output", str(tmp_path / "x.mp4")]
    argv = ["--prompt", "a cat", *output, "--local", *args]
    code, out, err = run_cli(capsys, *argv)
    assert code == EXIT_INVALID
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("framecast: error: ")
    assert message in lines[0]
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "x.mp4").exists()


def test_lossless_video_with_an_interpolated_copy(tmp_path, capsys, tiny_weights, mlflow_uri):
    """--codec ffv1 keeps the frames exactly (the file's frames have the frames' digest), and
    --interpolate 24 writes <name>.interp.mkv beside it: 3x the frames, the same duration,
    measured as interp/clarity/...; the contact sheet is the original's."""
    video = tmp_path / "fox.mkv"
    code, out, err = run_cli(capsys, "--prompt", "a red fox", "--steps", "2", "--codec", "ffv1", "--interpolate", "24",
                             "--output", str(video), "--tracking-uri", mlflow_uri, "--local", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    frames = read_frames(video)
    assert hashlib.sha256(frames).hexdigest() == result["frames_sha256"]  # lossless: the frames as made
    interpolated = DecodedVideo.read(result["interpolated"], planes=("rgb",))
    assert result["interpolated"] == str(tmp_path / "fox.interp.mkv")
    assert (interpolated.frames, interpolated.fps) == (27, 24.0)  # 9 frames at 8 fps: 1.125 s either way
    metrics = result["metrics"]
    assert metrics["encoded/psnr_y"] == "inf" and metrics["encoded/ssim_y"] == 1.0  # strict JSON: "inf"
    clarity = {k: v for k, v in metrics.items() if k.startswith("clarity/")}
    assert {k.removeprefix("encoded/"): v for k, v in metrics.items() if k.startswith("encoded/clarity/")} == clarity
    remeasured = measure_frames(interpolated.rgb, 24).metrics()  # the copy is lossless too
    assert {f"interp/{k}": v for k, v in remeasured.items()} == {k: v for k, v in metrics.items() if "interp/" in k}
    assert metrics["interp/clarity/motion_magnitude"] < metrics["clarity/motion_magnitude"]  # a third per frame
    sheet = np.asarray(Image.open(result["contact_sheet"]))
    assert np.array_equal(sheet, np.asarray(contact_sheet(frames, marks=measure_frames(frames, 8).marks())))
    run = MlflowClient(mlflow_uri).get_run(result["run_id"])
    assert run.data.params["codec"] == "ffv1" and run.data.params["interpolate_fps"] == "24"
    artifacts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id)}
    assert artifacts == {"fox.mkv", "fox.interp.mkv", "fox.sheet.png", "fox.clarity.csv", "config.yaml"}
    assert "interp/clarity/warp_error" in run.data.metrics


def test_a_gif_says_it_is_lossy(tmp_path, capsys, tiny_weights, mlflow_uri):
    """A GIF holds 256 colours: accepted, and the run says it lost colours."""
    video = tmp_path / "noise.gif"
    code, out, err = run_cli(capsys, "--prompt", "a cat", "--steps", "1", "--codec", "gif", "--output", str(video),
                             "--tracking-uri", mlflow_uri, "--local", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert "a GIF holds 256: it is lossy" in result["warnings"]["lossy_gif"]
    assert f"framecast: warning: {result['warnings']['lossy_gif']}" in err
    assert read_frames(video).shape == (9, 64, 96, 3) and result["metrics"]["encoded/psnr_y"] < 60
    run = MlflowClient(mlflow_uri).get_run(result["run_id"])
    assert run.data.tags["framecast.warning.lossy_gif"] == result["warnings"]["lossy_gif"]


def test_interpolation_failure_keeps_the_video_and_the_run(tmp_path, capsys, monkeypatch, tiny_weights, mlflow_uri):
    def broken(*args, **kwargs):
        raise OSError("ffmpeg vanished")

    monkeypatch.setattr("cluster.driver.interpolate", broken)
    video = tmp_path / "kept.mp4"
    code, out, err = run_cli(capsys, "--prompt", "a cat", "--steps", "1", "--interpolate", "16", "--output",
                             str(video), "--tracking-uri", mlflow_uri, "--local", "--json")  # fmt: skip
    assert code == EXIT_INCOMPLETE
    result = json.loads(out)
    assert read_frames(video).shape[0] == 9 and result["interpolated"] is None
    assert result["interpolation_error"] == "OSError: ffmpeg vanished" and result["clarity_error"] is None
    assert not any(k.startswith("interp/") for k in result["metrics"]) and "clarity/tenengrad" in result["metrics"]
    assert f"interpolation failed, video kept at {video}: OSError: ffmpeg vanished" in err
    run = MlflowClient(mlflow_uri).get_run(result["run_id"])
    assert run.data.tags["framecast.interpolation_error"] == result["interpolation_error"]


def test_tracking_failure_keeps_the_video(tmp_path, capsys, tiny_weights):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where MLflow wants a directory")
    video = tmp_path / "kept.mp4"
    code, out, err = run_cli(capsys, "--prompt", "a cat", "--steps", "2", "--output", str(video),
                             "--tracking-uri", f"file://{blocker}/mlruns", "--local", "--json")  # fmt: skip
    assert code == EXIT_INCOMPLETE
    assert video.is_file() and read_frames(video).shape[0] == 9
    result = json.loads(out)
    assert result["run_id"] is None and result["tracking_error"]
    assert f"tracking failed, video kept at {video}" in err


def test_clarity_failure_keeps_the_video_and_the_run(tmp_path, capsys, monkeypatch, tiny_weights, mlflow_uri):
    def broken(self, *args, **kwargs):
        raise RuntimeError("ffmpeg vanished")

    monkeypatch.setattr("stages.clarity.ClarityStage.measure", broken)
    video = tmp_path / "kept.mp4"
    code, out, err = run_cli(capsys, "--prompt", "a cat", "--steps", "2", "--output", str(video),
                             "--tracking-uri", mlflow_uri, "--local", "--json")  # fmt: skip
    assert code == EXIT_INCOMPLETE
    assert read_frames(video).shape[0] == 9 and video.with_suffix(".sheet.png").is_file()
    result = json.loads(out)
    assert result["clarity_error"] == "measure stage failed: RuntimeError: ffmpeg vanished"
    assert result["clarity_csv"] is None and not any(k.startswith("clarity/") for k in result["metrics"])
    assert f"clarity failed, video kept at {video}: measure stage failed" in err
    run = MlflowClient(mlflow_uri).get_run(result["run_id"])  # tracked all the same, saying why figures are missing
    assert run.data.tags["framecast.clarity_error"] == result["clarity_error"]
    artifacts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id)}
    assert artifacts == {"kept.mp4", "kept.sheet.png", "config.yaml"}


@pytest.mark.own_ray
def test_generate_through_embedded_ray(tmp_path, tiny_weights, mlflow_uri):
    """The real command in a fresh process: it starts its own local Ray and runs the three stage actors."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", "tiny", "--prompt", "a fox", "--steps", "4",
         "--seed", "3", "--output", str(tmp_path / "ray.mp4"), "--tracking-uri", mlflow_uri, "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["params"]["executor"] == "ray"
    assert "4/4" in proc.stderr  # the bar reached the last step, relayed from the denoiser actor
    assert read_frames(result["video"]).shape == (9, 64, 96, 3)
    assert MlflowClient(mlflow_uri).get_run(result["run_id"]).data.params["seed"] == "3"


def test_generate_joins_a_running_cluster(tmp_path, ray_session, tiny_weights, mlflow_uri):
    """--address joins an existing Ray instead of starting one: the actors live in that cluster."""
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", "tiny", "--prompt", "a fox", "--steps", "2",
         "--address", address, "--output", str(tmp_path / "joined.mp4"), "--tracking-uri", mlflow_uri],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Connected to Ray cluster" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr


def test_stage_failure_is_one_line_and_nonzero(tmp_path, capsys, monkeypatch, tiny_weights):
    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory while denoising\nsecond line of detail")

    monkeypatch.setattr("stages.denoiser.DenoiserStage.denoise", broken)
    code, out, err = run_cli(capsys, "--prompt", "a cat", "--output", str(tmp_path / "x.mp4"), "--local")
    assert code == EXIT_FAILED and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("framecast: error: denoise stage failed: RuntimeError: out of memory while denoising")
    assert "Traceback" not in err


def test_generate_with_a_denoiser_group(tmp_path, capsys, ray_session, tiny_weights, mlflow_uri):
    """--workers 2 on tiny (2 heads, guidance on) picks CFG-parallel; the layout and each rank's
    peak memory and token count are in the MLflow run. (Its exactness: tests/test_context_parallel.py.)"""
    common = ["--prompt", "a fox", "--steps", "2", "--seed", "4", "--tracking-uri", mlflow_uri, "--json"]
    code, out, err = run_cli(capsys, *common, "--workers", "2", "--output", str(tmp_path / "group.mp4"))
    assert code == 0, err
    result = json.loads(out)
    params = MlflowClient(mlflow_uri).get_run(result["run_id"]).data.params
    expected = {"layout": "cfg2xulysses1xring1", "workers": "2", "cfg_parallel": "True", "ulysses_degree": "1",
                "ring_degree": "1", "cluster_layout": "single-node", "executor": "ray"}  # fmt: skip
    assert expected.items() <= params.items()
    metrics = MlflowClient(mlflow_uri).get_run(result["run_id"]).data.metrics
    assert metrics["denoise_rank0_peak_mib"] > 0 and metrics["denoise_rank1_peak_mib"] > 0
    assert metrics["denoise_peak_mib"] == max(metrics["denoise_rank0_peak_mib"], metrics["denoise_rank1_peak_mib"])
    assert metrics["denoise_rank0_video_tokens"] == metrics["denoise_rank1_video_tokens"] == 3 * 4 * 6

    code, out, err = run_cli(capsys, *common, "--local", "--output", str(tmp_path / "single.mp4"))  # one process
    assert code == 0, err
    assert json.loads(out)["metrics"]["denoise_rank0_video_tokens"] == 3 * 4 * 6  # one CFG branch: every token
    assert read_frames(tmp_path / "group.mp4").shape == read_frames(tmp_path / "single.mp4").shape


def test_json_stdout_is_only_json_even_when_libraries_print(tmp_path, mlflow_uri):
    """A first run builds the tiny model, which imports DeepSpeed, which warns on stdout: --json
    still prints nothing but the JSON object there."""
    env = {**os.environ, "FRAMECAST_CACHE": str(tmp_path / "fresh-cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", "tiny", "--prompt", "a fox", "--steps", "1",
         "--local", "--json", "--output", str(tmp_path / "v.mp4"), "--tracking-uri", mlflow_uri],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["video"] == str(tmp_path / "v.mp4")
