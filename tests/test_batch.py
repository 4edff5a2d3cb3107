"""`framecast batch`: a requests file checked line by line before any work, a manifest that makes
the batch resumable, a failed job that fails alone, one MLflow child run per job."""

import hashlib
import json
import socket
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster.batch import Manifest, read_requests
from cluster.cli import EXIT_FAILED, EXIT_INVALID, main
from cluster.tracking import child_runs
from stages.denoiser import DenoiserStage
from stages.errors import InvalidRequest
from stages.video_io import read_frames

REQUESTS = [
    {"prompt": "a cat", "steps": 1},
    {"id": "dog", "prompt": "a dog", "steps": 1, "seed": 3, "codec": "ffv1"},
    {"prompt": "a fox", "steps": 1, "guidance": 1, "frames": 17},
]


def write_requests(path: Path, requests: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in requests]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def batch(capsys, requests: Path, out: Path, uri: str, *extra: str) -> tuple[int, list[dict], str]:
    code = main(["batch", str(requests), "--model", "tiny", "--output-dir", str(out), "--local",
                 "--tracking-uri", uri, "--json", *extra])  # fmt: skip
    stdout, err = capsys.readouterr()
    return code, [json.loads(line) for line in stdout.splitlines()], err


def test_a_batch_runs_each_request_once_and_resumes(tmp_path, capsys, tiny_weights, mlflow_uri):
    requests = write_requests(tmp_path / "requests.jsonl", REQUESTS, blank_after=1)  # a blank line is skipped
    out = tmp_path / "out"
    code, lines, err = batch(capsys, requests, out, mlflow_uri)
    assert code == 0, err
    *entries, counts = lines
    assert (counts["ran"], counts["reused"], counts["failed"]) == (3, 0, 0)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert manifest == entries and [e["line"] for e in manifest] == [1, 3, 4]
    by_id = {e["id"]: e for e in manifest}
    dog = by_id["dog"]
    assert dog["video"] == str((out / "dog.mkv").resolve()) and dog["request"]["seed"] == 3
    # ffv1 is lossless: the file's frames are the frames the digest was taken of
    assert hashlib.sha256(read_frames(dog["video"])).hexdigest() == dog["frames_sha256"]
    assert all(e["error"] is None and e["clarity"]["sharpness_laplacian_var"] > 0 for e in manifest)
    where = dog["placement"]  # in this process: this host, no Ray node
    assert set(where) == {"encode", "denoise", "decode", "measure"}
    assert where["denoise"] == [{"host": socket.gethostname(), "node": "", "device": "cpu"}]
    assert read_frames(by_id[read_requests(requests)[2].id]["video"]).shape[0] == 17
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(counts["parent_run_id"])
    assert parent.data.tags["framecast.kind"] == "batch" and parent.data.metrics["jobs_ran"] == 3
    children = child_runs(client, parent.info.run_id)
    assert sorted(r.info.run_id for r in children) == sorted(e["run_id"] for e in manifest)
    assert {r.data.params["batch_id"] for r in children} == set(by_id)

    # Again: nothing to do. Without one video, or with its file changed, that job alone runs again.
    code, lines, _ = batch(capsys, requests, out, mlflow_uri)
    assert code == 0 and (lines[-1]["ran"], lines[-1]["reused"]) == (0, 3) and len(lines) == 1
    assert lines[-1]["parent_run_id"] == parent.info.run_id  # the same batch, the same parent run
    Path(dog["video"]).unlink()
    Path(by_id[manifest[0]["id"]]["video"]).write_bytes(b"not the video")
    code, lines, _ = batch(capsys, requests, out, mlflow_uri)
    assert code == 0 and (lines[-1]["ran"], lines[-1]["reused"]) == (2, 1)
    again = {e["id"]: e for e in lines[:-1]}
    assert set(again) == {"dog", manifest[0]["id"]} and again["dog"]["frames_sha256"] == dog["frames_sha256"]
    assert len(child_runs(client, parent.info.run_id)) == 5


