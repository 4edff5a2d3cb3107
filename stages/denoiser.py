"""Denoising: the one loop, around the model family's step (`stages.families`).

The family's adapter holds one job's denoising (`Denoising`): its initial latents, timesteps
and scheduler, and one step (the network's prediction, guidance, the scheduler's step), each as
its diffusers pipeline's `__call__` does them, so that the latents are equal for the same
weights, seed and settings (the equality tests hold it to that). This stage runs the loop
itself rather than calling the pipeline because framecast needs the loop: a progress callback
per step, and the forward pass split over a denoiser group.

With a `ParallelLayout` of more than one rank, this stage is one rank of a denoiser group: every
rank runs this same loop on the whole (small) latent tensor, so the scheduler steps and their
random draws are identical everywhere, while the forward pass, where the memory and the time go,
is split as the family says (`ModelFamily.split_over`) and gathered back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch

from stages.acceleration import (
    attention_kernel,
    available_kernels,
    check_acceleration,
    choose_attention,
    prepare_network,
)
from stages.cache import StepCache, parse_cache
from stages.context_parallel import ContextParallel, ParallelLayout, choose_layout
from stages.device import PeakMemory, cuda_capability, default_device, describe
from stages.errors import InvalidRequest
from stages.families import Conditioning, family_for
from stages.models import ModelSpec
from stages.settings import GenerationRequest

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


class DenoiserStage:
    def __init__(
        self,
        spec: ModelSpec,
        weights: Path,
        device: torch.device | None = None,
        layout: ParallelLayout | None = None,
        collective_timeout_s: float | None = None,
    ):
        self.spec = spec
        self.device = device or default_device()
        self.family = family_for(spec)
        acceleration = spec.acceleration
        capability = cuda_capability(self.device)
        ranks = layout.world_size if layout is not None else 1
        kernels = available_kernels(self.device)
        problem = lever_problem(spec, self.device.type, capability, kernels, ranks)
        if problem:  # before any weights load
            raise InvalidRequest(problem)
        # Offloaded weights live in host memory: they are loaded there, not on the GPU first.
        self.network = self.family.load_denoiser(weights, torch.device("cpu") if acceleration.offload else self.device)
        self.attention = choose_attention(acceleration.attention, self.device.type, capability, spec.torch_dtype(),
                                          kernels)  # fmt: skip
        self.family.use_attention(self.network, self.attention, self.device)
        # The weights' scheduler config; a request may name another scheduler class built from it.
        self.scheduler_config = spec.components["scheduler"].load_class().load_config(weights, subfolder="scheduler")
        self.context = None
        if layout is not None and layout.world_size > 1:
            timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
            self.context = ContextParallel(layout, timeout, self.attention)  # the ring's log-sum-exp kernel too
            self.family.split_over(self.network, self.context)
        if acceleration.compile and self.context is None:
            self.family.fuse_projections(self.network)
        # After the group's processors and hooks: the compiled blocks trace what they call.
        networks = self.family.denoiser_networks(self.network)
        self._offloads = prepare_network(networks, acceleration, self.device, self.family.repeated_blocks)
        # The blocks that run compiled (nn.Module.compile sets `_compiled_call_impl`), in each job's figures.
        self._compiled_blocks = sum(getattr(m, "_compiled_call_impl", None) is not None
                                    for network in networks for m in network.modules())  # fmt: skip
        reduce = real = None
        if self.context is not None:  # a cache decides over what one process's forward call holds
            whole = self.family.branches_in_one_call
            reduce = self.context.sum_over_group if whole else self.context.sum_over_branch
            real = self.context.real_tokens
        self.cache = StepCache(networks, reduce, real)
        self._peak_memory = PeakMemory(self.device)
        self._last_run: dict[str, float] = {}

    def describe(self) -> str:
        return describe(self.device)

    def last_run_stats(self) -> dict[str, float]:
        """This rank's figures for its last `denoise`: peak memory (MiB), video tokens it held, the
        calls of the modules a cache wraps and how many of them computed (0 without a cache), the
        blocks that ran compiled, and the first step's seconds beside the mean of the others (the
        first of a compiled stage's first job of a shape includes the compile)."""
        return dict(self._last_run)

    @torch.no_grad()
    def denoise(
        self, conditioning: Conditioning, r: GenerationRequest, on_step: StepCallback | None = None
    ) -> torch.Tensor:
        """The denoised latents on the CPU, in the layout the family's decoder takes."""
        scheduler_class = self.spec.scheduler_class(r.scheduler or self.spec.scheduler_name(None))
        scheduler = scheduler_class.from_config(self.scheduler_config)  # fresh state per job
        self.cache.prepare(parse_cache(r.cache, self.family.cache_kinds, self.spec.name))
        run = self.family.start(self.network, scheduler, conditioning, r, self.context, self.device)
        self._peak_memory.reset()
        steps = len(run.timesteps)
        values = run.timesteps.tolist()  # once per job: PAB compares it at every attention call
        start = first_done = time.perf_counter()
        with attention_kernel(self.attention):
            for i, t in enumerate(run.timesteps):
                self.cache.timestep = values[i]  # PAB's timestep range, as the pipeline's current_timestep
                run.step(i, t)
                if i == 0:  # the first step's kernels timed apart (a compile's first call); no sync after
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    first_done = time.perf_counter()
                if on_step is not None:
                    on_step(i + 1, steps)
        latents = run.result()  # on the CPU: waits for the last step's kernels
        rest_s = time.perf_counter() - first_done
        for offload in self._offloads:
            offload.after_job()
        self._last_run = {"peak_memory_mib": self._peak_memory.peak_mib(), "video_tokens": run.video_tokens(),
                          "cache_calls": self.cache.calls, "cache_computed": self.cache.computed,
                          "compiled_blocks": float(self._compiled_blocks),
                          "first_step_s": first_done - start if steps else 0.0,
                          "step_s": rest_s / (steps - 1) if steps > 1 else 0.0}  # fmt: skip
        return latents


