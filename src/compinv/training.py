"""`compinv.train(config)`: one entry point for every method in the registry.

The flow is the same for all: check the config once, read the concept images (bad inputs fail
before any model loads), load the base model, add the concept tokens, build the dataset the
method's recipe asks for, build the method's trainable state, and run the shared loop.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import PartialState

from compinv.artifacts import claim_run_folder, output_folder, remove_stale_staging, run_lock
from compinv.checkpoints import find_checkpoint
from compinv.data import build_dataset, read_concept_material
from compinv.methods import method_of
from compinv.models import load_pipeline
from compinv.semantic import build_attractor
from compinv.trainer import Trainer, TrainResult


def train(config) -> TrainResult:
    """Train the method `config` belongs to (TrainConfig: Textual Inversion,
    CustomDiffusionConfig, DreamBoothConfig); returns where the artifact was written.

    Everything is checked before any model is loaded or file is written, so a bad input costs
    seconds and leaves no half-made run folder behind.
    """
    cfg = config.resolved()
    artifact = method_of(cfg).artifact_name(cfg)
    main_process = PartialState().is_main_process
    with output_folder(cfg.out) as out, run_lock(out, held=main_process):
        if main_process:
            remove_stale_staging(out)
            claim_run_folder(out, artifact, cfg.resume, cfg.overwrite)
        return prepare(cfg, out).run()


def prepare(cfg, out: Path | None = None) -> Trainer:
    """A ready `Trainer` for a resolved config; `.run()` trains, `.step()` does one step
    (benchmarks and tests drive it step by step)."""
    method = method_of(cfg)
    out = Path(cfg.out) if out is None else out
    resume_from = find_checkpoint(out, cfg.resume)
    material = read_concept_material(cfg.concept_list, getattr(cfg, "prior_weight", 0.0))
    pipe = load_pipeline(cfg.model)
    tokens, dataset = build_dataset(cfg, pipe, out, material, method.recipe(cfg))
    trainable = method.build(cfg, pipe, tokens)
    attractor = (build_attractor(pipe.tokenizer, pipe.text_encoder, cfg.concept_list, tokens,
                                 cfg.anchor_sparsity) if cfg.anchor_weight > 0 else None)
    return Trainer(cfg, method, pipe, dataset, trainable, tokens, out, resume_from, attractor)


# The per-method names of the first releases; each takes its own config class.
train_textual_inversion = train_custom_diffusion = train_dreambooth = train
