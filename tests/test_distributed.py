"""Two-process data parallel on CPU (gloo), as `accelerate launch` runs it."""

from __future__ import annotations

import torch
from accelerate import PartialState, debug_launcher
from safetensors.torch import save_file

from compinv.methods import textual_inversion as ti
from helpers import learned, ti_config

_ARGS: dict = {}


def _train_and_dump_own_copy() -> None:
    """Runs in each process: train, then write this process's copy of the learned rows."""
    original = ti.Trainer.run

    def run_and_dump(self):
        result = original(self)
        rank = PartialState().process_index
        save_file({"v": self.method.learned_vectors()}, str(self.out / f"rank{rank}.safetensors"))
        return result

    ti.Trainer.run = run_and_dump
    try:
        ti.train_textual_inversion(ti_config(**_ARGS, steps=3, batch_size=1, num_vectors=2))
    finally:
        ti.Trainer.run = original


def test_two_processes_end_with_the_same_embedding(tiny_model, concept_images, tmp_path,
                                                   monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ddp"
    _ARGS.update(model=tiny_model, images=concept_images, out=out)
    debug_launcher(_train_and_dump_own_copy, num_processes=2)
    copies = [learned(out / f"rank{r}.safetensors", "v") for r in (0, 1)]
    assert torch.equal(copies[0], copies[1])
    assert torch.equal(copies[0], learned(out / "learned_embeds.safetensors"))

    # Same global batch on one process (batch 2 = 2 processes x 1): the same samples and noise,
    # so the result matches up to float summation order.
    single = ti.train_textual_inversion(ti_config(tiny_model, concept_images, tmp_path / "one",
                                                  steps=3, batch_size=2, num_vectors=2))
    torch.testing.assert_close(learned(single.embeddings_path), copies[0], rtol=1e-4, atol=1e-5)
