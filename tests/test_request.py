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
        # how the frames are stored
        ({"interpolate_fps": 8}, r"interpolate must be above the video's 8 fps and at most 64 .*\(got 8\)"),
        ({"interpolate_fps": 4}, r"interpolate must be above the video's 8 fps .*\(got 4\)"),
        ({"interpolate_fps": 65}, r"at most 64 \(120, and 8x the fps\) \(got 65\)"),
        ({"fps": 24, "interpolate_fps": 121}, r"above the video's 24 fps and at most 120 .*\(got 121\)"),
        ({"codec": "av1"}, r"codec must be one of h264, h264-lossless, ffv1, prores, webm, gif \(got 'av1'\)"),
        ({"codec": "png"}, r"codec must be one of h264, .* \(got 'png'\)"),  # a picture's, not a video's
        ({"crf": 52}, r"crf must be between 0 and 51 for h264 \(got 52\); lower keeps more, 18 is the default"),
        ({"crf": -1}, r"crf must be between 0 and 51 for h264 \(got -1\)"),
        ({"codec": "webm", "crf": 64}, r"crf must be between 0 and 63 for webm \(got 64\)"),
        ({"codec": "ffv1", "crf": 10}, r"crf is for h264 \(0-51\), webm \(0-63\); ffv1 is lossless \(got crf 10\)"),
        ({"codec": "prores", "crf": 10}, r"crf is for h264 \(0-51\), webm \(0-63\); prores has no CRF"),
        ({"codec": "gif", "interpolate_fps": 60}, r"gif plays at most 50 fps \(its frame delays are whole hundredths"),
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


def test_output_settings_fill_in_per_codec(spec):
    """The codec's own CRF unless one is given; codecs without a CRF record none; the GIF is
    accepted whatever its colours (writing it says when it is lossy, see test_stages)."""
    assert (build_request(spec, "a cat").codec, build_request(spec, "a cat").crf) == ("h264", 18)
    assert build_request(spec, "a cat", codec="webm").crf == 31
    assert build_request(spec, "a cat", codec="h264", crf=0).crf == 0
    for codec in ("h264-lossless", "ffv1", "prores", "gif"):
        assert build_request(spec, "a cat", codec=codec).crf is None
    r = build_request(spec, "a cat", interpolate_fps=24)
    assert r.interpolate_fps == 24 and r.as_dict()["interpolate_fps"] == 24
    assert build_request(spec, "a cat").interpolate_fps == 0  # none


def test_a_picture_model_takes_no_codec_and_no_interpolation():
    image_model = load_spec("tiny-zimage")
    assert build_request(image_model, "a cat").codec == "png"
    with pytest.raises(InvalidRequest, match=r"tiny-zimage makes a picture, written as PNG; codec is for video"):
        build_request(image_model, "a cat", codec="h264")
    with pytest.raises(InvalidRequest, match=r"tiny-zimage makes a picture; interpolate is for video models"):
        build_request(image_model, "a cat", interpolate_fps=24)
    with pytest.raises(InvalidRequest, match=r"tiny-zimage makes a picture, written as PNG \(lossless\); crf is for"):
        build_request(image_model, "a cat", crf=18)
