"""What one evaluated image is: its file, its prompts, its references, what must be in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One generated image and what it is scored against.

    prompt: the prompt as generated (learned tokens included, "<cute-cat> cat and a backpack").
    plain_prompt: the same prompt with every concept token replaced by its class word
        ("cat and a backpack"): what text alignment scores, as the paper does.
    references: the concept's own photos (image alignment); empty when not known.
    objects: what concept inclusion looks for (the other object's class, e.g. "backpack").
    variant: baseline / semantic / spatial / both, or a run's name.
    index: the image's position in its prompt's images (seed offset), to pair variants.
    concepts: the concept tokens of the prompt, for adapters that need them (the toy metrics).
    attention: heat-map pictures saved with the image, for the report.
    """

    image: Path
    prompt: str
    plain_prompt: str
    variant: str = "run"
    index: int = 0
    references: tuple[Path, ...] = ()
    objects: tuple[str, ...] = ()
    concepts: tuple[str, ...] = ()
    attention: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def prompt_key(self) -> str:
        """Images of different variants with the same plain prompt and index are paired."""
        return self.plain_prompt
