"""VAE decoding: latents -> frames, as the family's diffusers pipeline decodes and post-processes
them (the family's adapter says how latents enter its VAE, `stages.families`).

For a video VAE that the family decodes in tiles, two ways, one result:

- untiled: the whole latent video through the VAE at once (diffusers' default);
- tiled: the latent video cut into overlapping spatial tiles, each decoded on its own, and the
  decoded tiles blended into one video where they overlap: the scheme of diffusers'
  `AutoencoderKLCogVideoX.enable_tiling()` and `AutoencoderKLWan.enable_tiling()` (same grid,
  same blending, same crops), so that the frames equal `vae.enable_tiling(...)` + `vae.decode`
  for the same settings. What differs between the two VAEs (a tile's raw output, patchified
  for Wan 2.2; the clamp after blending for Wan) is the family's (`ModelFamily.decode_tile`,
  `tile_output`), and travels in the plan.

The tiles of one video may be decoded by several decoders (`TilePlan.share`) and blended
wherever they are gathered (`assemble_frames`). Decoded tiles leave the device as soon as they
are made, so a decoder's device memory is bounded by one tile, not by the video.

diffusers' own `tiled_decode` cannot be split that way (it decodes every tile in one loop and
blends in the same call), which is why the grid and the blend are written out here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.device import PeakMemory, default_device, describe, free_memory_bytes
from stages.errors import InvalidRequest
from stages.families import family_for
from stages.models import ModelSpec


@dataclass(frozen=True)
class TileSettings:
    """Tile size and overlap, in output pixels (each a whole number of latent pixels)."""

    height: int
    width: int
    overlap_height: int
    overlap_width: int

    def as_params(self) -> dict[str, str]:
        return {
            "tile_size": f"{self.height}x{self.width}",
            "tile_overlap": f"{self.overlap_height}x{self.overlap_width}",
        }


def default_overlap(spec: ModelSpec, height: int, width: int) -> tuple[int, int]:
    """The VAE's default overlap for tiles of this size (`ModelFamily.tile_overlap_fractions`: for
    CogVideoX 1/6 of the height and 1/5 of the width), rounded to whole latent pixels (at least one)."""
    family = family_for(spec)
    scale = family.vae_scale_spatial
    factor_height, factor_width = family.tile_overlap_fractions

    def overlap(size: int, factor: float) -> int:
        return max(scale, round(size * factor / scale) * scale)

    return overlap(height, factor_height), overlap(width, factor_width)


def tile_settings(
    spec: ModelSpec, size: tuple[int, int] | None = None, overlap: tuple[int, int] | None = None
) -> TileSettings:
    """Tile settings with diffusers' defaults filled in (`ModelFamily.default_tile_size`: for
    CogVideoX's 480x720, 240x360 tiles overlapping by 40x72; for Wan 256x256 by 64x64)."""
    height, width = size or family_for(spec).default_tile_size
    overlap_height, overlap_width = overlap or default_overlap(spec, height, width)
    return TileSettings(height, width, overlap_height, overlap_width)


@dataclass(frozen=True)
class Tile:
    """One tile of the grid: its place in the grid and its latent region (latent pixels)."""

    row: int
    col: int
    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class TilePlan:
    """How one latent video is decoded: the tiles (row-major) and how they are blended.

    An untiled plan has one tile, the whole latent video, and nothing to blend.
    """

    tiles: tuple[Tile, ...]
    blend_height: int = 0  # output rows of a tile blended with the tile above it
    blend_width: int = 0  # output columns blended with the tile to its left
    keep_height: int = 0  # output rows of a tile kept in the video (the rest is the next tile's)
    keep_width: int = 0
    settings: TileSettings | None = None  # None: untiled
    # A decoded tile's pixels come folded into channels, `patch` x `patch` (Wan 2.2's VAE): blend
    # extents and kept sizes above are in those units, and the video is unfolded after blending.
    patch: int = 1
    clamp: bool = False  # the VAE clamps to [-1, 1] after blending, not each tile (Wan)

    @property
    def tiled(self) -> bool:
        return self.settings is not None

    @property
    def grid(self) -> tuple[int, int]:
        return self.tiles[-1].row + 1, self.tiles[-1].col + 1

    def share(self, rank: int, decoders: int) -> list[int]:
        """Indices of the tiles decoder `rank` of `decoders` decodes: biggest tiles first, each to
        the decoder with the least area so far (edge tiles are smaller), ties to the lowest rank."""
        load = [0] * decoders
        owner = {}
        for index in sorted(range(len(self.tiles)), key=lambda i: (-self.tiles[i].height * self.tiles[i].width, i)):
            least = min(range(decoders), key=lambda r: (load[r], r))
            owner[index] = least
            load[least] += self.tiles[index].height * self.tiles[index].width
        return sorted(i for i, r in owner.items() if r == rank)

    def as_params(self) -> dict[str, str]:
        if not self.tiled:
            return {"tiling": "off"}
        rows, cols = self.grid
        return {"tiling": f"{rows}x{cols}", **self.settings.as_params()}


