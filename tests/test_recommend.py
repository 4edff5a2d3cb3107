"""`framecast recommend`: heuristics labelled as such, and the best settings of real past runs
(here: runs seeded into a fresh MLflow store), or "no data"."""

import json

import pytest
from PIL import Image

from cluster.cli import main
from cluster.recommend import heuristics
from cluster.tracking import log_run
from stages.models import load_spec

SETTINGS = {"num_frames": "9", "fps": "8", "height": "64", "width": "96", "scheduler": "CogVideoXDDIMScheduler",
            "dynamic_guidance": "False", "codec": "h264", "crf": "18", "interpolate_fps": "0"}  # fmt: skip


def seed_run(uri: str, model: str, steps: int, guidance: float, sharpness: float, blur: float, **extra) -> None:
    stored = extra.pop("stored", {})  # how it was stored, and the file's figures
    log_run(
        params={
            "model": model,
            "prompt": extra.pop("prompt", "a fox"),
            "steps": str(steps),
            "guidance_scale": str(guidance),
            **SETTINGS,
            **stored.get("params", {}),
        },  # fmt: skip
        metrics={
            "clarity/sharpness_laplacian_var": sharpness,
            "clarity/blur_effect": blur,
            "total_s": 1.0,
            **stored.get("metrics", {}),
        },  # fmt: skip
        artifacts=[],
        experiment=extra.pop("experiment", "seeded"),
        tracking_uri=uri,
        **extra,
    )


@pytest.fixture
def store(tmp_path, mlflow_uri):
    return mlflow_uri


