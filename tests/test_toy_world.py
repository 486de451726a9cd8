"""Toy world: determinism, held-out splits, captions that say what is drawn, toy concepts."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from compinv.errors import CompinvError
from compinv.toy import (
    BACKGROUNDS, COLOURS, CONCEPTS, HELDOUT_PAIRS, HELDOUT_TRIPLES, SHAPES, add_toy_commands,
    caption_attributes, generate, heldout_combinations, is_heldout, render, sample_scenes,
    write_concepts,
)
from compinv.toy.world import SHAPE_MASKS, Scene, SceneObject, coverage


def test_same_seed_same_pixels_and_captions():
    a, b = generate(64, "train", seed=3), generate(64, "train", seed=3)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (64, 32, 32, 3) and a.images.dtype == np.uint8
    assert generate(64, "train", seed=4).captions != a.captions


def test_objects_stay_inside_the_image_and_apart():
    for scene in sample_scenes(500, "all", seed=5):
        for o in scene.objects:
            assert 1.1 * o.radius <= min(o.x, o.y, 32 - o.x, 32 - o.y)
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert abs(a.x - b.x) >= 1.1 * (a.radius + b.radius)


def test_a_scene_renders_the_same_alone_or_in_a_batch():
    scenes = sample_scenes(10, "all", seed=1)
    assert np.array_equal(render(scenes)[7], render([scenes[7]])[0])


def test_training_split_never_shows_a_heldout_combination():
    scenes = sample_scenes(3000, "train", seed=0)
    assert not any(is_heldout(s) for s in scenes)
    seen = {(c, s, sc.background) for sc in scenes for c, s in sc.pairs}
    assert not seen & set(heldout_combinations())
    assert {c for c, _, _ in seen} == set(COLOURS) and {s for _, s, _ in seen} == set(SHAPES)


def test_heldout_split_shows_every_heldout_combination():
    scenes = sample_scenes(2000, "heldout", seed=0)
    assert all(is_heldout(s) for s in scenes)
    seen = {(c, s, sc.background) for sc in scenes for c, s in sc.pairs}
    combos = set(heldout_combinations())
    assert combos <= seen and len(combos) == len(HELDOUT_PAIRS) * len(BACKGROUNDS) + len(HELDOUT_TRIPLES)


def test_unknown_split_is_a_clear_error():
    with pytest.raises(CompinvError, match="unknown split"):
        sample_scenes(1, "test")


def test_captions_name_exactly_the_objects_and_background():
    batch = generate(300, "all", seed=2)
    for text, scene in zip(batch.captions, batch.scenes):
        pairs, background = caption_attributes(text)
        assert pairs == [(o.colour, o.shape) for o in scene.objects] and background == scene.background
        assert 1 <= len(scene.objects) <= 2
    assert any(" and " in t for t in batch.captions) and any("an orange" in t for t in batch.captions)


def test_caption_attributes_ignore_concept_tokens():
    assert caption_attributes("a <dotted-ring> and a red star at night") == ([("red", "star")], "night")


def test_objects_are_drawn_in_their_colour_where_the_scene_says():
    """Each object's centre pixel has its colour (rings: a pixel on the band), objects never touch."""
    scene = Scene("night", (SceneObject("red", "ring", 8.0, 16.0, 6.0, 0.0),
                            SceneObject("yellow", "star", 24.0, 16.0, 6.0, 0.0)), texture=0, template=0)
    image = render([scene])[0].astype(int)
    assert np.abs(image[16, 13] - COLOURS["red"]).max() <= 2  # on the ring's band (radius 0.8)
    assert np.abs(image[16, 24] - COLOURS["yellow"]).max() <= 2
    assert image[16, 8].max() < 120  # the ring's hole shows the night sky


def test_shapes_are_distinct_centred_and_within_reach():
    grid = np.linspace(-1.2, 1.2, 121, dtype=np.float32)
    u, v = np.meshgrid(grid, grid)
    masks = {s: SHAPE_MASKS[s](u, v) for s in SHAPES}
    assert all(m[60, 60] == (s != "ring") for s, m in masks.items())
    assert len({m.tobytes() for m in masks.values()}) == len(SHAPES)
    assert masks["star"][10, 60] and not masks["star"][15, 40]  # a point up, a notch beside it


@pytest.mark.parametrize("angle", [-0.25, 0.25])
def test_tilted_shapes_stay_within_the_reach_placement_keeps_clear(angle):
    geometry = np.array([[16, 16, 10, angle]] * len(SHAPES), np.float32)
    alpha = coverage(list(SHAPES), geometry, SHAPE_MASKS)
    edges = [alpha[:, :5], alpha[:, -5:], alpha[:, :, :5], alpha[:, :, -5:]]  # beyond 16 ± 11 px
    assert max(e.max() for e in edges) == 0 and alpha.max() == 1


def test_concepts_are_deterministic_with_one_background_each(tmp_path):
    write_concepts(tmp_path / "a")
    write_concepts(tmp_path / "b")
    index = json.loads((tmp_path / "a" / "concepts.json").read_text())["concepts"]
    assert set(index) == {c.name for c in CONCEPTS}
    for concept in CONCEPTS:
        files = sorted((tmp_path / "a" / concept.name).glob("*.png"))
        assert [f.name for f in files] == [f"{i:02d}.png" for i in range(5)]
        first = [np.asarray(Image.open(f)) for f in files]
        again = [np.asarray(Image.open(tmp_path / "b" / concept.name / f.name)) for f in files]
        assert all(np.array_equal(x, y) for x, y in zip(first, again))
        assert index[concept.name]["background"] == concept.background
        assert len({x.tobytes() for x in first}) == 5  # five different views
        corners = np.stack([x[[0, 0, -1, -1], [0, -1, 0, -1]] for x in first]).reshape(-1, 3).mean(0)
        assert np.abs(corners - _background_mean(concept.background)).max() < 40


def _background_mean(background: str) -> np.ndarray:
    scenes = [s for s in sample_scenes(200, "all", seed=9) if s.background == background]
    return render(scenes).reshape(-1, 3).mean(0)


def test_write_concepts_refuses_to_mix_versions(tmp_path):
    write_concepts(tmp_path)
    with pytest.raises(CompinvError, match="already holds"):
        write_concepts(tmp_path)


def test_write_concepts_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="compinv")
    add_toy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["toy", "write-concepts", str(tmp_path / "concepts")])
    args.func(args)
    assert (tmp_path / "concepts" / "dotted-ring" / "04.png").is_file()
    assert "concepts.json" in capsys.readouterr().out
