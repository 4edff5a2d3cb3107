"""The Ray Serve application (serve_app.py) on CPU with the tiny model: the OpenAI-compatible
Videos API over plain HTTP and through the official `openai` client, its validation, API key,
bounded queue, durability when replicas die, and a schemathesis run against its schema.

One application serves the whole module (starting Serve takes a while on 2 cores)."""

import concurrent.futures
import contextlib
import dataclasses
import io
import ipaddress
import os
import time

import pytest
import requests
import schemathesis
from conftest import free_port, served
from hypothesis import HealthCheck, given, settings
from PIL import Image

from cluster.driver import generate, prepare
from cluster.executor import LocalExecutor
from cluster.serving import ServeArgs
from stages.models import load_spec
from stages.video_io import DecodedVideo, read_frames

KEY_ENV = "FRAMECAST_TEST_API_KEY"
KEY = "test-key-7f1c"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_QUEUE = 4
# No job of these tests stalls; a killed replica's stand-in starts within this (a job waits for it).
STALL_S = 90.0


@pytest.fixture(scope="module")
def server(serve_base_url, tmp_path_factory):
    """The framecast application on Serve, its base URL and its data directory."""
    os.environ[KEY_ENV] = KEY
    data = tmp_path_factory.mktemp("serve")
    args = ServeArgs(
        model="tiny", data_dir=str(data), api_key_env=KEY_ENV, max_queue=MAX_QUEUE, stall_timeout_s=STALL_S
    )
    with served(args, "framecast"):
        yield serve_base_url, data


def _get(url: str, **kwargs) -> requests.Response:
    """GET that rides out the moments when the ingress is being replaced."""
    for _ in range(200):
        try:
            response = requests.get(url, headers=AUTH, timeout=10, **kwargs)
            if response.status_code < 500:
                return response
        except (requests.ConnectionError, requests.Timeout):  # refused, or held by the dying replica
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} never answered")


def _wait(base: str, video_id: str, timeout_s: float = 180) -> tuple[dict, list[int]]:
    """The video once completed or failed, and every progress value seen on the way."""
    seen, deadline = [], time.time() + timeout_s
    while time.time() < deadline:
        video = _get(f"{base}/v1/videos/{video_id}").json()
        seen.append(video["progress"])
        if video["status"] in ("completed", "failed"):
            return video, seen
        time.sleep(0.05)
    raise AssertionError(f"{video_id} did not finish in {timeout_s} s: {video}")


def _local_digest(**settings) -> str:
    """The digest of the same video made in this process (the path tested equal to diffusers)."""
    job = prepare("tiny", "a fox in the snow", local=True, **settings)
    executor, output = LocalExecutor(job.spec, job.weights), _scratch() / "local.mp4"
    try:
        return generate(job, executor, output).frames_sha256
    finally:
        executor.close()


def _scratch():
    from pathlib import Path

    path = Path("scratch")
    path.mkdir(exist_ok=True)
    return path


