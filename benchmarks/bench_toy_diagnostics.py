"""The toy model's two failure signs, measured: does it read its words, and where do learned
vectors land?

1. Attention share per token position (BOS, each word by role, EOS, the padding after it),
   averaged over every cross-attention layer, head, pixel and denoising step, over held-out
   captions (one image each, 25 steps, guidance 3: the toy world's settings).
2. The toy quality metrics (`compinv toy evaluate-model`) with and without the padding
   positions blocked in cross-attention (renormalised over BOS, the words and EOS).
3. For every toy concept, a short vanilla Textual Inversion run and a semantic one (same
   budget): each learned vector's norm and nearest-word distance relative to the vocabulary,
   and the concept token's attention share in composition prompts next to its class word's.

Writes benchmarks/results/toy_diagnostics.json (or --results).

    python benchmarks/bench_toy_diagnostics.py [--model DIR] [--captions 32] [--n 400] [--ti-steps 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compinv.diagnostics import VocabularyStats, attention_shares, embedding_report
from compinv.inspection import learned_vectors
from compinv.toy.ablation import (
    GUIDANCE_SCALE,
    STEPS,
    TrainingBudget,
    evaluate_toy_model,
    learn_concept,
    pipeline_with_concept,
    token_of,
    write_concept_images,
)
from compinv.toy.classifier import load_classifier
from compinv.toy.concepts import CONCEPTS
from compinv.toy.metrics import composition_prompts, heldout_captions
from compinv.toy.model import SHIPPED_MODEL_DIR, load_toy_model
from compinv.toy.world import BACKGROUND_PHRASES, COLOURS, SHAPES, caption

RESULTS = Path(__file__).parent / "results" / "toy_diagnostics.json"
BACKGROUND_WORDS = {phrase.split()[-1] for phrase in BACKGROUND_PHRASES.values()}
QUALITY = ("background", "colours_one", "colours_two", "shape_recall", "all_right")


def word_role(token: str) -> str:
    """What a caption word is for: the words that carry the scene, or the template's glue."""
    if token in COLOURS:
        return "colour word"
    if token in SHAPES:
        return "shape word"
    if token in BACKGROUND_WORDS:
        return "background word"
    return "other word"


def position_shares(pipe, prompts: list[str], block_padding: bool = False) -> dict:
    """Mean share per kind (summed over a kind's positions, averaged over prompts) and mean
    share of one position of each kind; words also by role."""
    totals: dict[str, list[float]] = {}
    singles: dict[str, list[float]] = {}
    for prompt in prompts:
        per_prompt: dict[str, float] = {}
        for share in attention_shares(pipe, prompt, STEPS, GUIDANCE_SCALE, seeds=(0,),
                                      block_padding=block_padding):
            kinds = [share.kind] + ([word_role(share.token)] if share.kind == "word" else [])
            for kind in kinds:
                per_prompt[kind] = per_prompt.get(kind, 0.0) + share.share
                singles.setdefault(kind, []).append(share.share / len(share.positions))
        for kind, value in per_prompt.items():
            totals.setdefault(kind, []).append(value)
    return {kind: {"total": float(np.mean(totals[kind])) * len(totals[kind]) / len(prompts),
                   "per_position": float(np.mean(singles[kind]))} for kind in totals}


def concept_diagnostics(model: Path, work: Path, steps: int, prompts_per_concept: int) -> dict:
    """Vanilla vs semantic TI at `steps` steps for every toy concept."""
    images_root = write_concept_images(work / "concepts")
    budget = TrainingBudget(ti_steps=steps)
    results: dict[str, dict] = {}
    stats = None
    for concept in CONCEPTS:
        prompts = composition_prompts(concept, prompts_per_concept)
        base = pipeline_with_concept(model, None)
        stats = stats or VocabularyStats(base.tokenizer, base.text_encoder)
        class_share = _word_share(base, [p.text(concept.class_word) for p in prompts], concept.class_word)
        class_row = base.text_encoder.get_input_embeddings().weight[
            base.tokenizer(concept.class_word, add_special_tokens=False).input_ids[0]].detach()
        for semantic in (False, True):
            started = time.perf_counter()
            run = learn_concept(model, concept, images_root / concept.name, "textual-inversion", semantic,
                                work / concept.name / ("semantic" if semantic else "vanilla"), budget)
            seconds = time.perf_counter() - started
            pipe = pipeline_with_concept(model, run)
            token = token_of(concept)
            vectors = learned_vectors(pipe, [token])
            report = embedding_report(pipe.tokenizer, pipe.text_encoder, vectors, stats)[0]
            results.setdefault(concept.name, {})["semantic" if semantic else "vanilla"] = {
                **report.as_dict(),
                "norm_over_vocabulary_mean": report.norm / float(stats.norms.mean()),
                "norm_over_class_word": report.norm / float(class_row.norm()),
                "distance_to_class_word": float((vectors[token][0] - class_row).norm()),
                "nearest_over_vocabulary_median": report.nearest_distance / float(stats.neighbour.median()),
                "attention_share": _word_share(pipe, [p.text(token) for p in prompts], token),
                "train_seconds": round(seconds, 1)}
            print(f"{concept.name} {'semantic' if semantic else 'vanilla'}: norm x{results[concept.name]['semantic' if semantic else 'vanilla']['norm_over_vocabulary_mean']:.1f} "
                  f"of the vocabulary mean", flush=True)
        results[concept.name]["class_word_attention_share"] = class_share
    return {"concepts": results, "vocabulary_mean_norm": float(stats.norms.mean()),
            "vocabulary_median_neighbour_distance": float(stats.neighbour.median()), "steps": steps,
            "batch_size": budget.batch_size}


