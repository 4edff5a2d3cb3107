import pytest

from cluster.runtime import STAGES, load_cluster_layout, plan_resources
from stages.errors import InvalidRequest


def test_every_actor_gets_its_own_gpu_when_there_are_enough():
    plan = plan_resources({"CPU": 32, "GPU": 8}, workers=4)
    assert set(plan.stages) == set(STAGES) and plan.bundle == {"GPU": 1.0}
    assert all(r.num_gpus == 1.0 and r.bundle is None and r.env == {} for r in plan.stages.values())


def test_encoder_and_decoder_share_the_one_spare_gpu():
    plan = plan_resources({"CPU": 16, "GPU": 2}, workers=1)
    assert plan.stages["denoise"].num_gpus == 1.0
    assert plan.stages["encode"].num_gpus == plan.stages["decode"].num_gpus == 0.5
    assert plan.stages["encode"].bundle is None


@pytest.mark.parametrize("gpus", [1, 8])
def test_with_no_spare_gpu_encoder_and_decoder_live_beside_the_first_ranks(gpus):
    plan = plan_resources({"CPU": 16, "GPU": gpus}, workers=gpus)
    encode, denoise, decode = (plan.stages[s] for s in STAGES)
    assert (encode.bundle, decode.bundle) == (0, min(1, gpus - 1))
    # Each bundle is one GPU: what is asked inside it fits.
    per_bundle = [denoise.num_gpus] * gpus
    per_bundle[encode.bundle] += encode.num_gpus
    per_bundle[decode.bundle] += decode.num_gpus
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
