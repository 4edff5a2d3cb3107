"""diffusers' own context parallelism (`enable_parallelism`) over a framecast denoiser group.

A family whose transformer has a diffusers context-parallel plan (`_cp_plan`, e.g. Wan) is split
by diffusers, not by framecast's attention processor: each rank runs the whole forward pass on
the whole input, and diffusers' hooks shard the sequence, run Ulysses and ring attention, and
gather the output. framecast gives it a device mesh of the group's ranks in its own rank order.

Two shims make diffusers 0.42's context parallelism run on CPU/gloo, as framecast's tests run it
(why, in detail: docs/context-parallel.md, "Wan through diffusers' own context parallelism"):
- `enable_parallelism` picks a rank's device as rank % torch.accelerator.device_count(), which
  divides by zero on a machine without an accelerator; while it runs, the count is at least 1
  (the mesh decides the devices anyway).
- Ring attention merges each key/value block's partial output by its log-sum-exp (LSE), and
  diffusers' native (SDPA) backend, the only one that runs on CPU, refuses `return_lse=True`.
  On CPU its context-parallel path is given a forward op that asks PyTorch's CPU flash
  attention kernel (the kernel SDPA itself runs for these inputs) for the output and the LSE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from stages.context_parallel import ParallelLayout


def enable_context_parallelism(networks: Sequence[torch.nn.Module], layout: ParallelLayout) -> None:
    """diffusers' context parallelism on `networks` (a model's transformers on this device), one
    rank of a group with `layout`: a device mesh (cfg, ring, ulysses) in framecast's rank order, of
    which diffusers takes the ring and Ulysses dimensions, so that each guidance branch splits its
    sequence within its own ranks. One mesh for all of them: its process groups are made once."""
    if layout.sequence_degree == 1:
        return  # CFG-parallel alone: each rank runs its branch whole
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    device_type = networks[0].device.type
    shape, names = (layout.cfg, layout.ring, layout.ulysses), ("cfg", "ring", "ulysses")
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    if device_type == "cpu":
        _give_native_attention_an_lse_on_cpu()
    for network in networks:
        config = ContextParallelConfig(ring_degree=layout.ring, ulysses_degree=layout.ulysses, mesh=mesh)
        with _an_accelerator_counted():
            network.enable_parallelism(config=config)


@contextlib.contextmanager
def hooks_inside_context_parallelism(network: torch.nn.Module) -> Iterator[None]:
    """Hooks registered meanwhile on `network`'s modules (a step cache's) run inside diffusers'
    context-parallel hooks, as if registered before them, and see the rank's shard. diffusers
    wraps each hook around those registered earlier, so a cache enabled after `enable_parallelism`
    would see a block's whole input (split only inside) beside its shard of the output: the
    parallel hooks are taken off and put back over it."""
    config = getattr(network, "_parallel_config", None)
    parallel = None if config is None else config.context_parallel_config
    if parallel is None:
        yield
        return
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    remove_context_parallel(network, network._cp_plan)
    try:
        yield
    finally:
        apply_context_parallel(network, parallel, network._cp_plan)
        HookRegistry.check_if_exists_or_initialize(network).invalidate_child_registries_cache()


@contextlib.contextmanager
def _an_accelerator_counted() -> Iterator[None]:
    counted = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(1, counted())
    try:
        yield
    finally:
        torch.accelerator.device_count = counted


def _give_native_attention_an_lse_on_cpu() -> None:
    """Replace, in this process, diffusers' registered native backend by one that is the same
    except on the context-parallel path on CPU, where its forward op returns the LSE when asked.
    Everything else (one process, Ulysses, any accelerator) still runs diffusers' own code."""
    from diffusers.models import attention_dispatch as dispatch

    registry, name = dispatch._AttentionBackendRegistry, dispatch.AttentionBackendName.NATIVE
    native = registry._backends[name]
    if getattr(native, "framecast_cpu_lse", False):
        return

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
        if not return_lse:
            return dispatch._native_attention_forward_op(
                ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                _save_ctx=_save_ctx, _parallel_config=_parallel_config,
            )  # fmt: skip
        if enable_gqa:
            raise ValueError("framecast's CPU ring attention does not take grouped-query attention")
        # Inference only: nothing is saved for a backward pass.
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # (B, S, H, D), (B, S, H)

    def native_with_cpu_lse(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False, return_lse=False, _parallel_config=None):  # fmt: skip
        if _parallel_config is None or query.device.type != "cpu" or attn_mask is not None:
            return native(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                          _parallel_config)  # fmt: skip
        return dispatch._templated_context_parallel_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=forward_op, backward_op=dispatch._native_attention_backward_op,
            _parallel_config=_parallel_config,
        )  # fmt: skip

    native_with_cpu_lse.framecast_cpu_lse = True
    registry._backends[name] = native_with_cpu_lse
