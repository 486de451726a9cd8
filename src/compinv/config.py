"""Run settings, composed from option groups, with one validation pass per run.

Each training method's config (in its module under `compinv.methods`) is made of the groups
below: what every run has (`RunOptions`, `DataOptions`, `OptimizerOptions`, `LossOptions`),
one concept from flags (`ConceptOptions`), and, for Custom Diffusion and DreamBooth, several
concepts and prior preservation (`ConceptsFileOptions`). A group holds fields only; the checks
are plain functions (`resolve_common`, `single_concept`, `concepts_of`) that a method's
`resolved()` calls once, filling `concept_list` so that the concepts file is parsed once.

Defaults are the official code's published settings (docs/official-code.md). This module is
torch-free, so the CLI can build its flags without loading a model library.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compinv.errors import CompinvError
from compinv.options import option, read_yaml
from compinv.spatial.options import STOP_RULES, GuidanceConfig


@dataclass(frozen=True)
class ConceptSpec:
    """One concept of a run (from flags or one `concepts` file entry).

    `instance_prompt` and `class_prompt` may hold '{}' for the token (with its class word).
    `class_prompt` may instead be a .txt file with one caption per class image. `where` says
    where the concept came from, for error messages.
    """

    token: str
    images: str
    class_word: str | None = None
    anchor_word: str | None = None
    init_word: str | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None
    class_images: str | None = None
    anchor_words: tuple[str, ...] = ()
    anchor_vocabulary: str | None = None
    where: str = "`token`"

    def resolved(self) -> ConceptSpec:
        """Fill the anchor/init words from each other and the class word."""
        words = _word_list(self.anchor_words, self.where)
        if words and self.anchor_word:
            raise CompinvError(f"{self.where}: give one anchor word or a list of anchor words, not "
                               "both (`anchor_words` replaces `anchor_word`)")
        anchor = self.anchor_word or (words[0] if words else None) or self.class_word or self.init_word
        init = self.init_word or self.class_word or anchor
        if init is None:
            raise CompinvError(f"{self.where}: needs class_word, init_word or anchor_word "
                               "(e.g. class_word: cat)")
        if self.instance_prompt and "{}" not in self.instance_prompt \
                and self.token not in self.instance_prompt.split():
            raise CompinvError(f"{self.where}: instance prompt {self.instance_prompt!r} must contain "
                               f"the token {self.token!r} or '{{}}'")
        return dataclasses.replace(self, anchor_word=anchor, init_word=init,
                                   anchor_words=words or ((anchor,) if anchor else ()))


def _word_list(words: str | Sequence[str] | None, where: str) -> tuple[str, ...]:
    """Anchor words given as 'cat,kitten,pet' or a list; each stripped, none empty or repeated."""
    if not words:
        return ()
    items = [w.strip() for w in (words.split(",") if isinstance(words, str) else words)]
    if not all(items):
        raise CompinvError(f"{where}: the anchor words {list(items)} hold an empty word; write "
                           "them as 'cat,kitten,pet'")
    repeated = sorted({w for w in items if items.count(w) > 1})
    if repeated:
        raise CompinvError(f"{where}: anchor word {repeated[0]!r} is given twice; list each once")
    return tuple(items)


CONCEPT_KEYS = tuple(f.name for f in dataclasses.fields(ConceptSpec) if f.name != "where")


@dataclass
class RunOptions:
    """Where the run reads and writes, and what it shows people along the way."""

    model: str = option(None, "local diffusers pipeline folder or hub id of an SD 1.x/2.x model")
    out: str = option(None, "run folder for the learned weights, checkpoints, images and logs")
    resume: str = option(None, "'latest' or a checkpoint folder to continue from")
    overwrite: bool = option(False, "replace the run already in --out (its outputs; a class-image "
                                    "cache stays); without it such a folder is refused")
    checkpoint_every: int = option(500, "save the training state every N steps (0: never)")
    checkpoints_total_limit: int = option(2, "keep only this many newest checkpoints (>= 1)")
    save_every: int = option(500, "save a copy of the learned weights every N steps (0: only at "
                                  "the end)")
    validation_prompt: list[str] = option([], "prompt for validation images; repeatable; '{}' or "
                                              "the token marks the concept", action="append")
    validation_every: int = option(500, "make validation images every N steps (0: only at the end)")
    num_validation_images: int = option(4, "images per validation prompt")
    validation_steps: int = option(25, "denoising steps of validation images")
    mixed_precision: str = option("no", "precision of the frozen UNet and VAE",
                                  choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = option(False, "trade compute for memory in UNet and text encoder")
    report_to: str = option("none", "experiment tracker", choices=["tensorboard", "none"])


@dataclass
class DataOptions:
    """How concept images become training samples."""

    resolution: int = option(512, "training resolution in pixels (images are resized and "
                                  "center-cropped)")
    center_crop: bool = option(True, "center-crop to a square before resizing; --no-center-crop "
                                     "takes random crops")
    flip_p: float = option(0.5, "probability of a horizontal flip")
    repeats: int = option(100, "how often each image appears per epoch (sets the epoch length "
                               "logged to TensorBoard)")
    seed: int = option(8888, "random seed (the official code's)")


@dataclass
class OptimizerOptions:
    """AdamW and its learning-rate schedule."""

    steps: int = option(5000, "optimisation steps (each one after --grad-accum micro-batches)")
    lr: float = option(0.005, "learning rate (per sample when --scale-lr is on)")
    scale_lr: bool = option(True, "multiply --lr by batch size x grad accumulation x processes "
                                  "(official: 0.005 x 4 x 2 = 0.04); --no-scale-lr to use it as is")
    lr_scheduler: str = option("constant", "diffusers lr schedule", choices=[
        "constant", "constant_with_warmup", "linear", "cosine"])
    lr_warmup_steps: int = option(0, "warm-up steps of the lr schedule")
    batch_size: int = option(4, "images per micro-batch and process")
    grad_accum: int = option(2, "micro-batches per optimisation step")
    weight_decay: float = option(1e-2, "AdamW weight decay (official: 1e-2)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(0.0, "clip the trained parameters' gradients to this norm "
                                       "(0: no clipping)")


@dataclass
class LossOptions:
    """loss = recon_weight * diffusion + anchor_weight * semantic anchor (+ prior_weight * prior)."""

    anchor_weight: float = option(0.95, "weight of the semantic anchor loss")
    recon_weight: float = option(0.05, "weight of the diffusion reconstruction loss")
    no_anchor: bool = option(False, "vanilla method: reconstruction weight 1, anchor 0")
    anchor_sparsity: float = option(0.1, "lambda of the sparse attractor over several anchors: "
                                         "the L1 weight on the anchor weights, in units of the "
                                         "anchors' mean squared norm (0: non-negative least squares)")


@dataclass
class ConceptOptions:
    """One concept given by flags."""

    images: str = option(None, "folder with the concept's images (3-20 photos are typical)")
    token: str = option(None, "the new word, e.g. '<cute-cat>'")
    num_vectors: int = option(1, "vectors per token (the official TI runs use 3)")
    init_word: str = option(None, "one-token word initialising the vectors (default: class word)")
    class_word: str = option(None, "noun kept after the token in prompts: 'photo of a <t> cat'")
    anchor_word: str = option(None, "word the vectors are pulled toward (default: the class "
                                    "word, else the init word)")
    anchor_words: str = option(None, "several anchors, 'cat,kitten,pet' (a word of several "
                                     "tokens counts as the mean of their rows); replaces "
                                     "--anchor-word")
    anchor_vocabulary: str = option(None, "more anchors: a file with one word per line, or "
                                          "'nearest:K' for the K words nearest the init word")
    concept_list: tuple[ConceptSpec, ...] = option((), "the run's concepts, filled by resolved()",
                                                   internal=True)


@dataclass
class ConceptsFileOptions:
    """Several concepts (a `concepts` file) and prior preservation: Custom Diffusion, DreamBooth."""

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


# ---- validation: one pass, called by each method config's resolved() --------------------------
# (name, lowest, highest, lowest allowed itself, highest allowed itself): every numeric option
# of a run, checked before any model loads. NaN and infinity fail every range.
_RANGES = (
    ("steps", 1, 10_000_000, True, True), ("batch_size", 1, 4096, True, True),
    ("grad_accum", 1, 4096, True, True), ("repeats", 1, 1_000_000, True, True),
    ("num_vectors", 1, 75, True, True), ("resolution", 8, 2048, True, True),
    ("lr", 0.0, 1e3, False, True), ("anchor_weight", 0.0, 1e6, True, True),
    ("recon_weight", 0.0, 1e6, True, True), ("anchor_sparsity", 0.0, 1e6, True, True),
    ("flip_p", 0.0, 1.0, True, True), ("lr_warmup_steps", 0, 10_000_000, True, True),
    ("checkpoint_every", 0, 10_000_000, True, True), ("save_every", 0, 10_000_000, True, True),
    ("validation_every", 0, 10_000_000, True, True),
    ("checkpoints_total_limit", 1, 1_000_000, True, True),
    ("num_validation_images", 1, 64, True, True), ("validation_steps", 1, 1000, True, True),
    ("seed", 0, 2**32 - 1, True, True), ("adam_beta1", 0.0, 1.0, True, False),
    ("adam_beta2", 0.0, 1.0, True, False), ("adam_epsilon", 0.0, 1.0, False, True),
    ("weight_decay", 0.0, 1e3, True, True), ("max_grad_norm", 0.0, 1e9, True, True),
    ("prior_weight", 0.0, 1e6, True, True), ("num_class_images", 1, 100_000, True, True),
    ("class_image_steps", 1, 1000, True, True), ("lora_rank", 1, 1024, True, True),
)


def check_ranges(cfg: Any, ranges: tuple = _RANGES) -> None:
    """One clear error for the first numeric option out of its range (or not a finite number)."""
    for name, low, high, low_ok, high_ok in ranges:
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        inside = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and (low < value or (low_ok and value == low))
                  and (value < high or (high_ok and value == high)))
        if not inside:
            bounds = f"{'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
            raise CompinvError(f"`{name}` {value}: must be a number in {bounds}")
    if getattr(cfg, "resolution", 8) % 8:
        raise CompinvError(f"`resolution` {cfg.resolution}: must be a multiple of 8 (the VAE "
                           "downsamples by 8)")


def resolve_common(config: Any) -> Any:
    """A copy of `config` with --no-anchor applied and the options every run has checked."""
    cfg = dataclasses.replace(config)
    for name in ("model", "out"):
        if not getattr(cfg, name):
            raise CompinvError(f"`{name}` is required")
    if cfg.no_anchor:
        cfg.recon_weight, cfg.anchor_weight = 1.0, 0.0
    check_ranges(cfg)
    return cfg


def single_concept(cfg: Any) -> ConceptSpec:
    """The one concept given by the flags (`images`, `token`, words)."""
    for name in ("images", "token"):
        if not getattr(cfg, name):
            raise CompinvError(f"`{name}` is required")
    if not (cfg.init_word or cfg.class_word or cfg.anchor_word):
        raise CompinvError("`init_word` is required when neither `class_word` nor `anchor_word` "
                           "is given (e.g. init_word cat)")
    return ConceptSpec(token=cfg.token, images=cfg.images, class_word=cfg.class_word,
                       anchor_word=cfg.anchor_word, init_word=cfg.init_word,
                       anchor_words=_word_list(cfg.anchor_words, "`anchor_words`"),
                       anchor_vocabulary=cfg.anchor_vocabulary,
                       instance_prompt=getattr(cfg, "instance_prompt", None),
                       class_prompt=getattr(cfg, "class_prompt", None),
                       class_images=getattr(cfg, "class_images", None)).resolved()


def concepts_of(cfg: Any) -> tuple[ConceptSpec, ...]:
    """The concepts of a Custom Diffusion / DreamBooth run: the `concepts` file, or the flags."""
    if not cfg.concepts:
        return (single_concept(cfg),)
    given = [n for n in ("images", "token", "class_word", "init_word", "anchor_word",
                         "anchor_words", "anchor_vocabulary", "instance_prompt", "class_prompt",
                         "class_images") if getattr(cfg, n)]
    if given:
        raise CompinvError(f"`concepts` replaces `{given[0]}`; put it in the concepts file or "
                           "drop `concepts`")
    specs = load_concepts_file(cfg.concepts)
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.token in seen:
            raise CompinvError(f"`concepts` {cfg.concepts}: entries {seen[spec.token] + 1} and "
                               f"{i + 1} both use the token {spec.token!r}; give each concept its "
                               "own token")
        seen[spec.token] = i
    files: dict[str, str] = {}
    for spec in specs:  # each token is saved as <stem>.safetensors: two stems must not meet
        other = files.setdefault(token_file_stem(spec.token), spec.token)
        if other != spec.token:
            raise CompinvError(f"`concepts` {cfg.concepts}: tokens {other!r} and {spec.token!r} "
                               f"would both be saved as {token_file_stem(spec.token)}.safetensors; "
                               "make them differ in letters, digits, '-' or '_'")
    return specs


def token_file_stem(token: str) -> str:
    """The file name a token's embedding is saved under: only filesystem-safe characters."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in token).strip("_") or "token"


