"""The v2 classifier: targets of rendered scenes, identity checks, learning, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import compinv.toy.classifier_v2 as clf
from compinv.toy import world_v2


def _scene(*objects: world_v2.PatternObject, background: str = "grass") -> world_v2.SceneV2:
    return world_v2.SceneV2(background, objects, 0, 0)


def _obj(colour, colour2, pattern, shape, x=24.0) -> world_v2.PatternObject:
    return world_v2.PatternObject(colour, colour2, pattern, shape, x, 24.0, 9.0, 0.0)


def test_targets_name_both_colours_and_the_pattern_of_each_shape():
    scene = _scene(_obj("magenta", "white", "striped", "diamond", 12.0), _obj("red", "red", "solid", "star", 36.0))
    pairs, patterns, background = clf.targets([scene])
    C, S, P = list(world_v2.COLOURS), world_v2.SHAPES, world_v2.PATTERNS
    on = {(C[i // len(S)], S[i % len(S)]) for i in torch.nonzero(pairs[0]).flatten().tolist()}
    assert on == {("magenta", "diamond"), ("white", "diamond"), ("red", "star")}
    on = {(P[i // len(S)], S[i % len(S)]) for i in torch.nonzero(patterns[0]).flatten().tolist()}
    assert on == {("striped", "diamond"), ("solid", "star")}
    assert background.tolist() == [0]


def test_cell_targets_mark_the_cells_each_object_covers():
    scene = _scene(_obj("magenta", "white", "striped", "diamond", 12.0), _obj("red", "red", "solid", "star", 36.0))
    shape, colours, pattern = clf.cell_targets([scene], 12)
    S, P, C = world_v2.SHAPES, world_v2.PATTERNS, list(world_v2.COLOURS)
    assert shape[0, 6, 3] == S.index("diamond") and shape[0, 6, 9] == S.index("star")  # row y=24, x=12 / 36
    assert pattern[0, 6, 3] == P.index("striped") and pattern[0, 6, 9] == P.index("solid")
    assert shape[0, 0, 0] == len(S) and pattern[0, 0, 0] == -100 and colours[0, :, 0, 0].sum() == 0
    assert set(torch.nonzero(colours[0, :, 6, 3]).flatten().tolist()) == {C.index("magenta"), C.index("white")}
    assert set(torch.nonzero(colours[0, :, 6, 9]).flatten().tolist()) == {C.index("red")}
    covered = int((shape[0] == S.index("diamond")).sum())  # radius 9: cells within 6.3 px of the centre
    assert 4 <= covered <= 12 and int((shape[0] < len(S)).sum()) == 2 * covered


def test_an_image_shows_a_pair_only_where_one_cell_is_sure_of_both():
    n_shape = len(world_v2.SHAPES) + 1
    shape = torch.full((1, n_shape, 2, 1), -20.0)
    shape[0, 0, 0, 0] = shape[0, 1, 1, 0] = 20.0  # cell 0: a circle, cell 1: a square
    colour = torch.full((1, len(world_v2.COLOURS), 2, 1), -20.0)
    colour[0, 0, 0, 0] = colour[0, 1, 1, 0] = 20.0  # red in cell 0, orange in cell 1
    pattern = torch.zeros(1, len(world_v2.PATTERNS), 2, 1)
    pairs, _, _ = clf.image_probabilities(shape, colour, pattern, torch.zeros(1, 4))
    assert pairs[0, 0, 0] > 0.99 and pairs[0, 1, 1] > 0.99  # red circle, orange square
    assert pairs[0, 0, 1] < 0.01 and pairs[0, 1, 0] < 0.01  # not an orange circle nor a red square


def test_has_identity_needs_both_colours_and_the_pattern_on_the_shape():
    n, C, S, P = 4, list(world_v2.COLOURS), world_v2.SHAPES, world_v2.PATTERNS
    pair, pattern = np.zeros((n, len(C), len(S))), np.zeros((n, len(P), len(S)))
    d = S.index("diamond")
    pair[[0, 1, 2], C.index("magenta"), d] = 1
    pair[[0, 2, 3], C.index("white"), d] = 1
    pattern[[0, 1, 3], P.index("striped"), d] = 1
    pattern[2, P.index("dotted"), d] = 1
    found = clf.Predictions(pair, pattern, np.ones((n, 4)) / 4).has_identity(("magenta", "white", "striped", "diamond"))
    assert found.tolist() == [True, False, False, False]


def test_outputs_on_rendered_scenes_and_training_lowers_the_loss():
    torch.manual_seed(0)
    model = clf.PatternClassifier((8, 16, 16))
    scenes = world_v2.sample_scenes(16, "all", 5)
    x = clf._model_input(world_v2.render(scenes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = clf.loss_of(model, x, scenes)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    preds = model.predict(world_v2.render(scenes))
    assert preds.pair_probs.shape == (16, 11, 8) and preds.pattern_probs.shape == (16, 5, 8)
    truth = clf.targets(scenes)[1].reshape(16, 5, 8).numpy() > 0
    assert ((preds.pattern_probs > 0.5) == truth).mean() > 0.95  # it fits the batch it saw


class _Stop(Exception):
    pass


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(clf.PatternClassifier.__init__, "__defaults__", ((8, 16, 16),))
    clf.train_pattern_classifier(tmp_path / "whole", steps=4, batch_size=4, checkpoint_every=1, progress=False)

    class Bar:  # stops the run after its second step, like a killed job
        def __init__(self, *args, **kwargs):
            self.n = 0

        def update(self, n):
            self.n += n
            if self.n >= 2:
                raise _Stop

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    with monkeypatch.context() as patch:
        patch.setattr(clf, "tqdm", Bar)
        with pytest.raises(_Stop):
            clf.train_pattern_classifier(tmp_path / "cut", steps=4, batch_size=4, checkpoint_every=1, progress=False)
    assert clf.train_pattern_classifier(tmp_path / "cut", steps=4, batch_size=4, checkpoint_every=1,
                                        resume=True, progress=False) == 4
    whole, cut = (load_file(str(tmp_path / f / clf.WEIGHTS_FILE)) for f in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    with pytest.raises(Exception, match="batch_size=4"):
        clf.train_pattern_classifier(tmp_path / "cut", steps=4, batch_size=8, resume=True, progress=False)
    assert clf.load_pattern_classifier(tmp_path / "cut").predict(world_v2.render(world_v2.sample_scenes(2))).pair_probs.shape == (2, 11, 8)


def test_shipped_classifier_judges_fresh_renders_and_every_concept():
    from compinv.toy.metrics_v2 import classifier_accuracy

    scores = classifier_accuracy(clf.load_pattern_classifier(), n=300, seed=5)  # seeds training never used
    assert scores["colour_shape"] >= 0.97 and scores["pattern_shape"] >= 0.97 and scores["background"] >= 0.99
    assert min(v for k, v in scores.items() if k.startswith("identity/")) >= 0.9
    assert (clf.SHIPPED_DIR / clf.WEIGHTS_FILE).stat().st_size < 3_000_000
