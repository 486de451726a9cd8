"""Anchor sets: the paper's sparse attractor over several anchor words (docs/semantic.md)."""

from __future__ import annotations

import json

import pytest
import torch

from compinv.methods.custom_diffusion import CustomDiffusionConfig
from compinv.methods.dreambooth import DreamBoothConfig
from compinv.models import build_tiny_pipeline
from compinv.semantic import AnchorAttractor, anchor_loss, build_attractor, input_embeddings
from compinv.tokens import add_concept_token, single_token_id
from compinv.training import train
from helpers import cli_error, moved_concept, ti_config


def _row(pipe, word):
    return pipe.text_encoder.get_input_embeddings().weight.detach()[
        pipe.tokenizer(word, add_special_tokens=False).input_ids].mean(0)


def test_one_anchor_without_sparsity_is_exactly_the_official_loss():
    enc, table, cat, concept, ids, official_ids = moved_concept()
    attractor = AnchorAttractor([table[cat][None].detach()], [("cat",)], {i: 0 for i in concept.ids}, 0.0)
    prompt = input_embeddings(enc, ids)
    ours = anchor_loss(prompt, attractor.reference(prompt, ids, table.detach()))
    official = anchor_loss(prompt, input_embeddings(enc, official_ids).detach())
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-10)


def test_a_vector_on_an_anchor_is_attracted_to_that_anchor_alone():
    pipe = build_tiny_pipeline()
    anchors = torch.stack([_row(pipe, w) for w in ("cat", "dog", "car", "tree")])
    table = torch.cat([anchors, anchors[0][None]])  # row 4 is a learned vector equal to "cat"
    attractor = AnchorAttractor([anchors], [("cat", "dog", "car", "tree")], {4: 0}, 0.1)
    for _ in range(20):  # warm starts converge over the steps of a run
        target = attractor.targets(table)[4]
    assert float(attractor.weights[4][0]) > 0.95
    torch.testing.assert_close(target, anchors[0], atol=0.05 * float(anchors[0].norm()), rtol=0)
    assert attractor.summary({4: "<x>"})["<x>"].split(" + ")[0].endswith(" cat")


def test_sparsity_keeps_fewer_anchors():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(40, 32, generator=gen)
    v = torch.rand(40, generator=gen) @ anchors / 10
    table = v[None]
    used = []
    for sparsity in (0.0, 1.0):
        attractor = AnchorAttractor([anchors], [tuple(map(str, range(40)))], {0: 0}, sparsity)
        for _ in range(40):
            attractor.solve(table)
        used.append(int((attractor.weights[0] > 1e-6).sum()))
        assert float(attractor.weights[0].sum()) == pytest.approx(1.0)
    assert used[1] < used[0]


def test_ti_with_anchor_words_records_the_weights(tiny_model, concept_images, tmp_path):
    result = train(ti_config(tiny_model, concept_images, tmp_path / "run", num_vectors=2, steps=2,
                             class_word=None, init_word="cat", anchor_words="cat,kitten,pet",
                             anchor_vocabulary="nearest:3", report_to="tensorboard"))
    record = json.loads((result.out / "config.json").read_text())
    weights = record["anchor_weights"]
    assert set(weights) == {"<cute-cat>", "<cute-cat>_1"}
    anchors = record["anchors"]["<cute-cat>"]
    assert anchors[:3] == ["cat", "kitten", "pet"] and len(anchors) == 6
    words = {term.split(" ", 1)[1] for line in weights.values() for term in line.split(" + ")}
    assert words <= set(anchors)
    assert sum(float(t.split(" ")[0]) for t in weights["<cute-cat>"].split(" + ")) == pytest.approx(1, abs=0.03)
    assert [r["name"] for r in record["embedding_report"]] == ["<cute-cat>", "<cute-cat>_1"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = next((result.out / "logs").rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(log)).Reload()
    tags = " ".join(events.Tags()["scalars"])
    assert "anchor_weight/<cute-cat>/" in tags


def test_multi_concept_custom_diffusion_and_lora_take_anchor_lists(tiny_model, concept_images, tmp_path):
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text(f"- {{token: '<a>', init_word: cat, anchor_words: [cat, kitten], images: '{concept_images}'}}\n"
                        f"- {{token: '<b>', init_word: car, anchor_words: 'car,truck,bus', images: '{concept_images}'}}\n")
    common = dict(model=str(tiny_model), steps=1, resolution=32, checkpoint_every=0, save_every=0,
                  validation_every=0)
    cd = train(CustomDiffusionConfig(concepts=str(concepts), out=str(tmp_path / "cd"), **common))
    weights = json.loads((cd.out / "config.json").read_text())["anchor_weights"]
    assert {w.split(" ", 1)[1] for w in weights["<a>"].split(" + ")} <= {"cat", "kitten"}
    assert {w.split(" ", 1)[1] for w in weights["<b>"].split(" + ")} <= {"car", "truck", "bus"}
    lora = train(DreamBoothConfig(images=str(concept_images), token="<l>", init_word="dog",
                                  anchor_words="dog,puppy", lora=True, out=str(tmp_path / "db"), **common))
    assert "<l>" in json.loads((lora.out / "config.json").read_text())["anchor_weights"]


def test_anchor_vocabulary_nearest_excludes_the_init_word_and_pieces():
    from compinv.config import ConceptSpec

    pipe = build_tiny_pipeline()
    spec = ConceptSpec(token="<x>", images=".", init_word="cat", anchor_vocabulary="nearest:7").resolved()
    concept = add_concept_token(pipe.tokenizer, pipe.text_encoder, "<x>", 1,
                                single_token_id(pipe.tokenizer, "cat", "cat"))
    attractor = build_attractor(pipe.tokenizer, pipe.text_encoder, [spec], [concept], 0.1)
    words = attractor.names[0]
    assert words[0] == "cat" and len(words) == 8 and words.count("cat") == 1
    assert all(w.isalpha() for w in words)


@pytest.mark.parametrize("flags, message", [
    (["--anchor-words", "cat,qxzqvkwjqxzq"], "--anchor-words: anchor word 'qxzqvkwjqxzq' is not in the vocabulary"),
    (["--anchor-words", "cat,,pet"], "hold an empty word"),
    (["--anchor-words", "cat,pet,cat"], "anchor word 'cat' is given twice"),
    (["--anchor-sparsity", "-1"], "--anchor-sparsity -1.0: must be a number in [0.0, "),
    (["--anchor-word", "cat", "--anchor-words", "cat,pet"], "not both"),
    (["--anchor-vocabulary", "nearest:zero"], "write nearest:K"),
])
def test_bad_anchor_sets_fail_with_one_line(tiny_model, concept_images, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    line = cli_error(capsys, ["train", "textual-inversion", "--model", str(tiny_model), "--images",
                              str(concept_images), "--token", "<t>", "--init-word", "cat",
                              "--steps", "1", "--resolution", "32", "--out", str(out), *flags])
    assert message in line
    assert not out.exists()


def test_vocabulary_file_without_usable_words(tiny_model, concept_images, tmp_path, capsys):
    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("# only noise\n\nqxzqvkwjqxzqpfhg\n")
    line = cli_error(capsys, ["train", "textual-inversion", "--model", str(tiny_model), "--images",
                              str(concept_images), "--token", "<t>", "--init-word", "cat",
                              "--steps", "1", "--resolution", "32", "--out", str(tmp_path / "out"),
                              "--anchor-vocabulary", str(vocabulary)])
    assert "has no usable word" in line
