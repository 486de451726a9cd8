"""`compinv evaluate` and `compinv benchmark` end to end on the tiny SD model with tiny metric
models (loaded by path like real ones): files, rows, pairing, resuming, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from compinv.cli import main
from compinv.evaluation.protocol import BenchmarkConfig, Job, pending, plan, shard
from compinv.evaluation.tiny import save_tiny_clip, save_tiny_detr, save_tiny_dino
from compinv.models import save_tiny_model
from compinv.training import train
from helpers import cli_error, ti_config, write_concept_images

FAST = ["--steps", "2", "--height", "32", "--width", "32"]
GUIDED = ["--guided-steps", "1", "--max-iterations", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a vanilla and a semantic TI run of "<cute-cat> cat", tiny metric models."""
    root = tmp_path_factory.mktemp("eval-world")
    model = save_tiny_model(root / "model")
    images = write_concept_images(root / "cat-photos")
    vanilla = root / "run-vanilla"
    semantic = root / "run-semantic"
    train(ti_config(model, images, vanilla, steps=2, anchor_weight=0.0, recon_weight=1.0))
    train(ti_config(model, images, semantic, steps=2))
    return {"model": model, "images": images, "vanilla": vanilla, "semantic": semantic,
            "clip": save_tiny_clip(root / "clip"), "dino": save_tiny_dino(root / "dino"),
            "detr": save_tiny_detr(root / "detr")}


def metric_flags(world, threshold="0.0") -> list[str]:
    return ["--clip-model", str(world["clip"]), "--dino-model", str(world["dino"]),
            "--detector", str(world["detr"]), "--detector-threshold", threshold]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def generation(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "out"
    assert main(["generate", "--model", str(world["model"]), "--concept", str(world["vanilla"]),
                 "--prompt", "a <cute-cat> cat and a dog", "--num-images", "3", *FAST,
                 "--out", str(out)]) == 0
    return out


def test_evaluate_a_generation_run(world, generation, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(generation), "--out", str(out), *metric_flags(world)]) == 0
    rows = read_csv(out / "evaluation.csv")
    assert [r["index"] for r in rows] == ["0", "1", "2"]
    assert {r["plain_prompt"] for r in rows} == {"a cat and a dog"}  # token and class word -> class
    assert {r["objects"] for r in rows} == {"dog"}  # inferred from the prompt
    for r in rows:
        assert -1 <= float(r["clip_t"]) <= 1 and float(r["clip_score"]) == pytest.approx(
            2.5 * max(float(r["clip_t"]), 0), abs=1e-6)
        assert -1 <= float(r["clip_i"]) <= 1 and -1 <= float(r["dino"]) <= 1
        assert r["inclusion"] in ("0.0", "1.0")
    record = json.loads((out / "evaluation.json").read_text())
    variant = record["per_variant"][0]
    assert variant["images"] == 3 and variant["clip_t"]["n"] == 3
    assert "openai" not in record["metrics"]["clip_t"] and str(world["clip"]) in record["metrics"]["clip_t"]
    assert (out / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "wrote evaluation.csv" in printed and "±" in printed and "nan" not in printed


def test_evaluate_a_folder_with_prompts(world, generation, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a <cute-cat> cat and a dog\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--images", str(generation), "--prompts", str(prompts),
                 "--class-word", "<cute-cat>=cat", "--references", f"<cute-cat>={world['images']}",
                 "--out", str(out), "--no-report", *metric_flags(world)]) == 0
    rows = read_csv(out / "evaluation.csv")
    assert len(rows) == 3 and {r["plain_prompt"] for r in rows} == {"a cat and a dog"}
    assert not (out / "report.html").exists()


