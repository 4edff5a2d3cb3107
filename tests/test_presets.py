"""Presets, durations and the articles' pitfall warnings: from flags to request settings."""

import json
import re

import pytest
from mlflow import MlflowClient

from cluster.cli import main
from cluster.settings import resolve_settings
from stages.errors import InvalidRequest
from stages.models import load_spec
from stages.presets import known_presets, load_preset
from stages.request import build_request, frames_for_duration, pitfalls


@pytest.fixture(scope="module")
def spec():
    return load_spec("tiny")


def test_every_preset_the_articles_give(spec):
    assert known_presets() == sorted(
        ["product", "talking-head", "creative", "preview", "standard", "high-motion", "explore", "quick", "daily",
         "final", "smooth"]
    )  # fmt: skip
    fixed = {name: load_preset(name).settings for name in known_presets()}
    assert fixed["product"] == {"steps": 45, "guidance": 8.5, "frames": 24, "fps": 12}
    assert fixed["talking-head"] == {"steps": 40, "guidance": 8.0, "frames": 32, "fps": 16}
    assert fixed["creative"] == {"steps": 50, "guidance": 9.0, "frames": 24, "fps": 12}
    assert load_preset("product").prompt_suffix == "text overlay, sharp focus, 8k resolution, product photography"
    assert load_preset("talking-head").prompt_suffix.startswith("talking head, clean background")
    for name, (steps, guidance) in {"preview": (30, 7.0), "standard": (50, 9.0), "high-motion": (60, 11.0),
                                    "explore": (40, 6.5)}.items():  # fmt: skip
        assert (fixed[name]["steps"], fixed[name]["guidance"]) == (steps, guidance)
    # The text-to-image presets are ranges a sweep expands.
    assert resolve_settings(spec, {}, "quick").preset_grid == {"steps": [10, 15, 20], "guidance": [5.0, 5.5, 6.0]}
    daily = resolve_settings(spec, {}, "daily").preset_grid
    assert daily == {"steps": [35, 40, 45, 50], "guidance": [7.0, 7.5, 8.0, 8.5]}
    final = resolve_settings(spec, {}, "final").preset_grid
    assert final["steps"][0] == 55 and final["steps"][-1] == 80 and final["guidance"] == [8.0, 9.0, 10.0]


def test_a_preset_may_interpolate(spec):
    """The image-to-video article's advice: fewer frames, interpolated to 24 fps (`smooth`)."""
    assert load_preset("smooth").settings == {"fps": 8, "interpolate": 24}
    smooth = resolve_settings(spec, {}, "smooth")
    assert smooth.values == {"fps": 8, "interpolate": 24}
    assert build_request(spec, "a cat", **smooth.request_kwargs()).interpolate_fps == 24
    assert resolve_settings(spec, {"interpolate": 30}, "smooth").values["interpolate"] == 30  # the flag wins


def test_preset_fills_what_is_not_set_and_flags_win(spec):
    product = resolve_settings(spec, {"steps": 30, "fps": None}, "product")
    assert product.values == {"steps": 30, "guidance": 8.5, "frames": 25, "fps": 12}  # 24 -> 25 (8k+1)
    assert product.notes == ["preset product: 24 frames -> 25 (tiny makes 8k+1 frames, 9 to 33; 2.08 s)"]
    assert product.prompt("a bottle of perfume,") == (
        "a bottle of perfume, text overlay, sharp focus, 8k resolution, product photography"
    )
    talking = resolve_settings(spec, {"guidance": 7.0}, "talking-head")
    assert talking.values == {"steps": 40, "guidance": 7.0, "frames": 33, "fps": 16}
    # an explicit frame count is the user's, not mapped; a swept axis is not the preset's either
    assert resolve_settings(spec, {"frames": 17}, "creative").values["frames"] == 17
    assert "steps" not in resolve_settings(spec, {}, "creative", swept=frozenset({"steps"})).values
    assert resolve_settings(spec, {"steps": 12}, "quick").preset_grid == {"guidance": [5.0, 5.5, 6.0]}
    assert resolve_settings(spec, {}, "product").warnings == {}
    # fps swept under a preset with frames: its frames stay, said without seconds (they vary)
    swept = resolve_settings(spec, {}, "product", swept=frozenset({"fps"}))
    assert swept.values == {"steps": 45, "guidance": 8.5, "frames": 25}
    assert swept.notes == ["preset product: 24 frames -> 25 (tiny makes 8k+1 frames, 9 to 33)"]
    assert "image-to-video" in resolve_settings(spec, {}, "preview").warnings["preset_kind"]


def test_ranges_are_refused_for_one_video(spec):
    with pytest.raises(InvalidRequest, match=r"preset quick gives ranges \(steps 10-20, guidance 5-6\): sweep them"):
        resolve_settings(spec, {}, "quick").require_single()
    resolve_settings(spec, {"steps": 10, "guidance": 5.0}, "quick").require_single()  # values picked: fine
    for name in ("fast", "../models/tiny"):
        with pytest.raises(InvalidRequest, match=f"unknown preset '{re.escape(name)}'; known presets: creative, daily"):
            resolve_settings(spec, {}, name)


