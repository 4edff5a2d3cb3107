import os

import pytest

from cluster.runtime import load_cluster_layout, plan_resources, replicas_that_fit
from stages.errors import InvalidRequest


def side_actors(plan):
    return [plan.encode, *plan.decode]


def test_every_actor_gets_its_own_gpu_when_there_are_enough():
    plan = plan_resources({"CPU": 32, "GPU": 8}, workers=4, decoders=3)
    assert len(plan.decode) == 3 and plan.bundle == {"GPU": 1.0}
    assert all(r.num_gpus == 1.0 and r.beside_rank is None and r.env == {} for r in [*side_actors(plan), plan.denoise])


def test_encoder_and_decoder_share_the_one_spare_gpu():
    plan = plan_resources({"CPU": 16, "GPU": 2}, workers=1)
    assert plan.denoise.num_gpus == 1.0
    assert plan.encode.num_gpus == plan.decode[0].num_gpus == 0.5
    assert plan.encode.beside_rank is None


@pytest.mark.parametrize("gpus, workers, decoders, share", [(3, 1, 3, 0.5), (6, 4, 3, 0.5), (4, 2, 4, 0.33)])
def test_side_actors_share_the_spare_gpus_evenly(gpus, workers, decoders, share):
    plan = plan_resources({"CPU": 16, "GPU": gpus}, workers=workers, decoders=decoders)
    assert [r.num_gpus for r in side_actors(plan)] == [share] * (1 + decoders)
    spare = gpus - workers  # Ray packs them: they must fit the spare GPUs
    assert sum(r.num_gpus for r in side_actors(plan)) <= spare


@pytest.mark.parametrize("gpus, decoders", [(1, 1), (8, 1), (2, 3), (1, 4)])
def test_with_no_spare_gpu_side_actors_live_beside_the_ranks(gpus, decoders):
    plan = plan_resources({"CPU": 16, "GPU": gpus}, workers=gpus, decoders=decoders)
    side = side_actors(plan)
    assert [r.beside_rank for r in side] == [i % gpus for i in range(1 + decoders)]
    # Each bundle is one GPU: what is asked inside it fits.
    per_bundle = [plan.denoise.num_gpus] * gpus
    for r in side:
        per_bundle[r.beside_rank] += r.num_gpus
    assert max(per_bundle) <= 1.0 + 1e-9 and min(r.num_gpus for r in side) > 0


def test_too_few_gpus_for_the_ranks_is_a_clear_error():
    with pytest.raises(InvalidRequest, match=r"^--workers 4 needs 4 GPUs \(one per rank\); the Ray cluster has 2$"):
        plan_resources({"CPU": 16, "GPU": 2}, workers=4)


def test_cpu_only_ranks_split_the_cores():
    plan = plan_resources({"CPU": 2}, workers=4)
    assert plan.bundle == {"CPU": 0.5} and plan.denoise.num_cpus == 0.5
    assert all(side.num_cpus == 0 for side in side_actors(plan))  # ask for no CPU, so they fit beside the ranks
    # Every stage process its own threads (the stages of different jobs run at once), and no spinning.
    big = plan_resources({"CPU": 16}, workers=2, decoders=2)
    every = [*side_actors(big), big.denoise, big.measure]  # 16 cores, 6 processes (the clarity panel too)
    assert {r.env["OMP_NUM_THREADS"] for r in every} == {"2"}
    assert {r.env["OMP_NUM_THREADS"] for r in [*side_actors(plan), plan.denoise, plan.measure]} == {"1"}
    assert all(r.env["OMP_WAIT_POLICY"] == "PASSIVE" for r in every)
    assert plan.measure.num_cpus == 0 and plan.measure.num_gpus == 0


@pytest.mark.parametrize("gpus, cpus", [(1, 16), (8, 64), (2, 1)])
def test_the_clarity_panel_takes_cpu_cores_never_a_gpu(gpus, cpus):
    plan = plan_resources({"CPU": cpus, "GPU": gpus}, workers=gpus, decoders=1)
    assert plan.measure.num_gpus == 0 and plan.measure.beside_rank is None
    assert plan.measure.num_cpus == min(2, cpus) and plan.measure.env == {"OMP_NUM_THREADS": str(min(2, cpus))}


@pytest.mark.parametrize(
    "cluster, workers, fit",
    [({"CPU": 2}, 1, 2), ({"CPU": 2}, 2, 1), ({"CPU": 1}, 2, 1), ({"CPU": 64, "GPU": 8}, 1, 8),
     ({"CPU": 64, "GPU": 8}, 2, 4), ({"CPU": 64, "GPU": 8}, 3, 2), ({"CPU": 64, "GPU": 2}, 4, 1)],
)  # fmt: skip
def test_replicas_that_fit(cluster, workers, fit):
    assert replicas_that_fit(cluster, workers) == fit