def _word_share(pipe, prompts: list[str], word: str) -> float:
    """Mean share (over prompts) of the positions whose token is `word`."""
    values = []
    for prompt in prompts:
        shares = attention_shares(pipe, prompt, STEPS, GUIDANCE_SCALE, seeds=(0,))
        values.append(sum(s.share for s in shares if s.kind == "word" and s.token.startswith(word)))
    return float(np.mean(values))


def table(summary: dict) -> str:
    lines = [f"{'position':<18}{'share (sum)':>12}{'per position':>14}{'blocked':>10}"]
    for kind, row in summary["attention"].items():
        blocked = summary["attention_blocked"].get(kind, {"total": 0.0})["total"]
        lines.append(f"{kind:<18}{row['total'] * 100:11.1f}%{row['per_position'] * 100:13.2f}%{blocked * 100:9.1f}%")
    lines += ["", f"{'metric':<14}{'plain':>8}{'blocked':>9}{'diff':>8}"]
    for key in QUALITY:
        plain, blocked = summary["quality"]["plain"][key], summary["quality"]["padding_blocked"][key]
        lines.append(f"{key:<14}{plain:8.3f}{blocked:9.3f}{blocked - plain:+8.3f}")
    if "embeddings" in summary:
        lines += ["", f"{'concept':<18}{'run':<10}{'norm/vocab':>11}{'norm pct':>9}{'near/median':>12}"
                      f"{'attn':>7}{'class attn':>11}"]
        for name, runs in summary["embeddings"]["concepts"].items():
            for kind in ("vanilla", "semantic"):
                r = runs[kind]
                lines.append(f"{name:<18}{kind:<10}{r['norm_over_vocabulary_mean']:11.1f}{r['norm_percentile']:9.1f}"
                             f"{r['nearest_over_vocabulary_median']:12.1f}{r['attention_share'] * 100:6.1f}%"
                             f"{runs['class_word_attention_share'] * 100:10.1f}%")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="toy model folder")
    parser.add_argument("--captions", type=int, default=32, help="held-out captions for the attention shares")
    parser.add_argument("--n", type=int, default=400, help="held-out captions for the quality metrics")
    parser.add_argument("--ti-steps", type=int, default=400, help="Textual Inversion steps per run (0: skip)")
    parser.add_argument("--prompts", type=int, default=4, help="composition prompts per concept for attention")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON file to write")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    seconds = {}
    pipe = load_toy_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption(s) for s in heldout_captions(args.captions, seed=1)]
    summary: dict = {"model": args.model, "captions": args.captions, "steps": STEPS,
                     "guidance_scale": GUIDANCE_SCALE}
    summary["attention"] = position_shares(pipe, prompts)
    summary["attention_blocked"] = position_shares(pipe, prompts, block_padding=True)
    seconds["attention"] = time.perf_counter() - started
    classifier = load_classifier()
    summary["quality"] = {"plain": evaluate_toy_model(pipe, classifier, args.n),
                          "padding_blocked": evaluate_toy_model(pipe, classifier, args.n, block_padding=True)}
    seconds["quality"] = time.perf_counter() - started - seconds["attention"]
    if args.ti_steps:
        with tempfile.TemporaryDirectory(prefix="bench-diag-") as work:
            summary["embeddings"] = concept_diagnostics(Path(args.model), Path(work), args.ti_steps, args.prompts)
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    summary["total_minutes"] = round((time.perf_counter() - started) / 60, 1)
    print(table(summary))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
