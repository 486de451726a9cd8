"""Bad files and run folders: one clear error each, nothing left behind, no silent loss."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib

from PIL import Image

from compinv.artifacts import LOCK_FILE, atomic_write_text
from compinv.data import load_images
from helpers import cli_error, write_concept_images


def _gen(tiny_model, out, *extra):
    return ["generate", "--model", str(tiny_model), "--prompt", "a <t>", "--num-images", "1",
            "--steps", "2", "--height", "32", "--width", "32", "--out", str(out), *extra]


def _train(tiny_model, images, out, *extra):
    return ["train", "textual-inversion", "--model", str(tiny_model), "--images", str(images),
            "--token", "<t>", "--class-word", "cat", "--steps", "1", "--batch-size", "1",
            "--grad-accum", "1", "--resolution", "32", "--checkpoint-every", "0", "--save-every",
            "0", "--out", str(out), *extra]


def _png_declaring(path, width, height):
    """A valid small PNG whose header claims width x height pixels."""
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_decompression_bomb_and_animated_gif(tmp_path, caplog):
    folder = write_concept_images(tmp_path / "imgs", n=1)
    _png_declaring(folder / "bomb.png", 20000, 20000)
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING, logger="compinv"):
        images = load_images(folder)
    assert len(images) == 2  # the concept image and the GIF's first frame
    text = caplog.text
    assert "bomb.png: not a readable image" in text and "anim.gif has 2 frames; using the first" in text


def test_token_file_names_must_not_collide(tiny_model, concept_images, tmp_path, capsys):
    concepts = tmp_path / "c.yaml"
    concepts.write_text(f"- {{token: '<a.b>', class_word: cat, images: '{concept_images}'}}\n"
                        f"- {{token: '<a_b>', class_word: dog, images: '{concept_images}'}}\n")
    line = cli_error(capsys, ["train", "custom-diffusion", "--model", str(tiny_model), "--concepts",
                              str(concepts), "--out", str(tmp_path / "out")])
    assert "'<a.b>' and '<a_b>' would both be saved as a_b.safetensors" in line


def test_a_run_folder_belongs_to_one_run(tiny_model, concept_images, tmp_path, capsys):
    from compinv.cli import main

    out = tmp_path / "run"
    assert main(_train(tiny_model, concept_images, out)) == 0
    line = cli_error(capsys, _train(tiny_model, concept_images, out))
    assert f"--out {out} already holds a run" in line and "--overwrite" in line
    (out / ".learned_embeds.safetensors.partial").mkdir()  # a killed run's staging folder
    (out / "class_images").mkdir()
    assert main(_train(tiny_model, concept_images, out, "--overwrite")) == 0
    assert not (out / ".learned_embeds.safetensors.partial").exists()
    assert (out / "class_images").is_dir() and not (out / LOCK_FILE).exists()


def test_two_processes_on_one_folder(tiny_model, concept_images, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as other:  # another process's lock (flock is per open file)
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242")
        other.flush()
        line = cli_error(capsys, _train(tiny_model, concept_images, out))
    assert f"--out {out} is in use by another compinv run (pid 4242)" in line


def test_files_keep_the_users_umask(tmp_path):
    from compinv.artifacts import FILE_MODE

    path = atomic_write_text(tmp_path / "config.json", "{}")
    assert os.stat(path).st_mode & 0o777 == FILE_MODE
    mask = os.umask(0)
    os.umask(mask)
    assert FILE_MODE == 0o666 & ~mask and FILE_MODE != 0o600