def plan_tiles(spec: ModelSpec, height: int, width: int, settings: TileSettings | None) -> TilePlan:
    """The tile grid for a video of height x width pixels, as diffusers' `tiled_decode` lays it.

    Raises InvalidRequest for settings that cannot tile: sizes that are not whole latent pixels,
    or an overlap as large as the tile. (diffusers would take such settings and return frames of
    the wrong size; refusing them is why the grid is computed in whole latent pixels here.)
    """
    family = family_for(spec)
    scale = family.vae_scale_spatial
    latent_h, latent_w = height // scale, width // scale
    patch, clamp = family.tile_output  # an untiled plan's one tile is finished as a tiled one's
    whole = TilePlan(tiles=(Tile(0, 0, 0, 0, latent_h, latent_w),), patch=patch, clamp=clamp)
    if settings is None:
        return whole
    for axis, size, overlap in (
        ("height", settings.height, settings.overlap_height),
        ("width", settings.width, settings.overlap_width),
    ):
        if size < scale or size % scale:
            raise InvalidRequest(f"tile {axis} must be a positive multiple of {scale} px for {spec.name} (got {size})")
        if overlap < 0 or overlap % scale:
            raise InvalidRequest(
                f"tile overlap ({axis}) must be a multiple of {scale} px for {spec.name} (got {overlap})"
            )
        if overlap >= size:
            raise InvalidRequest(f"tile {axis} ({size} px) must be larger than the tile overlap ({overlap} px)")
    tile_h, tile_w = settings.height // scale, settings.width // scale
    if latent_h <= tile_h and latent_w <= tile_w:  # fits one tile: diffusers decodes it untiled
        return whole
    stride_h, stride_w = tile_h - settings.overlap_height // scale, tile_w - settings.overlap_width // scale
    tiles = tuple(
        Tile(row, col, top, left, min(tile_h, latent_h - top), min(tile_w, latent_w - left))
        for row, top in enumerate(range(0, latent_h, stride_h))
        for col, left in enumerate(range(0, latent_w, stride_w))
    )
    return TilePlan(
        tiles=tiles,
        blend_height=settings.overlap_height // patch,
        blend_width=settings.overlap_width // patch,
        keep_height=(settings.height - settings.overlap_height) // patch,
        keep_width=(settings.width - settings.overlap_width) // patch,
        settings=settings,
        patch=patch,
        clamp=clamp,
    )


def plan_decode(
    spec: ModelSpec,
    height: int,
    width: int,
    decoders: int = 1,
    tile_size: tuple[int, int] | None = None,
    tile_overlap: tuple[int, int] | None = None,
) -> TilePlan:
    """The tile plan for `decoders` decoders. Tiling is on when several decoders share a video or
    a tile size or overlap is given; otherwise one decoder decodes the video untiled."""
    if decoders < 1:
        raise InvalidRequest(f"decoders must be at least 1 (got {decoders})")
    tiled = decoders > 1 or tile_size is not None or tile_overlap is not None
    if tiled and not family_for(spec).tiled_decode:  # the tile scheme is that of a video VAE
        raise InvalidRequest(
            f"{spec.name} decodes with an image VAE, which framecast does not tile or share: "
            f"use one decoder and no tile_size or tile_overlap"
        )
    plan = plan_tiles(spec, height, width, tile_settings(spec, tile_size, tile_overlap) if tiled else None)
    if decoders > len(plan.tiles):
        settings = tile_settings(spec, tile_size, tile_overlap)
        raise InvalidRequest(
            f"decoders {decoders} is more than the {len(plan.tiles)} tile(s) of a {height}x{width} video "
            f"in {settings.height}x{settings.width} px tiles overlapping by "
            f"{settings.overlap_height}x{settings.overlap_width} px; use at most {len(plan.tiles)} decoder(s) "
            f"or smaller tiles (tile_size)"
        )
    return plan


