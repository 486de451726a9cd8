"""The paper's ablation on the toy world: does compositional inversion compose better?

For every toy concept, learn it with vanilla Textual Inversion and with semantic inversion (and
the same for Custom Diffusion), then generate >= 20 composition prompts ("a photo of a <concept>
and a blue square on snow") x >= 4 seeds without and with spatial inversion, and score every
image with the toy metrics of the model's world (v1: compinv.toy.metrics; v2, detected from the
model: compinv.toy.metrics_v2, with the concept's identity). A reference row uses the base model
with the concept's class word in place of the token. Each metric is reported as mean +- 95 % CI
over all images, and as the paired difference to the vanilla variant of the same method (same
prompts and seeds). Per row, the paper's diagnostics of the word standing for the concept (mean
over concepts): its norm over the vocabulary's mean row norm, its and the other object's share of
cross-attention, and (v2) how often "a photo of a <concept>" shows the concept's identity.
Spatial rows generate a whole batch of prompts in one call, each image with its own layout.
Settings are the methods' toy defaults, identical across variants: nothing is tuned to make the
method win. Writes benchmarks/results/toy_composition.json (v2: toy_v2_composition.json).

    python benchmarks/bench_toy_composition.py [--model DIR] [--prompts 20] [--seeds 4] [--methods ti cd] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
import time
from pathlib import Path

import numpy as np
import torch

from compinv.toy.ablation import (
    ANCHOR_SETS,
    TrainingBudget,
    Variant,
    compose,
    generate,
    learn_concept,
    pipeline_with_concept,
    probe_word,
    score_variant,
    token_of,
    toy_study,
    toy_version,
    variants,
)
from compinv.toy.metrics import mean_ci
from compinv.toy.model import shipped_or_folder

RESULTS = Path(__file__).parent / "results"
METHOD_NAMES = {"ti": "textual-inversion", "cd": "custom-diffusion"}
BASE = "base model, class word"


def run(model: Path, work: Path, methods: tuple[str, ...], n_prompts: int, n_seeds: int,
        steps: dict[str, int | None], anchor_sets: tuple[str, ...] = ("class",), concepts: list[str] | None = None,
        vanilla_only: bool = False, workers: int = 1) -> dict:
    """`steps`: "ti_steps" / "cd_steps" overrides of the world's default budget (None: keep it)."""
    base = pipeline_with_concept(model, None)
    study = toy_study(toy_version(base))
    budget = replace(study.budget, **{k: v for k, v in steps.items() if v is not None})
    classifier = study.classifier()
    images_root = study.write_images(work / "concepts")
    seeds = list(range(n_seeds))
    scores: dict[str, dict[str, list[np.ndarray]]] = {}
    probes: dict[str, list[dict[str, float]]] = {}
    timings: dict[str, float] = {}
    chosen = [c for c in study.concepts if concepts is None or c.name in concepts]
    rows = variants(methods, anchor_sets, vanilla_only)
    started = time.perf_counter()
    runs = train_all(model, chosen, rows, images_root, work, budget, study.image_size, workers)
    timings["train (all runs, wall clock)"] = time.perf_counter() - started
    for concept in chosen:
        prompts = study.prompts(concept, n_prompts)
        texts = [p.text(concept.class_word) for p in prompts for _ in seeds]
        images = generate(base, texts, [s for _ in prompts for s in seeds])
        _add(scores, BASE, score_variant(study, classifier, images, concept, prompts, seeds))
        probes.setdefault(BASE, []).append(probe_word(study, classifier, base, concept, concept.class_word, prompts[0]))
        for variant in rows:
            started = time.perf_counter()
            pipe = pipeline_with_concept(model, runs[concept.name, variant.training])
            images = compose(pipe, concept, prompts, seeds, variant.spatial)
            _time(timings, f"generate {variant.name}", started)
            _add(scores, variant.name, score_variant(study, classifier, images, concept, prompts, seeds))
            if not variant.spatial:  # a plain-generation probe: the same for the spatial sibling
                probes.setdefault(variant.name, []).append(
                    probe_word(study, classifier, pipe, concept, token_of(concept), prompts[0]))
            print(f"{concept.name}: {variant.name} done", flush=True)
    for variant in rows:
        if variant.spatial:
            probes[variant.name] = probes[Variant(variant.method, variant.semantic, False, variant.anchors).name]
    return {**_summarise(scores, rows, timings, study.metrics),
            "probes": {name: {k: float(np.mean([p[k] for p in per])) for k in per[0]} for name, per in probes.items()},
            "version": study.version, "budget": asdict(budget)}


