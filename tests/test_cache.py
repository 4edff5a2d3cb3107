"""Step caching (issue 23): diffusers' own cache hooks, equal to the stock hook on the stock
pipeline in one process, equal to one process over every parallel layout, refused before any
work where a family does not take a spec."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.executor import LocalExecutor
from stages.cache import diffusers_config, parse_cache, skipped_fraction
from stages.context_parallel import ParallelLayout
from stages.errors import InvalidRequest
from stages.families import family_for
from stages.models import ComponentSpec, load_spec
from stages.request import build_request
from stages.weights import resolve_weights

TOL = 1e-5
SHAPES_PROMPT = "a red circle moving right on a black background"
# (model, cache, steps): thresholds chosen so that each cache skips some work at these steps.
CASES = [
    ("framecast-shapes", "fbc:0.3", 8),
    ("framecast-shapes", "pab:2", 8),
    ("framecast-shapes", "taylorseer:2", 8),
    ("tiny-wan", "fbc:0.2", 6),
    ("tiny-wan", "taylorseer:2", 6),
    ("tiny-wan22", "fbc:0.3", 6),
    ("tiny-wan22", "taylorseer:2", 12),  # each expert its own predictions, after its 3 full steps
    ("tiny-i2v", "fbc:0.5", 6),  # image-to-video: CogVideoX's image latents joined along channels
    ("tiny-wan-i2v", "fbc:0.2", 6),  # Wan 2.1's, with CLIP states beside the text
]
# The image image-to-video cases start from (the pipelines fit it to the video's size).
_y, _x = np.mgrid[0:80, 0:120]
PICTURE = np.stack([_x * 255 // 120, _y * 255 // 80, (_x + _y) * 127 // 200], -1).astype(np.uint8)


def model(name):
    spec = load_spec(name)
    return spec, resolve_weights(spec)


def request(spec, cache, steps, **settings):
    prompt = SHAPES_PROMPT if spec.name == "framecast-shapes" else "a fox in the snow"
    image = "picture.png" if spec.takes_image else None
    return build_request(spec, prompt, cache=cache, steps=steps, seed=3, image=image, **settings)


def stock(spec, weights, r):
    """Stock diffusers: the model's pipeline with the same diffusers cache config on each transformer."""
    pipe = ComponentSpec(spec.pipeline).load_class().from_pretrained(weights, dtype=spec.torch_dtype())
    pipe.scheduler = spec.scheduler_class(r.scheduler).from_config(pipe.scheduler.config)  # the request's
    pipe.set_progress_bar_config(disable=True)
    cache = parse_cache(r.cache, family_for(spec).cache_kinds, spec.name)
    for network in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if network is not None and cache.enabled:
            network.enable_cache(diffusers_config(cache, lambda: pipe.current_timestep, network.dtype))
    extra = {"guidance_scale_2": r.guidance_scale_2} if r.guidance_scale_2 is not None else {}
    if r.image:
        from PIL import Image

        extra["image"] = Image.fromarray(PICTURE)
    return pipe(prompt=r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale, num_frames=r.num_frames, height=r.height, width=r.width,
                max_sequence_length=family_for(spec).max_text_tokens, generator=torch.Generator().manual_seed(r.seed),
                output_type="latent", **extra).frames  # fmt: skip


def denoise(executor, r):
    """(latents, the fraction of wrapped calls reused over the group, and every rank's counts)."""
    image = (PICTURE, (r.height, r.width), r.num_frames) if r.image else ()
    encoded = executor.call("encode", "encode", r.prompt, r.negative_prompt, r.do_classifier_free_guidance, *image)
    denoised = executor.call("denoise", "denoise", encoded, r)
    reports = executor.reports(denoised)
    return executor.get(denoised), skipped_fraction(reports), [(x["cache_calls"], x["cache_computed"]) for x in reports]


