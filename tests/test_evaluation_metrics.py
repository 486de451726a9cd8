"""Evaluation metrics on tiny random CLIP / ViT / DETR folders built from configs, loaded by path
like the real ones: answers known by construction, a cross-check against torchmetrics, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compinv.errors import CompinvError
from compinv.evaluation.detection import ClosedVocabularyDetector, ConceptInclusion, Detection, load_detector
from compinv.evaluation.evaluate import MetricChoice, score_samples
from compinv.evaluation.loading import features, load_pretrained
from compinv.evaluation.metrics import ClipMetrics, DinoMetric, dino_preprocess
from compinv.evaluation.runs import classes_in, other_objects, plain_prompt
from compinv.evaluation.samples import Sample
from compinv.evaluation.tiny import save_tiny_clip, save_tiny_detr, save_tiny_dino


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metric-models")
    return {"clip": save_tiny_clip(root / "clip"), "dino": save_tiny_dino(root / "dino"),
            "detr": save_tiny_detr(root / "detr")}


def noise_images(folder: Path, n: int, seed: int = 0, size=(48, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def sample(image: Path, references=(), plain="a cat and a dog", objects=("dog",), **kw) -> Sample:
    return Sample(image=image, prompt=kw.pop("prompt", plain), plain_prompt=plain,
                  references=tuple(references), objects=tuple(objects), **kw)


def test_identical_images_have_image_alignment_one(metric_models, tmp_path):
    images = noise_images(tmp_path / "gen", 3)
    samples = [sample(p, references=[p]) for p in images]  # each image is its own reference
    pictures = [Image.open(p).convert("RGB") for p in images]
    clip = ClipMetrics(str(metric_models["clip"]), batch_size=2)
    dino = DinoMetric(str(metric_models["dino"]), batch_size=2)
    assert np.allclose(clip.score(samples, pictures)["clip_i"], 1.0, atol=1e-5)
    assert np.allclose(dino.score(samples, pictures)["dino"], 1.0, atol=1e-5)
    other = [sample(images[0], references=[images[1]])]
    assert clip.score(other, pictures[:1])["clip_i"][0] < 1 - 1e-4


def test_clip_i_is_the_mean_cosine_over_the_references(metric_models, tmp_path):
    images = noise_images(tmp_path / "gen", 3)
    clip = ClipMetrics(str(metric_models["clip"]))
    pictures = [Image.open(p).convert("RGB") for p in images]
    emb = clip.embed_images(pictures)
    got = clip.score([sample(images[0], references=images[1:])], pictures[:1])["clip_i"][0]
    assert got == pytest.approx(float((emb[1:] @ emb[0]).mean()), abs=1e-5)


class _TensorFeatures(torch.nn.Module):
    """transformers 5's CLIPModel returns output objects from get_*_features; torchmetrics 1.9
    expects tensors. Same weights, tensor outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return features(self.model.get_text_features(*args, **kwargs))


def test_clip_text_alignment_matches_torchmetrics(metric_models, tmp_path):
    from torchmetrics.multimodal.clip_score import CLIPScore

    images = noise_images(tmp_path / "gen", 4, seed=3)
    prompts = ["a cat and a dog", "a red car", "a photo of a teapot", "a barn in the snow"]
    clip = ClipMetrics(str(metric_models["clip"]))
    pictures = [Image.open(p).convert("RGB") for p in images]
    samples = [sample(p, plain=t) for p, t in zip(images, prompts)]
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(clip.model), clip.processor))
    signs = []
    for _ in range(2):  # then with the text projection negated: every cosine changes sign
        ours = clip.score(samples, pictures)
        theirs = []
        for picture, text in zip(pictures, prompts):
            metric.reset()
            metric.update(torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1), text)
            theirs.append(float(metric.compute()))
        # torchmetrics: max(100 cos, 0); ours: clip_t = cos, clip_score = 2.5 max(cos, 0)
        assert np.allclose(np.array(theirs) / 100, np.maximum(ours["clip_t"], 0), atol=1e-4)
        assert np.allclose(np.array(theirs) / 40, ours["clip_score"], atol=2.5e-4)
        signs.append(np.sign(ours["clip_t"]))
        with torch.no_grad():
            clip.model.text_projection.weight.neg_()
    assert (signs[0] == -signs[1]).all() and (signs[1] > 0).any()  # both branches were checked


