import pytest

from cluster.driver import prepare
from stages.errors import InvalidRequest
from stages.models import load_spec
from stages.request import build_request, nearest_valid_frames


@pytest.fixture(scope="module")
def spec():
    return load_spec("tiny")


def test_defaults_fill_unset_fields(spec):
    r = build_request(spec, "a cat")
    assert (r.steps, r.num_frames, r.height, r.width, r.fps) == (10, 9, 64, 96, 8)
    assert r.do_classifier_free_guidance
    assert not build_request(spec, "a cat", guidance_scale=1).do_classifier_free_guidance


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 12}, r"frames must be 8k\+1 for tiny \(got 12; nearest valid: 9 or 17\)"),
        # 13 is 4k+1, but its 4 latent frames would decode to 16 frames: refused, not silently longer
        ({"num_frames": 13}, r"frames must be 8k\+1 for tiny \(got 13; nearest valid: 9 or 17\)"),
        ({"num_frames": 41}, r"frames must be between 9 and 33 for tiny \(got 41\)"),
        ({"height": 72}, r"height must be a multiple of 16 for tiny \(got 72; nearest valid: 64 or 80\)"),
        ({"width": 100}, r"width must be a multiple of 16 for tiny \(got 100; nearest valid: 96 or 112\)"),
        ({"height": 512}, r"height must be between 32 and 256 for tiny \(got 512\)"),
        ({"steps": 0}, r"steps must be at least 1 \(got 0\)"),
        ({"steps": 5000}, r"steps must be at most 200 for tiny \(got 5000\)"),
        ({"guidance_scale": 0.5}, r"guidance scale must be at least 1 .*got 0.5"),
        ({"fps": 0}, r"fps must be at least 1 \(got 0\)"),
        ({"seed": -3}, r"seed must be a non-negative integer \(got -3\)"),
    ],
)
def test_invalid_settings(spec, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        build_request(spec, "a cat", **kwargs)


def test_empty_prompt(spec):
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        build_request(spec, "   ")


def test_nearest_valid_frames():
    assert nearest_valid_frames(24, 8) == [17, 25]
    assert nearest_valid_frames(48, 8) == [41, 49]
    assert nearest_valid_frames(24, 4) == [21, 25]


def test_prompt_longer_than_encoder_limit(tiny_weights):
    long_prompt = " ".join(["cat"] * 300)
    with pytest.raises(InvalidRequest, match=r"prompt is 301 tokens long; tiny's text encoder takes at most 226"):
        prepare("tiny", long_prompt)


def test_negative_prompt_longer_than_limit(tiny_weights):
    with pytest.raises(InvalidRequest, match=r"negative prompt is 301 tokens long"):
        prepare("tiny", "a cat", negative_prompt=" ".join(["dog"] * 300))


def test_prepare_unknown_model():
    with pytest.raises(InvalidRequest, match="unknown model 'nope'"):
        prepare("nope", "a cat")
