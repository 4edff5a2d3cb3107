"""Each stage on its own, in this process."""

import subprocess
import time

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from stages.decoder import DecoderStage
from stages.denoiser import DenoiserStage
from stages.encoder import EncoderStage
from stages.errors import InvalidRequest
from stages.request import build_request
from stages.video_io import (
    CODECS,
    DecodedVideo,
    contact_sheet,
    image_digest,
    interpolate,
    interpolated_count,
    palette_note,
    read_frame,
    read_frames,
    write_video,
)


@pytest.fixture(scope="module")
def encoder(tiny_spec, tiny_weights):
    return EncoderStage(tiny_spec, tiny_weights)


@pytest.fixture(scope="module")
def denoiser(tiny_spec, tiny_weights):
    return DenoiserStage(tiny_spec, tiny_weights)


@pytest.fixture(scope="module")
def decoder(tiny_spec, tiny_weights):
    return DecoderStage(tiny_spec, tiny_weights)


def test_encoder_shapes_and_guidance(encoder):
    with_cfg = encoder.encode("a cat", "blurry", guidance=True)
    assert with_cfg.prompt.shape == (1, 226, 32)
    assert with_cfg.negative.shape == (1, 226, 32)
    assert not torch.equal(with_cfg.prompt, with_cfg.negative)
    without = encoder.encode("a cat", "blurry", guidance=False)
    assert without.negative is None
    assert torch.equal(without.prompt, with_cfg.prompt)
    with pytest.raises(InvalidRequest, match="tokens long"):
        encoder.encode(" ".join(["cat"] * 300), "", guidance=False)


