"""The toy world's CLIP: a text tower and an image tower pretrained contrastively, then frozen.

Why: Stable Diffusion's text encoder was pretrained contrastively (CLIP) and frozen while the
UNet learned on top of it. A text encoder trained jointly with the UNet (toy model v1) lets the
UNet read a pooled summary from the padding positions instead of the words (v1 gives ~76 % of
its cross-attention to the padding); models on a frozen pretrained encoder ignore the padding
(Toker et al., NAACL 2025). The "core distribution" of word embeddings the paper's semantic
inversion pulls toward is also a property of that pretrained space.

The model is transformers' own `CLIPModel` (a `CLIPTextModel` tower with the real CLIP
tokenizer, a `CLIPVisionModel` tower), trained with the symmetric InfoNCE loss of CLIP. Toy
captions repeat ("a red star on grass" can appear twice in one batch), so captions that are
equal count as positives of each other (targets spread over them), instead of being pushed
apart as false negatives. `text_encoder(model)` returns the text tower as a plain
`CLIPTextModel`, the component a stock `StableDiffusionPipeline` expects.

Batches come from a `data(batch_size, seed)` callable (uint8 images [N, H, W, 3], their
captions, and hard negatives: captions one word away from a batch caption), seeded by (seed,
step): fresh renders every step, and a resumed run draws exactly the batches an uninterrupted
one would, so it ends bit-identical. Captions are padded to the longest
in the batch: the text tower is causal, so the pooled `<|endoftext|>` state does not depend on
the padding after it, and 77 positions would cost ~4x more for the same loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    ResNetConfig,
    ResNetModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from compinv.artifacts import (
    atomic_write_text,
    ensure_writable_dir,
    load_optimizer_tensors,
    optimizer_tensors,
    save_tensors,
)
from compinv.errors import CompinvError
from compinv.models import CLIP_MAX_LENGTH, clip_tokenizer

# (images, their captions, hard negatives: extra captions that describe no image of the batch)
BatchSource = Callable[[int, tuple[int, ...]], tuple[np.ndarray, list[str], list[str]]]
FORMAT = "compinv-toy-clip-1"
WEIGHTS_FILE = "clip.safetensors"
OPTIMIZER_FILE = "clip_optimizer.safetensors"
STATE_FILE = "clip_state.json"


@dataclass(frozen=True)
class ToyClipSettings:
    """Everything that fixes a run's architecture, batches and schedule; `resume` must keep it."""

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    image_size: int = 48
    patch_size: int = 8
    text_hidden: int = 128  # also the UNet's cross_attention_dim
    text_layers: int = 3
    vision_hidden: int = 128
    vision_layers: int = 4
    heads: int = 4
    projection_dim: int = 128
    image_tower: str = "vit"  # or "resnet" (toy v2's: a ViT learned three of its eight shapes)


class ResNetImageTower(torch.nn.Module):
    """transformers' `ResNetModel` (stem + two basic stages, 48 px -> 6 x 6) in the place of
    CLIP's ViT, as OpenAI's RN50 CLIP: the ViT toy towers (8, 6 or 4 px patches) picked a scene's
    shape word among eight at chance or near it after 500 steps (docs/toy-v2.md), and only the
    text tower is kept. Returns what `CLIPModel.get_image_features` reads (`pooler_output`)."""

    def __init__(self, settings: ToyClipSettings):
        super().__init__()
        self.resnet = ResNetModel(ResNetConfig(num_channels=3, embedding_size=settings.vision_hidden // 4,
                                               hidden_sizes=[settings.vision_hidden // 2, settings.vision_hidden],
                                               depths=[1, 1], layer_type="basic"))

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        out = self.resnet(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state.flatten(2).transpose(1, 2),
                                          pooler_output=out.pooler_output.flatten(1))


def build_toy_clip(settings: ToyClipSettings) -> CLIPModel:
    """A randomly initialised toy CLIP (seeded): causal text tower + ViT or ResNet image tower."""
    if settings.image_tower not in ("vit", "resnet"):
        raise CompinvError(f"`image_tower` {settings.image_tower!r}: use 'vit' or 'resnet'")
    if settings.image_size % settings.patch_size:
        raise CompinvError(f"`image_size` {settings.image_size} must be a multiple of `patch_size` "
                           f"{settings.patch_size}")
    tokenizer = clip_tokenizer()
    torch.manual_seed(settings.seed)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=settings.text_hidden,
        intermediate_size=4 * settings.text_hidden, num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.heads, max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=settings.projection_dim)
    vision = CLIPVisionConfig(
        hidden_size=settings.vision_hidden, intermediate_size=4 * settings.vision_hidden,
        num_hidden_layers=settings.vision_layers, num_attention_heads=settings.heads,
        image_size=settings.image_size, patch_size=settings.patch_size,
        projection_dim=settings.projection_dim)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=settings.projection_dim)
    model = CLIPModel(config)
    if settings.image_tower == "resnet":
        model.vision_model = ResNetImageTower(settings)
    return model


