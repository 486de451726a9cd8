"""Toy metrics: the paper's evaluation protocol, with the attribute classifier as the toy CLIP.

The paper scores a composition prompt ("<concept> and a backpack on the beach") by *text
alignment* (does the image show what the rest of the prompt asks for), *concept inclusion* (is
the other object there at all) and *image alignment* (does the concept still look like its
photos). In the toy world each of these is a question the classifier answers exactly:

- text alignment: share of the prompt's checkable attributes found: the other object's colour,
  its shape, and the background;
- concept inclusion: the other object (its colour-shape pair) is found;
- image alignment: cosine similarity of the classifier's pooled features between the image and
  the concept's reference images (mean over references), as CLIP-I does with CLIP features;
- concept colours: share of the concept's own colours visible in the image (its identity);
  only colours far from every world colour and background count, so nothing else scores.

Image alignment rewards copying the references' background too, exactly as CLIP-I does: that is
the trade-off the paper reports, so it is kept rather than corrected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compinv.toy.classifier import AttributeClassifier
from compinv.toy.concepts import CONCEPTS, ToyConcept
from compinv.toy.world import (
    ALL_PAIRS,
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOURS,
    Scene,
    background_pixels,
    object_phrase,
    sample_scenes,
)

METRICS = ("text_alignment", "concept_inclusion", "image_alignment", "concept_colours")
COLOUR_TOLERANCE = 60.0  # RGB distance within which a pixel shows a concept colour
COLOUR_MIN_PIXELS = 4  # pixels (of 1,024) a concept colour needs to count as present


@dataclass(frozen=True)
class CompositionPrompt:
    """"a photo of a <concept> and a blue square on snow": the concept plus one world object."""

    concept: str
    colour: str
    shape: str
    background: str

    def text(self, token: str) -> str:
        return (f"a photo of a {token} and {object_phrase(self.colour, self.shape)} "
                f"{BACKGROUND_PHRASES[self.background]}")

    @property
    def other_phrase(self) -> str:
        """The words of the other object, for layouts and attention maps."""
        return f"{self.colour} {self.shape}"


def composition_prompts(concept: ToyConcept, n: int = 20, seed: int = 0) -> list[CompositionPrompt]:
    """`n` distinct prompts: objects whose shape is not the concept's class word (so a concept
    drawn as its class shape is never mistaken for the other object), in backgrounds other than
    the concept's own (so leaking the references' context costs text alignment)."""
    rng = np.random.default_rng([seed, CONCEPTS.index(concept)])
    options = [(c, s, b) for c, s in ALL_PAIRS if s != concept.class_word
               for b in BACKGROUNDS if b != concept.background]
    picks = rng.choice(len(options), size=min(n, len(options)), replace=False)
    return [CompositionPrompt(concept.name, *options[i]) for i in picks]


def score_compositions(classifier: AttributeClassifier, images: np.ndarray,
                       prompts: list[CompositionPrompt], references: np.ndarray,
                       concept: ToyConcept) -> dict[str, np.ndarray]:
    """Per-image scores [N] of every metric; images[i] was generated from prompts[i]."""
    predictions = classifier.predict(images)
    found = predictions.objects()
    backgrounds = predictions.backgrounds()
    text, inclusion = [], []
    for pairs, background, prompt in zip(found, backgrounds, prompts):
        colours, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
        checks = [prompt.colour in colours, prompt.shape in shapes, background == prompt.background]
        text.append(np.mean(checks))
        inclusion.append(float((prompt.colour, prompt.shape) in pairs))
    similarity = (classifier.embed(images) @ classifier.embed(references).T).mean(dim=1).numpy()
    return {"text_alignment": np.array(text), "concept_inclusion": np.array(inclusion),
            "image_alignment": similarity, "concept_colours": concept_colours(images, concept)}


def distinctive_colours(concept: ToyConcept) -> np.ndarray:
    """The concept's colours that no world colour or background comes near (the striped
    diamond's white would be found in every snow scene): [K, 3] float RGB."""
    palette = np.unique(np.array(concept.colours, np.float32), axis=0)
    world = np.array([*COLOURS.values(), *background_colours()], np.float32)
    far = np.linalg.norm(palette[:, None] - world[None], axis=-1).min(axis=1) > COLOUR_TOLERANCE
    return palette[far]


def background_colours() -> list[np.ndarray]:
    return [background_pixels([b], [0])[0].reshape(-1, 3).mean(axis=0) for b in BACKGROUNDS]


def concept_colours(images: np.ndarray, concept: ToyConcept) -> np.ndarray:
    """Share of the concept's distinctive colours with >= COLOUR_MIN_PIXELS pixels near them."""
    pixels = _as_uint8(images).reshape(len(images), -1, 3).astype(np.float32)
    palette = distinctive_colours(concept)
    near = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1) < COLOUR_TOLERANCE
    return (near.sum(axis=1) >= COLOUR_MIN_PIXELS).mean(axis=1)


def _as_uint8(images: np.ndarray) -> np.ndarray:
    return images if images.dtype == np.uint8 else np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (normal approximation)."""
    values = np.asarray(values, np.float64)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(half)


# ---- the base model's own quality ----------------------------------------------------------------
def heldout_captions(n: int, seed: int = 0) -> list[Scene]:
    """`n` held-out scenes: their captions show combinations the toy model never trained on."""
    return sample_scenes(n, "heldout", (seed, 7))


def score_generations(classifier: AttributeClassifier, images: np.ndarray,
                      scenes: list[Scene]) -> dict[str, float]:
    """Quality of images generated from the scenes' captions:
    background (right background), colours_one / colours_two (every captioned colour present,
    in one- and two-object captions), shape_recall (captioned shapes found), all_right (every
    captioned colour-shape pair found and the background right)."""
    predictions = classifier.predict(images)
    found, backgrounds = predictions.objects(), predictions.backgrounds()
    colours_ok = {1: [], 2: []}
    shapes_hit = shapes_total = 0
    all_right = []
    for pairs, background, scene in zip(found, backgrounds, scenes):
        wanted = scene.pairs
        colours_ok[len(scene.objects)].append({c for c, _ in wanted} <= {c for c, _ in pairs})
        shapes = {s for _, s in wanted}
        shapes_hit += len(shapes & {s for _, s in pairs})
        shapes_total += len(shapes)
        all_right.append(wanted <= pairs and background == scene.background)
    return {"background": float(np.mean([b == s.background for b, s in zip(backgrounds, scenes)])),
            "colours_one": float(np.mean(colours_ok[1])), "colours_two": float(np.mean(colours_ok[2])),
            "shape_recall": shapes_hit / shapes_total, "all_right": float(np.mean(all_right)),
            "images": len(scenes), "one_object": len(colours_ok[1]), "two_objects": len(colours_ok[2])}