@pytest.mark.parametrize("name, cache, steps", CASES, ids=lambda x: str(x))
def test_each_spec_equals_the_stock_hook_on_the_stock_pipeline(name, cache, steps):
    spec, weights = model(name)
    executor = LocalExecutor(spec, weights)
    r = request(spec, cache, steps)
    ours, skipped, _ = denoise(executor, r)
    reference = stock(spec, weights, r)
    reference = reference if reference.shape == ours.shape else reference.permute(0, 2, 1, 3, 4)
    assert (ours - reference).abs().max().item() <= TOL
    assert skipped > 0  # the cache did skip work here...
    uncached, none_skipped, counts = denoise(executor, request(spec, "none", steps))
    assert none_skipped == 0.0 and counts == [(0, 0)]
    assert (ours - uncached).abs().max().item() > 1e-3  # ...and it changed the result


def test_specs_a_family_does_not_take_are_refused_before_any_work():
    shapes, wan = load_spec("framecast-shapes"), load_spec("tiny-wan")
    with pytest.raises(InvalidRequest, match=r"^cache 'pab:2' is not one tiny-wan takes; it takes none, "
                                             r"fbc:THRESHOLD, taylorseer:N$"):  # fmt: skip
        build_request(wan, "a fox", cache="pab:2")
    with pytest.raises(InvalidRequest, match="cache 'magcache' is not one framecast-shapes takes; it takes none, "
                                             "fbc:THRESHOLD, pab:N, taylorseer:N"):  # fmt: skip
        build_request(shapes, SHAPES_PROMPT, cache="magcache")
    with pytest.raises(InvalidRequest, match=r"cache 'fbc:high': fbc takes fbc:THRESHOLD, a number"):
        build_request(shapes, SHAPES_PROMPT, cache="fbc:high")
    with pytest.raises(InvalidRequest, match=r"cache 'fbc:1.5': the threshold must lie between 0 and 1"):
        build_request(shapes, SHAPES_PROMPT, cache="fbc:1.5")
    with pytest.raises(InvalidRequest, match=r"cache 'taylorseer:1': N must be between 2 and 16"):
        build_request(shapes, SHAPES_PROMPT, cache="taylorseer:1")
    unet = load_spec("tiny-i2vgen")
    with pytest.raises(InvalidRequest, match=r"cache 'fbc:0.1' is not one tiny-i2vgen takes; it takes none$"):
        build_request(unet, "a fox", cache="fbc:0.1", image="x.png")
    assert build_request(shapes, SHAPES_PROMPT, cache=" FBC:0.30 ").cache == "fbc:0.3"  # one spelling
    assert build_request(shapes, SHAPES_PROMPT).cache == "none"
    assert "cache" in build_request(shapes, SHAPES_PROMPT).as_dict()


