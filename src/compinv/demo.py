"""`compinv demo`: the paper's claim, shown and measured on a shipped toy model, on a CPU.

The demo runs on either toy world (read off the model: `compinv.toy.ablation.toy_study`). One
toy concept (five reference images, all on one background: the overfitting scenario) is learned
twice, with vanilla Textual Inversion and with semantic inversion; each is then composed with
other objects and backgrounds without and with spatial inversion. The HTML report shows
every variant's images, where each phrase's cross-attention went, and the toy metrics.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from compinv.artifacts import atomic_write_text, ensure_writable_dir, save_image
from compinv.errors import CompinvError
from compinv.generate import heat_map_picture
from compinv.spatial.layout import auto_boxes
from compinv.toy.ablation import (
    ToyStudy,
    TrainingBudget,
    Variant,
    generate_per_prompt,
    learn_concept,
    pipeline_with_concept,
    score_variant,
    token_of,
    toy_study,
    toy_version,
    variants,
)
from compinv.toy.metrics import mean_ci
from compinv.toy.model import shipped_or_folder

SCALE = 4  # toy images (32 or 48 px) are shown 4x larger (nearest neighbour: the pixels stay honest)
DEFAULT_CONCEPT = "striped-diamond"  # a concept of both toy worlds
METRIC_NOTES = {  # what each toy metric counts, for the report
    "text_alignment": "share of the other object's colour, its shape and the background found by the toy classifier",
    "concept_inclusion": "the other object found",
    "image_alignment": "classifier-feature similarity to the references",
    "concept_colours": "share of the concept's colours visible",
    "concept_identity": "the concept recognised: both its colours and its pattern on its shape",
}


@dataclass(frozen=True)
class DemoSize:
    """How much the demo does; `QUICK` is the reduced mode the tests run."""

    ti_steps: int = 300
    prompts: int = 4
    seeds: int = 4


QUICK = DemoSize(ti_steps=10, prompts=2, seeds=2)


def run_demo(out: str | Path, concept: str = DEFAULT_CONCEPT, size: DemoSize = DemoSize(),
             model: str | Path | None = None) -> Path:
    """Run the demo into `out` on `model` (a folder, or a shipped model's name; None: the
    default one); returns the path of report.html."""
    model = shipped_or_folder(model)
    study = toy_study(toy_version(pipeline_with_concept(model, None)))
    by_name = {c.name: c for c in study.concepts}
    if concept not in by_name:
        raise CompinvError(f"`concept` {concept!r}: use one of {', '.join(by_name)} (toy world {study.version})")
    toy = by_name[concept]
    out = ensure_writable_dir(out, "--out")
    images = study.write_images(out / "concepts") / toy.name
    prompts = study.prompts(toy, size.prompts)
    seeds = list(range(size.seeds))
    classifier = study.classifier()
    runs = {}
    for semantic in (False, True):
        name = "semantic-ti" if semantic else "vanilla-ti"
        print(f"demo: learning {token_of(toy)} with {name} ({size.ti_steps} steps)", flush=True)
        runs[semantic] = learn_concept(model, toy, images, "textual-inversion", semantic, out / "runs" / name,
                                       TrainingBudget(ti_steps=size.ti_steps), resolution=study.image_size)
    sections = []
    for variant in variants(("textual-inversion",)):
        print(f"demo: generating {variant.name}", flush=True)
        pipe = pipeline_with_concept(model, runs[variant.semantic])
        sections.append(_variant_section(out, pipe, variant, toy, prompts, seeds, study, classifier))
    report = _write_report(out, toy, prompts, sections, size, study, images)
    print(f"demo: report at {report}")
    return report


def _variant_section(out: Path, pipe, variant: Variant, toy, prompts, seeds, study: ToyStudy,
                     classifier) -> dict:
    token = token_of(toy)
    rows, heat_rows = [], []
    for prompt in prompts:
        phrases = [token, prompt.other_phrase]
        images, maps = generate_per_prompt(pipe, prompt.text(token), phrases, seeds, variant.spatial)
        rows.append(images)
        boxes = dict(zip(phrases, ((b,) for b in auto_boxes(len(phrases))))) if variant.spatial else {}
        first = _to_pil(images[0])
        heat_rows.append([first] + [heat_map_picture(first, maps[p][0].numpy(), boxes.get(p, ()))
                                    for p in phrases])
    images = np.concatenate(rows)
    scores = score_variant(study, classifier, images, toy, prompts, seeds)
    slug = variant.name.lower().replace(" + ", "-")
    grid = save_image(_grid([[_to_pil(im) for im in row] for row in rows]), out / f"{slug}.png")
    maps = save_image(_grid(heat_rows), out / f"{slug}-attention.png")
    return {"variant": variant.name, **asdict(variant), "grid": grid.name, "attention": maps.name,
            "metrics": {k: mean_ci(v) for k, v in scores.items()}}


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))


def _grid(rows: list[list[Image.Image]], gap: int = 2) -> Image.Image:
    """Rows of equal-size images, scaled SCALE x with nearest neighbour, on white."""
    w, h = rows[0][0].width * SCALE, rows[0][0].height * SCALE
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(image.resize((w, h), Image.NEAREST), (j * (w + gap), i * (h + gap)))
    return canvas


def _overview(out: Path, sections: list[dict], references: Image.Image) -> Path:
    """One picture for the README: the references on top, then every variant's grid, named."""
    panels = [(s["variant"], Image.open(out / s["grid"])) for s in sections]
    label, gap = 14, 8
    width = max(references.width, sum(p.width for _, p in panels) + gap * (len(panels) - 1))
    height = 2 * label + references.height + gap + max(p.height for _, p in panels)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((0, 0), "reference images", fill=(0, 0, 0))
    canvas.paste(references, (0, label))
    x, y = 0, label + references.height + gap
    for name, panel in panels:
        draw.text((x, y), name, fill=(0, 0, 0))
        canvas.paste(panel, (x, y + label))
        x += panel.width + gap
    return save_image(canvas, out / "overview.png")