def check_prior(cfg: Any) -> None:
    """Prior preservation needs, for every concept, something to prompt its class images with."""
    if cfg.prior_weight > 0:
        for spec in cfg.concept_list:
            if not (spec.class_word or spec.class_prompt):
                raise CompinvError(f"{spec.where}: prior preservation (`prior_weight` > 0) needs "
                                   "a class word or a class prompt")


def load_concepts_file(path: str | Path) -> tuple[ConceptSpec, ...]:
    """Read a YAML or JSON list of concepts; every schema error names the entry and the key."""
    path = Path(path)
    data = read_yaml(path, "concepts", "pass a YAML or JSON list of concepts")
    if not isinstance(data, list) or not data:
        raise CompinvError(f"`concepts` {path}: must be a non-empty list of concepts, each a "
                           "mapping with at least 'token' and 'images'")
    return tuple(_concept_entry(entry, f"`concepts` {path}: entry {i + 1}")
                 for i, entry in enumerate(data))


def _concept_entry(entry: Any, where: str) -> ConceptSpec:
    if not isinstance(entry, dict):
        raise CompinvError(f"{where}: must be a mapping (token: ..., images: ...), got {entry!r}")
    for key, value in entry.items():
        if key not in CONCEPT_KEYS:
            raise CompinvError(f"{where}: unknown key {key!r}; valid keys: {', '.join(CONCEPT_KEYS)}")
        if key == "anchor_words" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue
        if value is not None and not isinstance(value, str):
            raise CompinvError(f"{where}: key {key!r} must be a string, got {value!r}")
    for key in ("token", "images"):
        if not entry.get(key):
            raise CompinvError(f"{where}: missing key {key!r}")
    return ConceptSpec(**entry, where=where).resolved()


