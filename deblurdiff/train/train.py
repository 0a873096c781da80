"""Joint training of the ControlNet and the LKPN on a frozen Stable Diffusion 2.1.

One step, as in the reference (``train.py`` and ``Diffusion.p_losses``):

* ``z_0 = VAE(sharp in [-1, 1])`` and ``c = VAE(blurry in [0, 1])``, both posterior samples
  times 0.18215, no gradient;
* ``t ~ U{0..999}``, ``x_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``;
* ``z_s = LKPN(c, x_t, t, text)``; ``eps_hat = UNet(x_t, t, text, ControlNet(x_t, t, text, hint=cat(c, z_s)))``;
* ``loss = MSE(eps_hat, eps) + MSE(z_s, z_0)`` (both weights 1 in the reference), plus an optional
  pixel-space ``MSE(VAE.decode(z_s), sharp)`` (weight 0 by default);
* AdamW (lr 1e-4) on the ControlNet and LKPN parameters only.

Distribution, mixed precision and gradient accumulation are accelerate's
(``accelerate launch -m deblurdiff.train --config ...`` for several GPUs).

Output folder::

    config.json                 the resolved configuration
    log.jsonl                   one line per logging window / validation
    frozen-components/          VAE, text encoder, tokenizer, UNet, scheduler, saved once
    checkpoint-0004000/         a DeblurDiff pipeline folder (model_index.json, controlnet/, lkpn/,
                                the frozen components hard-linked) plus training_state/ and
                                trainer_state.json for resuming
    pipeline/                   the last checkpoint's pipeline (hard links), for the app/CLI
    validation/step-0001000.png blurry | restored | sharp, one row per validation image
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

from ..pipeline.pipeline_deblurdiff import encode_text
from .config import ModelConfig, TrainConfig, load_config
from .data import build_dataset

FROZEN = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
TRAINABLE = ("controlnet", "lkpn")
FROZEN_DIR = "frozen-components"
STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
PIPELINE_DIR = "pipeline"


# ----------------------------------------------------------------------------- components
def load_components(model: ModelConfig, seed: int = 0) -> dict:
    """The seven pipeline components, as ``model`` says (see :class:`ModelConfig`), with the
    attention layout they keep for training and inference alike: the reference's windows,
    the UNet's following the ControlNet's (set here, once, for a UNet loaded without one)."""
    from ..models.windowed_attention import DEFAULT_WINDOW, ensure_attention_layout

    components = _load_components(model, seed)
    window = getattr(components["controlnet"].config, "attention_window", DEFAULT_WINDOW)
    ensure_attention_layout(components["unet"], window)
    return components


def _load_components(model: ModelConfig, seed: int) -> dict:
    if model.init == "tiny-random":
        from ..models.configs import build_components

        return build_components("tiny", seed=seed)
    if model.init == "pipeline":
        from ..pipeline.pipeline_deblurdiff import DeblurDiffPipeline

        pipe = DeblurDiffPipeline.from_pretrained(model.path, revision=model.revision, variant=model.variant)
        return dict(pipe.components)
    if model.init == "single-file":
        from ..models.single_file import load_single_file_components

        return dict(load_single_file_components(model.path, tokenizer=model.tokenizer))

    # Stable Diffusion 2.1-base: frozen UNet/VAE/text encoder, ControlNet from the UNet, LKPN from
    # scratch, starting as the identity (z_s = c) like the reference's.
    if not model.path:
        raise ValueError(
            "model.init='stable-diffusion' needs model.path: a Stable Diffusion 2.1-base diffusers folder or "
            "Hub mirror (the original stabilityai repository is no longer on the Hub), or use init "
            "'single-file' with the official model.pth"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..models.single_file import load_tokenizer
    from ..models import LatentControlNetModel, LKPNModel
    from ..models.configs import SIZES, make_scheduler

    common = dict(revision=model.revision)
    unet = UNet2DConditionModel.from_pretrained(model.path, subfolder="unet", variant=model.variant, **common)
    vae = AutoencoderKL.from_pretrained(model.path, subfolder="vae", variant=model.variant, **common)
    text_encoder = CLIPTextModel.from_pretrained(model.path, subfolder="text_encoder", variant=model.variant, **common)
    tokenizer = load_tokenizer(model.tokenizer)  # the reference's OpenCLIP tokenizer, shipped with the package
    lkpn_config = dict(SIZES["full"]["lkpn"], cross_attention_dim=unet.config.cross_attention_dim)
    lkpn_config.update(model.lkpn or {})
    return dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=LatentControlNetModel.from_unet(unet),
        lkpn=LKPNModel(**lkpn_config).zero_init(),
        scheduler=make_scheduler(),
    )


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder as hard links (no extra disk space), falling back to real copies."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Resumable checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p
        for p in output_dir.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def make_grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """uint8 HWC images in rows (blurry | restored | sharp) on a white canvas."""
    heights = [max(im.shape[0] for im in row) for row in rows]
    widths = [sum(im.shape[1] for im in row) + gap * (len(row) - 1) for row in rows]
    canvas = np.full((sum(heights) + gap * (len(rows) - 1), max(widths), 3), 255, dtype=np.uint8)
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for im in row:
            canvas[y : y + im.shape[0], x : x + im.shape[1]] = im
            x += im.shape[1] + gap
        y += height + gap
    return canvas


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> HWC uint8."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def training_loss(
    *,
    vae,
    unet,
    controlnet,
    lkpn,
    noise_scheduler,
    sharp: torch.Tensor,
    blurry: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Generator | None = None,
    weight_dtype: torch.dtype = torch.float32,
    autocast=contextlib.nullcontext,
    noise_loss_weight: float = 1.0,
    lkpn_loss_weight: float = 1.0,
    pixel_loss_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The loss of one batch: ``sharp`` (B, 3, H, W) in [-1, 1], ``blurry`` in [0, 1], ``text``
    (B, 77, D) embeddings; all on the models' device. Returns ``(loss, detached parts)``."""
    scale = vae.config.scaling_factor
    with torch.no_grad():
        # Contiguous, as the reference makes them (VAE outputs can come out channels-last).
        z0 = (vae.encode(sharp.to(weight_dtype)).latent_dist.sample(generator) * scale).contiguous()
        c = (vae.encode(blurry.to(weight_dtype)).latent_dist.sample(generator) * scale).contiguous()
    text = text.to(weight_dtype)
    noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    num_steps = noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, num_steps, (z0.shape[0],), generator=generator, device=z0.device)
    x_t = noise_scheduler.add_noise(z0, noise, t)

    with autocast():
        z_s = lkpn(c, x_t, t, text)
        down, mid = controlnet(x_t, t, text, hint=torch.cat([c, z_s.to(c.dtype)], dim=1))
        eps = unet(
            x_t,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=[d.to(weight_dtype) for d in down],
            mid_block_additional_residual=mid.to(weight_dtype),
        ).sample

    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(z0, noise, t)
    else:
        target = z0
    noise_loss = F.mse_loss(eps.float(), target.float())
    lkpn_loss = F.mse_loss(z_s.float(), z0.float())
    loss = noise_loss_weight * noise_loss + lkpn_loss_weight * lkpn_loss
    parts = {"noise_loss": noise_loss.detach(), "lkpn_loss": lkpn_loss.detach()}
    if pixel_loss_weight > 0:
        with autocast():
            decoded = vae.decode((z_s / scale).to(weight_dtype)).sample
        pixel_loss = F.mse_loss(decoded.float(), sharp.float())
        loss = loss + pixel_loss_weight * pixel_loss
        parts["pixel_loss"] = pixel_loss.detach()
    parts["loss"] = loss.detach()
    return loss, parts