def test_benchmark_runs_every_variant_pairs_them_and_resumes(world, tmp_path):
    out = tmp_path / "bench"
    argv = ["benchmark", "--model", str(world["model"]), "--concept", str(world["vanilla"]),
            "--semantic-runs", str(world["semantic"]), "--num-objects", "2",
            "--images-per-prompt", "2", *FAST, *GUIDED, "--out", str(out), *metric_flags(world)]
    assert main(argv) == 0
    folders = sorted(p.parent.relative_to(out) for p in out.glob("images/*/*/generation.json"))
    assert [str(f) for f in folders] == [
        f"images/{v}/{p}" for v in ("baseline", "both", "semantic", "spatial")
        for p in ("a-cute-cat-cat-and-a-bicycle", "a-cute-cat-cat-and-a-person")]
    spatial = json.loads((out / "images/spatial/a-cute-cat-cat-and-a-person/generation.json").read_text())
    baseline = json.loads((out / "images/baseline/a-cute-cat-cat-and-a-person/generation.json").read_text())
    assert spatial["layout"] and baseline["layout"] is None  # only guided variants have a layout
    assert spatial["scheduler"] == baseline["scheduler"] == "LMSDiscreteScheduler"
    assert spatial["objects"] == ["person"] and spatial["plain_prompt"] == "a cat and a person"
    rows = read_csv(out / "evaluation.csv")
    assert len(rows) == 4 * 2 * 2
    record = json.loads((out / "evaluation.json").read_text())
    assert record["baseline"] == "baseline"
    diffs = {d["variant"]: d for d in record["paired_differences"]}
    assert set(diffs) == {"semantic", "spatial", "both"} and diffs["spatial"]["clip_t"]["n"] == 4
    html = (out / "report.html").read_text()
    assert 'id="metrics"' in html and 'id="differences"' in html and 'id="scatter"' in html

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("images/*/*/*.png")}
    assert main(argv) == 0  # resumed: every job is complete, nothing is generated again
    assert {p: p.stat().st_mtime_ns for p in out.glob("images/*/*/*.png")} == stamps
    changed = cli_error_of(argv, "--seed", "1")
    assert "--seed 1" in changed and "use a new --out" in changed


def cli_error_of(argv, *extra):
    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*argv, *extra])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue()
    return lines[0]


def test_protocol_prompts_and_shards(world, tmp_path):
    cfg = BenchmarkConfig(model=str(world["model"]), runs=[str(world["vanilla"])],
                          semantic_runs=[str(world["semantic"])], out=str(tmp_path / "b"),
                          background=["cat"]).resolved()
    jobs = plan(cfg)
    assert len(jobs) == 4 * 80  # 80 COCO classes for each variant
    first = jobs[0].prompt
    assert first.text == "a person in front of a <cute-cat> cat"  # "cat" marked as background
    assert first.plain == "a person in front of a cat" and first.objects == ("person",)
    parts = [shard(jobs, k, 3) for k in range(3)]
    assert sorted(j.prompt.text + j.variant for p in parts for j in p) == sorted(
        j.prompt.text + j.variant for j in jobs)  # every job on exactly one process
    assert pending(jobs, tmp_path / "nothing-yet") == jobs
    assert isinstance(jobs[0], Job)


@pytest.mark.parametrize("argv, expected", [
    (["--run", "{empty}"], "--run {empty}: no generation.json in it or below it"),
    (["--images", "{empty}", "--prompts", "{prompts}"], "--images {empty}: the folder holds no images"),
    (["--images", "{gen}", "--prompts", "{two}"], "--prompts {two}: 2 prompts for 3 images"),
    (["--run", "{gen}", "--metrics", "detector", "--detector", "{missing}"],
     "--detector {missing}: not a local folder and not in the hub cache"),
    (["--run", "{gen}", "--class-word", "cat"], "--class-word 'cat': write TOKEN=VALUE"),
])
def test_evaluate_bad_input(world, generation, tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "two.txt").write_text("a cat\na dog\n")
    names = {"empty": tmp_path / "empty", "prompts": tmp_path / "prompts.txt", "gen": generation,
             "two": tmp_path / "two.txt", "missing": "no-org/no-detector"}
    argv = [a.format(**names) for a in argv]
    line = cli_error(capsys, ["evaluate", *argv, "--out", str(tmp_path / "e"), *metric_flags(world)[:4]])
    assert expected.format(**names) in line


def test_manifest_and_image_count_mismatch(world, generation, tmp_path, capsys):
    import shutil

    broken = tmp_path / "gen"
    shutil.copytree(generation, broken)
    (broken / "0001.png").unlink()
    line = cli_error(capsys, ["evaluate", "--run", str(broken), "--out", str(tmp_path / "e"),
                              *metric_flags(world)])
    assert "lists 3 image(s) but 1 are missing (0001.png" in line


def test_detector_lacking_a_class_from_the_cli(world, generation, tmp_path, capsys):
    small = save_tiny_detr(tmp_path / "detr-small", labels=("person", "cat"))
    line = cli_error(capsys, ["evaluate", "--run", str(generation), "--out", str(tmp_path / "e"),
                              "--metrics", "detector", "--detector", str(small)])
    assert f"--detector {small} has no class 'dog'" in line