def _write_report(out: Path, toy, prompts, sections: list[dict], size: DemoSize, study: ToyStudy,
                  images: Path) -> Path:
    references = _grid([[Image.open(p).convert("RGB") for p in sorted(images.glob("*.png"))]])
    save_image(references, out / "references.png")
    overview = _overview(out, sections, references)
    header = "".join(f"<th>{m.replace('_', ' ')}</th>" for m in study.metrics)
    table = "".join(
        f"<tr><td>{html.escape(s['variant'])}</td>"
        + "".join(f"<td>{s['metrics'][m][0]:.3f} &plusmn; {s['metrics'][m][1]:.3f}</td>" for m in study.metrics)
        + "</tr>" for s in sections)
    notes = "; ".join(f"{m.replace('_', ' ').capitalize()}: {METRIC_NOTES[m]}" for m in study.metrics)
    prompt_list = "".join(f"<li>{html.escape(p.text(token_of(toy)))}</li>" for p in prompts)
    blocks = "".join(
        f"<h3>{html.escape(s['variant'])}</h3><p>Rows: prompts; columns: seeds.</p>"
        f"<img src='{s['grid']}'><p>First seed of each prompt: image, then the attention of "
        f"{html.escape(token_of(toy))} and of the other object (boxes: the layout).</p>"
        f"<img src='{s['attention']}'>" for s in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>compinv demo</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}img{{image-rendering:pixelated}}
td,th{{padding:.2em .8em;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>compinv demo: {html.escape(toy.name)}</h1>
<p>{html.escape(toy.description)}; class word <b>{toy.class_word}</b>; every reference image is
{html.escape(toy.background)} (the context inversion should not learn). Model: toy model v{study.version};
Textual Inversion {size.ti_steps} steps; 25 denoising steps, guidance scale 3.</p>
<img src="references.png"><h2>Prompts</h2><ul>{prompt_list}</ul>
<h2>Metrics (mean &plusmn; 95 % CI over {size.prompts * size.seeds} images)</h2>
<table><tr><th>variant</th>{header}</tr>{table}</table>
<p>{html.escape(notes)}.</p>
<h2>Overview</h2><img src="{overview.name}"><h2>Variants</h2>{blocks}</body></html>"""
    atomic_write_text(out / "summary.json", json.dumps(
        {"concept": toy.name, "toy_world": study.version, "size": asdict(size), "prompts": [p.text(token_of(toy)) for p in prompts],
         "variants": sections}, indent=2))
    return atomic_write_text(out / "report.html", page)
