"""Context-parallel denoising: a group of N Ray actors (gloo on CPU) denoises exactly as one process.

The anchor: for tiny CogVideoX models (sin-cos and 3D RoPE, CogVideoX 1.0 and 1.5, head counts
that some degrees do not divide, latent frames that do not divide by the shard count), every
rank of an N-rank group ends with the single-process latents (fp32, max abs difference <= 1e-5)
for N = 2 and 4 and every mode: Ulysses, ring, hybrid and CFG-parallel.
"""

import pytest
import torch
from conftest import variant

from cluster.executor import DenoiserGroup
from cluster.runtime import plan_resources
from stages.context_parallel import (
    ParallelLayout,
    SequenceShards,
    attention_with_lse,
    choose_layout,
    merge_partial,
    valid_layouts,
)
from stages.denoiser import DenoiserStage
from stages.encoder import EncoderStage
from stages.errors import InvalidRequest
from stages.request import build_request
from stages.weights import resolve_weights

TOL = 1e-5


# -- layouts ---------------------------------------------------------------------------------


def test_auto_layout_prefers_cfg_then_ulysses_then_ring():
    # CogVideoX-2b: 30 heads, so Ulysses 4 is out; 8 workers -> CFG 2 x Ulysses 2 x ring 2.
    assert choose_layout(30, guidance=True, workers=8) == ParallelLayout(cfg=2, ulysses=2, ring=2)
    assert choose_layout(48, guidance=True, workers=8) == ParallelLayout(cfg=2, ulysses=4, ring=1)  # 5b
    assert choose_layout(48, guidance=False, workers=8) == ParallelLayout(cfg=1, ulysses=8, ring=1)
    assert choose_layout(30, guidance=False, workers=7) == ParallelLayout(cfg=1, ulysses=1, ring=7)
    assert choose_layout(30, guidance=True) == ParallelLayout()


def test_explicit_layouts_and_filled_in_degrees():
    assert choose_layout(30, True, ulysses=2, ring=2, cfg_parallel=True) == ParallelLayout(2, 2, 2)
    assert choose_layout(30, True, ulysses=2, ring=2) == ParallelLayout(1, 2, 2)  # no --workers: just these
    assert choose_layout(30, True, workers=4, ring=4) == ParallelLayout(1, 1, 4)
    assert choose_layout(30, True, workers=4, cfg_parallel=True) == ParallelLayout(2, 2, 1)  # the rest filled in
    assert choose_layout(30, True, workers=8, ring=2) == ParallelLayout(2, 2, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(workers=8, ulysses=4, ring=2), r"^invalid parallel layout cfg1xulysses4xring2: the Ulysses degree "
         r"must divide the model's 30 attention heads; valid layouts for 8 workers: cfg2xulysses2xring2, "
         r"cfg2xulysses1xring4, cfg1xulysses2xring4, cfg1xulysses1xring8$"),
        (dict(workers=6, ring=4), r"^invalid parallel layout cfg1xulysses1xring4: no layout of 6 ranks has ring 4; "
         r"valid layouts for 6 workers: cfg2xulysses3xring1, "),
        (dict(workers=0), r"^workers must be at least 1 \(got 0\)$"),
        (dict(ulysses=0), r"^ulysses must be at least 1 \(got 0\)$"),
        (dict(workers=4, ring=-2), r"^ring must be at least 1 \(got -2\)$"),
    ],
)  # fmt: skip
def test_invalid_layouts_are_clear_errors_that_list_valid_ones(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        choose_layout(30, True, **kwargs)


def test_cfg_parallel_needs_guidance():
    with pytest.raises(InvalidRequest, match="CFG-parallel needs classifier-free guidance"):
        choose_layout(30, False, cfg_parallel=True)
    assert all(layout.cfg == 1 for layout in valid_layouts(4, 30, guidance=False))


# -- the pieces ------------------------------------------------------------------------------


def test_shards_are_balanced_and_padding_is_never_a_key():
    shards = SequenceShards.balanced(5, 4, tokens_per_slice=3)  # 5 latent frames over 4 ranks
    assert shards.counts == (2, 1, 1, 1) and shards.padded == 2 and shards.starts == (0, 2, 3, 4)
    # Blocks of shards 1 and 2 are padded to 6 tokens each; 3 of each are real.
    assert shards.valid_keys([1, 2], torch.device("cpu")).tolist() == [0, 1, 2, 6, 7, 8]
    keys = torch.arange(12.0).view(1, 1, 12, 1)
    assert shards.real_keys(keys, [1, 2]).flatten().tolist() == [0, 1, 2, 6, 7, 8]
    full_block = keys[:, :, :6]
    assert shards.real_keys(full_block, [0]) is full_block  # no padding: used as it is, not copied
    empty = SequenceShards.balanced(3, 4, tokens_per_slice=2)
    assert empty.counts == (1, 1, 1, 0) and empty.valid_keys([3], torch.device("cpu")).numel() == 0


def test_attention_blocks_merged_by_log_sum_exp_equal_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (10, 25, 25))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = lse = None
    for block in (slice(0, 7), slice(7, 8), slice(8, 25)):  # uneven blocks, merged in any order
        out, lse = merge_partial(out, lse, *attention_with_lse(q, k[:, :, block], v[:, :, block]))
    assert (out - full).abs().max() <= 1e-6
    scores = q @ k.transpose(-1, -2) / 8**0.5
    assert (lse - torch.logsumexp(scores, -1)).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks the CUDA kernels that return the lse")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_attention_with_lse(dtype):
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", dtype=dtype) for n in (300, 500, 500))
    out, lse = attention_with_lse(q, k, v)
    scores = (q.float() @ k.float().transpose(-1, -2)) / 8
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - torch.softmax(scores, -1) @ v.float()).abs().max() <= tolerance
    assert (lse - torch.logsumexp(scores, -1)).abs().max() <= 1e-3


