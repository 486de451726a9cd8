"""Layout-guidance settings: the official constants as defaults (docs/official-code.md,
"Layout guidance").

Kept free of torch imports: the CLI reads these defaults to build its flags, and
`compinv --help` must stay instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from compinv.errors import CompinvError
from compinv.options import option

HEAD_MODES = ("all", "official")
STOP_RULES = ("official", "per-step")


@dataclass(frozen=True)
class GuidanceConfig:
    """How hard, how long and on which attention maps layout guidance pushes the latents.

    `attention_blocks=None` means the official choice: the UNet's mid block and its first up
    block with cross-attention. `heads="official"` keeps only the second half of each map's
    heads, reproducing a batch-chunk quirk of the official code (4 of 8 heads), for comparisons.

    `stop_rule="official"` reproduces the official loop: its loss variable is set once before
    the denoising loop and each guided step iterates `while loss > threshold`, so the first step
    whose last loss meets the threshold is the last step guided at all. `"per-step"` restarts
    every guided step with at least one iteration (more guidance, more cost).

    `proposal_steps` and `proposal_threshold` are used by `layout="anchor"` only: how many
    first denoising steps (at most all) the anchor prompt runs to propose the boxes, and the
    share of a phrase's peak attention a cell needs to be in its box (compinv.spatial.propose).
    """

    loss_scale: float = 30.0
    loss_threshold: float = 0.2
    max_iterations: int = 5
    guided_steps: int = 10
    attention_blocks: tuple[str, ...] | None = None
    heads: str = "all"
    stop_rule: str = "official"
    proposal_steps: int = 10
    proposal_threshold: float = 0.5

    def validated(self, num_inference_steps: int) -> GuidanceConfig:
        """Reject settings that cannot work for a run of `num_inference_steps` steps."""
        if self.guided_steps < 0 or self.guided_steps > num_inference_steps:
            raise CompinvError(
                f"guided steps {self.guided_steps}: must be between 0 and the number of denoising "
                f"steps ({num_inference_steps}); lower `guided_steps` or raise `steps`")
        if self.max_iterations < 1:
            raise CompinvError(f"max iterations {self.max_iterations}: must be >= 1 "
                               "(use `guided_steps` 0 to switch guidance off)")
        if not (math.isfinite(self.loss_scale) and math.isfinite(self.loss_threshold)) \
                or self.loss_scale <= 0 or self.loss_threshold < 0:
            raise CompinvError(f"loss scale {self.loss_scale} must be > 0 and loss threshold "
                               f"{self.loss_threshold} >= 0")
        if self.proposal_steps < 1 or not 0.0 < self.proposal_threshold < 1.0:
            raise CompinvError(f"proposal steps {self.proposal_steps} must be >= 1 and proposal "
                               f"threshold {self.proposal_threshold} in (0, 1)")
        if self.heads not in HEAD_MODES:
            raise CompinvError(f"heads {self.heads!r}: use one of {', '.join(HEAD_MODES)}")
        if self.stop_rule not in STOP_RULES:
            raise CompinvError(f"stop rule {self.stop_rule!r}: use one of {', '.join(STOP_RULES)} "
                               "(`guidance_stop`)")
        return self


@dataclass
class LayoutTrainConfig:
    """Settings of `compinv train layout`."""

    model: str = option(None, "diffusers pipeline folder the layouts are harvested from, or "
                              "'toy' for the shipped toy model")
    prompts: str = option("auto", "text file, one prompt per line with the phrases in [brackets] "
                                  "('a [cat] and a [dog] on grass'), or 'auto'")
    out: str = option(None, "folder for layout_model.safetensors and layout_model.json")
    num_prompts: int = option(256, "prompts drawn for 'auto'")
    samples_per_prompt: int = option(4, "initial noises (layouts) harvested per prompt")
    max_phrases: int = option(2, "phrases the model can place")
    steps: int = option(25, "denoising steps of the proposal schedule")
    proposal_steps: int = option(10, "first steps whose attention proposes the boxes")
    guidance_scale: float = option(7.5, "classifier-free guidance scale of the proposal")
    resolution: int = option(None, "image size of the proposal (default: the model's)")
    scheduler: str = option("model", "scheduler of the proposal (see `compinv generate --scheduler`)")
    epochs: int = option(400, "full passes of the fit over the harvested layouts")
    lr: float = option(3e-3, "Adam learning rate of the fit")
    batch_size: int = option(32, "prompts per proposal batch")
    seed: int = option(0, "seed of the prompts, noises and initial weights")

    def resolved(self) -> LayoutTrainConfig:
        for name in ("model", "out"):
            if not getattr(self, name):
                raise CompinvError(f"`{name}` is required")
        for name in ("num_prompts", "samples_per_prompt", "max_phrases", "steps", "proposal_steps",
                     "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise CompinvError(f"`{name}` {getattr(self, name)}: must be >= 1")
        if self.proposal_steps > self.steps:
            raise CompinvError(f"`proposal_steps` {self.proposal_steps}: at most `steps` ({self.steps})")
        if self.prompts != "auto" and not Path(self.prompts).is_file():
            raise CompinvError(f"`prompts` {self.prompts}: no such file; give a text file or 'auto'")
        return self