def test_denoiser_progress_seed_and_shape(tiny_spec, encoder, denoiser):
    r = build_request(tiny_spec, "a cat", steps=3, seed=1)
    emb = encoder.encode(r.prompt, r.negative_prompt, r.do_classifier_free_guidance)
    calls = []
    a = denoiser.denoise(emb, r, on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert a.shape == (1, 3, 4, 8, 12)  # 9 frames -> 3 latent frames; 64x96 px -> 8x12 latents
    assert torch.isfinite(a).all()
    assert torch.equal(a, denoiser.denoise(emb, r))  # same seed, same latents
    other = denoiser.denoise(emb, build_request(tiny_spec, "a cat", steps=3, seed=2))
    assert not torch.allclose(a, other)


def test_guidance_one_skips_unconditional_branch(tiny_spec, encoder, denoiser, monkeypatch):
    r = build_request(tiny_spec, "a cat", steps=2, guidance_scale=1.0)
    emb = encoder.encode(r.prompt, r.negative_prompt, r.do_classifier_free_guidance)
    batches = []
    forward = denoiser.network.forward
    monkeypatch.setattr(
        denoiser.network, "forward", lambda **kw: batches.append(kw["hidden_states"].shape[0]) or forward(**kw)
    )
    denoiser.denoise(emb, r)
    assert batches == [1, 1]
    r2 = build_request(tiny_spec, "a cat", steps=2, guidance_scale=6.0)
    denoiser.denoise(encoder.encode(r2.prompt, r2.negative_prompt, True), r2)
    assert batches[2:] == [2, 2]


def test_decoder_frames(decoder):
    latents = torch.randn(1, 3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    frames = decoder.decode(latents)
    assert frames.shape == (9, 64, 96, 3) and frames.dtype == np.uint8
    as_float = decoder.decode_float(latents)
    assert float(as_float.min()) >= 0 and float(as_float.max()) <= 1
    assert np.abs(frames.astype(float) - as_float.numpy() * 255).max() <= 0.5


def test_mp4_is_h264_yuv420p_at_requested_fps(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(9, 64, 96, 3), dtype=np.uint8)
    path = write_video(frames, tmp_path / "sub" / "v.mp4", fps=12)
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    )
    stream = next(line for line in probe.stderr.splitlines() if "Video:" in line)
    assert "h264" in stream and "yuv420p" in stream and "96x64" in stream and "12 fps" in stream
    back = read_frames(path)
    assert back.shape == frames.shape
    assert not list(tmp_path.glob("sub/.*partial*"))


def test_mp4_is_the_file_imageio_ffmpegs_writer_made(tmp_path):
    """framecast pipes frames to ffmpeg itself (never with a preexec_fn), with the settings it
    used to give imageio-ffmpeg's writer: the file is the same, byte for byte."""
    import imageio.v2 as imageio

    frames = np.random.default_rng(0).integers(0, 256, size=(9, 64, 96, 3), dtype=np.uint8)
    ours = write_video(frames, tmp_path / "ours.mp4", fps=8)
    writer = imageio.get_writer(
        tmp_path / "imageio.mp4", format="FFMPEG", fps=8, codec="libx264", pixelformat="yuv420p", quality=None,
        output_params=["-crf", "18", "-movflags", "+faststart"], macro_block_size=2, ffmpeg_log_level="error",
    )  # fmt: skip
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    assert ours.read_bytes() == (tmp_path / "imageio.mp4").read_bytes()


def moving_texture(frames: int = 9, height: int = 64, width: int = 96, step: int = 3) -> np.ndarray:
    """Smooth RGB texture panning `step` pixels a frame, with some noise: many colours, real motion."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0 : width + step * frames]
    scene = np.stack([128 + 100 * np.sin(x / 7.0), 128 + 100 * np.cos(y / 5.0), 128 + 60 * np.sin((x + y) / 9.0)], -1)
    clip = np.stack([scene[:, t * step : t * step + width] for t in range(frames)])
    return (clip + rng.normal(0, 4, clip.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec", ["h264-lossless", "ffv1"])
def test_lossless_codecs_give_back_the_frames_exactly(tmp_path, codec):
    """RGB stored as RGB (libx264rgb at QP 0; FFV1 planar RGB): the frames read back have the
    digest of the frames written. yuv444p at QP 0 would not: RGB -> YUV rounds."""
    frames = moving_texture()
    path = write_video(frames, tmp_path / f"v{CODECS[codec].suffix}", fps=8, codec=codec)
    assert path.suffix == CODECS[codec].suffix and CODECS[codec].lossless
    assert image_digest(read_frames(path)) == image_digest(frames)
    lossy = read_frames(write_video(frames, tmp_path / "v.mp4", fps=8))  # the default, H.264 4:2:0 at CRF 18
    assert image_digest(lossy) != image_digest(frames)


@pytest.mark.parametrize("codec, stream", [("h264", "h264"), ("prores", "prores"), ("webm", "vp9"), ("gif", "gif")])
def test_every_codec_writes_a_video_ffmpeg_reads_back(tmp_path, codec, stream):
    frames = moving_texture()
    path = write_video(frames, tmp_path / f"v{CODECS[codec].suffix}", fps=8, codec=codec)
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                           text=True)  # fmt: skip
    assert f"Video: {stream}" in probe.stderr
    back = read_frames(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 12  # lossy, but the same pictures
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left


def test_a_gif_of_at_most_256_colours_is_exact_and_more_says_it_is_lossy(tmp_path):
    few = moving_texture() // 64 * 64  # 4 levels per channel: 64 colours
    assert palette_note("gif", few) is None
    assert image_digest(read_frames(write_video(few, tmp_path / "few.gif", fps=8, codec="gif"))) == image_digest(few)
    many = moving_texture()
    note = palette_note("gif", many)
    assert note.startswith("the frames have ") and "a GIF holds 256: it is lossy" in note
    back = read_frames(write_video(many, tmp_path / "many.gif", fps=8, codec="gif"))
    assert image_digest(back) != image_digest(many) and len(np.unique(back.reshape(-1, 3), axis=0)) <= 256


def test_a_codec_without_a_crf_refuses_one(tmp_path):
    with pytest.raises(ValueError, match="ffv1 takes no CRF"):
        write_video(moving_texture(), tmp_path / "v.mkv", fps=8, codec="ffv1", crf=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frames, fps, target, count",
    [
        (9, 8, 24, 27),
        (9, 8, 30, 34),
        (17, 8, 12, 26),
        (25, 12, 25, 52),
    ],  # seconds, the original's / the copy's: 1.125 / 1.125, 1.125 / 1.133, 2.125 / 2.167, 2.083 / 2.080
)
def test_interpolation_lasts_as_long_at_the_higher_rate(tmp_path, frames, fps, target, count):
    """minterpolate (mi_mode=mci) at `target` fps: as many frames as last as long as the original
    (to the nearest frame), written at that fps; frames on the original's instants are the
    original's, within YUV rounding; frames between differ from both neighbours. `on_frame` hears
    of each frame made, and of each frame written."""
    clip = moving_texture(frames)
    made_frames, written_frames = [], []
    made = interpolate(clip, fps, target, on_frame=lambda: made_frames.append(1))
    assert interpolated_count(frames, fps, target) == count and made.shape == (count, *clip.shape[1:])
    assert len(made_frames) == count
    path = write_video(
        made, tmp_path / "v.interp.mkv", fps=target, codec="ffv1", on_frame=lambda: written_frames.append(1)
    )
    assert len(written_frames) == count
    video = DecodedVideo.read(path, planes=("rgb",))
    assert video.frames == count and video.fps == target
    assert abs(video.frames / video.fps - frames / fps) <= 0.5 / target  # the same duration
    for k in range(count):
        source = k * fps / target
        if source == int(source) and source < frames:
            assert np.abs(made[k].astype(int) - clip[int(source)]).max() <= 3
    if target % fps == 0:  # an in-between frame: moved part way, neither neighbour
        between = made[1].astype(int)
        assert np.abs(between - clip[0]).mean() > 1 and np.abs(between - clip[1]).mean() > 1


def test_mp4_keeps_smooth_content(tmp_path):
    """A smooth gradient survives H.264 at our CRF almost unchanged."""
    x = np.linspace(0, 255, 96)[None, None, :, None]
    y = np.linspace(0, 255, 64)[None, :, None, None]
    t = np.arange(5)[:, None, None, None] * 10
    frames = np.broadcast_to((x + y) / 2 + t, (5, 64, 96, 3)).clip(0, 255).astype(np.uint8)
    back = read_frames(write_video(frames, tmp_path / "g.mp4", fps=8))
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 2.0


def test_contact_sheet_picks_evenly_and_places_in_order():
    frames = np.stack([np.full((64, 96, 3), 8 * i, np.uint8) for i in range(30)])  # frame i has value 8i
    sheet = np.asarray(contact_sheet(frames, max_frames=8, columns=4))
    assert sheet.shape == (2 * 128, 4 * 192, 3)  # 96 px frames scaled x2 to stay readable
    tiles = [sheet[r * 128 + 100, c * 192 + 100, 0] for r in range(2) for c in range(4)]  # below the labels
    assert [int(v) // 8 for v in tiles] == [0, 4, 8, 12, 17, 21, 25, 29]  # first and last frame included


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(OSError, match="ffmpeg could not write .*crf to value -5"):  # x264 takes 0 to 51
        write_video(np.zeros((9, 64, 96, 3), np.uint8), tmp_path / "v.mp4", fps=8, crf=-5)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the partial file


def test_ffmpeg_past_its_deadline_is_killed_and_leaves_no_file(tmp_path, monkeypatch):
    """No ffmpeg run can hold its caller for good (a Videos API runner, say): once it goes its
    deadline without a frame it is killed, and the write fails saying so; a run whose frames keep
    coming is not cut short, however long it takes in all."""
    import stages.video_io as video_io

    monkeypatch.setattr(video_io, "FFMPEG_DEADLINE_S", 0.4)
    frames = np.zeros((9, 64, 96, 3), np.uint8)

    class SlowFrames:  # a frame every `every` seconds
        ndim, shape, dtype = frames.ndim, frames.shape, frames.dtype

        def __init__(self, every: float):
            self.every = every

        def __iter__(self):
            for frame in frames:
                time.sleep(self.every)
                yield frame

    write_video(SlowFrames(0.1), tmp_path / "steady.mp4", fps=8)  # 0.9 s in all, never 0.4 s without a frame
    assert read_frames(tmp_path / "steady.mp4").shape == frames.shape
    (tmp_path / "steady.mp4").unlink()
    started = time.monotonic()
    with pytest.raises(video_io.FfmpegTimeout, match="went 0.4 s without a frame"):
        write_video(SlowFrames(1.0), tmp_path / "v.mp4", fps=8)
    assert time.monotonic() - started < 5
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_is_started_without_running_python_in_the_child(tmp_path, monkeypatch):
    """ffmpeg starts in a session of its own, without a preexec_fn: Python code between fork and
    exec can deadlock a process with many threads (the Videos API's ingress)."""
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    path = write_video(np.zeros((9, 64, 96, 3), np.uint8), tmp_path / "v.mp4", fps=8)
    assert read_frames(path).shape == (9, 64, 96, 3) and read_frame(path, 4).shape == (64, 96, 3)
    assert len(started) >= 3 and all(k.get("preexec_fn") is None and k["start_new_session"] for k in started)