@dataclass(frozen=True)
class DecodedTile:
    index: int  # into TilePlan.tiles
    sample: torch.Tensor  # (1, 3 x patch², frames, H / patch, W / patch), the VAE's dtype, on the CPU


class DecoderStage:
    """One VAE decoder. As decoder `rank` of `decoders`, `decode_tiles` decodes its share of a plan."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: Path,
        device: torch.device | None = None,
        rank: int = 0,
        decoders: int = 1,
    ):
        self.spec = spec
        self.device = device or default_device()
        self.rank, self.decoders = rank, decoders
        self.family = family_for(spec)
        self.vae = self.family.load_decoder(weights, self.device)
        self._peak_memory = PeakMemory(self.device)
        self._last_run: dict[str, float] = {}

    def describe(self) -> str:
        return describe(self.device)

    def last_run_stats(self) -> dict[str, float]:
        """Figures of the last decode: peak memory (MiB), what decoding added to it, tiles decoded."""
        return dict(self._last_run)

    def decode_tiles(self, latents: torch.Tensor, plan: TilePlan) -> list[DecodedTile]:
        """This decoder's share of the plan's tiles (`plan.share(rank, decoders)`), decoded."""
        return self.decode_share(latents, plan, self.rank, self.decoders)

    def decode_share(self, latents: torch.Tensor, plan: TilePlan, rank: int, decoders: int) -> list[DecodedTile]:
        """Share `rank` of `decoders` of the plan's tiles, decoded: for interchangeable decoders
        (Serve replicas), which learn the share with each call."""
        return self._decode_tiles(latents, plan, plan.share(rank, decoders))

    @torch.no_grad()
    def _decode_tiles(self, latents: torch.Tensor, plan: TilePlan, indices: list[int]) -> list[DecodedTile]:
        """Decode the tiles `indices` of the plan; each leaves the device as soon as it is decoded."""
        self._peak_memory.reset()
        z = self.family.vae_input(self.vae, latents)
        decoded = []
        for index in indices:
            t = plan.tiles[index]
            region = z[..., t.top : t.top + t.height, t.left : t.left + t.width]
            decoded.append(DecodedTile(index, self.family.decode_tile(self.vae, region).cpu()))
        self._record(tiles=len(decoded))
        return decoded

    def fits_untiled(self, z: torch.Tensor) -> bool:
        """Whether decoding `vae_input`'s tensor `z` untiled fits in the device's free memory (a
        GPU's, or the host's on the CPU), by the family's measured bytes per output pixel."""
        needed = self.family.untiled_decode_bytes(z)
        return needed is None or needed < 0.9 * free_memory_bytes(self.device)  # 10%: fragmentation

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor, plan: TilePlan | None = None) -> torch.Tensor:
        """Every tile of the plan decoded and blended here: (frames, H, W, 3) float32 in [0, 1], on the CPU.

        An untiled plan that would not fit in the GPU's free memory is decoded in the family's
        default tiles instead (as `vae.enable_tiling()`), and `tiled_for_memory` says so."""
        tiled_for_memory = False
        if plan is None or not plan.tiled:
            z = self.family.vae_input(self.vae, latents)  # the untiled decode's input
            if plan is not None and self.family.tiled_decode and not self.fits_untiled(z):
                tile = plan.tiles[0]  # an untiled plan's one tile: the whole latent video
                scale = self.family.vae_scale_spatial
                plan = plan_tiles(self.spec, tile.height * scale, tile.width * scale, tile_settings(self.spec))
                tiled_for_memory = True
        if plan is not None and plan.tiled:  # each tile is cut from `vae_input`'s tensor there
            frames = assemble_frames(plan, self._decode_tiles(latents, plan, list(range(len(plan.tiles)))))
            self._last_run["tiled_for_memory"] = float(tiled_for_memory)
            return frames
        self._peak_memory.reset()
        video = self.family.decode(self.vae, z)  # (1, 3, F, H, W) in [-1, 1]
        frames = postprocess(video)
        self._record(tiles=1)
        return frames

    def decode(self, latents: torch.Tensor, plan: TilePlan | None = None) -> np.ndarray:
        """(frames, H, W, 3) uint8, rounded as diffusers rounds when it makes PIL frames."""
        return to_uint8(self.decode_float(latents, plan))

    def _record(self, tiles: int) -> None:
        self._last_run = {
            "peak_memory_mib": self._peak_memory.peak_mib(),
            "work_memory_mib": self._peak_memory.growth_mib(),
            "tiles": tiles,
            "tiled_for_memory": 0.0,
        }


