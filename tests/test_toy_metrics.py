"""Toy metrics: a faithful render scores as right, a wrong one as wrong; prompts follow the rules."""

from __future__ import annotations

import numpy as np
import pytest

from compinv.toy.classifier import load_classifier
from compinv.toy.concepts import CONCEPTS, render_concept
from compinv.toy.metrics import (
    CompositionPrompt,
    composition_prompts,
    concept_colours,
    mean_ci,
    score_compositions,
    score_generations,
)
from compinv.toy.world import Scene, SceneObject, render, sample_scenes


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_composition_prompts_are_distinct_deterministic_and_off_context():
    for concept in CONCEPTS:
        prompts = composition_prompts(concept, 20)
        assert prompts == composition_prompts(concept, 20)
        assert len(set(prompts)) == 20
        assert all(p.background != concept.background and p.shape != concept.class_word for p in prompts)
    assert composition_prompts(CONCEPTS[0], 3)[0].text("<x>").startswith("a photo of a <x> and a")


def _scene(colour, shape, background):
    return Scene(background, (SceneObject(colour, shape, 22.0, 16.0, 7.0, 0.0),), texture=5, template=0)


def test_a_render_of_the_prompt_scores_full_text_alignment_and_inclusion(classifier):
    concept = CONCEPTS[0]
    prompt = CompositionPrompt(concept.name, "blue", "star", "snow")
    right = render([_scene("blue", "star", "snow")])
    wrong = render([_scene("red", "circle", "grass")])
    scores = score_compositions(classifier, np.concatenate([right, wrong]), [prompt, prompt],
                                render_concept(concept), concept)
    assert scores["text_alignment"].tolist() == [1.0, 0.0]
    assert scores["concept_inclusion"].tolist() == [1.0, 0.0]
    assert scores["concept_colours"].tolist() == [0.0, 0.0]


def test_image_alignment_and_concept_colours_prefer_the_concept(classifier):
    concept = CONCEPTS[1]
    references = render_concept(concept)
    own = render_concept(concept, seed=7)
    other = render([_scene("red", "square", "night")] * len(own))
    prompts = [CompositionPrompt(concept.name, "red", "square", "night")] * len(own)
    mine = score_compositions(classifier, own, prompts, references, concept)
    theirs = score_compositions(classifier, other, prompts, references, concept)
    assert mine["image_alignment"].mean() > theirs["image_alignment"].mean() + 0.1
    assert concept_colours(own, concept).tolist() == [1.0] * len(own)
    assert concept_colours(other.astype(np.float32) / 255, concept).tolist() == [0.0] * len(own)


def test_score_generations_is_perfect_on_true_renders(classifier):
    scenes = sample_scenes(200, "heldout", 11)
    scores = score_generations(classifier, render(scenes), scenes)
    assert scores["background"] == 1.0
    assert scores["colours_one"] >= 0.98 and scores["colours_two"] >= 0.98
    assert scores["one_object"] + scores["two_objects"] == 200


def test_mean_ci_half_width_shrinks_with_samples():
    mean, half = mean_ci(np.array([0.0, 1.0] * 10))
    assert mean == 0.5 and half == pytest.approx(1.96 * np.std([0, 1] * 10, ddof=1) / np.sqrt(20))
    assert mean_ci(np.array([0.0, 1.0] * 100))[1] < half
