"""Tile-parallel VAE decoding: the tiles of one video decoded on M decoder actors and blended
where they are gathered equal diffusers' own `vae.enable_tiling()` decode (fp32, <= 1e-5)."""

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from stages.decoder import TileSettings, assemble_frames, plan_decode, plan_tiles, postprocess
from stages.errors import InvalidRequest
from stages.models import load_spec

TOL = 1e-5
# (height, width, latent frames, tile settings, grid): tiny's default tiles (3x3, edge tiles of
# other sizes); a 4x4 grid on a bigger, longer video with wider overlaps; a last column one latent
# pixel wide, narrower than the overlap (the blend shortens); a last row one latent pixel high.
CASES = [
    (64, 96, 3, TileSettings(32, 48, 8, 8), (3, 3)),
    (128, 160, 5, TileSettings(48, 64, 16, 16), (4, 4)),
    (64, 104, 3, TileSettings(32, 48, 8, 16), (3, 4)),
    (32, 96, 3, TileSettings(32, 48, 8, 8), (2, 3)),
]


def diffusers_decode(weights, latents, s: TileSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock diffusers, as the pipeline's decode_latents does it and post-processed as the pipeline
    does: (frames with `enable_tiling` at these settings, frames untiled)."""
    vae = AutoencoderKLCogVideoX.from_pretrained(weights, subfolder="vae").eval()
    z = 1 / vae.config.scaling_factor * latents.permute(0, 2, 1, 3, 4)
    with torch.no_grad():
        untiled = postprocess(vae.decode(z).sample)
        vae.enable_tiling(
            tile_sample_min_height=s.height,
            tile_sample_min_width=s.width,
            tile_overlap_factor_height=s.overlap_height / s.height,
            tile_overlap_factor_width=s.overlap_width / s.width,
        )
        return postprocess(vae.decode(z).sample), untiled


@pytest.mark.beside_executor
def test_per_actor_memory_is_bounded_by_the_tile_not_the_video(ray_session, tiny_spec, tiny_weights):
    """What decoding adds to a decoder's memory (a run metric, here read from the call reports)
    grows with the video untiled, and stays about flat tiled: each actor holds one tile's
    activations at a time. (On the CPU its decoded tiles also stay in its memory until they are
    sent, a few MiB here; on a GPU they leave the device one by one.) Each figure comes from a
    fresh actor, so every one starts from the same state, and glibc returns every freed block of
    64 KiB or more at once (MALLOC_MMAP_THRESHOLD_), so that the resident memory the figure
    reads on a CPU is the memory in use, not what the allocator kept from earlier tiles."""
    from cluster.actors import StageActor
    from stages.decoder import DecoderStage

    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    cases = [(128, False), (256, False), (128, True), (256, True)]  # (height = width, tiled)
    plans, actors = [], []
    for size, tiled in cases:  # the four actors start together: starting one is most of its time
        plans.append(plan_decode(tiny_spec, size, size, decoders=2 if tiled else 1,
                                 tile_size=(64, 64) if tiled else None))  # fmt: skip
        actors.append(StageActor.options(num_cpus=0, runtime_env={"env_vars": env}).remote(
            DecoderStage, tiny_spec, tiny_weights, rank=0, decoders=2 if tiled else 1
        ))  # fmt: skip
    try:
        ray_session.get([actor.start.remote() for actor in actors])
        figures = []
        for actor, plan, (size, tiled) in zip(actors, plans, cases, strict=True):  # one decode at a time
            latents = torch.randn(1, 5, 4, size // 8, size // 8)
            method = "decode_tiles" if tiled else "decode"
            figures.append(ray_session.get(actor.call.remote(method, latents, plan)[1])["work_memory_mib"])
    finally:
        for actor in actors:
            ray_session.kill(actor)

    untiled_small, untiled_big, tiled_small, tiled_big = figures
    assert untiled_big > 2 * untiled_small  # 4x the pixels: the untiled decode needs far more
    assert tiled_big < 0.25 * untiled_big
    assert tiled_big < tiled_small + 32  # 4x the pixels, about the same memory (seen: 79 and 70 MiB)


def test_tiles_decoded_on_m_actors_equal_diffusers_tiling(executors, tiny_spec, tiny_weights):
    cases = []
    for height, width, frames, settings, grid in CASES:
        latents = torch.randn(1, frames, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(height))
        expected, untiled = diffusers_decode(tiny_weights, latents, settings)
        assert (expected - untiled).abs().max() > 1e-3  # tiling changes the frames: the comparison means something
        plan = plan_tiles(tiny_spec, height, width, settings)
        assert plan.grid == grid
        cases.append((latents, plan, expected))

    for m in (3, 2, 1):  # one executor, a decoder fewer each time (RayExecutor.reload); all start at once
        executor = executors.get(tiny_spec, tiny_weights, decoders=m, encoder=False)  # nothing here to encode
        assert len(executor.side["decode"]) == m and not executor.side["encode"]
        for case, (latents, plan, expected) in enumerate(cases):
            if m == 1:  # one actor decodes and blends every tile itself
                call = executor.call("decode", "decode_float", latents, plan)
                ours = executor.get(call)
            else:  # each actor decodes its share; the driver blends them
                call = executor.call("decode", "decode_tiles", latents, plan)
                ours = assemble_frames(plan, [tile for share in executor.gather(call) for tile in share])
            reports = executor.reports(call)
            assert [r["tiles"] for r in reports] == [len(plan.share(rank, m)) for rank in range(m)]
            assert all(r["tiles"] > 0 for r in reports)  # every actor took part
            assert ours.shape == expected.shape
            assert (ours - expected).abs().max().item() <= TOL, f"case {case}, {m} decoder(s)"


def test_a_decoder_of_several_decodes_its_share_or_everything(tiny_spec, tiny_weights):
    """decode_tiles is this decoder's share; decode (one decoder's whole job) is every tile."""
    from stages.decoder import DecoderStage

    plan = plan_tiles(tiny_spec, 64, 96, TileSettings(32, 48, 8, 8))
    second = DecoderStage(tiny_spec, tiny_weights, rank=1, decoders=2)
    latents = torch.randn(1, 3, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    assert [t.index for t in second.decode_tiles(latents, plan)] == plan.share(1, 2) != list(range(9))
    whole = DecoderStage(tiny_spec, tiny_weights).decode(latents, plan)
    assert (second.decode(latents, plan) == whole).all() and second.last_run_stats()["tiles"] == 9


def test_shares_cover_every_tile_once_and_balance_the_area():
    spec = load_spec("cogvideox-2b")
    plan = plan_decode(spec, 480, 720, decoders=3)
    # diffusers' defaults for 480x720: 240x360 tiles overlapping by 40x72, a 3x3 grid.
    assert plan.settings == TileSettings(240, 360, 40, 72) and plan.grid == (3, 3)
    assert (plan.blend_height, plan.blend_width, plan.keep_height, plan.keep_width) == (40, 72, 200, 288)
    for m in (1, 2, 3, 9):
        shares = [plan.share(rank, m) for rank in range(m)]
        assert sorted(i for share in shares for i in share) == list(range(9))
        areas = [sum(plan.tiles[i].height * plan.tiles[i].width for i in share) for share in shares]
        biggest_tile = max(t.height * t.width for t in plan.tiles)
        assert max(areas) - min(areas) <= biggest_tile


def test_untiled_unless_asked():
    spec = load_spec("cogvideox-2b")
    assert not plan_decode(spec, 480, 720).tiled
    assert plan_decode(spec, 480, 720, tile_size=(240, 360)).settings == TileSettings(240, 360, 40, 72)
    assert not plan_decode(spec, 240, 352, tile_size=(240, 360)).tiled  # fits one tile: decoded untiled
    with pytest.raises(InvalidRequest, match=r"^decoders 2 is more than the 1 tile\(s\) of a 240x352 video"):
        plan_decode(spec, 240, 352, decoders=2)
