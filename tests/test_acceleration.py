"""The speed and memory levers (stages.acceleration): the attention kernel's choice, refusals of
levers a device cannot take, regional compilation equal to eager on the CPU (inductor, fp32), the
decoder tiling by itself when an untiled decode would not fit, and bench/gpu.py's smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cluster.driver import prepare
from stages.acceleration import (
    Acceleration,
    attention_kernel,
    check_acceleration,
    choose_attention,
    parse_acceleration,
)
from stages.context_parallel import ParallelLayout, attention_with_lse
from stages.decoder import DecoderStage, plan_decode
from stages.denoiser import DenoiserStage, lever_problem
from stages.errors import InvalidRequest
from stages.families import Conditioning, family_for
from stages.models import load_spec
from stages.request import build_request
from stages.weights import resolve_weights

ROOT = Path(__file__).resolve().parents[1]
ALL_KERNELS = {"default", "math", "efficient", "flash", "cudnn"}


@pytest.mark.parametrize(
    ("device", "capability", "dtype", "available", "expected"),
    [
        ("cuda", (9, 0), torch.bfloat16, ALL_KERNELS, "cudnn"),  # Hopper: cuDNN's fused attention
        ("cuda", (10, 0), torch.float16, ALL_KERNELS, "cudnn"),
        ("cuda", (9, 0), torch.bfloat16, ALL_KERNELS - {"cudnn"}, "flash"),  # a build without cuDNN 9
        ("cuda", (8, 0), torch.bfloat16, ALL_KERNELS, "flash"),  # Ampere
        ("cuda", (8, 9), torch.float16, ALL_KERNELS, "flash"),  # Ada
        ("cuda", (7, 5), torch.float16, ALL_KERNELS, "efficient"),  # Turing: no flash kernel
        ("cuda", (9, 0), torch.float32, ALL_KERNELS, "efficient"),  # fp32: only the efficient kernel fuses
        ("cpu", None, torch.float32, {"default", "math"}, "default"),  # PyTorch's CPU flash kernel
    ],
)
def test_attention_kernel_by_capability_and_dtype(device, capability, dtype, available, expected):
    assert choose_attention("auto", device, capability, dtype, available) == expected


def test_a_requested_kernel_is_taken_as_asked():
    assert choose_attention("efficient", "cuda", (9, 0), torch.bfloat16, ALL_KERNELS) == "efficient"


@pytest.mark.parametrize(
    ("levers", "device", "capability", "torchao", "refusal"),
    [
        ({"offload": "model"}, "cpu", None, True, "offload model moves weights between host memory and a CUDA GPU"),
        ({"offload": "group"}, "cpu", None, True, "this stage runs on cpu: drop --offload"),
        ({"fp8": True}, "cpu", None, True, "fp8 needs a CUDA GPU of compute capability 8.9 or newer"),
        ({"fp8": True}, "cuda", (8, 0), True, "this stage has a GPU of compute capability (8, 0)"),
        ({"fp8": True}, "cuda", (9, 0), False, "fp8 needs torchao (pip install torchao)"),
        ({"fp8": True, "offload": "model"}, "cuda", (9, 0), True, "fp8 with offload is not supported"),
        ({"attention": "cudnn"}, "cpu", None, True, "attention cudnn is a CUDA kernel"),
    ],
)
def test_levers_a_device_cannot_take_are_refused_in_one_line(levers, device, capability, torchao, refusal):
    problem = check_acceleration(Acceleration(**levers), device, capability, has_torchao=torchao)
    assert problem is not None and refusal in problem and "\n" not in problem


def test_levers_a_device_can_take_pass():
    assert check_acceleration(Acceleration(fp8=True, compile=True), "cuda", (9, 0), has_torchao=True) is None
    assert check_acceleration(Acceleration(offload="group"), "cuda", (8, 6), has_torchao=False) is None
    assert check_acceleration(Acceleration(compile=True), "cpu", None, has_torchao=False) is None


def test_acceleration_settings_are_checked_and_overridden():
    with pytest.raises(InvalidRequest, match="unknown setting 'compiled'; allowed: attention, compile, fp8, offload"):
        parse_acceleration({"compiled": True})
    with pytest.raises(InvalidRequest, match="offload 'disk' is not one of none, model, group"):
        parse_acceleration({"offload": "disk"})
    with pytest.raises(InvalidRequest, match="attention 'flash3' is not one of auto"):
        Acceleration().with_overrides(attention="flash3")
    assert Acceleration(compile=True).with_overrides(offload="model", fp8=None) == Acceleration(
        compile=True, offload="model"
    )
    assert Acceleration(compile=True, offload="group").with_overrides(compile=False, offload="none") == Acceleration()
    assert load_spec("cogvideox-2b").acceleration == Acceleration()  # the YAML's defaults: levers off


@pytest.mark.parametrize(
    ("model", "levers", "refusal"),
    [
        ("i2vgen-xl", {"compile": True}, "i2vgen-xl's denoiser has no repeated transformer blocks to compile"),
        ("i2vgen-xl", {"fp8": True}, "fp8's per-row scales need bf16 weights and this model runs in float16"),
        ("tiny", {"attention": "flash"}, "attention flash takes fp16 or bf16 and this model runs in float32"),
        ("tiny", {"attention": "efficient"}, "attention efficient is not in this PyTorch for cpu"),
    ],
)
def test_levers_the_model_cannot_take_are_refused(model, levers, refusal):
    """What the model itself rules out (its blocks, its dtype), and a kernel this PyTorch lacks for
    the device, before any weights load (`lever_problem`, which the driver, the Ray executor, Serve
    and each denoiser stage ask)."""
    spec = replace(load_spec(model), acceleration=Acceleration(**levers))
    problem = lever_problem(spec, "cpu", None, available={"default", "math"})
    assert problem is not None and refusal in problem


def test_offload_is_refused_for_a_denoiser_group():
    with pytest.raises(InvalidRequest, match="a denoiser group of 2 ranks splits the work instead: drop --offload"):
        prepare("tiny", "a red circle", workers=2, acceleration={"offload": "model"})


@pytest.mark.parametrize("flag", [["--offload", "model"], ["--fp8"]])
def test_the_cli_refuses_a_lever_before_loading(flag, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "generate", "--model", "tiny", "--prompt", "a cat", "--local",
         "--output", str(tmp_path / "v.mp4"), *flag],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # this machine's device is the CPU, as here
    )  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("framecast: error:")]
    assert len(errors) == 1 and "drop --" in errors[0], done.stderr
    assert not (tmp_path / "v.mp4").exists()


def test_the_attention_kernel_context_steers_sdpa():
    """Within `attention_kernel("math")`, SDPA runs PyTorch's math kernel (the one the CPU's flash
    kernel is checked against); outside it, PyTorch's own choice: the same values within 1e-5."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=generator) for _ in range(3))
    with attention_kernel("math"):
        steered = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    reference = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
    torch.testing.assert_close(steered, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v), steered, rtol=0, atol=1e-5)


