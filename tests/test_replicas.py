"""Pipeline replicas (cluster.replicas) on the test Ray: a job that fails on its own fails alone,
the jobs queued behind it on its replica go to a replica that is whole, and the replica whose
denoiser group it tore down is replaced."""

from dataclasses import replace

from cluster.driver import JobFailed, generate, make_executor, prepare_jobs
from cluster.replicas import Work, pipeline_replicas


def test_a_job_that_breaks_its_replica_fails_alone_and_the_replica_is_replaced(ray_session, tiny_weights, tmp_path):
    jobs = prepare_jobs("tiny", [f"a fox number {i}" for i in range(6)], steps=30, num_frames=9, seed=4)
    # Bypasses validation on purpose: 72 px is 9 latent rows, which the transformer's 2x2 patches cannot tile,
    # so the job raises in the denoiser, whose group is torn down with it.
    jobs[1] = replace(jobs[1], request=replace(jobs[1].request, height=72, width=96))
    pool = pipeline_replicas(jobs[0], 2, local=False)
    try:
        work = [Work(i, job, tmp_path / f"{i}.mp4") for i, job in enumerate(jobs)]
        finished = {done.index: done for done in pool.run(work)}
        events = list(pool.events)
    finally:
        pool.close()
    assert sorted(finished) == list(range(6))
    bad = finished.pop(1)
    assert isinstance(bad.result, JobFailed) and bad.result.error.stage == "denoise" and bad.attempts == 1
    assert "the denoiser group" not in str(bad.result.error)  # its own error, not its replica's
    assert all(not isinstance(d.result, JobFailed) and d.attempts == 1 for d in finished.values())
    assert f"replica {bad.replica} replaced" in events, events
    assert any(e.startswith(f"replica {bad.replica} lost: denoise stage failed") for e in events), events
    local = make_executor(jobs[0], local=True)
    for i in (2, 5):  # made after the failure, whichever replica made them: the frames of one process
        assert finished[i].result.frames_sha256 == generate(jobs[i], local, tmp_path / f"alone{i}.mp4").frames_sha256
