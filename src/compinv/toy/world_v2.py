"""The toy world, version 2: 48x48 scenes whose objects carry patterns, so identity is drawable.

Version 1 (`compinv.toy.world`) has solid objects only; its toy concepts (a striped diamond, a
two-tone heart) are things no caption can say and the v1 model never draws, so "the concept
was learned" could not be measured. Here every object is a shape, a pattern (solid, striped,
dotted, checked, two-tone) and one or two colours, and the caption says all of it:
"a magenta and white striped diamond on grass". A toy concept is then one such combination that
training never shows (its identity is something the model can draw from its parts), photographed
in one context. Changes, each for one reason:

- 48 px (v1: 32): a stripe or a dot must be a few pixels wide on an object of radius 8-15;
- diamond and heart join the shapes, and magenta, pink, teal, white, black the colours: the
  concepts' parts must be words the model knows;
- a colour that would vanish into the background (white on snow, black at night) is never drawn
  there, so every captioned colour is visible;
- held out of training: eight colour-shape pairs (in either colour role) and every toy
  concept's identity; the `heldout` split shows at least one held-out pair per scene.

Rendering reuses v1's anti-aliased masks and background textures, at 48 px.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from compinv.artifacts import atomic_write_text, save_image
from compinv.errors import CompinvError
from compinv.toy.concepts import diamond_mask, heart_mask
from compinv.toy.world import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    SHAPE_MASKS,
    SPLITS,
    background_pixels,
    coverage,
    paint,
    texture_choices,
)

IMAGE_SIZE = 48
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (250, 130, 20), "yellow": (245, 215, 20), "green": (30, 190, 50),
    "teal": (0, 150, 140), "blue": (40, 70, 230), "purple": (150, 50, 200), "magenta": (230, 40, 160),
    "pink": (250, 160, 200), "white": (250, 250, 250), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "diamond", "heart")
PATTERNS = ("solid", "striped", "dotted", "checked", "two-tone")
SOLID_P = 0.4  # share of objects drawn in one colour; the rest split evenly over the patterns
VISIBILITY = 70.0  # RGB distance below which a colour is not drawn on a background's mean colour
TEXTURES = texture_choices(IMAGE_SIZE)

Pair = tuple[str, str]  # (colour, shape)
Identity = tuple[str, str, str, str]  # (colour, second colour, pattern, shape)
HELDOUT_PAIRS: frozenset[Pair] = frozenset({
    ("red", "diamond"), ("orange", "ring"), ("yellow", "heart"), ("green", "star"),
    ("blue", "triangle"), ("purple", "circle"), ("pink", "cross"), ("teal", "square"),
})


@dataclass(frozen=True)
class ToyConceptV2:
    """A toy concept with a drawable identity; `design` is False for the concepts kept out of
    everything used to design the world (only the benchmark may look at them)."""

    name: str
    identity: Identity
    background: str
    design: bool = True

    @property
    def class_word(self) -> str:
        return self.identity[3]

    @property
    def description(self) -> str:
        return object_phrase(*self.identity)


CONCEPTS: tuple[ToyConceptV2, ...] = (
    ToyConceptV2("striped-diamond", ("magenta", "white", "striped", "diamond"), "grass"),
    ToyConceptV2("dotted-ring", ("teal", "yellow", "dotted", "ring"), "sand"),
    ToyConceptV2("two-tone-heart", ("pink", "teal", "two-tone", "heart"), "snow"),
    ToyConceptV2("checked-star", ("red", "white", "checked", "star"), "night"),
    ToyConceptV2("striped-cross", ("orange", "black", "striped", "cross"), "grass", design=False),
    ToyConceptV2("dotted-triangle", ("purple", "yellow", "dotted", "triangle"), "sand", design=False),
)
CONCEPT_IDENTITIES = frozenset(c.identity for c in CONCEPTS)


@dataclass(frozen=True)
class PatternObject:
    """One object; `colour2` equals `colour` for solid objects. Pixels, radians."""

    colour: str
    colour2: str
    pattern: str
    shape: str
    x: float
    y: float
    radius: float
    angle: float

    @property
    def identity(self) -> Identity:
        return self.colour, self.colour2, self.pattern, self.shape

    @property
    def pairs(self) -> frozenset[Pair]:
        return frozenset({(self.colour, self.shape), (self.colour2, self.shape)})


@dataclass(frozen=True)
class SceneV2:
    background: str
    objects: tuple[PatternObject, ...]
    texture: int
    template: int

    @property
    def pairs(self) -> frozenset[Pair]:
        """(colour, shape): some object of that shape shows that colour (what the classifier says)."""
        return frozenset().union(*(o.pairs for o in self.objects))

    @property
    def pattern_pairs(self) -> frozenset[tuple[str, str]]:
        """(pattern, shape) of every object."""
        return frozenset((o.pattern, o.shape) for o in self.objects)


# ---- sampling ----------------------------------------------------------------------------------
@functools.cache
def visible_colours(background: str) -> tuple[str, ...]:
    """The colours drawn on `background`: those far enough from its mean colour."""
    mean = background_pixels([background], [0], IMAGE_SIZE)[0].reshape(-1, 3).mean(axis=0)
    return tuple(c for c, rgb in COLOURS.items() if np.linalg.norm(np.array(rgb) - mean) > VISIBILITY)


def is_training_object(identity: Identity) -> bool:
    colour, colour2, _, shape = identity
    return ((colour, shape) not in HELDOUT_PAIRS and (colour2, shape) not in HELDOUT_PAIRS
            and identity not in CONCEPT_IDENTITIES)


def is_heldout(scene: SceneV2) -> bool:
    return any(not is_training_object(o.identity) for o in scene.objects)


def sample_scenes(n: int, split: str = "train", seed: int | tuple[int, ...] = 0) -> list[SceneV2]:
    """`n` scenes of `split` ("train", "heldout", "all"); tuple seeds give independent streams."""
    if split not in SPLITS:
        raise CompinvError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    rng = np.random.default_rng([*seeds, SPLITS.index(split), 2])
    return [_sample_scene(rng, split) for _ in range(n)]


def _sample_identity(rng: np.random.Generator, background: str,
                     accept: Callable[[Identity], bool]) -> Identity:
    colours = visible_colours(background)
    while True:
        pattern = "solid" if rng.random() < SOLID_P else PATTERNS[1 + rng.integers(len(PATTERNS) - 1)]
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        colour2 = colour if pattern == "solid" else colours[rng.integers(len(colours))]
        identity = (colour, colour2, pattern, shape)
        if (pattern == "solid" or colour2 != colour) and accept(identity):
            return identity


def _sample_scene(rng: np.random.Generator, split: str) -> SceneV2:
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    count = int(rng.integers(1, 3))
    if split == "heldout":
        wanted = [lambda i: any(p in HELDOUT_PAIRS for p in {(i[0], i[3]), (i[1], i[3])})
                  and i not in CONCEPT_IDENTITIES]
        wanted += [is_training_object] * (count - 1)
        wanted = [wanted[i] for i in rng.permutation(count)]
    else:
        wanted = [is_training_object if split == "train" else (lambda i: True)] * count
    identities: list[Identity] = []
    for accept in wanted:
        identities.append(_sample_identity(rng, background, lambda i: accept(i) and
                                           all(i[3] != other[3] or i[:3] != other[:3] for other in identities)))
    objects = tuple(_place(rng, identities))
    return SceneV2(background, objects, int(rng.integers(TEXTURES)), int(rng.integers(len(CAPTION_TEMPLATES))))


def _place(rng: np.random.Generator, identities: list[Identity]) -> list[PatternObject]:
    """As v1's placement at 48 px: one object anywhere, two in opposite halves, never touching."""
    if len(identities) == 1:
        radius = rng.uniform(10.0, 15.0)
        reach = 1.1 * radius
        boxes = [(reach + 1, IMAGE_SIZE - reach - 1)]
    else:
        radius = rng.uniform(7.5, 10.5)
        reach, half = 1.1 * radius, IMAGE_SIZE / 2
        boxes = [(reach + 0.5, half - reach), (half + reach, IMAGE_SIZE - reach - 0.5)]
        boxes = [boxes[i] for i in rng.permutation(2)]
    objects = []
    for identity, (lo, hi) in zip(identities, boxes):
        x, y = rng.uniform(lo, hi), rng.uniform(reach + 1, IMAGE_SIZE - reach - 1)
        angle = 0.0 if identity[3] == "circle" else rng.uniform(-0.25, 0.25)
        objects.append(PatternObject(*identity, float(x), float(y), float(radius), float(angle)))
    return objects


