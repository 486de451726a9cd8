"""Run settings as dataclasses: the one source of options, defaults and help.

The CLI flags are generated from these fields (`add_arguments`), `--config FILE` fills the same
fields from YAML or JSON, and flags given on the command line override the file. Defaults are
the official code's published TI settings (KNOWLEDGE.md §2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compinv.errors import CompinvError
from compinv.spatial.options import STOP_RULES, GuidanceConfig


def option(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its CLI help (and argparse extras such as `choices`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Settings of one Textual Inversion run with semantic inversion."""

    model: str = option(None, "local diffusers pipeline folder or hub id of an SD 1.x/2.x model")
    images: str = option(None, "folder with the concept's images (3-20 photos are typical)")
    token: str = option(None, "the new word, e.g. '<cute-cat>'")
    init_word: str = option(None, "one-token word whose embedding initialises the new vectors "
                                   "(default: the class word, else the anchor word)")
    class_word: str = option(None, "noun kept after the token in training prompts ('a photo of a "
                                   "<cute-cat> cat'), as the official code does")
    no_class_word: bool = option(False, "train with vanilla prompts ('a photo of a <cute-cat>')")
    anchor_word: str = option(None, "one-token word the learned vectors are pulled toward "
                                    "(default: the class word, else the init word)")
    num_vectors: int = option(1, "vectors per token (the official code uses 3)")
    anchor_weight: float = option(0.95, "weight of the semantic anchor loss")
    recon_weight: float = option(0.05, "weight of the diffusion reconstruction loss")
    no_anchor: bool = option(False, "vanilla Textual Inversion: reconstruction weight 1, anchor 0")
    steps: int = option(5000, "optimisation steps (each one after --grad-accum micro-batches)")
    lr: float = option(0.005, "learning rate (per sample when --scale-lr is on)")
    scale_lr: bool = option(True, "multiply --lr by batch size x grad accumulation x processes "
                                  "(official: 0.005 x 4 x 2 = 0.04); --no-scale-lr to use it as is")
    lr_scheduler: str = option("constant", "diffusers lr schedule", choices=[
        "constant", "constant_with_warmup", "linear", "cosine"])
    lr_warmup_steps: int = option(0, "warm-up steps of the lr schedule")
    batch_size: int = option(4, "images per micro-batch and process")
    grad_accum: int = option(2, "micro-batches per optimisation step")
    resolution: int = option(512, "training resolution in pixels (images are resized and "
                                  "center-cropped)")
    center_crop: bool = option(True, "center-crop to a square before resizing; --no-center-crop "
                                     "takes random crops")
    flip_p: float = option(0.5, "probability of a horizontal flip")
    repeats: int = option(100, "how often each image appears per epoch (sets the epoch length "
                               "logged to TensorBoard)")
    seed: int = option(8888, "random seed (the official code's)")
    out: str = option(None, "run folder for embeddings, checkpoints, images and logs")
    resume: str = option(None, "'latest' or a checkpoint folder to continue from")
    checkpoint_every: int = option(500, "save accelerate state every N steps (0: never)")
    checkpoints_total_limit: int = option(2, "keep only this many checkpoints (0: keep all)")
    save_every: int = option(500, "save the learned embedding every N steps (0: only at the end)")
    validation_prompt: list[str] = option([], "prompt for validation images; repeatable; '{}' or "
                                              "the token marks the concept", action="append")
    validation_every: int = option(500, "make validation images every N steps (0: only at the end)")
    num_validation_images: int = option(4, "images per validation prompt")
    validation_steps: int = option(25, "denoising steps of validation images")
    mixed_precision: str = option("no", "precision of the frozen UNet and VAE",
                                  choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = option(False, "trade compute for memory in UNet and text encoder")
    report_to: str = option("none", "experiment tracker", choices=["tensorboard", "none"])
    weight_decay: float = option(1e-2, "AdamW weight decay (official: 1e-2)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(0.0, "clip gradients to this norm (0: no clipping)")

    def resolved(self) -> TrainConfig:
        """Fill derived defaults (anchor/init words, --no-anchor weights) and check ranges."""
        cfg = dataclasses.replace(self)
        for name in ("model", "images", "token", "out"):
            if not getattr(cfg, name):
                raise CompinvError(f"--{name.replace('_', '-')} is required")
        if cfg.no_class_word:
            cfg.class_word = None
        cfg.anchor_word = cfg.anchor_word or cfg.class_word or cfg.init_word
        cfg.init_word = cfg.init_word or cfg.class_word or cfg.anchor_word
        if cfg.no_anchor:
            cfg.recon_weight, cfg.anchor_weight = 1.0, 0.0
        if cfg.init_word is None:
            raise CompinvError("--init-word is required when neither --class-word nor "
                               "--anchor-word is given (e.g. --init-word cat)")
        if cfg.anchor_weight > 0 and cfg.anchor_word is None:
            raise CompinvError("--anchor-word is required for semantic inversion "
                               "(or pass --no-anchor for vanilla Textual Inversion)")
        positive = ("steps", "batch_size", "grad_accum", "resolution", "repeats")
        for name in positive:
            if getattr(cfg, name) < 1:
                raise CompinvError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1")
        if cfg.num_vectors < 1:
            raise CompinvError(f"--num-vectors {cfg.num_vectors}: must be at least 1")
        if cfg.anchor_weight < 0 or cfg.recon_weight < 0 or cfg.lr <= 0:
            raise CompinvError("--anchor-weight and --recon-weight must be >= 0 and --lr > 0")
        return cfg

    def effective_lr(self, processes: int) -> float:
        """--lr, scaled by the global batch when --scale-lr is on."""
        return self.lr * self.batch_size * self.grad_accum * processes if self.scale_lr else self.lr


CONCEPT_KEYS = ("token", "class_word", "anchor_word", "init_word", "images", "instance_prompt",
                "class_prompt", "class_images")


@dataclass(frozen=True)
class ConceptSpec:
    """One concept of a Custom Diffusion / DreamBooth run (from flags or one --concepts entry).

    `instance_prompt` and `class_prompt` may hold '{}' for the token (with its class word).
    `class_prompt` may instead be a .txt file with one caption per class image.
    """

    token: str
    images: str
    class_word: str | None = None
    anchor_word: str | None = None
    init_word: str | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None
    class_images: str | None = None

    def resolved(self, where: str) -> ConceptSpec:
        """Fill the anchor/init words from the class word, as --class-word does for TI."""
        anchor = self.anchor_word or self.class_word or self.init_word
        init = self.init_word or self.class_word or self.anchor_word
        if init is None:
            raise CompinvError(f"{where}: needs class_word, init_word or anchor_word "
                               "(e.g. class_word: cat)")
        if self.instance_prompt and "{}" not in self.instance_prompt \
                and self.token not in self.instance_prompt.split():
            raise CompinvError(f"{where}: instance_prompt {self.instance_prompt!r} must contain "
                               f"the token {self.token!r} or '{{}}'")
        return dataclasses.replace(self, anchor_word=anchor, init_word=init)


def read_yaml(path: Path, flag: str, fix: str) -> Any:
    """Parse a YAML (or JSON, a subset of YAML) file named by `flag`, with one-line errors."""
    if not path.is_file():
        raise CompinvError(f"{flag} {path}: file not found; {fix}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CompinvError(f"{flag} {path}: not valid YAML or JSON ({exc})") from exc


def load_concepts_file(path: str | Path) -> list[ConceptSpec]:
    """Read a YAML or JSON list of concepts; every schema error names the entry and the key."""
    path = Path(path)
    data = read_yaml(path, "--concepts", "pass a YAML or JSON list of concepts")
    if not isinstance(data, list) or not data:
        raise CompinvError(f"--concepts {path}: must be a non-empty list of concepts, each a mapping "
                           "with at least 'token' and 'images'")
    return [_concept_entry(entry, f"--concepts {path}: entry {i + 1}") for i, entry in enumerate(data)]


def _concept_entry(entry: Any, where: str) -> ConceptSpec:
    if not isinstance(entry, dict):
        raise CompinvError(f"{where}: must be a mapping (token: ..., images: ...), got {entry!r}")
    for key, value in entry.items():
        if key not in CONCEPT_KEYS:
            raise CompinvError(f"{where}: unknown key {key!r}; valid keys: {', '.join(CONCEPT_KEYS)}")
        if value is not None and not isinstance(value, str):
            raise CompinvError(f"{where}: key {key!r} must be a string, got {value!r}")
    for key in ("token", "images"):
        if not entry.get(key):
            raise CompinvError(f"{where}: missing key {key!r}")
    return ConceptSpec(**entry)


@dataclass
class ConceptTrainConfig(TrainConfig):
    """Settings shared by Custom Diffusion and DreamBooth: several concepts and prior preservation."""

    concepts: str = option(None, "YAML or JSON list of concepts (keys: " + ", ".join(CONCEPT_KEYS)
                                 + "); replaces --images/--token/--class-word/...")
    instance_prompt: str = option(None, "training prompt; '{}' stands for the token and its class "
                                        "word (default: 'photo of a {}')")
    class_prompt: str = option(None, "prompt of the prior-preservation images (default: 'photo of a "
                                     "CLASS-WORD'), or a .txt file with one caption per class image")
    class_images: str = option(None, "folder of real class images for prior preservation (any "
                                     "number); without it, --num-class-images are generated")
    prior_weight: float = option(0.0, "weight of the prior-preservation loss (official: 1.0; "
                                      "0: no prior preservation)")
    num_class_images: int = option(200, "class images to generate per concept when no "
                                        "--class-images folder is given")
    class_image_steps: int = option(50, "denoising steps for generated class images")
    steps: int = option(500, "optimisation steps")
    batch_size: int = option(2, "instance images per micro-batch and process (prior preservation "
                                "adds as many class images)")
    grad_accum: int = option(1, "micro-batches per optimisation step")
    scale_lr: bool = option(False, "multiply --lr by batch size x grad accumulation x processes")
    flip_p: float = option(0.0, "probability of a horizontal flip")
    max_grad_norm: float = option(1.0, "clip gradients to this norm (0: no clipping)")
    repeats: int = option(1, "how often each image appears per epoch")

    def concept_specs(self) -> list[ConceptSpec]:
        """The run's concepts: the --concepts file, or the one concept of the flags."""
        if self.concepts:
            specs = load_concepts_file(self.concepts)
            where = [f"--concepts {self.concepts}: entry {i + 1}" for i in range(len(specs))]
        else:
            specs = [ConceptSpec(token=self.token, images=self.images, class_word=self.class_word,
                                 anchor_word=self.anchor_word, init_word=self.init_word,
                                 instance_prompt=self.instance_prompt,
                                 class_prompt=self.class_prompt, class_images=self.class_images)]
            where = ["--token/--images"]
        specs = [s.resolved(w) for s, w in zip(specs, where)]
        seen: dict[str, int] = {}
        for i, spec in enumerate(specs):
            if spec.token in seen:
                raise CompinvError(f"--concepts {self.concepts}: entries {seen[spec.token] + 1} and "
                                   f"{i + 1} both use the token {spec.token!r}; give each concept "
                                   "its own token")
            seen[spec.token] = i
        if self.prior_weight > 0:
            for spec, w in zip(specs, where):
                if not (spec.class_word or spec.class_prompt):
                    raise CompinvError(f"{w}: prior preservation (--prior-weight > 0) needs a "
                                       "class word or a class prompt")
        if self.anchor_weight > 0 and any(s.anchor_word is None for s in specs):
            raise CompinvError("--anchor-word is required for semantic inversion "
                               "(or pass --no-anchor)")
        return specs

    def resolved(self) -> ConceptTrainConfig:
        cfg = dataclasses.replace(self)
        given = [n for n in ("images", "token", "class_word", "init_word", "anchor_word",
                             "instance_prompt", "class_prompt", "class_images") if getattr(cfg, n)]
        if cfg.concepts and given:
            raise CompinvError(f"--concepts replaces --{given[0].replace('_', '-')}; put it in the "
                               "concepts file or drop --concepts")
        if cfg.concepts:  # fill what TrainConfig.resolved checks; concepts are checked above
            cfg.images, cfg.token, cfg.init_word = "<concepts>", "<concepts>", "<concepts>"
        cfg = TrainConfig.resolved(cfg)
        if self.concepts:
            cfg.images = cfg.token = cfg.init_word = cfg.anchor_word = None
        if cfg.no_class_word:
            raise CompinvError("--no-class-word is a Textual Inversion option; leave --class-word "
                               "out of the instance prompt with --instance-prompt instead")
        if cfg.prior_weight < 0 or cfg.num_class_images < 1 or cfg.class_image_steps < 1:
            raise CompinvError("--prior-weight must be >= 0, --num-class-images and "
                               "--class-image-steps >= 1")
        cfg.concept_specs()
        return cfg


@dataclass
class CustomDiffusionConfig(ConceptTrainConfig):
    """Custom Diffusion (attn2 K/V + token rows) with the official code's settings."""

    freeze_model: str = option("crossattn_kv", "what of the cross-attention layers is trained: "
                                               "K and V, or K, V, Q and the output projection",
                               choices=["crossattn_kv", "crossattn"])
    no_aug: bool = option(False, "turn off the scale augmentation (shrink/zoom with loss masks)")
    hflip: bool = option(False, "random horizontal flips")
    lr: float = option(4e-5, "learning rate (doubled with prior preservation, as officially)")

    def effective_lr(self, processes: int) -> float:
        """The official script doubles the rate when class images share the batch."""
        lr = super().effective_lr(processes)
        return lr * 2 if self.prior_weight > 0 else lr

    def resolved(self) -> CustomDiffusionConfig:
        cfg = ConceptTrainConfig.resolved(self)
        cfg.flip_p = 0.5 if cfg.hflip else cfg.flip_p
        return cfg


@dataclass
class DreamBoothConfig(ConceptTrainConfig):
    """DreamBooth (whole UNet, or a LoRA of it, + token rows) with the official code's settings."""

    train_text_encoder: bool = option(False, "also train the whole text encoder")
    lora: bool = option(False, "train a LoRA of the UNet's attention instead of the whole UNet")
    lora_rank: int = option(4, "rank of the LoRA matrices")
    lr: float = option(1e-5, "learning rate (LoRA typically needs ~1e-4)")
    steps: int = option(800, "optimisation steps")
    batch_size: int = option(1, "instance images per micro-batch and process")
    recon_weight: float = option(0.6, "weight of the diffusion reconstruction loss")
    anchor_weight: float = option(0.4, "weight of the semantic anchor loss")

    def resolved(self) -> DreamBoothConfig:
        cfg = ConceptTrainConfig.resolved(self)
        if cfg.lora and cfg.train_text_encoder:
            raise CompinvError("--lora with --train-text-encoder is not supported; the LoRA adapts "
                               "the UNet (the token rows are trained either way)")
        if cfg.lora_rank < 1:
            raise CompinvError(f"--lora-rank {cfg.lora_rank}: must be >= 1")
        return cfg


@dataclass
class GenerateConfig:
    """Settings of plain text-to-image generation with learned concepts."""

    model: str = option(None, "local diffusers pipeline folder or hub id")
    embeddings: list[str] = option([], "learned_embeds.safetensors file or run folder; repeatable",
                                   action="append")
    concept: list[str] = option([], "run folder of `compinv train` (any method: textual-inversion, "
                                    "custom-diffusion, dreambooth, LoRA); repeatable", action="append")
    prompt: str = option(None, "the prompt; learned tokens are used as written ('<cute-cat>')")
    negative_prompt: str = option(None, "what to steer away from")
    num_images: int = option(4, "images to generate")
    steps: int = option(50, "denoising steps")
    guidance_scale: float = option(7.5, "classifier-free guidance scale")
    height: int = option(None, "image height in pixels (default: the model's)")
    width: int = option(None, "image width in pixels (default: the model's)")
    seed: int = option(8888, "random seed; image i uses seed + i, so any image can be remade alone")
    out: str = option(None, "folder for the PNGs and generation.json")
    scheduler: str = option("lms", "denoising scheduler, e.g. lms (the official code's), ddim, "
                                   "euler-a; 'model': the one saved with the model; an unknown "
                                   "name lists the valid ones")
    box: list[str] = option([], "layout guidance: 'PHRASE=x0,y0,x1,y1' puts PHRASE of the prompt "
                                "in that box (fractions of width/height; several boxes: "
                                "'PHRASE=BOX+BOX'); repeatable", action="append")
    layout: str = option(None, "'auto': place the --phrase phrases side by side, left to right "
                               "(two: the official boxes)", choices=["auto"])
    phrase: list[str] = option([], "a phrase of the prompt for --layout auto or --save-attention; "
                                   "repeatable", action="append")
    save_attention: bool = option(False, "write each phrase's cross-attention heat-map over the "
                                         "image as attention-IMAGE-PHRASE.png")
    loss_scale: float = option(GuidanceConfig.loss_scale, "weight of the layout attention loss")
    loss_threshold: float = option(GuidanceConfig.loss_threshold, "stop a step's guidance once "
                                                                   "the unscaled loss is this low")
    max_iterations: int = option(GuidanceConfig.max_iterations, "guidance iterations per guided step")
    guided_steps: int = option(GuidanceConfig.guided_steps, "guide the first N denoising steps")
    guidance_stop: str = option(GuidanceConfig.stop_rule, "official: the first step whose loss "
                                "meets --loss-threshold is the last one guided (the official "
                                "code); per-step: every guided step iterates again",
                                choices=list(STOP_RULES))
    attention_block: list[str] = option([], "diffusers block whose cross-attention the loss reads, "
                                            "e.g. mid_block, up_blocks.1; repeatable (default: the "
                                            "mid block and the first up block with cross-attention)",
                                        action="append")
    official_heads: bool = option(False, "read only half of the attention heads, as the official "
                                         "code does by accident (for comparisons)")

    def resolved(self) -> GenerateConfig:
        """Check every flag before any model loads."""
        from compinv.pipeline import check_scheduler_name  # lazy: this module stays torch-free

        for name in ("model", "prompt", "out"):
            if not getattr(self, name):
                raise CompinvError(f"--{name.replace('_', '-')} is required")
        check_scheduler_name(self.scheduler)
        if self.num_images < 1 or self.steps < 1:
            raise CompinvError("--num-images and --steps must be >= 1")
        if self.box and self.layout:
            raise CompinvError("--box and --layout auto exclude each other; give boxes or 'auto'")
        if self.layout and not self.phrase:
            raise CompinvError("--layout auto needs the phrases to place: add --phrase WORDS for each")
        if self.phrase and not (self.layout or self.save_attention):
            raise CompinvError("--phrase is used with --layout auto or --save-attention; "
                               "with --box the phrases are named in the boxes")
        if self.box and self.phrase:
            raise CompinvError("--box names its phrases itself; drop --phrase")
        if self.save_attention and not (self.box or self.phrase):
            raise CompinvError("--save-attention needs phrases: --box PHRASE=... or --phrase WORDS")
        if self.box or self.layout:
            self.guidance().validated(self.steps)
        return self

    def guidance(self) -> GuidanceConfig:
        """The layout-guidance settings of these flags."""
        return GuidanceConfig(
            loss_scale=self.loss_scale, loss_threshold=self.loss_threshold,
            max_iterations=self.max_iterations, guided_steps=self.guided_steps,
            attention_blocks=tuple(self.attention_block) or None,
            heads="official" if self.official_heads else "all", stop_rule=self.guidance_stop)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """The scalar type of an annotation such as `int`, `str | None` or `list[str]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field; defaults are None so we can tell what was given."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        tp = _base_type(hints[f.name])
        if tp is bool:
            parser.add_argument(_flag(f.name), dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = f" (default: {default})" if default not in (None, []) else ""
        parser.add_argument(_flag(f.name), dest=f.name, type=tp, default=None,
                            help=help_text + shown, **meta)


def _coerce(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            raise CompinvError(f"{source}: unknown key {key!r}; valid keys: {', '.join(sorted(names))}")
        tp = _base_type(hints[name])
        if typing.get_origin(hints[name]) is list or hints[name] == list[str]:
            value = [value] if isinstance(value, str) else list(value or [])
        elif value is not None and not isinstance(value, tp):
            try:
                value = tp(value)
            except (TypeError, ValueError) as exc:
                raise CompinvError(f"{source}: key {key!r} must be {tp.__name__}, got {value!r}") from exc
        out[name] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of option names (dashes or underscores) to values."""
    path = Path(path)
    data = read_yaml(path, "--config", "pass a YAML or JSON file of option names and values")
    if not isinstance(data, dict):
        raise CompinvError(f"--config {path}: must hold a mapping of option names to values")
    return data


def build_config(cls: type, args: argparse.Namespace, config_file: str | None = None) -> Any:
    """Dataclass defaults, then the config file, then the flags actually given."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(_coerce(cls, load_config_file(config_file), f"--config {config_file}"))
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None and given != []:
            values[f.name] = given
    return cls(**values)


def config_to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
