import os

import pytest

from cluster.runtime import STAGES, load_cluster_layout, plan_resources
from stages.errors import InvalidRequest


def test_every_actor_gets_its_own_gpu_when_there_are_enough():
    plan = plan_resources({"CPU": 32, "GPU": 8}, workers=4)
    assert set(plan.stages) == set(STAGES) and plan.bundle == {"GPU": 1.0}
    assert all(r.num_gpus == 1.0 and r.beside_rank is None and r.env == {} for r in plan.stages.values())


def test_encoder_and_decoder_share_the_one_spare_gpu():
    plan = plan_resources({"CPU": 16, "GPU": 2}, workers=1)
    assert plan.stages["denoise"].num_gpus == 1.0
    assert plan.stages["encode"].num_gpus == plan.stages["decode"].num_gpus == 0.5
    assert plan.stages["encode"].beside_rank is None


@pytest.mark.parametrize("gpus", [1, 8])
def test_with_no_spare_gpu_encoder_and_decoder_live_beside_the_first_ranks(gpus):
    plan = plan_resources({"CPU": 16, "GPU": gpus}, workers=gpus)
    encode, denoise, decode = (plan.stages[s] for s in STAGES)
    assert (encode.beside_rank, decode.beside_rank) == (0, min(1, gpus - 1))
    # Each bundle is one GPU: what is asked inside it fits.
    per_bundle = [denoise.num_gpus] * gpus
    per_bundle[encode.beside_rank] += encode.num_gpus
    per_bundle[decode.beside_rank] += decode.num_gpus
    assert max(per_bundle) <= 1.0


def test_too_few_gpus_for_the_ranks_is_a_clear_error():
    with pytest.raises(InvalidRequest, match=r"^--workers 4 needs 4 GPUs \(one per rank\); the Ray cluster has 2$"):
        plan_resources({"CPU": 16, "GPU": 2}, workers=4)


def test_cpu_only_ranks_split_the_cores():
    plan = plan_resources({"CPU": 2}, workers=4)
    assert plan.bundle == {"CPU": 0.5} and plan.stages["denoise"].num_cpus == 0.5
    assert plan.stages["denoise"].env == {"OMP_NUM_THREADS": "1"}
    for stage in ("encode", "decode"):  # ask for no CPU, so they fit beside the ranks; use every core
        assert plan.stages[stage].num_cpus == 0 and plan.stages[stage].env == {"OMP_NUM_THREADS": "2"}
    single = plan_resources({"CPU": 2}, workers=1)
    assert single.bundle == {"CPU": 1.0} and single.stages["denoise"].env == {"OMP_NUM_THREADS": "2"}


def test_cluster_layouts():
    assert load_cluster_layout("single-node").denoiser_placement == "STRICT_PACK"
    assert load_cluster_layout("multi-node").denoiser_placement == "PACK"
    with pytest.raises(InvalidRequest, match=r"^unknown cluster layout 'moon'; known: multi-node, single-node$"):
        load_cluster_layout("moon")


PLACE_ON_FAKE_GPUS = """
import json, os, sys
import ray
from cluster.process_group import ActorGroup
from cluster.runtime import plan_resources

class Probe:  # a stage that reports which GPU Ray gave its actor
    def __init__(self, *args, **kwargs):
        pass
    def describe(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

results = {}
for gpus, workers in [(1, 1), (2, 2), (3, 2), (4, 2)]:
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    plan = plan_resources(workers=workers)
    group = ActorGroup(Probe, (), {}, workers, plan, "STRICT_PACK")
    side = [group.side_actor(plan.stages[s], Probe) for s in ("encode", "decode")]
    ranks = ray.get(group.start(), timeout=120)
    encode, decode = ray.get([a.start.remote() for a in side], timeout=120)
    results[f"{gpus}/{workers}"] = {"ranks": ranks, "encode": encode, "decode": decode}
    group.close()
    ray.shutdown()
print(json.dumps(results))
"""


def test_plans_are_schedulable_on_a_cluster_with_gpus(tmp_path):
    """Ray with simulated GPUs places every plan: each rank on a GPU of its own, the encoder and
    decoder on spare GPUs or beside the first ranks."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", PLACE_ON_FAKE_GPUS], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    placed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert placed["1/1"] == {"ranks": ["0"], "encode": "0", "decode": "0"}  # all three share the one GPU
    two = placed["2/2"]
    assert sorted(two["ranks"]) == ["0", "1"] and (two["encode"], two["decode"]) == (two["ranks"][0], two["ranks"][1])
    three = placed["3/2"]  # the spare GPU is shared by the encoder and decoder
    assert len(set(three["ranks"])) == 2 and three["encode"] == three["decode"] not in three["ranks"]
    four = placed["4/2"]  # a GPU each
    assert len({*four["ranks"], four["encode"], four["decode"]}) == 4