@pytest.mark.parametrize(
    "seconds, fps, frames",
    [(2, 8, 17), (2, 12, 25), (2, 16, 33), (1, 8, 9), (0.5, 8, 9), (1.5, 12, 25), (3, 8, 25)],
)
def test_duration_keeps_at_least_the_seconds(spec, seconds, fps, frames):
    found, note = frames_for_duration(spec, seconds, fps)
    assert found == frames
    assert (found - 1) % 8 == 0 and found >= seconds * fps
    assert found - 8 < max(seconds * fps, 9)  # the smallest such count
    if found != seconds * fps:
        assert f"-> {frames} (tiny makes 8k+1 frames, 9 to 33; {frames / fps:.2f} s)" in note


def test_duration_errors(spec):
    with pytest.raises(InvalidRequest, match=r"3 s at 16 fps = 48 frames: more than the 33 frames tiny makes"):
        frames_for_duration(spec, 3, 16)
    with pytest.raises(InvalidRequest, match="duration must be positive"):
        frames_for_duration(spec, 0, 8)
    with pytest.raises(InvalidRequest, match="--duration sets the frames from the fps; drop --frames"):
        resolve_settings(spec, {"frames": 17}, duration=2)
    with pytest.raises(InvalidRequest, match="drop --grid frames"):
        resolve_settings(spec, {}, duration=2, swept=frozenset({"frames"}))
    # with a duration the preset's frames give way: 2 s at the preset's 12 fps
    assert resolve_settings(spec, {}, "product", duration=2).values["frames"] == 25
    assert resolve_settings(spec, {"fps": 8}, "product", duration=2).values["frames"] == 17


def test_pitfalls(spec):
    calm = build_request(spec, "a cat", guidance_scale=9.5)
    assert pitfalls(spec, calm, prompt_tokens=60) == {}
    loud = build_request(spec, "a cat", guidance_scale=11.0, height=128, width=96)
    found = pitfalls(spec, loud, prompt_tokens=61)
    assert found["high_guidance"] == "guidance 11 is above 9.5: expect over-saturated colours"
    assert found["long_prompt"].startswith("the prompt is 61 tokens, more than about 60")
    assert found["above_trained_size"].startswith("96x128 is above tiny's trained 96x64")
    assert load_spec("cogvideox-2b").trained_size == (480, 720)


def test_generate_with_a_preset_warns_and_records(tmp_path, capsys):
    long_prompt = " ".join(["a very detailed golden retriever puppy"] * 10)
    code = main(
        ["generate", "--model", "tiny", "--local", "--prompt", long_prompt, "--preset", "high-motion", "--steps", "2",
         "--frames", "9", "--output", str(tmp_path / "v.mp4"), "--json", "--experiment", "presets"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["params"]["steps"] == "2" and result["params"]["guidance_scale"] == "11.0"  # flag wins, preset fills
    assert set(result["warnings"]) == {"high_guidance", "long_prompt", "preset_kind"}
    assert "framecast: warning: guidance 11 is above 9.5" in err
    assert "framecast: warning: the prompt is" in err
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.tags["framecast.warning.high_guidance"] == result["warnings"]["high_guidance"]
    assert "framecast.warning.long_prompt" in run.data.tags
    assert run.data.params["preset"] == "high-motion"


def test_generate_with_a_duration(tmp_path, capsys):
    code = main(
        ["generate", "--model", "tiny", "--local", "--prompt", "a fox", "--steps", "1", "--duration", "1.5",
         "--fps", "12", "--scheduler", "dpm", "--dynamic-guidance", "--output", str(tmp_path / "v.mp4"), "--json",
         "--experiment", "presets"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["params"]["num_frames"] == "25"
    assert result["params"]["scheduler"] == "CogVideoXDPMScheduler" and result["params"]["dynamic_guidance"] == "True"
    assert "1.5 s at 12 fps = 18 frames -> 25 (tiny makes 8k+1 frames, 9 to 33; 2.08 s)" in err
    assert MlflowClient().get_run(result["run_id"]).data.params["duration_s"] == "1.5"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "quick"], "preset quick gives ranges"),
        (["--duration", "2", "--frames", "17"], "drop --frames"),
        (["--scheduler", "euler"], "unknown scheduler 'euler' for tiny; choose one of ddim, dpm"),
        (["--duration", "9"], "more than the 33 frames tiny makes"),
    ],
)
def test_generate_refuses_bad_settings(argv, message, capsys):
    assert main(["generate", "--model", "tiny", "--local", "--prompt", "a fox", *argv]) == 2
    assert message in capsys.readouterr().err
