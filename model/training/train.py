"""Training: `racedit train --config configs/NAME.yaml [--out DIR] [--resume DIR]`.

A config with `stages` is a pipeline: training configs run one after another, each
fine-tuning the last one's checkpoint, then optionally packed for shipping (`train_pipeline`).

AdamW with warm-up, EMA weights (what checkpoints ship), gradient clipping,
bf16 autocast on CUDA, DDP under torchrun (gloo on CPU, NCCL on CUDA),
periodic checkpoints and sample grids, a CSV of loss terms and routing metrics.
Everything is seeded: the same config on the same machine gives the same losses.
Resumable state (raw weights, optimizer moments, RNG) is safetensors + JSON too.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file

from .. import checkpoint
from ..autoencoder import Autoencoder, Decoder, copy_autoencoder
from ..config import ConfigError
from ..dit import RaceDiT
from ..sampling import generate, to_uint8
from . import losses
from .calibrate import calibrate_thresholds
from .config import DataConfig, OptimConfig, Pipeline, TrainConfig, check_class_weights
from .data import ImageFolder, Shapes10, vae_encoder
from .objective import training_loss

TIMESTEP_BUCKETS = 4


def learning_rate(o: OptimConfig, step: int) -> float:
    """Linear warm-up, constant, then a cosine cool-down to `min_lr` over the last `decay_steps`;
    each warm restart in `o.restarts` repeats constant + cool-down from its own `lr`.

    Why the cool-down: a diffusion model trained at constant lr keeps jittering around a
    minimum; annealing at the end lowers the loss and sharpens samples for free. Why restarts:
    a resumed run can go on past a finished cool-down without rewriting the steps before it.
    A pure function of the step and the config, so resumed pieces equal one uninterrupted run.
    """
    # The piece `step` lies in: the first (with warm-up) or the last restart at or before it.
    lr = o.lr * min(1.0, (step + 1) / max(1, o.warmup_steps))
    decay_steps, min_lr = o.decay_steps, o.min_lr
    ends = [r.at for r in o.restarts] + [o.steps]
    end = ends[0]
    for r, next_end in zip(o.restarts, ends[1:]):
        if step >= r.at:
            lr, decay_steps, min_lr, end = r.lr, r.decay_steps, r.min_lr, next_end
    decay_start = end - decay_steps
    if decay_steps > 0 and step >= decay_start:
        progress = min(1.0, (step - decay_start) / decay_steps)
        lr = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def train_pipeline(pipeline: Pipeline, configs: list[TrainConfig], out: Path, progress: bool = True) -> Path:
    """Run the stages in `out/<stage name>`, each initialised from the one before; resumable: a
    finished stage is kept, an interrupted one resumed exactly. Returns the last (or shipped) checkpoint."""
    previous: Optional[Path] = None
    for stage, config in zip(pipeline.stages, configs):
        folder = out / stage.name
        state = folder / "checkpoint" / "train_state.json"
        done = int(json.loads(state.read_text())["step"]) if state.is_file() else 0
        if done >= config.optim.steps:
            print(f"stage {stage.name}: finished ({done} steps), kept", flush=True)
            previous = folder / "checkpoint"
            continue
        print(f"stage {stage.name}: {'resumed at step ' + str(done) if done else 'started'} -> {folder}", flush=True)
        previous = train(
            config,
            folder,
            resume=folder / "checkpoint" if done else None,
            init=None if done else previous,
            progress=progress,
        )
    if pipeline.ship is None:
        return previous
    from .calibrate import budget_table

    ship = pipeline.ship
    dtype = getattr(torch, ship.weights_dtype)
    model = checkpoint.load(previous)
    shipped = checkpoint.save(
        model, out / "shipped", metadata=model.metadata, weights_dtype=dtype, autoencoder=model.autoencoder
    )
    if ship.budget_table:  # on the weights as shipped, as `racedit calibrate --iterations 0` does
        model = checkpoint.load(shipped)
        budget_table(model)  # into model.metadata
        checkpoint.save(model, shipped, metadata=model.metadata, weights_dtype=dtype, autoencoder=model.autoencoder)
    return shipped


# ------------------------------------------------------------ resumable ----
def _save_state(
    folder: Path,
    model: RaceDiT,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator,
    history: list[dict],
) -> None:
    """Raw weights, AdamW moments and RNG as safetensors; scalars as JSON."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
    tensors["rng.train"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / "train_state.safetensors"))
    (folder / "train_state.json").write_text(json.dumps({"step": step, "history": history}, indent=2))