def lever_problem(
    spec: ModelSpec,
    device_type: str | None,
    capability: tuple[int, int] | None = None,
    available: set[str] | None = None,
    ranks: int = 1,
) -> str | None:
    """Why the denoiser of `spec` cannot take its levers (`spec.acceleration`) on this device and
    group (one line), or None; what is not known (None) is not checked (`check_acceleration`)."""
    acceleration, family = spec.acceleration, family_for(spec)
    if acceleration.compile and not family.repeated_blocks:
        return f"{spec.name}'s denoiser has no repeated transformer blocks to compile: drop --compile"
    if acceleration.offload and ranks > 1:
        return (f"offload keeps one GPU's weights in host memory; a denoiser group of {ranks} ranks splits the "
                f"work instead: drop --offload or run one worker")  # fmt: skip
    return check_acceleration(acceleration, device_type, capability, available=available, dtype=spec.dtype)


def plan_layout(
    spec: ModelSpec,
    r: GenerationRequest,
    workers: int | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    cfg_parallel: bool = False,
) -> ParallelLayout:
    """The denoiser group's layout for this model and request (see `choose_layout`)."""
    family = family_for(spec)
    layout = choose_layout(
        family.heads, r.do_classifier_free_guidance, workers, ulysses, ring, cfg_parallel, family.splits_sequence
    )
    problem = family.check_layout(r, layout)
    if problem:
        raise InvalidRequest(f"invalid parallel layout {layout} for this request: {problem}")
    return layout


def plan_serving_layout(
    spec: ModelSpec, workers: int, ulysses: int | None = None, ring: int | None = None
) -> ParallelLayout:
    """A layout that runs every request, guided or not, for a denoiser group built once and kept
    (a Serve replica's): without CFG-parallel, which needs two guidance branches."""
    family = family_for(spec)
    if not family.splits_sequence and workers > 1:
        raise InvalidRequest(
            f"{spec.name}'s denoiser does not split its sequence over workers, and a served denoiser group runs "
            f"no CFG-parallel (a request may turn guidance off): serve it with workers 1"
        )
    return choose_layout(family.heads, False, workers, ulysses, ring, cfg_parallel=False)
