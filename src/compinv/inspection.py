"""`compinv inspect RUN`: will this concept compose? The diagnostics of one training run.

Loads the run's concepts into its base model, reports every learned vector against the
vocabulary (norm and nearest-word distance as percentiles, nearest words, a PCA picture with
the anchors), and with a prompt, each token's share of cross-attention and each phrase's
heat-map. Everything is written to a folder as JSON and PNG, and summarised as text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compinv.artifacts import atomic_write_text, ensure_writable_dir, save_image
from compinv.concepts import load_concepts
from compinv.diagnostics import (OOD_THRESHOLD, VectorReport, attention_shares, embedding_report,
                                 projection_picture, shares_table)
from compinv.errors import CompinvError
from compinv.models import load_pipeline

STOP_WORDS = {"a", "an", "the", "of", "and", "in", "on", "at", "with", "photo", "to", "is"}


@dataclass
class Inspection:
    """What `inspect_run` found; `summary()` is the text the CLI prints."""

    out: Path
    vectors: list[VectorReport]
    shares: list = field(default_factory=list)
    heat_maps: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["vector            norm  norm-pct  nearest  dist-pct  OOD  nearest words"]
        for v in self.vectors:
            flag = "yes" if v.ood_score > OOD_THRESHOLD else "no"
            lines.append(f"{v.name:<16}{v.norm:7.3f}{v.norm_percentile:9.1f}{v.nearest_distance:9.3f}"
                         f"{v.nearest_distance_percentile:9.1f}  {flag:<4} {', '.join(v.nearest_words)}")
        if self.shares:
            lines += ["", "share of cross-attention by token:", shares_table(self.shares)]
        lines.append(f"\nwrote {self.out}")
        return "\n".join(lines)


def _run_record(run: Path) -> dict:
    config = run / "config.json"
    if not config.is_file():
        raise CompinvError(f"`run` {run}: no config.json; pass the out folder of a `compinv train` run")
    return json.loads(config.read_text())


def learned_vectors(pipe, tokens: list[str]) -> dict[str, torch.Tensor]:
    """{token: [N, dim]}: each loaded token's rows, with diffusers' extra vectors `<t>_1`, ..."""
    vocab = pipe.tokenizer.get_vocab()
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    found = {}
    for token in tokens:
        names = [token]
        while f"{token}_{len(names)}" in vocab:
            names.append(f"{token}_{len(names)}")
        found[token] = table[[vocab[n] for n in names]]
    return found


def inspect_run(run: str | Path, model: str | None = None, prompt: str | None = None,
                out: str | Path | None = None, steps: int = 25, seeds: int = 2,
                guidance_scale: float = 7.5) -> Inspection:
    """Diagnose a run folder; `prompt` may hold '{}' for the (first) concept token."""
    run = Path(run)
    record = _run_record(run)
    pipe = load_pipeline(model or record["model"])
    pipe.set_progress_bar_config(disable=True)
    tokens = load_concepts(pipe, run)
    vectors = learned_vectors(pipe, tokens)
    folder = ensure_writable_dir(out or run / "inspect", "out")
    anchors = [c["anchor_word"] for c in record.get("concept_list", []) if c.get("anchor_word")]
    reports = embedding_report(pipe.tokenizer, pipe.text_encoder, vectors)
    save_image(projection_picture(pipe.tokenizer, pipe.text_encoder, vectors, anchors),
               folder / "projection.png")
    result = Inspection(folder, reports)
    if prompt:
        text = prompt.replace("{}", tokens[0])
        result.shares = attention_shares(pipe, text, steps, guidance_scale, range(seeds))
        result.heat_maps = _heat_maps(pipe, text, folder, steps, guidance_scale)
    atomic_write_text(folder / "inspection.json", json.dumps({
        "run": str(run), "vectors": [v.as_dict() for v in reports], "anchors": anchors,
        "prompt": prompt, "attention_shares": [asdict(s) for s in result.shares],
        "heat_maps": [p.name for p in result.heat_maps]}, indent=2))
    return result


def _heat_maps(pipe, text: str, folder: Path, steps: int, guidance_scale: float) -> list[Path]:
    """attention-<phrase>.png for every content word of the prompt, over the first image."""
    from compinv.generate import heat_map_picture
    from compinv.pipeline import CompositionalStableDiffusionPipeline

    compositional = CompositionalStableDiffusionPipeline.from_pipe(pipe)
    compositional.set_progress_bar_config(disable=True)
    phrases = list(dict.fromkeys(w for w in text.split() if w.lower() not in STOP_WORDS))
    result = compositional(text, num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(0), phrases=phrases,
                           return_attention=True)
    paths = [save_image(result.images[0], folder / "image.png")]
    for k, (phrase, heat) in enumerate(result.attention_maps.items()):
        slug = "".join(c if c.isalnum() else "-" for c in phrase).strip("-") or str(k)
        picture = heat_map_picture(result.images[0], heat[0].numpy())
        paths.append(save_image(picture, folder / f"attention-{k}-{slug}.png"))
    return paths
