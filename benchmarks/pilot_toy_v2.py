"""Pilot of toy model v2: step times of each phase, and the design's second risk, early.

1. Step times at the full plan's batch sizes (a few steps of each phase) -> minutes per phase.
2. A short run of all three phases at small batches (CLIP, autoencoder, then the UNet on the
   *frozen* CLIP text tower) and, from the same CLIP and autoencoder checkpoints, a control
   whose UNet phase trains the text tower too (v1's recipe). For both: each token position's
   share of cross-attention over held-out v2 captions, and how blocking the padding changes it.
   The question: does a UNet on a frozen contrastive encoder give the padding far less
   attention than v1 (81 % in the v1 diagnostics)?

Not part of `make bench` (it trains for ~15 minutes). Writes benchmarks/results/toy_v2_pilot.json.

    python benchmarks/pilot_toy_v2.py [--clip-steps 300] [--vae-steps 300] [--unet-steps 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compinv.diagnostics import attention_shares
from compinv.toy import world_v2
from compinv.toy.clip import ToyClipSettings
from compinv.toy.model import STATE_FILE, load_toy_model
from compinv.toy.model_v2 import ToyModelV2Settings, train_toy_model_v2

RESULTS = Path(__file__).parent / "results" / "toy_v2_pilot.json"
STEPS, GUIDANCE = 25, 3.0
ROLES = {**{c: "colour word" for c in world_v2.COLOURS}, **{s: "shape word" for s in world_v2.SHAPES},
         **{p: "pattern word" for p in ("striped", "dotted", "checked", "two", "-", "tone")},
         **{b: "background word" for b in ("grass", "sand", "snow", "night")}}


def step_times(work: Path, steps: int = 4) -> dict[str, float]:
    """Median seconds per step of each phase at the plan's (default) batch sizes."""
    full = ToyModelV2Settings()
    settings = dataclasses.replace(full, clip=dataclasses.replace(full.clip, steps=steps),
                                   vae_steps=steps, steps=steps)
    run = train_toy_model_v2(work / "timing", settings, checkpoint_every=0, progress=False)
    return run.state["seconds_per_step"]


def shares(model: Path, captions: list[str]) -> dict:
    pipe = load_toy_model(model)
    pipe.set_progress_bar_config(disable=True)
    result = {}
    for blocked in (False, True):
        totals: dict[str, list[float]] = {}
        for caption in captions:
            per: dict[str, float] = {}
            for s in attention_shares(pipe, caption, STEPS, GUIDANCE, seeds=(0,), block_padding=blocked):
                for kind in [s.kind] + ([ROLES.get(s.token, "other word")] if s.kind == "word" else []):
                    per[kind] = per.get(kind, 0.0) + s.share
            for kind, value in per.items():
                totals.setdefault(kind, []).append(value)
        result["padding_blocked" if blocked else "plain"] = {
            k: float(np.sum(v) / len(captions)) for k, v in totals.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-steps", type=int, default=300)
    parser.add_argument("--clip-batch-size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--unet-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--timing-steps", type=int, default=4, help="steps per phase at full batches (0: skip)")
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="pilot-v2-") as tmp:
        work = Path(tmp)
        if args.timing_steps:
            summary["seconds_per_step_full_batches"] = step_times(work, args.timing_steps)
        summary["full_batches"] = {"clip": ToyClipSettings().batch_size, "vae": ToyModelV2Settings.vae_batch_size,
                                   "unet": ToyModelV2Settings.batch_size}
        base = ToyModelV2Settings(clip=ToyClipSettings(steps=args.clip_steps, batch_size=args.clip_batch_size),
                                  vae_steps=args.vae_steps, vae_batch_size=args.vae_batch_size,
                                  steps=args.unet_steps, batch_size=args.batch_size)
        control = dataclasses.replace(base, train_text_encoder=True)
        first = train_toy_model_v2(work / "frozen", base, checkpoint_every=0, progress=False, stop_after="vae")
        shutil.copytree(work / "frozen", work / "joint")
        # The control starts from the same CLIP and autoencoder: its saved settings are rewritten
        # to the control's (they differ only in train_text_encoder, which the UNet phase reads).
        state_path = work / "joint" / "training" / STATE_FILE
        state = json.loads(state_path.read_text())
        state["settings"]["train_text_encoder"] = True
        state_path.write_text(json.dumps(state))
        runs = {"frozen text encoder": train_toy_model_v2(work / "frozen", base, resume=True, progress=False,
                                                          checkpoint_every=0),
                "text encoder trained with the UNet": train_toy_model_v2(work / "joint", control, resume=True,
                                                                         progress=False, checkpoint_every=0)}
        captions = [world_v2.caption(s) for s in world_v2.sample_scenes(args.captions, "heldout", (0, 7))]
        summary["clip_retrieval"] = first.state["retrieval"]
        summary["vae_psnr"] = first.state["vae_psnr"]
        summary["runs"] = {name: {"seconds_per_step": run.state["seconds_per_step"],
                                  "attention": shares(run.out, captions)} for name, run in runs.items()}
    summary["total_minutes"] = round((time.perf_counter() - started) / 60, 1)
    print(json.dumps(summary, indent=2))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
