"""Context parallelism: one denoising forward pass spread over a group of ranks, exactly.

The video token sequence is split along its temporal axis (whole latent frames, or whole
frame pairs for CogVideoX 1.5) into one shard per rank. Everything in a CogVideoX block except
attention works token by token, so only attention has to see across shards. It does so in one
of these ways, which compose:

- **Ulysses** (DeepSpeed-Ulysses' `DistributedAttention`): an all-to-all trades the sequence
  split for a head split, so each rank attends over the whole sequence for `heads / ulysses`
  heads, and a second all-to-all trades back. The degree must divide the head count.
- **ring**: keys and values travel around the ring of ranks one block per hop while each rank
  attends its own queries to the block it holds; the partial results are merged exactly with
  their log-sum-exp. Any degree works.
- **hybrid**: Ulysses inside groups of `ulysses` ranks, ring across those groups (USP).
- **CFG-parallel**: the unconditional and conditional branches run on two halves of the group.

Text tokens are replicated: every rank holds all of them, they count once as keys (they are
part of the rank's own first block, never passed around) and every rank computes their
queries, so the text stream needs no traffic. (With ring attention each rank merges the blocks
in its own order, so the ranks' copies of the text stream agree up to rounding, not bit for bit;
the video output is exact to the same rounding, which the tests bound.)

Shards are padded to equal length when the frames do not divide by the shard count. The padding
tokens are never used as keys (they are dropped before attention) and their outputs are
discarded when the shards are gathered, so the result is exact.

This file knows joint text + video attention, and no model: a family's attention processor
(`stages.families`) hands it the projected queries, keys and values. It knows nothing about Ray;
the process group it runs over is set up by `cluster/`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stages.errors import InvalidRequest


@dataclass(frozen=True)
class ParallelLayout:
    """How a denoiser group of `world_size` ranks divides one forward pass.

    Ranks are numbered branch-major: rank = branch * (ring * ulysses) + ring_index * ulysses +
    ulysses_index, so a Ulysses group is `ulysses` consecutive ranks (on one node when packed)
    and the ring runs across those groups.
    """

    cfg: int = 1  # 2: the two guidance branches on two halves of the group
    ulysses: int = 1
    ring: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.ring

    @property
    def sequence_degree(self) -> int:
        """How many shards the video sequence is split into (per guidance branch)."""
        return self.ulysses * self.ring

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(guidance branch, ring index, Ulysses index) of a rank."""
        branch, within = divmod(rank, self.sequence_degree)
        ring_index, ulysses_index = divmod(within, self.ulysses)
        return branch, ring_index, ulysses_index

    def __str__(self) -> str:
        return f"cfg{self.cfg}xulysses{self.ulysses}xring{self.ring}"

    def as_params(self) -> dict[str, str]:
        return {
            "layout": str(self),
            "workers": str(self.world_size),
            "cfg_parallel": str(self.cfg == 2),
            "ulysses_degree": str(self.ulysses),
            "ring_degree": str(self.ring),
        }


def layout_problem(layout: ParallelLayout, heads: int, guidance: bool) -> str | None:
    """Why `layout` cannot run a model with `heads` attention heads, or None if it can."""
    if layout.cfg not in (1, 2):
        return "the CFG degree is 1 or 2"
    if layout.cfg == 2 and not guidance:
        return "CFG-parallel needs classifier-free guidance (guidance scale > 1)"
    if layout.ulysses < 1 or layout.ring < 1:
        return "degrees are at least 1"
    if heads % layout.ulysses:
        return f"the Ulysses degree must divide the model's {heads} attention heads"
    return None