# ---- captions ----------------------------------------------------------------------------------
def object_phrase(colour: str, colour2: str, pattern: str, shape: str) -> str:
    """"a red star", "a magenta and white striped diamond", "an orange and black two-tone cross"."""
    words = colour if pattern == "solid" else f"{colour} and {colour2} {pattern}"
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {shape}"


def caption(scene: SceneV2) -> str:
    objects = " and ".join(object_phrase(*o.identity) for o in scene.objects)
    return CAPTION_TEMPLATES[scene.template].format(objects=objects,
                                                    background=BACKGROUND_PHRASES[scene.background])


OBJECT_ATTRIBUTES = ("colour", "shape", "pattern")


def swap_attribute(scene: SceneV2, rng: np.random.Generator, attribute: str | None = None) -> SceneV2:
    """`scene` with one attribute of one object (drawn at random, as is `attribute` if None)
    set to another value: a caption one word away from the scene's own, which the toy CLIP
    must learn to score lower (its hard negatives), and the probe's "wrong word" caption."""
    index = int(rng.integers(len(scene.objects))) if len(scene.objects) > 1 else 0
    obj = scene.objects[index]
    solid = obj.pattern == "solid"
    if attribute is None:
        choices = [a for a in OBJECT_ATTRIBUTES if a != "pattern" or not solid]
        attribute = choices[int(rng.integers(len(choices)))]
    if attribute == "colour":
        colour = str(rng.choice([c for c in COLOURS if c not in (obj.colour, obj.colour2)]))
        obj = replace(obj, colour=colour, colour2=colour if solid else obj.colour2)
    elif attribute == "shape":
        obj = replace(obj, shape=str(rng.choice([s for s in SHAPES if s != obj.shape])))
    elif attribute == "pattern" and not solid:
        obj = replace(obj, pattern=str(rng.choice([p for p in PATTERNS[1:] if p != obj.pattern])))
    else:
        raise CompinvError(f"`attribute` {attribute!r}: use one of {', '.join(OBJECT_ATTRIBUTES)} "
                           "(a solid object has no pattern to swap)")
    return replace(scene, objects=(*scene.objects[:index], obj, *scene.objects[index + 1:]))


