"""Pipeline replicas: one list of jobs spread over several executors that share the cluster.

    jobs -> one queue -> each replica takes the next job whenever its pipeline has room
         -> results, as they finish, to the caller's thread

A replica is an executor (with Ray: its own denoiser group in a placement group of its own, its
encoder, decoders and clarity panel) driven by a thread of this process, as vLLM's driver drives
its workers: stage calls return at once, so one thread per replica keeps PIPELINE_DEPTH jobs in
flight on it (`run_stream`), and frames come back here, where the videos are written. Replicas
take jobs from one queue rather than shares dealt out beforehand, so that uneven jobs balance and
the jobs of a replica that is lost can go to the others:

- a job whose stage's actor died under it (its node lost, its process killed) goes back to the
  queue, until it has been tried `max_attempts` times; a job that never reached a stage torn down
  before it (a denoiser group shut down after another job failed in it) goes back without a try
  counted;
- a job that fails for its own reasons (a stage raised) fails alone and is not tried again;
- a replica that lost an actor is closed and, while jobs are left, replaced if the cluster has
  room for it (`room`); otherwise it retires and the others finish the queue. If none is left,
  the jobs still queued fail, saying so.

Why these are framecast's and not Ray Data's or ActorPool's: docs/architecture.md, "Batches".
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cluster.driver import Encodings, GenerationResult, Job, JobFailed, JobProgress, make_executor, run_stream
from cluster.executor import Executor, StageFailed
from cluster.runtime import has_room, plan_resources

WAIT_S = 0.5  # how often a waiting thread looks up (so that Ctrl-C and a stop are heard)
# How long a replica that lost an actor looks for room for its replacement: the resources of the
# replica it closed return to Ray's view of the cluster within a second or two.
ROOM_WAIT_S = 10.0


@dataclass
class Work:
    """A job of the pool: the caller's index for it, the job, where its video goes."""

    index: int
    job: Job
    output: Path
    attempts: int = 0  # tries that ended with a stage's actor lost


@dataclass
class Finished:
    """A job's outcome: its result or failure, the replica that made it, how many tries it took."""

    index: int
    result: GenerationResult | JobFailed
    replica: int
    attempts: int