def text_encoder(model: CLIPModel) -> CLIPTextModel:
    """The text tower as a stand-alone `CLIPTextModel` (the SD pipeline's `text_encoder`),
    frozen and in eval mode; same weights, so its states equal the tower's."""
    encoder = CLIPTextModel(model.config.text_config)
    # transformers 4 wraps the tower in `.text_model`, transformers 5 does not
    getattr(encoder, "text_model", encoder).load_state_dict(model.text_model.state_dict())
    return encoder.requires_grad_(False).eval()


# ---- the loss ----------------------------------------------------------------------------------
def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1).permute(0, 3, 1, 2)


def tokenize(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, padded to the longest caption (see the module docstring)."""
    batch = clip_tokenizer()(captions, padding="longest", truncation=True, max_length=CLIP_MAX_LENGTH,
                             return_tensors="pt")
    return batch.input_ids, batch.attention_mask


def embeddings(model: CLIPModel, images: np.ndarray, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length image and text embeddings [N, projection_dim]."""
    ids, mask = tokenize(captions)
    image = model.get_image_features(pixel_values=pixels(images))
    text = model.get_text_features(input_ids=ids, attention_mask=mask)
    # transformers 4 returns the projected tensor, transformers 5 an output whose pooler_output it is
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def same_caption(captions: list[str]) -> torch.Tensor:
    """[N, N] float: 1 where two captions are equal (each row sums to at least 1)."""
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[c] for c in captions])
    return (ids[:, None] == ids[None, :]).float()


def contrastive_loss(model: CLIPModel, images: np.ndarray, captions: list[str],
                     negatives: Sequence[str] = ()) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with equal captions as shared positives.

    `negatives` are extra captions each image must score below its own (NegCLIP, Yuksekgonul et
    al., ICLR 2023): random pairs of toy scenes differ in colours and backgrounds, so CLIP's loss
    alone is won without reading the shape words ("bag of words"), and a text tower that has not
    learned a word gives the UNet nothing to read there. They join the image -> text direction
    only (they have no image); one equal to another image's caption counts as that image's positive.
    """
    n = len(captions)
    image, text = embeddings(model, images, [*captions, *negatives])
    logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
    target = same_caption([*captions, *negatives])[:n]
    image_to_text = -(target / target.sum(dim=1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    target = target[:, :n]
    text_to_image = -(target / target.sum(dim=1, keepdim=True) * F.log_softmax(logits[:, :n].T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Top-1 retrieval among the given pairs: caption -> image and image -> caption; a pick
    is right when its caption equals the query's (duplicates are indistinguishable)."""
    was_training = model.training
    model.eval()
    image, text = embeddings(model, images, captions)
    model.train(was_training)
    same = same_caption(captions).bool()
    similarity = text @ image.T
    rows = torch.arange(len(captions))
    text_to_image = same[rows, similarity.argmax(dim=1)].float().mean()
    image_to_text = same[rows, similarity.T.argmax(dim=1)].float().mean()
    return {"text_to_image": float(text_to_image), "image_to_text": float(image_to_text),
            "chance": float(same.float().sum(dim=1).div(len(captions)).mean()), "pairs": len(captions)}


# ---- training ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyClipRun:
    model: CLIPModel
    steps: int
    seconds: float
    step_seconds: float  # mean wall time of the steps of this run


