"""framecast against stock diffusers on one GPU, at real size, in the same process and run.

    python bench/gpu.py --model cogvideox-2b cogvideox-5b wan2.1-t2v-1.3b --device cuda --out $OUT
    python bench/gpu.py --model tiny --device cpu --steps 2 --timing-steps 2 --out /tmp/gpu   # smoke test

No weights are downloaded: each model's transformer and VAE are built with seeded random weights
at their real size from the model YAML's architecture configs, directly on the device, and saved
once as a diffusers directory (under `--scratch`) for the stages and the Ray actors to load. The
prompt's states are random tensors of the text encoder's shape (the denoising's cost does not
depend on their values; no text encoder is built). The figures are timings, memory and
agreement between framecast and stock; random weights say nothing of a video's quality.

Sections, per model, in this order (each writes `<out>/gpu.json` and `<out>/gpu.md` again when
it ends, so a run cut short keeps what it finished; a section that fails records its error and
the run goes on; `--budget-s` skips the sections that would start after it):
- denoise: stock pipeline (prompt_embeds in, output_type="latent") and framecast's DenoiserStage
  (eager, the YAML's levers off), `--timing-steps` steps each after a warm-up: seconds per step,
  peak memory, the max abs difference of the latents (same weights, seed and settings);
- decode: stock (the pipeline's decode) and framecast's DecoderStage untiled and tiled: seconds,
  memory added, PSNR between the two, and the untiled decode's bytes per output pixel;
- attention: each SDPA kernel on one layer's attention at the model's shape (ms, TFLOP/s), the
  automatic choice, and each ring log-sum-exp kernel against fp32 math;
- e2e (`--e2e` models): `--steps` steps plus decode, stock pipeline (output_type="np"),
  framecast in-process (the stages `--local` builds), and framecast through the Ray actors; then
  a stream of 4 jobs through Ray against the slowest stage's time;
- compile: framecast with regional compile (the compile's cost, then s/step) and stock with the
  same blocks compiled; compiled latents against eager;
- fp8 (`--fp8` models, with torchao and an Ada/Hopper GPU): the steps with fp8 linear layers
  (compiled), and its error against bf16: frame PSNR and the clarity panel's deltas;
- offload (`--offload` models): the denoiser with `--offload model` and `group` under a 22 GiB
  cap on the process (a 24 GB card), with the decoder choosing its tiling by free memory.

On a machine with a 10-minute limit per command, split the run with `--order` (bench/RESULTS.md,
"GPU", has the two commands), or keep `--copy-to DIR` and finish with `--resume DIR/gpu.json`.
Pipe the log through `grep --line-buffered` (not plain grep) if at all: a killed pipe loses what
a buffer held. On a CUDA machine without framecast's packages and no network, carry wheels for
Python 3.12, manylinux x86_64 (`pip download --no-deps --only-binary=:all: ...`): diffusers, Ray
(slimmed to 35 MB by tools/slim_ray_wheel.py), torchao, PyWavelets, ftfy, wcwidth, jsonschema,
jsonschema-specifications, referencing, rpds-py and imageio-ffmpeg (the pure-Python build: the
clarity panel then has no ffmpeg, and the fp8 section keeps the frames it would have measured);
install them with `pip install --no-deps --target DIR` and put DIR on PYTHONPATH (Ray's workers
inherit it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.acceleration import (  # noqa: E402
    Acceleration,
    attention_kernel,
    available_kernels,
    check_acceleration,
    choose_attention,
    compile_repeated_blocks,
)
from stages.context_parallel import attention_with_lse  # noqa: E402
from stages.decoder import DecoderStage, plan_decode  # noqa: E402
from stages.denoiser import DenoiserStage  # noqa: E402
from stages.device import PeakMemory, cuda_capability, describe  # noqa: E402
from stages.families import Conditioning, family_for  # noqa: E402
from stages.models import ComponentSpec, ModelSpec, load_spec  # noqa: E402
from stages.request import build_request  # noqa: E402

# What one table row holds for each measured thing, in order (the smoke test checks these).
COLUMNS = ("model", "section", "what", "stock", "framecast", "framecast / stock", "note")
CAP_GIB = 22.0  # a 24 GB card, less the CUDA context and what the allocator cannot use


# -- building ------------------------------------------------------------------------------------


def build_weights(spec: ModelSpec, device: torch.device, scratch: Path) -> Path:
    """The denoiser(s), VAE and scheduler with seeded random weights at the spec's real size,
    initialised on `device` (5b's 5.6 B parameters take minutes on a CPU), saved once."""
    directory = scratch / f"framecast-gpu-{spec.name}-{spec.dtype}"
    if (directory / "model_index.json").is_file():
        return directory
    family = family_for(spec)
    keys = [k for k in ("transformer", "transformer_2", "unet", "vae") if k in spec.components]
    for n, key in enumerate(keys):
        torch.manual_seed(n)
        with device:
            module = spec.components[key].load_class().from_config(spec.components[key].config)
        module.to(spec.torch_dtype()).save_pretrained(directory / key)
        del module
    scheduler = spec.components["scheduler"]
    scheduler.load_class().from_config(scheduler.config).save_pretrained(directory / "scheduler")
    index = {"_class_name": spec.pipeline.rsplit(".", 1)[-1], **spec.pipeline_config}
    (directory / "model_index.json").write_text(json.dumps(index))
    assert family.denoiser_key in spec.components
    return directory


def text_states(spec: ModelSpec, guidance: bool) -> Conditioning:
    """Random prompt states of the text encoder's shape (T5's are of order 0.1-1)."""
    family = family_for(spec)
    config = spec.components["text_encoder"].config
    width = config.get("d_model") or config.get("hidden_size")
    generator = torch.Generator("cpu").manual_seed(1)
    shape = (1, family.max_text_tokens, width)
    prompt = (0.2 * torch.randn(shape, generator=generator)).to(spec.torch_dtype())
    negative = (0.2 * torch.randn(shape, generator=generator)).to(spec.torch_dtype()) if guidance else None
    return Conditioning(prompt=prompt, negative=negative)


def stock_pipeline(spec: ModelSpec, weights: Path, device: torch.device, scheduler_name: str | None):
    """Stock diffusers' pipeline over the same weights (no tokenizer or text encoder: the prompt's
    states are given), as a user would load it."""
    parts = {}
    for key in ("transformer", "transformer_2", "unet", "vae"):
        if key in spec.components:
            cls = spec.components[key].load_class()
            parts[key] = cls.from_pretrained(weights, subfolder=key, dtype=spec.torch_dtype()).to(device).eval()
    scheduler_class = spec.scheduler_class(spec.scheduler_name(scheduler_name))
    parts["scheduler"] = scheduler_class.from_pretrained(weights, subfolder="scheduler")
    pipe = ComponentSpec(spec.pipeline).load_class()(tokenizer=None, text_encoder=None, **parts,
                                                     **spec.pipeline_config)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_kwargs(r, conditioning: Conditioning, device: torch.device, steps: int, output_type: str) -> dict:
    guidance = r.do_classifier_free_guidance
    return dict(prompt_embeds=conditioning.prompt.to(device),
                negative_prompt_embeds=conditioning.negative.to(device) if guidance else None,
                num_inference_steps=steps, guidance_scale=r.guidance_scale, num_frames=r.num_frames,
                height=r.height, width=r.width, output_type=output_type)  # fmt: skip


def seeded(seed: int) -> dict:
    """A fresh generator for each stock call (a used one would draw other noise)."""
    return {"generator": torch.Generator().manual_seed(seed)}


# -- measuring -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    value = run()
    sync(device)
    return value, time.perf_counter() - start


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of frames in [0, 1] (float) or 0..255 (uint8)."""
    scale = 255.0 if a.dtype == np.uint8 else 1.0
    mse = float(np.mean((a.astype(np.float64) / scale - b.astype(np.float64) / scale) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float().to(a.device)).abs().max())


# -- the run -------------------------------------------------------------------------------------


class Run:
    """What the run measured so far, written to `out` after every section."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device, self.start = args, device, time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, dict[str, Any]] = {}
        if args.resume and args.resume.is_file():  # an earlier run's sections, kept and not run again
            earlier = json.loads(args.resume.read_text())
            self.rows, self.results = earlier["rows"], earlier["results"]
            self.results = {m: {s: r for s, r in done.items() if "skipped" not in r and "partial" not in r}
                            for m, done in self.results.items()}  # fmt: skip
            self.rows = [row for row in self.rows if self.done(row["model"], row["section"])]
        import diffusers

        self.header = {"device": describe(device), "date": date.today().isoformat(), "torch": torch.__version__,
                       "diffusers": diffusers.__version__, "python": platform.python_version(),
                       "cuda": torch.version.cuda, "kernels": sorted(available_kernels(device))}  # fmt: skip

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, model: str, name: str) -> bool:
        return name in self.results.get(model, {})

    def progress(self, model: str, name: str, figures: dict[str, Any]) -> None:
        """A long section's figures so far, written at once: a run cut short keeps them."""
        self.results.setdefault(model, {})[name] = {**figures, "partial": True}
        self.write()

    def section(self, model: str, name: str, run) -> None:
        if self.args.budget_s and self.elapsed() > self.args.budget_s:
            self.results.setdefault(model, {})[name] = {"skipped": f"budget of {self.args.budget_s:.0f} s spent"}
            print(f"[{self.elapsed():6.0f} s] {model} {name}: skipped (budget)", flush=True)
            return
        print(f"[{self.elapsed():6.0f} s] {model} {name} ...", flush=True)
        try:
            self.results.setdefault(model, {})[name] = run()
        except Exception as e:  # a section's failure is a result too; the run goes on
            self.results.setdefault(model, {})[name] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        free_device(self.device)
        self.write()

    def row(self, model: str, section: str, what: str, stock: float | None, framecast: float | None,
            note: str = "") -> None:  # fmt: skip
        ratio = framecast / stock if stock and framecast is not None and not math.isnan(stock) else None
        self.rows.append(dict(zip(COLUMNS, (model, section, what, stock, framecast, ratio, note), strict=True)))

    def write(self) -> None:
        out = self.args.out
        doc = {**self.header, "elapsed_s": self.elapsed(), "rows": self.rows, "results": self.results}
        (out / "gpu.json").write_text(json.dumps(doc, indent=2, default=str))
        (out / "gpu.md").write_text(self.table())
        if self.args.copy_to:  # for a later --resume on the same machine ($OUT is emptied between commands)
            self.args.copy_to.mkdir(parents=True, exist_ok=True)
            (self.args.copy_to / "gpu.json").write_text(json.dumps(doc, indent=2, default=str))

    def table(self) -> str:
        h = self.header
        lines = [f"{h['device']}, {h['date']}; torch {h['torch']} (CUDA {h['cuda']}), diffusers {h['diffusers']}, "
                 f"Python {h['python']}; SDPA kernels: {', '.join(h['kernels'])}; random weights at real size "
                 f"(dtype: the denoise row's note)", "",
                 "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip

        def cell(v: Any) -> str:
            if v is None:
                return ""
            if isinstance(v, float):
                return "inf" if math.isinf(v) else f"{v:.4g}"
            return str(v)

        for row in self.rows:
            lines.append("| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |")
        return "\n".join(lines) + "\n"


class ModelBench:
    """One model's sections; the stages and the stock pipeline are built as they are needed."""

    def __init__(self, run: Run, model: str):
        args, self.run, self.model = run.args, run, model
        self.device = run.device
        self.spec = load_spec(model)
        if args.dtype:
            self.spec = replace(self.spec, dtype=args.dtype)
        self.family = family_for(self.spec)
        settings = {"steps": args.steps} if args.steps else {}
        self.r = build_request(self.spec, "timing only", **settings)
        self.timing = replace(self.r, steps=min(args.timing_steps, self.r.steps))
        self.conditioning = text_states(self.spec, self.r.do_classifier_free_guidance)
        built = time.perf_counter()
        self.weights = build_weights(self.spec, self.device, args.scratch)
        self.build_s = time.perf_counter() - built
        self.latents: dict[str, torch.Tensor] = {}
        self.memory = PeakMemory(self.device)  # the CUDA peak on a GPU (the process's RSS on the CPU)

    def peak_gib(self) -> float:
        return self.memory.peak_mib() / 1024

    def stage(self, **levers: Any) -> DenoiserStage:
        spec = replace(self.spec, acceleration=Acceleration(**levers))
        return DenoiserStage(spec, self.weights, self.device)

    # -- sections ------------------------------------------------------------------------------

    def denoise(self) -> dict:
        r, device = self.timing, self.device
        pipe = stock_pipeline(self.spec, self.weights, device, r.scheduler)
        kwargs = stock_kwargs(r, self.conditioning, device, r.steps, "latent")
        pipe(**{**kwargs, "num_inference_steps": 2}, **seeded(r.seed))  # warm-up: kernels chosen, pools grown
        self.memory.reset()
        stock_latents, stock_s = timed(lambda: pipe(**kwargs, **seeded(r.seed)).frames, device)
        stock_peak = self.peak_gib()
        pipe = None
        free_device(device)
        stage = self.stage()
        stage.denoise(self.conditioning, replace(r, steps=2))
        self.memory.reset()
        latents, framecast_s = timed(lambda: stage.denoise(self.conditioning, r), device)
        stats = stage.last_run_stats()
        self.latents["eager"] = latents
        stock_step, framecast_step = stock_s / r.steps, framecast_s / r.steps
        # The pipeline returns its latents in its own layout; framecast's are the family's (the
        # same for CogVideoX and Wan: what the VAE input is made from).
        stock_latents = stock_latents.cpu()
        difference = max_abs(latents, stock_latents) if stock_latents.shape == latents.shape else float("nan")
        m = self.model
        note = f"{r.steps} steps, {self.spec.dtype}, kernel {stage.attention}"
        self.run.row(m, "denoise", "s/step", stock_step, framecast_step, note)
        self.run.row(m, "denoise", "peak GiB", stock_peak, self.peak_gib())
        self.run.row(m, "denoise", "max abs latent difference", None, difference, "framecast vs stock, same seed")
        return {"steps": r.steps, "stock_s_per_step": stock_step, "framecast_s_per_step": framecast_step,
                "framecast_step_mean_s": stats["step_s"], "stock_peak_gib": stock_peak,
                "framecast_peak_gib": self.peak_gib(), "max_abs_latent_difference": difference,
                "attention": stage.attention, "weights_build_s": self.build_s}  # fmt: skip

    def decode(self) -> dict:
        device = self.device
        latents = self.latents.get("eager")
        if latents is None:
            latents = self.stage().denoise(self.conditioning, replace(self.timing, steps=1))
        decoder = DecoderStage(self.spec, self.weights, device)
        untiled = plan_decode(self.spec, self.r.height, self.r.width, 1, None, None)
        decoder.decode_float(latents, untiled)  # warm-up
        frames, untiled_s = timed(lambda: decoder.decode_float(latents, untiled), device)
        untiled_stats = decoder.last_run_stats()
        out = {"untiled_s": untiled_s, "untiled_work_gib": untiled_stats["work_memory_mib"] / 1024}
        if self.family.tiled_decode:
            tiled_plan = plan_decode(self.spec, self.r.height, self.r.width, 1, self.family.default_tile_size, None)
            tiled, tiled_s = timed(lambda: decoder.decode_float(latents, tiled_plan), device)
            out |= {"tiled_s": tiled_s, "tiled_work_gib": decoder.last_run_stats()["work_memory_mib"] / 1024,
                    "tiled_vs_untiled_psnr": psnr(tiled.numpy(), frames.numpy())}  # fmt: skip
        pixels = frames.shape[0] * frames.shape[1] * frames.shape[2]
        added = untiled_stats["work_memory_mib"] * 2**20
        out["untiled_bytes_per_pixel"] = added / pixels * 2 / decoder.vae.dtype.itemsize  # per 2-byte dtype
        # Stock: the pipeline's own decode of the same latents (its decode_latents where it has one).
        pipe = stock_pipeline(self.spec, self.weights, device, None)
        z = latents.to(device)
        if hasattr(pipe, "decode_latents"):
            stock_run = lambda: pipe.video_processor.postprocess_video(pipe.decode_latents(z), output_type="pt")  # noqa: E731
        else:
            stock_run = lambda: pipe.video_processor.postprocess_video(  # noqa: E731
                pipe.vae.decode(self.family.vae_input(pipe.vae, latents), return_dict=False)[0], output_type="pt"
            )
        stock_run = torch.no_grad()(stock_run)
        stock_run()
        self.memory.reset()
        stock_frames, stock_s = timed(stock_run, device)
        stock_work = self.memory.growth_mib() / 1024
        stock = stock_frames[0].permute(0, 2, 3, 1).float().cpu().numpy()  # (frames, H, W, 3) in [0, 1]
        out |= {"stock_s": stock_s, "stock_work_gib": stock_work,
                "stock_vs_framecast_psnr": psnr(stock, frames.numpy())}  # fmt: skip
        m = self.model
        self.run.row(m, "decode", "s (untiled)", stock_s, untiled_s)
        self.run.row(m, "decode", "GiB added (untiled)", stock_work, out["untiled_work_gib"],
                     f"{out['untiled_bytes_per_pixel']:.0f} B per output pixel")  # fmt: skip
        if "tiled_s" in out:
            self.run.row(m, "decode", "s (tiled, framecast)", None, out["tiled_s"], f"{out['tiled_work_gib']:.2f} GiB")
        self.run.row(m, "decode", "frames PSNR dB vs stock", None, out["stock_vs_framecast_psnr"])
        return out

    def attention(self) -> dict:
        """One layer's attention at the model's real shape (the CFG batch, every token), per kernel."""
        device, dtype = self.device, self.spec.torch_dtype()
        config = self.spec.components[self.family.denoiser_key].config
        heads = self.family.heads
        head_dim = int(config.get("attention_head_dim", 64))
        tokens = self._tokens()
        batch = 2 if self.r.do_classifier_free_guidance else 1
        generator = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, generator=generator)
                   for _ in range(3))  # fmt: skip
        flop = 4 * batch * heads * tokens**2 * head_dim
        capability = cuda_capability(device)
        out = {"tokens": tokens, "heads": heads, "head_dim": head_dim,
               "auto": choose_attention("auto", device.type, capability, dtype, available_kernels(device))}  # fmt: skip
        reference = attention_with_lse(q[:1, :2].float(), k[:1, :2].float(), v[:1, :2].float(), "math")
        for kernel in sorted(available_kernels(device) - {"math"}):
            try:
                with attention_kernel(kernel):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                    _, seconds = timed(lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v)
                                                for _ in range(3)], device)  # fmt: skip
                out[kernel] = {"ms": seconds / 3 * 1e3, "tflops": flop / (seconds / 3) / 1e12}
                if kernel != "default":  # the ring path's kernel: out and lse against fp32 math
                    o, lse = attention_with_lse(q[:1, :2], k[:1, :2], v[:1, :2], kernel)
                    out[kernel] |= {"lse_max_abs": max_abs(lse, reference[1]), "out_max_abs": max_abs(o, reference[0])}
                note = f"{out[kernel]['tflops']:.0f} TFLOP/s" + (" (auto)" if kernel == out["auto"] else "")
                self.run.row(self.model, "attention", f"ms per layer, {kernel}", None, out[kernel]["ms"], note)
            except Exception as e:  # a kernel this device or shape does not take
                out[kernel] = {"error": f"{type(e).__name__}: {e}"}
        return out

    def _tokens(self) -> int:
        r, family = self.r, self.family
        config = self.spec.components[family.denoiser_key].config
        patch = config.get("patch_size", 2)  # CogVideoX: p (and patch_size_t); Wan: [p_t, p, p]
        p, p_t = (patch[1], patch[0]) if isinstance(patch, list) else (int(patch), int(config.get("patch_size_t") or 1))
        frames = ((r.num_frames - 1) // family.vae_scale_temporal + 1) // p_t
        video = frames * (r.height // family.vae_scale_spatial // p) * (r.width // family.vae_scale_spatial // p)
        text = family.max_text_tokens if self.family.name == "cogvideox" else 0  # joint attention: text too
        return video + text

    def e2e(self) -> dict:
        """`--steps` steps plus decode: stock, framecast in-process, framecast through Ray; then a
        stream of 4 jobs through Ray."""
        device, r = self.device, self.r
        pipe = stock_pipeline(self.spec, self.weights, device, r.scheduler)
        kwargs = stock_kwargs(r, self.conditioning, device, r.steps, "np")
        pipe(**{**kwargs, "num_inference_steps": 1}, **seeded(r.seed))
        stock_frames, stock_s = timed(lambda: pipe(**kwargs, **seeded(r.seed)).frames[0], device)
        pipe = None
        free_device(device)
        self.run.progress(self.model, "e2e", {"steps": r.steps, "stock_s": stock_s})
        plan = plan_decode(self.spec, r.height, r.width, 1, None, None)
        denoiser = DenoiserStage(self.spec, self.weights, device)
        decoder = DecoderStage(self.spec, self.weights, device)

        def local() -> np.ndarray:
            return decoder.decode_float(denoiser.denoise(self.conditioning, r), plan).numpy()

        denoiser.denoise(self.conditioning, replace(r, steps=1))
        frames, local_s = timed(local, device)
        denoise_s = denoiser.last_run_stats()["step_s"] * r.steps
        denoiser = decoder = None
        free_device(device)
        out = {"steps": r.steps, "stock_s": stock_s, "local_s": local_s,
               "local_vs_stock_psnr": psnr(frames, np.asarray(stock_frames, dtype=np.float32))}  # fmt: skip
        m = self.model
        self.run.row(m, "e2e", f"s ({r.steps} steps + decode), in-process", stock_s, local_s)
        self.run.progress(m, "e2e", out)
        if self.run.args.ray:
            out |= self._through_ray(plan, local_s, denoise_s, out)
        return out

    def _through_ray(self, plan, local_s: float, denoise_s: float, so_far: dict) -> dict:
        import ray

        from cluster.executor import Method, RayExecutor, Stage

        r, m = self.r, self.model
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     num_gpus=1 if self.device.type == "cuda" else 0, num_cpus=4)  # fmt: skip
        started = time.perf_counter()
        executor = RayExecutor(self.spec, self.weights, encoder=False)  # the prompt's states are given
        start_s = time.perf_counter() - started
        try:

            def job(request) -> Any:
                denoised = executor.call(Stage.DENOISE, Method.DENOISE, self.conditioning, request)
                return executor.call(Stage.DECODE, Method.DECODE, denoised, plan)

            executor.get(job(replace(r, steps=1)))  # warm-up, as in-process
            frames, ray_s = timed(lambda: executor.get(job(r)), self.device)
            self.run.row(m, "e2e", f"s ({r.steps} steps + decode), through Ray", local_s, ray_s,
                         "stock column: in-process; goal: within 5% + 2 s")  # fmt: skip
            out = {"ray_s": ray_s, "ray_actor_start_s": start_s, "ray_within_goal": ray_s <= 1.05 * local_s + 2}
            self.run.progress(m, "e2e", {**so_far, **out})
            # A stream of 4 jobs, all submitted at once: the stages work on different jobs together.
            stream = replace(r, steps=min(r.steps, self.run.args.timing_steps))
            executor.get(job(stream))
            calls, _ = timed(lambda: [job(replace(stream, seed=s)) for s in range(4)], self.device)
            _, stream_s = timed(lambda: [executor.get(c) for c in calls], self.device)
            one, one_s = timed(lambda: executor.get(job(stream)), self.device)
            denoise_one = denoise_s / r.steps * stream.steps
            out |= {"stream_jobs": 4, "stream_steps": stream.steps, "stream_s": stream_s, "one_job_s": one_s,
                    "stream_s_per_job": stream_s / 4, "denoise_s_per_job": denoise_one}  # fmt: skip
            self.run.row(m, "stream", f"s per job, 4 jobs of {stream.steps} steps", one_s, stream_s / 4,
                         f"stock column: one job alone; slowest stage (denoise) {denoise_one:.2f} s")  # fmt: skip
            return out
        finally:
            executor.close()

    def compile(self) -> dict:
        device, r, m = self.device, self.timing, self.model
        stage = self.stage(compile=True)
        _, first_s = timed(lambda: stage.denoise(self.conditioning, replace(r, steps=2)), device)
        compile_s = stage.last_run_stats()["first_step_s"] - stage.last_run_stats()["step_s"]
        latents, framecast_s = timed(lambda: stage.denoise(self.conditioning, r), device)
        stage = None
        free_device(device)
        out = {"compile_s": compile_s, "framecast_s_per_step": framecast_s / r.steps, **self._against_eager(latents)}
        pipe = stock_pipeline(self.spec, self.weights, device, r.scheduler)
        # The same blocks compiled the same way (diffusers' compile_repeated_blocks), without the fusion.
        compile_repeated_blocks(getattr(pipe, self.family.denoiser_key), self.family.repeated_blocks)
        kwargs = stock_kwargs(r, self.conditioning, device, r.steps, "latent")
        _, stock_first_s = timed(lambda: pipe(**{**kwargs, "num_inference_steps": 2}, **seeded(r.seed)), device)
        _, stock_s = timed(lambda: pipe(**kwargs, **seeded(r.seed)), device)
        out |= {"stock_s_per_step": stock_s / r.steps, "stock_first_call_s": stock_first_s}
        self.run.row(m, "compile", "s/step, regional compile", out["stock_s_per_step"], out["framecast_s_per_step"])
        self.run.row(m, "compile", "compile s (once per stage)", None, compile_s,
                     f"latents vs eager max abs {out.get('max_abs_latent_vs_eager', float('nan')):.3g}, "
                     f"frames PSNR {out.get('frames_psnr_vs_eager', float('nan')):.1f} dB")  # fmt: skip
        return out

    def _against_eager(self, latents: torch.Tensor, label: str | None = None) -> dict:
        """Latents of a lever against the eager bf16 ones of the same job: their max difference,
        the PSNR of the decoded frames and the clarity panel's deltas (lever minus eager)."""
        if "eager" not in self.latents or self.latents["eager"].shape != latents.shape:
            return {}
        from stages.clarity import measure_frames

        decoder = DecoderStage(self.spec, self.weights, self.device)
        plan = plan_decode(self.spec, self.r.height, self.r.width, 1, None, None)
        eager, other = decoder.decode(self.latents["eager"], plan), decoder.decode(latents, plan)
        out = {
            "max_abs_latent_vs_eager": max_abs(latents, self.latents["eager"]),
            "frames_psnr_vs_eager": psnr(other, eager),
        }
        try:
            a, b = measure_frames(eager, float(self.r.fps)).summary, measure_frames(other, float(self.r.fps)).summary
            out["clarity_deltas_vs_eager"] = {k: b[k] - a[k] for k in a if k in b and not math.isnan(a[k])}
        except (OSError, RuntimeError) as e:  # the panel's luma is ffmpeg's: a machine without ffmpeg
            out["clarity_deltas_vs_eager"] = f"not measured here ({e}); frames kept for measuring elsewhere"
            if label:  # the first frames of both, for the panel on a machine with ffmpeg (16 MiB a file)
                keep = max(1, 15 * 2**20 // eager[0].nbytes)
                np.save(self.run.args.out / f"{self.model}-{label}-eager.npy", eager[:keep])
                np.save(self.run.args.out / f"{self.model}-{label}.npy", other[:keep])
                out["frames_kept"] = keep
        return out

    def fp8(self) -> dict:
        device, r, m = self.device, self.timing, self.model
        problem = check_acceleration(Acceleration(fp8=True), device.type, cuda_capability(device))
        if problem:
            return {"refused": problem}
        stage = self.stage(compile=True, fp8=True)
        stage.denoise(self.conditioning, replace(r, steps=2))
        latents, seconds = timed(lambda: stage.denoise(self.conditioning, r), device)
        stage = None
        free_device(device)
        out = {"framecast_s_per_step": seconds / r.steps, **self._against_eager(latents, "fp8")}
        base = self.run.results.get(m, {}).get("compile", {}).get("framecast_s_per_step")
        quality = out.get("frames_psnr_vs_eager", float("nan"))
        self.run.row(m, "fp8", "s/step (fp8 + compile)", base, out["framecast_s_per_step"],
                     f"stock column: framecast bf16 compiled; frames PSNR vs bf16 {quality:.1f} dB")  # fmt: skip
        return out

    def offload(self) -> dict:
        device, r, m = self.device, replace(self.timing, steps=min(3, self.timing.steps)), self.model
        out = {}
        for kind in ("model", "group"):
            problem = check_acceleration(Acceleration(offload=kind), device.type)
            if problem:
                out[kind] = {"refused": problem}
                continue
            free_device(device)
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * 2**30 / total), device)
            try:
                self.memory.reset()
                stage = self.stage(offload=kind)
                stage.denoise(self.conditioning, replace(r, steps=1))
                latents, seconds = timed(lambda stage=stage: stage.denoise(self.conditioning, r), device)
                denoise_peak = self.memory.growth_mib() / 1024
                stage = None
                free_device(device)
                decoder = DecoderStage(self.spec, self.weights, device)
                plan = plan_decode(self.spec, self.r.height, self.r.width, 1, None, None)
                _, decode_s = timed(lambda d=decoder, z=latents, p=plan: d.decode_float(z, p), device)
                stats = decoder.last_run_stats()
                out[kind] = {"s_per_step": seconds / r.steps, "denoise_peak_gib": denoise_peak,
                             "decode_s": decode_s, "decode_peak_gib": stats["peak_memory_mib"] / 1024,
                             "tiled_for_memory": stats.get("tiled_for_memory", 0.0), "cap_gib": CAP_GIB}  # fmt: skip
                decoder = None
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            eager = self.run.results.get(m, {}).get("denoise", {})
            self.run.row(m, "offload", f"s/step, offload {kind}", eager.get("framecast_s_per_step"),
                         out[kind]["s_per_step"], f"stock column: no offload; {CAP_GIB:.0f} GiB cap")  # fmt: skip
            self.run.row(m, "offload", f"peak GiB, offload {kind}", eager.get("framecast_peak_gib"),
                         out[kind]["denoise_peak_gib"],
                         f"decode {out[kind]['decode_peak_gib']:.1f} GiB, tiled by memory: "
                         f"{bool(out[kind]['tiled_for_memory'])}")  # fmt: skip
        return out


