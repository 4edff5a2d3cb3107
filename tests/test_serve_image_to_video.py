"""The Videos API serving an image-to-video model (tiny-i2v): `input_reference` sent as a file
in a multipart form, as the openai client sends it, makes the same video as
`framecast generate --image` in one process; bad images are answered 400."""

import io
import time

import numpy as np
import pytest
import requests
from conftest import served
from PIL import Image
from test_diffusers_equality import picture

from cluster.driver import generate, prepare
from cluster.executor import LocalExecutor
from cluster.serving import ServeArgs


@pytest.fixture(scope="module")
def server(serve_base_url, tmp_path_factory):
    with served(ServeArgs(model="tiny-i2v", data_dir=str(tmp_path_factory.mktemp("serve-i2v"))), "framecast-i2v"):
        yield serve_base_url


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_input_reference_makes_the_same_video_as_the_cli(server, tmp_path):
    image = picture(80, 120)
    fields = {"prompt": "a fox in the snow", "steps": "3", "seed": "2"}
    created = requests.post(f"{server}/v1/videos", data=fields, timeout=30,
                            files={"input_reference": ("first.png", png(image), "image/png")})  # fmt: skip
    assert created.status_code == 200, created.text
    video_id = created.json()["id"]
    deadline = time.time() + 180
    while (video := requests.get(f"{server}/v1/videos/{video_id}", timeout=10).json())["status"] not in (
        "completed",
        "failed",
    ):
        assert time.time() < deadline, video
        time.sleep(0.1)
    assert video["status"] == "completed", video

    path = tmp_path / "first.png"
    path.write_bytes(png(image))
    job = prepare("tiny-i2v", "a fox in the snow", steps=3, seed=2, image=str(path), local=True)
    local = generate(job, LocalExecutor(job.spec, job.weights), tmp_path / "local.mp4")
    assert video["frames_sha256"] == local.frames_sha256


def test_bad_images_are_answered_400(server):
    def post(files, **fields):
        return requests.post(f"{server}/v1/videos", data={"prompt": "a fox", **fields}, files=files, timeout=30)

    missing = requests.post(f"{server}/v1/videos", json={"prompt": "a fox"}, timeout=30)
    assert missing.status_code == 400 and "send the first frame as input_reference" in missing.text
    broken = post({"input_reference": ("a.png", b"\x89PNG not an image", "image/png")})
    assert broken.status_code == 400
    assert broken.json()["error"]["message"].startswith("input_reference: not an image framecast can read")
    tall = post({"input_reference": ("a.png", png(picture(200, 40)), "image/png")})
    assert tall.status_code == 400 and "width/height must be between 0.75 and 3.00" in tall.json()["error"]["message"]
