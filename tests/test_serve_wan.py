"""The Videos API serving a Wan model (tiny-wan) through the official `openai` client: `model`
names it, the video equals `framecast generate` of the same settings in one process, and a
setting Wan 2.1 does not have (guidance_2, Wan 2.2 A14B's) is answered 400 before any work."""

import time

import pytest
import requests
from conftest import served

from cluster.driver import generate, prepare
from cluster.executor import LocalExecutor
from cluster.serving import ServeArgs


@pytest.fixture(scope="module")
def server(serve_base_url, tmp_path_factory):
    with served(ServeArgs(model="tiny-wan", data_dir=str(tmp_path_factory.mktemp("serve-wan"))), "framecast-wan"):
        yield serve_base_url


def test_the_openai_client_gets_the_same_video_as_the_cli(server, tmp_path):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-wan"]
    created = client.videos.create(model="tiny-wan", prompt="a fox in the snow", seconds="1", size="80x48",
                                   extra_body={"steps": 3, "seed": 2, "guidance_scale": 4.0})  # fmt: skip
    deadline = time.time() + 180
    video = client.videos.retrieve(created.id)
    while video.status in ("queued", "in_progress"):
        assert time.time() < deadline, video
        time.sleep(0.2)
        video = client.videos.retrieve(created.id)
    assert video.status == "completed", video
    served = requests.get(f"{server}/v1/videos/{created.id}", timeout=10).json()
    # 1 s at 16 fps: 17 frames (4k + 1)
    job = prepare("tiny-wan", "a fox in the snow", steps=3, seed=2, guidance_scale=4.0, num_frames=17, height=48,
                  width=80, local=True)  # fmt: skip
    local = generate(job, LocalExecutor(job.spec, job.weights), tmp_path / "local.mp4")
    assert served["frames_sha256"] == local.frames_sha256


def test_settings_wan_does_not_have_are_answered_400(server):
    answer = requests.post(f"{server}/v1/videos", json={"prompt": "a fox", "guidance_scale_2": 3.0}, timeout=30)
    assert answer.status_code == 400
    assert "guidance_2 is the low-noise expert's guidance scale" in answer.json()["error"]["message"]
    frames = requests.post(f"{server}/v1/videos", json={"prompt": "a fox", "num_frames": 12}, timeout=30)
    assert frames.status_code == 400 and "frames must be 4k+1 for tiny-wan" in frames.json()["error"]["message"]