def _release_previous_accelerator_state() -> None:
    """accelerate keeps one process-wide state (mixed precision, accumulation); a second run in
    the same single-process session (a notebook, tests) may ask for other settings."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        opt = config.training
        self.output_dir = Path(config.output_dir)
        _release_previous_accelerator_state()
        from accelerate.state import PartialState

        # Recorded resolved, so that the loop, the logs and config.json agree.
        opt.gradient_accumulation_steps = opt.accumulation_steps(PartialState().num_processes)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=opt.gradient_accumulation_steps,
            mixed_precision=opt.mixed_precision,
            log_with=opt.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opt.mixed_precision, torch.float32)
        self.global_step = 0
        self.history: list[dict] = []
        self._text_cache: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------- setup
    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def setup(self) -> None:
        cfg, opt, acc = self.config, self.config.training, self.accelerator
        set_seed(cfg.seed)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if opt.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        components = load_components(cfg.model, seed=cfg.seed)
        self.components = components
        self._save_frozen_components()

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        self.vae, self.text_encoder, self.unet = components["vae"], components["text_encoder"], components["unet"]
        self.tokenizer = components["tokenizer"]
        for module in (self.vae, self.text_encoder, self.unet):
            module.requires_grad_(False)
            module.eval()
            module.to(self.device)
            if module.dtype != self.weight_dtype:
                torch.nn.Module.to(module, dtype=self.weight_dtype)  # (diffusers' .to warns needlessly)
        controlnet, lkpn = components["controlnet"].float(), components["lkpn"].float()
        for module in (controlnet, lkpn):
            module.requires_grad_(True)
            module.train()
        if opt.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            lkpn.enable_gradient_checkpointing()
            # The frozen UNet's activations are kept for the backward pass to the residuals too.
            self.unet.enable_gradient_checkpointing()

        self.ema = {}
        if opt.use_ema:
            from diffusers.training_utils import EMAModel

            for name, module in (("controlnet", controlnet), ("lkpn", lkpn)):
                self.ema[name] = EMAModel(module.parameters(), decay=opt.ema_decay)
                self.ema[name].to(self.device)

        optimizer = torch.optim.AdamW(
            [{"params": list(controlnet.parameters())}, {"params": list(lkpn.parameters())}],
            lr=opt.learning_rate,
            betas=(opt.adam_beta1, opt.adam_beta2),
            weight_decay=opt.adam_weight_decay,
            eps=opt.adam_epsilon,
        )
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            opt.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=opt.lr_warmup_steps * acc.num_processes,
            num_training_steps=opt.max_steps * acc.num_processes,
        )

        self.dataset = build_dataset(cfg.data, seed=cfg.seed)
        loader = DataLoader(
            self.dataset,
            batch_size=opt.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            persistent_workers=False,
        )
        if len(self.dataset) < opt.batch_size * acc.num_processes:
            raise ValueError(
                f"the dataset has {len(self.dataset)} images, fewer than one batch "
                f"({opt.batch_size} x {acc.num_processes} processes)"
            )
        self.controlnet, self.lkpn, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(
            controlnet, lkpn, optimizer, loader, lr_scheduler
        )
        for ema in self.ema.values():
            acc.register_for_checkpointing(ema)
        if opt.report_to and acc.is_main_process:
            acc.init_trackers("deblurdiff", config=_flat(cfg.to_dict()))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._resume()

    def _save_frozen_components(self) -> None:
        """Frozen components are saved once (full precision) and hard-linked into every checkpoint."""
        folder = self.output_dir / FROZEN_DIR
        if self.accelerator.is_main_process and not (folder / ".complete").exists():
            for name in FROZEN:
                self.components[name].save_pretrained(folder / name)
            (folder / ".complete").write_text("")
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        target = self.config.training.resume_from_checkpoint
        if not target:
            return
        if target == "latest":
            found = find_checkpoints(self.output_dir)
            if not found:
                self.log(f"No checkpoint in {self.output_dir}: starting from step 0.")
                return
            path = found[-1]
        else:
            path = Path(target)
        if not (path / STATE_DIR).is_dir():
            raise FileNotFoundError(f"{path} holds no {STATE_DIR}/: not a resumable checkpoint")
        self.accelerator.load_state(str(path / STATE_DIR))
        self.global_step = int(json.loads((path / TRAINER_STATE).read_text())["global_step"])
        self.log(f"Resumed from {path} at step {self.global_step}.")

    # -------------------------------------------------------------- one step
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        for prompt in set(prompts) - set(self._text_cache):
            self._text_cache[prompt] = encode_text(self.tokenizer, self.text_encoder, prompt)[0]
        return torch.stack([self._text_cache[p] for p in prompts])

    def step_generator(self, micro_step: int) -> torch.Generator:
        """The randomness of one micro-batch (posterior samples, noise, timesteps) is keyed by
        (seed, step, process), so a resumed run continues exactly as an uninterrupted one."""
        seed = (self.config.seed * 1_000_003 + micro_step) * 1009 + self.accelerator.process_index
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        opt = self.config.training
        return training_loss(
            vae=self.vae,
            unet=self.unet,
            controlnet=self.controlnet,
            lkpn=self.lkpn,
            noise_scheduler=self.noise_scheduler,
            sharp=batch["sharp"].to(self.device),
            blurry=batch["blurry"].to(self.device),
            text=self.encode_prompts(list(batch["prompt"])),
            generator=generator,
            weight_dtype=self.weight_dtype,
            autocast=self.accelerator.autocast,
            noise_loss_weight=opt.noise_loss_weight,
            lkpn_loss_weight=opt.lkpn_loss_weight,
            pixel_loss_weight=opt.pixel_loss_weight,
        )

    # -------------------------------------------------------------- loop
    def train(self) -> dict:
        cfg, opt, acc = self.config, self.config.training, self.accelerator
        updates_per_epoch = max(1, len(self.loader) // opt.gradient_accumulation_steps)
        first_epoch = self.global_step // updates_per_epoch
        skip = (self.global_step % updates_per_epoch) * opt.gradient_accumulation_steps
        self.log(
            f"Training {sum(p.numel() for p in self.params) / 1e6:.2f}M parameters (ControlNet + LKPN) on "
            f"{len(self.dataset)} images, {acc.num_processes} process(es), batch {opt.batch_size} x "
            f"{opt.gradient_accumulation_steps} accumulation, steps {self.global_step} -> {opt.max_steps}."
        )
        window: list[dict] = []
        tic = time.perf_counter()
        epoch = first_epoch
        last_saved = None
        while self.global_step < opt.max_steps:
            self.loader.set_epoch(epoch)
            loader = acc.skip_first_batches(self.loader, skip) if (epoch == first_epoch and skip) else self.loader
            for batch in loader:
                micro_step = self.global_step * opt.gradient_accumulation_steps + len(window)
                with acc.accumulate(self.controlnet, self.lkpn):
                    loss, parts = self.compute_loss(batch, self.step_generator(micro_step))
                    acc.backward(loss)
                    if acc.sync_gradients and opt.max_grad_norm:
                        acc.clip_grad_norm_(self.params, opt.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                window.append({k: v.item() for k, v in parts.items()})
                if not acc.sync_gradients:
                    continue

                self.global_step += 1
                if self.ema:
                    self.ema["controlnet"].step(acc.unwrap_model(self.controlnet).parameters())
                    self.ema["lkpn"].step(acc.unwrap_model(self.lkpn).parameters())
                step_means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                self.history.append({"step": self.global_step, **step_means})
                if self.global_step % opt.log_every == 0 or self.global_step == opt.max_steps:
                    self._log_window(epoch, tic)
                    tic = time.perf_counter()
                window = []

                if opt.checkpoint_every and self.global_step % opt.checkpoint_every == 0:
                    last_saved = self.save_checkpoint()
                every = cfg.validation.every_steps
                if every and (self.global_step % every == 0 or self.global_step == opt.max_steps):
                    self.validate()
                if self.global_step >= opt.max_steps:
                    break
            epoch += 1

        if last_saved is None or last_saved.name != f"{CHECKPOINT_PREFIX}{self.global_step:07d}":
            last_saved = self.save_checkpoint()
        pipeline_dir = self.output_dir / PIPELINE_DIR
        if acc.is_main_process:
            if pipeline_dir.exists():
                shutil.rmtree(pipeline_dir)
            for name in FROZEN + TRAINABLE + ("model_index.json",):
                src = last_saved / name
                if src.is_dir():
                    _link_tree(src, pipeline_dir / name)
                else:
                    pipeline_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, pipeline_dir / name)
            self.log(f"Done: the trained pipeline is in {pipeline_dir}")
        acc.wait_for_everyone()
        acc.end_training()
        return {
            "global_step": self.global_step,
            "history": self.history,
            "output_dir": str(self.output_dir),
            "last_checkpoint": str(last_saved),
            "pipeline_dir": str(pipeline_dir),
        }

    def _log_window(self, epoch: int, tic: float) -> None:
        acc, opt = self.accelerator, self.config.training
        n = min(self.global_step % opt.log_every or opt.log_every, len(self.history))
        recent = self.history[-n:]
        keys = [k for k in recent[0] if k != "step"]
        local = torch.tensor([[np.mean([r[k] for r in recent]) for k in keys]], device=self.device)
        means = acc.gather(local).mean(0).tolist()
        row = {"step": self.global_step, "epoch": epoch, **dict(zip(keys, means))}
        row["lr"] = self.lr_scheduler.get_last_lr()[0]
        row["sec_per_step"] = (time.perf_counter() - tic) / max(1, len(recent))
        if opt.report_to:
            acc.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=self.global_step)
        if acc.is_main_process:
            parts = " ".join(f"{k} {row[k]:.4f}" for k in keys if k != "loss")
            self.log(
                f"step {self.global_step}/{opt.max_steps} loss {row['loss']:.4f} ({parts}) "
                f"lr {row['lr']:.2e} {row['sec_per_step']:.2f}s/step"
            )
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    # -------------------------------------------------------------- checkpoints
    def _trained_modules(self):
        return self.accelerator.unwrap_model(self.controlnet), self.accelerator.unwrap_model(self.lkpn)

    class _EMAWeights:
        """Swap the EMA weights into the trained modules for the duration of a block."""

        def __init__(self, trainer):
            self.trainer = trainer

        def __enter__(self):
            for ema, module in zip(self.trainer.ema.values(), self.trainer._trained_modules()):
                ema.store(module.parameters())
                ema.copy_to(module.parameters())

        def __exit__(self, *exc):
            for ema, module in zip(self.trainer.ema.values(), self.trainer._trained_modules()):
                ema.restore(module.parameters())

    def build_pipeline(self, inference_copies: bool = False):
        """A pipeline around the current modules. With ``inference_copies`` and mixed precision,
        the trained modules are copied in the frozen modules' dtype (the pipeline runs the whole
        model in one dtype), leaving the full-precision training weights untouched."""
        import copy

        from diffusers import DDPMScheduler

        from ..pipeline.pipeline_deblurdiff import DeblurDiffPipeline

        controlnet, lkpn = self._trained_modules()
        if inference_copies and self.weight_dtype != torch.float32:

            def plain_copy(module):
                clone = copy.deepcopy(module)
                # Drop accelerate's mixed-precision forward (autocast, outputs cast to fp32).
                clone.__dict__.pop("forward", None)
                clone.__dict__.pop("_original_forward", None)
                return torch.nn.Module.to(clone, dtype=self.weight_dtype).eval()

            controlnet, lkpn = plain_copy(controlnet), plain_copy(lkpn)
        pipe = DeblurDiffPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            controlnet=controlnet,
            lkpn=lkpn,
            scheduler=DDPMScheduler.from_config(self.noise_scheduler.config),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = self.output_dir / f"{CHECKPOINT_PREFIX}{self.global_step:07d}"
        acc.save_state(str(path / STATE_DIR))
        if acc.is_main_process:
            controlnet, lkpn = self._trained_modules()
            with self._EMAWeights(self):
                controlnet.save_pretrained(path / "controlnet")
                lkpn.save_pretrained(path / "lkpn")
            frozen = self.output_dir / FROZEN_DIR
            for name in FROZEN:
                _link_tree(frozen / name, path / name)
            self.build_pipeline().save_config(path)  # model_index.json
            state = {"global_step": self.global_step, "config": self.config.to_dict()}
            (path / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            self.log(f"Saved checkpoint {path}")
            limit = self.config.training.checkpoints_total_limit
            if limit:
                for old in find_checkpoints(self.output_dir)[:-limit]:
                    if old != path:
                        shutil.rmtree(old)
        acc.wait_for_everyone()
        return path

    # -------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> Path | None:
        acc, val = self.accelerator, self.config.validation
        out = None
        if acc.is_main_process:
            if not hasattr(self, "_val_dataset"):
                self._val_dataset = build_dataset(val.data_config(self.config.data), seed=val.seed)
            n = min(val.num_images, len(self._val_dataset))
            rows, psnr_restored, psnr_blurry = [], [], []
            for module in self._trained_modules():
                module.eval()
            with self._EMAWeights(self):
                pipe = self.build_pipeline(inference_copies=True)
                for i in range(n):
                    item = self._val_dataset[i]
                    blurry, sharp = item["blurry"], (item["sharp"] + 1) / 2
                    restored = pipe(
                        blurry[None].to(self.device),
                        prompt=item["prompt"],
                        num_inference_steps=val.num_inference_steps,
                        generator=torch.Generator(device="cpu").manual_seed(val.seed + i),
                        output_type="pt",
                    ).images[0].cpu()
                    rows.append([_to_uint8(blurry), _to_uint8(restored), _to_uint8(sharp)])
                    psnr_restored.append(_psnr(restored, sharp))
                    psnr_blurry.append(_psnr(blurry, sharp))
            folder = self.output_dir / "validation"
            folder.mkdir(parents=True, exist_ok=True)
            out = folder / f"step-{self.global_step:07d}.png"
            PIL.Image.fromarray(make_grid(rows)).save(out)
            row = {
                "step": self.global_step,
                "validation_psnr": float(np.mean(psnr_restored)),
                "validation_psnr_blurry": float(np.mean(psnr_blurry)),
                "validation_grid": str(out.relative_to(self.output_dir)),
            }
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.log(
                f"validation at step {self.global_step}: PSNR {row['validation_psnr']:.2f} dB "
                f"(blurry input {row['validation_psnr_blurry']:.2f} dB) -> {out}"
            )
            for module in self._trained_modules():
                module.train()
        acc.wait_for_everyone()
        return out


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def train(config: TrainConfig | dict | str | Path, overrides: list[str] | None = None) -> dict:
    """Train as ``config`` (a TrainConfig, a dict, or a config file path) says; returns a summary
    (``global_step``, per-step ``history``, ``last_checkpoint``, ``pipeline_dir``)."""
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif isinstance(config, dict):
        from .config import apply_overrides

        config = TrainConfig.from_dict(apply_overrides(json.loads(json.dumps(config)), overrides or []))
    trainer = Trainer(config)
    trainer.setup()
    return trainer.train()
