"""Cost of semantic inversion: time per Textual Inversion step with the anchor loss vs without.

Both variants run in the same process on the same model and batch; their steps are interleaved
(A, B, B, A, ...) so machine load drifts and cache effects hit both alike, and the median step time is compared.
Target: anchor / no-anchor <= 1.02. Writes benchmarks/results/train.json.

    python benchmarks/bench_train.py [--sizes tiny mid] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from compinv.methods.textual_inversion import TrainConfig
from compinv.training import prepare
from compinv.models import MODEL_SIZES, save_tiny_model
from compinv.versions import library_versions

RESULTS = Path(__file__).parent / "results" / "train.json"


def _images(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def bench_size(size: str, steps: int, workdir: Path) -> dict:
    resolution = {"tiny": 64, "mid": 256}[size]
    model = save_tiny_model(workdir / f"model-{size}", size=size)
    images = _images(workdir / f"images-{size}", resolution)
    trainers = {}
    for name, extra in {"no_anchor": {"no_anchor": True}, "anchor": {}}.items():
        cfg = TrainConfig(model=str(model), images=str(images), token="<bench>", class_word="cat",
                          steps=steps, batch_size=2, grad_accum=1, resolution=resolution,
                          out=str(workdir / f"run-{size}-{name}"), checkpoint_every=0,
                          save_every=0, validation_every=0, **extra)
        trainers[name] = prepare(cfg.resolved(), Path(cfg.out))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for i in range(steps + 2):
        for name in names if i % 2 else names[::-1]:  # alternate who goes first
            trainer = trainers[name]
            start = time.perf_counter()
            trainer.step()
            if i >= 2:  # the first steps pay for lazy initialisation
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": size,
        "unet_channels": list(MODEL_SIZES[size]["unet_channels"]),
        "resolution": resolution,
        "batch_size": 2,
        "steps_timed": steps,
        "median_step_s_no_anchor": median["no_anchor"],
        "median_step_s_anchor": median["anchor"],
        "ratio_anchor_over_no_anchor": median["anchor"] / median["no_anchor"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(MODEL_SIZES))
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_size(size, args.steps, Path(tmp)) for size in args.sizes]
    print(f"\n{'model':<6}{'res':>5}{'no anchor s/step':>18}{'anchor s/step':>15}{'ratio':>8}")
    for r in rows:
        print(f"{r['model']:<6}{r['resolution']:>5}{r['median_step_s_no_anchor']:>18.4f}"
              f"{r['median_step_s_anchor']:>15.4f}{r['ratio_anchor_over_no_anchor']:>8.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "ti_step_anchor_vs_no_anchor", "target_ratio": 1.02,
                                   "results": rows, "versions": library_versions()}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
