"""`framecast sweep`: a grid of settings at one seed, one parent MLflow run with a child per cell,
resumable, with a summary (table, heatmaps, side-by-side frames) whose numbers are the cells'."""

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

import cluster.replicas as replicas_module
import cluster.sweep as sweep_module
from cluster.cli import EXIT_INCOMPLETE, main
from cluster.driver import generate, make_executor
from cluster.settings import resolve_settings
from cluster.sweep import CellOutcome, parse_grid, plan_sweep, run_sweep
from cluster.sweep_report import SHEET_TILE_WIDTH, file_name, panel_values
from stages.clarity import metric_sign
from stages.encoder import EncoderStage
from stages.errors import InvalidRequest
from stages.models import load_spec
from stages.video_io import read_frame, read_frames

GRID = ["--grid", "steps=1,2", "--grid", "guidance=1,6"]


def run_cli(capsys, tmp_path, experiment, *extra):
    argv = ["sweep", "--model", "tiny", "--local", "--prompt", "a red fox in snow", *GRID, "--frames", "9",
            "--seed", "42", "--json", "--experiment", experiment, "--output-dir", str(tmp_path / "out"),
            *extra]  # fmt: skip
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def children(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_grid_parsing():
    grid = parse_grid(["steps=30,40,50", "guidance=6,7.5", "scheduler=ddim,dpm", "dynamic-guidance=off,on",
                       "codec=h264,ffv1", "crf=18,28", "interpolate=16,24"])  # fmt: skip
    assert grid == {"steps": [30, 40, 50], "guidance": [6.0, 7.5], "scheduler": ["ddim", "dpm"],
                    "dynamic_guidance": [False, True], "codec": ["h264", "ffv1"], "crf": [18, 28],
                    "interpolate": [16, 24]}  # fmt: skip


@pytest.mark.parametrize(
    "texts, message",
    [
        (["seed=1,2"], "unknown axis 'seed'; axes: steps, guidance"),
        (["steps"], "expected AXIS=V1,V2,... e.g. steps=30,40,50"),
        (["steps=30,x"], "steps values are ints (got 'x')"),
        (["steps=30,30"], "a value is repeated"),
        (["steps=1", "steps=2"], "--grid steps is given twice"),
        (["dynamic_guidance=maybe"], "dynamic_guidance values are true or false"),
    ],
)
def test_bad_grids(texts, message):
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        parse_grid(texts)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--grid", "steps=1,2000"], "cell steps=2000,guidance=1.0: steps must be at most 200 for tiny"),
        (["--steps", "3", "--grid", "steps=1,2"], "--steps is also a --grid axis; give it in one place"),
        (["--replicas", "2"], "--local runs in one process; --replicas 2 needs Ray"),
        (["--sheet-frame", "9"], "--sheet-frame 9 is out of range; the shortest cell has 9 frames (0..8)"),
        (["--grid", "scheduler=euler"], "unknown scheduler 'euler' for tiny"),
        (["--duration", "2"], "--duration sets the frames from the fps; drop --frames"),
        (
            ["--grid", "scheduler=ddim,CogVideoXDDIMScheduler"],
            "cells scheduler=ddim,guidance=1.0 and scheduler=CogVideoXDDIMScheduler,guidance=1.0 are the same "
            "generation",
        ),
    ],
)
def test_bad_sweeps_are_refused_before_any_work(tmp_path, capsys, extra, message):
    argv = ["sweep", "--model", "tiny", "--local", "--prompt", "a fox", "--frames", "9", "--output-dir", str(tmp_path),
            *extra, "--grid", "guidance=1"]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written, no run started