def _load_state(
    folder: Path, model: RaceDiT, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[int, list[dict]]:
    state_path = folder / "train_state.safetensors"
    if not state_path.is_file():
        raise checkpoint.CheckpointError(f"{state_path}: missing; --resume takes a training output folder's checkpoint")
    tensors = load_file(str(state_path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, p in model.named_parameters():
        moments = {key.rsplit(".", 1)[1]: v for key, v in tensors.items() if key.startswith(f"optim.{name}.")}
        if moments:
            optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in moments.items()}
    generator.set_state(tensors["rng.train"])
    torch.set_rng_state(tensors["rng.torch"])
    doc = json.loads((folder / "train_state.json").read_text())
    return int(doc["step"]), list(doc["history"])


# ---------------------------------------------------------------- train ----
def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _with_folder_classes(config: TrainConfig, folder: ImageFolder) -> TrainConfig:
    """An ImageFolder's sub-folders are the classes: the checkpoint must carry their names."""
    names = folder.class_names
    if len(names) != config.model.num_classes:
        raise ConfigError(
            f"model.num_classes is {config.model.num_classes} but data.root {config.data.root} "
            f"has {len(names)} class folders ({', '.join(names)})"
        )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, class_names=names))


def _dataset(
    config: TrainConfig,
    folder: Optional[ImageFolder],
    vae: Optional[Autoencoder] = None,
    device: Union[str, torch.device] = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training set in host memory and its labels [N]: uint8 images [N, 3, H, W], or with a
    VAE, float32 latents [N, C, h, w] (posterior means in the checkpoint's scaling), encoded once on
    `device`, 64 images at a time, so only the latents are held (ImageNet at 256 px: about 21 GB)."""
    if folder is None:
        ds = Shapes10(
            "train",
            image_size=config.model.image_size,
            seed=config.data.seed,
            length=config.data.length,
            style=config.data.style,
        )
        return ds.materialize()
    if vae is None:
        xs, ys = zip(*(folder[i] for i in range(len(folder))))
        return ((torch.stack(xs) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), torch.tensor(ys)
    encode = vae_encoder(vae.load(device), vae.scaling_factor, vae.shift_factor)
    latents, labels = [], []
    with torch.no_grad():
        for start in range(0, len(folder), 64):
            xs, ys = zip(*(folder[i] for i in range(start, min(start + 64, len(folder)))))
            latents.append(encode(torch.stack(xs).to(device)).float().cpu())
            labels += ys
    return torch.cat(latents), torch.tensor(labels)


def _as_x0(batch: torch.Tensor) -> torch.Tensor:
    """A training batch as the model's input scale: uint8 pixels to [-1, 1]; latents as they are."""
    return batch.float() / 127.5 - 1.0 if batch.dtype == torch.uint8 else batch.float()


def class_weight_vector(data: DataConfig, class_names: list[str]) -> torch.Tensor:
    """[num_classes] sampling weights from `data.class_weights` (1.0 for classes it leaves out)."""
    check_class_weights(data, class_names)
    return torch.tensor([float(data.class_weights.get(name, 1.0)) for name in class_names])


def batch_sampler(
    config: TrainConfig, labels: torch.Tensor, device: torch.device
) -> Callable[[torch.Generator], torch.Tensor]:
    """Draws a batch of dataset indices: uniform, or weighted by class when `data.class_weights`
    asks for more of some classes (the hard ones) per batch."""
    size = config.optim.batch_size
    if not config.data.class_weights:
        return lambda generator: torch.randint(0, labels.shape[0], (size,), generator=generator, device=device).cpu()
    by_class = class_weight_vector(config.data, config.model.class_names)
    weights = by_class[labels].to(device)
    return lambda generator: torch.multinomial(weights, size, replacement=True, generator=generator).cpu()


def save_grid(images: torch.Tensor, path: Path, columns: int = 10, scale: int = 3) -> None:
    """uint8 [N, 3, H, W] -> one PNG grid."""
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image.permute(1, 2, 0).numpy()
    Image.fromarray(canvas).resize((columns * w * scale, rows * h * scale), Image.NEAREST).save(path)


def _routing_metrics(stats, t: torch.Tensor) -> dict[str, float]:
    """Experts per token by timestep bucket, MaxVio and combination usage, averaged over layers."""
    out: dict[str, float] = {}
    if not stats.routing:
        return out
    ept = stats.experts_per_token.float()  # [n, B, L]
    bucket = (t * TIMESTEP_BUCKETS).long().clamp(max=TIMESTEP_BUCKETS - 1).cpu()
    for b in range(TIMESTEP_BUCKETS):
        rows = (bucket == b).nonzero().squeeze(1)
        out[f"ept_t{b}"] = float(ept[:, rows].mean()) if rows.numel() else float("nan")
    out["maxvio"] = float(
        np.mean([losses.max_violation(r.mask.reshape(-1, r.mask.shape[-1]).sum(0)) for r in stats.routing])
    )
    out["comb_usage"] = float(np.mean([losses.combination_usage(r.mask) for r in stats.routing]))
    return out


def train(
    config: TrainConfig, out: Path, resume: Optional[Path] = None, progress: bool = True, init: Optional[Path] = None
) -> Path:
    """Train, checkpointing to `out/checkpoint` (EMA weights, loadable by racedit.model.load).

    `resume` continues a run exactly (weights, optimizer, RNG); `init` starts a new run
    from a checkpoint's weights and thresholds (e.g. the bundled model) with a fresh optimizer.
    """
    folder, vae = None, None
    if config.data.vae is not None:
        # the checkpoint's own copy (out/checkpoint/vae), written once: every later save finds it in place
        vae = copy_autoencoder(config.data.vae, out / "checkpoint")
    if config.data.name == "imagefolder":
        pixels = config.model.image_size
        if vae is not None:
            pixels = vae.image_size(config.model.image_size)
        folder = ImageFolder(config.data.root, image_size=pixels)
        config = _with_folder_classes(config, folder)
    rank, world = _distributed()
    if config.optim.threads:
        torch.set_num_threads(config.optim.threads)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.optim.seed)
    model = RaceDiT(config.model).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    generator = torch.Generator(device=device).manual_seed(config.optim.seed * 1000 + rank)
    out.mkdir(parents=True, exist_ok=True)
    step, history = 0, []
    if init is not None:
        start = checkpoint.load(init)
        # The objective may change (DiT's DDPM noise -> rectified flow: racedit import-dit), and a checkpoint
        # without class names takes the folder's; nothing else.
        ignored = {
            "objective": None,
            "conventions": None,  # a published family's: fine-tuning makes it racedit's flow
            **({"class_names": None} if start.config.class_names is None else {}),
        }
        if {**start.config.to_dict(), **ignored} != {**config.model.to_dict(), **ignored}:
            raise ConfigError(f"--init {init}: its model config differs from the training config's model section")
        model.load_state_dict(start.state_dict())
        ema.load_state_dict(start.state_dict())
        history = list(getattr(start, "metadata", {}).get("history", []))
    if resume is not None:
        # EMA first: building it draws from the global RNG, which _load_state then restores.
        ema.load_state_dict(checkpoint.load(resume).state_dict())
        step, history = _load_state(resume, model, optimizer, generator)
    run_record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "from_step": step,
        "to_step": config.optim.steps,
        "world_size": world,
        "device": str(device),
        "resumed_from": str(resume) if resume else None,
        "initialised_from": str(init) if init else None,
    }
    images, labels = _dataset(config, folder, vae, device)
    decoder = None
    draw_batch = batch_sampler(config, labels, device)
    wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    csv_path = out / "metrics.csv"
    writer = None
    bar = None
    if rank == 0 and progress:
        from tqdm import tqdm

        bar = tqdm(total=config.optim.steps, initial=step, unit="step", dynamic_ncols=True)
    start = time.time()
    start_step = step
    o = config.optim
    while step < o.steps:
        index = draw_batch(generator)
        x0 = _as_x0(images[index].to(device))
        y = labels[index].to(device)
        lr = learning_rate(o, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, terms, stats, t = training_loss(wrapped, x0, y, config.loss, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        with torch.no_grad():
            decay = min(o.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
            for e, b in zip(ema.buffers(), model.buffers()):
                e.copy_(b)
        step += 1
        if rank != 0:
            continue
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}", mse=f"{terms['mse']:.4f}")
        if step % o.log_every == 0 or step == o.steps:
            row = {
                "step": step,
                "lr": lr,
                "grad_norm": float(grad_norm),
                **terms,
                **_routing_metrics(stats, t),
                "sec_per_step": (time.time() - start) / (step - start_step),
            }
            for i, layer in enumerate(model.moe_layers):
                row[f"tau{i}"] = float(layer.threshold)
            new_file = not csv_path.exists()
            with open(csv_path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(row))
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
        if step % o.sample_every == 0 or step == o.steps:
            grid, _ = generate(
                ema,
                labels=[i % config.model.num_classes for i in range(40)],
                cfg_scale=4.0,
                num_steps=25,
                seeds=list(range(40)),
                as_float=vae is not None,
            )
            if vae is not None:  # latents: what the VAE makes of them
                decoder = decoder or Decoder(vae, device)
                grid = to_uint8(decoder(grid.to(device)))
            save_grid(grid, out / f"samples-{step:07d}.png")
        if step % o.checkpoint_every == 0 or step == o.steps:
            record = {
                **run_record,
                "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "to_step": step,
                "wall_seconds": round(time.time() - start, 1),
                "final_terms": terms,
            }
            # The EMA inherits the live model's thresholds; re-estimate them on the EMA weights it ships
            # (model/training/calibrate.py). The next step copies the live thresholds back, so training is unchanged.
            calibration = calibrate_thresholds(ema, config.calibration)
            metadata = {
                "train_config": config.to_dict(),
                "step": step,
                "history": history + [record],
                "threshold_calibration": calibration,
            }
            ck = checkpoint.save(ema, out / "checkpoint", metadata=metadata, autoencoder=vae)
            _save_state(ck, model, optimizer, step, generator, history + [record])
    if bar is not None:
        bar.close()
    if world > 1:
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        (out / f"weights-rank{rank}.sha256").write_text(digest + "\n")
        dist.barrier()
        dist.destroy_process_group()
    return out / "checkpoint"
