"""`compinv benchmark`: the paper's evaluation protocol as one resumable, shardable run.

For every concept: "a <concept> and a <coco class>" over the 80 COCO classes ("a <coco class> in
front of a <concept>" for background concepts such as a barn); with `pairs`, every two concepts
in both orders. N images per prompt, image i with seed + i, for each variant with the same
scheduler, steps and guidance scale:

| variant  | concept runs        | layout guidance |
|----------|---------------------|-----------------|
| baseline | `runs` (vanilla)    | no              |
| semantic | `semantic_runs`     | no              |
| spatial  | `runs`              | yes             |
| both     | `semantic_runs`     | yes             |

Each (variant, prompt) is one job whose folder (images + generation.json, the format of
`compinv generate`) appears only once complete, so a rerun skips finished jobs. Under
`accelerate launch` job k runs on process k mod N; the main process then evaluates and writes
the report.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compinv.artifacts import atomic_write_text, ensure_writable_dir, save_image, staged_folder
from compinv.errors import CompinvError
from compinv.evaluation.defaults import COCO_CLASSES, GUIDED_VARIANTS, SEMANTIC_VARIANTS, VARIANTS
from compinv.evaluation.runs import concept_info

log = logging.getLogger("compinv")

BACKGROUND_OBJECT_BOX = (0.25, 0.3, 0.75, 0.95)  # the object in front of a background concept
SETTINGS_FILE = "benchmark.json"


@dataclass(frozen=True)
class Concept:
    token: str
    class_word: str
    run: str

    @property
    def phrase(self) -> str:
        """How prompts write the concept: its token and class word, as it was trained."""
        return f"{self.token} {self.class_word}".strip()


@dataclass(frozen=True)
class ProtocolPrompt:
    """One prompt of the protocol with what its scores need."""

    text: str
    plain: str
    concepts: tuple[Concept, ...]
    objects: tuple[str, ...]
    phrases: tuple[str, ...]  # guided phrases in layout order
    background: bool = False

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.text.lower()).strip("-")[:120]


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def single_prompts(concept: Concept, objects: Sequence[str], background: bool) -> list[ProtocolPrompt]:
    """The protocol's prompts of one concept with each object class."""
    out = []
    for obj in objects:
        other = f"{article(obj)} {obj}"
        if background:
            text, plain = f"{other} in front of a {concept.phrase}", f"{other} in front of a {concept.class_word}"
        else:
            text, plain = f"a {concept.phrase} and {other}", f"a {concept.class_word} and {other}"
        phrases = (obj,) if background else (concept.token, obj)
        out.append(ProtocolPrompt(text, plain, (concept,), (obj,), phrases, background))
    return out


def pair_prompts(concepts: Sequence[Concept]) -> list[ProtocolPrompt]:
    """Every two concepts, both orders: "a <A> cat and a <B> dog"."""
    return [ProtocolPrompt(f"a {a.phrase} and a {b.phrase}", f"a {a.class_word} and a {b.class_word}",
                           (a, b), (a.class_word, b.class_word), (a.token, b.token))
            for a in concepts for b in concepts if a.token != b.token]


def toy_prompts(concept: Concept, n: int) -> list[ProtocolPrompt]:
    """The toy world's composition prompts (other object + background), for offline runs."""
    from compinv.toy.concepts import CONCEPTS
    from compinv.toy.metrics import composition_prompts

    toy = next((c for c in CONCEPTS if c.name in concept.token), None)
    if toy is None:
        raise CompinvError(f"`objects` toy: concept {concept.token} is not a toy concept; its token "
                           f"must name one of {[c.name for c in CONCEPTS]}")
    out = []
    for p in composition_prompts(toy, n):
        text = p.text(concept.phrase)
        out.append(ProtocolPrompt(text, p.text(concept.class_word), (concept,), (),
                                  (concept.token, p.other_phrase)))
    return out