def test_the_ring_log_sum_exp_kernels_agree():
    """The CPU ring kernel (PyTorch's CPU flash) against the fp32 scores, as each CUDA kernel is
    checked against the same on the GPU by bench/gpu.py."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=generator) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, "default")
    out_math, lse_math = attention_with_lse(q, k, v, "math")
    assert torch.allclose(out, out_math, atol=1e-5) and torch.allclose(lse, lse_math, atol=1e-5)
    assert lse.shape == (2, 3, 37)


def _job(name: str):
    spec = load_spec(name)
    r = build_request(spec, "a red circle", steps=3)
    width = spec.components["text_encoder"].config.get("d_model") or spec.components["text_encoder"].config.get(
        "hidden_size"
    )
    generator = torch.Generator().manual_seed(3)
    shape = (1, family_for(spec).max_text_tokens, width)
    conditioning = Conditioning(prompt=torch.randn(shape, generator=generator),
                                negative=torch.randn(shape, generator=generator))  # fmt: skip
    return spec, resolve_weights(spec), r, conditioning


@pytest.mark.parametrize("name", ["tiny", "tiny-wan"])
def test_regional_compile_equals_eager_on_the_cpu(name):
    """`--compile` (inductor on the CPU, fp32): the latents equal eager's within 1e-5, and the
    first step of the first job holds the compile, paid once: the second job's first step not."""
    spec, weights, r, conditioning = _job(name)
    eager = DenoiserStage(spec, weights).denoise(conditioning, r)
    compiled_stage = DenoiserStage(replace(spec, acceleration=Acceleration(compile=True)), weights)
    compiled = compiled_stage.denoise(conditioning, r)
    first = compiled_stage.last_run_stats()
    again = compiled_stage.denoise(conditioning, r)
    second = compiled_stage.last_run_stats()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
    network = family_for(spec).denoiser_networks(compiled_stage.network)[0]
    blocks = [m for m in network.modules() if type(m).__name__ in (network._repeated_blocks or ())]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)  # each block compiled
    assert first["compiled_blocks"] == len(blocks)  # and the stage says so
    fused = [m for m in network.modules() if getattr(m, "fused_projections", False)]
    assert bool(fused) == (name == "tiny")  # CogVideoX's QKV fused first (diffusers offers it); Wan's not
    assert all(m.to_q is None and m.to_qkv is not None for m in fused)  # the separate ones dropped
    assert first["first_step_s"] > 5 * first["step_s"]  # the compile
    assert second["first_step_s"] < first["first_step_s"] / 5  # not again