def valid_layouts(workers: int, heads: int, guidance: bool, sequence_parallel: bool = True) -> list[ParallelLayout]:
    """Every layout of `workers` ranks that can run, best first (see `choose_layout`). Without
    `sequence_parallel` (a UNet, whose sequence cannot be split) only CFG-parallel remains."""
    layouts = [
        ParallelLayout(cfg, ulysses, workers // (cfg * ulysses))
        for cfg, ulysses in itertools.product((2, 1), range(workers, 0, -1))
        if workers % (cfg * ulysses) == 0
    ]
    return [
        layout
        for layout in layouts
        if layout_problem(layout, heads, guidance) is None and (sequence_parallel or layout.sequence_degree == 1)
    ]


def choose_layout(
    heads: int,
    guidance: bool,
    workers: int | None = None,
    ulysses: int | None = None,
    ring: int | None = None,
    cfg_parallel: bool = False,
    sequence_parallel: bool = True,
) -> ParallelLayout:
    """The layout for `--workers N`, with any of `--ulysses/--ring/--cfg-parallel` fixed.

    Degrees that are not given are filled in, best first: CFG-parallel (its only traffic is one
    gather of the noise prediction per step), then the largest Ulysses degree that divides the
    heads (an all-to-all moves each activation once), and ring takes the rest (it moves every
    key and value block past every rank). docs/context-parallel.md has the numbers behind this
    order. Without --workers, the group is as large as the degrees given.
    """
    for name, value in (("workers", workers), ("ulysses", ulysses), ("ring", ring)):
        if value is not None and value < 1:
            raise InvalidRequest(f"{name} must be at least 1 (got {value})")
    requested = ParallelLayout(2 if cfg_parallel else 1, ulysses or 1, ring or 1)
    workers = requested.world_size if workers is None else workers
    valid = valid_layouts(workers, heads, guidance, sequence_parallel)
    if not sequence_parallel and not valid:
        raise InvalidRequest(
            f"this model's token sequence is not split over ranks: {workers} denoiser workers run only as "
            f"CFG-parallel, 2 workers with guidance on (guidance scale above the model's off value); "
            f"use workers 1 or 2"
        )
    for layout in valid:  # ring alone is valid for a transformer, so with nothing fixed this returns
        if (
            (ulysses is None or layout.ulysses == ulysses)
            and (ring is None or layout.ring == ring)
            and (not cfg_parallel or layout.cfg == 2)
        ):
            return layout
    fixed = [f"{name} {value}" for name, value in (("ulysses", ulysses), ("ring", ring)) if value is not None]
    fixed += ["CFG-parallel"] * cfg_parallel
    problem = layout_problem(requested, heads, guidance)
    problem = problem or f"no layout of {workers} ranks has {' and '.join(fixed)}"
    listed = ", ".join(str(v) for v in valid)
    raise InvalidRequest(
        f"invalid parallel layout {requested}: {problem}; valid layouts for {workers} workers: {listed}"
    )


@dataclass(frozen=True)
class SequenceShards:
    """How the video tokens of one forward pass are split over the shards of a guidance branch.

    Shard s holds `counts[s]` temporal slices (a latent frame, or a frame pair for CogVideoX
    1.5) of `tokens_per_slice` tokens each, starting at slice `starts[s]`; every shard is padded
    to `padded` slices so that collectives see equal sizes.
    """

    counts: tuple[int, ...]
    tokens_per_slice: int

    @classmethod
    def balanced(cls, slices: int, shards: int, tokens_per_slice: int) -> SequenceShards:
        base, extra = divmod(slices, shards)
        return cls(tuple(base + (s < extra) for s in range(shards)), tokens_per_slice)

    @property
    def padded(self) -> int:
        return max(self.counts)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate(self.counts, initial=0))[:-1]

    def real_keys(self, x: torch.Tensor, shards: Sequence[int]) -> torch.Tensor:
        """`x` (batch, heads, tokens, dim) holding the padded blocks of `shards`, padding dropped.

        Without padding in those shards this is `x` itself: no copy on the hot path.
        """
        if all(self.counts[s] == self.padded for s in shards):
            return x
        return x.index_select(2, self.valid_keys(shards, x.device))

    def valid_keys(self, shards: Sequence[int], device: torch.device) -> torch.Tensor:
        """Positions of real (not padding) tokens in the concatenated padded blocks of `shards`."""
        block, per_slice = self.padded * self.tokens_per_slice, self.tokens_per_slice
        starts_and_lengths = [(i * block, self.counts[s] * per_slice) for i, s in enumerate(shards)]
        return torch.cat([start + torch.arange(length, device=device) for start, length in starts_and_lengths])


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "default"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (batch, heads, seq, dim) tensors and the log-sum-exp of its scores.

    PyTorch's public scaled_dot_product_attention does not return the log-sum-exp that ring
    attention needs to merge blocks, so this calls the fused kernels underneath it: `kernel`, the
    one the stage chose for its device (`stages.acceleration.choose_attention`); "default" picks
    by device and dtype; "math" computes it in fp32 from the scores.
    """
    half = q.dtype in (torch.float16, torch.bfloat16)
    if kernel == "default" and q.device.type == "cuda":
        kernel = "flash" if half and _has_flash(q.device) else "efficient"  # fp32, or older than sm80
    if kernel == "default" and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]
    elif kernel == "cudnn":  # (out, lse, ...): lse (batch, heads, seq) in fp32
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    elif kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    elif kernel == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = torch.logsumexp(scores, dim=-1)
        out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
    if lse.dim() == 4:  # cuDNN's comes as (batch, heads, seq, 1)
        lse = lse.squeeze(-1)
    return out, lse[..., : q.shape[2]].float()  # the efficient kernel pads the lse's sequence dim


def _has_flash(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def merge_partial(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-attention results over disjoint key sets into the result over both."""
    if out is None:
        return block_out.float(), block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    keep, add = torch.exp(lse - new_lse).unsqueeze(-1), torch.exp(block_lse - new_lse).unsqueeze(-1)
    return out * keep + block_out.float() * add, new_lse


