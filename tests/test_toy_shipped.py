"""The shipped attribute classifier meets the toy world's bar on held-out renders."""

from compinv.toy.classifier import evaluate, load_classifier


def test_shipped_classifier_is_accurate_on_heldout_renders():
    metrics = evaluate(load_classifier(), n=1000, split="heldout")
    assert metrics["exact_set"] >= 0.98
    assert metrics["background"] >= 0.99