def _blend_rows(above: torch.Tensor, below: torch.Tensor, extent: int) -> None:
    """Fade the top `extent` rows of `below` in from the bottom rows of `above`, in place.

    Row by row with Python-float weights, as diffusers' `blend_v` does, so that the rounding
    (in bf16 too) is the same.
    """
    extent = min(above.shape[3], below.shape[3], extent)
    for y in range(extent):
        below[:, :, :, y, :] = above[:, :, :, -extent + y, :] * (1 - y / extent) + below[:, :, :, y, :] * (y / extent)


def _blend_columns(left: torch.Tensor, right: torch.Tensor, extent: int) -> None:
    """`_blend_rows` across columns (diffusers' `blend_h`)."""
    extent = min(left.shape[4], right.shape[4], extent)
    for x in range(extent):
        right[:, :, :, :, x] = left[:, :, :, :, -extent + x] * (1 - x / extent) + right[:, :, :, :, x] * (x / extent)


def assemble(plan: TilePlan, tiles: list[DecodedTile]) -> torch.Tensor:
    """Blend decoded tiles into one (1, 3, frames, H, W) video, as diffusers' `tiled_decode` does.

    Tiles are visited row-major and blended in place, so a tile's overlap with the next one
    carries the blending it already received from its own neighbours (diffusers' order).
    """
    if sorted(t.index for t in tiles) != list(range(len(plan.tiles))):
        raise ValueError(f"got tiles {sorted(t.index for t in tiles)} of a plan with {len(plan.tiles)}")
    video = tiles[0].sample if not plan.tiled else _blend(plan, tiles)
    video = _unfold_patches(video, plan.patch)
    return video.clamp(-1.0, 1.0) if plan.clamp else video


def _blend(plan: TilePlan, tiles: list[DecodedTile]) -> torch.Tensor:
    rows, cols = plan.grid
    by_index = {t.index: t.sample for t in tiles}
    grid = [[by_index[r * cols + c] for c in range(cols)] for r in range(rows)]
    kept_rows = []
    for r in range(rows):
        kept = []
        for c in range(cols):
            tile = grid[r][c]
            if r > 0:
                _blend_rows(grid[r - 1][c], tile, plan.blend_height)
            if c > 0:
                _blend_columns(grid[r][c - 1], tile, plan.blend_width)
            kept.append(tile[:, :, :, : plan.keep_height, : plan.keep_width])
        kept_rows.append(torch.cat(kept, dim=4))
    return torch.cat(kept_rows, dim=3)


def _unfold_patches(video: torch.Tensor, patch: int) -> torch.Tensor:
    """(1, 3 * p * p, F, h, w) -> (1, 3, F, h * p, w * p): pixels a VAE folded into channels put
    back in place. The channel order is (colour, column offset, row offset), the fold diffusers'
    `AutoencoderKLWan` makes (its `patchify`); written here as a reshape so the shared decoder
    names no model's module."""
    if patch == 1:
        return video
    batch, folded, frames, height, width = video.shape
    video = video.view(batch, folded // (patch * patch), patch, patch, frames, height, width)
    video = video.permute(0, 1, 4, 5, 3, 6, 2)  # colour, frame, row, row offset, column, column offset
    return video.reshape(batch, folded // (patch * patch), frames, height * patch, width * patch)


def postprocess(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, F, H, W) in [-1, 1] -> (F, H, W, 3) float32 in [0, 1] on the CPU (diffusers' video processor)."""
    video = (video[0] * 0.5 + 0.5).clamp(0, 1)
    return video.permute(1, 2, 3, 0).float().cpu()


def assemble_frames(plan: TilePlan, tiles: list[DecodedTile]) -> torch.Tensor:
    """Decoded tiles (from any decoders) -> (frames, H, W, 3) float32 in [0, 1]."""
    return postprocess(assemble(plan, tiles))


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.numpy() * 255).round().astype(np.uint8)
