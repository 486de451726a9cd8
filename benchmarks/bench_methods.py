"""Cost of semantic inversion per method: step time with the anchor loss vs without, and peak memory.

For each method (Textual Inversion, Custom Diffusion, DreamBooth, DreamBooth-LoRA) a child
process builds both variants on the same model and data and interleaves their steps (A, B, B,
A, ...), so machine-load drift hits both alike. Each anchor step is compared with the no-anchor
step next to it; target: median of these paired ratios <= 1.02. On a shared CPU that ratio
carries a few per cent of noise, so the anchor's own operations are also timed alone
(`ratio_from_anchor_ops` = 1 + their time / the no-anchor step). The child's peak resident
memory (both variants loaded) is the memory figure: a CPU has no per-allocation peak counter
like CUDA's. Writes benchmarks/results/methods.json.

With `--baseline REV` every child also runs on the code of git revision REV (its own copy of
this script, in a temporary worktree), alternating which goes first, and each row gets the
ratio of this tree's step time to REV's (`ratio_vs_baseline_*`): the check that a refactor
made no method slower.

    python benchmarks/bench_methods.py [--sizes tiny mid] [--steps 24] [--methods ti cd db lora]
                                       [--baseline REV]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results" / "methods.json"
METHODS = ("ti", "cd", "db", "lora")
RESOLUTION = {"tiny": 64, "mid": 256}


def _images(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


# The variants: no anchor loss, the official single class-word anchor, and the paper's sparse
# attractor over 1,000 anchors (the words nearest the init word).
VARIANTS = {"no_anchor": {"no_anchor": True}, "anchor": {},
            "anchors_1000": {"anchor_vocabulary": "nearest:1000"}}


def _trainer(method: str, model: Path, images: Path, out: Path, resolution: int, variant: str):
    """A ready Trainer of `method`; batch 2 for every method so the steps are comparable."""
    from compinv.methods import METHODS
    from compinv.training import prepare

    common = dict(model=str(model), images=str(images), token="<bench>", class_word="cat",
                  init_word="dog", steps=1000, batch_size=2, grad_accum=1, resolution=resolution,
                  out=str(out), checkpoint_every=0, save_every=0, validation_every=0,
                  **VARIANTS[variant])
    name = {"ti": "textual-inversion", "cd": "custom-diffusion"}.get(method, "dreambooth")
    if method in ("db", "lora"):
        common["lora"] = method == "lora"
    return prepare(METHODS[name].config_class(**common).resolved(), out)


def _anchor_ops_s(trainer, reps: int = 20) -> float:
    """Seconds of what the anchor loss adds to one step, timed alone (no machine-load noise).

    That is solving the attractor's weights, building the reference prompt and the MSE with its
    backward into the prompt embeddings; the embedding-table backward is shared with the
    reconstruction loss.
    """
    from compinv.semantic import anchor_loss, input_embeddings

    batch = trainer.dataset.batch([0, 1])
    encoder = trainer.method.text_encoder
    table = encoder.get_input_embeddings().weight.detach()
    embedded = input_embeddings(encoder, batch.input_ids).detach().requires_grad_(True)
    start = time.perf_counter()
    for _ in range(reps):
        reference = trainer.attractor.reference(embedded, batch.input_ids, table)
        anchor_loss(embedded, reference).backward()
    return (time.perf_counter() - start) / reps


def bench_one(method: str, size: str, steps: int) -> dict:
    """Runs in the child process: time the variants' steps, report the medians and peak RSS."""
    from compinv.models import save_tiny_model

    resolution = RESOLUTION[size]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "model", size=size)
        images = _images(tmp / "images", resolution)
        trainers = {name: _trainer(method, model, images, tmp / name, resolution, name)
                    for name in VARIANTS}
        times: dict[str, list[float]] = {name: [] for name in trainers}
        names = list(trainers)
        for i in range(steps + 2):
            for name in names if i % 2 else names[::-1]:
                start = time.perf_counter()
                trainers[name].step()
                if i >= 2:  # the first steps pay for lazy initialisation
                    times[name].append(time.perf_counter() - start)
        anchor_ops = {name: _anchor_ops_s(trainers[name]) for name in ("anchor", "anchors_1000")}
    median = {name: statistics.median(t) for name, t in times.items()}
    # Each anchor step is paired with the no-anchor step next to it (same machine load), so the
    # median of the pairs' ratios is steadier on a shared CPU than the ratio of the medians.
    paired = {name: statistics.median(a / b for a, b in zip(times[name], times["no_anchor"]))
              for name in anchor_ops}
    return {
        "method": method, "model": size, "resolution": resolution, "batch_size": 2,
        "steps_timed": steps,
        "median_step_s_no_anchor": median["no_anchor"],
        "median_step_s_anchor": median["anchor"],
        "median_step_s_anchors_1000": median["anchors_1000"],
        "ratio_of_medians": median["anchor"] / median["no_anchor"],
        "ratio_anchor_over_no_anchor": paired["anchor"],
        "ratio_anchors_1000_over_no_anchor": paired["anchors_1000"],
        "anchor_ops_s": anchor_ops["anchor"],
        "anchor_ops_s_1000": anchor_ops["anchors_1000"],
        "ratio_from_anchor_ops": 1 + anchor_ops["anchor"] / median["no_anchor"],
        "ratio_from_anchor_ops_1000": 1 + anchor_ops["anchors_1000"] / median["no_anchor"],
        "peak_rss_mib_all_variants": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child(script: Path, method: str, size: str, steps: int, src: Path | None = None) -> dict:
    """One measurement in a fresh process (so peak memory is the method's own)."""
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    done = subprocess.run([sys.executable, str(script), "--child", method, size, "--steps", str(steps)],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _baseline_tree(rev: str | None):
    """A temporary git worktree of `rev` (None: no baseline)."""
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)


def _row(method: str, size: str, steps: int, baseline: Path | None, baseline_first: bool) -> dict:
    """This tree's measurement, with the baseline's step times and the ratios when one is given."""
    if baseline is None:
        return _child(Path(__file__), method, size, steps)
    before = after = None
    for side in (("baseline", "current") if baseline_first else ("current", "baseline")):
        if side == "current":
            after = _child(Path(__file__), method, size, steps)
        else:
            before = _child(baseline / "benchmarks" / "bench_methods.py", method, size, steps,
                            src=baseline / "src")
    for key in ("no_anchor", "anchor"):
        after[f"baseline_median_step_s_{key}"] = before[f"median_step_s_{key}"]
        after[f"ratio_vs_baseline_{key}"] = after[f"median_step_s_{key}"] / before[f"median_step_s_{key}"]
    return after


def _print(r: dict) -> None:
    versus = (f"{r['ratio_vs_baseline_no_anchor']:>8.3f}{r['ratio_vs_baseline_anchor']:>8.3f}"
              if "ratio_vs_baseline_anchor" in r else "")
    print(f"{r['method']:<5}{r['model']:<6}{r['resolution']:>5}"
          f"{r['median_step_s_no_anchor']:>10.4f}{r['median_step_s_anchor']:>10.4f}"
          f"{r['ratio_anchor_over_no_anchor']:>8.3f}{r['ratio_from_anchor_ops']:>8.4f}"
          f"{r.get('ratio_anchors_1000_over_no_anchor', float('nan')):>8.3f}"
          f"{r.get('ratio_from_anchor_ops_1000', float('nan')):>8.4f}"
          f"{r['peak_rss_mib_all_variants']:>9.0f} MiB{versus}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(RESOLUTION))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--baseline", metavar="REV", help="also time git revision REV; report ratios")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(bench_one(args.child[0], args.child[1], args.steps)))
        return
    rows = []
    with _baseline_tree(args.baseline) as baseline:
        for size in args.sizes:
            for i, method in enumerate(args.methods):
                rows.append(_row(method, size, args.steps, baseline, baseline_first=i % 2 == 1))
                _print(rows[-1])
    from compinv.artifacts import atomic_write_text
    from compinv.versions import library_versions

    atomic_write_text(RESULTS, json.dumps({"benchmark": "method_step_anchor_vs_no_anchor",
                                   "target_ratio": 1.02, "baseline": args.baseline,
                                   "results": rows,
                                   "versions": library_versions()}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
