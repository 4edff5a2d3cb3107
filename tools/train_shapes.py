"""Train `framecast-shapes`: a small CogVideoX on the shapes world (stages/shapes.py), on CPU.

    python -m tools.train_shapes            # or: make train-demo

Two phases from one seed, each with a progress bar and its loss curve logged to MLflow
(experiment `framecast-shapes-training`):

1. the VAE (`AutoencoderKLCogVideoX`): L1 reconstruction with the object's pixels weighted 20x
   (plain L1 collapses to the empty background within a thousand steps) and a small KL term;
   then `scaling_factor` is set so that the latents the transformer learns have unit variance;
2. the T5 text encoder and the transformer (`CogVideoXTransformer3DModel`) together, with
   v-prediction on the CogVideoX DDIM schedule and 10% of prompts dropped to "" so that
   classifier-free guidance works. The saved weights are an exponential moving average.

The held-out prompts (`stages.shapes.HELD_OUT`) are never shown. The result is saved with
`save_pretrained` as a stock `CogVideoXPipeline` directory (safetensors), with TRAINING.json
recording the command, seed, steps and final losses. The architecture is the one in
configs/models/framecast-shapes.yaml, read from there so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages import shapes
from stages.models import load_spec
from stages.tiny import WORDS, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OBJECT_WEIGHT = 20.0  # L1 weight of the object's pixels against the background's
KL_WEIGHT = 1e-6
CFG_DROP = 0.1
SHAPE_WORDS = [*shapes.COLORS, *shapes.SHAPES, *shapes.DIRECTIONS, *shapes.BACKGROUNDS, "moving", "background"]


def render_pool(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`count` training clips (never a held-out prompt): uint8 clips, object masks, prompts."""
    rng = np.random.default_rng(seed)
    scenes = [s for s in shapes.all_scenes() if not s.held_out]
    clips = np.empty((count, shapes.FRAMES, shapes.SIZE, shapes.SIZE, 3), np.uint8)
    masks = np.empty((count, shapes.FRAMES, shapes.SIZE, shapes.SIZE), bool)
    prompts = []
    for i in tqdm(range(count), desc="rendering clips", unit="clip"):
        scene = scenes[rng.integers(len(scenes))]
        clips[i] = shapes.render(scene, seed=int(rng.integers(2**31)))
        masks[i] = np.any(clips[i] != np.array(shapes.BACKGROUNDS[scene.background], np.uint8), axis=-1)
        prompts.append(scene.prompt)
    return clips, masks, prompts


def to_video_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1], as the VAE takes video."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def train_vae(vae, clips, masks, steps: int, batch: int, lr: float, log) -> float:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.55 + 0.45 * np.cos(np.pi * min(s / steps, 1.0)))
    rng = np.random.default_rng(1)
    bar = tqdm(range(steps), desc="VAE", unit="step")
    loss_avg = None
    for step in bar:
        index = rng.integers(len(clips), size=batch)
        x = to_video_tensor(clips[index])
        weight = 1.0 + (OBJECT_WEIGHT - 1.0) * torch.from_numpy(masks[index]).float()[:, None]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        l1 = ((recon - x).abs() * weight).mean() / weight.mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_avg = l1.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * l1.item()
        bar.set_postfix(l1=f"{loss_avg:.4f}")
        if step % 10 == 0 or step == steps - 1:
            log({"vae/l1": l1.item(), "vae/kl": kl.item()}, step)
    vae.eval()
    return float(loss_avg)


