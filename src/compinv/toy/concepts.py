"""Toy concepts: three objects outside the toy vocabulary, five reference images each.

They play the role of a user's photos of "my cat": a shape and pattern no caption word
describes (so inversion has to learn them), photographed in one fixed context (every image of a
concept shares its background). The fixed background is the irrelevant content the paper says
leaks into an inverted embedding; a good inversion composes the concept with other backgrounds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from compinv.artifacts import atomic_write_text, save_image
from compinv.errors import CompinvError
from compinv.toy.world import IMAGE_SIZE, TEXTURE_CHOICES, background_pixels, coverage, paint

IMAGES_PER_CONCEPT = 5


@dataclass(frozen=True)
class ToyConcept:
    """A novel object; `class_word` is the nearest toy-vocabulary word (init/anchor word)."""

    name: str
    description: str
    class_word: str
    background: str
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]


CONCEPTS: tuple[ToyConcept, ...] = (
    ToyConcept("striped-diamond", "a tall diamond with horizontal magenta and white stripes", "square",
               "grass", ((230, 40, 160), (250, 250, 250))),
    ToyConcept("dotted-ring", "eight cyan dots arranged in a ring", "ring",
               "sand", ((30, 200, 220), (30, 200, 220))),
    ToyConcept("two-tone-heart", "a heart, pink on the left and teal on the right", "circle",
               "snow", ((250, 140, 190), (0, 150, 140))),
)


def diamond_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A tall rhombus, so it cannot pass for a rotated square."""
    return np.abs(u) / 0.65 + np.abs(v) <= 1


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Eight dots of radius 0.2 on a circle of radius 0.8."""
    angles = np.arange(8) * np.pi / 4
    centres = 0.8 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    d2 = (u[..., None] - centres[:, 0]) ** 2 + (v[..., None] - centres[:, 1]) ** 2
    return (d2 <= 0.2 ** 2).any(axis=-1)


def heart_mask(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled to radius 1, y up."""
    x, y = u * 1.25, -v * 1.25 + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


# Which of the two colours a pixel takes (True → second colour), in the object's frame.
_PATTERNS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "striped-diamond": lambda u, v: np.mod(np.floor(v * 3.5), 2) == 1,
    "dotted-ring": lambda u, v: np.zeros(u.shape, bool),
    "two-tone-heart": lambda u, v: u > 0,
}
_MASKS = {"striped-diamond": diamond_mask, "dotted-ring": _dots, "two-tone-heart": heart_mask}


def render_concept(concept: ToyConcept, n: int = IMAGES_PER_CONCEPT, seed: int = 0) -> np.ndarray:
    """uint8 [n, 32, 32, 3]: the concept at jittered positions, sizes and angles, one background."""
    rng = np.random.default_rng([seed, CONCEPTS.index(concept)])
    radius = rng.uniform(8.0, 11.0, n)
    geometry = np.stack([rng.uniform(radius + 1, IMAGE_SIZE - radius - 1),
                         rng.uniform(radius + 1, IMAGE_SIZE - radius - 1),
                         radius, rng.uniform(-0.3, 0.3, n)], axis=1).astype(np.float32)
    textures = rng.integers(TEXTURE_CHOICES, size=n).tolist()
    image = background_pixels([concept.background] * n, textures)
    first, second = (np.array(c, np.float32) for c in concept.colours)
    for part, colour in ((False, first), (True, second)):
        mask = _split_mask(concept.name, part)
        alpha = coverage([concept.name] * n, geometry, {concept.name: mask})
        image = paint(image, alpha, colour)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _split_mask(name: str, second: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The part of the concept's shape drawn in its first or second colour."""
    return lambda u, v: _MASKS[name](u, v) & (_PATTERNS[name](u, v) == second)


def write_concepts(out: str | Path, seed: int = 0) -> Path:
    """Write out/<name>/00.png … 04.png for every concept, plus out/concepts.json describing them.

    Refuses a folder that already holds concept images so a re-run never mixes two versions.
    """
    out = Path(out)
    existing = [c.name for c in CONCEPTS if (out / c.name).exists()]
    if existing:
        raise CompinvError(f"{out} already holds concept folders {existing}; choose a new folder")
    for concept in CONCEPTS:
        for i, pixels in enumerate(render_concept(concept, seed=seed)):
            save_image(Image.fromarray(pixels), out / concept.name / f"{i:02d}.png")
    index = {c.name: {**asdict(c), "images": IMAGES_PER_CONCEPT} for c in CONCEPTS}
    atomic_write_text(out / "concepts.json", json.dumps({"seed": seed, "concepts": index}, indent=2))
    return out
