"""Two-process data parallel on CPU (gloo), launched exactly as users launch: `accelerate launch`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from compinv.methods.custom_diffusion import CustomDiffusionConfig
from compinv.training import train
from helpers import learned, ti_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch_two_processes(method: str, cfg) -> list[dict[str, torch.Tensor]]:
    """Train on 2 processes; return each rank's trainable parameters after training."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", str(WORKER), method, json.dumps(dataclasses.asdict(cfg))]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [load_file(str(Path(cfg.out) / f"rank{r}.safetensors")) for r in (0, 1)]


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the two processes drifted apart"


def test_textual_inversion_two_processes_end_equal(tiny_model, concept_images, tmp_path):
    out = tmp_path / "ddp"
    cfg = ti_config(tiny_model, concept_images, out, steps=3, batch_size=1, num_vectors=2)
    ranks = _launch_two_processes("textual-inversion", cfg)
    _assert_equal_states(*ranks)
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2
    vectors = learned(out / "learned_embeds.safetensors")

    # Same global batch on one process (batch 2 = 2 processes x 1): the same samples and noise,
    # so the result matches up to float summation order.
    single = train(ti_config(tiny_model, concept_images, tmp_path / "one",
                                               steps=3, batch_size=2, num_vectors=2))
    torch.testing.assert_close(learned(single.artifact), vectors, rtol=1e-4, atol=1e-5)


def test_custom_diffusion_two_processes_average_unet_gradients(tiny_model, concept_images,
                                                              tmp_path):
    cfg = CustomDiffusionConfig(model=str(tiny_model), images=str(concept_images), token="<a>",
                                class_word="cat", out=str(tmp_path / "cd"), steps=2,
                                batch_size=1, resolution=32, checkpoint_every=0, save_every=0,
                                validation_every=0, seed=1, lr=1e-2)
    _assert_equal_states(*_launch_two_processes("custom-diffusion", cfg))


def test_two_processes_checkpoint_and_resume_exactly(tiny_model, concept_images, tmp_path):
    """Each process saves its own random state; the resumed 2-process run ends where an
    uninterrupted one does."""
    whole = ti_config(tiny_model, concept_images, tmp_path / "whole", steps=3, batch_size=1)
    expected = _launch_two_processes("textual-inversion", whole)[0]
    part = dataclasses.replace(whole, out=str(tmp_path / "parts"), steps=2, checkpoint_every=1)
    _launch_two_processes("textual-inversion", part)
    checkpoint = tmp_path / "parts" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "rng-0.json").is_file() and (checkpoint / "rng-1.json").is_file()
    resumed = _launch_two_processes("textual-inversion",
                                    dataclasses.replace(part, steps=3, resume="latest"))
    _assert_equal_states(expected, resumed[0])
