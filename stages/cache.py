"""Step caching: diffusers' cache hooks on a denoiser, exact over a denoiser group, and counted.

A cache spec names one of diffusers' caching hooks and its one knob:

    none              no cache (the default)
    fbc:THRESHOLD     FirstBlockCache: reuse the other blocks' residual while the first block's
                      output changed by less than THRESHOLD (relative mean absolute difference)
    pab:N             PyramidAttentionBroadcast: compute the spatial attention every N-th call
                      while the timestep lies in (100, 800), diffusers' default range
    taylorseer:N      TaylorSeer (lite): after 3 full steps, compute every N-th step and predict
                      the output projection in between by a first-order Taylor series

The hooks are diffusers' own (`enable_cache`), applied to the family's denoiser networks. What
framecast adds, and why it is written here:

- **The same decision on every rank.** FirstBlockCache decides per step from the first block's
  residual; a rank of a denoiser group holds only its shard of it (and, CFG-parallel, one
  guidance branch). The head hook's decision is replaced by the same relative difference summed
  over every rank that one process's forward call would hold, so all ranks skip or compute
  together and the group equals one process (which decides by the same sums, over itself).
  PAB and TaylorSeer decide by counting calls and steps, the same on every rank without help.
- **What it skipped.** `StepCache` counts the calls of the modules the hooks wrap (blocks,
  attention layers, the output projection; not the whole network) and those that computed;
  `skipped_fraction` of a group's counts is the share reused or predicted. Summed over the
  ranks it equals one process's, also where each rank runs one guidance branch.

Which kinds a family takes is the family's (`ModelFamily.cache_kinds`); MagCache and FasterCache
are not offered: diffusers has magnitude ratios only for FLUX, and FasterCache approximates the
unconditional branch from a batch holding both, which CFG-parallel splits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stages.diffusers_parallel import hooks_inside_context_parallelism
from stages.errors import InvalidRequest

NONE = "none"
KINDS = {  # kind: (its knob's name, type, as errors say it)
    "fbc": ("THRESHOLD", float, "a number"),
    "pab": ("N", int, "an integer"),
    "taylorseer": ("N", int, "an integer"),
}
# The knob values `framecast tune-cache` tries for each kind: FirstBlockCache's thresholds from
# conservative to eager, PAB's and TaylorSeer's intervals (every N-th call computes).
TUNING_GRID = {"fbc": ("0.05", "0.1", "0.2", "0.3", "0.4", "0.5"), "pab": ("2", "3", "4"),
               "taylorseer": ("2", "3", "4")}  # fmt: skip


@dataclass(frozen=True)
class CacheSpec:
    kind: str  # "none" or a key of KINDS
    value: float | int | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    @property
    def enabled(self) -> bool:
        return self.kind != NONE


def allowed(kinds: Sequence[str]) -> str:
    """The specs a family takes, as a refusal lists them."""
    return ", ".join([NONE, *(f"{k}:{KINDS[k][0]}" for k in kinds)])


def cache_kinds(spec) -> tuple[str, ...]:
    """The cache kinds a model takes besides none (its family's), for front ends that know no family."""
    from stages.families import family_for

    return family_for(spec).cache_kinds


def tuning_specs(spec) -> list[str]:
    """Every spec `framecast tune-cache` tries for a model: its kinds over `TUNING_GRID`."""
    return [f"{kind}:{value}" for kind in cache_kinds(spec) for value in TUNING_GRID[kind]]


def parse_cache(text: str | None, kinds: Sequence[str], model: str) -> CacheSpec:
    """A spec from its text, checked against the kinds `model`'s family takes (one line if not)."""
    if text is not None and not isinstance(text, str):
        raise InvalidRequest(f"cache must be a spec such as fbc:0.1 or none (got {text!r}); {model} takes "
                             f"{allowed(kinds)}")  # fmt: skip
    text = (text or NONE).strip().lower()
    kind, _, value = text.partition(":")
    if kind == NONE and not value:
        return CacheSpec(NONE)
    if kind not in kinds:
        raise InvalidRequest(f"cache {text!r} is not one {model} takes; it takes {allowed(kinds)}")
    name, kind_type, said = KINDS[kind]
    try:
        number = kind_type(value)
    except ValueError:
        raise InvalidRequest(f"cache {text!r}: {kind} takes {kind}:{name}, {said}") from None
    if kind == "fbc" and not 0 < number < 1:
        raise InvalidRequest(f"cache {text!r}: the threshold must lie between 0 and 1 (e.g. fbc:0.05)")
    if kind in ("pab", "taylorseer") and not 2 <= number <= 16:
        raise InvalidRequest(f"cache {text!r}: N must be between 2 and 16 (every N-th call computes)")
    return CacheSpec(kind, number)


def diffusers_config(spec: CacheSpec, timestep: Callable[[], float], dtype: torch.dtype):
    """diffusers' config for `spec`; `timestep` gives the step's timestep (PAB's range)."""
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if spec.kind == "fbc":
        return FirstBlockCacheConfig(threshold=float(spec.value))
    if spec.kind == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(spec.value), current_timestep_callback=timestep
        )
    if spec.kind == "taylorseer":
        # lite: the blocks are skipped and the output projection predicted, for any transformer
        # with a `proj_out`; factors kept in the model's dtype (diffusers' default is bfloat16).
        return TaylorSeerCacheConfig(cache_interval=int(spec.value), use_lite_mode=True, taylor_factors_dtype=dtype)
    raise ValueError(f"no diffusers config for cache {spec}")