class ReplicaPool:
    """`count` executors made by `make(replica)`, running a list of jobs together (`run`)."""

    def __init__(
        self,
        make: Callable[[int], Executor],
        count: int,
        *,
        max_attempts: int = 3,
        room: Callable[[], bool] | None = None,
        one_at_a_time: bool = False,
    ):
        """`room()` says whether the cluster can take one more replica now (a lost one is replaced
        only then; None: never). `one_at_a_time`: the executors are made one after another (in-process ones
        must be: diffusers' from_pretrained builds models on the meta device under a process-wide
        context, which two threads loading at once break); Ray replicas' actors start together."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1 (got {max_attempts})")
        self.make, self.max_attempts, self.room = make, max_attempts, room
        self.events: list[str] = []  # replicas lost, replaced, retired, as they happened
        self._lock = threading.Condition()
        self._closed = False
        with ThreadPoolExecutor(1 if one_at_a_time else count) as pool:
            starting = [pool.submit(make, i) for i in range(count)]
        self.executors: list[Executor | None] = [s.result() for s in starting if s.exception() is None]
        failed = next((s.exception() for s in starting if s.exception() is not None), None)
        if failed is not None:
            self.close()
            raise failed

    def run(
        self,
        work: list[Work],
        on_step: JobProgress | None = None,
        pipelined: bool = True,
        encodings: Encodings | None = None,
    ) -> Iterator[Finished]:
        """Run `work` (in its order: put the longest jobs first to finish together), yielding
        each job's outcome as it finishes. `on_step(work index, steps done, steps)`. An error that
        is no job's (e.g. a video that cannot be written) stops every replica after its current
        job and is raised here; the jobs finished are yielded first."""
        pending: deque[Work] = deque(work)
        running = [0]  # jobs taken by a replica and not yet finished or put back
        results: queue.Queue = queue.Queue()
        stop, finished = threading.Event(), object()

        def drive(replica: int) -> None:
            try:
                while self._next_stream(replica, pending, running, stop):
                    self._stream(replica, pending, running, stop, results, on_step, pipelined, encodings)
            except BaseException as e:
                results.put(e)
            finally:
                results.put(finished)

        threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(len(self.executors))]
        try:
            for thread in threads:
                thread.start()
            live, failure = len(threads), None
            while live:
                try:
                    item = results.get(timeout=WAIT_S)
                except queue.Empty:
                    continue
                if item is finished:
                    live -= 1
                elif isinstance(item, BaseException):
                    failure = failure or item
                    stop.set()  # the others stop after their current job, which is still yielded
                else:
                    yield item
            if failure is not None:
                raise failure
            for left in pending:  # every replica retired with jobs still queued
                why = RuntimeError("no pipeline replica is left to run it: the lost ones could not be replaced")
                yield Finished(left.index, JobFailed(left.index, left.job.request.prompt, StageFailed("replica", why)),
                               -1, left.attempts)  # fmt: skip
        finally:
            stop.set()
            with self._lock:
                self._lock.notify_all()
            for thread in threads:
                if thread.is_alive():
                    thread.join(timeout=30)

    def _next_stream(self, replica: int, pending: deque[Work], running: list[int], stop: threading.Event) -> bool:
        """Wait until there is a job for the replica (False: none will come, or stopped), and give
        it an executor (a new one if it lost its own; False: no room for one)."""
        with self._lock:
            while not pending and running[0] and not stop.is_set():  # a job may still come back
                self._lock.wait(WAIT_S)
            if stop.is_set() or not pending:
                return False
        if self.executors[replica] is None:
            try:
                if self.room is None or not self._wait_for_room():
                    self.events.append(f"replica {replica} retired: the cluster has no room for another")
                    return False
                made = self.make(replica)
            except Exception as e:  # e.g. no node with room for its group after all: the others go on
                self.events.append(f"replica {replica} retired: {type(e).__name__}: {e}".splitlines()[0])
                return False
            with self._lock:
                if stop.is_set() or self._closed:  # the pool ended while it started: nothing for it to do
                    made.close()
                    return False
                self.executors[replica] = made
            self.events.append(f"replica {replica} replaced")
        return True

    def _wait_for_room(self) -> bool:
        deadline = time.monotonic() + ROOM_WAIT_S
        while not self.room():
            if time.monotonic() > deadline:
                return False
            time.sleep(WAIT_S)
        return True

    def _stream(self, replica, pending, running, stop, results, on_step, pipelined, encodings) -> None:
        """One stream of jobs through the replica's executor, until the queue is empty, the
        replica loses an actor (it is closed, to be replaced) or the pool stops."""
        executor, taken, lost = self.executors[replica], [], threading.Event()

        def feed() -> Iterator[Work]:
            while not lost.is_set() and not stop.is_set():
                with self._lock:
                    if not pending:
                        return
                    item = pending.popleft()
                    running[0] += 1
                taken.append(item)
                yield item

        steps = None if on_step is None else (lambda job, done, total: on_step(taken[job].index, done, total))
        for_jobs, for_outputs = itertools.tee(feed())
        jobs, outputs = (w.job for w in for_jobs), (w.output for w in for_outputs)
        try:
            for result in run_stream(jobs, executor, outputs, steps, pipelined, encodings):
                item = taken[result.index]
                result.index = item.index
                error = result.error if isinstance(result, JobFailed) else None
                if error is not None and (error.actor_lost or error.stage_down):
                    if not lost.is_set():  # the replica takes no more jobs; it is replaced once its stream ends
                        self.events.append(f"replica {replica} lost: {error}")
                        lost.set()
                    item.attempts += error.actor_lost
                    if item.attempts < self.max_attempts:
                        with self._lock:
                            pending.appendleft(item)
                            running[0] -= 1
                            self._lock.notify_all()
                        continue
                    if item.attempts > 1:
                        error.args = (f"{error} (tried {item.attempts} times)",)
                item.attempts += error is None or not error.actor_lost  # this try, unless counted above
                results.put(Finished(item.index, result, replica, item.attempts))
                with self._lock:
                    running[0] -= 1
                    self._lock.notify_all()
        finally:
            if lost.is_set():
                with self._lock:
                    if not self._closed:
                        self.executors[replica] = None
                try:
                    executor.close()
                except Exception as e:  # e.g. Ray still busy with the lost node: the others go on
                    self.events.append(f"replica {replica}: closing it failed: {type(e).__name__}: {e}".splitlines()[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            executors, self.executors = self.executors, []
        for executor in executors:
            if executor is not None:
                executor.close()


def pipeline_replicas(
    job: Job, count: int, local: bool, max_attempts: int = 3, encoder: Callable[[int], bool] = lambda _: True
) -> ReplicaPool:
    """`count` pipelines for jobs like `job`: in this process (`local`: one), or Ray executors
    that share the cluster evenly, replica i with a text encoder if `encoder(i)`. A lost replica
    is replaced when the cluster has room for one more of them."""
    if local:  # nothing to lose and nothing to replace: one process
        return ReplicaPool(lambda _: make_executor(job, True), count, max_attempts=max_attempts, one_at_a_time=True)
    workers = job.layout.world_size

    def room() -> bool:
        return has_room(plan_resources(workers=workers, decoders=job.decoders, replicas=count), workers)

    return ReplicaPool(lambda i: make_executor(job, False, count, encoder(i), mend=False), count,
                       max_attempts=max_attempts, room=room)  # fmt: skip