# -- exactness through Ray actors --------------------------------------------------------------

MODELS = {
    # CogVideoX-2b-like: sin-cos positions, 6 heads (Ulysses 4 is invalid, like 2b's 30 heads).
    "sincos-h6": dict(transformer={"num_attention_heads": 6, "attention_head_dim": 8}),
    # CogVideoX-5b-like: 3D RoPE and the DPM scheduler (which draws noise every step).
    "rope-h4": dict(
        transformer={"num_attention_heads": 4, "attention_head_dim": 16, "use_rotary_positional_embeddings": True},
        scheduler="diffusers.CogVideoXDPMScheduler",
        scheduler_config={"snr_shift_scale": 1.0},
    ),
    # CogVideoX 1.5-like: RoPE and frame pairs as the temporal unit (patch_size_t 2).
    "v15-h4": dict(
        transformer={
            "num_attention_heads": 4,
            "attention_head_dim": 16,
            "use_rotary_positional_embeddings": True,
            "patch_size_t": 2,
            "patch_bias": False,
        }
    ),
}

# (model, frames, layout). 9 frames are 3 latent frames, 17 are 5: neither divides by 2 or 4;
# ring4 / ulysses4 over 3 latent frames leave one rank with padding only. Largest groups first:
# the ranks of one group serve every smaller one after it (ReusedGroups).
CASES = [
    ("sincos-h6", 17, ParallelLayout(cfg=2, ulysses=2, ring=2)),  # all three at once, as 2b on 8 GPUs
    ("sincos-h6", 9, ParallelLayout(ring=4)),
    ("sincos-h6", 17, ParallelLayout(ulysses=2, ring=2)),
    ("sincos-h6", 9, ParallelLayout(cfg=2, ring=2)),
    ("rope-h4", 9, ParallelLayout(ulysses=4)),
    ("rope-h4", 17, ParallelLayout(cfg=2, ulysses=2)),
    ("rope-h4", 17, ParallelLayout(ulysses=2, ring=2)),
    ("v15-h4", 17, ParallelLayout(ulysses=2, ring=2)),
    ("v15-h4", 9, ParallelLayout(cfg=2, ring=2)),
    ("sincos-h6", 9, ParallelLayout(ulysses=2)),
    ("sincos-h6", 9, ParallelLayout(ring=2)),
    ("sincos-h6", 17, ParallelLayout(cfg=2)),
    ("rope-h4", 17, ParallelLayout(ulysses=2)),
    ("rope-h4", 9, ParallelLayout(ring=2)),
    ("rope-h4", 9, ParallelLayout(cfg=2)),
]


@pytest.fixture(scope="module")
def reference(tiny_spec):
    """Per (model, frames): the spec, weights, request, prompt embeddings and single-process latents."""
    cache = {}

    def get(model: str, frames: int):
        if (model, frames) not in cache:
            spec = variant(tiny_spec, f"tiny-{model}", **MODELS[model])
            weights = resolve_weights(spec)
            r = build_request(spec, "a fox in the snow", steps=3, guidance_scale=6.0, seed=11, num_frames=frames)
            embeddings = EncoderStage(spec, weights).encode(r.prompt, r.negative_prompt, True)
            latents = DenoiserStage(spec, weights).denoise(embeddings, r)
            cache[model, frames] = spec, weights, r, embeddings, latents
        return cache[model, frames]

    return get


