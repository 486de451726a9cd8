"""Load learned concepts from our run folders into a pipeline, and check they really loaded.

Which artifacts a run folder can hold, and how each is loaded, comes from the method registry
(`compinv.methods`): Textual Inversion, Custom Diffusion, DreamBooth and DreamBooth-LoRA runs
can be loaded in any mix, except two runs of an exclusive kind (two Custom Diffusion runs both
replace the same attn2 K/V: train the concepts together with a concepts file; two full
DreamBooth runs are each a whole model). Every loader verifies that the pipeline's weights now
equal the artifact's. Nothing here imports the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from compinv.errors import CompinvError
from compinv.methods import readers
from compinv.methods.registry import ArtifactReader


def find_artifact(run: str | Path) -> tuple[ArtifactReader, Path]:
    """(reader, marker file) of a run folder, of its artifact folder, or of an embedding file."""
    run = Path(run)
    kinds = readers()
    if run.is_file() and run.suffix == ".safetensors":
        return next(r for r in kinds if r.kind == "textual-inversion"), run
    for reader in kinds:
        for folder in (run / reader.folder, run):
            if (folder / reader.marker).is_file():
                return reader, folder / reader.marker
    markers = ", ".join(f"{r.folder}/{r.marker}" if r.folder != "." else r.marker for r in kinds)
    raise CompinvError(f"`runs` {run}: not a compinv run folder (none of {markers}); pass the "
                       "out folder of a finished `compinv train` run")


def load_concepts(pipe, runs: str | Path | list[str | Path]) -> list[str]:
    """Load every run's concepts into `pipe` (in place); returns the tokens now usable in prompts."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    found = [(Path(run), *find_artifact(run)) for run in runs]
    for reader in {r for _, r, _ in found if r.exclusive}:
        same = [str(run) for run, r, _ in found if r is reader]
        if len(same) > 1:
            raise CompinvError(f"`runs` {same[0]} and {same[1]} are both {reader.kind} runs; they "
                               "change the same weights and cannot be combined. Train the "
                               "concepts together with a concepts file")
    found.sort(key=lambda item: not item[1].first)  # a whole model goes in first
    tokens = [token for run, reader, marker in found for token in reader.load(pipe, marker, run)]
    anchors = dict(getattr(pipe, "concept_anchors", None) or {})
    for run, _, marker in found:
        anchors.update(concept_anchors(run if run.is_dir() else marker.parent))
    pipe.concept_anchors = anchors  # layout="anchor"/"learned" replace each token by its anchor
    return tokens


def concept_anchors(run: str | Path) -> dict[str, str]:
    """{token: anchor word} recorded in a run's config.json (the anchor, else the class word,
    else the init word); {} when the run has no config.json (a bare embedding file)."""
    path = Path(run) / "config.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    specs = record.get("concept_list") or [record]
    anchors = {}
    for spec in specs:
        word = spec.get("anchor_word") or spec.get("class_word") or spec.get("init_word")
        if spec.get("token") and word:
            anchors[spec["token"]] = word
    return anchors