def read_concepts(runs: Sequence[str], argument: str) -> list[Concept]:
    """One Concept per token learned by each run."""
    concepts = [Concept(c["token"], c["class_word"], str(run))
                for run in runs for c in concept_info(run, argument)]
    for run in runs:
        if not any(c.run == str(run) for c in concepts):
            raise CompinvError(f"`{argument}` {run}: its config.json names no token")
    return concepts


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on; saved as benchmark.json and checked on resume."""

    model: str
    runs: list[str]
    out: str
    semantic_runs: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    objects: str = "coco"
    num_objects: int | None = None
    background: list[str] = field(default_factory=lambda: ["barn"])
    pairs: bool = False
    pairs_only: bool = False  # with `pairs`: leave out the single-concept prompts
    images_per_prompt: int = 5
    seed: int = 8888
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "lms"
    height: int | None = None
    width: int | None = None
    save_attention: bool = False
    guided_steps: int = 10  # the official layout guidance: the first 10 steps
    max_iterations: int = 5

    def guidance(self):
        """The layout guidance of the spatial variants: the official settings but these two."""
        from compinv.spatial.options import GuidanceConfig

        return GuidanceConfig(guided_steps=self.guided_steps, max_iterations=self.max_iterations)

    def resolved(self) -> BenchmarkConfig:
        from compinv.pipeline import check_scheduler_name

        if not self.model:
            raise CompinvError("`model` is required")
        if not self.out:
            raise CompinvError("`out` is required")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise CompinvError(f"`variants` {bad[0] if bad else 'empty'}: use some of {', '.join(VARIANTS)}")
        if not self.runs and set(self.variants) - SEMANTIC_VARIANTS:
            raise CompinvError("`runs`: the baseline and spatial variants need the concept runs "
                               "trained without the anchor loss; or ask only for `variants` "
                               "semantic both")
        if not self.semantic_runs and set(self.variants) & SEMANTIC_VARIANTS:
            raise CompinvError("`semantic_runs`: the semantic and both variants need concept runs "
                               "trained with the anchor loss; or ask only for `variants` baseline "
                               "spatial")
        if self.objects not in ("coco", "toy") and not Path(self.objects).is_file():
            raise CompinvError(f"`objects` {self.objects}: use coco, toy, or a file with one class a line")
        for name, low in (("images_per_prompt", 1), ("steps", 1), ("num_objects", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise CompinvError(f"`{name}` {value}: must be at least {low}")
        check_scheduler_name(self.scheduler)
        if self.pairs_only and not self.pairs:
            raise CompinvError("`pairs_only` leaves no prompt without `pairs`: add it")
        if set(self.variants) & GUIDED_VARIANTS:
            self.guidance().validated(self.steps)
        return self

    def settings(self) -> dict:
        """What must match for a resumed run to add to the same measurement."""
        keep = ("model", "objects", "images_per_prompt", "seed", "steps", "guidance_scale",
                "scheduler", "height", "width", "guided_steps", "max_iterations")
        return {k: getattr(self, k) for k in keep}


@dataclass(frozen=True)
class Job:
    variant: str
    prompt: ProtocolPrompt

    @property
    def folder(self) -> str:
        return f"images/{self.variant}/{self.prompt.slug}"

    @property
    def runs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.run for c in self.prompt.concepts))


def protocol_prompts(cfg: BenchmarkConfig, concepts: Sequence[Concept]) -> list[ProtocolPrompt]:
    """All prompts of the protocol for these concepts (one variant's concept runs)."""
    if cfg.objects == "toy":
        return [p for c in concepts for p in toy_prompts(c, cfg.num_objects or 20)]
    objects = (list(COCO_CLASSES) if cfg.objects == "coco" else
               [line.strip() for line in Path(cfg.objects).read_text().splitlines() if line.strip()])
    if not objects:
        raise CompinvError(f"`objects` {cfg.objects}: the file lists no class")
    objects = objects[: cfg.num_objects or len(objects)]
    prompts = [p for c in concepts for p in single_prompts(c, objects, c.class_word in cfg.background)]
    return ([] if cfg.pairs_only else prompts) + (pair_prompts(concepts) if cfg.pairs else [])


def plan(cfg: BenchmarkConfig) -> list[Job]:
    """Every job of the run, in a fixed order (the same on every process)."""
    vanilla = read_concepts(cfg.runs, "runs") if cfg.runs else []
    semantic = read_concepts(cfg.semantic_runs, "semantic_runs") if cfg.semantic_runs else []
    if vanilla and semantic and sorted(c.class_word for c in vanilla) != sorted(c.class_word for c in semantic):
        raise CompinvError("`semantic_runs`: give one semantic run per vanilla run, for the same "
                           f"concepts (class words {sorted(c.class_word for c in vanilla)} vs "
                           f"{sorted(c.class_word for c in semantic)})")
    jobs = []
    for variant in cfg.variants:
        concepts = semantic if variant in SEMANTIC_VARIANTS else vanilla
        jobs += [Job(variant, p) for p in protocol_prompts(cfg, concepts)]
    return jobs


def shard(jobs: Sequence[Job], process: int, processes: int) -> list[Job]:
    """This process's jobs: job k goes to process k mod N."""
    return [job for k, job in enumerate(jobs) if k % processes == process]


def pending(jobs: Sequence[Job], out: Path) -> list[Job]:
    """The jobs whose folder is not complete yet (a complete one has generation.json)."""
    return [j for j in jobs if not (out / j.folder / "generation.json").is_file()]


def check_settings(cfg: BenchmarkConfig, out: Path) -> None:
    """A resumed run must use the settings of the images already there."""
    file = out / SETTINGS_FILE
    if file.is_file():
        before = json.loads(file.read_text()).get("settings", {})
        changed = [k for k, v in cfg.settings().items() if before.get(k) != v]
        if changed:
            raise CompinvError(f"`{changed[0]}` {getattr(cfg, changed[0])!r}: {out} holds images made "
                               f"with {changed[0]} {before.get(changed[0])!r}; use a new --out, "
                               "or the same settings to resume")


def run_jobs(cfg: BenchmarkConfig, jobs: Sequence[Job], out: Path, device=None, process: int = 0) -> int:
    """Generate each job's images; pipelines are loaded once per set of concept runs.
    `process` (the accelerate rank) is recorded in each job's generation.json."""
    from compinv.concepts import load_concepts
    from compinv.models import load_pipeline
    from compinv.pipeline import CompositionalStableDiffusionPipeline, use_scheduler

    done = 0
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.runs, []).append(job)
    for runs, members in groups.items():
        pipe = CompositionalStableDiffusionPipeline.from_pipe(load_pipeline(cfg.model))
        if device is not None:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        use_scheduler(pipe, cfg.scheduler)
        tokens = load_concepts(pipe, list(runs))
        for job in members:
            _run_job(cfg, pipe, job, out, tokens, process)
            done += 1
            log.info("benchmark: %s/%s (%d/%d on this process)", job.variant, job.prompt.slug,
                     done, len(jobs))
        del pipe
    return done