def train_all(model: Path, concepts: list, rows: list[Variant], images_root: Path, work: Path,
              budget: TrainingBudget, resolution: int, workers: int) -> dict[tuple[str, tuple], Path]:
    """Every (concept, training) run the rows need, `workers` at a time, each in its own process
    with an equal share of the CPU threads.

    Why processes: a toy training step at batch 4 is partly per-operator overhead, which extra
    threads do not shorten. Measured on the 2-core machine (150-step TI on a v2 model, setup
    included): two one-thread runs side by side 33.3 s, one two-thread run 18.7 s, so 1.12x the
    throughput of running them one after another. The runs are independent and seeded, so the
    result does not depend on `workers` (up to the float rounding of the thread count).
    """
    jobs = {}
    for concept in concepts:
        for training in dict.fromkeys(v.training for v in rows):
            method, semantic, anchors = training
            out = work / concept.name / "-".join(map(str, training)).replace(" ", "")
            jobs[concept.name, training] = (model, concept, images_root / concept.name, method, semantic, out,
                                            budget, anchors, resolution)
    if workers <= 1:
        return {key: learn_concept(*args) for key, args in jobs.items()}
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is running
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        futures = {key: pool.submit(learn_concept, *args) for key, args in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def _add(scores: dict, name: str, new: dict[str, np.ndarray]) -> None:
    for metric, values in new.items():
        scores.setdefault(name, {}).setdefault(metric, []).append(values)


def _time(timings: dict[str, float], key: str, started: float) -> None:
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def _summarise(scores: dict, rows: list[Variant], timings: dict[str, float], metrics: tuple[str, ...]) -> dict:
    """Mean +- CI per row and metric, and the paired difference to the method's vanilla row."""
    flat = {name: {m: np.concatenate(v) for m, v in per.items()} for name, per in scores.items()}
    vanilla = {v.method: v.name for v in rows if not v.semantic and not v.spatial}
    table = {}
    for name, per in flat.items():
        variant = next((v for v in rows if v.name == name), None)
        baseline = flat[vanilla[variant.method]] if variant else None
        table[name] = {m: {"mean_ci": mean_ci(per[m]),
                           "diff_to_vanilla_ci": mean_ci(per[m] - baseline[m]) if baseline else None}
                       for m in metrics}
    return {"rows": table, "metrics": list(metrics), "images_per_row": len(next(iter(flat.values()))[metrics[0]]),
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


def table(summary: dict) -> str:
    metrics = summary["metrics"]
    probe_keys = list(next(iter(summary["probes"].values())))
    header = (f"{'variant':<28}" + "".join(f"{m.replace('_', ' '):>24}" for m in metrics)
              + "".join(f"{k.replace('_', ' '):>16}" for k in probe_keys))
    lines = [header, "-" * len(header)]
    for name, row in summary["rows"].items():
        cells = []
        for m in metrics:
            mean, half = row[m]["mean_ci"]
            diff = row[m]["diff_to_vanilla_ci"]
            delta = f" ({diff[0]:+.2f})" if diff and name not in ("TI", "CD") else ""
            cells.append(f"{mean:.3f}±{half:.3f}{delta}".rjust(24))
        cells += [f"{summary['probes'][name][k]:.3f}".rjust(16) for k in probe_keys]
        lines.append(f"{name:<28}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="v1", help="toy model folder, or a shipped one: v1, v2")
    parser.add_argument("--prompts", type=int, default=20, help="composition prompts per concept")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--methods", nargs="+", default=["ti", "cd"], choices=sorted(METHOD_NAMES))
    parser.add_argument("--ti-steps", type=int, default=None,
                        help="Textual Inversion steps of every concept run (default: v1 300, v2 3,000)")
    parser.add_argument("--cd-steps", type=int, default=None,
                        help="Custom Diffusion steps of every concept run (default: v1 150, v2 1,000)")
    parser.add_argument("--anchor-sets", nargs="+", default=["class"], choices=list(ANCHOR_SETS),
                        help="anchors of the semantic rows (several: one row pair each)")
    parser.add_argument("--concepts", nargs="+", default=None, help="only these toy concepts (default: all)")
    parser.add_argument("--vanilla-only", action="store_true",
                        help="only the base and vanilla rows: the disease check, run before any variant")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the concept images and every learned run here (default: a temporary folder)")
    parser.add_argument("--workers", type=int, default=2,
                        help="concept runs trained side by side, one process each (1: one after another)")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON file to write (default: results/toy_composition.json, v2: toy_v2_composition.json)")
    args = parser.parse_args()
    steps = {"ti_steps": args.ti_steps, "cd_steps": args.cd_steps}
    started = time.perf_counter()
    with contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="bench-toy-") as work:
        summary = run(shipped_or_folder(args.model), Path(work), tuple(METHOD_NAMES[m] for m in args.methods),
                      args.prompts, args.seeds, steps, tuple(args.anchor_sets), args.concepts,
                      args.vanilla_only, args.workers)
    summary.update(anchor_sets=args.anchor_sets, prompts_per_concept=args.prompts, seeds=args.seeds,
                   concepts=args.concepts or "all", vanilla_only=args.vanilla_only, workers=args.workers, model=args.model,
                   total_minutes=round((time.perf_counter() - started) / 60, 1))
    print(table(summary))
    results = args.results or RESULTS / ("toy_v2_composition.json" if summary["version"] == 2 else "toy_composition.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2))
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
