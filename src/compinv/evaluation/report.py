"""One self-contained HTML page of an evaluation: tables with 95 % intervals and paired
differences, the text-vs-image alignment scatter per variant (the paper's trade-off plot),
image grids per prompt and variant, and attention heat-maps where generation saved them.

Every picture is embedded as a data URI, so the page can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from compinv.artifacts import atomic_write_text
from compinv.errors import CompinvError
from compinv.evaluation.evaluate import Evaluation

TEXT_AXES = ("clip_score", "clip_t", "toy_text")  # first present is the plot's y axis
IMAGE_AXES = ("clip_i", "dino", "toy_image")  # first present is the plot's x axis
THUMBNAIL = 160

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}caption{text-align:left;font-weight:bold;padding:4px 0}
.grid img{width:%dpx;height:%dpx;object-fit:contain;margin:1px;image-rendering:pixelated}
.grid td{text-align:left;vertical-align:middle}.up{color:#060}.down{color:#a00}
.note{color:#555;font-size:90%%}
""" % (THUMBNAIL, THUMBNAIL)


def _fmt(stat: dict) -> str:
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return "–"
    ci = "" if math.isnan(stat["ci"]) else f" ± {stat['ci']:.3f}"
    return f"{stat['mean']:.3f}{ci}"


def _data_uri(picture: Image.Image | bytes, fmt: str = "PNG") -> str:
    if isinstance(picture, Image.Image):
        buffer = io.BytesIO()
        picture.save(buffer, fmt)
        picture = buffer.getvalue()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(picture).decode()}"


def _thumbnail(path: str | Path) -> str:
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = THUMBNAIL / max(image.size)
        if scale < 1:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.LANCZOS)
        return _data_uri(image, "JPEG" if image.width * image.height > 4096 else "PNG")


def metric_table(summary: dict, columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = "".join(
        f"<tr><td>{html.escape(v['variant'])}</td><td>{v['images']}</td>"
        + "".join(f"<td>{_fmt(v[c])}</td>" for c in columns) + "</tr>"
        for v in summary["per_variant"])
    return (f'<table id="metrics"><caption>Mean ± 95 % CI per variant</caption>'
            f"<tr><th>variant</th><th>images</th>{head}</tr>{rows}</table>")


def difference_table(summary: dict, columns: Sequence[str]) -> str:
    if not summary["paired_differences"]:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = ""
    for d in summary["paired_differences"]:
        cells = ""
        for c in columns:
            s = d[c]
            sign = "" if s["n"] == 0 or math.isnan(s["ci"]) or abs(s["mean"]) <= s["ci"] else (
                "up" if s["mean"] > 0 else "down")
            cells += f'<td class="{sign}">{_fmt(s)}</td>'
        rows += f"<tr><td>{html.escape(d['variant'])} − {html.escape(d['baseline'])}</td>{cells}</tr>"
    return (f'<table id="differences"><caption>Paired differences (same prompt, same seed), '
            f"mean ± 95 % CI; coloured where the interval excludes 0</caption>"
            f"<tr><th>difference</th>{head}</tr>{rows}</table>")


def require_matplotlib() -> None:
    """The report's plot needs matplotlib (the `eval` extra); say so before any work is done."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CompinvError("`report`: the report's plot needs matplotlib; install it with "
                           "`pip install 'compinv[eval]'`, or skip the report") from exc


def scatter_png(evaluation: Evaluation) -> bytes | None:
    """Text alignment against image alignment: each variant's per-prompt means (small) and its
    overall mean with 95 % intervals (large), as the paper's trade-off plot."""
    y_axis = next((c for c in TEXT_AXES if c in evaluation.columns), None)
    x_axis = next((c for c in IMAGE_AXES if c in evaluation.columns), None)
    if y_axis is None or x_axis is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = evaluation.summary()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for k, variant in enumerate(evaluation.variants()):
        colour = f"C{k}"
        per_prompt = [p for p in summary["per_prompt"] if p["variant"] == variant]
        ax.scatter([p[x_axis]["mean"] for p in per_prompt], [p[y_axis]["mean"] for p in per_prompt],
                   s=10, alpha=0.35, color=colour)
        total = next(v for v in summary["per_variant"] if v["variant"] == variant)
        ax.errorbar(total[x_axis]["mean"], total[y_axis]["mean"], xerr=_nan0(total[x_axis]["ci"]),
                    yerr=_nan0(total[y_axis]["ci"]), fmt="o", ms=9, color=colour, label=variant,
                    capsize=3)
    ax.set_xlabel(f"image alignment ({x_axis})")
    ax.set_ylabel(f"text alignment ({y_axis})")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def image_grids(evaluation: Evaluation, max_prompts: int) -> str:
    """For each prompt (up to `max_prompts`): one row per variant with its images, and a row of
    attention heat-maps under it where they were saved."""
    prompts = list(dict.fromkeys(r["prompt_key"] for r in evaluation.rows))
    sections = []
    for key in prompts[:max_prompts]:
        rows = ""
        for variant in evaluation.variants():
            members = sorted((r for r in evaluation.rows if r["prompt_key"] == key
                              and r["variant"] == variant), key=lambda r: r["index"])
            if not members:
                continue
            cells = "".join(f'<img src="{_thumbnail(r["image"])}" alt="{html.escape(variant)} '
                            f'image {r["index"]}" title="{html.escape(r["prompt"])}">' for r in members)
            rows += f"<tr><td>{html.escape(variant)}</td><td>{cells}</td></tr>"
            maps = [p for r in members for p in r.get("attention") or [] if Path(p).is_file()]
            if maps:
                pictures = "".join(f'<img class="attention" src="{_thumbnail(p)}" alt="attention '
                                   f'{html.escape(Path(p).stem)}" title="{html.escape(Path(p).stem)}">'
                                   for p in maps)
                rows += f"<tr><td>{html.escape(variant)}<br>attention</td><td>{pictures}</td></tr>"
        sections.append(f'<h3>{html.escape(key)}</h3><table class="grid">{rows}</table>')
    more = (f'<p class="note">{len(prompts) - max_prompts} more prompts are in evaluation.csv.</p>'
            if len(prompts) > max_prompts else "")
    return "".join(sections) + more


def render_report(evaluation: Evaluation, title: str = "compinv evaluation", max_prompts: int = 12) -> str:
    summary = evaluation.summary()
    columns = evaluation.columns
    plot = scatter_png(evaluation)
    plot_html = (f'<img id="scatter" src="{_data_uri(plot)}" alt="text alignment against image '
                 'alignment per variant">' if plot else
                 '<p class="note">The trade-off plot needs a text and an image alignment metric.</p>')
    described = "".join(f"<tr><td>{html.escape(c)}</td><td style='text-align:left'>"
                        f"{html.escape(summary['metrics'].get(c, ''))}</td></tr>" for c in columns)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(evaluation.rows)} images, {len(set(r['prompt_key'] for r in evaluation.rows))} prompts,
variants: {html.escape(', '.join(evaluation.variants()))}.</p>
<h2>Metrics</h2>{metric_table(summary, columns)}{difference_table(summary, columns)}
<table id="definitions"><caption>What each column is (backbone and scale)</caption>{described}</table>
<h2>Text against image alignment</h2>{plot_html}
<h2>Images</h2>{image_grids(evaluation, max_prompts)}
</body></html>
"""


def write_report(evaluation: Evaluation, path: str | Path, title: str = "compinv evaluation",
                 max_prompts: int = 12) -> Path:
    return atomic_write_text(Path(path), render_report(evaluation, title, max_prompts))