def test_each_replica_is_planned_on_its_share():
    """A sweep's replicas: 8 GPUs, 2 ranks each. Two replicas of 4 GPUs give the encoder and the
    decoder a GPU each; four replicas of 2 GPUs put them beside the ranks."""
    two = plan_resources({"CPU": 64, "GPU": 8}, workers=2, decoders=1, replicas=2)
    assert [r.num_gpus for r in side_actors(two)] == [1.0, 1.0] and two.denoise.num_gpus == 1.0
    assert 2 * (2 * two.denoise.num_gpus + sum(r.num_gpus for r in side_actors(two))) <= 8  # all fit at once
    four = plan_resources({"CPU": 64, "GPU": 8}, workers=2, decoders=1, replicas=4)
    assert [r.beside_rank for r in side_actors(four)] == [0, 1]
    assert four.denoise.num_gpus == 0.8
    cpu = plan_resources({"CPU": 2}, workers=1, decoders=1, replicas=2)
    assert cpu.bundle == {"CPU": 1.0} and cpu.denoise.env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(InvalidRequest, match="3 replicas need a GPU each at least; the Ray cluster has 2"):
        plan_resources({"CPU": 8, "GPU": 2}, replicas=3)


def test_cluster_layouts():
    assert load_cluster_layout("single-node").denoiser_placement == "STRICT_PACK"
    assert load_cluster_layout("multi-node").denoiser_placement == "PACK"
    with pytest.raises(InvalidRequest, match=r"^unknown cluster layout 'moon'; known: multi-node, single-node$"):
        load_cluster_layout("moon")


PLACE_ON_FAKE_GPUS = """
import json, os, sys
import ray
import cluster.executor as executor_module
from cluster.process_group import ActorGroup
from cluster.runtime import plan_resources
from stages.context_parallel import ParallelLayout

class Probe:  # every stage: reports which GPU Ray gave its actor
    def __init__(self, *args, **kwargs):
        pass
    def describe(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

def gpus(actors):
    return ray.get([a.describe.remote() for a in actors], timeout=120)

def place(workers):
    plan = plan_resources(workers=workers)
    group = ActorGroup(Probe, (), {}, workers, plan.denoise, plan.bundle)
    side = [group.side_actor(r, Probe) for r in (plan.encode, plan.decode[0], plan.measure)]
    ranks = ray.get(group.start(), timeout=120)
    encode, decode, measure = ray.get([a.start.remote() for a in side], timeout=120)
    for actor in side:
        ray.kill(actor)
    group.close()
    return {"ranks": ranks, "encode": encode, "decode": decode, "measure": measure}

def reload():
    executor_module.DenoiserStage = executor_module.ClarityStage = Probe
    executor_module.MODEL_STAGES.update(dict.fromkeys(executor_module.MODEL_STAGES, Probe))
    executor = executor_module.RayExecutor(None, None)
    before = {"ranks": gpus(executor.group.actors), "side": gpus(executor.side["encode"] + executor.side["decode"])}
    executor.reload(None, None, ParallelLayout(ring=2))  # 2 ranks on 3 GPUs: the side actors make room
    after = {"ranks": gpus(executor.group.actors), "side": gpus(executor.side["encode"] + executor.side["decode"])}
    executor.close()
    return {"before": before, "after": after}

placed = {}
for gpus_in_cluster, workers in json.loads(sys.argv[1]):  # one Ray after the other
    ray.init(num_cpus=2, num_gpus=gpus_in_cluster, include_dashboard=False, log_to_driver=False)
    placed[f"{gpus_in_cluster}/{workers}"] = place(workers)
    if gpus_in_cluster == 3:
        placed["reload"] = reload()
    ray.shutdown()
print(json.dumps(placed))
"""


@pytest.mark.own_ray
def test_plans_are_schedulable_on_a_cluster_with_gpus(tmp_path):
    """Ray with simulated GPUs places every plan: each rank on a GPU of its own, the encoder and
    decoder on spare GPUs or beside the first ranks. One Ray per cluster size, started one after
    the other by two processes at once (each mostly waits for its Ray to start and stop). On the
    3 GPUs, an executor of 1 rank then reloads to 2 ranks: its encoder and decoder, a GPU each
    before, give them back before the new group is placed (it needs 2), and then share the one
    spare GPU."""
    import json
    import subprocess
    import sys

    # FRAMECAST_PLACEMENT_TIMEOUT: a group that finds no room fails in 30 s.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "FRAMECAST_PLACEMENT_TIMEOUT": "30"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PLACE_ON_FAKE_GPUS, json.dumps(sizes)],  # [(GPUs, denoiser ranks)...]
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for sizes in ([(1, 1), (2, 2)], [(3, 2), (4, 2)])
    ]
    placed = {}
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        placed.update(json.loads(out.strip().splitlines()[-1]))
    reload = placed.pop("reload")
    assert len({*reload["before"]["ranks"], *reload["before"]["side"]}) == 3  # a GPU each
    ranks, (encode, decode) = reload["after"]["ranks"], reload["after"]["side"]
    assert len(set(ranks)) == 2 and encode == decode not in ranks
    assert sorted(placed) == ["1/1", "2/2", "3/2", "4/2"]
    assert all(p.pop("measure") == "" for p in placed.values())  # the clarity panel sees no GPU
    assert placed["1/1"] == {"ranks": ["0"], "encode": "0", "decode": "0"}  # all three share the one GPU
    two = placed["2/2"]
    assert sorted(two["ranks"]) == ["0", "1"] and (two["encode"], two["decode"]) == (two["ranks"][0], two["ranks"][1])
    three = placed["3/2"]  # the spare GPU is shared by the encoder and decoder
    assert len(set(three["ranks"])) == 2 and three["encode"] == three["decode"] not in three["ranks"]
    four = placed["4/2"]  # a GPU each
    assert len({*four["ranks"], four["encode"], four["decode"]}) == 4
