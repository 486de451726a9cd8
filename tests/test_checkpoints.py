"""Checkpoints: no pickles, a manifest written last, corrupted ones skipped, other settings
refused, kill -9 then `--resume latest` bit-identical; the NaN guard keeps finite weights."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compinv.checkpoints import MANIFEST, checkpoint_problem
from compinv.errors import CompinvError
from compinv.training import prepare, train
from helpers import cli_error, learned, ti_config, write_concept_images


@pytest.fixture
def images(tmp_path) -> Path:
    return write_concept_images(tmp_path / "imgs", n=2)


def _checkpointed(tiny_model, images, out, **extra):
    settings = dict(steps=3, checkpoint_every=1, checkpoints_total_limit=3, anchor_words="cat,dog,pet")
    return train(ti_config(tiny_model, images, out, **{**settings, **extra}))


def test_a_checkpoint_holds_only_safetensors_and_json(tiny_model, images, tmp_path):
    _checkpointed(tiny_model, images, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [MANIFEST, "optimizer.safetensors", "rng-0.json", "rng-0.safetensors",
                     "state.json", "trained.safetensors"]
    for path in folder.iterdir():  # every file reads without unpickling anything
        load_file(str(path)) if path.suffix == ".safetensors" else json.loads(path.read_text())
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == set(names) - {MANIFEST} and checkpoint_problem(folder) is None


def test_corrupted_newest_checkpoint_is_named_and_skipped(tiny_model, images, tmp_path, caplog, capsys):
    whole = _checkpointed(tiny_model, images, tmp_path / "whole", steps=4)
    _checkpointed(tiny_model, images, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    bad = newest / "optimizer.safetensors"
    bad.write_bytes(bad.read_bytes()[:-7] + b"garbage")
    assert checkpoint_problem(newest) == f"{bad} is corrupted (its size or checksum differs from {MANIFEST})"
    with caplog.at_level("WARNING", logger="compinv"):
        resumed = _checkpointed(tiny_model, images, tmp_path / "run", steps=4, resume="latest")
    assert f"skipping {newest}: {bad} is corrupted" in caplog.text
    assert torch.equal(learned(resumed.artifact, "<cute-cat>"), learned(whole.artifact, "<cute-cat>"))
    argv = ["train", "textual-inversion", "--model", str(tiny_model), "--images", str(images),
            "--token", "<cute-cat>", "--class-word", "cat", "--steps", "5", "--resolution", "32",
            "--out", str(tmp_path / "run"), "--resume", str(newest)]
    (newest / "trained.safetensors").unlink()
    assert f"--resume {newest}: {newest / 'trained.safetensors'} is missing" in cli_error(capsys, argv)


def test_a_checkpoint_of_other_settings_or_format_is_refused(tiny_model, images, tmp_path, capsys):
    _checkpointed(tiny_model, images, tmp_path / "run")
    argv = ["train", "textual-inversion", "--model", str(tiny_model), "--images", str(images),
            "--token", "<cute-cat>", "--class-word", "cat", "--steps", "5", "--resolution", "32",
            "--out", str(tmp_path / "run"), "--resume", "latest"]
    line = cli_error(capsys, [*argv, "--num-vectors", "2"])
    assert "--num-vectors 2 here, 1 in the checkpoint" in line
    old = tmp_path / "old" / "checkpoints" / "checkpoint-1"
    old.mkdir(parents=True)
    (old / "compinv_state.json").write_text('{"step": 1}')
    (old / "optimizer.bin").write_bytes(b"\x80\x04pickle")
    line = cli_error(capsys, [*argv[:-3], str(tmp_path / "old"), "--resume", "latest"])
    assert "older compinv in accelerate's pickled format" in line


def _kill_at_random_step(argv: list[str], out: Path, steps: int, seed: int) -> int:
    """Start the CLI in a child process and SIGKILL it right after a random checkpoint lands
    (so it dies inside the next step or the next checkpoint write)."""
    step = random.Random(seed).randint(1, steps - 2)
    # The child computes the first steps: with this process's thread count, so that float
    # sums run in the same order as in the uninterrupted run.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-m", "compinv.cli", *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "checkpoints" / f"checkpoint-{step}" / MANIFEST
    deadline = time.monotonic() + 300
    while not target.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # polls for the checkpoint, not a fixed wait
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    return step


@pytest.mark.slow
@pytest.mark.parametrize("method", ["textual-inversion", "custom-diffusion"])
def test_kill_9_then_resume_latest_is_bit_identical(tiny_model, images, tmp_path, capsys, method):
    steps = 8
    common = ["--model", str(tiny_model), "--images", str(images), "--token", "<c>",
              "--class-word", "cat", "--init-word", "dog", "--steps", str(steps), "--batch-size",
              "2", "--resolution", "32", "--checkpoint-every", "1", "--checkpoints-total-limit",
              "2", "--anchor-words", "cat,dog", "--seed", "3"]
    from compinv.cli import main

    assert main(["train", method, *common, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    argv = ["train", method, *common, "--out", str(killed)]
    step = _kill_at_random_step(argv, killed, steps, seed=hash(method) % 1000)
    assert main([*argv, "--resume", "latest"]) == 0, f"resume after a kill at step {step}"
    artifact = "learned_embeds.safetensors" if method == "textual-inversion" else "custom_diffusion"
    whole, resumed = tmp_path / "whole" / artifact, killed / artifact
    files = [whole] if whole.is_file() else sorted(whole.glob("*.safetensors"))
    for path in files:
        a = load_file(str(path))
        b = load_file(str(resumed / path.name if resumed.is_dir() else resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name


def test_a_second_process_on_a_running_folder_gets_one_line(tiny_model, images, tmp_path, capsys):
    out = tmp_path / "busy"
    argv = ["train", "textual-inversion", "--model", str(tiny_model), "--images", str(images),
            "--token", "<c>", "--class-word", "cat", "--steps", "100000", "--resolution", "32",
            "--checkpoint-every", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-m", "compinv.cli", *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = out / "checkpoints" / "checkpoint-1" / MANIFEST
        deadline = time.monotonic() + 300
        while not first.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        line = cli_error(capsys, [*argv, "--resume", "latest"])
        assert f"--out {out} is in use by another compinv run (pid {child.pid})" in line
    finally:
        child.kill()
        child.wait()


# ---- the NaN guard -------------------------------------------------------------------------
def _trainer(tiny_model, images, out, **extra):
    from compinv.artifacts import output_folder

    cfg = ti_config(tiny_model, images, out, steps=5, **extra).resolved()
    with output_folder(cfg.out) as folder:
        return prepare(cfg, folder)


def test_non_finite_gradients_stop_before_the_update(tiny_model, images, tmp_path):
    trainer = _trainer(tiny_model, images, tmp_path / "nan")
    trainer.step()
    before = trainer.method.learned_vectors().detach().clone()
    trainer.global_step = 1
    table = trainer.method.text_encoder.get_input_embeddings().weight
    table.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(CompinvError, match=r"^gradients are not finite at step 2; stopped"):
        trainer.step()
    saved = learned(tmp_path / "nan" / "learned_embeds.safetensors")
    assert torch.equal(saved, before.cpu()) and torch.isfinite(saved).all()


def test_weights_that_overflow_are_never_saved(tiny_model, images, tmp_path):
    trainer = _trainer(tiny_model, images, tmp_path / "inf")
    restore = trainer.method.after_step

    def overflow():
        restore()
        with torch.no_grad():
            trainer.method.parameters()[0][0] = float("inf")  # the optimised rows: the concept's

    trainer.method.after_step = overflow
    with pytest.raises(CompinvError, match="became NaN or infinite at step 1; stopped without saving"):
        trainer.run()
    assert not (tmp_path / "inf" / "learned_embeds.safetensors").exists()