_GENERATE_RANGES = (
    ("num_images", 1, 1000, True, True), ("batch_size", 1, 1000, True, True), ("steps", 1, 1000, True, True),
    ("guidance_scale", 0.0, 1000.0, True, True), ("seed", 0, 2**32 - 1, True, True),
    ("loss_scale", 0.0, 1e6, False, True), ("loss_threshold", 0.0, 1e6, True, True),
    ("max_iterations", 1, 100, True, True), ("guided_steps", 0, 1000, True, True),
    ("layout_temperature", 0.0, 10.0, True, True), ("proposal_steps", 1, 1000, True, True),
)


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
    batch_size: int = option(4, "images per pipeline call (one UNet pass per step and guidance "
                                "iteration, each image with its own layout); lower it if memory "
                                "runs out, the images stay the same")
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
    layout: str = option(None, "place the --phrase phrases: 'auto' side by side, left to right "
                               "(two: the official boxes); 'anchor' where the model's early "
                               "attention puts them (concept tokens replaced by their anchor "
                               "words); 'learned' sampled per image from --layout-model",
                         choices=["auto", "anchor", "learned"])
    layout_model: str = option(None, "layout model for --layout learned: a `compinv train layout` "
                                     "folder or 'toy' (shipped, for the toy model)")
    layout_temperature: float = option(1.0, "--layout learned: 0 = the most typical layout, "
                                            "1 = the learned spread, more = more diverse")
    proposal_steps: int = option(GuidanceConfig.proposal_steps, "--layout anchor: the first N "
                                 "steps whose attention proposes the boxes")
    anchors: list[str] = option([], "--layout anchor/learned: 'TOKEN=WORDS', the anchor words of a "
                                    "concept token loaded with --embeddings (a --concept run "
                                    "records its own); repeatable", action="append")
    save_layout: bool = option(False, "also write each image with its layout's boxes drawn, "
                                      "as layout-IMAGE.png")
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
                raise CompinvError(f"`{name}` is required")
        check_scheduler_name(self.scheduler)
        check_ranges(self, _GENERATE_RANGES)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not 8 <= value <= 2048 or value % 8):
                raise CompinvError(f"`{name}` {value}: must be a multiple of 8 from 8 to 2048")
        if self.box and self.layout:
            raise CompinvError("`box` and `layout` auto exclude each other; give boxes or 'auto'")
        if self.layout and not self.phrase:
            raise CompinvError(f"`layout` {self.layout} needs the phrases to place: add `phrase` WORDS for each")
        if self.phrase and not (self.layout or self.save_attention):
            raise CompinvError("`phrase` is used with `layout` auto or `save_attention`; "
                               "with `box` the phrases are named in the boxes")
        if self.box and self.phrase:
            raise CompinvError("`box` names its phrases itself; drop `phrase`")
        if self.save_attention and not (self.box or self.phrase):
            raise CompinvError("`save_attention` needs phrases: `box` PHRASE=... or `phrase` WORDS")
        if self.box:  # the boxes first: a bad box is the error to report, not a step count
            from compinv.spatial.layout import parse_box_flag, resolve_layout

            resolve_layout([_parsed_box(parse_box_flag, spec) for spec in self.box])
        if self.layout_model and self.layout != "learned":
            raise CompinvError("`layout_model` is used with `layout` learned only")
        if self.layout == "learned" and not self.layout_model:
            raise CompinvError("`layout` learned needs `layout_model`: a `compinv train layout` "
                               "folder, or 'toy' for the shipped toy model")
        for spec in self.anchors:
            token, sep, words = spec.partition("=")
            if not sep or not token.strip() or not words.strip():
                raise CompinvError(f"`anchors` {spec!r}: write TOKEN=WORDS, e.g. '<cute-cat>=cat'")
        if self.save_layout and not (self.box or self.layout):
            raise CompinvError("`save_layout` needs a layout: `box` or `layout`")
        if self.box or self.layout:
            self.guidance().validated(self.steps)
        return self

    def guidance(self) -> GuidanceConfig:
        """The layout-guidance settings of these flags."""
        return GuidanceConfig(
            loss_scale=self.loss_scale, loss_threshold=self.loss_threshold,
            max_iterations=self.max_iterations, guided_steps=self.guided_steps,
            attention_blocks=tuple(self.attention_block) or None,
            heads="official" if self.official_heads else "all", stop_rule=self.guidance_stop,
            proposal_steps=self.proposal_steps)


def __getattr__(name: str) -> Any:
    """The method configs live with their methods; these names stay importable from here."""
    homes = {"TrainConfig": "textual_inversion", "CustomDiffusionConfig": "custom_diffusion",
             "DreamBoothConfig": "dreambooth"}
    if name in homes:
        import importlib

        return getattr(importlib.import_module(f"compinv.methods.{homes[name]}"), name)
    raise AttributeError(f"module 'compinv.config' has no attribute {name!r}")


def _parsed_box(parse, spec: str):
    """One `--box` flag parsed; its error names the flag it came from."""
    try:
        return parse(spec)
    except CompinvError as exc:
        if "`box" in exc.template:
            raise
        raise CompinvError(f"`box` {spec!r}: {exc.template}") from exc
