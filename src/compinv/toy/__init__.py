"""The toy world: a seeded scene generator with captions and held-out combinations, novel toy
concepts, and an attribute classifier (`compinv.toy.classifier`) that scores images.
"""

from compinv.toy.cli import add_toy_commands
from compinv.toy.concepts import CONCEPTS, ToyConcept, render_concept, write_concepts
from compinv.toy.world import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    HELDOUT_TRIPLES,
    IMAGE_SIZE,
    SHAPES,
    SPLITS,
    Scene,
    SceneObject,
    ToyBatch,
    caption,
    caption_attributes,
    generate,
    heldout_combinations,
    is_heldout,
    render,
    sample_scenes,
    training_pairs,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "CONCEPTS", "HELDOUT_PAIRS", "HELDOUT_TRIPLES", "IMAGE_SIZE", "SHAPES",
    "SPLITS", "Scene", "SceneObject", "ToyBatch", "ToyConcept", "add_toy_commands", "caption",
    "caption_attributes", "generate", "heldout_combinations", "is_heldout", "render",
    "render_concept", "sample_scenes", "training_pairs", "write_concepts",
]
