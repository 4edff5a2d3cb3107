"""The Ray executor: live progress from an actor, and failures that name their stage."""

import time
from dataclasses import replace

import pytest
from conftest import broken_family

from cluster.driver import Job, generate
from cluster.executor import LocalExecutor, ProgressRelay, StageFailed, wait_relaying_progress
from stages.context_parallel import ParallelLayout
from stages.request import GenerationRequest, build_request


def bad_job(spec, weights):
    # Bypasses validation on purpose: 72 px is 9 latent rows, which the transformer's 2x2 patches can't tile.
    r = GenerationRequest(prompt="a cat", negative_prompt="", steps=2, guidance_scale=6.0, num_frames=9, fps=8,
                          height=72, width=96, seed=0)  # fmt: skip
    return Job(spec, weights, r)


@pytest.mark.ranks(2)
def test_a_failing_denoiser_group_is_torn_down_at_once(ray_session, executors, tiny_spec, tiny_weights, tmp_path):
    import os

    from ray.util import placement_group_table

    executor = executors.get(tiny_spec, tiny_weights, ParallelLayout(ring=2))
    group_id = executor.group.placement_group.id.hex()
    with pytest.raises(StageFailed, match=r"^denoise stage failed: \w+Error: "):
        generate(bad_job(tiny_spec, tiny_weights), executor, tmp_path / "never.mp4")
    assert executor.group.actors == [] and executor.group.placement_group is None
    assert placement_group_table()[group_id]["state"] == "REMOVED"

    # Reloaded, the executor gets a new group; its other actors stay in their processes.
    side = [*executor.side["encode"], *executor.side["decode"], *executor.side["measure"]]
    pid = [a.__ray_call__.remote(lambda self: os.getpid()) for a in side]
    before = ray_session.get(pid)
    executor.reload(tiny_spec, tiny_weights, ParallelLayout(ring=2))
    assert executor.denoiser_down is None and len(executor.group.actors) == 2
    assert ray_session.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in side]) == before


@pytest.mark.ranks(2, 0)
def test_one_rank_failing_alone_fails_the_job_at_once(ray_session, executors, tiny_spec, tiny_weights):
    """Rank 1 raises mid-forward while rank 0 waits in a collective: the driver notices rank 1's
    error itself (not a timeout on rank 0) and releases the group."""

    executor = executors.get(tiny_spec, tiny_weights, ParallelLayout(ring=2))
    rank1 = executor.group.actors[1]
    ray_session.get(rank1.call.remote("__setattr__", "family", broken_family("rank 1 lost its GPU"))[0])
    r = bad_job(tiny_spec, tiny_weights).request
    encoded = executor.call("encode", "encode", r.prompt, r.negative_prompt, True)
    start = time.monotonic()
    denoised = executor.call("denoise", "denoise", encoded, replace(r, height=64), progress=lambda d, t: None)
    with pytest.raises(StageFailed, match=r"^denoise stage failed: RuntimeError: rank 1 lost its GPU$"):
        executor.wait(encoded, denoised)
    assert time.monotonic() - start < 30
    assert executor.group.actors == [] and executor.group.placement_group is None


@pytest.mark.beside_executor
def test_progress_is_relayed_live_and_per_call(ray_session):
    from cluster.actors import StageActor

    class SlowStage:  # defined here, so Ray ships it to the actor by value
        def __init__(self, step_s):
            self.step_s = step_s

        def describe(self):
            return "cpu"

        def run(self, steps, on_step=None):
            for i in range(steps):
                time.sleep(self.step_s)
                if on_step:
                    on_step(i + 1, steps)
            return steps

    actor = StageActor.options(num_cpus=0).remote(SlowStage, 0.3)  # beside the session's executor
    ray_session.get(actor.start.remote())
    seen = []

    def on_step(done, total):
        seen.append((done, total, time.monotonic()))

    relay = ProgressRelay()
    value, _ = actor.call.remote("run", 6, progress_id="job-1")
    relay.follow(actor, "job-1", on_step, [value])
    wait_relaying_progress([value], relay)
    finished = time.monotonic()
    assert [d for d, _, _ in seen][-1] == 6 and all(t == 6 for _, t, _ in seen)
    assert len([d for d, _, t in seen if d < 6 and t < finished]) >= 2  # intermediate steps, before the end
    assert ray_session.get(value) == 6

    # A second call on the same actor never shows the first call's (6, 6) as its own progress.
    second = []
    value, _ = actor.call.remote("run", 3, progress_id="job-2")
    relay.follow(actor, "job-2", lambda d, t: second.append((d, t)), [value])
    wait_relaying_progress([value], relay)
    assert second[-1] == (3, 3) and all(t == 3 for _, t in second)
    ray_session.kill(actor)


def test_each_stage_runs_in_its_own_actor_process(ray_session, executors, tiny_spec, tiny_weights):
    import os

    executor = executors.get(tiny_spec, tiny_weights)
    stages = ("encode", "decode", "measure")
    actors = [*(executor.side[stage][0] for stage in stages), *executor.group.actors]
    pids = ray_session.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in actors])
    assert len(set(pids)) == 4 and os.getpid() not in pids  # the clarity panel in a process of its own too
    # 2 cores shared by 4 stage processes: one thread each
    assert executor.devices() == {
        "encode": "cpu",
        "denoise": "cpu",
        "decode": "cpu",
        "measure": "cpu (1 OpenCV thread)",
    }


