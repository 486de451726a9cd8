"""`compinv evaluate`: score samples with the chosen metrics; write per-image CSV and JSON with
per-prompt and per-variant summaries (means, 95 % intervals, paired differences)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from compinv.artifacts import atomic_write_text, ensure_writable_dir
from compinv.errors import CompinvError
from compinv.evaluation.defaults import (DEFAULT_CLIP, DEFAULT_DETECTOR, DEFAULT_DINO,
                                         DEFAULT_METRICS, IMAGE_METRICS, METRIC_SETS)
from compinv.evaluation.metrics import Metric, check_inputs
from compinv.evaluation.samples import Sample
from compinv.evaluation.stats import paired_difference, summarise
from compinv.versions import library_versions

CSV_FILE, JSON_FILE = "evaluation.csv", "evaluation.json"
CHUNK = 256  # images held in memory at once


@dataclass
class MetricChoice:
    """Which metric models to run; ids or local folders."""

    metrics: Sequence[str] = DEFAULT_METRICS
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    detector: str = DEFAULT_DETECTOR
    detector_threshold: float | None = None
    toy_classifier: str | None = None
    batch_size: int = 32

    def build(self) -> list[Metric]:
        """Load the models (offline-first); unknown names are refused before any load."""
        unknown = [m for m in self.metrics if m not in METRIC_SETS]
        if unknown or not self.metrics:
            raise CompinvError(f"`metrics` {unknown[0] if unknown else 'empty'}: use one or more of "
                               f"{', '.join(METRIC_SETS)}")
        if self.detector_threshold is not None and not 0 <= self.detector_threshold <= 1:
            raise CompinvError(f"`detector_threshold` {self.detector_threshold}: must be in [0, 1]")
        built: list[Metric] = []
        for name in dict.fromkeys(self.metrics):
            if name == "clip":
                from compinv.evaluation.metrics import ClipMetrics
                built.append(ClipMetrics(self.clip_model, self.batch_size))
            elif name == "dino":
                from compinv.evaluation.metrics import DinoMetric
                built.append(DinoMetric(self.dino_model, self.batch_size))
            elif name == "detector":
                from compinv.evaluation.detection import ConceptInclusion, load_detector
                built.append(ConceptInclusion(load_detector(self.detector, self.detector_threshold)))
            else:
                from compinv.evaluation.toy import ToyMetrics
                built.append(ToyMetrics(self.toy_classifier))
        return built


@dataclass
class Evaluation:
    """Per-image rows, the metric columns and what each one means."""

    rows: list[dict]
    columns: list[str]
    descriptions: dict[str, str] = field(default_factory=dict)

    def variants(self) -> list[str]:
        return list(dict.fromkeys(r["variant"] for r in self.rows))

    def summary(self, baseline: str | None = None) -> dict:
        """Per variant and per (variant, prompt): mean, 95 % CI, n; and each variant's paired
        difference from `baseline` (default: 'baseline' if present, else the first variant)."""
        variants = self.variants()
        baseline = baseline or ("baseline" if "baseline" in variants else variants[0])
        if baseline not in variants:
            raise CompinvError(f"`baseline` {baseline!r} is not a variant of these images; use one "
                               f"of {', '.join(variants)}")
        return {
            "metrics": self.descriptions,
            "baseline": baseline,
            "per_variant": summarise(self.rows, self.columns, ["variant"]),
            "per_prompt": summarise(self.rows, self.columns, ["variant", "plain_prompt"]),
            "paired_differences": [
                {"variant": v, "baseline": baseline,
                 **{m: paired_difference(self.rows, m, v, baseline) for m in self.columns}}
                for v in variants if v != baseline],
        }


def check_references(samples: Sequence[Sample], metrics: Sequence[str]) -> None:
    """Image alignment needs each sample's reference photos; say which run lacks them."""
    lacking = [s for s in samples if not s.references]
    if lacking and {"clip", "dino", "toy"} & set(metrics):
        raise CompinvError(
            f"`references`: no reference images for {lacking[0].image.parent} (prompt "
            f"{lacking[0].prompt!r}); pass `references` TOKEN=FOLDER (the concept's photos), or "
            "score without image alignment (`metrics` detector)")