def recommend(capsys, store, *extra):
    """`framecast recommend --json` for tiny, unless extra names another --model (the last one wins)."""
    code = main(["recommend", "--model", "tiny", "--prompt", "a fox", "--tracking-uri", store, "--json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_best_settings_come_from_past_runs(store, capsys):
    seed_run(store, "tiny", 50, 9.0, sharpness=300.0, blur=0.30)
    seed_run(store, "tiny", 50, 9.0, sharpness=320.0, blur=0.28, prompt="a cat")
    for sharpness in (200.0, 210.0, 190.0):
        seed_run(store, "tiny", 30, 6.0, sharpness=sharpness, blur=0.25)
    seed_run(store, "cogvideox-2b", 40, 7.0, sharpness=1000.0, blur=0.1)  # another model: not counted
    seed_run(store, "tiny", 40, 7.0, sharpness=5000.0, blur=0.0, kind="clarity")  # not a generation
    code, result, _ = recommend(capsys, store)
    assert code == 0
    data = result["data"]
    assert data["runs"] == 5
    best, second = data["settings"]
    assert (best["settings"]["steps"], best["settings"]["guidance_scale"]) == ("50", "9.0")
    assert (best["runs"], best["mean"], best["low"], best["high"], best["same_prompt"]) == (2, 310.0, 300.0, 320.0, 1)
    assert (second["settings"]["steps"], second["runs"], second["mean"]) == ("30", 3, 200.0)
    # blur_effect: lower is clearer, so the ranking turns round
    _, by_blur, _ = recommend(capsys, store, "--metric", "clarity/blur_effect", "--top", "1")
    assert by_blur["better"] == "lower"
    assert [s["settings"]["steps"] for s in by_blur["data"]["settings"]] == ["30"]
    # the table a person reads says how many runs back each line
    assert main(["recommend", "--model", "tiny", "--prompt", "a fox", "--tracking-uri", store]) == 0
    text = capsys.readouterr().out
    assert "heuristics (rules of thumb from the tuning articles, not measured here)" in text
    assert "1. steps=50, guidance_scale=9.0, num_frames=9" in text and "mean 310 over 2 run(s), 300..320" in text
    assert "2. steps=30" in text and "over 3 run(s)" in text


def test_how_a_video_was_stored_groups_only_the_figures_it_changes(store, capsys):
    """The codec cannot change the frames' figures: runs that differ only in it are one setting
    for clarity/..., two for encoded/.... A run from before frames were measured (no codec param)
    measured its H.264 file as clarity/...: it counts for encoded/clarity/... at h264, CRF 18, and
    not for the frames."""
    seed_run(
        store,
        "tiny",
        30,
        6.0,
        sharpness=200.0,
        blur=0.3,
        stored={"metrics": {"encoded/clarity/sharpness_laplacian_var": 190.0, "encoded/psnr_y": 40.0}},
    )
    seed_run(
        store,
        "tiny",
        30,
        6.0,
        sharpness=210.0,
        blur=0.3,
        stored={
            "params": {"codec": "ffv1", "crf": "None"},
            "metrics": {"encoded/clarity/sharpness_laplacian_var": 210.0, "encoded/psnr_y": float("inf")},
        },
    )
    old = {k: v for k, v in SETTINGS.items() if k not in ("codec", "crf", "interpolate_fps")}  # before codecs
    log_run(
        params={"model": "tiny", "prompt": "a fox", "steps": "30", "guidance_scale": "6.0", **old},
        metrics={"clarity/sharpness_laplacian_var": 170.0},
        artifacts=[],
        experiment="seeded",
        tracking_uri=store,
    )
    _, frames, _ = recommend(capsys, store)
    (setting,) = frames["data"]["settings"]  # the two new runs, one setting; the old one has no frames figure
    assert "codec" not in setting["settings"] and (setting["runs"], setting["mean"]) == (2, 205.0)
    _, files, _ = recommend(capsys, store, "--metric", "encoded/clarity/sharpness_laplacian_var")
    by_codec = {s["settings"]["codec"]: s for s in files["data"]["settings"]}
    assert (by_codec["ffv1"]["mean"], by_codec["h264"]["runs"], by_codec["h264"]["mean"]) == (210.0, 2, 180.0)
    _, psnr, _ = recommend(capsys, store, "--metric", "encoded/psnr_y")
    best = psnr["data"]["settings"][0]  # lossless: an infinite PSNR, which MLflow's SQLite store keeps as 1.8e308
    assert best["settings"]["codec"] == "ffv1" and best["mean"] > 1e308


def test_no_runs_no_data(store, capsys):
    code, result, _ = recommend(capsys, store)
    assert code == 0 and result["data"]["runs"] == 0 and result["data"]["settings"] == []
    assert main(["recommend", "--model", "tiny", "--prompt", "a fox", "--tracking-uri", store]) == 0
    assert "no data: no finished runs of tiny with clarity/sharpness_laplacian_var" in capsys.readouterr().out
    seed_run(store, "cogvideox-2b", 40, 7.0, sharpness=1000.0, blur=0.1)  # runs, but of another model
    _, result, _ = recommend(capsys, store)
    assert result["data"]["runs"] == 0
    _, only, _ = recommend(capsys, store, "--experiment", "missing")
    assert only["data"]["runs"] == 0


def test_heuristics_follow_the_prompt_words():
    spec = load_spec("cogvideox-2b")
    rules = {h.rule: h.advice for h in heuristics(spec, "A horse galloping fast through a storm")}
    assert rules["motion words (fast, galloping, storm)"].startswith("guidance 9-11")
    rules = {h.rule: h.advice for h in heuristics(spec, "a calm lake at dawn, intricate watercolor painting")}
    assert rules["calm words (calm)"].startswith("guidance 6.5-7.5")
    assert rules["detail words (intricate)"].startswith("45-50 steps")
    assert rules["artistic words (painting, watercolor)"].startswith("50 steps and guidance 9")
    rules = {h.rule: h.advice for h in heuristics(spec, "a red car")}
    assert rules["no motion words"].startswith("guidance 7.5-9")
    small = heuristics(spec, "a red car", image_size=(360, 240))[-1]
    assert small.rule == "image 360x240, cogvideox-2b trained at 720x480"
    assert small.advice.startswith("it is upscaled 2.00x: add about 10 steps")
    assert "aspect ratio" in heuristics(spec, "a red car", image_size=(1024, 1024))[-1].advice
    assert "no compensation" in heuristics(spec, "a red car", image_size=(1440, 960))[-1].advice


def test_image_advice_from_the_command(store, tmp_path, capsys):
    image = tmp_path / "still.png"
    Image.new("RGB", (48, 32)).save(image)
    code, result, _ = recommend(capsys, store, "--image", str(image))
    assert code == 0
    assert result["heuristics"][-1]["rule"] == "image 48x32, tiny trained at 96x64"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metric", "clarity/motion_magnitude"], "--metric clarity/motion_magnitude does not rank settings"),
        (["--metric", "sharpness"], "choose one of clarity/sharpness_laplacian_var"),
        (["--image", "missing.png"], "--image missing.png: no such file"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--top", "0"], "--top must be at least 1"),
    ],
)
def test_bad_requests(store, capsys, extra, message):
    code, _, err = recommend(capsys, store, *extra)
    assert code == 2 and message in err