def _layout(job: Job) -> dict:
    if job.variant not in GUIDED_VARIANTS:
        return {"phrases": list(job.prompt.phrases)}
    if job.prompt.background:
        return {"layout": [(job.prompt.phrases[0], (BACKGROUND_OBJECT_BOX,))]}
    return {"layout": "auto", "phrases": list(job.prompt.phrases)}


def _run_job(cfg: BenchmarkConfig, pipe, job: Job, out: Path, tokens: list[str], process: int) -> None:
    import torch

    from compinv.generate import heat_map_picture
    from compinv.spatial.layout import layout_to_json
    from compinv.versions import library_versions

    request = _layout(job)
    if "layout" in request:
        request["guidance"] = cfg.guidance()
    if not cfg.save_attention and "layout" not in request:
        request = {}
    elif cfg.save_attention:
        request["return_attention"] = True
    names, heat_names, losses, resolved = [], [], [], None
    with staged_folder(out / job.folder) as folder:
        for i in range(cfg.images_per_prompt):
            generator = torch.Generator(device=pipe.device).manual_seed(cfg.seed + i)
            result = pipe(job.prompt.text, num_inference_steps=cfg.steps,
                          guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
                          generator=generator, **request)
            image = result.images[0]
            names.append(save_image(image, folder / f"{i:04d}.png").name)
            if "layout" in request:
                resolved = result.layout
                losses.append(result.guidance_losses)
            for k, (phrase, heat) in enumerate((getattr(result, "attention_maps", None) or {}).items()):
                boxes = dict(result.layout or []).get(phrase, ())
                slug = re.sub(r"[^A-Za-z0-9]+", "-", phrase).strip("-") or str(k)
                heat_names.append(save_image(heat_map_picture(image, heat[0].numpy(), boxes),
                                             folder / f"attention-{i:04d}-{k}-{slug}.png").name)
        record = {
            "config": {"model": cfg.model, "prompt": job.prompt.text, "concept": list(job.runs),
                       "num_images": cfg.images_per_prompt, "seed": cfg.seed, "steps": cfg.steps,
                       "guidance_scale": cfg.guidance_scale, "scheduler": cfg.scheduler,
                       "height": cfg.height, "width": cfg.width},
            "variant": job.variant,
            "plain_prompt": job.prompt.plain,
            "objects": list(job.prompt.objects),
            "tokens_loaded": tokens,
            "scheduler": type(pipe.scheduler).__name__,
            "images": names,
            "layout": layout_to_json(resolved) if resolved else None,
            "guidance_losses": losses or None,
            "attention_maps": heat_names,
            "process": process,
            "versions": library_versions(),
        }
        atomic_write_text(folder / "generation.json", json.dumps(record, indent=2))