def score_samples(samples: Sequence[Sample], metrics: Sequence[Metric], chunk: int = CHUNK) -> Evaluation:
    """Every metric over every sample, `chunk` images in memory at a time (a benchmark holds
    thousands); each metric batches on its device inside a chunk."""
    if not samples:
        raise CompinvError("`run`: nothing to evaluate; pass generation runs, or `images` with `prompts`")
    columns = [c for m in metrics for c in m.columns]
    if IMAGE_METRICS & set(columns):
        check_references(samples, ("clip",))
    for metric in metrics:  # cheap input checks first (a detector lacking a class)
        check_inputs(metric, samples)
    rows = [{"image": str(s.image), "variant": s.variant, "prompt": s.prompt,
             "plain_prompt": s.plain_prompt, "prompt_key": s.prompt_key, "index": s.index,
             "objects": "+".join(s.objects), "attention": [str(p) for p in s.attention]}
            for s in samples]
    starts = range(0, len(samples), chunk)
    for start in tqdm(starts, desc="evaluating", unit="chunk", disable=len(starts) < 2):
        part = samples[start : start + chunk]
        images = [_read(s.image) for s in part]
        for metric in metrics:
            scores = metric.score(part, images)
            for column in metric.columns:
                for row, value in zip(rows[start : start + chunk], scores[column]):
                    row[column] = float(value)
    descriptions = {k: v for metric in metrics for k, v in metric.describe().items()}
    return Evaluation(rows, columns, descriptions)


def _read(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise CompinvError(f"`run`: {path} is not a readable image ({exc}); regenerate it") from exc


def write_evaluation(evaluation: Evaluation, out: str | Path, baseline: str | None = None) -> dict:
    """evaluation.csv (one row per image) and evaluation.json (rows + summary); atomically."""
    out = ensure_writable_dir(out, "out")
    buffer = io.StringIO()
    fields = ["image", "variant", "prompt", "plain_prompt", "index", "objects", *evaluation.columns]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in evaluation.rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(out / CSV_FILE, buffer.getvalue())
    record = {"columns": evaluation.columns, **evaluation.summary(baseline),
              "images": evaluation.rows, "versions": library_versions()}
    atomic_write_text(out / JSON_FILE, json.dumps(_json_safe(record), indent=2, allow_nan=False))
    return record


def _json_safe(value):
    """NaN (a metric with nothing to score) as null: strict JSON readers reject NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def load_evaluation(path: str | Path) -> Evaluation:
    """An Evaluation back from evaluation.json (for the report)."""
    path = Path(path)
    file = path / JSON_FILE if path.is_dir() else path
    if not file.is_file():
        raise CompinvError(f"`evaluation` {path}: no {JSON_FILE}; run `compinv evaluate` first")
    record = json.loads(file.read_text())
    rows = [{k: (math.nan if k in record["columns"] and v is None else v) for k, v in row.items()}
            for row in record["images"]]
    return Evaluation(rows, record["columns"], record.get("metrics", {}))


def evaluate(out: str | Path, run: Sequence[str | Path] = (), images: str | Path | None = None,
             prompts: str | Path | None = None, class_word: Sequence[str] = (),
             references: Sequence[str] = (), objects: Sequence[str] = (),
             choice: MetricChoice | None = None, baseline: str | None = None,
             report: bool = True) -> dict:
    """Score generation runs (`run`: folders with generation.json) and/or a folder of `images`
    with a `prompts` file; write evaluation.csv, evaluation.json and report.html to `out`.

    class_word / references: 'TOKEN=WORD' / 'TOKEN=FOLDER' for concepts whose training run is
    not known (or to override it). objects: what concept inclusion looks for in every image that
    does not say (benchmark images do). Returns the JSON record.
    """
    from compinv.evaluation.runs import folder_samples, generation_folders, parse_pairs, run_samples

    if report:
        from compinv.evaluation.report import require_matplotlib

        require_matplotlib()
    words = parse_pairs(class_word, "class_word")
    refs = parse_pairs(references, "references")
    if not run and images is None:
        raise CompinvError("`run`: nothing to evaluate; pass generation runs, or `images` with `prompts`")
    if images is not None and prompts is None:
        raise CompinvError("`prompts` is required with `images`: a text file, one prompt a line")
    samples = [s for r in run for folder in generation_folders(r)
               for s in run_samples(folder, class_words=words, references=refs, objects=objects)]
    if images is not None:
        samples += folder_samples(images, prompts, class_words=words, references=refs, objects=objects)
    choice = choice or MetricChoice()
    check_references(samples, choice.metrics)
    evaluation = score_samples(samples, choice.build())
    record = write_evaluation(evaluation, out, baseline)
    if report:
        from compinv.evaluation.report import write_report

        write_report(evaluation, Path(out) / "report.html")
    return record
