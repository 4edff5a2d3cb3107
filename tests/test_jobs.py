"""The durable job queue of the Videos API (cluster.jobs): bounded, leased, never losing a job;
each test on an SQLite file and on a real PostgreSQL server (tests/postgres.py)."""

import threading
import time

import pytest

from cluster.jobs import JobStore, QueueFull, is_video_id


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """Where a store keeps its jobs: an SQLite file's path, or a PostgreSQL database's URL."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(database):
    s = JobStore(database, max_attempts=2)
    yield s
    s.close()


def test_ids_are_random_and_checked(store):
    ids = {store.submit("tiny", {"n": i}, max_active=100).id for i in range(50)}
    assert len(ids) == 50 and all(is_video_id(i) for i in ids)
    for bad in ("video_", "video_../../etc/passwd", "VIDEO_" + "a" * 32, "video_" + "g" * 32, "x" * 38):
        assert not is_video_id(bad)
        assert store.get(bad) is None


def test_the_queue_is_bounded_and_says_when_to_retry(store):
    for i in range(3):
        store.submit("tiny", {"n": i}, max_active=3)
    with pytest.raises(QueueFull) as refused:
        store.submit("tiny", {"n": 3}, max_active=3)
    assert refused.value.active == 3 and refused.value.retry_after_s >= 1
    record = store.claim("w", lease_s=60)
    store.finish(record.id, "w", {"ok": True})  # a finished job frees its place
    assert store.submit("tiny", {"n": 4}, max_active=3).status == "queued"


def test_jobs_run_in_submission_order_and_finish(store):
    first = store.submit("tiny", {"n": 1}, max_active=10)
    second = store.submit("tiny", {"n": 2}, max_active=10)
    claimed = store.claim("w", lease_s=60)
    assert claimed.id == first.id and claimed.status == "in_progress" and claimed.attempts == 1
    assert store.renew(first.id, "w", 60, progress=40) and store.get(first.id).progress == 40
    assert not store.renew(first.id, "someone else", 60)
    assert store.finish(first.id, "w", {"video": "x.mp4"})
    done = store.get(first.id)
    assert (done.status, done.progress, done.result) == ("completed", 100, {"video": "x.mp4"})
    assert store.claim("w", lease_s=60).id == second.id
    assert store.claim("w", lease_s=60) is None


def test_a_store_opened_again_finds_every_job(database):
    """An ingress restart: queued jobs are still queued, and a job whose runner died (its lease
    ran out) is claimed again; after its last attempt it fails, saying why."""
    path = database
    first = JobStore(path, max_attempts=2)
    running = first.submit("tiny", {"n": 1}, max_active=10)
    queued = first.submit("tiny", {"n": 2}, max_active=10)
    assert first.claim("dead runner", lease_s=0.2).id == running.id
    first.close()

    again = JobStore(path, max_attempts=2)
    assert again.get(queued.id).status == "queued"
    time.sleep(0.3)
    retried = again.claim("new runner", lease_s=0.2)
    assert retried.id == running.id and retried.attempts == 2
    time.sleep(0.3)
    assert again.claim("newer runner", lease_s=60).id == queued.id  # the expired one had its 2 attempts
    failed = again.get(running.id)
    assert failed.status == "failed" and failed.error_code == "retries_exhausted"
    assert "lease expired" in failed.error_message


def test_retry_gives_a_job_back_until_its_attempts_are_spent(store):
    job = store.submit("tiny", {}, max_active=10)
    store.claim("w", 60)
    store.retry(job.id, "w", "denoise stage failed: ActorDiedError")
    assert store.get(job.id).status == "queued"
    store.claim("w", 60)
    store.retry(job.id, "w", "denoise stage failed: ActorDiedError")
    gone = store.get(job.id)
    assert gone.status == "failed" and "ActorDiedError" in gone.error_message


def test_concurrent_runners_never_share_a_job(database):
    """Runners of two processes' worth of connections claim from one database at once."""
    stores = [JobStore(database) for _ in range(2)]
    submitted = {stores[0].submit("tiny", {"n": i}, max_active=100).id for i in range(40)}
    claimed, lock = [], threading.Lock()

    def run(s: JobStore, worker: str) -> None:
        while (record := s.claim(worker, 60)) is not None:
            with lock:
                claimed.append(record.id)

    threads = [threading.Thread(target=run, args=(stores[i % 2], f"w{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(submitted)


def test_pages_and_deletes(store):
    ids = [store.submit("tiny", {"n": i}, max_active=100).id for i in range(5)]
    page, more = store.page(None, 2, "asc")
    assert [r.id for r in page] == ids[:2] and more
    page, more = store.page(ids[1], 10, "asc")
    assert [r.id for r in page] == ids[2:] and not more
    page, _ = store.page(None, 10, "desc")
    assert [r.id for r in page] == ids[::-1]
    with pytest.raises(KeyError):
        store.page("video_" + "0" * 32, 10, "asc")

    assert store.delete(ids[4]).status == "queued" and store.get(ids[4]) is None
    running = store.claim("w", 60)  # ids[0]
    assert store.delete(running.id).status == "in_progress"
    assert store.get(running.id) is None
    assert not store.finish(running.id, "w", {})  # its runner learns it was deleted
    assert store.claim("w", 60).id == ids[1]  # a deleted job never runs
    assert store.counts() == {"queued": 2, "in_progress": 1, "completed": 0, "failed": 0}


def test_a_job_deleted_while_its_runner_died_frees_its_place(store):
    job = store.submit("tiny", {}, max_active=1)
    store.claim("dead runner", lease_s=0.1)
    store.delete(job.id)  # marked: its runner would drop the result, but it is gone
    time.sleep(0.2)
    assert store.claim("w", 60) is None
    assert store.submit("tiny", {}, max_active=1).status == "queued"


def test_submit_answers_the_job_as_queued_even_when_claimed_at_once(store):
    """A runner may claim a job the moment it is queued; the create answer still says queued (it
    is read in the transaction that queued it)."""
    stop = threading.Event()

    def claim_all():
        while not stop.is_set():
            store.claim("runner", 30)

    runner = threading.Thread(target=claim_all)
    runner.start()
    try:
        statuses = {store.submit("tiny", {"n": i}, max_active=1000).status for i in range(100)}
    finally:
        stop.set()
        runner.join()
    assert statuses == {"queued"}
    assert store.counts().get("in_progress", 0) > 0  # the runner did claim them meanwhile


def test_a_stop_gives_a_job_back_with_its_attempt_uncounted(store):
    job = store.submit("tiny", {"prompt": "a"}, max_active=4)
    claimed = store.claim("runner", lease_s=60)
    assert store.running() == [(job.id, "runner")] and claimed.attempts == 1
    assert not store.requeue(job.id, "another runner")  # only its own runner gives it back
    assert store.requeue(job.id, "runner")
    assert store.running() == [] and store.get(job.id).status == "queued" and store.get(job.id).attempts == 0
    assert store.claim("runner", lease_s=60).attempts == 1


def test_a_job_deleted_while_running_goes_when_its_runner_next_renews(store):
    job = store.submit("tiny", {"prompt": "a"}, max_active=1)
    store.claim("runner", lease_s=60)
    store.delete(job.id)
    assert store.running() == [(job.id, "runner")]  # kept for its runner to find out
    assert not store.renew(job.id, "runner", 60)
    assert store.running() == []
    store.submit("tiny", {"prompt": "b"}, max_active=1)  # its place is free at once