def benchmark(config: BenchmarkConfig, metrics=None, report: bool = True) -> Path:
    """Run (or resume) the protocol; with `metrics` (a MetricChoice), evaluate every image and
    write evaluation.csv/json and, with `report`, report.html. Returns the out folder."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cfg = config.resolved()
    if metrics is not None and report:
        from compinv.evaluation.report import require_matplotlib

        require_matplotlib()
    jobs = plan(cfg)
    # Accelerator reads ACCELERATE_USE_CPU itself; PartialState only when told (CPU processes).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = Path(cfg.out)
    built = None
    if state.is_main_process:
        ensure_writable_dir(out, "out")
        check_settings(cfg, out)
        if metrics is not None:  # a missing model or a class the detector lacks: say so now,
            built = metrics.build()  # not after hours of generation
            check_planned(jobs, built)
        atomic_write_text(out / SETTINGS_FILE, json.dumps(
            {"settings": cfg.settings(), "config": asdict(cfg), "jobs": len(jobs)}, indent=2))
    state.wait_for_everyone()
    mine = pending(shard(jobs, state.process_index, state.num_processes), out)
    log.info("benchmark: %d jobs, %d left for process %d", len(jobs), len(mine), state.process_index)
    run_jobs(cfg, mine, out, state.device, state.process_index)
    state.wait_for_everyone()
    if built is not None:
        evaluate_benchmark(out, jobs, built, report)
    return out


def check_planned(jobs: Sequence[Job], metrics) -> None:
    """The metrics' input checks on the prompts about to be generated."""
    from compinv.evaluation.metrics import check_inputs
    from compinv.evaluation.samples import Sample

    planned = [Sample(image=Path(job.folder), prompt=job.prompt.text, plain_prompt=job.prompt.plain,
                      variant=job.variant, objects=job.prompt.objects,
                      concepts=tuple(c.token for c in job.prompt.concepts)) for job in jobs]
    for metric in metrics:
        check_inputs(metric, planned)


def evaluate_benchmark(out: Path, jobs: Sequence[Job], metrics, report: bool = True) -> dict:
    """Score every job's images with the loaded `metrics`; write evaluation.csv/json (+ report.html)."""
    from compinv.evaluation.evaluate import score_samples, write_evaluation
    from compinv.evaluation.runs import run_samples

    samples = [s for job in jobs for s in run_samples(out / job.folder)]
    evaluation = score_samples(samples, metrics)
    record = write_evaluation(evaluation, out)
    if report:
        from compinv.evaluation.report import write_report

        write_report(evaluation, out / "report.html", title=f"compinv benchmark: {out.name}")
    return record