def test_a_video_over_plain_http(server):
    base, data = server
    created = requests.post(
        f"{base}/v1/videos", headers=AUTH, json={"prompt": "a fox in the snow", "seconds": "2", "steps": 200}
    )
    assert created.status_code == 200, created.text
    video = created.json()
    assert video["object"] == "video" and video["status"] == "queued" and video["progress"] == 0
    assert video["id"].startswith("video_") and len(video["id"]) == 38
    # 2 s at the tiny model's 8 fps = 16 frames -> 17, the nearest count it makes; the job says so
    assert video["settings"]["num_frames"] == 17 and video["seconds"] == "2.125" and video["size"] == "96x64"
    assert video["notes"] == ["2 s at 8 fps = 16 frames -> 17, the nearest it makes (tiny makes 8k+1 frames, "
                              "9 to 33; 2.125 s)"]  # fmt: skip

    early = requests.get(f"{base}/v1/videos/{video['id']}/content", headers=AUTH)  # 200 steps: not done yet
    assert early.status_code == 409 and early.json()["error"]["code"] == "video_not_ready"

    done, progress = _wait(base, video["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    assert progress == sorted(progress), "progress only goes forward"
    assert any(0 < p < 95 for p in progress), f"no progress seen while denoising: {progress}"
    assert done["completed_at"] >= done["created_at"] and done["attempts"] == 1

    mp4 = requests.get(f"{base}/v1/videos/{video['id']}/content", headers=AUTH)
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    (_scratch() / "served.mp4").write_bytes(mp4.content)
    assert read_frames(_scratch() / "served.mp4").shape == (17, 64, 96, 3)
    for variant, size in (("thumbnail", (96, 64)), ("spritesheet", None)):
        png = requests.get(f"{base}/v1/videos/{video['id']}/content", params={"variant": variant}, headers=AUTH)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert size is None or image.size == size

    # The served video is the one `framecast generate` makes, frame for frame.
    assert done["frames_sha256"] == _local_digest(steps=200, num_frames=17)
    import mlflow

    run = mlflow.get_run(done["mlflow_run_id"])
    assert run.data.params["video_id"] == video["id"] and run.data.params["seconds"] == "2"
    assert run.data.tags["framecast.source"] == "serve" and "clarity/sharpness_laplacian_var" in run.data.metrics
    assert set(done["clarity"]) >= {"sharpness_laplacian_var", "blur_effect", "flicker_mae"}

    listed = _get(f"{base}/v1/videos", params={"limit": 100}).json()
    assert video["id"] in [v["id"] for v in listed["data"]]
    gone = requests.delete(f"{base}/v1/videos/{video['id']}", headers=AUTH)
    assert gone.json() == {"id": video["id"], "object": "video.deleted", "deleted": True}
    missing = requests.get(f"{base}/v1/videos/{video['id']}", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "video_not_found"
    assert not list((data / "videos").glob(f"{video['id']}.*")), "its files are removed"


def test_the_official_openai_client(server):
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    created = client.videos.create(prompt="a fox in the snow", seconds="1", size="96x64", extra_body={"steps": 3})
    assert created.status == "queued" and created.size == "96x64"
    video = client.videos.retrieve(created.id)
    while video.status in ("queued", "in_progress"):
        time.sleep(0.2)
        video = client.videos.retrieve(created.id)
    assert video.status == "completed" and video.progress == 100
    content = client.videos.download_content(created.id)
    (_scratch() / "client.mp4").write_bytes(content.read())
    assert read_frames(_scratch() / "client.mp4").shape[0] == 9  # 1 s at 8 fps -> 9 frames
    thumbnail = client.videos.download_content(created.id, variant="thumbnail")
    assert Image.open(io.BytesIO(thumbnail.read())).size == (96, 64)
    assert created.id in [v.id for v in client.videos.list(limit=50, order="asc")]
    none = requests.get(f"{base}/v1/videos/{created.id}/content", params={"variant": "interpolated"}, headers=AUTH)
    assert none.status_code == 404 and "it was made without interpolate_fps" in none.json()["error"]["message"]
    deleted = client.videos.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    models = client.models.list()
    assert [m.id for m in models] == ["tiny"]


def test_a_cached_video_is_the_cli_s_with_the_same_cache(server):
    """The API field `cache`: the served video equals `framecast generate --cache` frame for frame,
    and its run records what the cache skipped."""
    import mlflow

    base, _ = server
    settings = {"prompt": "a fox in the snow", "steps": 6, "num_frames": 9, "seed": 4, "cache": "fbc:0.30"}
    created = requests.post(f"{base}/v1/videos", headers=AUTH, json=settings)
    assert created.status_code == 200, created.text
    assert created.json()["settings"]["cache"] == "fbc:0.3"  # one spelling
    done, _ = _wait(base, created.json()["id"])
    assert done["status"] == "completed", done
    assert done["frames_sha256"] == _local_digest(steps=6, num_frames=9, seed=4, cache="fbc:0.3")
    assert done["frames_sha256"] != _local_digest(steps=6, num_frames=9, seed=4)
    run = mlflow.get_run(done["mlflow_run_id"])
    assert run.data.params["cache"] == "fbc:0.3" and 0 < run.data.metrics["cache/skipped_fraction"] < 1


def test_a_webm_with_an_interpolated_copy(server):
    """codec webm (a CRF of its own) and interpolate_fps: the video as WebM, its interpolated copy
    as variant=interpolated (twice the frames, as long), and the panel's figures for the frames,
    the file and the copy."""
    base, _ = server
    body = {"prompt": "a fox in the snow", "seconds": "1", "steps": 2, "codec": "webm", "crf": 40,
            "interpolate_fps": 16}  # fmt: skip
    created = requests.post(f"{base}/v1/videos", headers=AUTH, json=body)
    assert created.status_code == 200, created.text
    assert {k: created.json()["settings"][k] for k in ("codec", "crf", "interpolate_fps")} == {
        "codec": "webm", "crf": 40, "interpolate_fps": 16,
    }  # fmt: skip
    done, _ = _wait(base, created.json()["id"])
    assert done["status"] == "completed", done
    for variant, frames in (("video", 9), ("interpolated", 18)):
        response = _get(f"{base}/v1/videos/{done['id']}/content", params={"variant": variant})
        assert response.status_code == 200 and response.headers["content-type"] == "video/webm"
        name = response.headers["content-disposition"]
        assert name.endswith('.webm"') and (".interp.webm" in name) == (variant == "interpolated")
        (_scratch() / f"served-{variant}.webm").write_bytes(response.content)
        video = DecodedVideo.read(_scratch() / f"served-{variant}.webm", planes=("rgb",))
        assert video.frames == frames and video.fps == 8 * frames / 9
    assert set(done["clarity"]) >= {"sharpness_laplacian_var", "noise_sigma"}
    assert {"psnr_y", "ssim_y", "clarity/noise_sigma"} <= set(done["encoded"]) and done["encoded"]["psnr_y"] < 60
    assert set(done["interp_clarity"]) >= {"sharpness_laplacian_var", "motion_magnitude"}


def test_a_failed_request_says_what_was_wrong(server):
    """The CLI's rules and messages, as 4xx, before anything is queued."""
    base, _ = server

    def post(headers=None, **kwargs):
        return requests.post(f"{base}/v1/videos", headers={**AUTH, **(headers or {})}, **kwargs)

    cases = [
        ({"prompt": "x", "num_frames": 10}, 400, "frames must be 8k+1 for tiny (got 10; nearest valid: 9 or 17)"),
        ({"prompt": "x", "size": "100x64"}, 400, "width must be a multiple of 16 for tiny (got 100; nearest valid: "
                                                 "96 or 112)"),
        ({"prompt": "x", "size": "big"}, 400, "size must be WIDTHxHEIGHT in pixels"),
        ({"prompt": "x", "guidance_scale": 0.5}, 400, "guidance scale must be at least 1"),
        ({"prompt": "x", "model": "sora-2"}, 400, "model 'sora-2' is not served here; this server serves tiny"),
        ({"prompt": "x", "seconds": "2", "num_frames": 9}, 400, "give seconds or num_frames, not both"),
        ({"prompt": "x", "steps": "many"}, 400, "steps must be an integer of at most 12 digits (got 'many')"),
        ({"prompt": "x", "preset": "quick"}, 400, "preset quick gives ranges"),
        ({"prompt": "x", "preset": "nope"}, 400, "unknown preset 'nope'"),
        ({"prompt": "x", "cache": "magcache"}, 400, "cache 'magcache' is not one tiny takes; it takes none, fbc:"),
        ({"prompt": "x", "colour": "red"}, 400, "unknown field(s) colour"),
        ({"prompt": "x", "steps": "--5"}, 400, "steps must be an integer"),
        ({"prompt": "x", "seconds": 1e308}, 400, "seconds must be a finite number below"),
        ({"prompt": "x", "size": "²x²"}, 400, "size must be WIDTHxHEIGHT in pixels"),
        ({"prompt": "x", "seed": 10**40}, 400, "seed must be an integer of at most 12 digits"),
        ({"prompt": "x", "codec": "ffv1"}, 400, "codec must be one of h264, webm over the API (got 'ffv1')"),
        ({"prompt": "x", "codec": "webm", "crf": 70}, 400, "crf must be between 0 and 63 for webm (got 70)"),
        ({"prompt": "x", "interpolate_fps": 8}, 400, "interpolate must be above the video's 8 fps and at most 64"),
        ({"prompt": "   "}, 400, "prompt is required"),
        ({}, 400, "prompt is required"),
    ]  # fmt: skip
    for body, status, message in cases:
        form = {k: (None, str(v)) for k, v in body.items()}  # multipart/form-data, as the openai client sends
        for response in (post(json=body), post(files=form)):
            assert response.status_code == status, (body, response.text)
            assert message in response.json()["error"]["message"], (body, response.text)
    assert post(json=[1, 2]).status_code == 400
    assert post(json={"prompt": "x", "guidance_scale": 10**400}).status_code == 400  # float() overflows
    assert post(data=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    assert post(data=b"prompt", headers={"Content-Type": "text/plain"}).status_code == 415
    deep = post(data=b"[" * 100_000, headers={"Content-Type": "application/json"})  # Python's parser recurses
    assert deep.status_code == 400 and "nested too deep" in deep.json()["error"]["message"], deep.text
    urlencoded = post(data={"prompt": "x"})  # refused, as the message says: nothing sends it, and it takes no file
    assert urlencoded.status_code == 415, urlencoded.text
    assert "send application/json or multipart/form-data" in urlencoded.json()["error"]["message"]

    image = io.BytesIO()
    Image.new("RGB", (96, 64)).save(image, format="PNG")
    with_image = post(data={"prompt": "x"}, files={"input_reference": ("a.png", image.getvalue(), "image/png")})
    assert with_image.status_code == 400
    assert "input_reference needs an image-to-video model" in with_image.json()["error"]["message"]
    huge = post(data={"prompt": "x"}, files={"input_reference": ("a.png", b"\0" * (11 * 2**20), "image/png")})
    assert huge.status_code == 413

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield (
            b'--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--x\r\nContent-Disposition: '
            b'form-data; name="input_reference"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        )
        yield from (b"\0" * 2**20 for _ in range(12))
        yield b"\r\n--x--\r\n"

    chunked = post(data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 413, chunked.text
    assert requests.get(f"{base}/v1/videos/not-an-id", headers=AUTH).status_code == 404
    assert requests.get(f"{base}/v1/videos", params={"limit": 0}, headers=AUTH).status_code == 400
    assert requests.get(f"{base}/v1/videos", params={"after": "video_x"}, headers=AUTH).status_code == 400

    # The same request at the command line: the same message, exit 2.
    from cluster.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["generate", "--model", "tiny", "--local", "--prompt", "x", "--frames", "10"]) == 2
    assert "frames must be 8k+1 for tiny (got 10; nearest valid: 9 or 17)" in stderr.getvalue()


def test_every_route_needs_the_api_key(server):
    base, _ = server
    routes = ["/v1/models", "/v1/videos", "/v1/videos/video_" + "0" * 32, "/openapi.json", "/docs", "/nowhere"]
    for route in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = requests.get(base + route, headers=headers)
            assert response.status_code == 401, (route, headers)
            assert response.headers["www-authenticate"] == "Bearer"
    assert requests.post(f"{base}/v1/videos", json={"prompt": "x"}).status_code == 401
    assert requests.delete(f"{base}/v1/videos/video_" + "0" * 32).status_code == 401
    assert requests.get(f"{base}/v1/models", headers=AUTH).status_code == 200


def test_ten_concurrent_submissions_are_run_or_refused_never_lost(server):
    base, _ = server

    def submit(n: int) -> requests.Response:
        return requests.post(f"{base}/v1/videos", headers=AUTH, json={"prompt": f"fox {n}", "steps": 20, "seed": n})

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(submit, range(10)))
    accepted = [r.json()["id"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(refused) == 10, [r.status_code for r in responses]
    assert 1 <= len(accepted) <= MAX_QUEUE and refused
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    for video_id in accepted:
        assert _wait(base, video_id)[0]["status"] == "completed"
    listed = {v["id"] for v in _get(f"{base}/v1/videos", params={"limit": 100}).json()["data"]}
    assert set(accepted) <= listed


def test_no_request_makes_a_server_error(server):
    """schemathesis generates requests from the app's OpenAPI schema, valid and not, operation by
    operation and then statefully along the schema's links (create -> retrieve -> content ->
    delete, with the ids the server gave): none may get a 5xx. (Driven by hand rather than by its
    pytest plugin, which needs the server at collection time.)"""
    from collections import Counter

    base, _ = server
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "POST /v1/videos", "GET /v1/videos", "GET /v1/videos/{video_id}", "GET /v1/videos/{video_id}/content",
        "DELETE /v1/videos/{video_id}", "GET /v1/models",
    }  # fmt: skip
    answers: Counter = Counter()  # (method path, status) -> count
    server_errors: list[str] = []

    def record(response, case) -> None:
        answers[(f"{case.operation.method.upper()} {case.operation.path}", response.status_code)] += 1
        if response.status_code >= 500:
            server_errors.append(f"{case.operation.method.upper()} {case.path} -> {response.status_code}")

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def one_operation(case):
            record(case.call(base_url=base, headers=AUTH), case)

        one_operation()

    # The stateful run follows the schema's own links only: those schemathesis would infer (from the
    # list's ids, say) depend on what the server holds, which changes between the runs hypothesis
    # replays, and it stops a run whose draws change ("flaky strategy").
    schema.config.phases.stateful.inference.algorithms = []
    _clear(base)

    class Linked(schema.as_state_machine()):
        def setup(self):
            self.made = []

        def get_call_kwargs(self, case):
            return {"base_url": base, "headers": AUTH}

        def after_call(self, response, case):
            record(response, case)
            if case.operation.method.upper() == "POST" and response.status_code == 200:
                self.made.append(response.json()["id"])

        def validate_response(self, response, case, **kwargs):
            """Counted in after_call: the test asserts the count of 5xx, all scenarios run."""

        def teardown(self):  # each scenario starts from an empty queue (no 429 one time, 200 the next)
            for video_id in self.made:
                requests.delete(f"{base}/v1/videos/{video_id}", headers=AUTH, timeout=30)

    Linked.run(settings=settings(max_examples=40, stateful_step_count=4, deadline=None, database=None,
                                 suppress_health_check=list(HealthCheck)))  # fmt: skip
    assert server_errors == [], server_errors
    # the stateful run followed the links to videos it made: a retrieve, content or delete by a real id
    linked = ("GET /v1/videos/{video_id}", "GET /v1/videos/{video_id}/content", "DELETE /v1/videos/{video_id}")
    assert any(r in linked and status in (200, 409) for (r, status) in answers), answers


def _clear(base: str) -> None:
    """Delete every video (the schemathesis run queues some), until none is listed."""
    while True:
        videos = _get(f"{base}/v1/videos", params={"limit": 100}).json()["data"]
        for v in videos:
            requests.delete(f"{base}/v1/videos/{v['id']}", headers=AUTH)
        if not videos:
            return
        time.sleep(0.5)


def _replica(deployment: str):
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def _wait_denoising(base: str, video_id: str) -> None:
    deadline = time.time() + 120
    while _get(f"{base}/v1/videos/{video_id}").json()["progress"] == 0:
        assert time.time() < deadline, "the job never started denoising"
        time.sleep(0.05)


def test_a_denoiser_replica_killed_mid_job_and_the_job_still_completes(server):
    import ray

    base, _ = server
    _clear(base)
    body = {"prompt": "a fox in the snow", "steps": 200, "num_frames": 33, "seed": 3}  # long enough to kill mid-way
    video = requests.post(f"{base}/v1/videos", headers=AUTH, json=body).json()
    _wait_denoising(base, video["id"])
    ray.kill(_replica("DenoiserGroup"), no_restart=True)  # Serve starts another (and its ranks)
    done, _ = _wait(base, video["id"], timeout_s=300)
    assert done["status"] == "completed" and done["attempts"] == 2, done
    assert done["frames_sha256"] == _local_digest(steps=200, num_frames=33, seed=3)


def test_an_ingress_restart_loses_no_job(server):
    """The ingress (and its runners) dies with a job in progress and others behind it (queued,
    or taken by the second runner): the new ingress gives the jobs its dead predecessor was
    running back to the queue when it starts, and runs them all."""
    import ray

    base, _ = server
    _clear(base)
    long = {"prompt": "fox", "steps": 200, "num_frames": 33}
    running = requests.post(f"{base}/v1/videos", headers=AUTH, json=long).json()
    _wait_denoising(base, running["id"])
    queued = [requests.post(f"{base}/v1/videos", headers=AUTH, json={"prompt": "fox", "steps": 5, "seed": s}).json()
              for s in (1, 2)]  # fmt: skip
    ray.kill(_replica("VideosAPI"), no_restart=True)
    for video in [running, *queued]:
        done, _ = _wait(base, video["id"], timeout_s=300)
        assert done["status"] == "completed", done
    assert _get(f"{base}/v1/videos/{running['id']}").json()["attempts"] == 2


def _serve_configs() -> list[tuple[str, dict]]:
    """(name, Serve config) of configs/serve: the Serve config file, and the one a RayService holds."""
    import yaml

    from stages.models import CONFIG_DIR

    plain = yaml.safe_load((CONFIG_DIR / "serve" / "framecast.yaml").read_text())
    service = yaml.safe_load((CONFIG_DIR / "serve" / "rayservice.yaml").read_text())
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    return [("framecast.yaml", plain), ("rayservice.yaml", yaml.safe_load(service["spec"]["serveConfigV2"]))]


@pytest.mark.parametrize("name, config", _serve_configs(), ids=["serve-config", "rayservice"])
def test_the_shipped_serve_configs_are_valid(name, config, ray_session):
    """Each is what `serve deploy` accepts, names an application builder that accepts its args,
    and listens beyond this machine only with an API key."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from stages.models import known_models

    schema = ServeDeploySchema.model_validate(config)
    for application in schema.applications:
        args = ServeArgs(**application.args)  # every key known, every value in range
        assert args.model in known_models(), f"{name} serves {args.model!r}, not a model of configs/models"
        if schema.http_options.host != "127.0.0.1":
            assert args.api_key_env, f"{name} listens on {schema.http_options.host} without an API key"
        if args.weights is None:  # builds here: the model's own weights (framecast-shapes' are committed);
            # a weights directory a config names for a real model is not on this machine
            built = call_user_app_builder_with_args_if_necessary(import_attr(application.import_path),
                                                                 application.args)  # fmt: skip
            assert type(built).__name__ == "Application"


def test_the_rayservice_gives_every_pod_the_api_key():
    import yaml

    from stages.models import CONFIG_DIR

    service = yaml.safe_load((CONFIG_DIR / "serve" / "rayservice.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for c in pod["spec"]["containers"] for e in c.get("env", [])}
        assert env["FRAMECAST_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "framecast-api-key"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--workers", "0"], "--workers: Input should be greater than or equal to 1"),
        (["--api-key-env", "FRAMECAST_NO_SUCH_VAR"], "the API key variable $FRAMECAST_NO_SUCH_VAR is not set"),
        (["--port", "70000"], "--port must be 1 to 65535 (got 70000)"),
        (["--stall-timeout", "0"], "--stall-timeout: Input should be greater than 0"),
    ],
)
def test_framecast_serve_refuses_bad_flags_before_starting(flags, message, capsys):
    from cluster.cli import main

    assert main(["serve", "--model", "tiny", *flags]) == 2  # tiny, unless the flags name another model
    assert message in capsys.readouterr().err


@pytest.mark.own_ray
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_framecast_serve_starts_quietly_answers_and_stops_cleanly(stop, tmp_path, tiny_weights):
    """The command as a user runs it, in a session of its own: its own Ray, the API on the port
    asked, nothing printed but its own lines. Ctrl-C (SIGINT), or SIGTERM as systemd and Kubernetes
    send, with a video in progress: within 10 s it exits 0 saying so, the video is back in the
    queue (its attempt not counted), and no process of it (Ray's included) is left. (Its weights are
    there already: a model's first start builds or loads them, and says so.)"""
    import signal
    import sqlite3
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, KEY_ENV: KEY}
    command = [sys.executable, "-m", "cluster.cli", "serve", "--model", "tiny", "--port", str(port),
               "--data-dir", str(tmp_path), "--api-key-env", KEY_ENV]  # fmt: skip
    # A session of its own: Ray's processes are in it (each in a process group of its own), so
    # `ps` finds whatever outlives the command, and the finally below can kill it all.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    said = []
    try:
        for line in process.stdout:  # until it says it is serving (or exits)
            said.append(line)
            if "stops it" in line:
                break
        assert f"framecast: serving tiny at http://127.0.0.1:{port}/v1" in "".join(said), "".join(said)
        assert all(line.startswith("framecast: ") for line in said), "".join(said)  # Ray's chatter: to its logs
        assert "API key from $" + KEY_ENV in said[-1] and str(tmp_path / "jobs.sqlite3") in said[-1]
        base = f"http://127.0.0.1:{port}"
        exposed = [f"{ip}:{port}" for ip, port in _listening(process.pid) if not _loopback(ip)]
        assert exposed == [], f"the embedded Ray listens beyond this machine: {exposed}"
        assert requests.get(f"{base}/v1/models", headers=AUTH, timeout=30).status_code == 200
        assert requests.get(f"{base}/v1/models", timeout=30).status_code == 401
        if stop == "SIGTERM":  # a replica killed: Ray tells the driver at length; that goes to the log too
            os.kill(_process_titled("ServeReplica:framecast:Decoder", process.pid), signal.SIGKILL)
        video = requests.post(f"{base}/v1/videos", headers=AUTH, json={"prompt": "fox", "steps": 200}).json()
        _wait_denoising(base, video["id"])
        stopping = time.monotonic()
        process.send_signal(getattr(signal, stop))
        rest, _ = process.communicate(timeout=60)
        took = time.monotonic() - stopping
    finally:
        if process.poll() is None:  # a server that does not stop must not outlive the test, nor its Ray
            subprocess.run(["pkill", "-KILL", "-s", str(process.pid)])
            process.communicate(timeout=30)
    assert process.returncode == 0, "".join(said) + rest
    assert took <= 10, f"stopping took {took:.1f} s"
    assert [line for line in rest.splitlines() if line.strip()] == [
        "framecast: stopped; 1 video(s) in progress went back to the queue, and queued ones stay there: they resume "
        "on the next start"
    ], rest  # fmt: skip
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT id, status, attempts FROM videos").fetchall() == [(video["id"], "queued", 0)]
    while left := _session(process.pid):  # the session's id is the command's pid
        assert time.monotonic() - stopping < 10, f"left behind: {left}"
        time.sleep(0.2)


def _session(session: int) -> list:
    """The live processes (psutil) of `session`."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except (OSError, psutil.Error):  # it ended meanwhile
            continue
    return found


def _process_titled(title: str, session: int) -> int:
    """The pid of the process of `session` whose command line (a Ray worker's title) holds `title`."""
    import psutil

    for process in _session(session):
        with contextlib.suppress(psutil.Error):
            if title in " ".join(process.cmdline()):
                return process.pid
    raise AssertionError(f"no process {title!r} in session {session}")


def _loopback(ip: str) -> bool:
    """127.0.0.1, ::1, and 127.0.0.1 as IPv6 writes it (::ffff:127.0.0.1, which Python 3.11 does not count)."""
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def _listening(session: int) -> list[tuple[str, int]]:
    """The addresses (ip, port) that processes of `session` listen on."""
    import psutil

    found = []
    for process in _session(session):
        with contextlib.suppress(psutil.Error):
            found += [tuple(c.laddr) for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    return found


def test_the_rayservice_pins_the_ingress_to_the_node_with_the_data():
    import json

    import yaml

    from stages.models import CONFIG_DIR

    service = yaml.safe_load((CONFIG_DIR / "serve" / "rayservice.yaml").read_text())
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert json.loads(json.loads(head["rayStartParams"]["resources"])) == args["ingress_resources"]
    mounts = lambda pod: {m["mountPath"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}  # noqa: E731
    assert args["data_dir"].startswith("/data/") and "/data" in mounts(head["template"])
    assert all("/data" not in mounts(group["template"]) for group in cluster["workerGroupSpecs"])


def test_a_stage_replica_whose_device_failed_fails_its_health_check(tiny_weights):
    """A stage's own error leaves its replica healthy; a device error (the CUDA context is lost)
    makes its health check fail, so that Serve replaces the process."""
    import torch

    from cluster.serving import StageHost

    host = StageHost("encode", "tiny", str(tiny_weights))
    delivered = host.call("encode", "a fox", "", False)
    assert delivered.value.prompt.shape[0] == 1 and delivered.reports[0]["pid"] == os.getpid()

    def raising(error):
        def encode(*_args):
            raise error

        return encode

    host.stage.encode = raising(ValueError("a bad prompt"))
    with pytest.raises(ValueError):
        host.call("encode", "a fox", "", False)
    host.check_health()
    host.stage.encode = raising(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(torch.AcceleratorError):
        host.call("encode", "a fox", "", False)
    with pytest.raises(RuntimeError, match="the device failed"):
        host.check_health()


def test_a_video_accepted_under_other_settings_fails_rather_than_runs_differently(tmp_path):
    """Validated again when claimed: if the server's model settings changed after a video was
    accepted, it fails saying so, instead of making a video other than the one it reported."""
    from cluster.serving import resolve_served
    from cluster.videos import Attempt, VideoService

    service = VideoService(resolve_served(ServeArgs(model="tiny", data_dir=str(tmp_path))), executor=None)
    accepted = service.create({"prompt": "a fox", "steps": "7"})
    assert accepted["settings"]["steps"] == 7 and accepted["status"] == "queued"
    record = service.store.claim("w", 60)
    changed = {**record.request, "settings": {**record.request["settings"], "num_frames": 17}}
    service.run_job(Attempt(service.store, dataclasses.replace(record, request=changed), "w", 60))
    failed = service.retrieve(accepted["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert "settings changed" in failed["error"]["message"]


def test_the_content_of_videos_stored_before_codecs_and_of_a_failed_copy(tmp_path):
    """A video accepted before codecs existed (its settings name none) is H.264; asking for an
    interpolated copy that was never made, or whose making failed, is a 404 that says why."""
    import json
    import sqlite3

    from cluster.serving import resolve_served
    from cluster.videos import NotFound, VideoService

    service = VideoService(resolve_served(ServeArgs(model="tiny", data_dir=str(tmp_path))), executor=None)
    made = {}
    for name, fields in (("old", {}), ("failed", {"interpolate_fps": 16})):
        video = service.create({"prompt": "a fox", **fields})
        record = service.store.claim("w", 60)
        stem = f"{record.id}.a1-w"
        (service.videos / f"{stem}.mp4").write_bytes(b"an mp4")
        error = "OSError: ffmpeg vanished" if name == "failed" else None
        assert service.store.finish(record.id, "w", {"files": stem, "interpolation_error": error})
        made[name] = video["id"]
    with sqlite3.connect(service.store.url.database) as db:  # as stored before codecs: no codec, crf or interpolate_fps
        (request,) = db.execute("SELECT request FROM videos WHERE id = ?", (made["old"],)).fetchone()
        request = json.loads(request)
        request["settings"] = {
            k: v for k, v in request["settings"].items() if k not in ("codec", "crf", "interpolate_fps")
        }
        db.execute("UPDATE videos SET request = ? WHERE id = ?", (json.dumps(request), made["old"]))
    file, media_type, name = service.content(made["old"], "video")
    assert (file.read(), media_type, name) == (b"an mp4", "video/mp4", f"{made['old']}.mp4")
    file.close()
    with pytest.raises(NotFound) as never:
        service.content(made["old"], "interpolated")
    assert never.value.args[1] == f"video {made['old']} has no interpolated copy: it was made without interpolate_fps"
    with pytest.raises(NotFound) as failed:
        service.content(made["failed"], "interpolated")
    assert failed.value.args[1] == f"video {made['failed']} has no interpolated copy: OSError: ffmpeg vanished"


def test_a_video_queued_before_codecs_runs_as_h264(tmp_path, tiny_weights):
    """Queued under settings that named no codec (before codecs existed): it runs with the
    defaults of the settings it lacks, rather than failing as if the model had changed."""
    import json
    import sqlite3

    from cluster.serving import resolve_served
    from cluster.videos import Attempt, VideoService

    served = resolve_served(ServeArgs(model="tiny", data_dir=str(tmp_path)))
    executor = LocalExecutor(load_spec("tiny"), tiny_weights)
    service = VideoService(served, executor=executor)
    try:
        accepted = service.create({"prompt": "a fox", "steps": "1"})
        with sqlite3.connect(service.store.url.database) as db:
            (request,) = db.execute("SELECT request FROM videos WHERE id = ?", (accepted["id"],)).fetchone()
            request = json.loads(request)
            for name in ("codec", "crf", "interpolate_fps"):
                del request["settings"][name]
            db.execute("UPDATE videos SET request = ? WHERE id = ?", (json.dumps(request), accepted["id"]))
        record = service.store.claim("w", 60)
        service.run_job(Attempt(service.store, record, "w", 60))
        done = service.retrieve(accepted["id"])
        assert done["status"] == "completed", done["error"]
        file, media_type, _ = service.content(accepted["id"], "video")
        file.close()
        assert media_type == "video/mp4" and done["encoded"]["psnr_y"] < 60
    finally:
        executor.close()


def test_ingress_replicas_share_one_video_queue_in_postgresql(tmp_path, postgres_url):
    """The job store as a PostgreSQL URL (a real server on loopback): two ingress replicas'
    services, as on two nodes, share its queue, its bound and its leases. A bad URL is refused."""
    from cluster.jobs import QueueFull
    from cluster.serving import resolve_served
    from cluster.videos import VideoService
    from stages.errors import InvalidRequest

    served = resolve_served(ServeArgs(model="tiny", data_dir=str(tmp_path), database=postgres_url, max_queue=2))
    assert served.database == postgres_url
    first, second = (VideoService(served, executor=None) for _ in range(2))
    accepted = first.create({"prompt": "a fox"})
    assert second.retrieve(accepted["id"])["status"] == "queued"
    second.create({"prompt": "a cat"})
    with pytest.raises(QueueFull):  # the bound counts both replicas' videos
        first.create({"prompt": "a dog"})
    claimed = second.store.claim("runner on node 2", lease_s=60)
    assert claimed.id == accepted["id"] and first.retrieve(accepted["id"])["status"] == "in_progress"
    assert first.store.claim("runner on node 1", lease_s=60).id != claimed.id  # never the same video twice
    with pytest.raises(InvalidRequest, match="database must be an SQLite file or a database URL"):
        resolve_served(ServeArgs(model="tiny", data_dir=str(tmp_path), database="postgresql://:::"))
