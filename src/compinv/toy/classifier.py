"""The toy world's CLIP: a small CNN that says which (colour, shape) pairs and background it sees.

Metrics on generated toy images (does "a red star and a blue ring at night" show both objects,
each with its colour, at night?) need a judge that is near perfect on real renders, so that a
metric's errors are the generator's. A ~0.3 M-parameter CNN gets there on a CPU in minutes
because renders are free: every step draws a fresh batch (no epochs, no overfitting), seeded by
(seed, step), so a resumed run sees exactly the batches an uninterrupted one would.

It is trained on *every* combination (split "all"): it must recognise the held-out ones the
text-to-image model never saw. Outputs: 36 independent pair logits (multi-label, sigmoid) and
4 background logits (softmax). Files: `classifier.safetensors` (weights), `classifier.json`
(vocabulary, settings, steps done, metrics), `optimizer.safetensors` (AdamW moments, to resume).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from compinv.artifacts import (
    atomic_write_text,
    ensure_writable_dir,
    load_optimizer_tensors,
    optimizer_tensors,
    save_tensors,
)
from compinv.errors import CompinvError
from compinv.toy.world import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, Pair, Scene, render, sample_scenes

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "compinv-toy-classifier"
CHANNELS = (32, 64, 128)
SHIPPED_DIR = Path(__file__).parent / "weights"  # trained by `compinv toy train-classifier`
EVAL_SEED = 1_000_003  # far from training seeds: evaluation renders are never training renders
_COLOURS = tuple(COLOURS)



def conv_features(channels: tuple[int, ...]) -> nn.Sequential:
    """The classifiers' VGG-style trunk: conv-BN-ReLU blocks, halving the size between widths."""
    layers: list[nn.Module] = []
    width = 3
    for i, out in enumerate(channels):
        if i:
            layers.append(nn.MaxPool2d(2))
        for _ in range(2 if i else 1):
            layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width = out
    return nn.Sequential(*layers)

class AttributeClassifier(nn.Module):
    """Three conv stages (3x3 conv + BN + ReLU; one conv at full resolution, where it is
    dearest, two in the others; 2x2 max-pool between; receptive field 30 px, enough for the
    largest object), global average pool, one linear head. The pool makes "is there a red star
    anywhere" position-free."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        self.features = conv_features(channels)
        self.head = nn.Linear(channels[-1], len(_COLOURS) * len(SHAPES) + len(BACKGROUNDS))
        self.channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, 3, H, W] in [-1, 1] → (pair logits [N, 36], background logits [N, 4])."""
        logits = self.head(self.features(x).mean(dim=(2, 3)))
        return logits[:, : -len(BACKGROUNDS)], logits[:, -len(BACKGROUNDS):]

    @torch.no_grad()
    def embed(self, images: np.ndarray | list[Image.Image], batch_size: int = 512) -> torch.Tensor:
        """Unit-length pooled features [N, 128]: the toy world's CLIP image embedding, for
        image alignment (how much a generated object looks like a concept's references)."""
        x = to_model_input(images)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        feats = [self.features(chunk.to(device)).mean(dim=(2, 3)).cpu() for chunk in x.split(batch_size)]
        self.train(was_training)
        return F.normalize(torch.cat(feats), dim=1)

    @torch.no_grad()
    def predict(self, images: np.ndarray | list[Image.Image], batch_size: int = 512) -> Predictions:
        """Probabilities for uint8/float [N, H, W, 3] arrays (float in [0, 1], as diffusers'
        output_type="np") or a list of PIL images; other sizes are resized to 32x32."""
        x = to_model_input(images)
        was_training = self.training
        self.eval()
        pairs, backgrounds = [], []
        device = next(self.parameters()).device
        for chunk in x.split(batch_size):
            pair_logits, bg_logits = self(chunk.to(device))
            pairs.append(torch.sigmoid(pair_logits).cpu())
            backgrounds.append(torch.softmax(bg_logits, dim=1).cpu())
        self.train(was_training)
        pair_probs = torch.cat(pairs).reshape(-1, len(_COLOURS), len(SHAPES)).numpy()
        return Predictions(pair_probs, torch.cat(backgrounds).numpy())


