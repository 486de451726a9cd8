"""The toy world: seeded 32x32 scenes of coloured shapes on textured backgrounds, with captions.

Real SD weights and GPUs are not available where compinv is developed, so compositional
generation is measured in a world small enough to train a text-to-image model on a CPU, yet
with the structure the paper is about: objects with attributes, a context (the background),
and *combinations never seen in training*. Every scene is a frozen value; rendering is a pure
function of it (no global RNG), so the same seed always gives the same pixels and captions.

Held out of the training split: six colour-shape pairs in every background (a Latin square, so
every colour and every shape still appears in training) and six colour-shape-background triples
of otherwise trained pairs. The held-out split holds scenes with at least one such combination.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from compinv.errors import CompinvError

IMAGE_SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 70, 230),
    "yellow": (245, 215, 20), "purple": (150, 50, 200), "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star")
BACKGROUNDS = ("grass", "sand", "snow", "night")
BACKGROUND_PHRASES = {"grass": "on grass", "sand": "on sand", "snow": "on snow", "night": "at night"}
CAPTION_TEMPLATES = ("{objects} {background}", "a photo of {objects} {background}",
                     "a picture of {objects} {background}")
SPLITS = ("train", "heldout", "all")

Pair = tuple[str, str]  # (colour, shape)
ALL_PAIRS: tuple[Pair, ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
HELDOUT_PAIRS: frozenset[Pair] = frozenset({
    ("red", "star"), ("green", "circle"), ("blue", "ring"),
    ("yellow", "cross"), ("purple", "square"), ("orange", "triangle"),
})
HELDOUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset({
    ("red", "circle", "snow"), ("blue", "square", "grass"), ("green", "triangle", "night"),
    ("yellow", "star", "sand"), ("purple", "ring", "night"), ("orange", "cross", "grass"),
})

_SUPERSAMPLE = 2  # shape edges are anti-aliased by averaging a 2x2 sub-pixel grid
_TEXTURE_TILES = 8
_TEXTURE_SIZE = 64
TEXTURE_CHOICES = _TEXTURE_TILES * (_TEXTURE_SIZE - IMAGE_SIZE + 1) ** 2


@dataclass(frozen=True)
class SceneObject:
    """One shape; position and radius in pixels, angle in radians."""

    colour: str
    shape: str
    x: float
    y: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to render and caption one image; `objects` are in caption order."""

    background: str
    objects: tuple[SceneObject, ...]
    texture: int  # which background tile and crop, in [0, TEXTURE_CHOICES)
    template: int  # index into CAPTION_TEMPLATES

    @property
    def pairs(self) -> frozenset[Pair]:
        return frozenset((o.colour, o.shape) for o in self.objects)


@dataclass(frozen=True)
class ToyBatch:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    captions: list[str]
    scenes: list[Scene]


# ---- held-out bookkeeping ----------------------------------------------------------------------
def is_heldout(scene: Scene) -> bool:
    """True when the scene shows a combination the training split never contains."""
    return any(p in HELDOUT_PAIRS or (*p, scene.background) in HELDOUT_TRIPLES for p in scene.pairs)


@functools.cache
def training_pairs(background: str) -> tuple[Pair, ...]:
    """Pairs the training split may show in `background`."""
    return tuple(p for p in ALL_PAIRS
                 if p not in HELDOUT_PAIRS and (*p, background) not in HELDOUT_TRIPLES)


def heldout_combinations() -> tuple[tuple[str, str, str], ...]:
    """Every (colour, shape, background) the training split never shows: 6x4 pairs + 6 triples."""
    from_pairs = [(c, s, b) for c, s in sorted(HELDOUT_PAIRS) for b in BACKGROUNDS]
    return tuple(from_pairs + sorted(HELDOUT_TRIPLES))


# ---- sampling ----------------------------------------------------------------------------------
def sample_scenes(n: int, split: str = "train", seed: int | tuple[int, ...] = 0) -> list[Scene]:
    """`n` scenes of `split`; a tuple seed (e.g. (run_seed, step)) gives independent streams."""
    if split not in SPLITS:
        raise CompinvError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    rng = np.random.default_rng([*seeds, SPLITS.index(split)])
    return [_sample_scene(rng, split) for _ in range(n)]


def _sample_scene(rng: np.random.Generator, split: str) -> Scene:
    count = int(rng.integers(1, 3))
    if split == "heldout":
        combos = heldout_combinations()
        colour, shape, background = combos[rng.integers(len(combos))]
        pairs = [(colour, shape)]
        if count == 2:
            others = [p for p in training_pairs(background) if p != (colour, shape)]
            pairs.append(others[rng.integers(len(others))])
        pairs = [pairs[i] for i in rng.permutation(count)]
    else:
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        pool = ALL_PAIRS if split == "all" else training_pairs(background)
        pairs = [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]
    objects = tuple(_place(rng, pairs))
    return Scene(background, objects, int(rng.integers(TEXTURE_CHOICES)),
                 int(rng.integers(len(CAPTION_TEMPLATES))))


