"""The command line end to end: make a model, train a few steps, generate with the result."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from compinv.cli import build_parser, main
from compinv.methods.textual_inversion import TrainConfig
from compinv.options import build_config


def test_train_then_generate(tmp_path, concept_images):
    model, run, images = tmp_path / "model", tmp_path / "run", tmp_path / "images"
    assert main(["make-tiny-model", str(model)]) == 0
    assert main(["train", "textual-inversion", "--model", str(model), "--images",
                 str(concept_images), "--token", "<cute-cat>", "--class-word", "cat",
                 "--num-vectors", "2", "--steps", "2", "--resolution", "32", "--batch-size", "1",
                 "--grad-accum", "1", "--out", str(run)]) == 0
    assert (run / "learned_embeds.safetensors").is_file()
    assert main(["generate", "--model", str(model), "--embeddings", str(run), "--prompt",
                 "a photo of <cute-cat> on the beach", "--num-images", "2", "--steps", "3",
                 "--height", "32", "--width", "32", "--out", str(images)]) == 0
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size == (32, 32)
    record = json.loads((images / "generation.json").read_text())
    assert record["tokens_loaded"] == ["<cute-cat>"]
    assert record["config"]["prompt"] == "a photo of <cute-cat> on the beach"


def test_config_file_fills_options_and_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 7\nanchor-weight: 0.5\nvalidation_prompt: a photo of {}\n")
    args = build_parser().parse_args(["train", "textual-inversion", "--config", str(config),
                                      "--steps", "9"])
    cfg = build_config(TrainConfig, args, args.config)
    assert (cfg.steps, cfg.anchor_weight, cfg.validation_prompt) == (9, 0.5, ["a photo of {}"])
    assert cfg.recon_weight == 0.05, "unset options keep the official defaults"
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"num_vectors": 3, "scale_lr": False}))
    args = build_parser().parse_args(["train", "textual-inversion", "--config", str(json_config)])
    cfg = build_config(TrainConfig, args, args.config)
    assert (cfg.num_vectors, cfg.scale_lr) == (3, False)


def test_console_script_reports_errors_on_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "compinv.cli", "train", "textual-inversion", "--model",
         str(tmp_path), "--images", str(tmp_path / "missing"), "--token", "<t>", "--init-word",
         "cat", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --images {tmp_path / 'missing'}: no such folder; pass the folder with the "
        "concept's images"]


def test_demo_in_reduced_mode_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 0
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    names = [v["variant"] for v in summary["variants"]]
    assert names == ["TI", "TI + spatial", "TI + semantic", "TI + semantic + spatial"]
    report = (out / "report.html").read_text()
    for variant in summary["variants"]:
        assert set(variant["metrics"]) == {"text_alignment", "concept_inclusion", "image_alignment",
                                           "concept_colours"}
        assert all(0.0 <= mean <= 1.0 for mean, _ in variant["metrics"].values())
        for picture in (variant["grid"], variant["attention"]):
            assert (out / picture).is_file() and f"src='{picture}'" in report
    assert Image.open(out / summary["variants"][0]["grid"]).size == (2 * 128 + 2, 2 * 128 + 2)
    assert (out / "overview.png").is_file()
    assert f"open {(out / 'report.html').resolve()}" in capsys.readouterr().out


def test_toy_commands_are_wired(tmp_path):
    from compinv.toy.concepts import CONCEPTS

    out = tmp_path / "concepts"
    assert main(["toy", "write-concepts", str(out)]) == 0
    index = json.loads((out / "concepts.json").read_text())["concepts"]
    assert sorted(index) == sorted(c.name for c in CONCEPTS)
    for name, entry in index.items():
        assert {"name", "description", "class_word", "background", "colours"} <= set(entry)
        pictures = sorted((out / name).glob("*.png"))
        assert len(pictures) == 5
        assert all(Image.open(p).convert("RGB").size == Image.open(pictures[0]).size for p in pictures)