def test_sweep_parent_children_and_summary(tmp_path, capsys, monkeypatch):
    encoded = []
    real_encode = EncoderStage.encode
    monkeypatch.setattr(EncoderStage, "encode", lambda self, *a: encoded.append(a) or real_encode(self, *a))
    code, result, err = run_cli(capsys, tmp_path, "sweep-summary")
    assert code == 0, err
    assert (result["cells"], result["ran"], result["reused"], result["failed"]) == (4, 4, 0, 0)
    assert not result["resumed"]
    # One prompt, encoded once (with the negative prompt: two cells guide), for guidance 1 and 6 alike.
    assert encoded == [("a red fox in snow", "", True)] and result["prompt_encodings"] == 1
    assert len({o["metrics"]["encode_s"] for o in result["outcomes"]}) == 1  # the one encoding's span

    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["framecast.kind"] == "sweep"
    assert parent.data.params["grid.steps"] == "1,2" and parent.data.params["grid.guidance"] == "1.0,6.0"
    assert parent.data.params["seed"] == "42" and parent.data.metrics["cells_ran"] == 4
    runs = children(client, parent.info.run_id)
    assert len(runs) == 4
    by_label = {r.data.tags["framecast.sweep_cell"]: r for r in runs}
    assert set(by_label) == {"steps=1,guidance=1.0", "steps=1,guidance=6.0", "steps=2,guidance=1.0",
                             "steps=2,guidance=6.0"}  # fmt: skip
    for label, run in by_label.items():
        steps, guidance = (part.split("=")[1] for part in label.split(","))
        assert run.info.status == "FINISHED"
        assert (run.data.params["steps"], run.data.params["guidance_scale"]) == (steps, guidance)
        assert run.data.params["seed"] == "42"  # the same seed in every cell
        assert any(a.path.endswith(".mp4") for a in client.list_artifacts(run.info.run_id))
    digests = {r.data.tags["framecast.frames_sha256"] for r in runs}
    assert len(digests) == 4  # four different videos

    # The table on the parent run holds each child's figures.
    table = Path(client.download_artifacts(parent.info.run_id, "summary/table.csv", str(tmp_path / "dl")))
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert len(rows) == 4
    for row in rows:
        run = by_label[f"steps={row['steps']},guidance={row['guidance']}"]
        assert row["status"] == "ran"
        for key in ("clarity/sharpness_laplacian_var", "clarity/blur_effect", "clarity/warp_error", "total_s"):
            assert math.isclose(float(row[key]), run.data.metrics[key], rel_tol=1e-5)
    markdown = client.download_artifacts(parent.info.run_id, "summary/table.md", str(tmp_path / "dl"))
    assert Path(markdown).read_text().startswith("| steps | guidance | status | clarity/sharpness_laplacian_var |")

    # A heatmap per clarity metric, over steps (rows) x guidance (columns), with the children's figures.
    heatmaps = {a.path for a in client.list_artifacts(parent.info.run_id, "summary/heatmaps")}
    keys = [k for k in parent.data.metrics if k.startswith("best/")]
    assert heatmaps == {f"summary/heatmaps/{k}.png" for k in
                        ("sharpness_laplacian_var", "sharpness_laplacian_var_min", "tenengrad", "blur_effect",
                         "noise_sigma", "flicker_mae", "flicker_score", "motion_magnitude", "warp_error",
                         "encoded_psnr_y", "encoded_ssim_y")}  # fmt: skip
    png = client.download_artifacts(parent.info.run_id, "summary/heatmaps/blur_effect.png", str(tmp_path / "dl"))
    assert Image.open(png).size[0] > 200
    outcomes = [CellOutcome(sweep_module.Cell((("steps", int(s)), ("guidance", float(g)))), "ran",
                            dict(by_label[f"steps={s},guidance={g}"].data.metrics))
                for s in ("1", "2") for g in ("1.0", "6.0")]  # fmt: skip
    [((), grid)] = panel_values({"steps": [1, 2], "guidance": [1.0, 6.0]}, outcomes, "clarity/blur_effect")
    for i, s in enumerate(("1", "2")):
        for j, g in enumerate(("1.0", "6.0")):
            assert grid[i, j] == by_label[f"steps={s},guidance={g}"].data.metrics["clarity/blur_effect"]

    # The best cell per metric, on the parent and in the JSON, is the clearest child.
    # every clarity metric but motion, which ranks nothing, and what the codec cost
    assert len(keys) == len(result["best"]) == 8 + 2 and {"encoded/psnr_y", "encoded/ssim_y"} <= set(result["best"])
    for key, best in result["best"].items():
        sign = metric_sign(key)
        clearest = max(runs, key=lambda r: sign * r.data.metrics[key])
        assert best["cell"] == clearest.data.tags["framecast.sweep_cell"]
        assert parent.data.metrics[f"best/{key}"] == clearest.data.metrics[key]
        assert parent.data.tags[f"framecast.best.{file_name(key)}"] == best["cell"]  # e.g. blur_effect, encoded_psnr_y

    # The same frame of every cell, side by side: steps down, guidance across.
    sheet = np.asarray(Image.open(client.download_artifacts(parent.info.run_id, "summary/frames.png",
                                                            str(tmp_path / "dl"))))  # fmt: skip
    tile_w, tile_h = sheet.shape[1] // 2, sheet.shape[0] // 2
    assert tile_w == SHEET_TILE_WIDTH + 4
    for i, s in enumerate(("1", "2")):
        for j, g in enumerate(("1.0", "6.0")):
            video = by_label[f"steps={s},guidance={g}"].data.tags["framecast.video"]
            frame = Image.fromarray(read_frame(Path(video), 4))  # the middle of 9 frames
            frame = np.asarray(frame.resize((SHEET_TILE_WIDTH, SHEET_TILE_WIDTH * 64 // 96), Image.LANCZOS))
            bottom, left = (i + 1) * tile_h - 2, j * tile_w + 2  # each tile: 2 px border, label, frame
            tile = sheet[bottom - frame.shape[0] : bottom, left : left + SHEET_TILE_WIDTH]
            assert np.abs(tile.astype(int) - frame).mean() < 1.0


def test_a_sweep_over_codecs_and_interpolation(tmp_path, capsys):
    """codec and interpolate are axes: each cell writes its codec's file and, when asked, its
    interpolated copy; the summary compares the copies (interp/clarity/...) and what each codec
    cost (encoded/psnr_y). The frames are the same in every cell: one generation's settings."""
    argv = ["sweep", "--model", "tiny", "--local", "--prompt", "a fox", "--grid", "codec=ffv1,webm",
            "--grid", "interpolate=0,16", "--steps", "1", "--json", "--experiment", "sweep-codecs",
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    outcomes = {o["label"]: o for o in result["outcomes"]}
    assert set(outcomes) == {"codec=ffv1,interpolate=0", "codec=ffv1,interpolate=16", "codec=webm,interpolate=0",
                             "codec=webm,interpolate=16"}  # fmt: skip
    client = MlflowClient()
    digests = {client.get_run(o["run_id"]).data.tags["framecast.frames_sha256"] for o in outcomes.values()}
    assert len(digests) == 1
    for label, o in outcomes.items():
        video = Path(o["video"])
        assert video.suffix == (".webm" if "webm" in label else ".mkv")
        interpolated = video.with_suffix(f".interp{video.suffix}")
        assert interpolated.is_file() == label.endswith("=16")
        assert any(k.startswith("interp/clarity/") for k in o["metrics"]) == label.endswith("=16")
        if label.endswith("=16"):
            assert read_frames(interpolated).shape[0] == 18
    # lossless: an infinite PSNR, "inf" in strict JSON, the best cell, shown but not on the colour scale
    assert outcomes["codec=ffv1,interpolate=0"]["metrics"]["encoded/psnr_y"] == "inf"
    assert result["best"]["encoded/psnr_y"] == {"cell": "codec=ffv1,interpolate=0", "value": "inf"}
    heatmaps = {a.path for a in client.list_artifacts(result["parent_run_id"], "summary/heatmaps")}
    assert {"summary/heatmaps/encoded_psnr_y.png", "summary/heatmaps/interp_clarity_warp_error.png"} <= heatmaps


def test_a_cell_without_its_interpolated_copy_is_incomplete_and_run_again(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("ffmpeg vanished")

    argv = ["sweep", "--model", "tiny", "--local", "--prompt", "a fox", "--grid", "interpolate=16", "--steps", "1",
            "--json", "--experiment", "sweep-uninterpolated", "--output-dir", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr("cluster.driver.interpolate", broken)
    assert main(argv) == EXIT_INCOMPLETE
    (cell,) = json.loads(capsys.readouterr().out)["outcomes"]
    assert cell["status"] == "uninterpolated" and cell["error"] == "OSError: ffmpeg vanished"
    monkeypatch.undo()
    assert main(argv) == 0  # the same sweep again: the cell is run again, not reused
    result = json.loads(capsys.readouterr().out)
    assert result["resumed"] and result["outcomes"][0]["status"] == "ran" and result["reused"] == 0


def test_interrupted_sweep_resumes(tmp_path, capsys, monkeypatch):
    tracked = []
    real_track = sweep_module._track_cell

    def interrupting(*args, **kwargs):
        if len(tracked) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third cell is being recorded
        tracked.append(real_track(*args, **kwargs))
        return tracked[-1]

    monkeypatch.setattr(sweep_module, "_track_cell", interrupting)
    code, _, err = run_cli(capsys, tmp_path, "sweep-resume")
    assert code == 130
    assert "interrupted; the cells finished so far are kept: run the same command to resume" in err
    client = MlflowClient()
    parent_id = client.get_run(tracked[0].run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "KILLED"
    assert len(children(client, parent_id)) == 2

    # One of the two finished cells loses its run's FINISHED status (say, killed while logging):
    # it must be done again; the other is reused.
    client.set_terminated(tracked[1].run_id, "FAILED")
    monkeypatch.setattr(sweep_module, "_track_cell", real_track)
    code, result, err = run_cli(capsys, tmp_path, "sweep-resume")
    assert code == 0, err
    assert result["parent_run_id"] == parent_id and result["resumed"]
    assert (result["cells"], result["ran"], result["reused"]) == (4, 3, 1)
    reused = [o for o in result["outcomes"] if o["status"] == "reused"]
    assert [o["run_id"] for o in reused] == [tracked[0].run_id]
    assert client.get_run(parent_id).info.status == "FINISHED"
    finished = [r for r in children(client, parent_id) if r.info.status == "FINISHED"]
    assert len(finished) == 4
    # Run again: everything is reused, nothing is encoded or generated.
    code, again, _ = run_cli(capsys, tmp_path, "sweep-resume")
    assert (again["ran"], again["reused"], again["prompt_encodings"]) == (0, 4, 0)
    assert again["best"] == result["best"]
    # What a person reads: the table, the best cell per metric, the counts.
    argv = ["sweep", "--model", "tiny", "--local", "--prompt", "a red fox in snow", *GRID, "--frames", "9",
            "--seed", "42", "--experiment", "sweep-resume", "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("| steps | guidance | status | clarity/sharpness_laplacian_var |")
    assert text.count("| reused |") == 4
    best = result["best"]["clarity/sharpness_laplacian_var"]
    assert "clarity/sharpness_laplacian_var" in text and best["cell"] in text
    assert "cells: 4 (0 ran, 4 reused, 0 failed); prompt encoded 0 time(s)" in text
    assert f"mlflow parent run: {parent_id}" in text


def test_retrained_weights_in_the_same_directory_are_a_new_sweep(tmp_path, capsys):
    """Retraining (make train-demo) rewrites the same weights directory: the same command must run
    every cell again on the new weights, not reuse the old weights' videos."""
    import shutil

    from safetensors.torch import load_file, save_file

    from stages.weights import resolve_weights

    weights = tmp_path / "weights"
    shutil.copytree(resolve_weights(load_spec("tiny")), weights)
    extra = ("--weights", str(weights))
    code, first, err = run_cli(capsys, tmp_path, "sweep-retrained", *extra)
    assert code == 0, err
    code, again, _ = run_cli(capsys, tmp_path, "sweep-retrained", *extra)
    assert (again["ran"], again["reused"], again["parent_run_id"]) == (0, 4, first["parent_run_id"])

    tensors_file = weights / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(tensors_file)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 0.01  # "retrained": same names, shapes and file size
    save_file(tensors, tensors_file, metadata={"format": "pt"})
    code, retrained, err = run_cli(capsys, tmp_path, "sweep-retrained", *extra)
    assert code == 0, err
    assert (retrained["ran"], retrained["reused"], retrained["resumed"]) == (4, 0, False)
    assert retrained["sweep_id"] != first["sweep_id"]


def test_duration_sweep_derives_frames_per_cell(tmp_path, capsys):
    argv = ["sweep", "--model", "tiny", "--local", "--prompt", "a fox", "--grid", "fps=8,12,16", "--duration", "2",
            "--steps", "1", "--json", "--experiment", "sweep-duration", "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    client = MlflowClient()
    frames = {o["label"]: client.get_run(o["run_id"]).data.params["num_frames"] for o in result["outcomes"]}
    assert frames == {"fps=8": "17", "fps=12": "25", "fps=16": "33"}
    params = client.get_run(result["parent_run_id"]).data.params
    assert params["derived.num_frames"] == "17,25,33" and "num_frames" not in params
    assert params["grid.fps"] == "8,12,16" and params["duration_s"] == "2" and params["steps"] == "1"
    assert "2 s at 8 fps = 16 frames -> 17 (tiny makes 8k+1 frames, 9 to 33; 2.12 s)" in err
    assert "2 s at 12 fps = 24 frames -> 25" in err and "2 s at 16 fps = 32 frames -> 33" in err


def test_warnings_are_tagged_on_cells_and_parent(tmp_path, capsys):
    argv = ["sweep", "--model", "tiny", "--local", "--prompt", "a fox", "--grid", "guidance=6,11", "--steps", "1",
            "--frames", "9", "--json", "--experiment", "sweep-warnings", "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err.count("framecast: warning: guidance 11 is above 9.5: expect over-saturated colours") == 1
    result = json.loads(out)
    client = MlflowClient()
    tags = {o["label"]: client.get_run(o["run_id"]).data.tags for o in result["outcomes"]}
    assert "framecast.warning.high_guidance" not in tags["guidance=6.0"]
    assert tags["guidance=11.0"]["framecast.warning.high_guidance"].startswith("guidance 11 is above 9.5")
    parent = client.get_run(result["parent_run_id"]).data.tags
    assert (
        parent["framecast.warning.high_guidance"]
        == "1 of 2 cells: guidance 11 is above 9.5: expect over-saturated colours"
    )


def test_what_identifies_a_sweep(tiny_spec):
    """The videos decide a sweep's identity: tiling does (it changes the frames), how the work is
    spread does not (workers, decoders sharing the same tiles)."""
    settings = resolve_settings(tiny_spec, {"frames": 9})

    def sweep_id(**placement) -> str:
        return plan_sweep("tiny", "a fox", {"steps": [1, 2]}, settings, seed=1, **placement).sweep_id

    plain = sweep_id()
    assert sweep_id(workers=2) == plain
    tiled = sweep_id(decoders=2, tile_size=(32, 48))
    assert tiled != plain and sweep_id(decoders=3, tile_size=(32, 48)) == tiled
    assert plan_sweep("tiny", "a fox", {"steps": [1, 2]}, settings, seed=2).sweep_id != plain
    assert sweep_id(acceleration={"compile": True}) != plain  # compiled kernels round otherwise: new videos


def test_preset_ranges_become_axes(tmp_path):
    spec = load_spec("tiny")
    settings = resolve_settings(spec, {"frames": 9}, "quick", swept=frozenset({"guidance"}))
    plan = plan_sweep("tiny", "a fox", {"guidance": [5.0, 6.0]}, settings, seed=3, local=True)
    assert plan.axes == {"guidance": [5.0, 6.0], "steps": [10, 15, 20]}  # the user's axis, then the preset's
    assert len(plan.cells) == 6 and {j.request.seed for j in plan.jobs} == {3}


def test_a_failing_replica_keeps_the_others_cells(tmp_path, tiny_spec, monkeypatch):
    """Replica 1 fails at once; replica 0's finished cell is still tracked before the error is
    raised, the parent run is FAILED, and a rerun reuses that cell. (Two in-process replicas.)"""
    settings = resolve_settings(tiny_spec, {"frames": 9, "guidance": 1.0})
    plan = plan_sweep("tiny", "a fox", {"steps": [1, 2, 3, 4]}, settings, seed=1, local=True)
    replicas: list = []
    real_stream = replicas_module.run_stream

    def failing_on_the_second(jobs, executor, *args):
        if executor not in replicas:
            replicas.append(executor)
        if replicas.index(executor) == 1:
            raise RuntimeError("replica 1 lost its GPU")
        yield from real_stream(jobs, executor, *args)

    monkeypatch.setattr(replicas_module, "run_stream", failing_on_the_second)
    with pytest.raises(RuntimeError, match="replica 1 lost its GPU"):
        run_sweep(plan, output_dir=tmp_path, replicas=2, local=True, experiment="sweep-replica-fails")
    client = MlflowClient()
    exp = client.get_experiment_by_name("sweep-replica-fails").experiment_id
    (parent,) = client.search_runs([exp], "tags.`framecast.kind` = 'sweep'")
    assert parent.info.status == "FAILED"
    kept = children(client, parent.info.run_id)
    assert len(kept) >= 1 and all(r.info.status == "FINISHED" for r in kept)
    monkeypatch.setattr(replicas_module, "run_stream", real_stream)
    again = run_sweep(plan, output_dir=tmp_path, replicas=1, local=True, experiment="sweep-replica-fails")
    assert again.count("reused") == len(kept) and again.count("ran") == 4 - len(kept)


def test_more_replicas_than_fit_are_refused(ray_session, tmp_path, capsys):
    argv = ["sweep", "--model", "tiny", "--prompt", "a fox", "--grid", "steps=1,2", "--frames", "9", "--replicas", "3",
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2
    assert "--replicas 3 needs 3 GPUs (or CPU cores without GPUs) for 1 denoiser rank(s) each; the Ray cluster " \
           "has room for 2" in capsys.readouterr().err  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_replicas_equal_single_process(ray_session, tmp_path, tiny_spec, tiny_weights):
    """Two pipeline replicas on Ray (2 CPUs: room for two) share the cells; each cell's frames
    equal the same settings generated in one process."""
    settings = resolve_settings(tiny_spec, {"frames": 9})
    plan = plan_sweep("tiny", "a lighthouse at dusk", {"steps": [1, 2], "guidance": [1.0, 6.0]}, settings, seed=5)
    result = run_sweep(plan, output_dir=tmp_path, replicas=2, experiment="sweep-replicas")
    assert result.count("ran") == 4 and result.encodings == 1
    client = MlflowClient()
    runs = {o.cell.label: client.get_run(o.run_id) for o in result.outcomes}
    assert {r.data.tags["framecast.replica"] for r in runs.values()} == {"0", "1"}
    for run in runs.values():  # only the first replica has a text encoder
        assert ("device_encode" in run.data.params) == (run.data.tags["framecast.replica"] == "0")
    local = make_executor(plan.jobs[0], local=True)
    for index, cell in enumerate(plan.cells):
        alone = generate(plan.jobs[index], local, tmp_path / f"alone{index}.mp4")
        assert runs[cell.label].data.tags["framecast.frames_sha256"] == alone.frames_sha256
