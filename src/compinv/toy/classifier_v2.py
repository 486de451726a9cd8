"""The v2 world's judge: which colours and patterns it sees on which shapes, and the background.

A v2 toy concept is a shape with a pattern and two colours ("a magenta and white striped
diamond"). The judge answers everything a caption or a concept asks:
- colour-shape pairs (11 x 8): some object of that shape shows that colour;
- pattern-shape pairs (5 x 8): some object of that shape has that pattern;
- the background (softmax over 4).
A concept is recognised in an image when both its colours and its pattern are found on its
shape (`Predictions.has_identity`).

Why not v1's design (global average pool, one linear head over colour-shape pairs): a pooled
vector must bind each colour to its shape for two objects at once, and on the v2 world it
learned slowly (exact-set colour-shape accuracy 0.58 after ~2,500 steps of 64; 0.00 after 500).
Here the binding is local: every cell of a 12 x 12 map (4 px) says which shape it belongs to
(or none), which colours that object shows and its pattern, supervised by where the renderer put
each object; an image shows (colour, shape) when some cell is confident of both, the product of
the two probabilities, maximised over cells. The same image-level probabilities are also
trained against the image's pairs, so a stray confident cell costs what it costs the metric.
Same recipe as v1 (`compinv.toy.classifier`) otherwise: fresh renders of every combination each
step (split "all", so it judges held-out ones too), blurred and noised like generated images,
seeded by (seed, step), resumable bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from compinv.artifacts import atomic_write_text, ensure_writable_dir, load_optimizer_tensors, optimizer_tensors, save_tensors
from compinv.errors import CompinvError
from compinv.toy import world_v2
from compinv.toy.classifier import _augment, _lr, conv_features
from compinv.toy.world import BACKGROUNDS

FORMAT = "compinv-toy-classifier-v2-cells"
CONFIG_FILE, WEIGHTS_FILE, OPTIMIZER_FILE = "classifier.json", "classifier.safetensors", "optimizer.safetensors"
SHIPPED_DIR = Path(__file__).parent / "weights" / "v2"  # `compinv toy train-classifier --version 2`
CHANNELS = (32, 64, 128)
OBJECT_CELLS = 0.7  # a cell belongs to an object when its centre is within this many radii of the object's
_C, _S, _P = tuple(world_v2.COLOURS), world_v2.SHAPES, world_v2.PATTERNS
HEADS = (len(_C) * len(_S), len(_P) * len(_S), len(BACKGROUNDS))
_CELL_OUTPUTS = (len(_S) + 1, len(_C), len(_P))  # shape or none, colours shown, pattern


class PatternClassifier(nn.Module):
    """v1's conv trunk down to 12 x 12, two dilated 3x3 convs so each cell sees a whole object
    (receptive field ~60 px), then a 1x1 conv into each cell's outputs; the background from the
    pooled trunk."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        width = channels[-1]
        context = [m for _ in range(2) for m in (nn.Conv2d(width, width, 3, padding=2, dilation=2, bias=False),
                                                  nn.BatchNorm2d(width), nn.ReLU())]
        self.features = nn.Sequential(*conv_features(channels), *context)
        self.cells = nn.Conv2d(width, sum(_CELL_OUTPUTS), 1)
        self.background = nn.Linear(width, HEADS[2])
        self.channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, 3, 48, 48] in [-1, 1] -> per-cell shape (9, last: none), colour and pattern
        logits [N, K, G, G], and background logits [N, 4]."""
        features = self.features(x)
        shape, colour, pattern = self.cells(features).split(_CELL_OUTPUTS, dim=1)
        return shape, colour, pattern, self.background(features.mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> Predictions:
        """uint8 [N, 48, 48, 3] or float in [0, 1] (diffusers' output_type="np")."""
        x = _model_input(images)
        was_training = self.training
        self.eval()
        outs = [image_probabilities(*self(chunk)) for chunk in x.split(batch_size)]
        self.train(was_training)
        pairs, patterns, backgrounds = (torch.cat([o[i] for o in outs]) for i in range(3))
        return Predictions(pairs.numpy(), patterns.numpy(), backgrounds.numpy())


def image_probabilities(shape: torch.Tensor, colour: torch.Tensor, pattern: torch.Tensor,
                        background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: P(colour on shape) [N, 11, 8] and P(pattern on shape) [N, 5, 8], the best
    cell's product of the two, and the background's softmax [N, 4]."""
    on_shape = shape.softmax(dim=1)[:, :-1].flatten(2)  # [N, 8, cells]
    pairs = (colour.sigmoid().flatten(2)[:, :, None] * on_shape[:, None]).amax(dim=3)
    patterns = (pattern.softmax(dim=1).flatten(2)[:, :, None] * on_shape[:, None]).amax(dim=3)
    return pairs, patterns, background.softmax(dim=1)


@dataclass(frozen=True)
class Predictions:
    pair_probs: np.ndarray  # [N, colour, shape]
    pattern_probs: np.ndarray  # [N, pattern, shape]
    background_probs: np.ndarray  # [N, background]

    def pairs(self, threshold: float = 0.5) -> list[frozenset[tuple[str, str]]]:
        return [frozenset((_C[c], _S[s]) for c, s in zip(*np.nonzero(p > threshold))) for p in self.pair_probs]

    def pattern_pairs(self, threshold: float = 0.5) -> list[frozenset[tuple[str, str]]]:
        return [frozenset((_P[c], _S[s]) for c, s in zip(*np.nonzero(p > threshold))) for p in self.pattern_probs]

    def backgrounds(self) -> list[str]:
        return [BACKGROUNDS[i] for i in self.background_probs.argmax(axis=1)]

    def has_identity(self, identity: world_v2.Identity, threshold: float = 0.5) -> np.ndarray:
        """bool [N]: both colours and the pattern found on the identity's shape."""
        colour, colour2, pattern, shape = identity
        s = _S.index(shape)
        return ((self.pair_probs[:, _C.index(colour), s] > threshold)
                & (self.pair_probs[:, _C.index(colour2), s] > threshold)
                & (self.pattern_probs[:, _P.index(pattern), s] > threshold))


def _model_input(images: np.ndarray) -> torch.Tensor:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != (48, 48, 3):
        raise CompinvError(f"`images` must be [N, 48, 48, 3], got {getattr(images, 'shape', type(images))}")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(scale).permute(0, 3, 1, 2) * 2 - 1


def targets(scenes: list[world_v2.SceneV2]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-hot colour-shape [N, 88] and pattern-shape [N, 40] targets, background indices [N]."""
    pairs = torch.zeros(len(scenes), HEADS[0])
    patterns = torch.zeros(len(scenes), HEADS[1])
    for i, scene in enumerate(scenes):
        for colour, shape in scene.pairs:
            pairs[i, _C.index(colour) * len(_S) + _S.index(shape)] = 1
        for pattern, shape in scene.pattern_pairs:
            patterns[i, _P.index(pattern) * len(_S) + _S.index(shape)] = 1
    return pairs, patterns, torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])


def cell_targets(scenes: list[world_v2.SceneV2], grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell of a grid x grid map: shape index (len(SHAPES): no object) [N, G, G], the
    object's colours multi-hot [N, 11, G, G] and its pattern index (-100: no object) [N, G, G].
    A cell is an object's when its centre lies within OBJECT_CELLS radii of the object's centre,
    or holds that centre (objects never touch, so no cell has two)."""
    centres = (np.arange(grid) + 0.5) * world_v2.IMAGE_SIZE / grid
    shape = torch.full((len(scenes), grid, grid), len(_S), dtype=torch.long)
    colours = torch.zeros(len(scenes), len(_C), grid, grid)
    pattern = torch.full((len(scenes), grid, grid), -100, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            near = np.hypot(centres[None, :] - obj.x, centres[:, None] - obj.y) <= OBJECT_CELLS * obj.radius
            near[min(int(obj.y * grid / world_v2.IMAGE_SIZE), grid - 1),
                 min(int(obj.x * grid / world_v2.IMAGE_SIZE), grid - 1)] = True
            cells = torch.from_numpy(near)
            shape[i][cells] = _S.index(obj.shape)
            pattern[i][cells] = _P.index(obj.pattern)
            for name in {obj.colour, obj.colour2}:
                colours[i, _C.index(name)][cells] = 1
    return shape, colours, pattern


def loss_of(model: PatternClassifier, x: torch.Tensor, scenes: list[world_v2.SceneV2]) -> torch.Tensor:
    """Per-cell losses (shape cross-entropy everywhere; colours' BCE and the pattern's
    cross-entropy on object cells) plus the image-level BCE of what `predict` reports, summed
    over outputs and averaged over images, plus the background's cross-entropy."""
    shape_logits, colour_logits, pattern_logits, bg_logits = model(x)
    shape_t, colour_t, pattern_t = cell_targets(scenes, shape_logits.shape[-1])
    on_object = (shape_t < len(_S)).unsqueeze(1).float()
    cells = (F.cross_entropy(shape_logits, shape_t)
             + (F.binary_cross_entropy_with_logits(colour_logits, colour_t, reduction="none") * on_object).sum()
             / on_object.sum().clamp_min(1)
             + F.cross_entropy(pattern_logits, pattern_t, ignore_index=-100))
    pair_t, pattern_pair_t, bg_t = targets(scenes)
    pairs, patterns, _ = image_probabilities(shape_logits, colour_logits, pattern_logits, bg_logits)
    eps = 1e-6
    image = (F.binary_cross_entropy(pairs.flatten(1).clamp(eps, 1 - eps), pair_t, reduction="sum")
             + F.binary_cross_entropy(patterns.flatten(1).clamp(eps, 1 - eps), pattern_pair_t, reduction="sum")
             ) / len(x)
    return cells + image + F.cross_entropy(bg_logits, bg_t)


def train_pattern_classifier(out: str | Path, steps: int = 4000, batch_size: int = 128, seed: int = 0,
                             lr: float = 3e-3, resume: bool = False, checkpoint_every: int = 250,
                             progress: bool = True) -> int:
    """Train (or continue) the classifier in `out`; returns the steps done."""
    if steps < 1 or batch_size < 1:
        raise CompinvError(f"`steps` and `batch_size` must be positive (got {steps}, {batch_size})")
    out = ensure_writable_dir(out, "out")
    settings = {"batch_size": batch_size, "seed": seed, "lr": lr}
    torch.manual_seed(seed)
    model = PatternClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    done = _restore(out, model, opt, settings) if resume else _check_fresh(out)
    bar = tqdm(total=steps, initial=done, desc="classifier v2", disable=not progress, dynamic_ncols=True)
    model.train()
    for step in range(done, steps):
        scenes = world_v2.sample_scenes(batch_size, "all", (seed, step))
        x = _augment(_model_input(world_v2.render(scenes)), torch.Generator().manual_seed(seed * 7919 + step))
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = loss_of(model, x, scenes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save(out, model, opt, settings, step + 1)
    bar.close()
    _save(out, model, opt, settings, max(done, steps))
    return max(done, steps)


def _check_fresh(out: Path) -> int:
    if (out / CONFIG_FILE).exists():
        raise CompinvError(f"`out` {out} already holds a classifier; pass resume=True or choose a new folder")
    return 0


def _restore(out: Path, model: PatternClassifier, opt: torch.optim.Optimizer, settings: dict) -> int:
    if not (out / CONFIG_FILE).exists():
        return 0
    config = json.loads((out / CONFIG_FILE).read_text())
    changed = [f"{k}={config.get(k)!r}" for k, v in settings.items() if config.get(k) != v]
    if config.get("format") != FORMAT or changed:
        raise CompinvError(f"resume: {out} was trained with {', '.join(changed) or 'another format'}; "
                           "pass the same settings")
    model.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    load_optimizer_tensors(opt, load_file(str(out / OPTIMIZER_FILE)))
    return int(config["trained_steps"])


def _save(out: Path, model: PatternClassifier, opt: torch.optim.Optimizer, settings: dict, step: int) -> None:
    save_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    save_tensors(optimizer_tensors(opt), out / OPTIMIZER_FILE)
    config = {"format": FORMAT, "channels": list(model.channels), "colours": list(_C), "shapes": list(_S),
              "patterns": list(_P), "backgrounds": list(BACKGROUNDS), **settings, "trained_steps": step}
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2))


def record_metrics(folder: str | Path, metrics: dict[str, float], renders: int) -> None:
    """Keep a trained classifier's held-out scores in its classifier.json (as v1 does)."""
    config_path = Path(folder) / CONFIG_FILE
    config = json.loads(config_path.read_text())
    atomic_write_text(config_path, json.dumps({**config, "metrics": metrics, "eval_renders": renders}, indent=2))


def load_pattern_classifier(folder: str | Path | None = None) -> PatternClassifier:
    """A trained v2 classifier in eval mode; no folder: the shipped one."""
    folder = SHIPPED_DIR if folder is None else folder
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise CompinvError(f"{folder} holds no {CONFIG_FILE}; train one with "
                           "`compinv toy train-classifier --version 2`")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT or config.get("patterns") != list(_P) or config.get("colours") != list(_C):
        raise CompinvError(f"{config_path} is not a classifier for this version of the v2 world")
    model = PatternClassifier(tuple(config["channels"]))
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS_FILE)))
    return model.eval()