@torch.no_grad()
def encode_pool(vae, clips: np.ndarray, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of every clip, as (mean, std) in the transformer's layout (B, F, C, H, W)."""
    means, stds = [], []
    for start in tqdm(range(0, len(clips), batch), desc="encoding clips", unit="batch"):
        posterior = vae.encode(to_video_tensor(clips[start : start + batch])).latent_dist
        means.append(posterior.mean.permute(0, 2, 1, 3, 4))
        stds.append(posterior.std.permute(0, 2, 1, 3, 4))
    return torch.cat(means), torch.cat(stds)


def train_denoiser(
    text_encoder, transformer, tokenizer, scheduler, means, stds, prompts, scaling, steps, batch, lr, log
) -> tuple[float, dict]:
    """Joint training of the text encoder and transformer; returns the final loss and EMA weights."""
    modules = torch.nn.ModuleDict({"text_encoder": text_encoder, "transformer": transformer}).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=lr, weight_decay=0.01)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s / steps, 1.0)))
    )
    tokens_of = {}
    for prompt in {*prompts, ""}:
        tokens_of[prompt] = tokenizer(
            prompt, padding="max_length", max_length=transformer.config.max_text_seq_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids[0]
    alphas = scheduler.alphas_cumprod.float()
    rng = np.random.default_rng(2)
    generator = torch.Generator().manual_seed(3)
    bar = tqdm(range(steps), desc="transformer", unit="step")
    loss_avg = None
    for step in bar:
        index = rng.integers(len(means), size=batch)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling
        chosen = ["" if rng.random() < CFG_DROP else prompts[i] for i in index]
        ids = torch.stack([tokens_of[p] for p in chosen])
        timesteps = torch.randint(0, len(alphas), (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = alphas[timesteps].sqrt().view(-1, 1, 1, 1, 1)
        s = (1 - alphas[timesteps]).sqrt().view(-1, 1, 1, 1, 1)
        noisy = a * latents + s * noise
        target = a * noise - s * latents  # v-prediction, as scheduler.get_velocity
        text = text_encoder(ids)[0]
        prediction = transformer(hidden_states=noisy, encoder_hidden_states=text, timestep=timesteps).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), modules.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(mse=f"{loss_avg:.4f}")
        if step % 10 == 0 or step == steps - 1:
            log({"transformer/mse": loss.item(), "transformer/lr": schedule.get_last_lr()[0]}, step)
    return float(loss_avg), ema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.train_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "models" / "framecast-shapes"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", type=int, default=2400, help="rendered training clips")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=2)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--transformer-steps", type=int, default=5000)
    parser.add_argument("--transformer-batch", type=int, default=32)
    parser.add_argument("--transformer-lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own)")
    args = parser.parse_args(argv)

    import mlflow
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
    from diffusers import CogVideoXDDIMScheduler as Scheduler
    from transformers import T5Config, T5EncoderModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = load_spec("framecast-shapes")
    config = {key: dict(component.config) for key, component in spec.components.items()}
    tokenizer = build_tokenizer([*SHAPE_WORDS, *WORDS])
    text_encoder = T5EncoderModel(T5Config(**{**config["text_encoder"], "vocab_size": len(tokenizer)}))
    vae = AutoencoderKLCogVideoX(**{k: v for k, v in config["vae"].items() if k != "scaling_factor"})
    transformer = CogVideoXTransformer3DModel(**config["transformer"])
    scheduler = Scheduler.from_config(config["scheduler"])

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("framecast-shapes-training")
    started = time.time()
    with mlflow.start_run(run_name=f"train-seed{args.seed}"):
        mlflow.log_params({k: v for k, v in vars(args).items() if k not in ("out", "tracking_uri")})

        def log(metrics: dict, step: int) -> None:
            mlflow.log_metrics(metrics, step=step)

        clips, masks, prompts = render_pool(args.clips, args.seed)
        vae_loss = train_vae(vae, clips, masks, args.vae_steps, args.vae_batch, args.vae_lr, log)
        vae_minutes = (time.time() - started) / 60
        means, stds = encode_pool(vae, clips)
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(Path(args.out) / "vae")  # early, so the VAE can be looked at while the rest trains
        final_loss, ema = train_denoiser(
            text_encoder, transformer, tokenizer, scheduler, means, stds, prompts, scaling,
            args.transformer_steps, args.transformer_batch, args.transformer_lr, log,
        )
        minutes = (time.time() - started) / 60
        pipe = CogVideoXPipeline(
            tokenizer=tokenizer, text_encoder=ema["text_encoder"], vae=vae,
            transformer=ema["transformer"], scheduler=scheduler,
        )
        out = Path(args.out)
        pipe.save_pretrained(out, safe_serialization=True)
        record = {
            "command": " ".join(["python -m tools.train_shapes", *(sys.argv[1:] if argv is None else argv)]),
            "seed": args.seed,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tracking_uri")},
            "vae": {"steps": args.vae_steps, "final_weighted_l1": round(vae_loss, 5), "minutes": round(vae_minutes, 1)},
            "transformer": {"steps": args.transformer_steps, "final_mse": round(final_loss, 5),
                            "minutes": round(minutes - vae_minutes, 1)},
            "scaling_factor": scaling,
            "minutes": round(minutes, 1),
            "held_out": [shapes.Scene(*terms).prompt for terms in shapes.HELD_OUT],
            "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
        }
        (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
        mlflow.log_metrics({"final/vae_l1": vae_loss, "final/transformer_mse": final_loss, "minutes": minutes})
        mlflow.log_artifact(str(out / "TRAINING.json"))
    print(f"saved {out} after {minutes:.1f} min (VAE l1 {vae_loss:.4f}, transformer mse {final_loss:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