def test_the_decoder_tiles_when_the_untiled_decode_would_not_fit(tiny_spec, tiny_weights, monkeypatch):
    """An untiled plan the device's free memory cannot take is decoded in the default tiles, as
    `vae.enable_tiling()` would, and the stage says so; the estimate is bytes per output pixel."""
    spec, weights = tiny_spec, tiny_weights
    latents = DenoiserStage(spec, weights).denoise(*_job("tiny")[3:], build_request(spec, "a", steps=2))
    r = build_request(spec, "a", steps=2)
    decoder = DecoderStage(spec, weights)
    untiled = plan_decode(spec, r.height, r.width, 1, None, None)
    tiled = plan_decode(spec, r.height, r.width, 1, family_for(spec).default_tile_size, None)
    whole = decoder.decode_float(latents, untiled)
    assert decoder.last_run_stats()["tiled_for_memory"] == 0.0
    room = 0.9 * family_for(spec).untiled_decode_bytes(family_for(spec).vae_input(decoder.vae, latents))
    monkeypatch.setattr("stages.decoder.free_memory_bytes", lambda device: room)  # too little for the estimate
    by_memory = decoder.decode_float(latents, untiled)
    assert decoder.last_run_stats()["tiled_for_memory"] == 1.0
    assert torch.equal(by_memory, decoder.decode_float(latents, tiled)) and not torch.equal(by_memory, whole)


def test_the_untiled_decode_estimate_is_per_output_pixel():
    family = family_for(load_spec("cogvideox-2b"))
    z = torch.zeros(1, 16, 13, 60, 90, dtype=torch.bfloat16)  # 49 frames of 480x720
    assert family.untiled_decode_bytes(z) == 49 * 480 * 720 * family.untiled_decode_bytes_per_pixel
    assert family.untiled_decode_bytes(z.float()) == 2 * family.untiled_decode_bytes(z)


def test_the_gpu_bench_runs_on_the_cpu(tmp_path):
    """bench/gpu.py --model tiny --device cpu: every section runs or says why not, and the table
    has its columns (no timing is checked)."""
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--model", "tiny", "--device", "cpu", "--steps", "2", "--timing-steps", "2",
         "--no-ray", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "gpu.md").read_text().splitlines()
    assert table[2] == "| model | section | what | stock | framecast | framecast / stock | note |"
    result = json.loads((tmp_path / "gpu.json").read_text())
    sections = result["results"]["tiny"]
    assert not [name for name, s in sections.items() if "error" in s], sections
    assert "refused" in sections["fp8"] and "refused" in sections["offload"]["model"]  # no CUDA here
    assert sections["denoise"]["max_abs_latent_difference"] == 0.0  # framecast equals stock
    assert sections["compile"]["max_abs_latent_vs_eager"] <= 1e-5
    assert {row["section"] for row in result["rows"]} >= {"denoise", "decode", "attention", "e2e", "compile"}
    assert all(set(row) == set(table[2].strip("| ").split(" | ")) for row in result["rows"])


def test_the_ray_executor_checks_the_clusters_devices(ray_session, tiny_spec):
    """Through Ray the driver cannot see the actors' devices: before any actor loads weights,
    the levers are checked against the cluster's (here CPUs only)."""
    from cluster.executor import check_levers_on_cluster

    offloaded = replace(tiny_spec, acceleration=Acceleration(offload="model"))
    with pytest.raises(InvalidRequest, match="offload model moves weights between host memory and a CUDA GPU"):
        check_levers_on_cluster(offloaded, ParallelLayout())
    check_levers_on_cluster(tiny_spec, ParallelLayout())  # no lever: nothing to refuse


@pytest.mark.ranks(2)
@pytest.mark.parametrize("layout", [ParallelLayout(ulysses=2), ParallelLayout(ring=2)], ids=str)
@pytest.mark.parametrize("name", ["tiny", "tiny-wan"])
def test_a_compiled_group_equals_one_eager_process(executors, name, layout):
    """`--compile` in a denoiser group (Ulysses 2, ring 2): the blocks compile around the
    group's collectives and the ring's log-sum-exp kernel (graph breaks), and the latents equal
    one eager process's within 1e-5 (fp32)."""
    spec, weights, r, conditioning = _job(name)
    eager_stage = DenoiserStage(spec, weights)
    eager = eager_stage.denoise(conditioning, r)
    networks = family_for(spec).denoiser_networks(eager_stage.network)
    blocks = sum(type(m).__name__ in family_for(spec).repeated_blocks for n in networks for m in n.modules())
    compiled_spec = replace(spec, acceleration=Acceleration(compile=True))
    group = executors.get(compiled_spec, weights, layout, encoder=False)
    call = group.call("denoise", "denoise", conditioning, r)
    latents = group.get(call)
    torch.testing.assert_close(latents, eager, rtol=0, atol=1e-5)
    assert eager_stage.last_run_stats()["compiled_blocks"] == 0
    assert blocks and [rank["compiled_blocks"] for rank in group.reports(call)] == [blocks, blocks]  # each rank's
