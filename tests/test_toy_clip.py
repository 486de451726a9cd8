"""The toy CLIP (compinv.toy.clip): contrastive pretraining learns, resumes bit-identically, and
its text tower is a stock CLIPTextModel for the SD pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPTextModel

from compinv.errors import CompinvError
from compinv.toy.clip import (
    ResNetImageTower,
    ToyClipSettings,
    build_toy_clip,
    contrastive_loss,
    embeddings,
    load_toy_clip,
    retrieval_accuracy,
    same_caption,
    text_encoder,
    tokenize,
    train_toy_clip,
)
from compinv.toy.world import BACKGROUND_PHRASES, generate

TINY = ToyClipSettings(steps=4, batch_size=8, lr=3e-3, image_size=32, patch_size=8, text_hidden=32,
                       text_layers=1, vision_hidden=32, vision_layers=1, heads=2, projection_dim=16)


def world_batches(n: int, seed: tuple[int, ...]) -> tuple[np.ndarray, list[str], list[str]]:
    batch = generate(n, "train", seed)
    return batch.images, batch.captions, []


def background_batches(n: int, seed: tuple[int, ...]) -> tuple[np.ndarray, list[str], list[str]]:
    """Captions that name only the background: four classes, learnable in a few dozen steps."""
    batch = generate(n, "train", seed)
    return batch.images, [BACKGROUND_PHRASES[s.background] for s in batch.scenes], []


def test_equal_captions_are_shared_positives():
    same = same_caption(["on grass", "on sand", "on grass"])
    assert same.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_retrieval_counts_a_duplicate_caption_as_right():
    model = build_toy_clip(TINY)
    images, _, _ = world_batches(6, (0,))
    captions = ["on grass"] * 6  # every pick is right, whatever the model
    scores = retrieval_accuracy(model, images, captions)
    assert scores["text_to_image"] == scores["image_to_text"] == scores["chance"] == 1.0


def test_contrastive_training_learns_retrieval(tmp_path):
    settings = ToyClipSettings(**{**TINY.__dict__, "steps": 60, "batch_size": 32})
    run = train_toy_clip(tmp_path, background_batches, settings, checkpoint_every=0, progress=False)
    images, captions, _ = background_batches(128, (99,))
    scores = retrieval_accuracy(run.model, images, captions)
    untrained = retrieval_accuracy(build_toy_clip(settings), images, captions)
    assert scores["chance"] < 0.4
    assert scores["text_to_image"] > 0.9 and scores["image_to_text"] > 0.9
    assert untrained["image_to_text"] < 0.6


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_resume_is_bit_identical(tmp_path, tower):
    """A run killed after its step-2 checkpoint and resumed ends with the uninterrupted weights
    (and, for the ResNet tower, BatchNorm statistics)."""
    settings = ToyClipSettings(**{**TINY.__dict__, "image_tower": tower})
    straight = train_toy_clip(tmp_path / "a", world_batches, settings, checkpoint_every=0, progress=False)

    class Killed(Exception):
        pass

    def killed_at_step_2(n, seed):
        if seed[1] == 2:
            raise Killed
        return world_batches(n, seed)

    with pytest.raises(Killed):
        train_toy_clip(tmp_path / "b", killed_at_step_2, settings, checkpoint_every=2, progress=False)
    resumed = train_toy_clip(tmp_path / "b", world_batches, settings, resume=True, checkpoint_every=0,
                             progress=False)
    assert resumed.steps == 4
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert any("running_mean" in name for name in straight.model.state_dict()) == (tower == "resnet")


def test_resnet_tower_replaces_the_vit_and_reloads_exactly(tmp_path):
    settings = ToyClipSettings(**{**TINY.__dict__, "image_tower": "resnet"})
    run = train_toy_clip(tmp_path, world_batches, settings, checkpoint_every=0, progress=False)
    assert isinstance(run.model.vision_model, ResNetImageTower)
    images, captions, _ = world_batches(4, (7,))
    reloaded = load_toy_clip(tmp_path)
    with torch.no_grad():
        assert torch.equal(embeddings(run.model.eval(), images, captions)[0], embeddings(reloaded, images, captions)[0])
    with pytest.raises(CompinvError, match="image_tower 'cnn': use 'vit' or 'resnet'"):
        build_toy_clip(ToyClipSettings(**{**TINY.__dict__, "image_tower": "cnn"}))


def test_resume_refuses_other_settings(tmp_path):
    train_toy_clip(tmp_path, world_batches, TINY, checkpoint_every=0, progress=False)
    with pytest.raises(CompinvError, match="lr=0.003"):
        train_toy_clip(tmp_path, world_batches, ToyClipSettings(**{**TINY.__dict__, "lr": 1e-3}),
                       resume=True, progress=False)
    with pytest.raises(CompinvError, match="already holds a toy CLIP run"):
        train_toy_clip(tmp_path, world_batches, TINY, progress=False)


def test_text_tower_is_a_stock_text_encoder(tmp_path):
    train_toy_clip(tmp_path / "run", world_batches, TINY, checkpoint_every=0, progress=False)
    clip = load_toy_clip(tmp_path / "run")
    encoder = text_encoder(clip)
    encoder.save_pretrained(tmp_path / "text_encoder")
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    ids, mask = tokenize(["a red star on grass", "a photo of a blue ring at night"])
    with torch.no_grad():
        tower = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        states = reloaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(tower, states)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_bad_patch_size_is_named():
    with pytest.raises(CompinvError, match="image_size 32 must be a multiple of patch_size 5"):
        build_toy_clip(ToyClipSettings(**{**TINY.__dict__, "patch_size": 5}))


def test_a_hard_negative_joins_the_softmax_and_a_copy_of_a_caption_stays_a_positive():
    model = build_toy_clip(TINY)
    images, captions, _ = world_batches(4, (0,))
    plain = contrastive_loss(model, images, captions)
    assert torch.equal(contrastive_loss(model, images, captions, []), plain)
    # a negative that is the same text as a batch caption is that image's positive, not a negative
    with_copy = contrastive_loss(model, images, captions, [captions[0]])
    with_other = contrastive_loss(model, images, captions, ["a caption no image has"])
    assert with_other > plain
    assert not torch.isclose(with_copy, with_other)


def test_clip_batches_give_each_caption_a_one_word_negative():
    """The v2 CLIP phase's hard negatives: each is its caption with one attribute word swapped
    (and the article that goes with it), so a CLIP must read that word to rank them."""
    from compinv.toy import world_v2
    from compinv.toy.model_v2 import clip_batches

    images, captions, negatives = clip_batches(16, (0, 1), hard_negatives=1.0)
    assert len(negatives) == 16 and images.shape == (16, 48, 48, 3)
    for caption, negative in zip(captions, negatives):
        differing = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b and a not in ("a", "an")]
        assert len(caption.split()) == len(negative.split()) and len(differing) == 1
    assert clip_batches(16, (0, 1), hard_negatives=0.0)[2] == []
    assert clip_batches(16, (0, 1), hard_negatives=0.0)[1] == captions
    scene = world_v2.sample_scenes(1, "train", 0)[0]
    rng = np.random.default_rng(0)
    swapped = world_v2.swap_attribute(scene, rng, "shape")
    assert sum(a.shape != b.shape for a, b in zip(swapped.objects, scene.objects)) == 1
    assert [a.colour for a in swapped.objects] == [b.colour for b in scene.objects]


def test_binding_negatives_exchange_an_attribute_between_the_two_objects():
    """Same words, other binding: a negative only a CLIP that binds attributes to objects ranks
    lower; never a mere reordering of the objects (which would be a true caption)."""
    from collections import Counter

    from compinv.toy import world_v2
    from compinv.toy.model_v2 import clip_batches

    rng = np.random.default_rng(0)
    exchanged = 0
    for scene in world_v2.sample_scenes(200, "train", 3):
        other = world_v2.exchange_attribute(scene, rng)
        if len(scene.objects) == 1:
            assert other is None
        if other is None:
            continue
        exchanged += 1
        assert sorted(o.identity for o in other.objects) != sorted(o.identity for o in scene.objects)
        assert Counter(world_v2.caption(other).split()) == Counter(world_v2.caption(scene).split())
        assert [(o.x, o.y, o.radius) for o in other.objects] == [(o.x, o.y, o.radius) for o in scene.objects]
        for obj in other.objects:
            assert obj.pattern == "solid" and obj.colour2 == obj.colour or obj.pattern != "solid" and obj.colour2 != obj.colour
    assert exchanged > 50
    plain = clip_batches(64, (0, 1), hard_negatives=1.0)
    bound = clip_batches(64, (0, 1), hard_negatives=1.0, binding_negatives=1.0)
    assert bound[1] == plain[1] and bound[2] != plain[2]  # same captions, other negatives
    assert sum(sorted(n.split()) == sorted(c.split()) for c, n in zip(bound[1], bound[2])) > 10
