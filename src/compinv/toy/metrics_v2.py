"""The v2 toy model's own quality, judged by the v2 classifier (`compinv.toy.classifier_v2`).

Same questions as v1's `score_generations` (right background, every captioned colour present,
everything right), asked of the v2 world, plus the two that v2 exists for:
- patterns: share of the captioned (pattern, shape) pairs found, i.e. the model draws what a
  caption says about an object's fill, not only its colours;
- identity: a toy concept described in words ("a magenta and white striped diamond on grass")
  is recognised (`Predictions.has_identity`), so the identity a concept's token must learn is
  something the base model can draw from its parts.
"""

from __future__ import annotations

import numpy as np

from compinv.toy import world_v2
from compinv.toy.classifier_v2 import PatternClassifier
from compinv.toy.world import BACKGROUND_PHRASES


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