SECTIONS = ("denoise", "decode", "attention", "e2e", "compile", "fp8", "offload")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["cogvideox-2b", "cogvideox-5b", "wan2.1-t2v-1.3b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: the model YAML's")
    parser.add_argument("--steps", type=int, default=None, help="end-to-end steps (default: the model's, 50)")
    parser.add_argument("--timing-steps", type=int, default=10, help="steps of the per-step timings")
    parser.add_argument("--e2e", nargs="*", default=None, help="models with the e2e/Ray section (default: the first)")
    parser.add_argument("--compile", nargs="*", default=None, help="models to compile (default: the first)")
    parser.add_argument("--fp8", nargs="*", default=None, help="models with the fp8 section (default: the first)")
    parser.add_argument("--offload", nargs="*", default=None, help="models to offload (default: the second)")
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray path of e2e")
    parser.add_argument("--order", default=None, help="comma-separated model:section order (default: by model)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no section after this many seconds")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()), help="where the weights are saved")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-gpu"))
    parser.add_argument("--resume", type=Path, default=None, help="an earlier run's gpu.json: its sections are kept")
    parser.add_argument("--copy-to", type=Path, default=None, help="also keep gpu.json in this folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    first, second = args.model[0], args.model[min(1, len(args.model) - 1)]
    wanted = {"e2e": args.e2e if args.e2e is not None else [first],
              "compile": args.compile if args.compile is not None else [first],
              "fp8": args.fp8 if args.fp8 is not None else [first],
              "offload": args.offload if args.offload is not None else [second]}  # fmt: skip
    if args.order:
        plan = [tuple(item.split(":")) for item in args.order.split(",")]
    else:
        plan = [(m, s) for m in args.model for s in SECTIONS if s not in wanted or m in wanted[s]]
    run = Run(args, device)
    benches: dict[str, ModelBench] = {}
    for model, section in plan:
        if run.done(model, section):
            continue
        if run.args.budget_s and run.elapsed() > run.args.budget_s:
            run.section(model, section, None)  # recorded as skipped
            continue
        if model not in benches:
            benches.clear()  # one model's stages at a time on the device
            free_device(device)
            built = time.perf_counter()
            try:
                benches[model] = ModelBench(run, model)
            except Exception as e:  # the model could not be built: its sections say why
                traceback.print_exc()
                run.results.setdefault(model, {})[section] = {"error": f"building: {type(e).__name__}: {e}"}
                continue
            print(f"[{run.elapsed():6.0f} s] {model}: weights ready in {time.perf_counter() - built:.1f} s", flush=True)
        run.section(model, section, getattr(benches[model], section))
    run.write()
    print(run.table(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
