"""`compinv train layout`: fit a layout distribution to layouts the model itself proposes.

No external data: for each prompt (a file with the phrases in [brackets], or `auto`), the
pipeline proposes boxes as `layout="anchor"` does (compinv.spatial.propose) from several
initial noises, so one prompt yields a spread of plausible layouts. A `LayoutPredictor` then
fits a diagonal Gaussian per phrase slot to them by maximum likelihood, in logit space.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compinv.artifacts import staged_folder
from compinv.errors import CompinvError
from compinv.spatial.layout_model import LayoutPredictor, box_to_params, save_layout_model
from compinv.spatial.options import LayoutTrainConfig

_PHRASE = re.compile(r"\[([^\[\]]+)\]")
# Pairs of these COCO class names make the `auto` prompts for models other than the toy model.
COCO_NAMES = ("person", "bicycle", "car", "motorcycle", "bus", "truck", "boat", "bench", "bird",
              "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
              "backpack", "umbrella", "handbag", "suitcase", "frisbee", "kite", "bottle", "cup",
              "bowl", "banana", "apple", "orange", "broccoli", "pizza", "cake", "chair", "couch",
              "bed", "laptop", "clock", "vase", "teddy bear")


def read_prompts(path: str | Path) -> list[tuple[str, list[str]]]:
    """(prompt without brackets, its bracketed phrases) for each non-empty line of `path`."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        phrases = [p.strip() for p in _PHRASE.findall(line)]
        if not phrases:
            raise CompinvError(f"`prompts` {path} line {number}: mark the phrases to place in "
                               f"[brackets], e.g. 'a [cat] and a [dog]'")
        items.append((" ".join(_PHRASE.sub(lambda m: m.group(1), line).split()), phrases))
    if not items:
        raise CompinvError(f"`prompts` {path}: no prompts in the file")
    return items


def auto_prompts(toy: bool, n: int, seed: int) -> list[tuple[str, list[str]]]:
    """Toy-world captions (for the toy model) or 'a X and a Y' over COCO names."""
    if toy:
        from compinv.toy.world import caption, sample_scenes

        scenes = [s for s in sample_scenes(4 * n, "all", seed) if len(s.objects) == 2][:n]
        return [(caption(s), [f"{o.colour} {o.shape}" for o in s.objects]) for s in scenes]
    pairs = list(itertools.permutations(COCO_NAMES, 2))
    random.Random(seed).shuffle(pairs)
    return [(f"a photo of a {a} and a {b}", [a, b]) for a, b in pairs[:n]]


def harvest(pipe, items: list[tuple[str, list[str]]], cfg: LayoutTrainConfig) -> list[dict]:
    """Proposed layouts, `samples_per_prompt` per prompt, each from its own noise seed."""
    from compinv.spatial.options import GuidanceConfig

    guidance = GuidanceConfig(guided_steps=0, proposal_steps=cfg.proposal_steps)
    jobs = [(prompt, phrases, cfg.seed * 1_000_003 + k * len(items) + i)
            for k in range(cfg.samples_per_prompt) for i, (prompt, phrases) in enumerate(items)]
    records = []
    for start in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[start : start + cfg.batch_size]
        layouts = pipe.propose_layouts(
            [j[0] for j in chunk], [j[1] for j in chunk], num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution,
            generator=[torch.Generator().manual_seed(j[2]) for j in chunk], guidance=guidance)
        records += [{"prompt": p, "seed": seed, "layout": [[ph, list(b[0])] for ph, b in layout]}
                    for (p, _, seed), layout in zip(chunk, layouts)]
    return records


def fit(model: LayoutPredictor, text: torch.Tensor, params: torch.Tensor, present: torch.Tensor,
        epochs: int, lr: float) -> list[float]:
    """Maximum-likelihood fit of the per-slot Gaussians; returns the loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    for _ in range(epochs):
        mean, log_std = model(text)
        nll = (0.5 * ((params - mean) / log_std.exp()) ** 2 + log_std).sum(-1)  # [N, slots]
        loss = (nll * present).sum() / present.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def train_layout_model(config: LayoutTrainConfig) -> Path:
    """Harvest layouts with the model, fit a LayoutPredictor, write it to `out` atomically."""
    from compinv.models import load_pipeline
    from compinv.pipeline import CompositionalStableDiffusionPipeline, use_scheduler
    from compinv.toy.model import SHIPPED_MODEL_DIR

    cfg = config.resolved()
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompinvError(f"`out` {out} already exists and is not empty; choose a new folder")
    toy = cfg.model == "toy" or Path(cfg.model).resolve() == SHIPPED_MODEL_DIR.resolve()
    model_dir = SHIPPED_MODEL_DIR if cfg.model == "toy" else Path(cfg.model)
    items = read_prompts(cfg.prompts) if cfg.prompts != "auto" else auto_prompts(toy, cfg.num_prompts, cfg.seed)
    too_many = [p for p, ph in items if len(ph) > cfg.max_phrases]
    if too_many:
        raise CompinvError(f"`prompts`: {too_many[0]!r} has more phrases than `max_phrases` "
                           f"({cfg.max_phrases}); raise it or shorten the prompt")
    started = time.perf_counter()
    pipe = CompositionalStableDiffusionPipeline.from_pipe(load_pipeline(model_dir))
    pipe.set_progress_bar_config(disable=True)
    use_scheduler(pipe, cfg.scheduler)
    records = harvest(pipe, items, cfg)
    harvest_seconds = time.perf_counter() - started
    texts = [r["prompt"] for r in records]
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    params = torch.zeros(len(records), cfg.max_phrases, 4)
    present = torch.zeros(len(records), cfg.max_phrases)
    for n, record in enumerate(records):
        lowered = record["prompt"].lower()
        ordered = sorted(record["layout"], key=lambda item: lowered.find(item[0].lower()))
        for k, (_, box) in enumerate(ordered):
            params[n, k], present[n, k] = box_to_params(tuple(box)), 1.0
    torch.manual_seed(cfg.seed)
    model = LayoutPredictor(text.shape[-1], cfg.max_phrases, length=text.shape[1])
    history = fit(model, text, params, present, cfg.epochs, cfg.lr)
    extra = {"trained_on": str(cfg.model), "prompts": len(items), "layouts": len(records),
             "final_nll": history[-1], "harvest_seconds": harvest_seconds,
             "seconds": time.perf_counter() - started, "settings": asdict(cfg)}
    with staged_folder(out) as staging:
        save_layout_model(model, staging, extra)
        (staging / "harvested_layouts.json").write_text(json.dumps(records))
    return out
