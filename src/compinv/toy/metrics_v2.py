"""The v2 toy model's own quality, judged by the v2 classifier (`compinv.toy.classifier_v2`).

Same questions as v1's `score_generations` (right background, every captioned colour present,
everything right), asked of the v2 world, plus the two that v2 exists for:
- patterns: share of the captioned (pattern, shape) pairs found, i.e. the model draws what a
  caption says about an object's fill, not only its colours;
- identity: a toy concept described in words ("a magenta and white striped diamond on grass")
  is recognised (`Predictions.has_identity`), so the identity a concept's token must learn is
  something the base model can draw from its parts.

Compositions (`composition_prompts_v2`, `score_compositions_v2`) ask v1's questions of "a photo
of a <concept> and a blue square on snow" (text alignment, concept inclusion) plus whether the
concept's identity is drawn, the judge of both halves of the vanilla-TI failure: the concept is
learned, and the other object vanishes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compinv.toy import world_v2
from compinv.toy.classifier_v2 import PatternClassifier
from compinv.toy.world import BACKGROUND_PHRASES, BACKGROUNDS


def heldout_scenes(n: int, seed: int = 0) -> list[world_v2.SceneV2]:
    """`n` held-out scenes: each shows a colour-shape pair training never showed."""
    return world_v2.sample_scenes(n, "heldout", (seed, 7))


def score_generations_v2(classifier: PatternClassifier, images: np.ndarray,
                         scenes: list[world_v2.SceneV2]) -> dict[str, float]:
    """background, colours_one / colours_two (every captioned colour found on its shape, in
    one- and two-object captions), patterns (captioned pattern-shape pairs found), all_right
    (every colour-shape and pattern-shape pair found and the background right)."""
    predictions = classifier.predict(images)
    found, patterns, backgrounds = predictions.pairs(), predictions.pattern_pairs(), predictions.backgrounds()
    colours_ok: dict[int, list[bool]] = {1: [], 2: []}
    pattern_hits = pattern_total = 0
    all_right = []
    for pairs, fills, background, scene in zip(found, patterns, backgrounds, scenes):
        colours_ok[len(scene.objects)].append(scene.pairs <= pairs)
        pattern_hits += len(scene.pattern_pairs & fills)
        pattern_total += len(scene.pattern_pairs)
        all_right.append(scene.pairs <= pairs and scene.pattern_pairs <= fills and background == scene.background)
    return {"background": float(np.mean([b == s.background for b, s in zip(backgrounds, scenes)])),
            "colours_one": _share(colours_ok[1]), "colours_two": _share(colours_ok[2]),
            "patterns": pattern_hits / pattern_total, "all_right": float(np.mean(all_right)),
            "images": len(scenes), "one_object": len(colours_ok[1]), "two_objects": len(colours_ok[2])}


def _share(flags: list[bool]) -> float:
    """Mean of `flags`; NaN (no such caption among the scenes) without numpy's warning."""
    return float(np.mean(flags)) if flags else float("nan")


def identity_prompt(concept: world_v2.ToyConceptV2) -> str:
    """The concept in the base model's own words, in its own context."""
    return f"{concept.description} {BACKGROUND_PHRASES[concept.background]}"


def identity_recognised(classifier: PatternClassifier, images: np.ndarray,
                        concept: world_v2.ToyConceptV2) -> np.ndarray:
    """bool [N]: the concept's two colours and its pattern are found on its shape."""
    return classifier.predict(images).has_identity(concept.identity)


def classifier_accuracy(classifier: PatternClassifier, n: int = 2000, seed: int = 99) -> dict[str, float]:
    """Exact-set accuracy of each head on fresh renders of every combination (a seed training
    never uses), and identity recognition on each concept's reference renders."""
    scenes = world_v2.sample_scenes(n, "all", (seed, 11))
    predictions = classifier.predict(world_v2.render(scenes))
    scores = {"colour_shape": float(np.mean([p == s.pairs for p, s in zip(predictions.pairs(), scenes)])),
              "pattern_shape": float(np.mean([p == s.pattern_pairs
                                              for p, s in zip(predictions.pattern_pairs(), scenes)])),
              "background": float(np.mean([b == s.background for b, s in zip(predictions.backgrounds(), scenes)]))}
    for concept in world_v2.CONCEPTS:
        scores[f"identity/{concept.name}"] = float(identity_recognised(
            classifier, world_v2.render_concept(concept, 20, seed), concept).mean())
    return scores


# ---- compositions: the paper's protocol on the v2 world ------------------------------------------
COMPOSITION_METRICS = ("text_alignment", "concept_inclusion", "concept_identity")


@dataclass(frozen=True)
class CompositionPromptV2:
    """"a photo of a <concept> and a blue square on snow": the concept plus one plain object
    the base model was trained on."""

    concept: str
    colour: str
    shape: str
    background: str

    def text(self, token: str) -> str:
        return f"a photo of a {token} and {self.other_phrase_with_article} {BACKGROUND_PHRASES[self.background]}"

    @property
    def other_phrase_with_article(self) -> str:
        return world_v2.object_phrase(self.colour, self.colour, "solid", self.shape)

    @property
    def other_phrase(self) -> str:
        """The other object's words, for layouts and attention maps."""
        return f"{self.colour} {self.shape}"


def composition_prompts_v2(concept: world_v2.ToyConceptV2, n: int = 20, seed: int = 0) -> list[CompositionPromptV2]:
    """`n` distinct prompts. The other object is a solid training object (the base model draws
    it) whose shape is not the concept's (a concept drawn as its shape is never taken for it),
    visible on a background other than the concept's own (leaking the references' context
    costs text alignment)."""
    rng = np.random.default_rng([seed, world_v2.CONCEPTS.index(concept), 3])
    options = [(c, s, b) for b in BACKGROUNDS if b != concept.background for c in world_v2.visible_colours(b)
               for s in world_v2.SHAPES if s != concept.class_word and world_v2.is_training_object((c, c, "solid", s))]
    picks = rng.choice(len(options), size=min(n, len(options)), replace=False)
    return [CompositionPromptV2(concept.name, *options[i]) for i in picks]


def score_compositions_v2(classifier: PatternClassifier, images: np.ndarray, prompts: list[CompositionPromptV2],
                          concept: world_v2.ToyConceptV2) -> dict[str, np.ndarray]:
    """Per-image [N] scores; images[i] was generated from prompts[i]. text_alignment: share of
    the other object's colour, its shape and the background found; concept_inclusion: the other
    object (its colour on its shape) found, the paper's "is the other thing there at all";
    concept_identity: the concept recognised (both colours and its pattern on its shape)."""
    predictions = classifier.predict(images)
    text, inclusion = [], []
    for pairs, background, prompt in zip(predictions.pairs(), predictions.backgrounds(), prompts):
        colours, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
        text.append(np.mean([prompt.colour in colours, prompt.shape in shapes, background == prompt.background]))
        inclusion.append(float((prompt.colour, prompt.shape) in pairs))
    return {"text_alignment": np.array(text), "concept_inclusion": np.array(inclusion),
            "concept_identity": predictions.has_identity(concept.identity).astype(float)}
