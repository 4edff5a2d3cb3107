"""Pipeline replicas (cluster.replicas). On the test Ray: a job that fails on its own fails
alone, the jobs queued behind it on its replica go to a replica that is whole, and the replica
whose denoiser group it tore down is replaced. With scripted streams: attempts counted, tries
not counted, replicas replaced or retired, jobs failed when no replica is left."""

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import cluster.replicas as replicas_module
from cluster.driver import JobFailed, generate, make_executor, prepare_jobs
from cluster.executor import StageFailed
from cluster.replicas import ReplicaPool, Work, pipeline_replicas


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
    for i, done in finished.items():  # whichever replica made it, before or after the failure: one process's frames
        assert done.result.frames_sha256 == generate(jobs[i], local, tmp_path / f"alone{i}.mp4").frames_sha256


def scripted(outcomes: dict[str, list[str]]):
    """A stand-in for `run_stream` that answers each job's try from `outcomes[prompt]` in turn:
    "ok", "raise" (the job's own failure), "lost" (its actor died under it), "down" (it never
    reached a stage torn down before it)."""

    def run_stream(jobs, executor, outputs, on_step=None, pipelined=True, encodings=None):
        for index, (job, _output) in enumerate(zip(jobs, outputs, strict=True)):
            executor.ran.append(job.request.prompt)
            outcome = outcomes[job.request.prompt].pop(0)
            if outcome == "ok":
                yield SimpleNamespace(index=index)
                continue
            error = StageFailed("denoise", RuntimeError(f"{outcome} on {executor.name}"))
            error.actor_lost, error.stage_down = outcome == "lost", outcome == "down"
            yield JobFailed(index, job.request.prompt, error)

    return run_stream


class FakeExecutor:
    def __init__(self, name: str):
        self.name, self.ran, self.closed = name, [], False

    def close(self) -> None:
        self.closed = True


def fake_work(prompts: list[str]) -> list[Work]:
    jobs = [SimpleNamespace(request=SimpleNamespace(prompt=p)) for p in prompts]
    return [Work(i, job, Path(f"{job.request.prompt}.mp4")) for i, job in enumerate(jobs)]


def test_the_pool_retries_lost_jobs_up_to_their_attempts_and_replaces_lost_replicas(monkeypatch):
    outcomes = {"a": ["lost", "lost", "ok"], "b": ["lost", "lost", "lost"], "c": ["raise"], "d": ["down", "ok"],
                "e": ["ok"]}  # fmt: skip
    monkeypatch.setattr(replicas_module, "run_stream", scripted(outcomes))
    made: list[FakeExecutor] = []

    def make(replica: int) -> FakeExecutor:
        made.append(FakeExecutor(f"executor {len(made)} (replica {replica})"))
        return made[-1]

    pool = ReplicaPool(make, 2, max_attempts=3, room=lambda: True)
    finished = {d.index: d for d in pool.run(fake_work(list(outcomes)))}
    pool.close()
    assert sorted(finished) == [0, 1, 2, 3, 4]  # each job once
    a, b, c, d, e = (finished[i] for i in range(5))
    assert not isinstance(a.result, JobFailed) and a.attempts == 3
    assert isinstance(b.result, JobFailed) and b.attempts == 3 and str(b.result.error).endswith("(tried 3 times)")
    assert isinstance(c.result, JobFailed) and c.attempts == 1 and "raise on" in str(c.result.error)
    assert not isinstance(d.result, JobFailed) and d.attempts == 1  # the try it never got is not counted
    assert not isinstance(e.result, JobFailed) and e.attempts == 1
    lost = [event for event in pool.events if " lost: " in event]
    assert len(lost) == 6  # 5 tries whose actor died, 1 job that never got its try
    replaced = sum(event.endswith(" replaced") for event in pool.events)  # while jobs were left
    assert 1 <= replaced <= 6 and len(made) == 2 + replaced and all(x.closed for x in made)


def test_without_room_a_lost_replica_retires_and_its_jobs_go_to_the_others_or_fail(monkeypatch):
    outcomes = {"a": ["lost", "ok"], "b": ["ok"], "c": ["ok"]}
    monkeypatch.setattr(replicas_module, "run_stream", scripted(outcomes))
    made = [FakeExecutor("only")]
    pool = ReplicaPool(lambda _: made[0], 1, room=None)
    finished = {d.index: d for d in pool.run(fake_work(list(outcomes)))}
    assert sorted(finished) == [0, 1, 2] and made[0].closed
    assert made[0].ran == ["a"]  # lost on its first job: it took no other
    assert all(isinstance(d.result, JobFailed) and "no pipeline replica is left" in str(d.result.error)
               for d in finished.values())  # fmt: skip
    assert pool.events == ["replica 0 lost: denoise stage failed: RuntimeError: lost on only",
                           "replica 0 retired: the cluster has no room for another"]  # fmt: skip
