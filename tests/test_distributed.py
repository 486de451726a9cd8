"""Two-process data parallel on CPU (gloo), launched exactly as users launch: `accelerate launch`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from compinv.methods.textual_inversion import train_textual_inversion
from helpers import learned, ti_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_processes_end_with_the_same_embedding(tiny_model, concept_images, tmp_path):
    out = tmp_path / "ddp"
    cfg = ti_config(tiny_model, concept_images, out, steps=3, batch_size=1, num_vectors=2)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", str(WORKER), json.dumps(dataclasses.asdict(cfg))]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    copies = [learned(out / f"rank{r}.safetensors", "v") for r in (0, 1)]
    assert torch.equal(copies[0], copies[1])
    assert torch.equal(copies[0], learned(out / "learned_embeds.safetensors"))
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2

    # Same global batch on one process (batch 2 = 2 processes x 1): the same samples and noise,
    # so the result matches up to float summation order.
    single = train_textual_inversion(ti_config(tiny_model, concept_images, tmp_path / "one",
                                               steps=3, batch_size=2, num_vectors=2))
    torch.testing.assert_close(learned(single.embeddings_path), copies[0], rtol=1e-4, atol=1e-5)
