"""A learned layout distribution: the official `Layout_Predictor`'s shape, for N phrases.

The official repository ships an unused predictor: the frozen text encoder's 77 x D output ->
Linear(D, 64) -> GELU -> flatten (77 * 64) -> Linear(4928, 8), two boxes. `LayoutPredictor`
keeps that shape and outputs, for each of `max_phrases` slots (the phrases in prompt order),
a diagonal Gaussian over u = logit(centre x, centre y, width, height): 8 numbers per slot.
Sampling u = mean + temperature * std * noise gives each image its own layout; temperature 0
is the mean (the most typical layout). It reads the *anchor* prompt (concept tokens replaced by
their anchor words), the prompt its training layouts were harvested from.

Saved as `layout_model.safetensors` + `layout_model.json` (shape, the text encoder's width,
what it was trained on). Training lives in `compinv.layout_training`; this module only loads
and samples, so generation imports no training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from compinv.artifacts import save_tensors
from compinv.errors import CompinvError
from compinv.spatial.layout import Box

WEIGHTS_FILE, CONFIG_FILE, FORMAT = "layout_model.safetensors", "layout_model.json", "compinv-layout-model"
SHIPPED = {"toy": Path(__file__).resolve().parent.parent / "toy" / "weights" / "layout"}
_MIN_SIDE, _EDGE = 0.05, 1e-3


class LayoutPredictor(nn.Module):
    """Text encoding [B, L, D] -> (mean, log_std), each [B, max_phrases, 4] in logit space."""

    def __init__(self, text_dim: int, max_phrases: int, hidden: int = 64, length: int = 77):
        super().__init__()
        self.text_dim, self.max_phrases, self.hidden, self.length = text_dim, max_phrases, hidden, length
        self.project = nn.Linear(text_dim, hidden)
        self.head = nn.Linear(length * hidden, max_phrases * 8)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(nn.functional.gelu(self.project(text)).flatten(1))
        mean, log_std = out.unflatten(1, (self.max_phrases, 2, 4)).unbind(2)
        return mean, log_std.clamp(-6.0, 2.0)

    def config(self) -> dict:
        return {"format": FORMAT, "text_dim": self.text_dim, "max_phrases": self.max_phrases,
                "hidden": self.hidden, "length": self.length}

    def check(self, text_dim: int, num_phrases: int) -> None:
        """One clear error for a model of another text encoder, or too many phrases."""
        if text_dim != self.text_dim:
            raise CompinvError(f"`layout_model` was trained for a text encoder of width {self.text_dim}; "
                               f"this pipeline's has width {text_dim}. Train one for this model with "
                               "`compinv train layout --model MODEL`")
        if num_phrases > self.max_phrases:
            raise CompinvError(f"`layout_model` places at most {self.max_phrases} phrases; {num_phrases} "
                               "were given. Use fewer phrases, --layout anchor, or a model trained "
                               "with a larger --max-phrases")

    @torch.no_grad()
    def sample(self, text: torch.Tensor, num_phrases: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> list[list[Box]]:
        """One box per phrase slot for each prompt encoding in `text`."""
        mean, log_std = self(text.float())
        noise = torch.randn(mean.shape, generator=generator)
        u = mean + temperature * log_std.exp() * noise.to(mean)
        return [[params_to_box(u[b, k]) for k in range(num_phrases)] for b in range(len(u))]


def params_to_box(u: torch.Tensor) -> Box:
    """logit(cx, cy, w, h) -> (x0, y0, x1, y1) inside the image, at least _MIN_SIDE per side."""
    cx, cy, w, h = torch.sigmoid(u.double()).tolist()
    box = []
    for centre, side in ((cx, w), (cy, h)):
        side = min(max(side, _MIN_SIDE), 1.0)
        lo = min(max(centre - side / 2, 0.0), 1.0 - side)
        box.append((lo, lo + side))
    (x0, x1), (y0, y1) = box
    return (x0, y0, x1, y1)


def box_to_params(box: Box) -> torch.Tensor:
    """(x0, y0, x1, y1) -> logit(cx, cy, w, h), the space the Gaussian lives in."""
    x0, y0, x1, y1 = box
    values = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=torch.float32)
    return torch.logit(values.clamp(_EDGE, 1 - _EDGE))


def save_layout_model(model: LayoutPredictor, folder: Path, extra: dict) -> None:
    """Write the weights and the JSON config into `folder` (an existing, staged folder)."""
    save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({**model.config(), **extra}, indent=2))


def load_layout_model(name_or_path: str | Path | LayoutPredictor) -> LayoutPredictor:
    """A shipped model by name ("toy"), or a folder written by `compinv train layout`."""
    if isinstance(name_or_path, LayoutPredictor):
        return name_or_path
    folder = SHIPPED.get(str(name_or_path), Path(name_or_path))
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CompinvError(f"`layout_model` {name_or_path}: no {CONFIG_FILE} and {WEIGHTS_FILE} there; "
                           f"pass a folder from `compinv train layout` or one of: {', '.join(SHIPPED)}")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise CompinvError(f"`layout_model` {config_path}: not a compinv layout model")
    model = LayoutPredictor(config["text_dim"], config["max_phrases"], config["hidden"], config["length"])
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except RuntimeError as exc:
        raise CompinvError(f"`layout_model` {folder}: weights do not match its config ({exc})") from exc
    return model.eval().requires_grad_(False)
