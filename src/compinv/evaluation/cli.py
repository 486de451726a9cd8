"""`compinv evaluate` and `compinv benchmark`: flags -> the evaluation API -> where results went.

Flags are spelled as the Python arguments they fill, so library errors name the right flag
through `options.flag_for` (the benchmark's vanilla runs are `--concept`, as for generate).
"""

from __future__ import annotations

import argparse

from compinv.evaluation.defaults import (DEFAULT_CLIP, DEFAULT_DETECTOR, DEFAULT_DINO,
                                         DEFAULT_METRICS, METRIC_SETS, VARIANTS)


def _metric_flags(parser: argparse.ArgumentParser, default_metrics=DEFAULT_METRICS) -> None:
    parser.add_argument("--metrics", nargs="+", default=list(default_metrics), choices=METRIC_SETS,
                        help="clip: text alignment (raw cosine and CLIPScore) and CLIP-I; dino: "
                             "DINO image alignment; detector: concept inclusion; toy: the toy "
                             "world's classifier")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP hub id or local folder")
    parser.add_argument("--dino-model", default=DEFAULT_DINO,
                        help="ViT/DINO/DINOv2 hub id or local folder (e.g. facebook/dinov2-small)")
    parser.add_argument("--detector", default=DEFAULT_DETECTOR,
                        help="object detector hub id or folder; an OWL-ViT/OWLv2 one "
                             "(google/owlv2-base-patch16-ensemble) finds classes outside COCO")
    parser.add_argument("--detector-threshold", type=float, default=None,
                        help="detection score threshold (default: 0.8 for DETR as officially, 0.1 "
                             "for OWL-ViT/OWLv2)")
    parser.add_argument("--toy-classifier", default=None, help="toy classifier folder (default: shipped)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per metric-model batch")


def _choice(args: argparse.Namespace):
    from compinv.evaluation.evaluate import MetricChoice

    return MetricChoice(metrics=args.metrics, clip_model=args.clip_model, dino_model=args.dino_model,
                        detector=args.detector, detector_threshold=args.detector_threshold,
                        toy_classifier=args.toy_classifier, batch_size=args.batch_size)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from compinv.evaluation.evaluate import evaluate

    record = evaluate(args.out, run=args.run, images=args.images, prompts=args.prompts,
                      class_word=args.class_word, references=args.references, objects=args.objects,
                      choice=_choice(args), baseline=args.baseline, report=args.report)
    print(_summary_lines(record))
    print(f"wrote evaluation.csv, evaluation.json{' and report.html' if args.report else ''} to {args.out}")


def _summary_lines(record: dict) -> str:
    columns = record["columns"]
    lines = ["variant".ljust(16) + "".join(c.rjust(16) for c in columns)]
    for v in record["per_variant"]:
        cells = "".join(_cell(v[c]).rjust(16) for c in columns)
        lines.append(v["variant"][:15].ljust(16) + cells)
    return "\n".join(lines)


def _cell(stat: dict) -> str:
    """mean±ci, the mean alone for one image, '-' for nothing scored (None or NaN)."""
    mean, ci = stat["mean"], stat["ci"]
    if mean is None or mean != mean:
        return "-"
    return f"{mean:.3f}" if ci is None or ci != ci else f"{mean:.3f}±{ci:.3f}"


def _cmd_benchmark(args: argparse.Namespace) -> None:
    from compinv.evaluation.protocol import BenchmarkConfig, benchmark

    config = BenchmarkConfig(
        model=args.model, runs=args.concept, semantic_runs=args.semantic_runs, out=args.out,
        variants=args.variants, objects=args.objects, num_objects=args.num_objects,
        background=args.background or ["barn"], pairs=args.pairs, pairs_only=args.pairs_only,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
        scheduler=args.scheduler, height=args.height, width=args.width,
        save_attention=args.save_attention, guided_steps=args.guided_steps,
        max_iterations=args.max_iterations)
    out = benchmark(config, None if args.no_evaluate else _choice(args), report=True)
    print(f"benchmark in {out}" + ("" if args.no_evaluate else
                                   f"; open {out / 'report.html'}"))