def test_a_batch_through_ray_equals_the_batch_in_one_process(tmp_path, capsys, ray_session, tiny_weights,
                                                             mlflow_uri):  # fmt: skip
    """The same requests through Ray's actors (with an interpolated copy among them) and in this
    process: the same frames, the same figures; the actors' node is recorded."""
    requests = write_requests(tmp_path / "requests.jsonl", [*REQUESTS[:2], {**REQUESTS[2], "interpolate": 16}])
    code, local, err = batch(capsys, requests, tmp_path / "local", mlflow_uri)
    assert code == 0, err
    code = main(["batch", str(requests), "--model", "tiny", "--output-dir", str(tmp_path / "ray"), "--tracking-uri",
                 mlflow_uri, "--json"])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert code == 0, err
    through_ray = [json.loads(line) for line in stdout.splitlines()][:-1]
    assert len(through_ray) == 3
    figures = {e["id"]: (e["frames_sha256"], e["clarity"]) for e in through_ray}
    assert figures == {e["id"]: (e["frames_sha256"], e["clarity"]) for e in local[:-1]}
    assert read_frames(next(e["interpolated"] for e in through_ray if e["interpolated"])).shape[0] == 34  # 17 at 16 fps
    node = ray_session.get_runtime_context().get_node_id()
    assert {w["node"] for e in through_ray for ws in e["placement"].values() for w in ws} == {node}


def test_a_line_cut_short_by_a_kill_is_run_again(tmp_path):
    """The manifest's last line, half written when the batch was killed, counts for nothing."""
    out = tmp_path / "out"
    out.mkdir()
    video = out / "a.mp4"
    video.write_bytes(b"video")
    entry = {"id": "a", "video": str(video), "video_sha256": hashlib.sha256(b"video").hexdigest(), "error": None}
    (out / "manifest.jsonl").write_text(json.dumps(entry) + "\n" + json.dumps({**entry, "id": "b"})[:30])
    manifest = Manifest(out)
    assert manifest.done("a") and not manifest.done("b")
    manifest.append({**entry, "id": "c"})
    assert Manifest(out).done("c") and Manifest(out).done("a")  # the torn line did not swallow the next


def test_a_job_that_fails_fails_alone_and_is_tried_again_next_time(tmp_path, capsys, tiny_weights, mlflow_uri,
                                                                   monkeypatch):  # fmt: skip
    real = DenoiserStage.denoise

    def denoise(self, conditioning, request, *args, **kwargs):
        if request.prompt == "a dog":
            raise RuntimeError("the dog stage broke")
        return real(self, conditioning, request, *args, **kwargs)

    monkeypatch.setattr(DenoiserStage, "denoise", denoise)
    requests = write_requests(tmp_path / "requests.jsonl", REQUESTS)
    out = tmp_path / "out"
    code, lines, err = batch(capsys, requests, out, mlflow_uri)
    assert code == EXIT_FAILED
    *entries, counts = lines
    assert (counts["ran"], counts["failed"], counts["failed_ids"]) == (2, 1, ["dog"])
    failed = next(e for e in entries if e["id"] == "dog")
    assert failed["stage"] == "denoise" and "the dog stage broke" in failed["error"]
    assert "framecast: error: job dog: denoise stage failed: RuntimeError: the dog stage broke" in err
    monkeypatch.setattr(DenoiserStage, "denoise", real)
    code, lines, _ = batch(capsys, requests, out, mlflow_uri)
    assert code == 0 and (lines[-1]["ran"], lines[-1]["reused"]) == (1, 2)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a cat"}', "{not json"], "line 2: not JSON (Expecting property name enclosed in double quotes)"),
        (['{"prompt": "a cat"}', '["a dog"]'], "line 2: a request is a JSON object"),
        (['{"steps": 3}'], "line 1: prompt is required"),
        (['{"prompt": "a cat", "colour": "red"}'], "line 1: unknown key 'colour'; a request has id, prompt and"),
        (['{"prompt": "a cat", "steps": "many"}'], 'line 1: steps must be an integer (got "many")'),
        (['{"prompt": "a cat", "steps": true}'], "line 1: steps must be an integer (got true)"),
        (['{"prompt": "a cat"}', "", '{"prompt": "a dog", "steps": 0}'], "line 3: steps must be at least 1"),
        (['{"prompt": "a cat", "frames": 12}'], "line 1: frames must be 8k+1 for tiny (got 12;"),
        (['{"prompt": "a cat", "codec": "avi"}'], "line 1: codec must be one of h264, h264-lossless"),
        (['{"id": "x", "prompt": "a cat"}', '{"id": "x", "prompt": "a dog"}'], "line 2: id 'x' is also line 1's"),
        (['{"id": "../x", "prompt": "a cat"}'], "line 1: id must be 1 to 100 letters, digits"),
        (['{"prompt": "a cat", "image": "missing.png"}'], "line 1: tiny is text-to-video and takes no image"),
        ([""], "has no requests: one JSON object per line"),
    ],
)  # fmt: skip
def test_bad_lines_are_refused_before_any_work_naming_the_line(tmp_path, capsys, monkeypatch, lines, message):
    def no_model_work(*a, **k):
        raise AssertionError("bad input reached the stages")

    monkeypatch.setattr("cluster.driver.make_executor", no_model_work)
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    code = main(["batch", str(requests), "--model", "tiny", "--output-dir", str(tmp_path / "out"), "--local"])
    out, err = capsys.readouterr()
    assert code == EXIT_INVALID and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_requests_without_an_id_keep_theirs_when_lines_move(tmp_path):
    first = read_requests(write_requests(tmp_path / "a.jsonl", REQUESTS))
    moved = read_requests(write_requests(tmp_path / "b.jsonl", REQUESTS[::-1]))
    assert {r.id: r.prompt for r in first} == {r.id: r.prompt for r in moved}
    with pytest.raises(InvalidRequest, match="cannot read"):
        read_requests(tmp_path / "nope.jsonl")