@dataclass(frozen=True)
class Predictions:
    """Classifier outputs: pair_probs [N, colour, shape], background_probs [N, background]."""

    pair_probs: np.ndarray
    background_probs: np.ndarray

    def objects(self, threshold: float = 0.5) -> list[frozenset[Pair]]:
        """The (colour, shape) pairs seen in each image."""
        return [frozenset((_COLOURS[c], SHAPES[s]) for c, s in zip(*np.nonzero(p > threshold)))
                for p in self.pair_probs]

    def backgrounds(self) -> list[str]:
        return [BACKGROUNDS[i] for i in self.background_probs.argmax(axis=1)]


def to_model_input(images: np.ndarray | list[Image.Image]) -> torch.Tensor:
    """[N, 3, 32, 32] float in [-1, 1] from the image forms `predict` accepts."""
    if isinstance(images, list):
        images = np.stack([np.asarray(im.convert("RGB"), np.uint8) for im in images]) if images else None
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        shape = getattr(images, "shape", None)
        raise CompinvError(f"classifier input must be [N, H, W, 3] images or PIL images, got shape {shape}")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(scale).permute(0, 3, 1, 2)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return x * 2 - 1


def targets(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot pair targets [N, 36] and background indices [N] for rendered scenes."""
    pairs = torch.zeros(len(scenes), len(_COLOURS) * len(SHAPES))
    for i, scene in enumerate(scenes):
        for colour, shape in scene.pairs:
            pairs[i, _COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)] = 1
    backgrounds = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
    return pairs, backgrounds


# ---- metrics -----------------------------------------------------------------------------------
def score(predictions: Predictions, scenes: list[Scene], threshold: float = 0.5) -> dict[str, float]:
    """exact_set: predicted pair set equals the true one; background: accuracy; colour/shape
    recall: share of true colours (shapes) found among the predicted pairs' colours (shapes)."""
    found = predictions.objects(threshold)
    exact = np.mean([f == s.pairs for f, s in zip(found, scenes)])
    background = np.mean([p == s.background for p, s in zip(predictions.backgrounds(), scenes)])
    return {"exact_set": float(exact), "background": float(background),
            "colour_recall": _recall(found, scenes, 0), "shape_recall": _recall(found, scenes, 1)}


def _recall(found: list[frozenset[Pair]], scenes: list[Scene], part: int) -> float:
    hits = total = 0
    for pairs, scene in zip(found, scenes):
        truth = {p[part] for p in scene.pairs}
        hits += len(truth & {p[part] for p in pairs})
        total += len(truth)
    return hits / total


def evaluate(model: AttributeClassifier, n: int = 4000, split: str = "all",
             seed: int = EVAL_SEED) -> dict[str, float]:
    """Metrics on `n` fresh renders of `split` (never seen in training: a separate seed)."""
    scenes = sample_scenes(n, split, seed)
    return score(model.predict(render(scenes)), scenes)


# ---- training ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierRun:
    out: Path
    steps: int
    metrics: dict[str, float]


def train_classifier(out: str | Path, steps: int = 3000, batch_size: int = 128, seed: int = 0,
                     lr: float = 3e-3, resume: bool = False, checkpoint_every: int = 250,
                     eval_renders: int = 4000, progress: bool = True) -> ClassifierRun:
    """Train (or continue, with `resume`) the classifier in `out`; evaluate it at the end.

    LR: linear warm-up over the first 5 % of steps, then cosine decay to zero at `steps`.
    """
    if steps < 1 or batch_size < 1:
        raise CompinvError(f"--steps and --batch-size must be positive (got {steps}, {batch_size})")
    out = ensure_writable_dir(out, "--out")
    settings = {"batch_size": batch_size, "seed": seed, "lr": lr}
    torch.manual_seed(seed)
    model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    done = _restore(out, model, optimizer, settings) if resume else _check_fresh(out)
    bar = tqdm(total=steps, initial=done, desc="classifier", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in range(done, steps):
        loss = _train_step(model, optimizer, step, steps, settings)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save(out, model, optimizer, settings, step + 1, {})
    bar.close()
    metrics = evaluate(model, eval_renders) if eval_renders else {}
    _save(out, model, optimizer, settings, max(done, steps), metrics)
    return ClassifierRun(out, max(done, steps), metrics)


def _train_step(model: AttributeClassifier, optimizer: torch.optim.Optimizer, step: int,
                steps: int, settings: dict) -> float:
    scenes = sample_scenes(settings["batch_size"], "all", (settings["seed"], step))
    x = _augment(to_model_input(render(scenes)), torch.Generator().manual_seed(settings["seed"] * 7919 + step))
    pair_target, bg_target = targets(scenes)
    for group in optimizer.param_groups:
        group["lr"] = _lr(step, steps, settings["lr"])
    pair_logits, bg_logits = model(x)
    # Pair BCE summed over the 36 outputs (mean over images): averaged, the rare positives'
    # gradient is 36x smaller than the background term's and objects are learned last.
    pairs_loss = F.binary_cross_entropy_with_logits(pair_logits, pair_target, reduction="sum") / len(x)
    loss = pairs_loss + F.cross_entropy(bg_logits, bg_target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur a third of the images and add light noise: generated images are softer and noisier
    than renders, and the classifier must judge those."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(len(x), 1, 1, 1, generator=generator) < 1 / 3
    noise = torch.randn(x.shape, generator=generator) * torch.rand(len(x), 1, 1, 1, generator=generator) * 0.1
    return torch.where(pick, blurred, x) + noise


def _lr(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


# ---- files -------------------------------------------------------------------------------------
def _check_fresh(out: Path) -> int:
    if (out / CONFIG_FILE).exists():
        raise CompinvError(f"--out {out} already holds a classifier; pass --resume to continue it "
                           "or choose a new folder")
    return 0


def _restore(out: Path, model: AttributeClassifier, optimizer: torch.optim.Optimizer,
             settings: dict) -> int:
    """Load weights and AdamW state; the run must keep its batch size, seed and lr (the batches
    and the schedule depend on them). Returns the number of steps already done."""
    if not (out / CONFIG_FILE).exists():
        return 0
    config = _read_config(out)
    changed = [f"--{k.replace('_', '-')} {config[k]}" for k, v in settings.items() if config[k] != v]
    if changed:
        raise CompinvError(f"--resume: {out} was trained with {', '.join(changed)}; pass the same "
                           "values (its batches and lr schedule depend on them)")
    model.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    load_optimizer_tensors(optimizer, load_file(str(out / OPTIMIZER_FILE)))
    return int(config["trained_steps"])


def _save(out: Path, model: AttributeClassifier, optimizer: torch.optim.Optimizer, settings: dict,
          step: int, metrics: dict[str, float]) -> None:
    """Weights, optimizer moments, then the JSON that names the step: a run killed between the
    writes resumes from the older JSON's step with at most one checkpoint interval redone."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_tensors(weights, out / WEIGHTS_FILE)
    save_tensors(optimizer_tensors(optimizer), out / OPTIMIZER_FILE)
    config = {"format": FORMAT, "channels": list(model.channels), "image_size": IMAGE_SIZE,
              "colours": list(_COLOURS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS),
              **settings, "trained_steps": step, "metrics": metrics}
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2))


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CompinvError(f"{folder} holds no {CONFIG_FILE}; train one with `compinv toy train-classifier`")
    config = json.loads(path.read_text())
    vocabulary = {"colours": list(_COLOURS), "shapes": list(SHAPES), "backgrounds": list(BACKGROUNDS)}
    if config.get("format") != FORMAT or any(config.get(k) != v for k, v in vocabulary.items()):
        raise CompinvError(f"{path} is not a classifier for this version of the toy world")
    return config


def load_classifier(folder: str | Path | None = None,
                    device: str | torch.device = "cpu") -> AttributeClassifier:
    """A trained classifier in eval mode, ready for `predict`; no folder: the shipped one."""
    folder = SHIPPED_DIR if folder is None else Path(folder)
    config = _read_config(folder)
    model = AttributeClassifier(tuple(config["channels"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device).eval()
