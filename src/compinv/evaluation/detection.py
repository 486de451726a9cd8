"""Concept inclusion: is the prompt's other object in the image, per an object detector.

The official code runs DETR-ResNet-50 and counts an object as present at score >= 0.8; any
`AutoModelForObjectDetection` works the same way (its `id2label` is its vocabulary). Classes
outside a closed vocabulary (COCO's 80) need an open-vocabulary detector: OWL-ViT / OWLv2 take
the class names as text queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from compinv.errors import CompinvError
from compinv.evaluation.defaults import (DEFAULT_DETECTOR, DEFAULT_OPEN_VOCABULARY_DETECTOR,
                                         DEFAULT_THRESHOLD, OPEN_VOCABULARY_THRESHOLD)
from compinv.evaluation.loading import load_pretrained, metric_device
from compinv.evaluation.metrics import batches
from compinv.evaluation.samples import Sample

# Spellings people use for COCO classes whose detector label differs.
ALIASES = {"table": "dining table", "sofa": "couch", "motorbike": "motorcycle", "plant": "potted plant",
           "tv monitor": "tv", "television": "tv", "hydrant": "fire hydrant", "aeroplane": "airplane"}


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # pixels, (x0, y0, x1, y1)


class Detector(Protocol):
    """Finds objects of `classes` in images; `vocabulary` is None for open-vocabulary ones."""

    name: str
    threshold: float
    vocabulary: frozenset[str] | None

    def detect(self, images: Sequence[Image.Image], classes: Sequence[str]) -> list[list[Detection]]: ...


def normalise(label: str) -> str:
    label = " ".join(label.lower().replace("_", " ").split())
    return ALIASES.get(label, label)


class ClosedVocabularyDetector:
    """A transformers object detector (DETR, Deformable DETR, RT-DETR, ...) over its own labels."""

    def __init__(self, model: str = DEFAULT_DETECTOR, threshold: float = DEFAULT_THRESHOLD,
                 batch_size: int = 8, device=None, loaded=None):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.name, self.threshold, self.batch_size = model, threshold, batch_size
        self.device = device or metric_device()
        self.model, self.processor = loaded or (
            load_pretrained(AutoModelForObjectDetection, model, "detector"),
            load_pretrained(AutoImageProcessor, model, "detector"))
        self.model = self.model.to(self.device).eval()
        self.vocabulary = frozenset(normalise(v) for v in self.model.config.id2label.values())

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], classes: Sequence[str]) -> list[list[Detection]]:
        labels = self.model.config.id2label
        found = []
        for chunk in batches(images, self.batch_size, "detector"):
            inputs = self.processor(images=list(chunk), return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            sizes = torch.tensor([im.size[::-1] for im in chunk])
            results = self.processor.post_process_object_detection(
                outputs, threshold=self.threshold, target_sizes=sizes)
            for r in results:
                found.append([Detection(normalise(labels[int(k)]), float(s), tuple(map(float, b)))
                              for s, k, b in zip(r["scores"], r["labels"], r["boxes"])])
        return found


class OpenVocabularyDetector:
    """OWL-ViT / OWLv2: the classes are text queries, so any noun can be looked for."""

    vocabulary = None

    def __init__(self, model: str = DEFAULT_OPEN_VOCABULARY_DETECTOR,
                 threshold: float = OPEN_VOCABULARY_THRESHOLD, device=None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.name, self.threshold = model, threshold
        self.device = device or metric_device()
        self.model = load_pretrained(AutoModelForZeroShotObjectDetection, model, "detector")
        self.model = self.model.to(self.device).eval()
        self.processor = load_pretrained(AutoProcessor, model, "detector")

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image], classes: Sequence[str]) -> list[list[Detection]]:
        queries = [f"a photo of a {c}" for c in classes]
        found = []
        for image in images:
            inputs = self.processor(text=[queries], images=image, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            side = max(image.size)  # OWLv2 pads to a square; OWL-ViT resizes: boxes are relative
            size = torch.tensor([[side, side]] if "owlv2" in type(self.model).__name__.lower()
                                else [image.size[::-1]])
            result = self.processor.image_processor.post_process_object_detection(
                outputs, threshold=self.threshold, target_sizes=size)[0]
            found.append([Detection(normalise(classes[int(k)]), float(s), tuple(map(float, b)))
                          for s, k, b in zip(result["scores"], result["labels"], result["boxes"])])
        return found


def load_detector(model: str = DEFAULT_DETECTOR, threshold: float | None = None,
                  batch_size: int = 8) -> Detector:
    """An OWL-ViT/OWLv2 id or folder gives the open-vocabulary detector, anything else the
    closed-vocabulary one; `threshold` defaults to each kind's usual one."""
    from transformers import AutoConfig

    config = load_pretrained(AutoConfig, model, "detector")
    if config.model_type in ("owlvit", "owlv2"):
        return OpenVocabularyDetector(model, OPEN_VOCABULARY_THRESHOLD if threshold is None else threshold)
    return ClosedVocabularyDetector(model, DEFAULT_THRESHOLD if threshold is None else threshold,
                                    batch_size)


class ConceptInclusion:
    """1 when every object of a sample is detected at the detector's threshold, else 0."""

    columns = ("inclusion",)

    def __init__(self, detector: Detector):
        self.detector = detector

    def check(self, samples: Sequence[Sample]) -> None:
        """Every object must be in a closed-vocabulary detector's labels, before any work."""
        if self.detector.vocabulary is None:
            return
        for sample in samples:
            for obj in sample.objects:
                if normalise(obj) not in self.detector.vocabulary:
                    raise CompinvError(
                        f"`detector` {self.detector.name} has no class {obj!r} (prompt "
                        f"{sample.plain_prompt!r}); use an open-vocabulary detector such as "
                        "google/owlv2-base-patch16-ensemble, or a class among its labels")

    def score(self, samples: Sequence[Sample], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        out = np.full(len(samples), np.nan)
        classes = sorted({normalise(o) for s in samples for o in s.objects})
        if not classes:
            return {"inclusion": out}
        with_objects = [i for i, s in enumerate(samples) if s.objects]
        detections = self.detector.detect([images[i] for i in with_objects], classes)
        for i, found in zip(with_objects, detections):
            labels = {d.label for d in found if d.score >= self.detector.threshold}
            out[i] = float(all(normalise(o) in labels for o in samples[i].objects))
        return {"inclusion": out}

    def describe(self) -> dict[str, str]:
        return {"inclusion": f"share of images where every other object is detected, "
                             f"{self.detector.name} at score >= {self.detector.threshold}"}
