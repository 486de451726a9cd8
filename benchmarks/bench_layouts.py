"""Diversity and balance of fixed, anchor-proposed and learned layouts on the shipped toy model.

For N two-object toy captions (seeds not used to train the shipped layout model), one batched
call per layout kind, same prompts and noises:
- box diversity: per phrase slot, the mean over image pairs of 1 - IoU of the boxes used;
- centroid diversity: per phrase slot, the mean pairwise distance (in image widths) of the
  centroids of the phrase's attention map in the generated images;
- balance: each phrase's share of the two phrases' attention (first / second phrase), and the
  mean over images of min share / max share (1 = equal attention).

    python benchmarks/bench_layouts.py [--images 24] [--steps 25]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from compinv.layout_training import auto_prompts
from compinv.pipeline import CompositionalStableDiffusionPipeline
from compinv.toy.model import load_toy_model
from compinv.versions import library_versions

RESULTS = Path(__file__).parent / "results" / "layouts.json"
KINDS = {"fixed (official boxes)": "auto", "anchor-proposed": "anchor", "learned (T=1)": "learned",
         "learned (T=0.5)": "learned"}


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centroid(heat: torch.Tensor) -> tuple[float, float]:
    h, w = heat.shape
    mass = heat.clamp_min(0)
    total = float(mass.sum()) or 1.0
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    return (float((mass.sum(0) * xs).sum()) / total / w, float((mass.sum(1) * ys).sum()) / total / h)


def _pairwise(values, distance) -> float:
    pairs = list(itertools.combinations(values, 2))
    return statistics.mean(distance(a, b) for a, b in pairs) if pairs else 0.0


def measure(pipe, prompts, phrases, kind: str, temperature: float, steps: int) -> dict:
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
    extra = {"layout_model": "toy", "layout_temperature": temperature} if kind == "learned" else {}
    start = time.perf_counter()
    out = pipe(prompts, layout=kind, phrases=phrases, num_inference_steps=steps, generator=generators,
               output_type="np", return_attention=True, **extra)
    seconds = time.perf_counter() - start
    boxes = [[b[0] for _, b in layout] for layout in out.layouts]
    centroids = [[centroid(m) for m in maps] for maps in out.image_attention_maps]
    shares = [[m / sum(masses) for m in masses] for masses in out.image_attention_mass]
    slots = range(2)
    return {
        "seconds": seconds,
        "box_diversity": statistics.mean(_pairwise([b[k] for b in boxes], lambda a, b: 1 - iou(a, b))
                                         for k in slots),
        "centroid_diversity": statistics.mean(
            _pairwise([c[k] for c in centroids], lambda a, b: ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5)
            for k in slots),
        "share_first": statistics.mean(s[0] for s in shares),
        "share_second": statistics.mean(s[1] for s in shares),
        "balance": statistics.mean(min(s) / max(s) for s in shares),
        "layouts": [[list(b) for b in image] for image in boxes],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = CompositionalStableDiffusionPipeline.from_pipe(load_toy_model())
    pipe.set_progress_bar_config(disable=True)
    items = auto_prompts(True, args.images, seed=12345)
    prompts, phrases = [p for p, _ in items], [ph for _, ph in items]
    results = {}
    for name, kind in KINDS.items():
        temperature = 0.5 if "0.5" in name else 1.0
        results[name] = measure(pipe, prompts, phrases, kind, temperature, args.steps)
    rows = ["| layout | box diversity (1 - IoU) | attention-centroid diversity | share of phrase 1 / 2 "
            "| balance (min/max share) | seconds |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['box_diversity']:.3f} | {r['centroid_diversity']:.3f} | "
                    f"{r['share_first']:.3f} / {r['share_second']:.3f} | {r['balance']:.3f} | {r['seconds']:.1f} |")
    print("\n".join(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"images": args.images, "steps": args.steps, "prompts": prompts,
                                   "results": results, "versions": library_versions()}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