# Over a denoiser group the cache decides as one process does: FirstBlockCache's residual is
# summed over the ranks one forward call spans (CogVideoX: both branches, one batch; Wan: each
# branch its own call), padding excluded (framecast-shapes' 5 latent frames split 3 + 2).
# Some CogVideoX layouts use `tiny`: with framecast-shapes' trained weights, CFG-parallel differs
# from one process by 1.5e-5 even uncached (one batch of two and two of one sum their GEMMs in
# another order), and TaylorSeer's extrapolation multiplies such float differences (3e-5 over
# ulysses2 x ring2): neither is a different cache decision, which would differ by far more.
@pytest.mark.parametrize(
    "name, cache, steps, layout, settings",
    [("tiny", "fbc:0.3", 6, ParallelLayout(cfg=2), {}),
     ("framecast-shapes", "fbc:0.3", 8, ParallelLayout(ulysses=2), {}),
     ("framecast-shapes", "fbc:0.3", 8, ParallelLayout(ring=2), {"guidance_scale": 1.0}),
     ("tiny", "fbc:0.3", 6, ParallelLayout(cfg=2, ulysses=2), {}),
     ("tiny", "pab:2", 6, ParallelLayout(cfg=2, ring=2), {}),
     ("tiny", "taylorseer:2", 6, ParallelLayout(ulysses=2, ring=2), {}),
     ("tiny-wan", "fbc:0.2", 6, ParallelLayout(cfg=2, ulysses=2), {}),
     ("tiny-wan", "fbc:0.2", 6, ParallelLayout(ring=2), {}),
     ("tiny-wan", "taylorseer:2", 6, ParallelLayout(cfg=2, ring=2), {}),
     ("tiny-wan", "fbc:0.2", 6, ParallelLayout(ulysses=2, ring=2), {}),  # no CFG-parallel: one decision, 4 ranks
     ("tiny-wan22", "fbc:0.3", 6, ParallelLayout(cfg=2, ulysses=2), {}),
     ("tiny-wan22", "taylorseer:2", 12, ParallelLayout(ring=2), {}),  # each expert predicts after its 3 full steps
     ("tiny-i2v", "fbc:0.5", 6, ParallelLayout(cfg=2, ulysses=2), {}),
     ("tiny-wan-i2v", "fbc:0.2", 6, ParallelLayout(cfg=2, ulysses=2), {})],
    ids=str,
)  # fmt: skip
def test_a_cache_over_a_group_equals_one_process(executors, name, cache, steps, layout, settings):
    spec, weights = model(name)
    r = request(spec, cache, steps, **settings)
    one, one_skipped, _ = denoise(LocalExecutor(spec, weights), r)
    group, skipped, counts = denoise(executors.get(spec, weights, layout), r)
    assert (group - one).abs().max().item() <= TOL
    assert one_skipped > 0 and skipped == pytest.approx(one_skipped)
    # every rank of a guidance branch decided alike (and, one forward call for both, every rank)
    branches = [counts[b * layout.sequence_degree : (b + 1) * layout.sequence_degree] for b in range(layout.cfg)]
    assert all(len(set(branch)) == 1 for branch in branches)
    if family_for(spec).branches_in_one_call:
        assert len(set(counts)) == 1