@pytest.mark.ranks(1, 2)
def test_reload_keeps_the_processes_and_equals_a_fresh_build(
    ray_session, executors, tiny_spec, tiny_weights, rope_spec, rope_weights
):
    """Another model loaded into the same actors gives what that model gives in one process;
    another number of decoders, or no encoder, starts or stops only those actors; a layout of
    another world size starts a new denoiser group and keeps the other actors."""
    import os

    def pids(executor) -> dict[str, list[int]]:
        stages = {**executor.side, "denoise": executor.group.actors}
        return {stage: ray_session.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in actors])
                for stage, actors in stages.items()}  # fmt: skip

    executor = executors.get(tiny_spec, tiny_weights)
    before = pids(executor)
    assert executors.get(rope_spec, rope_weights) is executor and pids(executor) == before
    r = build_request(rope_spec, "a fox in the snow", steps=2, guidance_scale=6.0, seed=11, num_frames=9)

    def latents(ex):
        encoded = ex.call("encode", "encode", r.prompt, r.negative_prompt, True)
        return ex.get(ex.call("denoise", "denoise", encoded, r))

    local = LocalExecutor(rope_spec, rope_weights)
    assert (latents(executor) - latents(local)).abs().max().item() <= 1e-5  # fp32, other thread counts

    assert executors.get(tiny_spec, tiny_weights, decoders=2, encoder=False) is executor
    after = pids(executor)
    assert after["encode"] == [] and "encode" not in executor.devices()
    assert after["decode"][0] == before["decode"][0] and after["decode"][1] not in before["decode"]
    assert (after["measure"], after["denoise"]) == (before["measure"], before["denoise"])

    # A layout of another world size: a new denoiser group (new processes), the side actors stay.
    assert executors.get(rope_spec, rope_weights, ParallelLayout(ring=2), decoders=2, encoder=True) is executor
    regrouped = pids(executor)
    assert len(regrouped["denoise"]) == 2 and not set(regrouped["denoise"]) & set(after["denoise"])
    assert (regrouped["decode"], regrouped["measure"]) == (after["decode"], after["measure"])
    assert (latents(executor) - latents(local)).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "before, after, regroup, stays",
    [
        (({"CPU": 2}, 1, 1), ({"CPU": 2}, 2, 1), True, True),  # 2 cores: one thread each whatever the ranks
        (({"GPU": 8}, 2, 1), ({"GPU": 8}, 4, 1), True, True),  # a GPU of its own before and after
        (({"GPU": 4}, 2, 1), ({"GPU": 4}, 3, 1), True, False),  # a whole GPU, then half the spare one
        (({"GPU": 2}, 2, 1), ({"GPU": 2}, 2, 1), True, False),  # beside a rank of the group replaced
        (({"GPU": 2}, 2, 1), ({"GPU": 2}, 2, 1), False, True),  # beside a rank of the group kept
    ],
)
def test_which_side_actors_keep_their_process_on_reload(before, after, regroup, stays):
    from cluster.executor import side_actor_stays
    from cluster.runtime import plan_resources

    old, new = (
        plan_resources(cluster, workers=workers, decoders=decoders) for cluster, workers, decoders in (before, after)
    )
    assert side_actor_stays(old.encode, new.encode, regroup) is stays
    assert side_actor_stays(None, new.encode, regroup) is False  # no actor yet: one starts


@pytest.mark.ranks(1, 0)
def test_stage_failure_in_an_actor_names_the_stage(executors, tiny_spec, tiny_weights, tmp_path):
    executor = executors.get(tiny_spec, tiny_weights)
    with pytest.raises(StageFailed, match=r"^denoise stage failed: \w+Error: "):
        generate(bad_job(tiny_spec, tiny_weights), executor, tmp_path / "never.mp4")
    assert not (tmp_path / "never.mp4").exists()


def test_stage_failure_in_process_names_the_stage(tiny_spec, tiny_weights, tmp_path):
    with pytest.raises(StageFailed, match=r"^denoise stage failed: "):
        generate(bad_job(tiny_spec, tiny_weights), LocalExecutor(tiny_spec, tiny_weights), tmp_path / "x.mp4")


def test_a_stage_is_built_with_the_collector_paused_then_frozen():
    """An actor builds its stage (mostly imports) with Python's cyclic collector paused, and
    freezes what it built; the collector runs again afterwards, even when the build fails."""
    import gc

    from cluster.actors import build_without_gc

    during = []

    def build(value):
        during.append(gc.isenabled())
        return [value]

    frozen = gc.get_freeze_count()
    assert build_without_gc(build, 3) == [3]
    assert during == [False] and gc.isenabled()
    assert gc.get_freeze_count() > frozen

    def broken():
        raise RuntimeError("no weights")

    with pytest.raises(RuntimeError, match="no weights"):
        build_without_gc(broken)
    assert gc.isenabled()
