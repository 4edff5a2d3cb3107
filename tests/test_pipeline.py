"""Streams of jobs: stages of different jobs overlap in time, results equal a sequential run's,
each job's bytes moved between stages are counted, each video is measured by the clarity panel
in its own actor, and a decoder that dies fails one job only (a dying panel, no job)."""

import json
import os

import pytest
import ray
from conftest import broken_family

from cluster.cli import EXIT_FAILED, main
from cluster.driver import GenerationResult, JobFailed, prepare_jobs, run_stream
from stages.clarity import measure_file
from stages.video_io import read_frames

PROMPTS = ["a red fox in the snow", "a cat playing piano", "waves on a beach at dusk", "a city street at night"]


def overlaps(a: list[float], b: list[float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.fixture(scope="module")
def stream_jobs(tiny_weights):
    # Guidance on and 8 steps: denoising is the longest stage, as it is for real models.
    return prepare_jobs("tiny", PROMPTS, steps=8, seed=3, decoders=2)


@pytest.fixture(scope="module")
def runs(executors, stream_jobs, tmp_path_factory):
    """The same four jobs through one Ray executor (2 decoders), pipelined and one after another."""
    out = tmp_path_factory.mktemp("stream")
    executor = executors.get(stream_jobs[0].spec, stream_jobs[0].weights, decoders=2)
    results = {}
    for mode in ("sequential", "pipelined"):
        outputs = [out / f"{mode}-{i}.mp4" for i in range(len(stream_jobs))]
        results[mode] = list(run_stream(stream_jobs, executor, outputs, pipelined=mode == "pipelined"))
    assert all(isinstance(r, GenerationResult) for rs in results.values() for r in rs)
    return results


def test_stages_of_different_jobs_overlap(runs):
    """Pipelined, each job has a stage running while a different stage of the job before it runs
    (which pairs depends on which stage is the slowest); one after another, none does."""

    def cross_overlaps(earlier, later) -> list[tuple[str, str]]:
        return [(a, b) for a in earlier.stages for b in later.stages
                if a != b and overlaps(earlier.stages[a], later.stages[b])]  # fmt: skip

    pipelined, sequential = runs["pipelined"], runs["sequential"]
    assert [r.index for r in pipelined] == [0, 1, 2, 3]
    for k in range(len(pipelined) - 1):
        assert cross_overlaps(pipelined[k], pipelined[k + 1]), f"jobs {k} and {k + 1} did not overlap"
        assert not cross_overlaps(sequential[k], sequential[k + 1])
    for result in pipelined:  # within a job, the stages keep their order
        s = result.stages
        assert s["encode"][1] <= s["denoise"][0] and s["denoise"][1] <= s["decode"][0] <= s["write"][0]


def test_pipelined_frames_equal_sequential_frames(runs):
    """Equal uint8 frames as written (their digests), not only equal MP4s (which are lossy)."""
    for seq, pipe in zip(runs["sequential"], runs["pipelined"], strict=True):
        assert seq.params["prompt"] == pipe.params["prompt"]
        assert len(seq.frames_sha256) == 64 and seq.frames_sha256 == pipe.frames_sha256
        assert read_frames(pipe.video).shape == (9, 64, 96, 3)
    # Different prompts gave different videos (the jobs did not share a result).
    assert len({r.frames_sha256 for r in runs["pipelined"]}) == len(PROMPTS)


def test_bytes_moved_and_decoder_figures_are_recorded(runs, stream_jobs):
    job = stream_jobs[0]
    r = job.request
    for result in runs["pipelined"]:
        m = result.metrics
        # Embeddings (prompt and negative, 226 tokens x 32 floats) go to the one denoiser rank;
        # latents (3 x 4 x 8 x 12 floats) to each of the 2 decoders; each decoder's tiles to the
        # driver once, where the frames are made (so no frames move at all).
        assert m["moved_bytes/prompt_embeddings"] == 2 * 226 * 32 * 4
        assert m["moved_bytes/latents"] == 2 * (3 * 4 * 8 * 12 * 4)
        tile_pixels = sum(t.height * t.width * 64 for t in job.tiles.tiles)
        assert m["moved_bytes/tiles"] == 3 * r.num_frames * tile_pixels * 4
        assert "moved_bytes/frames" not in m
        assert m["decode_rank0_tiles"] + m["decode_rank1_tiles"] == len(job.tiles.tiles)
        assert m["decode_rank0_peak_mib"] > 0 and m["decode_rank1_peak_mib"] > 0
        assert result.params["decoders"] == "2" and result.params["tiling"] == "3x3"


def stream_with_a_method_replaced(executors, jobs, tmp_path, stage: str, index: int, method: str, replacement):
    """Run `jobs` through a Ray executor (2 decoders, its stages built anew) whose `stage` actor
    number `index` has its stage's `method` replaced; the results, and whether that actor was
    replaced since."""
    executor = executors.get(jobs[0].spec, jobs[0].weights, decoders=2)
    patched = executor.side[stage][index]
    ray.get(patched.call.remote("__setattr__", method, replacement)[0])
    results = list(run_stream(jobs, executor, [tmp_path / f"{i}.mp4" for i in range(len(jobs))]))
    return results, executor.side[stage][index] != patched


def test_each_video_is_measured_in_the_panels_own_actor(runs):
    """The panel measured each MP4 as saved (measuring the file again gives the same figures,
    its `encoded/clarity/...`) and the frames it was made from, after it was written."""
    pipelined = runs["pipelined"]
    for result in pipelined:
        again = measure_file(result.video)
        encoded = {k: v for k, v in result.metrics.items() if k.startswith("encoded/clarity/")}
        assert {f"encoded/{k}": v for k, v in again.metrics().items()} == encoded
        assert {k.removeprefix("encoded/") for k in encoded} == {k for k in result.metrics if k.startswith("clarity/")}
        assert 30 < result.metrics["encoded/psnr_y"] < 100 and 0.5 < result.metrics["encoded/ssim_y"] < 1
        rows = result.clarity_csv.read_text().splitlines()
        assert len(rows) == 1 + 9 and rows[0].endswith(",encoded_psnr_y,encoded_ssim_y")
        assert result.metrics["moved_bytes/video"] == result.video.stat().st_size  # sent to the panel's actor
        assert result.metrics["moved_bytes/panel_frames"] == 9 * 64 * 96 * 3  # with the frames as made
        assert result.params["device_measure"].startswith("cpu (")
        node = ray.get_runtime_context().get_node_id()  # one node: every actor on it
        assert {w["node"] for ws in result.placement.values() for w in ws} == {node}
        assert len(result.placement["decode"]) == 2 and result.placement["measure"][0]["device"].startswith("cpu (")
        assert result.stages["write"][1] <= result.stages["measure"][0]


def test_the_driver_takes_the_next_frames_while_a_video_is_measured(executors, stream_jobs, tmp_path):
    """With a panel that takes a second per video, the driver does not wait for it: it takes
    job k+1's frames (and sends job k+2's decode) while job k is still being measured."""

    def slow_measure(*args):  # shipped by value
        import time

        from stages.clarity import ClarityStage

        time.sleep(1.0)
        return ClarityStage(threads=1).measure(*args)

    results, _ = stream_with_a_method_replaced(
        executors, stream_jobs[:3], tmp_path, "measure", 0, "measure", slow_measure
    )
    assert all(r.clarity_error is None and r.metrics["measure_s"] >= 1.0 for r in results)
    for earlier, later in zip(results, results[1:], strict=False):
        assert later.stages["write"][0] < earlier.stages["measure"][1]  # frames taken mid-measure


def test_a_decoder_that_dies_fails_its_job_and_the_next_job_runs(executors, stream_jobs, tmp_path):
    def die(*args, **kwargs):  # defined here, so Ray ships it to the actor by value
        os._exit(1)

    results, replaced = stream_with_a_method_replaced(
        executors, stream_jobs[:3], tmp_path, "decode", 1, "decode_tiles", die
    )
    assert replaced
    failed, *rest = results
    assert isinstance(failed, JobFailed) and failed.index == 0
    assert str(failed.error).startswith("decode stage failed: ActorDiedError: ")
    assert not (tmp_path / "0.mp4").exists()
    assert [type(r) for r in rest] == [GenerationResult, GenerationResult]
    assert all(read_frames(r.video).shape == (9, 64, 96, 3) for r in rest)


def test_a_dying_panel_is_replaced_and_every_video_measured(executors, stream_jobs, tmp_path):
    """The panel's actor dies measuring job 0 (job 1's video is already queued on it): the
    actor is replaced and both videos are sent to the replacement once more."""

    def die(*args, **kwargs):  # defined here, so Ray ships it to the actor by value
        os._exit(1)

    results, replaced = stream_with_a_method_replaced(
        executors, stream_jobs[:2], tmp_path, "measure", 0, "measure", die
    )
    assert replaced
    for result in results:
        assert result.clarity_error is None and result.clarity_csv.is_file()
        assert result.metrics["encoded/clarity/blur_effect"] == measure_file(result.video).summary["blur_effect"]


def test_a_failed_job_in_a_stream_exits_nonzero_after_the_others(
    tmp_path, capsys, monkeypatch, tiny_weights, mlflow_uri
):
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first job cannot be decoded")
        return real(self, *args, **kwargs)

    from stages.decoder import DecoderStage

    real = DecoderStage.decode
    monkeypatch.setattr(DecoderStage, "decode", fails_once)
    code = main(["generate", "--model", "tiny", "--prompt", "a", "--prompt", "b", "--steps", "1", "--local", "--json",
                 "--output-dir", str(tmp_path), "--tracking-uri", mlflow_uri])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == EXIT_FAILED
    first, second = (json.loads(line) for line in out.strip().splitlines())
    assert first == {"job": 0, "prompt": "a", "stage": "decode",
                     "error": "decode stage failed: RuntimeError: first job cannot be decoded"}  # fmt: skip
    assert second["job"] == 1 and os.path.isfile(second["video"])
    assert err.strip().splitlines()[-1] == "framecast: error: job 0: decode stage failed: RuntimeError: first job " \
        "cannot be decoded"  # fmt: skip


@pytest.mark.ranks(2, 0)
def test_jobs_after_a_denoiser_group_failure_fail_saying_why(executors, tmp_path):
    """A rank fails during job 0: the group is torn down at once, and the jobs queued behind it
    fail with a message that says so (not with a bare 'actor died')."""
    from stages.context_parallel import ParallelLayout

    jobs = prepare_jobs("tiny", PROMPTS[:3], steps=2, seed=3, ring=2)
    executor = executors.get(jobs[0].spec, jobs[0].weights, ParallelLayout(ring=2))
    rank1 = executor.group.actors[1]
    ray.get(rank1.call.remote("__setattr__", "family", broken_family("rank 1 lost its GPU"))[0])
    results = list(run_stream(jobs, executor, [tmp_path / f"{i}.mp4" for i in range(3)]))
    assert all(isinstance(r, JobFailed) for r in results)
    assert str(results[0].error) == "denoise stage failed: RuntimeError: rank 1 lost its GPU"
    for later in results[1:]:
        assert str(later.error) == (
            "denoise stage failed: RuntimeError: the denoiser group was shut down after a job failed in it "
            "(denoise stage failed: RuntimeError: rank 1 lost its GPU)"
        )


def test_prompts_file_streams_json_lines(tmp_path, capsys, ray_session, tiny_weights, mlflow_uri):
    """`--prompts FILE`: one JSON line per job with its stage times; one decoder sends frames once.
    The command makes its own executor on the test Ray (the session's goes first: conftest.py)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n  a cat playing piano  \n")
    code = main(["generate", "--model", "tiny", "--prompts", str(prompts), "--steps", "2", "--json",
                 "--output-dir", str(tmp_path / "out"), "--tracking-uri", mlflow_uri])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    records = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["job"], r["prompt"]) for r in records] == [(0, "a red fox"), (1, "a cat playing piano")]
    for record in records:
        assert list(record["stages"]) == ["encode", "denoise", "decode", "write", "measure"]
        assert record["run_id"] and os.path.isfile(record["video"])
        assert record["metrics"]["moved_bytes/frames"] == 9 * 64 * 96 * 3  # frames go to the writer once
    assert "4/4" in err  # one progress bar over both jobs' steps
