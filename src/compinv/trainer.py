"""The one training loop every inversion method shares (accelerate: DDP, mixed precision).

A method's trainable state (`Trainable`) says what is trained and how it is saved; the loop
owns the rest: batches, the loss terms (losses.py, semantic.py) and their weighted sum,
optimisation, the NaN guard, progress bar, TensorBoard, validation images (validation.py),
checkpoints and resume (checkpoints.py).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from compinv.artifacts import atomic_write_text, save_image
from compinv.checkpoints import ResumableState, load_checkpoint, save_checkpoint
from compinv.data import Batch, ConceptDataset
from compinv.errors import CompinvError
from compinv.methods.registry import Method
from compinv.losses import diffusion_target, reconstruction_terms, weighted_total
from compinv.semantic import AnchorAttractor, anchor_loss, captured_input_embeddings
from compinv.diagnostics import VocabularyStats
from compinv.tokens import ConceptToken
from compinv.validation import concept_scalars, live_pipeline, validation_grid
from compinv.versions import library_versions


# Settings that shape the trained tensors: a checkpoint of a run with others cannot continue it.
RESUME_SETTINGS = ("num_vectors", "freeze_model", "lora", "lora_rank", "train_text_encoder")


def all_finite(tensors) -> bool:
    """True when no tensor holds a NaN or an infinity (one device sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


class Trainable(Protocol):
    """What a method trains (built by its registry entry)."""

    modules: list[torch.nn.Module]  # modules holding trained parameters (prepared by accelerate)
    text_encoder: torch.nn.Module  # the (unprepared) text encoder whose output conditions the UNet

    def parameters(self) -> list[torch.nn.Parameter]: ...
    def prepare_gradients(self) -> None: ...  # before clipping and the step: the optimised tensors' gradients in place
    def after_step(self) -> None: ...  # after each optimiser step and a resume: write the optimised rows into the model
    def save(self, path: Path) -> Path: ...  # write the artifact a user loads, atomically


@dataclass
class TrainResult:
    out: Path
    artifact: Path  # the embedding file (Textual Inversion) or the method's folder
    steps: int
    last_losses: dict[str, float]

    @property
    def embeddings_path(self) -> Path:
        """The artifact's former name, kept for compatibility."""
        return self.artifact


def _make_accelerator(cfg, out: Path) -> Accelerator:
    """A fresh Accelerator per run: the API may train several times in one process.

    accelerate keeps its settings (mixed precision, ...) in a process-wide singleton; we reset
    that, but keep the distributed PartialState so a run under `accelerate launch` stays in its
    process group.
    """
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise CompinvError("`report_to` tensorboard: tensorboard is not installed; run "
                           "`pip install tensorboard` or report to none")
    AcceleratorState._reset_state()
    try:
        return Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=cfg.mixed_precision,
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
    except (ValueError, RuntimeError, ImportError) as exc:
        raise CompinvError(f"`mixed_precision` {cfg.mixed_precision}: {exc}; fp16 needs a GPU, "
                           "use bf16 or no on a CPU") from exc


def effective_lr(cfg, processes: int, prior_lr_factor: float = 1.0) -> float:
    """`lr`, scaled by the global batch when `scale_lr` is on, and by the method's
    `prior_lr_factor` when class images share the batch (the official Custom Diffusion script
    doubles it)."""
    lr = cfg.lr * cfg.batch_size * cfg.grad_accum * processes if cfg.scale_lr else cfg.lr
    return lr * prior_lr_factor if getattr(cfg, "prior_weight", 0.0) > 0 else lr


class Trainer:
    """Runs `cfg.steps` optimisation steps of `trainable` on `dataset` with the frozen rest of `pipe`."""

    def __init__(self, cfg, method: Method, pipe: StableDiffusionPipeline, dataset: ConceptDataset,
                 trainable: Trainable, tokens: list[ConceptToken], out: Path,
                 resume_from: Path | None, attractor: AnchorAttractor | None = None):
        self.cfg, self.pipe, self.dataset, self.method, self.out = cfg, pipe, dataset, trainable, out
        self.tokens, self.attractor = tokens, attractor
        self._stats: VocabularyStats | None = None
        self.spec = method
        self.artifact_name = method.artifact_name(cfg)
        self.resume_from = resume_from
        self.accelerator = _make_accelerator(cfg, out)
        set_seed(cfg.seed)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision,
                                                                                torch.float32)
        self.global_step = 0
        self._freeze_the_rest()
        self._prepare_optimisation()

    def _freeze_the_rest(self) -> None:
        """Frozen VAE/UNet to the device (and to the mixed-precision dtype); trained ones stay fp32."""
        for module in (self.pipe.vae, self.pipe.unet):
            module.to(self.accelerator.device)
            if module in self.method.modules:
                continue
            module.requires_grad_(False)
            if module.dtype != self.weight_dtype:
                module.to(dtype=self.weight_dtype)
        if self.cfg.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
            self.pipe.unet.train()
            self.pipe.text_encoder.gradient_checkpointing_enable()

    def _prepare_optimisation(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        for module in self.method.modules:  # accelerate would move them too, but after the optimiser is made,
            module.to(acc.device)           # and the method's own tensors (its concept rows) must be there first
        self.method.after_step()
        processes = acc.num_processes
        self.lr = effective_lr(cfg, processes, self.spec.prior_lr_factor)
        optimizer = torch.optim.AdamW(self.method.parameters(), lr=self.lr,
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
        self.unet = self._prepared(self.pipe.unet)

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
        """The loss terms of one micro-batch and their weighted sum ("loss").

        Class images (prior preservation) share the batch; `batch.is_prior` marks them. The
        anchor loss reads only the concept prompts, so it works with or without prior images.
        """
        acc, cfg, pipe = self.accelerator, self.cfg, self.pipe
        pixels = batch.pixels.to(acc.device, dtype=self.weight_dtype)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=batch.generators)
            latents = latents * pipe.vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=batch.generators, device=acc.device,
                             dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in batch.generators])
        timesteps = timesteps.to(acc.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps).to(pipe.unet.dtype)
        encoder = acc.unwrap_model(self.text_encoder)
        with captured_input_embeddings(encoder) as embedded:
            hidden = self.text_encoder(batch.input_ids.to(acc.device))[0].to(pipe.unet.dtype)
        pred = self.unet(noisy, timesteps, hidden).sample
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        terms = reconstruction_terms(pred, target, batch.mask, batch.is_prior)
        terms["anchor"] = self._anchor_term(encoder, embedded[0], batch)
        weights = {"rec": cfg.recon_weight, "anchor": cfg.anchor_weight,
                   "prior": getattr(cfg, "prior_weight", 0.0)}
        terms["loss"] = weighted_total(terms, weights)
        return terms

    def _anchor_term(self, encoder, prompts: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The semantic anchor loss of the concept prompts (class prompts hold no concept)."""
        if self.cfg.anchor_weight <= 0 or self.attractor is None:
            return torch.zeros((), device=prompts.device)
        ids = batch.input_ids
        if batch.is_prior is not None:
            prompts, ids = prompts[~batch.is_prior.to(prompts.device)], ids[~batch.is_prior]
        table = encoder.get_input_embeddings().weight.detach()
        return anchor_loss(prompts, self.attractor.reference(prompts, ids, table))

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> TrainResult:
        acc = self.accelerator
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if acc.is_main_process:
            self._write_config()
            if self.cfg.report_to != "none":
                acc.init_trackers("compinv", config=_scalar_config(self.cfg))
        bar = tqdm(total=self.cfg.steps, initial=self.global_step, desc="training",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        logs: dict[str, float] = {}
        while self.global_step < self.cfg.steps:
            logs = self.step()
            self.global_step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "prior" or v})
            acc.log({**logs, "lr": self.lr_scheduler.get_last_lr()[0], **self._anchor_scalars()},
                    step=self.global_step)
            self._periodic_outputs()
        bar.close()
        artifact = self._finish()
        acc.end_training()
        return TrainResult(self.out, artifact, self.global_step, logs)

    def step(self) -> dict[str, float]:
        """One optimisation step (grad_accum micro-batches); returns the mean loss terms.

        The NaN guard checks the loss and the gradients before the optimiser may apply them (so
        the weights are still the last finite ones when it stops), and the trained tensors after.
        """
        acc = self.accelerator
        sums = {"loss": 0.0, "rec": 0.0, "anchor": 0.0, "prior": 0.0}
        for micro in range(self.cfg.grad_accum):
            batch = self.dataset.batch(self._indices(self.global_step, micro))
            with acc.accumulate(*self.modules):
                terms = self.losses(batch)
                reduced = {k: acc.reduce(v.detach(), reduction="mean") for k, v in terms.items()}
                if not all(torch.isfinite(v) for v in reduced.values()):
                    bad = ", ".join(f"{k}={float(v)}" for k, v in reduced.items() if not torch.isfinite(v))
                    self._stop_on_nan(f"loss is not finite ({bad})")
                acc.backward(terms["loss"])
                if acc.sync_gradients:
                    self._check_gradients()
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in reduced.items():
                sums[key] += float(value) / self.cfg.grad_accum
        self.method.after_step()
        if not all_finite(self.method.parameters()):
            self._stop_on_broken_weights()
        return sums

    def _check_gradients(self) -> None:
        """Clip by the norm of what is trained; stop on non-finite gradients (under fp16 the
        gradient scaler skips such steps itself)."""
        self.method.prepare_gradients()
        if self.cfg.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.method.parameters(), self.cfg.max_grad_norm)
        if self.accelerator.scaler is None and not all_finite(p.grad for p in self.method.parameters()):
            self._stop_on_nan("gradients are not finite")

    def _stop_on_nan(self, what: str) -> None:
        """Keep the last good artifact and stop: training on from a NaN only spreads it."""
        path = self.out / self.artifact_name
        if self.accelerator.is_main_process:
            path = self.method.save(path)
        raise CompinvError(
            f"{what} at step {self.global_step + 1}; stopped. The last good "
            f"{'embedding' if path.suffix else 'weights'} (after step {self.global_step}) was "
            f"saved to {path}. Lower `lr`, or train without mixed precision")

    def _stop_on_broken_weights(self) -> None:
        """The update itself overflowed: the last finite weights are gone, so nothing is saved."""
        raise CompinvError(
            f"the trained weights became NaN or infinite at step {self.global_step + 1}; stopped "
            f"without saving them. Resume from the newest checkpoint in {self.out} with a lower `lr`")

    def _resumable(self) -> ResumableState:
        """What a checkpoint holds: the trained tensors, optimiser, schedule, scaler and the
        attractor's warm starts, plus the settings a resumed run must share."""
        settings = {"method": self.spec.name,
                    "tokens": [[t.token, len(t.ids)] for t in self.tokens],
                    **{k: getattr(self.cfg, k) for k in RESUME_SETTINGS if hasattr(self.cfg, k)}}
        return ResumableState(
            parameters=self.method.parameters(), optimizer=self.optimizer,
            scheduler=self.lr_scheduler.scheduler, scaler=self.accelerator.scaler,
            warm_starts=self.attractor.warm_starts if self.attractor is not None else {},
            settings=settings)

    def _periodic_outputs(self) -> None:
        cfg, step, acc = self.cfg, self.global_step, self.accelerator
        if step == cfg.steps:
            return
        if cfg.save_every and step % cfg.save_every == 0 and acc.is_main_process:
            self.method.save(self._snapshot_path(step))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(acc, self.out, step, cfg.checkpoints_total_limit, self._resumable())
        if cfg.validation_prompt and cfg.validation_every and step % cfg.validation_every == 0:
            self._validate()

    def _finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.out / self.artifact_name
        if acc.is_main_process:
            self.method.save(path)
            self._write_config(finished_step=self.global_step, **self._concept_record())
        if self.cfg.checkpoint_every:
            save_checkpoint(acc, self.out, self.global_step, self.cfg.checkpoints_total_limit,
                            self._resumable())
        if self.cfg.validation_prompt:
            self._validate()
        return path

    def _snapshot_path(self, step: int) -> Path:
        """`<snapshot dir>/<artifact stem>-step-NNNNNN<suffix>`, e.g.
        embeddings/learned_embeds-step-000500.safetensors."""
        name = Path(self.artifact_name)
        return self.out / self.spec.snapshot_dir / f"{name.stem}-step-{step:06d}{name.suffix}"

    def _resume(self, path: Path) -> None:
        self.global_step = load_checkpoint(self.accelerator, path, self._resumable())
        self.method.after_step()  # the restored rows into the text encoder's table
        if self.global_step > self.cfg.steps:
            raise CompinvError(f"`resume` {path}: checkpoint is at step {self.global_step}, past "
                               f"`steps` {self.cfg.steps}; raise `steps` to train further")

    # ---- outputs for people ------------------------------------------------------------------
    def _write_config(self, **extra: Any) -> None:
        record = {**asdict(self.cfg), "method": self.spec.name, "effective_lr": self.lr,
                  "num_processes": self.accelerator.num_processes,
                  "versions": library_versions(), **extra}
        atomic_write_text(self.out / "config.json", json.dumps(record, indent=2, sort_keys=True))

    def _anchor_scalars(self) -> dict[str, float]:
        """The attractor's largest weights per vector, when a concept has several anchors."""
        if self.attractor is None or all(len(n) == 1 for n in self.attractor.names):
            return {}
        scalars = {}
        names = {i: n for t in self.tokens for i, n in zip(t.ids, t.names)}
        for p, c in self.attractor.owners.items():
            weights = self.attractor.weights.get(p)
            for i in ([] if weights is None else weights.argsort(descending=True)[:3].tolist()):
                scalars[f"anchor_weight/{names[p]}/{self.attractor.names[c][i]}"] = float(weights[i])
        return scalars

    def _vocabulary_stats(self) -> VocabularyStats:
        if self._stats is None:
            encoder = self.accelerator.unwrap_model(self.text_encoder)
            self._stats = VocabularyStats(self.pipe.tokenizer, encoder)
        return self._stats

    def _concept_record(self) -> dict[str, Any]:
        """For config.json: where each learned vector ended up, and its anchors' weights."""
        table = self.accelerator.unwrap_model(self.text_encoder).get_input_embeddings().weight
        stats = self._vocabulary_stats()
        record = {"embedding_report": [stats.report(n, table[i]).as_dict()
                                       for t in self.tokens for n, i in zip(t.names, t.ids)]}
        if self.attractor is not None:
            names = {i: n for t in self.tokens for i, n in zip(t.ids, t.names)}
            self.attractor.solve(table.detach())
            record["anchor_weights"] = self.attractor.summary(names)
            record["anchors"] = {t.token: list(self.attractor.names[self.attractor.owners[t.ids[0]]])
                                 for t in self.tokens}
        return record

    def _validate(self) -> None:
        """Images of the validation prompts with the current weights, as one grid per step;
        with TensorBoard, also the concept's diagnostics (out-of-distribution score, share of
        cross-attention on each validation prompt)."""
        acc, cfg = self.accelerator, self.cfg
        acc.wait_for_everyone()
        if acc.is_main_process:
            prompts = [p.replace("{}", self.tokens[0].token) for p in cfg.validation_prompt]
            tracker = _tensorboard(acc) if cfg.report_to == "tensorboard" else None
            with acc.autocast(), live_pipeline(self.pipe, acc.unwrap_model(self.text_encoder)) as live:
                grid = validation_grid(live, prompts, cfg.num_validation_images,
                                       cfg.validation_steps, cfg.resolution, cfg.seed)
                scalars = (concept_scalars(live, self._vocabulary_stats(), self.tokens, prompts,
                                           cfg.validation_steps, cfg.seed) if tracker else {})
            save_image(grid, self.out / "validation" / f"step-{self.global_step:06d}.png")
            if tracker is not None:
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(grid), self.global_step,
                                         dataformats="HWC")
                acc.log(scalars, step=self.global_step)
        acc.wait_for_everyone()


def _tensorboard(acc: Accelerator):
    try:
        return acc.get_tracker("tensorboard", unwrap=False)
    except (ValueError, KeyError):
        return None


def _scalar_config(cfg) -> dict[str, Any]:
    """TensorBoard's hparams take scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in asdict(cfg).items()}
