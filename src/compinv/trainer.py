"""The one training loop every inversion method shares (accelerate: DDP, mixed precision).

A method object says what is trained and how it is saved; the loop owns everything else:
batches, the loss (w_rec * diffusion + w_anchor * semantic anchor + w_prior * prior
preservation), optimisation, the NaN guard, progress bar, TensorBoard, validation images,
checkpoints and resume. A method needs:

- `name`: the method's CLI name, recorded in config.json;
- `artifact_name`: the file or folder in the run folder that `save` writes;
- `snapshot_dir`: the run sub-folder for the periodic copies of the artifact;

- `modules`: the nn.Modules holding trainable parameters (prepared by accelerate);
- `parameters()`: the parameters to optimise;
- `text_encoder`: the (unprepared) text encoder whose output conditions the UNet;
- `after_step()`: constraints applied after each optimiser step (e.g. restore frozen rows);
- `expand_prompt(prompt)`: a user prompt with the concept written as the model needs it;
- `save(path)`: write the artifact a user loads (atomically).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from compinv.artifacts import atomic_write_text, save_image
from compinv.config import TrainConfig
from compinv.data import Batch, ConceptDataset
from compinv.errors import CompinvError
from compinv.semantic import anchor_loss, captured_input_embeddings, input_embeddings
from compinv.versions import library_versions

CHECKPOINT_DIR = "checkpoints"
_STATE_FILE = "compinv_state.json"


class Method(Protocol):
    name: str
    artifact_name: str
    snapshot_dir: str
    modules: list[torch.nn.Module]
    text_encoder: torch.nn.Module

    def parameters(self) -> list[torch.nn.Parameter]: ...
    def after_step(self) -> None: ...
    def expand_prompt(self, prompt: str) -> str: ...
    def save(self, path: Path) -> Path: ...


@dataclass
class TrainResult:
    out: Path
    embeddings_path: Path  # the final artifact: the embedding file (TI) or the method's folder
    steps: int
    last_losses: dict[str, float]


@contextmanager
def staged_folder(path: Path) -> Iterator[Path]:
    """Write a folder artifact under a hidden name; move it into place only once complete.

    The previous version is renamed away first and deleted after, so `path` is always either
    the old complete folder or the new complete one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    old = path.with_name(f".{path.name}.old")
    try:
        yield staging
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        staging.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    """The checkpoint folder `--resume` names ('latest' or a path), or a clear error."""
    if not resume:
        return None
    if resume == "latest":
        found = sorted((out / CHECKPOINT_DIR).glob("checkpoint-*"), key=_checkpoint_step)
        if not found:
            raise CompinvError(f"--resume latest: no checkpoint in {out / CHECKPOINT_DIR}; run "
                               "without --resume to start, or pass a checkpoint folder")
        return found[-1]
    path = Path(resume)
    if not (path / _STATE_FILE).is_file():
        raise CompinvError(f"--resume {resume}: not a compinv checkpoint folder (no {_STATE_FILE}); "
                           f"pass 'latest' or a folder such as {out / CHECKPOINT_DIR}/checkpoint-500")
    return path


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _make_accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    """A fresh Accelerator per run: the API may train several times in one process.

    accelerate keeps its settings (mixed precision, ...) in a process-wide singleton; we reset
    that, but keep the distributed PartialState so a run under `accelerate launch` stays in its
    process group.
    """
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise CompinvError("--report-to tensorboard: tensorboard is not installed; run "
                           "`pip install tensorboard` or pass --report-to none")
    AcceleratorState._reset_state()
    try:
        return Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
    except (ValueError, RuntimeError, ImportError) as exc:
        raise CompinvError(f"--mixed-precision {cfg.mixed_precision}: {exc}; fp16 needs a GPU, "
                           "use bf16 or no on a CPU") from exc