def _place(rng: np.random.Generator, pairs: list[Pair]) -> list[SceneObject]:
    """Positions that never overlap: one object anywhere, two in opposite halves (random sides).

    A shape tilted by at most 0.25 rad extends at most 1.04 radii along x or y (the cross's
    arms); 1.1 radii is kept clear.
    """
    if len(pairs) == 1:
        radius = rng.uniform(7.0, 10.0)
        reach = 1.1 * radius
        boxes = [(reach + 1, IMAGE_SIZE - reach - 1)]
    else:
        radius = rng.uniform(5.0, 7.0)
        reach, half = 1.1 * radius, IMAGE_SIZE / 2
        boxes = [(reach + 0.5, half - reach), (half + reach, IMAGE_SIZE - reach - 0.5)]
        boxes = [boxes[i] for i in rng.permutation(2)]
    objects = []
    for (colour, shape), (lo, hi) in zip(pairs, boxes):
        x = rng.uniform(lo, hi)
        y = rng.uniform(reach + 1, IMAGE_SIZE - reach - 1)
        angle = 0.0 if shape == "circle" else rng.uniform(-0.25, 0.25)
        objects.append(SceneObject(colour, shape, float(x), float(y), float(radius), float(angle)))
    return objects


# ---- captions ----------------------------------------------------------------------------------
def object_phrase(colour: str, shape: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def caption(scene: Scene) -> str:
    objects = " and ".join(object_phrase(o.colour, o.shape) for o in scene.objects)
    return CAPTION_TEMPLATES[scene.template].format(
        objects=objects, background=BACKGROUND_PHRASES[scene.background])


_PAIR_RE = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")


def caption_attributes(text: str) -> tuple[list[Pair], str | None]:
    """The (colour, shape) pairs and background a prompt asks for, in order.

    Tolerant on purpose: prompts with concept tokens ("a <dotted-ring> and a red star on snow")
    still yield what the classifier can check.
    """
    pairs = [(m.group(1), m.group(2)) for m in _PAIR_RE.finditer(text)]
    background = next((b for b, phrase in BACKGROUND_PHRASES.items() if phrase in text), None)
    return pairs, background


# ---- rendering ---------------------------------------------------------------------------------
def generate(n: int, split: str = "train", seed: int | tuple[int, ...] = 0) -> ToyBatch:
    """Sample, render and caption `n` scenes in one call."""
    scenes = sample_scenes(n, split, seed)
    return ToyBatch(render(scenes), [caption(s) for s in scenes], scenes)


def render(scenes: list[Scene]) -> np.ndarray:
    """uint8 [N, 32, 32, 3] images; vectorised over the whole batch."""
    image = background_pixels([s.background for s in scenes], [s.texture for s in scenes])
    for slot in range(max((len(s.objects) for s in scenes), default=0)):
        rows = [i for i, s in enumerate(scenes) if len(s.objects) > slot]
        objects = [scenes[i].objects[slot] for i in rows]
        alpha = coverage([o.shape for o in objects], _geometry(objects), SHAPE_MASKS)
        colour = np.array([COLOURS[o.colour] for o in objects], np.float32)
        image[rows] = paint(image[rows], alpha, colour[:, None, None, :])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def paint(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend `colour` (broadcastable to image) over float images with coverage alpha [N, H, W]."""
    return image * (1 - alpha[..., None]) + colour * alpha[..., None]


def _geometry(objects: list[SceneObject]) -> np.ndarray:
    return np.array([(o.x, o.y, o.radius, o.angle) for o in objects], np.float32).reshape(-1, 4)


def object_coordinates(geometry: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel coordinates in each object's frame: (u, v) [M, 2 size, 2 size], radius 1, y down."""
    grid = (np.arange(size * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x, y, radius, angle = (geometry[:, i, None, None] for i in range(4))
    dx, dy = grid[None, None, :] - x, grid[None, :, None] - y
    cos, sin = np.cos(angle), np.sin(angle)
    return (cos * dx + sin * dy) / radius, (-sin * dx + cos * dy) / radius


def coverage(kinds: list[str], geometry: np.ndarray, masks: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage [M, size, size] in [0, 1] of each object, by its kind's mask function."""
    u, v = object_coordinates(geometry, size)
    inside = np.zeros(u.shape, bool)
    for kind in set(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        inside[idx] = masks[kind](u[idx], v[idx])
    s = _SUPERSAMPLE
    return inside.reshape(-1, size, s, size, s).mean(axis=(2, 4), dtype=np.float32)


def _star(u: np.ndarray, v: np.ndarray, inner: float = 0.45) -> np.ndarray:
    """Five-pointed star, one point up: fold the angle into one half-arm, test its edge line."""
    rho = np.hypot(u, v)
    sector = 2 * np.pi / 5
    phi = np.mod(np.arctan2(u, -v), sector)
    phi = np.minimum(phi, sector - phi)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # P is inside when it lies on the origin's side of the edge from (1, 0) to (bx, by).
    return (bx - 1) * py - by * (px - 1) >= 0


SHAPE_MASKS = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,
    "triangle": lambda u, v: (v <= 0.5) & (v >= -1 + np.sqrt(3) * np.abs(u)),
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55 ** 2),
    "cross": lambda u, v: ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1)),
    "star": _star,
}


def texture_choices(size: int = IMAGE_SIZE) -> int:
    """How many distinct background crops of `size` pixels the texture tiles give."""
    return _TEXTURE_TILES * (_TEXTURE_SIZE - size + 1) ** 2


def background_pixels(backgrounds: list[str], textures: list[int], size: int = IMAGE_SIZE) -> np.ndarray:
    """float32 [N, size, size, 3]: crops of precomputed texture tiles, chosen by each texture
    index in [0, texture_choices(size))."""
    unknown = set(backgrounds) - set(BACKGROUNDS)
    if unknown:
        raise CompinvError(f"unknown background(s) {sorted(unknown)}; use {', '.join(BACKGROUNDS)}")
    offsets = _TEXTURE_SIZE - size + 1
    t = np.asarray(textures, np.int64)
    tile, oy, ox = t % _TEXTURE_TILES, (t // _TEXTURE_TILES) % offsets, t // (_TEXTURE_TILES * offsets)
    which = np.array([BACKGROUNDS.index(b) for b in backgrounds], np.int64)
    span = np.arange(size)
    rows, cols = oy[:, None] + span, ox[:, None] + span
    bank = _texture_bank()
    return bank[which[:, None, None], tile[:, None, None], rows[:, :, None], cols[:, None, :]].copy()


@functools.lru_cache(maxsize=1)
def _texture_bank() -> np.ndarray:
    """float32 [4 backgrounds, 8 tiles, 64, 64, 3], made once from a fixed seed."""
    rng = np.random.default_rng(20240101)
    return np.stack([np.stack([_TEXTURES[b](rng) for _ in range(_TEXTURE_TILES)])
                     for b in BACKGROUNDS]).astype(np.float32)


def _grass(rng: np.random.Generator) -> np.ndarray:
    """Vertical blades: noise stretched 4x along y over a mid green."""
    n = _TEXTURE_SIZE
    blades = np.repeat(rng.normal(0, 18, (n // 4, n, 1)), 4, axis=0)
    return np.array([70, 130, 50]) + blades * np.array([0.8, 1.0, 0.6]) + rng.normal(0, 6, (n, n, 3))


def _sand(rng: np.random.Generator) -> np.ndarray:
    """Speckle on beige with soft horizontal ripples."""
    n = _TEXTURE_SIZE
    ripples = 10 * np.sin(np.arange(n)[:, None, None] * 0.7 + rng.uniform(0, 2 * np.pi))
    return np.array([210, 190, 140]) + ripples + rng.normal(0, 12, (n, n, 1)) + rng.normal(0, 4, (n, n, 3))


def _snow(rng: np.random.Generator) -> np.ndarray:
    """Near-white with faint bluish drifts (two random low-frequency waves)."""
    n = _TEXTURE_SIZE
    yy, xx = np.mgrid[0:n, 0:n]
    waves = [np.sin(xx * a + yy * b + p) for a, b, p in rng.uniform(-0.3, 0.3, (2, 3)) * [1, 1, 20]]
    shadow = (0.5 + 0.25 * sum(waves))[..., None]
    return np.array([238, 242, 250]) - shadow * np.array([25, 18, 5]) + rng.normal(0, 4, (n, n, 3))


def _night(rng: np.random.Generator) -> np.ndarray:
    """Dark blue sky with sparse white stars."""
    n = _TEXTURE_SIZE
    stars = (rng.uniform(0, 1, (n, n, 1)) < 0.02) * rng.uniform(120, 230, (n, n, 1))
    return np.array([15, 20, 50]) + rng.normal(0, 3, (n, n, 3)) + stars


_TEXTURES = {"grass": _grass, "sand": _sand, "snow": _snow, "night": _night}