def test_benchmark_bad_input(world, tmp_path, capsys):
    base = ["benchmark", "--model", str(world["model"]), "--out", str(tmp_path / "b")]
    assert "--semantic-runs: the semantic and both variants need" in cli_error(
        capsys, [*base, "--concept", str(world["vanilla"])])
    assert f"--concept {world['images']}: no config.json" in cli_error(
        capsys, [*base, "--concept", str(world["images"]), "--variants", "baseline"])


def test_benchmark_on_the_toy_model_with_the_toy_metrics(tmp_path):
    """Offline end to end: the shipped toy model, a toy concept, the toy classifier as metric."""
    from compinv.toy.concepts import CONCEPTS, write_concepts
    from compinv.toy.model import SHIPPED_MODEL_DIR

    concept = CONCEPTS[0]
    photos = write_concepts(tmp_path / "concepts") / concept.name
    run = tmp_path / "toy-run"
    train(ti_config(SHIPPED_MODEL_DIR, photos, run, token=f"<{concept.name}>",
                    class_word=concept.class_word, steps=2, anchor_weight=0.0, recon_weight=1.0))
    out = tmp_path / "bench"
    assert main(["benchmark", "--model", str(SHIPPED_MODEL_DIR), "--concept", str(run),
                 "--variants", "baseline", "spatial", "--objects", "toy", "--num-objects", "2",
                 "--images-per-prompt", "2", "--steps", "3", *GUIDED, "--metrics", "toy",
                 "--out", str(out)]) == 0
    rows = read_csv(out / "evaluation.csv")
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        text = float(row["toy_text"])  # share of 3 checks: colour, shape, background
        assert 0 <= text <= 1 and 3 * text == pytest.approx(round(3 * text))
        assert row["toy_inclusion"] in ("0.0", "1.0") and -1 <= float(row["toy_image"]) <= 1
    record = json.loads((out / "evaluation.json").read_text())
    assert [d["variant"] for d in record["paired_differences"]] == ["spatial"]
    assert 'id="scatter"' in (out / "report.html").read_text()


def test_benchmark_sharded_over_two_processes_with_accelerate_launch(world, tmp_path):
    """`accelerate launch` (2 CPU processes, gloo): the jobs are split, each image is the one a
    single process makes from the same seed."""
    import os
    import subprocess
    import sys

    args = ["benchmark", "--model", str(world["model"]), "--concept", str(world["vanilla"]),
            "--variants", "baseline", "spatial", "--num-objects", "2", "--images-per-prompt", "1",
            *FAST, *GUIDED, "--no-evaluate"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
              "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "compinv.cli", *args, "--out", str(tmp_path / "two")]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The reference runs in a process of its own with the same one thread as the launched ones,
    # so its float sums run in the same order whatever thread count the test process has.
    single = subprocess.run([sys.executable, "-m", "compinv.cli", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    records = {p.parent.relative_to(tmp_path / "two"): json.loads(p.read_text())
               for p in (tmp_path / "two").glob("images/*/*/generation.json")}
    assert len(records) == 4 and sorted(r["process"] for r in records.values()) == [0, 0, 1, 1]
    import numpy as np
    from PIL import Image

    for folder in records:  # the same seeded image, up to float summation order
        a, b = (np.asarray(Image.open(tmp_path / run / folder / "0000.png"), dtype=float)
                for run in ("two", "one"))
        assert np.abs(a - b).mean() < 2.0, folder


def test_benchmark_checks_detector_classes_before_generating(world, tmp_path, capsys):
    small = save_tiny_detr(tmp_path / "detr-small", labels=("person", "cat"))
    out = tmp_path / "b"
    line = cli_error(capsys, ["benchmark", "--model", str(world["model"]), "--concept",
                              str(world["vanilla"]), "--variants", "baseline", "--num-objects", "2",
                              *FAST, "--metrics", "detector", "--detector", str(small),
                              "--out", str(out)])
    assert f"--detector {small} has no class 'bicycle'" in line
    assert not list(out.glob("images/*/*/*.png"))  # refused before any image was generated


def test_pairs_only_needs_pairs(world, tmp_path, capsys):
    line = cli_error(capsys, ["benchmark", "--model", str(world["model"]), "--concept",
                              str(world["vanilla"]), "--variants", "baseline", "--pairs-only",
                              "--out", str(tmp_path / "b")])
    assert "--pairs-only leaves no prompt without --pairs" in line
