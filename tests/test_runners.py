"""The Videos API's runners (cluster.videos.VideoService) in this process, through the local
executor: a job whose runner hangs is given up and made on a later attempt, by a runner that
takes the stuck one's place; a stop gives the running jobs back; nothing in the serving path
forks without an immediate exec."""

import subprocess
import threading
import time

import pytest

from cluster.executor import LocalExecutor, Stage
from cluster.serving import ServeArgs, resolve_served
from cluster.videos import VideoService

STALL_S = 10.0  # the test waits this long for the watchdog; the local runs make progress far more often
# The watchdog's limit is a clock: these tests run in `make test`'s part at normal CPU priority.
pytestmark = pytest.mark.on_time


class HangingOnce(LocalExecutor):
    """The local executor, except that the first call to `stage` never returns until released."""

    def __init__(self, spec, weights, stage: Stage):
        super().__init__(spec, weights)
        self.hang_stage, self.hung, self.release = stage, threading.Event(), threading.Event()

    def call(self, stage, method, *args, progress=None):
        if Stage(stage) == self.hang_stage and not self.hung.is_set():
            self.hung.set()
            self.release.wait()
        return super().call(stage, method, *args, progress=progress)


def _service(tmp_path, mlflow_uri, executor, **args) -> VideoService:
    served = resolve_served(ServeArgs(model="tiny", data_dir=str(tmp_path), tracking_uri=mlflow_uri, **args))
    return VideoService(served, executor)


def _wait(service: VideoService, video_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (video := service.retrieve(video_id))["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"{video_id} did not finish: {video}"
        time.sleep(0.1)
    return video


@pytest.mark.parametrize("stage", [Stage.DENOISE, Stage.MEASURE], ids=["stage-hangs", "measurement-hangs"])
def test_a_job_whose_runner_hangs_completes_on_a_later_attempt(stage, tmp_path, mlflow_uri, tiny_spec, tiny_weights):
    before = set(threading.enumerate())
    executor = HangingOnce(tiny_spec, tiny_weights, stage)
    service = _service(tmp_path, mlflow_uri, executor, runners=1, stall_timeout_s=STALL_S)
    service.start()
    try:
        video = service.create({"prompt": "a fox in the snow", "steps": 5})
        started = time.monotonic()
        assert executor.hung.wait(60)
        done = _wait(service, video["id"])
        took = time.monotonic() - started
        # Attempt 2 completes it (a third only if a machine so loaded that attempt 2 went STALL_S
        # without a step was given up too: each given-up attempt replaced its runner).
        assert done["status"] == "completed" and done["attempts"] in (2, 3), done
        assert took < STALL_S * done["attempts"] + 60, f"took {took:.0f} s"
        assert service.replaced == done["attempts"] - 1 and service.runners_alive() == 1  # back to full
        service.check_health()
        # the stuck runner, once it wakes, finds the job is no longer its own and removes what it made
        assert _runner_threads(before) >= 2
        executor.release.set()
        deadline = time.monotonic() + 30
        while _runner_threads(before) > 1:
            assert time.monotonic() < deadline, "the replaced runner never ended"
            time.sleep(0.1)
        made = service.store.get(video["id"]).result["files"]  # the attempt that completed it
        assert {p.name for p in service.videos.glob(f"{video['id']}.*")} >= {f"{made}.mp4", f"{made}.thumbnail.png"}
        assert all(p.name.startswith(f"{made}.") for p in service.videos.glob(f"{video['id']}.*"))
        assert service.retrieve(video["id"])["status"] == "completed"
    finally:
        executor.release.set()
        service.stop()


def _runner_threads(before: set[threading.Thread]) -> int:
    """Runner threads of slot 0 started since `before` (not an earlier test's)."""
    return sum(thread.name == "runner-0" for thread in set(threading.enumerate()) - before)


def test_a_stop_gives_the_running_job_back_uncounted(tmp_path, mlflow_uri, tiny_spec, tiny_weights):
    executor = HangingOnce(tiny_spec, tiny_weights, Stage.DENOISE)
    service = _service(tmp_path, mlflow_uri, executor, runners=1)
    service.start()
    try:
        video = service.create({"prompt": "a fox in the snow", "steps": 5})
        assert executor.hung.wait(60)
        assert service.retrieve(video["id"])["status"] == "in_progress"
        assert service.stop() == 1
        again = service.retrieve(video["id"])
        assert again["status"] == "queued" and again["attempts"] == 0, again
    finally:
        executor.release.set()
        service.stop()


def test_a_job_left_running_by_a_dead_server_process_is_queued_again_at_start(tmp_path, mlflow_uri):
    """The ingress replica that replaces a dead one gives its jobs back at once, rather than when
    their leases run out; the attempt counts."""
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    service = _service(tmp_path, mlflow_uri, None, runners=1)
    video = service.create({"prompt": "a fox in the snow", "steps": 5})
    service.store.claim(f"{socket.gethostname()}:{dead.pid}:0:old", 3600)
    alive = service.create({"prompt": "a fox in the snow", "steps": 5})
    service.store.claim(f"{socket.gethostname()}:1:0:pid-one-lives", 3600)
    service._requeue_orphans()
    assert service.retrieve(video["id"])["status"] == "queued" and service.retrieve(video["id"])["attempts"] == 1
    assert service.retrieve(alive["id"])["status"] == "in_progress"


def test_the_serving_path_never_forks_without_exec(tmp_path, mlflow_uri, tiny_spec, tiny_weights, monkeypatch):
    """A job as the Videos API runs it, in its runner thread: every subprocess it starts (ffmpeg
    writing, measuring and the thumbnail; whatever MLflow starts) has no preexec_fn, and nothing
    calls os.fork: Python code run in the child of a process with many threads can deadlock."""
    import os

    started, forked = [], []
    real_popen_init = subprocess.Popen.__init__

    def recording_init(self, *args, **kwargs):
        started.append((args[0] if args else kwargs.get("args"), kwargs.get("preexec_fn")))
        real_popen_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    monkeypatch.setattr(os, "fork", lambda: forked.append(1) or pytest.fail("os.fork called"))
    service = _service(tmp_path, mlflow_uri, LocalExecutor(tiny_spec, tiny_weights), runners=1)
    service.start()
    try:
        done = _wait(service, service.create({"prompt": "a fox in the snow", "steps": 3})["id"])
    finally:
        service.stop()
    assert done["status"] == "completed" and done["clarity"] and done["mlflow_run_id"], done
    assert len(started) >= 3, started  # ffmpeg: write, measure, thumbnail
    assert [command for command, preexec in started if preexec is not None] == []
    assert forked == []


def test_the_stall_limit_grows_with_the_steps_beyond_50(tmp_path, mlflow_uri):
    service = _service(tmp_path, mlflow_uri, None, stall_timeout_s=100)
    limits = {}
    for steps in (5, 50, 200):
        video = service.create({"prompt": "a fox in the snow", "steps": steps})
        limits[steps] = service.stall_limit_s(service.store.get(video["id"]))
    assert limits == {5: 100, 50: 100, 200: 400}
