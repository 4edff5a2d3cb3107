from cluster.runtime import STAGES, stage_resources


def test_each_stage_gets_its_own_gpu_when_there_are_enough():
    res = stage_resources({"CPU": 32, "GPU": 8})
    assert set(res) == set(STAGES)
    assert all(r.num_gpus == 1.0 and r.env == {} for r in res.values())


def test_stages_share_a_single_gpu():
    res = stage_resources({"CPU": 16, "GPU": 1})
    assert all(r.num_gpus == 0.33 for r in res.values())
    assert sum(r.num_gpus for r in res.values()) <= 1


def test_two_gpus_pack_two_stages_on_one():
    res = stage_resources({"CPU": 16, "GPU": 2})
    assert all(r.num_gpus == 0.5 for r in res.values())  # each fraction fits on one GPU; 3 x 0.5 <= 2


def test_cpu_only_actors_share_the_cores():
    res = stage_resources({"CPU": 2})
    assert all(r.num_gpus == 0 and r.num_cpus == 0 for r in res.values())
    assert all(r.env == {"OMP_NUM_THREADS": "2"} for r in res.values())