def test_dino_preprocessing_is_customconcept101s(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    pixels = dino_preprocess(image)
    assert pixels.shape == (3, 224, 224)
    resized = image.resize((341, 256), Image.BICUBIC)  # shorter side 256
    crop = np.asarray(resized.crop((58, 16, 282, 240)), np.float32) / 255.0  # centre 224
    expected = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(pixels.permute(1, 2, 0).numpy(), expected, atol=1e-5)


class StubDetector:
    """A detector that reports one known box of `label` at `score` in every image."""

    name, threshold, vocabulary = "stub", 0.8, frozenset({"dog", "cat", "dining table"})

    def __init__(self, label="dog", score=0.9):
        self.label, self.score = label, score
        self.seen: list[list[str]] = []

    def detect(self, images, classes):
        self.seen.append(list(classes))
        return [[Detection(self.label, self.score, (1.0, 2.0, 20.0, 30.0))] for _ in images]


def test_inclusion_with_a_known_detection(tmp_path):
    images = noise_images(tmp_path / "gen", 2)
    pictures = [Image.open(p) for p in images]
    samples = [sample(images[0], objects=("dog",)), sample(images[1], objects=("dog", "cat"))]
    assert list(ConceptInclusion(StubDetector()).score(samples, pictures)["inclusion"]) == [1.0, 0.0]
    low = ConceptInclusion(StubDetector(score=0.5)).score(samples[:1], pictures[:1])["inclusion"]
    assert list(low) == [0.0]  # below the 0.8 threshold
    none = ConceptInclusion(StubDetector()).score([sample(images[0], objects=())], pictures[:1])
    assert np.isnan(none["inclusion"][0])  # nothing to look for: not scored


def test_detector_lacking_a_class_is_named_before_any_work(tmp_path):
    images = noise_images(tmp_path / "gen", 1)
    stub = StubDetector()
    with pytest.raises(CompinvError, match="has no class 'wooden pot'.*owlv2"):
        score_samples([sample(images[0], objects=("wooden pot",))], [ConceptInclusion(stub)])
    assert stub.seen == []


def test_detr_through_transformers_finds_a_class_its_head_prefers(metric_models, tmp_path):
    images = noise_images(tmp_path / "gen", 2, size=(64, 48))
    detector = load_detector(str(metric_models["detr"]))
    assert isinstance(detector, ClosedVocabularyDetector) and detector.threshold == 0.8
    dog = detector.model.config.label2id["dog"]
    with torch.no_grad():  # every query now predicts "dog" with probability ~1
        detector.model.class_labels_classifier.bias.zero_()
        detector.model.class_labels_classifier.bias[dog] = 30.0
    found = detector.detect([Image.open(p).convert("RGB") for p in images], ["dog"])
    assert all(d.label == "dog" and d.score > 0.99 for image in found for d in image)
    assert all(0 <= d.box[0] <= d.box[2] <= 64 and 0 <= d.box[1] <= d.box[3] <= 48
               for image in found for d in image)
    inclusion = ConceptInclusion(detector).score(
        [sample(images[0], objects=("dog",)), sample(images[1], objects=("cat",))],
        [Image.open(p).convert("RGB") for p in images])["inclusion"]
    assert list(inclusion) == [1.0, 0.0]


def test_aliases_and_prompt_objects():
    assert classes_in("a hot dog and a dog on a dining table") == ("dog", "hot dog", "dining table")
    assert other_objects("a <cute-cat> cat and a backpack", {"<cute-cat>": "cat"}) == ("backpack",)
    assert plain_prompt("a <cute-cat> cat and a backpack", {"<cute-cat>": "cat"}) == "a cat and a backpack"


def test_metric_model_not_available_offline_names_it(monkeypatch):
    from transformers import CLIPModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CompinvError) as error:
        load_pretrained(CLIPModel, "nobody-here/no-such-clip", "clip_model")
    message = str(error.value)
    assert "clip_model nobody-here/no-such-clip" in message
    assert "huggingface-cli download nobody-here/no-such-clip" in message


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    from transformers import CLIPModel

    (tmp_path / "empty").mkdir()
    with pytest.raises(CompinvError, match="clip_model .*empty: cannot load this folder"):
        load_pretrained(CLIPModel, str(tmp_path / "empty"), "clip_model")


def test_metric_choice_refuses_bad_settings_before_loading():
    with pytest.raises(CompinvError, match="metrics clipp"):
        MetricChoice(metrics=["clipp"]).build()
    with pytest.raises(CompinvError, match="detector_threshold 1.5"):
        MetricChoice(metrics=["detector"], detector_threshold=1.5).build()


def test_no_reference_images_is_refused(metric_models, tmp_path):
    images = noise_images(tmp_path / "gen", 1)
    with pytest.raises(CompinvError, match="references: no reference images"):
        score_samples([sample(images[0])], [ClipMetrics(str(metric_models["clip"]))])


def test_scores_do_not_depend_on_chunks_or_batches(metric_models, tmp_path):
    images = noise_images(tmp_path / "gen", 5)
    samples = [sample(p, references=images[:2]) for p in images]
    whole = score_samples(samples, [ClipMetrics(str(metric_models["clip"]), batch_size=8),
                                    DinoMetric(str(metric_models["dino"]), batch_size=8)])
    pieces = score_samples(samples, [ClipMetrics(str(metric_models["clip"]), batch_size=2),
                                     DinoMetric(str(metric_models["dino"]), batch_size=2)], chunk=2)
    for a, b in zip(whole.rows, pieces.rows):
        for column in ("clip_t", "clip_i", "dino"):
            assert a[column] == pytest.approx(b[column], abs=1e-5)


def test_open_vocabulary_detector_scores_classes_outside_coco(tmp_path):
    from compinv.evaluation.detection import OpenVocabularyDetector
    from compinv.evaluation.tiny import save_tiny_owlvit

    detector = load_detector(str(save_tiny_owlvit(tmp_path / "owl")))
    assert isinstance(detector, OpenVocabularyDetector) and detector.threshold == 0.1
    assert detector.vocabulary is None  # any noun is a query: no class check
    head = detector.model.class_head
    with torch.no_grad():  # every box matches every query: sigmoid((cos + 10) * 6) ~ 1
        for layer, bias in ((head.logit_shift, 10.0), (head.logit_scale, 5.0)):
            layer.weight.zero_()
            layer.bias.fill_(bias)
    images = noise_images(tmp_path / "gen", 1, size=(60, 40))
    inclusion = ConceptInclusion(detector)
    pot = [sample(images[0], objects=("wooden pot",))]
    score_samples(pot, [inclusion])  # the class check passes for a non-COCO class
    assert list(inclusion.score(pot, [Image.open(images[0]).convert("RGB")])["inclusion"]) == [1.0]
    with torch.no_grad():
        head.logit_shift.bias.fill_(-10.0)  # now nothing matches
    assert list(inclusion.score(pot, [Image.open(images[0]).convert("RGB")])["inclusion"]) == [0.0]
