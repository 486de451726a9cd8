"""Toy attribute classifier: a few training steps, predict's shapes, metrics, resume, files."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from compinv.errors import CompinvError
from compinv.toy import add_toy_commands, classifier, generate
from compinv.toy.classifier import (
    CONFIG_FILE, WEIGHTS_FILE, AttributeClassifier, Predictions, _train_step, load_classifier,
    score, train_classifier,
)
from compinv.toy.world import BACKGROUNDS, COLOURS, SHAPES, Scene, SceneObject

FAST = dict(batch_size=16, eval_renders=0, progress=False, checkpoint_every=0)


def test_loss_decreases_over_a_few_steps():
    torch.manual_seed(0)
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    settings = {"batch_size": 32, "seed": 0, "lr": 3e-3}
    losses = [_train_step(model, optimizer, step, 12, settings) for step in range(12)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_saved_weights_reload_to_the_same_predictions(tmp_path):
    """A trained classifier survives save -> load_classifier bit for bit (the shipped one is
    read the same way)."""
    from compinv.cli import main
    from compinv.toy.classifier import load_classifier

    assert main(["toy", "train-classifier", "--out", str(tmp_path / "clf"), "--steps", "2",
                 "--batch-size", "8", "--eval-renders", "0"]) == 0
    images = generate(4, "all", seed=3).images
    first, again = load_classifier(tmp_path / "clf"), load_classifier(tmp_path / "clf")
    torch.testing.assert_close(first.predict(images).pair_probs, again.predict(images).pair_probs)
    assert not torch.allclose(torch.as_tensor(first.predict(images).pair_probs),
                              torch.as_tensor(AttributeClassifier().eval().predict(images).pair_probs))


def test_predict_accepts_arrays_floats_and_pil_images():
    model = AttributeClassifier().eval()
    images = generate(5, "all", seed=0).images
    preds = model.predict(images)
    assert preds.pair_probs.shape == (5, len(COLOURS), len(SHAPES))
    assert preds.background_probs.shape == (5, len(BACKGROUNDS))
    assert np.allclose(preds.background_probs.sum(1), 1, atol=1e-5)
    assert len(preds.objects()) == 5 and all(b in BACKGROUNDS for b in preds.backgrounds())
    as_float = model.predict(images.astype(np.float32) / 255)
    assert np.allclose(as_float.pair_probs, preds.pair_probs, atol=1e-5)
    big = [Image.fromarray(im).resize((64, 64)) for im in images]
    assert model.predict(big).pair_probs.shape == (5, len(COLOURS), len(SHAPES))


def test_predict_rejects_wrong_shapes():
    with pytest.raises(CompinvError, match=r"\[N, H, W, 3\]"):
        AttributeClassifier().predict(np.zeros((2, 32, 32), np.uint8))


def _scene(background: str, *pairs: tuple[str, str]) -> Scene:
    objects = tuple(SceneObject(c, s, 8.0 + 16 * i, 16.0, 5.0, 0.0) for i, (c, s) in enumerate(pairs))
    return Scene(background, objects, texture=0, template=0)


def test_score_on_a_hand_made_case():
    scenes = [_scene("grass", ("red", "circle")),
              _scene("night", ("blue", "star"), ("green", "ring")),
              _scene("snow", ("yellow", "cross"))]
    probs = np.zeros((3, len(COLOURS), len(SHAPES)), np.float32)
    col, shp = list(COLOURS).index, SHAPES.index
    probs[0, col("red"), shp("circle")] = 0.9                # exact
    probs[1, col("blue"), shp("star")] = 0.8                 # misses the green ring
    probs[2, col("yellow"), shp("cross")] = 0.7              # right object, plus an extra one
    probs[2, col("red"), shp("cross")] = 0.6
    backgrounds = np.eye(len(BACKGROUNDS), dtype=np.float32)[[0, 3, 0]]  # third one wrong
    metrics = score(Predictions(probs, backgrounds), scenes)
    assert metrics["exact_set"] == pytest.approx(1 / 3)
    assert metrics["background"] == pytest.approx(2 / 3)
    assert metrics["colour_recall"] == pytest.approx(3 / 4)  # red, blue, yellow of 4 true colours
    assert metrics["shape_recall"] == pytest.approx(3 / 4)   # circle, star, cross; ring missed


def test_train_save_load_predict(tmp_path):
    run = train_classifier(tmp_path / "clf", steps=3, **{**FAST, "eval_renders": 64})
    config = json.loads((tmp_path / "clf" / CONFIG_FILE).read_text())
    assert run.steps == config["trained_steps"] == 3
    assert set(run.metrics) == {"exact_set", "background", "colour_recall", "shape_recall"}
    model = load_classifier(tmp_path / "clf")
    assert not model.training
    weights = load_file(str(tmp_path / "clf" / WEIGHTS_FILE))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    settings = {**FAST, "checkpoint_every": 2}
    train_classifier(tmp_path / "once", steps=4, **settings)
    real_step = classifier._train_step

    def killed_at_step_2(model, optimizer, step, *rest):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(model, optimizer, step, *rest)

    monkeypatch.setattr(classifier, "_train_step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(tmp_path / "twice", steps=4, **settings)
    monkeypatch.setattr(classifier, "_train_step", real_step)
    assert json.loads((tmp_path / "twice" / CONFIG_FILE).read_text())["trained_steps"] == 2
    train_classifier(tmp_path / "twice", steps=4, resume=True, **settings)
    once, twice = (load_file(str(tmp_path / d / WEIGHTS_FILE)) for d in ("once", "twice"))
    assert all(torch.allclose(once[k].float(), twice[k].float(), atol=1e-6) for k in once)


def test_fresh_run_refuses_an_existing_classifier_and_resume_checks_settings(tmp_path):
    train_classifier(tmp_path, steps=1, **FAST)
    with pytest.raises(CompinvError, match="--resume"):
        train_classifier(tmp_path, steps=1, **FAST)
    with pytest.raises(CompinvError, match="--seed 0"):
        train_classifier(tmp_path, steps=2, resume=True, **{**FAST, "seed": 1})


def test_load_rejects_a_folder_without_a_classifier(tmp_path):
    with pytest.raises(CompinvError, match="train-classifier"):
        load_classifier(tmp_path)


def test_train_classifier_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="compinv")
    add_toy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["toy", "train-classifier", "--out", str(tmp_path / "c"), "--steps", "2",
                              "--batch-size", "8", "--eval-renders", "16", "--seed", "3"])
    args.func(args)
    assert "after 2 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / CONFIG_FILE).read_text())["seed"] == 3