def test_a_cached_run_records_what_it_cost_against_its_uncached_twin(tmp_path, capsys, mlflow_uri):
    """framecast generate --cache ... --cache-reference on framecast-shapes: the cached video and
    its uncached twin are both written and tracked; the cached run's metrics, read back from
    MLflow, hold the skipped fraction and the comparison, and equal what the frames say."""
    import json

    from mlflow import MlflowClient

    from cluster.cli import main
    from stages.video_io import read_frames

    video = tmp_path / "shapes.mp4"
    args = ["generate", "--model", "framecast-shapes", "--prompt", SHAPES_PROMPT, "--steps", "8", "--cache", "fbc:0.3",
            "--cache-reference", "--output", str(video), "--tracking-uri", mlflow_uri, "--local", "--json"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    cached, twin = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert cached["video"] == str(video) and twin["video"] == str(tmp_path / "shapes.uncached.mp4")
    assert twin["params"]["cache"] == "none" and cached["params"]["cache"] == "fbc:0.3"
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(cached["run_id"]).data.metrics
    twin_metrics = client.get_run(twin["run_id"]).data.metrics
    assert 0 < metrics["cache/skipped_fraction"] < 1 and "cache/skipped_fraction" not in twin_metrics
    assert 0 < metrics["vs_uncached/ssim_y"] < 1 and 10 < metrics["vs_uncached/psnr_y"] < 60
    assert metrics["vs_uncached/denoise_speedup"] == pytest.approx(twin_metrics["denoise_s"] / metrics["denoise_s"])
    for key in ("clarity/sharpness_laplacian_var", "adherence/score"):
        assert metrics[f"vs_uncached/delta/{key}"] == pytest.approx(metrics[key] - twin_metrics[key])
    assert not np.array_equal(read_frames(video), read_frames(Path(twin["video"])))  # both written, and differ


def test_versus_uncached_figures():
    """+4 in R, G and B is about +3.4 in studio-range luma (4 x 219/255, rounded per pixel to 3 or 4):
    near 10 log10(255^2 / 3.4^2) = 37.5 dB; deltas are cached minus uncached."""
    from stages.cache import versus_uncached

    rng = np.random.default_rng(0)
    uncached = rng.integers(40, 200, size=(3, 32, 32, 3), dtype=np.uint8)
    cached = uncached + np.uint8(4)
    mine = {"denoise_s": 1.0, "clarity/tenengrad": 5.0, "adherence/score": 0.5}
    theirs = {"denoise_s": 2.0, "clarity/tenengrad": 7.0, "adherence/score": 1.0}
    figures = versus_uncached(cached, mine, uncached, theirs)
    assert 36.1 < figures["vs_uncached/psnr_y"] < 38.6  # between errors of 4 and of 3 everywhere
    assert figures["vs_uncached/denoise_speedup"] == 2.0
    assert figures["vs_uncached/delta/clarity/tenengrad"] == -2.0
    assert figures["vs_uncached/delta/adherence/score"] == -0.5
    assert 0.9 < figures["vs_uncached/ssim_y"] < 1.0


def test_cache_reference_without_a_cache_is_refused(tmp_path, capsys):
    from cluster.cli import EXIT_INVALID, main

    code = main(["generate", "--model", "framecast-shapes", "--prompt", SHAPES_PROMPT, "--cache-reference",
                 "--output-dir", str(tmp_path), "--local"])  # fmt: skip
    assert code == EXIT_INVALID
    assert "--cache-reference compares a cached video with the same made uncached: set --cache too" in (
        capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir())


def test_a_sweep_over_caches_with_none_compares_each_with_its_uncached_cell(tmp_path, capsys, mlflow_uri):
    """--grid cache=none,... on framecast-shapes: each cached cell's run has its skipped fraction
    and what it cost against the uncached cell of the same settings; the table and heatmaps show them."""
    import json

    from mlflow import MlflowClient

    from cluster.cli import main

    argv = ["sweep", "--model", "framecast-shapes", "--local", "--prompt", SHAPES_PROMPT, "--steps", "8",
            "--grid", "cache=fbc:0.3,none,taylorseer:2", "--grid", "guidance=1,6", "--json",
            "--tracking-uri", mlflow_uri, "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    client = MlflowClient(mlflow_uri)
    runs = {o["label"]: client.get_run(o["run_id"]).data.metrics for o in result["outcomes"]}
    assert len(runs) == 6
    for guidance in ("1.0", "6.0"):
        uncached = runs[f"cache=none,guidance={guidance}"]
        assert not any(k.startswith(("vs_uncached/", "cache/")) for k in uncached)
        for cache in ("fbc:0.3", "taylorseer:2"):
            cached = runs[f"cache={cache},guidance={guidance}"]
            assert 0 < cached["cache/skipped_fraction"] < 1
            assert 10 < cached["vs_uncached/psnr_y"] < 100 and 0 < cached["vs_uncached/ssim_y"] <= 1
            speedup = uncached["denoise_s"] / cached["denoise_s"]
            assert cached["vs_uncached/denoise_speedup"] == pytest.approx(speedup)
            delta = cached["adherence/score"] - uncached["adherence/score"]
            assert cached["vs_uncached/delta/adherence/score"] == pytest.approx(delta)
    summary = tmp_path / next(p.name for p in tmp_path.iterdir() if p.name.startswith("sweep-")) / "summary"
    header = (summary / "table.md").read_text().splitlines()[0]
    for key in ("cache/skipped_fraction", "vs_uncached/psnr_y", "vs_uncached/ssim_y", "vs_uncached/denoise_speedup"):
        assert key in header
    assert (summary / "heatmaps" / "vs_uncached_psnr_y.png").is_file()
    assert (summary / "heatmaps" / "cache_skipped_fraction.png").is_file()
    assert not list(tmp_path.rglob("*.frames.npy"))  # the twins' raw frames go once every cell is compared


def test_tune_cache_chooses_the_fastest_spec_within_the_bound():
    """On figures where the answer is known: the fastest spec whose worst PSNR meets the bound and
    whose adherence does not drop; none when no spec does."""
    from cluster.tune_cache import choose, figures_by_spec

    def cell(psnr, speedup, adherence=0.0):
        return {"vs_uncached/psnr_y": psnr, "vs_uncached/ssim_y": 0.9, "vs_uncached/denoise_speedup": speedup,
                "cache/skipped_fraction": 0.5, "vs_uncached/delta/adherence/score": adherence}  # fmt: skip

    cells = [
        ("fbc:0.1", cell(41, 1.2)),
        ("fbc:0.1", cell(40, 1.2)),
        ("fbc:0.3", cell(33, 1.5)),
        ("fbc:0.3", cell(31, 1.7)),  # worst 31, mean speedup 1.6
        ("fbc:0.5", cell(45, 2.2)),
        ("fbc:0.5", cell(25, 1.8)),  # fastest, but one video at 25 dB
        ("taylorseer:2", cell(36, 1.8, -0.5)),
        ("taylorseer:2", cell(35, 1.8, 0.0)),
    ]  # adherence drops
    figures = figures_by_spec(cells)
    assert [f.cache for f in figures] == ["fbc:0.1", "fbc:0.3", "fbc:0.5", "taylorseer:2"]
    by_spec = {f.cache: f for f in figures}
    assert by_spec["fbc:0.3"].worst_psnr_y == 31 and by_spec["fbc:0.3"].speedup == pytest.approx(1.6)
    assert by_spec["taylorseer:2"].adherence_change == pytest.approx(-0.25)
    assert choose(figures, 30).cache == "fbc:0.3"
    assert choose(figures, 20).cache == "fbc:0.5"
    assert choose(figures, 32).cache == "fbc:0.1"
    assert choose(figures, 42) is None
    missing = figures_by_spec([("pab:2", {"vs_uncached/denoise_speedup": 3.0})])  # no PSNR: fails any bound
    assert choose(missing, 1) is None


def test_tune_cache_end_to_end_and_recommend_shows_it(tmp_path, capsys, mlflow_uri):
    """framecast tune-cache on framecast-shapes (two specs, one prompt, one seed, 8 steps): the
    parent run records the answer and its table, which is the fastest meeting the bound; with an
    unreachable bound the answer is none; recommend shows the latest."""
    import json

    from mlflow import MlflowClient

    from cluster.cli import main

    base = ["tune-cache", "--model", "framecast-shapes", "--prompt", SHAPES_PROMPT, "--steps", "8",
            "--specs", "fbc:0.3,taylorseer:2", "--local", "--json", "--tracking-uri", mlflow_uri,
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert main([*base, "--min-psnr", "10"]) == 0, capsys.readouterr().err
    answer = json.loads(capsys.readouterr().out)
    meeting = [s for s in answer["specs"] if s["worst_psnr_y"] >= 10 and (s["adherence_change"] or 0) >= 0]
    assert answer["cache"] == max(meeting, key=lambda s: s["speedup"])["cache"]
    run = MlflowClient(mlflow_uri).get_run(answer["run_id"])
    assert run.data.tags["framecast.tuned_cache"] == answer["cache"] and run.data.params["min_psnr_y"] == "10"
    (sweep,) = run.data.params["sweeps"].split(",")  # one prompt, one seed: one sweep, nested under it
    assert MlflowClient(mlflow_uri).get_run(sweep).data.tags["mlflow.parentRunId"] == answer["run_id"]
    table = MlflowClient(mlflow_uri).download_artifacts(answer["run_id"], "tune.md", str(tmp_path))
    assert f"| {answer['cache']} |" in Path(table).read_text() and "chosen" in Path(table).read_text()

    assert main(["recommend", "--model", "framecast-shapes", "--prompt", SHAPES_PROMPT,
                 "--tracking-uri", mlflow_uri]) == 0  # fmt: skip
    assert f"--cache {answer['cache']}:" in capsys.readouterr().out

    assert main([*base, "--min-psnr", "200"]) == 0  # the sweeps are reused; no spec reaches 200 dB
    unreachable = json.loads(capsys.readouterr().out)
    assert unreachable["cache"] == "none" and "no cache keeps every video at 200 dB" in unreachable["answer"]
    assert main(["recommend", "--model", "framecast-shapes", "--prompt", SHAPES_PROMPT, "--json",
                 "--tracking-uri", mlflow_uri]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["tuned_cache"]["cache"] == "none"


def test_tune_cache_tunes_an_image_to_video_model(tmp_path, capsys, mlflow_uri, monkeypatch):
    """tune-cache hands its image and negative prompt to every sweep it plans, as sweep does:
    an image-to-video model is tuned at the user's picture."""
    import json

    from PIL import Image
    from test_diffusers_equality import picture

    import cluster.tune_cache
    from cluster.cli import main

    planned = []
    plan_sweep = cluster.tune_cache.plan_sweep
    monkeypatch.setattr(
        cluster.tune_cache, "plan_sweep", lambda *a, **k: planned.append(plan_sweep(*a, **k)) or planned[-1]
    )
    image = tmp_path / "first.png"
    Image.fromarray(picture(80, 120)).save(image)
    assert main(["tune-cache", "--model", "tiny-i2v", "--prompt", "a red fox", "--image", str(image),
                 "--negative-prompt", "blurry", "--steps", "2", "--frames", "9", "--specs", "fbc:0.1",
                 "--min-psnr", "10", "--local", "--json", "--tracking-uri", mlflow_uri,
                 "--output-dir", str(tmp_path / "out")]) == 0, capsys.readouterr().err  # fmt: skip
    assert json.loads(capsys.readouterr().out)["cache"] in ("none", "fbc:0.1")
    requests = [job.request for plan in planned for job in plan.jobs]
    assert len(requests) == 2 and all(r.image == str(image) and r.negative_prompt == "blurry" for r in requests)


def test_tune_cache_refuses_bad_input_before_any_work(tmp_path, capsys):
    from cluster.cli import EXIT_INVALID, main

    base = ["tune-cache", "--model", "framecast-shapes", "--prompt", SHAPES_PROMPT, "--local",
            "--output-dir", str(tmp_path)]  # fmt: skip
    for extra, message in [(["--min-psnr", "30", "--cache", "fbc:0.1"], "tune-cache tries the caches itself"),
                           (["--min-psnr", "30", "--specs", "magcache"], "cache 'magcache' is not one framecast"),
                           (["--min-psnr", "30", "--specs", "none,fbc:0.1"], "leave none out of --specs"),
                           (["--min-psnr", "30", "--seeds", "1,x"], "--seeds takes non-negative integers"),
                           (["--min-psnr", "-3"], "--min-psnr must be positive")]:  # fmt: skip
        assert main([*base, *extra]) == EXIT_INVALID
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_preset_may_set_a_cache(tmp_path, monkeypatch):
    """A preset's `cache` fills the request (explicit settings win), and is checked per model."""
    from cluster.settings import resolve_settings
    from stages import presets

    (tmp_path / "draft.yaml").write_text("description: drafts\nkinds: [t2v]\nsettings:\n  cache: fbc:0.3\n  steps: 8\n")
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    shapes = load_spec("framecast-shapes")
    settings = resolve_settings(shapes, {}, "draft")
    assert build_request(shapes, SHAPES_PROMPT, **settings.request_kwargs()).cache == "fbc:0.3"
    mine = resolve_settings(shapes, {"cache": "taylorseer:3"}, "draft")
    assert build_request(shapes, SHAPES_PROMPT, **mine.request_kwargs()).cache == "taylorseer:3"
    (tmp_path / "broadcast.yaml").write_text("description: x\nkinds: [t2v]\nsettings:\n  cache: pab:2\n")
    wan = load_spec("tiny-wan")
    with pytest.raises(InvalidRequest, match="cache 'pab:2' is not one tiny-wan takes"):
        build_request(wan, "a fox", **resolve_settings(wan, {}, "broadcast").request_kwargs())


def test_cached_results_wait_for_their_uncached_twin_in_any_order():
    """cluster.uncached: a cached result comes after its twin's is known (before the twin itself),
    with the comparison; a failed twin leaves it without; a twin from an earlier try serves too."""
    from types import SimpleNamespace

    from cluster.uncached import paired_with_uncached

    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)

    def result(index, shift=0, failed=False):
        kept = None if failed else frames + shift
        return SimpleNamespace(index=index, metrics={"denoise_s": 1.0 + index}, frames=kept)

    # jobs 0 and 2 are cached, twin 1 serves both; job 3 is cached, its twin 4 failed; 5 alone
    twins = {0: 1, 2: 1, 3: 4}
    arriving = [result(2, 2), result(3, 1), result(5), result(1), result(0, 1), result(4, failed=True)]
    order = list(paired_with_uncached(arriving, twins, lambda r: r.index, lambda r: r))
    assert [r.index for r in order] == [5, 2, 1, 0, 3, 4]
    by_index = {r.index: r for r in order}
    assert by_index[2].metrics["vs_uncached/denoise_speedup"] == pytest.approx(2.0 / 3.0)
    assert by_index[0].metrics["vs_uncached/psnr_y"] > by_index[2].metrics["vs_uncached/psnr_y"]
    assert "vs_uncached/psnr_y" not in by_index[3].metrics and "vs_uncached/psnr_y" not in by_index[5].metrics
    assert all(r.frames is None for r in order if r.index != 5)  # nothing of a pair kept once compared

    earlier = {7: (frames, {"denoise_s": 4.0})}
    (late,) = paired_with_uncached([result(6)], {6: 7}, lambda r: r.index, lambda r: r, earlier)
    assert late.metrics["vs_uncached/denoise_speedup"] == pytest.approx(4.0 / 7.0)


def test_a_sweep_pairs_each_cached_cell_with_its_uncached_one():
    from cluster.settings import resolve_settings
    from cluster.sweep import plan_sweep, uncached_twins

    shapes = load_spec("framecast-shapes")
    grid = {"steps": [4, 8], "cache": ["FBC:0.30", "None", "taylorseer:2"]}
    plan = plan_sweep("framecast-shapes", SHAPES_PROMPT, grid, resolve_settings(shapes, {}, None), local=True)
    labels = [cell.label for cell in plan.cells]
    named = {labels[c]: labels[t] for c, t in uncached_twins(plan).items()}
    assert named == {
        "steps=4,cache=FBC:0.30": "steps=4,cache=None",
        "steps=4,cache=taylorseer:2": "steps=4,cache=None",
        "steps=8,cache=FBC:0.30": "steps=8,cache=None",
        "steps=8,cache=taylorseer:2": "steps=8,cache=None",
    }
    no_none = plan_sweep("framecast-shapes", SHAPES_PROMPT, {"cache": ["fbc:0.3", "pab:2"]},
                         resolve_settings(shapes, {}, None), local=True)  # fmt: skip
    assert uncached_twins(no_none) == {}


def test_one_denoiser_changing_its_cache_between_jobs_equals_a_fresh_one():
    """The hooks, their state and the counts follow each job's spec: after fbc and pab jobs, a
    taylorseer job (and then an uncached one) equals the same job on a fresh stage."""
    from stages.denoiser import DenoiserStage
    from stages.encoder import EncoderStage

    spec, weights = model("tiny")
    encoder = EncoderStage(spec, weights)

    def run(stage, cache):
        r = request(spec, cache, 6)
        conditioning = encoder.encode(r.prompt, r.negative_prompt, r.do_classifier_free_guidance, None, None)
        latents = stage.denoise(conditioning, r)
        return latents, skipped_fraction([stage.last_run_stats()])

    used = DenoiserStage(spec, weights)
    for cache in ("fbc:0.3", "pab:2", "fbc:0.3"):
        run(used, cache)
    for cache in ("taylorseer:2", "none"):
        latents, skipped = run(used, cache)
        fresh_latents, fresh_skipped = run(DenoiserStage(spec, weights), cache)
        assert torch.equal(latents, fresh_latents) and skipped == fresh_skipped