def exchange_attribute(scene: SceneV2, rng: np.random.Generator) -> SceneV2 | None:
    """`scene` with one attribute exchanged between its two objects ("a red star and a blue
    circle" -> "a red circle and a blue star"): the same words, bound the other way, so only a
    CLIP that binds each attribute to its object scores it lower (NegCLIP's swap negatives; the
    fifth run's CLIP preferred the true caption to this one in only 0.86 of held-out scenes, and
    its UNet drew one object's colour on the other's shape in 0.61 of two-object captions).
    The first colour is exchanged (a solid object's second colour follows it), patterns only
    between two patterned objects. None when the scene has one object or no exchange changes
    what it shows (two red objects; a red and a yellow circle, where it only reorders them)."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    options = []
    if a.shape != b.shape:
        options.append((replace(a, shape=b.shape), replace(b, shape=a.shape)))
    if a.pattern != "solid" and b.pattern != "solid" and a.pattern != b.pattern:
        options.append((replace(a, pattern=b.pattern), replace(b, pattern=a.pattern)))
    new_a, new_b = _with_colour(a, b.colour), _with_colour(b, a.colour)
    if a.colour != b.colour and all(o.pattern == "solid" or o.colour != o.colour2 for o in (new_a, new_b)):
        options.append((new_a, new_b))
    same = sorted(o.identity for o in scene.objects)
    options = [o for o in options if sorted(x.identity for x in o) != same]  # not a reordering
    if not options:
        return None
    return replace(scene, objects=options[int(rng.integers(len(options)))])


def _with_colour(obj: PatternObject, colour: str) -> PatternObject:
    return replace(obj, colour=colour, colour2=colour if obj.pattern == "solid" else obj.colour2)


# ---- rendering ---------------------------------------------------------------------------------
def _stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.mod(np.floor(v * 2.5), 2) == 1  # five horizontal bands across the object


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    cu, cv = np.mod(u * 2.2, 1) - 0.5, np.mod(v * 2.2, 1) - 0.5
    return cu * cu + cv * cv <= 0.3 ** 2  # a grid of dots, 0.45 radii apart


def _checks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.mod(np.floor(u * 2) + np.floor(v * 2), 2) == 1  # four cells across the object


# Which pixels of the shape take the second colour, in the object's frame (radius 1, y down).
PATTERN_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "solid": lambda u, v: np.zeros(u.shape, bool), "striped": _stripes, "dotted": _dots,
    "checked": _checks, "two-tone": lambda u, v: u > 0,
}
SHAPE_MASKS_V2 = {**SHAPE_MASKS, "diamond": diamond_mask, "heart": heart_mask}


def render(scenes: list[SceneV2]) -> np.ndarray:
    """uint8 [N, 48, 48, 3]; vectorised over the batch per object slot and colour part."""
    image = background_pixels([s.background for s in scenes], [s.texture for s in scenes], IMAGE_SIZE)
    for slot in range(max((len(s.objects) for s in scenes), default=0)):
        rows = [i for i, s in enumerate(scenes) if len(s.objects) > slot]
        image[rows] = paint_objects(image[rows], [scenes[i].objects[slot] for i in rows])
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def paint_objects(image: np.ndarray, objects: list[PatternObject]) -> np.ndarray:
    """Paint objects[i] onto float image[i] ([M, 48, 48, 3]): first colour, then second."""
    geometry = np.array([(o.x, o.y, o.radius, o.angle) for o in objects], np.float32).reshape(-1, 4)
    for second in (False, True):
        kinds = [f"{o.shape}/{o.pattern}" for o in objects]
        masks = {k: _part_mask(*k.split("/"), second) for k in set(kinds)}
        alpha = coverage(kinds, geometry, masks, IMAGE_SIZE)
        colour = np.array([COLOURS[o.colour2 if second else o.colour] for o in objects], np.float32)
        image = paint(image, alpha, colour[:, None, None, :])
    return image


def _part_mask(shape: str, pattern: str, second: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda u, v: SHAPE_MASKS_V2[shape](u, v) & (PATTERN_MASKS[pattern](u, v) == second)


def render_concept(concept: ToyConceptV2, n: int = 5, seed: int = 0) -> np.ndarray:
    """uint8 [n, 48, 48, 3]: the concept alone at jittered positions, sizes and angles, always on
    its own background (the context inversion should not learn)."""
    rng = np.random.default_rng([seed, CONCEPTS.index(concept), 2])
    objects = []
    for _ in range(n):
        radius = rng.uniform(12.0, 16.0)
        objects.append(PatternObject(*concept.identity, float(rng.uniform(radius + 1, IMAGE_SIZE - radius - 1)),
                                     float(rng.uniform(radius + 1, IMAGE_SIZE - radius - 1)), float(radius),
                                     float(rng.uniform(-0.3, 0.3))))
    image = background_pixels([concept.background] * n, rng.integers(TEXTURES, size=n).tolist(), IMAGE_SIZE)
    return np.clip(np.rint(paint_objects(image, objects)), 0, 255).astype(np.uint8)


def write_concepts(out: str | Path, n: int = 5, seed: int = 0) -> Path:
    """out/<name>/00.png ... for every v2 concept, plus out/concepts.json (the user's photos of
    the toy study); refuses a folder that already holds concept folders."""
    out = Path(out)
    existing = [c.name for c in CONCEPTS if (out / c.name).exists()]
    if existing:
        raise CompinvError(f"{out} already holds concept folders {existing}; choose a new folder")
    for concept in CONCEPTS:
        for i, pixels in enumerate(render_concept(concept, n, seed)):
            save_image(Image.fromarray(pixels), out / concept.name / f"{i:02d}.png")
    index = {c.name: {**asdict(c), "description": c.description, "images": n} for c in CONCEPTS}
    atomic_write_text(out / "concepts.json", json.dumps({"seed": seed, "concepts": index}, indent=2))
    return out
