"""Diagnostics on tiny models where the answer is known."""

from __future__ import annotations

import json

import pytest
import torch

from compinv.diagnostics import attention_shares, embedding_report, mean_share, projection_picture
from compinv.models import build_tiny_pipeline


@pytest.fixture(scope="module")
def uniform_pipe():
    """A tiny pipeline whose cross-attention keys are all zero: every query attends uniformly
    to the 77 positions, so each position's share is exactly 1/77."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.zero_()
    return pipe


def test_uniform_attention_gives_every_position_an_equal_share(uniform_pipe):
    shares = attention_shares(uniform_pipe, "a cat and a dog", num_inference_steps=2, seeds=(0, 1))
    kinds = [s.kind for s in shares]
    assert kinds == ["bos", "word", "word", "word", "word", "word", "eos", "padding"]
    assert [s.token for s in shares[1:6]] == ["a", "cat", "and", "a", "dog"]
    for s in shares[:-1]:
        assert s.share == pytest.approx(1 / 77, rel=1e-4)
    assert mean_share(shares, "padding") == pytest.approx(70 / 77, rel=1e-4)
    assert sum(s.share for s in shares) == pytest.approx(1.0, abs=1e-6)


def test_blocking_padding_renormalises_over_the_words(uniform_pipe):
    shares = attention_shares(uniform_pipe, "a cat and a dog", num_inference_steps=2, seeds=(0,),
                              block_padding=True)
    assert mean_share(shares, "padding") == pytest.approx(0.0, abs=1e-6)
    for s in shares[:-1]:
        assert s.share == pytest.approx(1 / 7, rel=1e-4)


def test_multi_vector_tokens_are_counted_position_by_position():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(torch.randn(2, pipe.text_encoder.config.hidden_size), token="<t>")
    shares = attention_shares(pipe, "a <t> cat", num_inference_steps=1)
    assert [s.token for s in shares if s.kind == "word"] == ["a", "<t>", "<t>_1", "cat"]


def test_embedding_report_places_known_vectors():
    pipe = build_tiny_pipeline()
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    cat = pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    far = table[cat] / table[cat].norm() * table.norm(dim=1).max() * 100
    near, out = embedding_report(pipe.tokenizer, pipe.text_encoder, {"<x>": torch.stack([table[cat], far])})
    assert near.name == "<x>" and out.name == "<x>_1"
    assert near.nearest_distance == pytest.approx(0.0, abs=1e-3)
    assert near.nearest_distance_percentile < 1.0 and near.nearest_words[0] == "cat"
    assert near.ood_score < 99.0 and not near.as_dict()["out_of_distribution"]
    assert out.norm_percentile == 100.0 and out.nearest_distance_percentile == 100.0
    assert out.as_dict()["out_of_distribution"] and out.nearest_words[0] == "cat"


def test_projection_marks_far_vectors_on_the_edge():
    pipe = build_tiny_pipeline()
    far = torch.full((1, 32), 1e3)
    picture = projection_picture(pipe.tokenizer, pipe.text_encoder, {"<x>": far}, ["cat"], size=200)
    pixels = torch.tensor(list(picture.getdata())).reshape(200, 200, 3)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60)
    assert red.any() and blue.any()
    ys, xs = red.nonzero(as_tuple=True)
    assert min(xs.min(), ys.min(), 199 - xs.max(), 199 - ys.max()) <= 16, "pinned to the edge"


def test_inspect_command_reports_a_run(tiny_model, concept_images, tmp_path, capsys):
    from compinv.cli import main

    run = tmp_path / "run"
    assert main(["train", "textual-inversion", "--model", str(tiny_model), "--images",
                 str(concept_images), "--token", "<cute-cat>", "--class-word", "cat", "--steps", "1",
                 "--batch-size", "1", "--grad-accum", "1", "--resolution", "32", "--out", str(run),
                 "--num-vectors", "2"]) == 0
    assert main(["inspect", str(run), "--prompt", "a photo of {} and a backpack", "--steps", "2",
                 "--seeds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "<cute-cat>_1" in printed and "backpack" in printed
    record = json.loads((run / "inspect" / "inspection.json").read_text())
    assert [v["name"] for v in record["vectors"]] == ["<cute-cat>", "<cute-cat>_1"]
    assert record["anchors"] == ["cat"]
    words = [s["token"] for s in record["attention_shares"] if s["kind"] == "word"]
    assert words == ["a", "photo", "of", "<cute-cat>", "<cute-cat>_1", "and", "a", "backpack"]
    assert sum(s["share"] for s in record["attention_shares"]) == pytest.approx(1.0, abs=1e-5)
    for name in ("projection.png", "attention-0-cute-cat.png", "attention-1-backpack.png"):
        assert (run / "inspect" / name).is_file()


def test_training_logs_the_diagnostics_at_each_validation(tiny_model, concept_images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from compinv.training import train
    from helpers import ti_config

    result = train(ti_config(tiny_model, concept_images, tmp_path / "run", steps=2, num_vectors=2,
                             validation_prompt=["a photo of {} and a dog"], validation_every=1,
                             validation_steps=2, num_validation_images=1, report_to="tensorboard"))
    log = next((result.out / "logs").rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(log)).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"ood_score/<cute-cat>", "ood_score/<cute-cat>_1", "attention_share/prompt0/concept",
            "attention_share/prompt0/padding"} <= tags
    concept = [e.value for e in scalars.Scalars("attention_share/prompt0/concept")]
    assert len(concept) == 2 and all(0 < v < 1 for v in concept)  # steps 1 and 2
    record = json.loads((result.out / "config.json").read_text())
    assert [r["name"] for r in record["embedding_report"]] == ["<cute-cat>", "<cute-cat>_1"]
    # The validation grid holds the prompt with every vector once (diffusers expands the token).
    assert (result.out / "validation" / "step-000002.png").is_file()