def init_deepspeed_comm() -> None:
    """DeepSpeed's communication backend (which DistributedAttention sends through) over the
    process group torch.distributed already has.

    With gloo (ranks on CPU cores), DeepSpeed's TorchBackend first builds its shared-memory
    all-reduce op, a C++ JIT compile of about a minute on 2 cores, again on every machine and
    every install path (its cache is keyed by the include paths). Ulysses sends only all-to-all,
    which goes through torch.distributed, so the op is left unbuilt there. With NCCL there is no
    such op to build, and DeepSpeed starts as it is.
    """
    import importlib

    import deepspeed

    if dist.get_backend() != "gloo":
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        return
    # `deepspeed.comm.torch` as an attribute is the torch module that deepspeed.comm imports.
    backend = importlib.import_module("deepspeed.comm.torch")
    build_shm_op = backend.build_shm_op
    backend.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    finally:
        backend.build_shm_op = build_shm_op


class ContextParallel:
    """This rank's part of a denoiser group: its process groups and its attention over them.

    Needs `torch.distributed` initialised over exactly the group's ranks (cluster/ does that).
    Process groups are created here, in the same order on every rank, as torch requires, with
    `timeout` for their collectives (torch's default otherwise). `attention_kernel`: the SDPA
    kernel whose log-sum-exp the ring merges (`attention_with_lse`), the stage's choice.
    """

    def __init__(self, layout: ParallelLayout, timeout: timedelta | None = None, attention_kernel: str = "default"):
        if not dist.is_initialized() or dist.get_world_size() != layout.world_size:
            raise RuntimeError(f"{layout} needs torch.distributed initialised over {layout.world_size} ranks")
        self.layout = layout
        self.attention_kernel = attention_kernel
        self.rank = dist.get_rank()
        self.branch, self.ring_index, self.ulysses_index = layout.coordinates(self.rank)
        self.shard = self.ring_index * layout.ulysses + self.ulysses_index  # within the branch
        self.shards: SequenceShards | None = None  # set by the model adapter for each forward pass

        s, u = layout.sequence_degree, layout.ulysses
        self.ulysses_group = self.ring_group = None
        for branch, ring_index in itertools.product(range(layout.cfg), range(layout.ring)):
            ranks = [branch * s + ring_index * u + i for i in range(u)]
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks:
                self.ulysses_group = group
        for branch, ulysses_index in itertools.product(range(layout.cfg), range(u)):
            ranks = [branch * s + j * u + ulysses_index for j in range(layout.ring)]
            group = dist.new_group(ranks, timeout=timeout)
            if self.rank in ranks:
                self.ring_group, self.ring_ranks = group, ranks

        # Each guidance branch's ranks, for a decision one branch's forward pass makes alone (a step
        # cache's, stages.cache); without CFG-parallel the branch is the whole group.
        self.branch_group = None
        if layout.cfg > 1:
            for branch in range(layout.cfg):
                ranks = list(range(branch * s, (branch + 1) * s))
                group = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    self.branch_group = group

        self._ulysses = None
        if u > 1:
            from deepspeed.sequence.layer import DistributedAttention  # here: a slow import only Ulysses needs

            init_deepspeed_comm()
            # (batch, seq, heads, dim) tensors: scatter heads (dim 2), gather the sequence (dim 1).
            self._ulysses = DistributedAttention(self._attend_gathered, self.ulysses_group, scatter_idx=2, gather_idx=1)

    # -- sharding the sequence ---------------------------------------------------------------

    def local_slices(self, x: torch.Tensor, dim: int, slice_size: int = 1) -> torch.Tensor:
        """This rank's shard of `x` along `dim` (in units of `slice_size` elements), zero-padded."""
        shards = self.shards
        start, count = shards.starts[self.shard] * slice_size, shards.counts[self.shard] * slice_size
        local = x.narrow(dim, start, count)
        missing = shards.padded * slice_size - count
        if missing:
            pad_shape = list(local.shape)
            pad_shape[dim] = missing
            local = torch.cat([local, local.new_zeros(pad_shape)], dim=dim)
        return local

    def gather_slices(self, local: torch.Tensor, dim: int, slice_size: int = 1) -> torch.Tensor:
        """The inverse of `local_slices` over the whole group: every shard, padding dropped.

        With CFG-parallel the two branches' results are stacked along dim 0 (branch 0 first: the
        batch's first item, unconditional for CogVideoX, the positive prompt for Z-Image), as
        the single-process forward pass of a batch of two would return them.
        """
        parts = [torch.empty_like(local) for _ in range(self.layout.world_size)]
        dist.all_gather(parts, local.contiguous())
        shards, degree = self.shards, self.layout.sequence_degree
        branches = [
            torch.cat(
                [parts[b * degree + s].narrow(dim, 0, n * slice_size) for s, n in enumerate(shards.counts)], dim=dim
            )
            for b in range(self.layout.cfg)
        ]
        return torch.cat(branches, dim=0)

    def gather_branches(self, local: torch.Tensor) -> torch.Tensor:
        """Every guidance branch's result stacked along dim 0 (branch 0 first), for a model whose
        every rank of a branch holds the branch's whole result: a UNet run CFG-parallel alone, or
        a network split by diffusers' context parallelism, which gathers the sequence itself."""
        parts = [torch.empty_like(local) for _ in range(self.layout.world_size)]
        dist.all_gather(parts, local.contiguous())
        degree = self.layout.sequence_degree
        return torch.cat([parts[b * degree] for b in range(self.layout.cfg)], dim=0)

    def sum_over_group(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over every rank of the group (in place)."""
        dist.all_reduce(x)
        return x

    def sum_over_branch(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the ranks of this rank's guidance branch (in place)."""
        dist.all_reduce(x, group=self.branch_group)
        return x

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens (dim 1) without the padding `local_slices` added; all of them
        where the sequence was split evenly by diffusers (no `shards`)."""
        if self.shards is None:
            return x
        return x.narrow(1, 0, self.shards.counts[self.shard] * self.shards.tokens_per_slice)

    def branch_of(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's guidance branch of a batch of [unconditional, conditional] inputs."""
        return batch[self.branch : self.branch + 1] if self.layout.cfg == 2 else batch

    # -- attention ---------------------------------------------------------------------------

    def attention(
        self, text: Sequence[torch.Tensor], video: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint attention of (query, key, value) for the text tokens and this rank's video shard.

        Tensors are (batch, heads, tokens, head dim); returns the (text, video shard) outputs,
        equal to single-process attention over all text and video tokens.
        """
        if self._ulysses is None:
            return self._joint_attention(text, video, shards=[self.shard])
        # DeepSpeed's all-to-alls move only the video tensors; it hands any further keyword
        # arguments to the local attention as they are. So the text tokens of this rank's heads
        # go in as `text`, and the local attention puts its text output in `text_out`, a list
        # it is handed for that: the one way out of DeepSpeed besides the video output.
        heads = text[0].shape[1] // self.layout.ulysses
        text_heads = tuple(t[:, self.ulysses_index * heads : (self.ulysses_index + 1) * heads] for t in text)
        text_out: list[torch.Tensor] = []
        video_in = (x.transpose(1, 2) for x in video)
        video_out = self._ulysses(*video_in, batch_dim_idx=0, text=text_heads, text_out=text_out).transpose(1, 2)
        if text[0].shape[2] == 0:  # image tokens alone (a refiner over the image): no text to gather
            return text[0], video_out
        text_parts = [torch.empty_like(text_out[0]) for _ in range(self.layout.ulysses)]
        dist.all_gather(text_parts, text_out[0].contiguous(), group=self.ulysses_group)
        return torch.cat(text_parts, dim=1), video_out

    def _attend_gathered(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: Sequence[torch.Tensor], text_out: list
    ) -> torch.Tensor:
        """DeepSpeed's local attention: the whole Ulysses group's video sequence, this rank's
        heads, with `text` (this rank's heads of the text tokens); appends the text output to
        `text_out` and returns the video output."""
        first = self.ring_index * self.layout.ulysses
        shards = range(first, first + self.layout.ulysses)
        video = [x.transpose(1, 2) for x in (q, k, v)]
        text_result, video_out = self._joint_attention(text, video, shards=list(shards))
        text_out.append(text_result)
        return video_out.transpose(1, 2)

    def _joint_attention(
        self, text: Sequence[torch.Tensor], video: Sequence[torch.Tensor], shards: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of text + video queries to text + every video key of the branch.

        `video` holds the padded blocks of `shards` (this rank's, or its Ulysses group's);
        the ring, when there is one, brings the other groups' blocks.
        """
        text_len = text[0].shape[2]
        q = torch.cat([text[0], video[0]], dim=2)
        if self.layout.ring == 1:
            k = torch.cat([text[1], self.shards.real_keys(video[1], shards)], dim=2)
            v = torch.cat([text[2], self.shards.real_keys(video[2], shards)], dim=2)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = self._ring_attention(q, text, video, len(shards))
        return out[:, :, :text_len], out[:, :, text_len:]

    def _ring_attention(
        self, q: torch.Tensor, text: Sequence[torch.Tensor], video: Sequence[torch.Tensor], shards_per_block: int
    ) -> torch.Tensor:
        """Pass (key, value) blocks around the ring; merge each block's attention by log-sum-exp."""
        ring, me = self.layout.ring, self.ring_index
        kv = torch.stack([video[1], video[2]]).contiguous()
        out = lse = None
        for hop in range(ring):
            if hop < ring - 1:  # start passing this block on before attending to it
                incoming = torch.empty_like(kv)
                ops = [
                    dist.P2POp(dist.isend, kv, self.ring_ranks[(me + 1) % ring], self.ring_group),
                    dist.P2POp(dist.irecv, incoming, self.ring_ranks[(me - 1) % ring], self.ring_group),
                ]
                requests = dist.batch_isend_irecv(ops)
            owner = (me - hop) % ring  # whose block this is
            shards = list(range(owner * shards_per_block, (owner + 1) * shards_per_block))
            k, v = self.shards.real_keys(kv[0], shards), self.shards.real_keys(kv[1], shards)
            if hop == 0:  # the text keys count once: with this rank's own block
                k, v = torch.cat([text[1], k], dim=2), torch.cat([text[2], v], dim=2)
            if k.shape[2]:
                out, lse = merge_partial(out, lse, *attention_with_lse(q, k, v, self.attention_kernel))
            if hop < ring - 1:
                for request in requests:
                    request.wait()
                kv = incoming
        return out.to(q.dtype)