def add_evaluation_commands(sub) -> None:
    """Add `evaluate` and `benchmark` to the top-level sub-command parsers."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    ev = sub.add_parser("evaluate", formatter_class=formatter,
                        help="score generated images: text alignment, image alignment, concept "
                             "inclusion; CSV, JSON and an HTML report")
    ev.add_argument("--run", action="append", default=[],
                    help="output folder of `compinv generate` or a benchmark job (with "
                         "generation.json); repeatable")
    ev.add_argument("--images", help="a folder of images instead (use with --prompts)")
    ev.add_argument("--prompts", help="text file: one prompt per image in file-name order, or one for all")
    ev.add_argument("--class-word", action="append", default=[],
                    help="TOKEN=WORD: the class word replacing TOKEN in the plain prompt (default: "
                         "from the concept's training run); repeatable")
    ev.add_argument("--references", action="append", default=[],
                    help="TOKEN=FOLDER: the concept's reference photos (default: its training "
                         "images); repeatable")
    ev.add_argument("--objects", action="append", default=[],
                    help="a class concept inclusion looks for in every image (e.g. backpack); repeatable")
    ev.add_argument("--baseline", help="variant the paired differences are taken against")
    ev.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    ev.add_argument("--out", required=True, help="folder for evaluation.csv/json and report.html")
    _metric_flags(ev)
    ev.set_defaults(func=_cmd_evaluate)

    bench = sub.add_parser("benchmark", formatter_class=formatter,
                           help="the paper's protocol: generate every prompt x variant "
                                "(resumable, `accelerate launch` shards it), evaluate, report")
    bench.add_argument("--model", required=True, help="base pipeline folder or hub id")
    bench.add_argument("--concept", action="append", default=[],
                       help="vanilla training run of a concept (baseline, spatial); repeatable")
    bench.add_argument("--semantic-runs", action="append", default=[],
                       help="training run of the same concept with the anchor loss (semantic, "
                            "both); repeatable")
    bench.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    bench.add_argument("--objects", default="coco",
                       help="coco (the 80 COCO classes), toy (toy-world objects), or a file of classes")
    bench.add_argument("--num-objects", type=int, default=None,
                       help="use only the first N classes (a quick look; default all; toy: 20)")
    bench.add_argument("--background", action="append", default=None,
                       help="class word of a background concept: '<class> in front of <concept>' "
                            "(default: barn); repeatable")
    bench.add_argument("--pairs", action="store_true", help="also every two concepts, both orders")
    bench.add_argument("--pairs-only", action="store_true",
                       help="with --pairs: only the two-concept prompts (their class words are "
                            "rarely COCO classes: score them with an open-vocabulary --detector)")
    bench.add_argument("--images-per-prompt", type=int, default=5)
    bench.add_argument("--seed", type=int, default=8888, help="image i of every prompt uses seed + i")
    bench.add_argument("--steps", type=int, default=50)
    bench.add_argument("--guidance-scale", type=float, default=7.5)
    bench.add_argument("--scheduler", default="lms", help="the same for every variant")
    bench.add_argument("--height", type=int, default=None)
    bench.add_argument("--width", type=int, default=None)
    bench.add_argument("--save-attention", action="store_true",
                       help="save each phrase's attention heat-map (shown in the report)")
    bench.add_argument("--guided-steps", type=int, default=10,
                       help="spatial/both: layout guidance on the first N steps (official: 10)")
    bench.add_argument("--max-iterations", type=int, default=5,
                       help="spatial/both: guidance iterations per guided step (official: 5)")
    bench.add_argument("--no-evaluate", action="store_true", help="only generate")
    bench.add_argument("--out", required=True, help="benchmark folder (rerun to resume)")
    _metric_flags(bench)
    bench.set_defaults(func=_cmd_benchmark)