def skipped_fraction(counts: Sequence[dict]) -> float:
    """The share of wrapped calls a cache reused, over ranks' `cache_calls` / `cache_computed`."""
    calls = sum(c["cache_calls"] for c in counts)
    return 0.0 if not calls else 1.0 - sum(c["cache_computed"] for c in counts) / calls


def versus_uncached(
    frames, metrics: dict[str, float], uncached_frames, uncached_metrics: dict[str, float]
) -> dict[str, float]:
    """What a cache cost against the same job uncached: `vs_uncached/psnr_y` and `/ssim_y` of the
    frames as made (not the lossy files), the denoising speedup, and the change of every clarity
    and adherence figure both have (`vs_uncached/delta/<figure>`: cached minus uncached)."""
    from stages.clarity import fidelity

    out = {f"vs_uncached/{key}": value for key, value in fidelity(frames, uncached_frames).items()}
    if metrics.get("denoise_s") and uncached_metrics.get("denoise_s"):
        out["vs_uncached/denoise_speedup"] = uncached_metrics["denoise_s"] / metrics["denoise_s"]
    for key, value in metrics.items():
        if key.startswith(("clarity/", "adherence/")) and key in uncached_metrics:
            out[f"vs_uncached/delta/{key}"] = value - uncached_metrics[key]
    return out


# Where diffusers defines the hooks of the kinds above.
CACHE_HOOK_MODULES = frozenset(
    f"diffusers.hooks.{name}" for name in ("first_block_cache", "pyramid_attention_broadcast", "taylorseer_cache")
)

# The relative difference FirstBlockCache compares with its threshold, summed over a group:
# `reduce` sums a tensor over the ranks that one process's forward call holds, and `real`
# keeps this rank's real tokens (a shard may be padded).
Reduce = Callable[[torch.Tensor], torch.Tensor]
RealTokens = Callable[[torch.Tensor], torch.Tensor]


class StepCache:
    """A cache spec on a stage's denoiser networks: applied when a job's spec differs from the
    last, reset before each job, its skipped computations counted."""

    def __init__(self, networks: Sequence[torch.nn.Module], reduce: Reduce | None = None,
                 real: RealTokens | None = None):  # fmt: skip
        self.networks, self.reduce, self.real = list(networks), reduce, real
        self.spec = CacheSpec(NONE)
        self.timestep: float = 0.0  # the current step's timestep, for PAB
        self.calls = self.computed = 0
        self._handles: list = []  # the counting pre-hooks, removed with the cache
        self._wrapped: list = []  # (hook, its own original_forward), restored before diffusers removes it

    def prepare(self, spec: CacheSpec) -> None:
        """Before a job: `spec` on every network, with fresh state and counts."""
        if spec != self.spec:
            for handle in self._handles:
                handle.remove()
            for hook, original in self._wrapped:
                hook.fn_ref.original_forward = original
            self._handles, self._wrapped = [], []
            for network in self.networks:
                with hooks_inside_context_parallelism(network):
                    if network.is_cache_enabled:
                        network.disable_cache()
                    if spec.enabled:
                        network.enable_cache(diffusers_config(spec, lambda: self.timestep, network.dtype))
                if spec.enabled:
                    self._count(network)
                    if spec.kind == "fbc":
                        self._decide_over_group(network)
            self.spec = spec
        if spec.enabled:
            for network in self.networks:
                network._reset_stateful_cache()
        self.calls = self.computed = 0

    def _hooked(self, network: torch.nn.Module):
        """(module, hook) for every cache hook under `network`, the network's own excluded (other
        hooks, such as a family's for context parallelism, are not the cache's)."""
        from diffusers.hooks import HookRegistry

        for module in network.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if module is network or not isinstance(registry, HookRegistry):
                continue
            for hook in registry.hooks.values():
                if type(hook).__module__ in CACHE_HOOK_MODULES and hook.fn_ref.original_forward is not None:
                    yield module, hook

    def _count(self, network: torch.nn.Module) -> None:
        """Every call of a hooked module (torch's pre-hook sees all), and those the hook let
        through to the module's own forward (the computed ones)."""

        def called(*_):
            self.calls += 1

        for module, hook in self._hooked(network):
            self._handles.append(module.register_forward_pre_hook(called))
            original = hook.fn_ref.original_forward

            @functools.wraps(original)
            def computed(*args, _original=original, **kwargs):
                self.computed += 1
                return _original(*args, **kwargs)

            hook.fn_ref.original_forward = computed
            self._wrapped.append((hook, original))

    def _decide_over_group(self, network: torch.nn.Module) -> None:
        """FirstBlockCache's head hook decides from the residual summed over the group (see the
        module's docstring): diffusers' mean |r - r_prev| / mean |r_prev|, as sums accumulated in
        float64.
        One process decides by the same formula (its group is itself), so that every layout
        decides alike in any dtype; diffusers' own means, in the model's dtype (bfloat16's 3
        digits), could tip a step that lies that close to the threshold the other way."""
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        reduce, real = self.reduce or (lambda x: x), self.real or (lambda x: x)
        for _, hook in self._hooked(network):
            if not isinstance(hook, FBCHeadBlockHook):
                continue

            @torch.compiler.disable  # as diffusers' own: a data-dependent decision, outside a compiled block
            def should_compute(residual: torch.Tensor, _hook=hook) -> bool:
                state = _hook.state_manager.get_state()
                if state.head_block_residual is None:
                    return True
                previous = real(state.head_block_residual)
                change = (real(residual) - previous).abs().sum(dtype=torch.float64)  # no float64 copies
                sums = reduce(torch.stack([change, previous.abs().sum(dtype=torch.float64)]))
                return (sums[0] / sums[1]).item() > _hook.threshold

            hook._should_compute_remaining_blocks = should_compute