class Trainer:
    """Runs `cfg.steps` optimisation steps of `method` on `dataset` with the frozen rest of `pipe`."""

    def __init__(self, cfg: TrainConfig, pipe: StableDiffusionPipeline, dataset: ConceptDataset,
                 method: Method, out: Path, resume_from: Path | None):
        self.cfg, self.pipe, self.dataset, self.method, self.out = cfg, pipe, dataset, method, out
        self.resume_from = resume_from
        self.accelerator = _make_accelerator(cfg, out)
        set_seed(cfg.seed)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision,
                                                                                torch.float32)
        self._prepare_models()
        self.global_step = 0

    def _prepare_models(self) -> None:
        cfg, acc, pipe = self.cfg, self.accelerator, self.pipe
        for frozen in (pipe.vae, pipe.unet):
            frozen.to(acc.device)
            if frozen in self.method.modules:
                continue  # trained in float32; mixed precision only shrinks frozen weights
            frozen.requires_grad_(False)
            if frozen.dtype != self.weight_dtype:
                frozen.to(dtype=self.weight_dtype)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            pipe.unet.train()
            pipe.text_encoder.gradient_checkpointing_enable()
        processes = acc.num_processes
        lr = self.lr = cfg.effective_lr(processes)
        optimizer = torch.optim.AdamW(self.method.parameters(), lr=lr,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=cfg.lr_warmup_steps * processes,
                                     num_training_steps=cfg.steps * processes)
        prepared = acc.prepare(*self.method.modules, optimizer, lr_scheduler)
        self.modules = list(prepared[: len(self.method.modules)])
        self.optimizer, self.lr_scheduler = prepared[-2:]
        for module in self.modules:
            module.train()
        self.text_encoder = self._prepared(self.method.text_encoder)
        # A trained UNet must run through its DDP wrapper, or its gradients are never averaged.
        self.unet = self._prepared(pipe.unet)

    def _prepared(self, module: torch.nn.Module) -> torch.nn.Module:
        """The accelerate-prepared version of a trained module; frozen ones are used as they are."""
        if module in self.method.modules:
            return self.modules[self.method.modules.index(module)]
        return module.to(self.accelerator.device)

    # ---- batches and loss ---------------------------------------------------------------
    def _indices(self, step: int, micro: int) -> list[int]:
        """Global sample indices of this process's share of one micro-batch."""
        bs, p, n = self.cfg.batch_size, self.accelerator.process_index, self.accelerator.num_processes
        first = ((step * self.cfg.grad_accum + micro) * n + p) * bs
        return list(range(first, first + bs))

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """w_rec * diffusion MSE + w_anchor * anchor + w_prior * prior, and the terms for logging.

        Class images (prior preservation) share the batch; `batch.is_prior` marks them. The
        anchor loss reads only the concept prompts, so it works with or without prior images
        (the official code assumed a half-and-half batch: KNOWLEDGE.md §3.4).
        """
        acc, cfg, pipe = self.accelerator, self.cfg, self.pipe
        unet_dtype = pipe.unet.dtype
        pixels = batch.pixels.to(acc.device, dtype=self.weight_dtype)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=batch.generators)
            latents = latents * pipe.vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=batch.generators, device=acc.device,
                             dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in batch.generators])
        timesteps = timesteps.to(acc.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps).to(unet_dtype)
        input_ids = batch.input_ids.to(acc.device)
        encoder = acc.unwrap_model(self.text_encoder)
        with captured_input_embeddings(encoder) as embedded:
            hidden = self.text_encoder(input_ids)[0].to(unet_dtype)
        pred = self.unet(noisy, timesteps, hidden).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        terms = self._diffusion_terms(pred.float(), target.float(), batch)
        if cfg.anchor_weight > 0 and batch.anchor_ids is not None:
            prompts, anchor_ids = embedded[0], batch.anchor_ids
            if batch.is_prior is not None:  # class prompts hold no concept: leave them out
                prompts, anchor_ids = prompts[~batch.is_prior.to(acc.device)], anchor_ids[~batch.is_prior]
            with torch.no_grad():
                anchor = input_embeddings(encoder, anchor_ids.to(acc.device))
            terms["anchor"] = anchor_loss(prompts, anchor)
        else:
            terms["anchor"] = torch.zeros((), device=acc.device)
        terms["loss"] = (cfg.recon_weight * terms["rec"] + cfg.anchor_weight * terms["anchor"]
                         + getattr(cfg, "prior_weight", 0.0) * terms["prior"])
        return terms

    def _diffusion_terms(self, pred: torch.Tensor, target: torch.Tensor,
                         batch: Batch) -> dict[str, torch.Tensor]:
        """Reconstruction MSE of the concept images (inside their loss masks) and of the class images."""
        device = pred.device
        if batch.mask is None and batch.is_prior is None:
            return {"rec": F.mse_loss(pred, target), "prior": torch.zeros((), device=device)}
        error = (pred - target).pow(2)
        mask = (batch.mask.to(device) if batch.mask is not None
                else torch.ones(error.shape[0], 1, *error.shape[2:], device=device))
        per_sample = (error * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * error.shape[1])
        concept = _concept_rows(batch, device)
        prior = per_sample[~concept].mean() if (~concept).any() else torch.zeros((), device=device)
        return {"rec": per_sample[concept].mean(), "prior": prior}

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        acc, cfg = self.accelerator, self.cfg
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        if acc.is_main_process:
            self._write_config()
            if cfg.report_to != "none":
                acc.init_trackers("compinv", config=_scalar_config(cfg))
        bar = tqdm(total=cfg.steps, initial=self.global_step, desc="training",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        logs: dict[str, float] = {}
        while self.global_step < cfg.steps:
            logs = self.step()
            self.global_step += 1
            bar.update(1)
            prior = {"prior": f"{logs['prior']:.4g}"} if getattr(cfg, "prior_weight", 0) else {}
            bar.set_postfix(loss=f"{logs['loss']:.4g}", rec=f"{logs['rec']:.4g}",
                            anchor=f"{logs['anchor']:.3g}", **prior)
            acc.log({**logs, "lr": self.lr_scheduler.get_last_lr()[0]}, step=self.global_step)
            self._periodic_outputs()
        bar.close()
        final = self._finish()
        acc.end_training()
        return TrainResult(self.out, final, self.global_step, logs)

    def step(self) -> dict[str, float]:
        """One optimisation step (grad_accum micro-batches); returns the mean loss terms."""
        acc = self.accelerator
        sums = {"loss": 0.0, "rec": 0.0, "anchor": 0.0, "prior": 0.0}
        for micro in range(self.cfg.grad_accum):
            batch = self.dataset.batch(self._indices(self.global_step, micro))
            with acc.accumulate(*self.modules):
                terms = self.losses(batch)
                reduced = {k: acc.reduce(v.detach(), reduction="mean") for k, v in terms.items()}
                if not all(torch.isfinite(v) for v in reduced.values()):
                    self._stop_on_nan(reduced)
                acc.backward(terms["loss"])
                if acc.sync_gradients and self.cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.method.parameters(), self.cfg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in reduced.items():
                sums[key] += float(value) / self.cfg.grad_accum
        self.method.after_step()
        return sums

    def _stop_on_nan(self, terms: dict[str, torch.Tensor]) -> None:
        """Keep the last good artifact and stop: training on from a NaN only spreads it."""
        bad = ", ".join(f"{k}={float(v)}" for k, v in terms.items() if not torch.isfinite(v))
        path = self.out / self.method.artifact_name
        if self.accelerator.is_main_process:
            path = self.method.save(path)
        raise CompinvError(
            f"loss is not finite ({bad}) at step {self.global_step + 1}; stopped. The last good "
            f"{'embedding' if path.suffix else 'weights'} (after step {self.global_step}) was "
            f"saved to {path}. Lower --lr, or use "
            "--mixed-precision no")

    def _periodic_outputs(self) -> None:
        cfg, step, acc = self.cfg, self.global_step, self.accelerator
        if step == cfg.steps:
            return
        if cfg.save_every and step % cfg.save_every == 0 and acc.is_main_process:
            self.method.save(self._snapshot_path(step))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self._save_checkpoint()
        if cfg.validation_prompt and cfg.validation_every and step % cfg.validation_every == 0:
            self._validate()

    def _finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.out / self.method.artifact_name
        if acc.is_main_process:
            self.method.save(path)
            self._write_config(finished_step=self.global_step)
        if self.cfg.checkpoint_every:
            self._save_checkpoint()
        if self.cfg.validation_prompt:
            self._validate()
        return path

    def _snapshot_path(self, step: int) -> Path:
        """`<snapshot_dir>/<artifact stem>-step-NNNNNN<suffix>`, e.g. learned_embeds-step-000500.safetensors."""
        name = Path(self.method.artifact_name)
        return self.out / self.method.snapshot_dir / f"{name.stem}-step-{step:06d}{name.suffix}"

    # ---- checkpoints ----------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        """accelerate state (trainable modules, optimizer, lr schedule), renamed into place."""
        acc = self.accelerator
        root = self.out / CHECKPOINT_DIR
        final = root / f"checkpoint-{self.global_step}"
        tmp = root / f".checkpoint-{self.global_step}.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            atomic_write_text(tmp / _STATE_FILE, json.dumps({"step": self.global_step}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune_checkpoints(root)
        acc.wait_for_everyone()

    def _prune_checkpoints(self, root: Path) -> None:
        limit = self.cfg.checkpoints_total_limit
        found = sorted(root.glob("checkpoint-*"), key=_checkpoint_step)
        for old in found[: -limit] if limit else []:
            shutil.rmtree(old)

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / _STATE_FILE).read_text())
        self.accelerator.load_state(str(path))
        self.global_step = int(state["step"])
        if self.global_step > self.cfg.steps:
            raise CompinvError(f"--resume {path}: checkpoint is at step {self.global_step}, past "
                               f"--steps {self.cfg.steps}; raise --steps to train further")

    # ---- outputs for people ------------------------------------------------------------------
    def _write_config(self, **extra: Any) -> None:
        record = {**asdict(self.cfg), "method": self.method.name, "effective_lr": self.lr,
                  "num_processes": self.accelerator.num_processes,
                  "versions": library_versions(), **extra}
        atomic_write_text(self.out / "config.json", json.dumps(record, indent=2, sort_keys=True))

    def _validate(self) -> None:
        """Images of the validation prompts with the current weights, as one grid per step."""
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        if acc.is_main_process:
            rows = self._validation_images()
            grid = image_grid(rows)
            save_image(grid, self.out / "validation" / f"step-{self.global_step:06d}.png")
            tracker = _tensorboard(acc) if cfg.report_to == "tensorboard" else None
            if tracker is not None:
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(grid), self.global_step,
                                         dataformats="HWC")
        acc.wait_for_everyone()

    def _validation_images(self) -> list[list[Image.Image]]:
        acc, cfg, pipe = self.accelerator, self.cfg, self.pipe
        encoder = acc.unwrap_model(self.text_encoder)
        validation = StableDiffusionPipeline(
            vae=pipe.vae, text_encoder=encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        validation.set_progress_bar_config(disable=True)
        rows = []
        was_training = [m.training for m in (encoder, pipe.unet)]
        encoder.eval()
        pipe.unet.eval()
        with torch.no_grad(), acc.autocast():
            for prompt in cfg.validation_prompt:
                text = self.method.expand_prompt(prompt)
                gens = [torch.Generator(device="cpu").manual_seed(cfg.seed + i)
                        for i in range(cfg.num_validation_images)]
                rows.append([validation(text, num_inference_steps=cfg.validation_steps,
                                        height=cfg.resolution, width=cfg.resolution,
                                        generator=g).images[0] for g in gens])
        encoder.train(was_training[0])
        pipe.unet.train(was_training[1])
        return rows


def _concept_rows(batch: Batch, device: torch.device) -> torch.Tensor:
    """Boolean mask of the batch rows that show a concept (not a prior-preservation class image)."""
    if batch.is_prior is None:
        return torch.ones(batch.input_ids.shape[0], dtype=torch.bool, device=device)
    return ~batch.is_prior.to(device)


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Paste rows of equally sized images into one picture."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * w, r * h))
    return grid


def _tensorboard(acc: Accelerator):
    try:
        return acc.get_tracker("tensorboard", unwrap=False)
    except (ValueError, KeyError):
        return None


def _scalar_config(cfg: TrainConfig) -> dict[str, Any]:
    """TensorBoard's hparams take scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in asdict(cfg).items()}

