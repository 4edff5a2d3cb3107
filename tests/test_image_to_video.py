"""Image-to-video end to end: `framecast generate --image`, the Videos API's `input_reference`,
and the bad input around images. (Equality with stock diffusers is in test_diffusers_equality.)"""

import hashlib
import io
import json

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from test_diffusers_equality import picture

from cluster.cli import EXIT_INVALID, main
from cluster.jobs import JobStore
from cluster.serving import ServeArgs, resolve_served
from cluster.videos import VideoService
from stages.errors import InvalidRequest
from stages.models import load_spec, resolve_weights
from stages.request import build_request, check_image
from stages.video_io import load_image, read_frames

FAST = ["--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "first.png"
    Image.fromarray(picture(80, 120)).save(path)
    return path


@pytest.fixture(scope="module")
def i2v_weights():
    return resolve_weights(load_spec("tiny-i2v"))


def generate(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_with_an_image(tmp_path, capsys, image_file, i2v_weights):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    video = tmp_path / "i2v.mp4"
    code, out, err = generate(
        capsys, "--model", "tiny-i2v", "--prompt", "a fox", "--image", str(image_file), *FAST,
        "--output", str(video), "--tracking-uri", uri, "--local", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert read_frames(video).shape == (9, 64, 96, 3)
    # 120x80 scaled to 96x64: the same shape, nothing to warn about
    assert not any(k.startswith("image_") for k in result["warnings"])
    params = MlflowClient(uri).get_run(result["run_id"]).data.params
    assert params["image"] == str(image_file)
    assert params["image_sha256"] == hashlib.sha256(load_image(image_file)).hexdigest()
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result["run_id"])}
    assert "i2v.input.png" in artifacts  # what the video was made from, with the run
    assert np.array_equal(load_image(result["input_image"]), load_image(image_file))


def test_image_and_model_must_agree(tmp_path, capsys, image_file):
    code, _, err = generate(capsys, "--model", "tiny-i2v", "--prompt", "a fox", *FAST, "--local")
    assert code == EXIT_INVALID and "tiny-i2v is image-to-video: pass --image PATH" in err
    code, _, err = generate(capsys, "--model", "tiny", "--prompt", "a fox", "--image", str(image_file), "--local")
    assert code == EXIT_INVALID
    assert "tiny is text-to-video and takes no image; for image-to-video use one of:" in err and "tiny-i2v" in err
    assert "Traceback" not in err


def test_unreadable_and_missing_images(tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for path, message in ((broken, "not an image framecast can read"), (tmp_path / "none.png", "no such image file")):
        code, _, err = generate(capsys, "--model", "tiny-i2v", "--prompt", "a fox", "--image", str(path), "--local")
        assert code == EXIT_INVALID and f"{path}: {message}" in err, err


def test_image_far_from_the_size_is_refused_and_near_is_warned():
    spec = load_spec("tiny-i2v")
    r = build_request(spec, "a fox", image="x.png")  # 96x64: width/height 1.5
    with pytest.raises(InvalidRequest, match=r"the image is 40x100 .* width/height must be between 0.75 and 3.00"):
        check_image(spec, r, (100, 40))
    warned = check_image(spec, r, (64, 64))  # square: stretched by 50%
    assert "stretched to 96x64" in warned["image_stretched"] and "50%" in warned["image_stretched"]
    assert set(check_image(spec, r, (20, 30))) == {"image_upscaled"}  # same shape, 3.2x enlarged
    assert check_image(spec, r, (640, 960)) == {}  # downscaling the same shape is fine


def test_cli_warns_about_a_stretched_image(tmp_path, capsys):
    square = tmp_path / "square.png"
    Image.fromarray(picture(64, 64)).save(square)
    code, _, err = generate(
        capsys, "--model", "tiny-i2v", "--prompt", "a fox", "--image", str(square), *FAST,
        "--output", str(tmp_path / "v.mp4"), "--local", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
    )  # fmt: skip
    assert code == 0, err
    assert "framecast: warning: the image (64x64) is stretched to 96x64" in err


def served(tmp_path, model):
    return resolve_served(ServeArgs(model=model, data_dir=str(tmp_path / "data")))  # runners not started


def test_videos_api_takes_input_reference(tmp_path, image_file):
    """The API's create keeps the image under the video's id, checks it as the CLI does, and the
    runner makes the video from it (here with in-process stages)."""
    from cluster.executor import LocalExecutor

    spec = load_spec("tiny-i2v")
    config = served(tmp_path, "tiny-i2v")
    service = VideoService(config, LocalExecutor(spec, resolve_weights(spec)), JobStore(config.database, 1))
    with pytest.raises(InvalidRequest, match="image-to-video: send the first frame as input_reference"):
        service.create({"prompt": "a fox"})
    with pytest.raises(InvalidRequest, match="not an image framecast can read"):
        service.create({"prompt": "a fox"}, b"GIF89a broken")
    tall = io.BytesIO()
    Image.fromarray(picture(200, 50)).save(tall, format="PNG")
    with pytest.raises(InvalidRequest, match="width/height must be between"):
        service.create({"prompt": "a fox"}, tall.getvalue())
    assert list(service.videos.iterdir()) == []  # refused images are not kept

    video = service.create({"prompt": "a fox", "steps": 2}, image_file.read_bytes())
    assert video["status"] == "queued"
    record = service.store.claim("test", 30)
    service.run_job(record, "test")
    done = service.retrieve(video["id"])
    assert done["status"] == "completed", done
    stream, media_type, _ = service.content(video["id"], "video")
    with stream:
        (tmp_path / "got.mp4").write_bytes(stream.read())
    assert read_frames(tmp_path / "got.mp4").shape == (9, 64, 96, 3)
    service.delete(video["id"])
    assert list(service.videos.iterdir()) == []  # the input went with the video


def test_videos_api_refuses_an_image_for_a_text_model(tmp_path, image_file):
    config = served(tmp_path, "tiny")
    service = VideoService(config, None, JobStore(config.database, 1))
    with pytest.raises(InvalidRequest, match="input_reference needs an image-to-video model"):
        service.create({"prompt": "a fox"}, image_file.read_bytes())