def test_a_batch_killed_with_sigkill_loses_nothing_and_duplicates_nothing(tmp_path, tiny_weights, mlflow_uri):
    """`framecast batch` killed with SIGKILL after its second job, then run again: every job's video
    is there once, the jobs finished before the kill are reused, and the manifest names each job
    once among its finished lines."""
    import signal
    import subprocess
    import sys

    requests = write_requests(
        tmp_path / "requests.jsonl",
        [{"id": f"fox{i}", "prompt": f"fox {i}", "steps": 100, "seed": i} for i in range(5)],
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cluster.cli", "batch", str(requests), "--model", "tiny", "--output-dir",
               str(out), "--local", "--tracking-uri", mlflow_uri, "--json"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    before = [json.loads(process.stdout.readline()) for _ in range(2)]
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.splitlines()[-1])
    assert counts["reused"] >= 2 and counts["ran"] + counts["reused"] == 5 and counts["failed"] == 0
    finished = [e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines()) if not e["error"]]
    assert sorted(e["id"] for e in finished) == [f"fox{i}" for i in range(5)]  # each once
    assert {e["id"] for e in before} <= {e["id"] for e in finished[: counts["reused"]]}
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"fox{i}.mp4" for i in range(5)]


def test_a_batch_tracked_in_postgresql(tmp_path, capsys, tiny_weights, postgres_url):
    """MLflow's tracking store as a PostgreSQL URL (a real server on loopback): the parent run and a
    child run per job read back from it, and a rerun finds the same parent there."""
    requests = write_requests(tmp_path / "requests.jsonl", REQUESTS[:2])
    code, lines, err = batch(capsys, requests, tmp_path / "out", postgres_url)
    assert code == 0, err
    *entries, counts = lines
    client = MlflowClient(postgres_url)
    parent = client.get_run(counts["parent_run_id"])
    assert parent.data.tags["framecast.kind"] == "batch" and parent.data.metrics["jobs_ran"] == 2
    children = child_runs(client, parent.info.run_id)
    assert sorted(r.info.run_id for r in children) == sorted(e["run_id"] for e in entries)
    assert {r.data.params["batch_id"] for r in children} == {e["id"] for e in entries}
    code, lines, _ = batch(capsys, requests, tmp_path / "out", postgres_url)
    assert code == 0 and lines[-1]["reused"] == 2 and lines[-1]["parent_run_id"] == parent.info.run_id
