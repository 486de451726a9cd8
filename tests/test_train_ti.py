"""Textual Inversion with semantic inversion on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from compinv.training import train
from helpers import learned, ti_config


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from helpers import write_concept_images

    return write_concept_images(tmp_path_factory.mktemp("img") / "concept")


@pytest.fixture(scope="module")
def three_vector_run(tiny_model, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ti3"
    cfg = ti_config(tiny_model, images, out, num_vectors=3, init_word="dog", steps=3,
                    save_every=2, checkpoint_every=2, validation_prompt=["a photo of {}"],
                    validation_every=2, num_validation_images=1, validation_steps=2)
    return train(cfg)


def _base_table(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    return pipe, pipe.text_encoder.get_input_embeddings().weight.detach()


def test_all_vectors_train_and_every_other_row_is_bit_identical(three_vector_run, tiny_model):
    vectors = learned(three_vector_run.artifact)
    pipe, base = _base_table(tiny_model)
    dog = base[pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]]
    assert vectors.shape == (3, base.shape[1])
    assert all(not torch.equal(v, dog) for v in vectors), "a vector never left its init word"

    pipe.load_textual_inversion(str(three_vector_run.artifact))
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    new_ids = pipe.tokenizer.convert_tokens_to_ids(["<cute-cat>", "<cute-cat>_1", "<cute-cat>_2"])
    assert new_ids == list(range(base.shape[0], base.shape[0] + 3))
    torch.testing.assert_close(table[new_ids], vectors, rtol=0, atol=0)


def test_frozen_rows_are_bit_identical_after_training(tiny_model, images, tmp_path):
    from compinv.training import prepare

    trainer = prepare(ti_config(tiny_model, images, tmp_path / "run", steps=3).resolved())
    trainer.run()
    captured = {"table": trainer.method.text_encoder.get_input_embeddings().weight.detach().clone()}
    _, base = _base_table(tiny_model)
    table = captured["table"]
    assert torch.equal(table[: base.shape[0]], base)
    assert not torch.equal(table[base.shape[0]], base[2368])


def test_run_folder_holds_every_output(three_vector_run):
    out = three_vector_run.out
    config = json.loads((out / "config.json").read_text())
    assert config["token"] == "<cute-cat>" and config["num_vectors"] == 3
    assert config["finished_step"] == 3 and "diffusers" in config["versions"]
    assert (out / "embeddings" / "learned_embeds-step-000002.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png",
                                                                      "step-000003.png"]


def test_artifact_changes_text_encoder_output_in_stock_diffusers(three_vector_run, tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    before = pipe.encode_prompt("a photo of dog", "cpu", 1, False)[0]
    pipe.load_textual_inversion(str(three_vector_run.artifact))
    ids = pipe.tokenizer(pipe.maybe_convert_prompt("a <cute-cat>", pipe.tokenizer)).input_ids
    assert len(ids) == 2 + 1 + 3, "the prompt must expand to all three vectors"
    with_token = pipe.encode_prompt("a photo of <cute-cat>", "cpu", 1, False)[0]
    assert with_token.shape == before.shape
    assert not torch.allclose(with_token, before)


def _distance_to(vectors: torch.Tensor, tiny_model, word: str) -> float:
    pipe, base = _base_table(tiny_model)
    anchor = base[pipe.tokenizer(word, add_special_tokens=False).input_ids[0]]
    return float((vectors - anchor).norm(dim=1).mean())


def test_anchor_keeps_vectors_closer_to_anchor_than_vanilla(tiny_model, images, tmp_path):
    common = dict(steps=8, init_word="dog", class_word="cat", lr=0.05, scale_lr=False)
    anchored = train(ti_config(tiny_model, images, tmp_path / "a",
                                                 anchor_weight=0.95, recon_weight=0.05, **common))
    vanilla = train(ti_config(tiny_model, images, tmp_path / "v",
                                                no_anchor=True, **common))
    d_anchor = _distance_to(learned(anchored.artifact), tiny_model, "cat")
    d_vanilla = _distance_to(learned(vanilla.artifact), tiny_model, "cat")
    assert d_anchor < d_vanilla
    assert json.loads((tmp_path / "v" / "config.json").read_text())["anchor_weight"] == 0.0


def test_interrupted_and_resumed_run_ends_with_same_embedding(tiny_model, images, tmp_path):
    common = dict(steps=4, grad_accum=2, checkpoint_every=2, num_vectors=2)
    whole = train(ti_config(tiny_model, images, tmp_path / "whole", **common))
    part = ti_config(tiny_model, images, tmp_path / "parts", **{**common, "steps": 2})
    train(part)
    resumed = train(ti_config(tiny_model, images, tmp_path / "parts",
                                                resume="latest", **common))
    assert resumed.steps == 4
    assert torch.equal(learned(whole.artifact), learned(resumed.artifact))


@pytest.mark.parametrize("settings", [{"mixed_precision": "bf16"},
                                      {"gradient_checkpointing": True}])
def test_memory_options_train(tiny_model, images, tmp_path, settings):
    result = train(ti_config(tiny_model, images, tmp_path / "run", steps=2,
                                               init_word="dog", **settings))
    vectors = learned(result.artifact)
    assert torch.isfinite(vectors).all()
    pipe, base = _base_table(tiny_model)
    assert not torch.equal(vectors[0], base[pipe.tokenizer("dog").input_ids[1]])


def test_tensorboard_logs_each_loss_term(tiny_model, images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(ti_config(tiny_model, images, tmp_path / "tb", steps=2,
                                      report_to="tensorboard"))
    events = [p for p in (tmp_path / "tb" / "logs").rglob("events.out.tfevents.*")]
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"loss", "rec", "anchor", "lr"} <= tags


def test_optimised_rows_read_the_table_the_encoder_has_now():
    """Moving or converting a module may replace its parameters: the rows write into the
    encoder's current table, not the one they were built from."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from compinv.tokens import TrainableRows

    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16,
                                           num_hidden_layers=1, num_attention_heads=2))
    rows = TrainableRows(encoder, [3, 7])
    with torch.no_grad():
        rows.rows += 1.0
    replaced = torch.nn.Parameter(encoder.get_input_embeddings().weight.detach().clone())
    encoder.get_input_embeddings().weight = replaced
    rows.write()
    assert rows.table is replaced and torch.equal(replaced.detach()[[3, 7]], rows.rows.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the optimised rows must "
                    "follow the text encoder to it")
def test_textual_inversion_trains_on_the_gpu(tiny_model, images, tmp_path):
    result = train(ti_config(tiny_model, images, tmp_path / "gpu", steps=3))
    vectors = learned(result.artifact)
    assert torch.isfinite(vectors).all() and vectors.abs().sum() > 0