class ReusedGroups:
    """One denoiser group, reused by every case: each case builds its own DenoiserStage (its
    model, its layout, its process subgroups) on the group's ranks. A case of fewer ranks than
    the group has takes its first ranks, which leave the group's process group and form one of
    their own (the other ranks go). Starting a rank's process (importing torch, diffusers and
    DeepSpeed) is most of a case's time, and no case depends on a fresh process: the cases come
    largest first, so a 2x2x2 group starts 8 processes for all of them, not 2 + 4 + 8. A case
    that fails discards the group, whose ranks may be stuck in a collective."""

    def __init__(self, ray_session):
        self.ray, self.group = ray_session, None

    def get(self, spec, weights, layout: ParallelLayout) -> DenoiserGroup:
        size = layout.world_size
        if self.group is not None and size < self.group.size:
            self.group.shrink(size)
        if self.group is not None and self.group.size == size:
            self.ray.get(self.group.rebuild(spec, weights, layout))
            return self.group
        self.discard()
        plan = plan_resources(workers=size)
        self.group = DenoiserGroup(spec, weights, layout, plan.denoise, plan.bundle)
        self.ray.get(self.group.start())
        return self.group

    def discard(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


@pytest.fixture(scope="class")
def groups(ray_session):
    reused = ReusedGroups(ray_session)
    yield reused
    reused.discard()


class TestGroups:
    @pytest.mark.parametrize("model, frames, layout", CASES, ids=[f"{m}-{f}f-{lay}" for m, f, lay in CASES])
    def test_group_equals_single_process(self, ray_session, reference, groups, model, frames, layout):
        try:
            check_group(ray_session, reference, groups, model, frames, layout)
        except BaseException:
            groups.discard()
            raise


def check_group(ray_session, reference, groups, model, frames, layout):
    spec, weights, r, embeddings, expected = reference(model, frames)
    group = groups.get(spec, weights, layout)
    results = ray_session.get([actor.call.remote("denoise", embeddings, r)[0] for actor in group.actors])
    stats = ray_session.get([actor.call.remote("last_run_stats")[0] for actor in group.actors])

    for rank, latents in enumerate(results):  # every rank ends with the same, exact latents
        assert latents.shape == expected.shape
        assert (latents - expected).abs().max().item() <= TOL, f"rank {rank}"

    # Each rank held only its shard of the video tokens (padded to the largest shard).
    transformer = spec.components["transformer"].config
    p, p_t = transformer["patch_size"], transformer.get("patch_size_t") or 1
    latent_frames = (frames - 1) // 4 + 1
    slices = -(-latent_frames // p_t)  # 1.5 pads odd latent frames to whole pairs
    tokens_per_slice = (r.height // 8 // p) * (r.width // 8 // p)
    shard_tokens = -(-slices // layout.sequence_degree) * tokens_per_slice
    assert [s["video_tokens"] for s in stats] == [shard_tokens] * layout.world_size
    assert all(s["peak_memory_mib"] > 0 for s in stats)


@pytest.mark.ranks(2)
def test_ray_executor_with_a_group_equals_local_frames(executors, tiny_spec, tiny_weights):
    """The whole chain (encoder actor -> Ulysses group -> decoder actor) gives the in-process frames."""
    from cluster.executor import LocalExecutor

    r = build_request(tiny_spec, "a red fox", steps=2, seed=9, num_frames=17)

    def frames(executor):
        encoded = executor.call("encode", "encode", r.prompt, r.negative_prompt, True)
        denoised = executor.call("denoise", "denoise", encoded, r)
        decoded = executor.call("decode", "decode_float", denoised)
        frames = executor.get(decoded)
        handed_on.append((encoded.deliveries, denoised.deliveries))  # before the check below fetches them
        handed_on.append(executor.gather(denoised)[1:])
        return frames

    handed_on = []
    group, local = executors.get(tiny_spec, tiny_weights, ParallelLayout(ulysses=2)), None
    try:
        local = LocalExecutor(tiny_spec, tiny_weights)
        assert (frames(group) - frames(local)).abs().max() <= TOL
    finally:
        if local is not None:
            local.close()
    assert all(group.devices()[stage] == "cpu" for stage in ("encode", "denoise", "decode"))
    # Embeddings went to both ranks; only rank 0 kept its latents, which went to the decoder
    # once; rank 1 dropped its copy instead of storing it.
    assert handed_on[0] == (2, 1) and handed_on[1] == [None]