def train_toy_clip(work: str | Path, data: BatchSource, settings: ToyClipSettings = ToyClipSettings(),
                   resume: bool = False, checkpoint_every: int = 100, progress: bool = True) -> ToyClipRun:
    """Train (or, with `resume`, continue) the toy CLIP in folder `work`; step i's batch is
    `data(batch_size, (seed, i))`. Saves weights, AdamW moments and a state JSON (written last)
    every `checkpoint_every` steps and at the end."""
    from compinv.toy.model import _lr  # the toy model's schedule: 5 % warm-up, then cosine

    if min(settings.steps, settings.batch_size) < 1:
        raise CompinvError(f"`steps` and `batch_size` must be positive (got {settings.steps}, "
                           f"{settings.batch_size})")
    work = ensure_writable_dir(work, "work")
    model = build_toy_clip(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.1)
    done = _restore(work, model, optimizer, settings) if resume else _check_fresh(work)
    bar = tqdm(total=settings.steps, initial=done, desc="toy CLIP", disable=not progress, dynamic_ncols=True)
    model.train()
    started = time.perf_counter()
    for step in range(done, settings.steps):
        images, captions, negatives = data(settings.batch_size, (settings.seed, step))
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, settings.steps, settings.lr)
        loss = contrastive_loss(model, images, captions, negatives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP's cap on the temperature: logit scale <= ln(100)
            model.logit_scale.clamp_(max=float(np.log(100)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < settings.steps:
            _save(work, model, optimizer, settings, step + 1)
    bar.close()
    seconds = time.perf_counter() - started
    steps = max(done, settings.steps)
    _save(work, model, optimizer, settings, steps)
    return ToyClipRun(model.eval(), steps, seconds, seconds / max(1, settings.steps - done))


def load_toy_clip(work: str | Path) -> CLIPModel:
    """The toy CLIP saved in `work`, in eval mode."""
    work = Path(work)
    state = _read_state(work)
    model = build_toy_clip(ToyClipSettings(**state["settings"]))
    model.load_state_dict(load_file(str(work / WEIGHTS_FILE)))
    return model.eval()


def _check_fresh(work: Path) -> int:
    if (work / STATE_FILE).exists():
        raise CompinvError(f"`work` {work} already holds a toy CLIP run; pass `resume` to continue "
                           "it or choose a new folder")
    return 0


def _read_state(work: Path) -> dict:
    path = work / STATE_FILE
    if not path.is_file():
        raise CompinvError(f"`work` {work} holds no {STATE_FILE}; train the toy CLIP there first")
    state = json.loads(path.read_text())
    if state.get("format") != FORMAT:
        raise CompinvError(f"{path} is not a toy CLIP state of this version ({FORMAT})")
    return state


def _restore(work: Path, model: CLIPModel, optimizer: torch.optim.Optimizer,
             settings: ToyClipSettings) -> int:
    """Weights and AdamW moments of the last save; its settings must equal this run's."""
    if not (work / STATE_FILE).exists():
        return 0
    state = _read_state(work)
    wanted = asdict(settings)
    changed = [f"{k}={state['settings'].get(k)!r}" for k in wanted if state["settings"].get(k) != wanted[k]]
    if changed:
        raise CompinvError(f"`resume`: {work} was trained with {', '.join(changed)}; pass the same "
                           "settings to continue it (batches and schedule depend on them)")
    model.load_state_dict(load_file(str(work / WEIGHTS_FILE)))
    load_optimizer_tensors(optimizer, load_file(str(work / OPTIMIZER_FILE)))
    return int(state["step"])


def _save(work: Path, model: CLIPModel, optimizer: torch.optim.Optimizer, settings: ToyClipSettings,
          step: int) -> None:
    """Weights, then moments, then the state naming the step: a run killed between the writes
    resumes from the older state with at most one interval redone."""
    save_tensors(model.state_dict(), work / WEIGHTS_FILE)
    save_tensors(optimizer_tensors(optimizer), work / OPTIMIZER_FILE)
    atomic_write_text(work / STATE_FILE, json.dumps(
        {"format": FORMAT, "step": step, "settings": asdict(settings)}, indent=2))
