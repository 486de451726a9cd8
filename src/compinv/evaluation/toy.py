"""The toy world's metrics behind the same `Metric` interface, so `compinv evaluate`, the
protocol runner and the report work offline on the shipped toy model.

A toy prompt names the other object and the background in the toy vocabulary ("a photo of a
<striped-diamond> and a blue square on snow"); the attribute classifier answers text alignment,
inclusion and image alignment exactly (`compinv.toy.metrics.score_compositions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from compinv.errors import CompinvError
from compinv.evaluation.samples import Sample

TOY_COLUMNS = {"text_alignment": "toy_text", "concept_inclusion": "toy_inclusion",
               "image_alignment": "toy_image", "concept_colours": "toy_colours"}


class ToyMetrics:
    """`compinv.toy.metrics` as a Metric: columns toy_text, toy_inclusion, toy_image, toy_colours."""

    columns = tuple(TOY_COLUMNS.values())

    def __init__(self, classifier: str | None = None):
        from compinv.toy.classifier import load_classifier

        self.classifier = load_classifier(classifier)
        self.name = classifier or "the shipped toy classifier"

    def check(self, samples: Sequence[Sample]) -> None:
        """Every sample must be a toy composition prompt of a toy concept, before any work."""
        for sample in samples:
            composition_prompt(sample)

    def score(self, samples: Sequence[Sample], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        from compinv.toy.metrics import score_compositions

        out = {c: np.full(len(samples), np.nan) for c in self.columns}
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault((toy_concept(sample).name, sample.references), []).append(i)
        for (_, references), rows in groups.items():
            if not references:
                raise CompinvError(f"`references`: the toy metrics need the concept's reference "
                                   f"images for {samples[rows[0]].image}")
            scores = score_compositions(
                self.classifier, np.stack([np.asarray(images[i].convert("RGB")) for i in rows]),
                [composition_prompt(samples[i]) for i in rows],
                np.stack([np.asarray(_open(p)) for p in references]), toy_concept(samples[rows[0]]))
            for key, column in TOY_COLUMNS.items():
                out[column][rows] = scores[key]
        return out

    def describe(self) -> dict[str, str]:
        return {"toy_text": "share of the other object's colour, shape and the background found "
                            f"({self.name})",
                "toy_inclusion": "the other object's colour-shape pair found",
                "toy_image": "mean cosine of the classifier's features to the references",
                "toy_colours": "share of the concept's distinctive colours visible"}


def _open(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB").resize((32, 32), Image.BILINEAR)


def toy_concept(sample: Sample):
    """The toy concept a sample's token names (`<striped-diamond>` -> striped-diamond)."""
    from compinv.toy.concepts import CONCEPTS

    for concept in CONCEPTS:
        if any(concept.name in token for token in sample.concepts):
            return concept
    raise CompinvError(f"the toy metrics score toy concepts; tokens {list(sample.concepts)} of "
                       f"{sample.image} name none of {[c.name for c in CONCEPTS]}")


def composition_prompt(sample: Sample):
    """The other object and the background a toy prompt asks for."""
    from compinv.toy.metrics import CompositionPrompt
    from compinv.toy.world import ALL_PAIRS, BACKGROUND_PHRASES, object_phrase

    text = " ".join(sample.prompt.lower().split())
    pairs = [(c, s) for c, s in ALL_PAIRS if object_phrase(c, s) in text]
    backgrounds = [b for b, phrase in BACKGROUND_PHRASES.items() if text.endswith(phrase)]
    if len(pairs) != 1 or len(backgrounds) != 1:
        raise CompinvError(f"prompt {sample.prompt!r} is not a toy composition prompt ('a photo "
                           "of a <concept> and a blue square on snow'); the toy metrics cannot "
                           "score it")
    return CompositionPrompt(toy_concept(sample).name, *pairs[0], backgrounds[0])
