"""`compinv generate` with --box / --layout auto / --save-attention, end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from compinv.cli import main
from helpers import cli_error
from compinv.config import GenerateConfig
from compinv.errors import CompinvError

QUICK = ["--steps", "3", "--guided-steps", "2", "--max-iterations", "2", "--num-images", "1",
         "--height", "32", "--width", "32"]


def test_generate_with_boxes_and_attention_maps(tiny_model, tmp_path):
    out = tmp_path / "run"
    code = main(["generate", "--model", str(tiny_model), "--prompt", "a cat and a red backpack",
                 "--box", "cat=0.1,0.2,0.5,0.8", "--box", "red backpack=0.6,0.2,0.95,0.8",
                 "--save-attention", "--out", str(out), *QUICK])
    assert code == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["scheduler"] == "LMSDiscreteScheduler"
    assert record["layout"] == [{"phrase": "cat", "boxes": [[0.1, 0.2, 0.5, 0.8]]},
                                {"phrase": "red backpack", "boxes": [[0.6, 0.2, 0.95, 0.8]]}]
    (losses,) = record["guidance_losses"]  # one image, two guided steps, two iterations each
    assert [len(step) for step in losses] == [2, 2] and all(0 <= v <= 1 for s in losses for v in s)
    assert record["attention_maps"] == ["attention-0000-0-cat.png", "attention-0000-1-red-backpack.png"]
    for name in record["attention_maps"]:
        assert Image.open(out / name).size == (32, 32)


def test_generate_auto_layout(tiny_model, tmp_path):
    out = tmp_path / "auto"
    assert main(["generate", "--model", str(tiny_model), "--prompt", "a cat and a dog",
                 "--layout", "auto", "--phrase", "cat", "--phrase", "dog", "--scheduler", "ddim",
                 "--out", str(out), *QUICK]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["layout"][1] == {"phrase": "dog", "boxes": [[0.6, 0.2, 0.95, 0.8]]}
    assert record["scheduler"] == "DDIMScheduler" and record["attention_maps"] == []


@pytest.mark.parametrize("flags,message", [
    (["--box", "cat=0.5,0.2,0.1,0.8"], "x0 < x1"),
    (["--box", "cat=0,0,1,1", "--box", "cat=0,0,0.5,0.5"], "given twice"),
    (["--box", "horse=0,0,1,1"], "tokens are: a cat and a dog"),
    (["--layout", "auto"], "needs the phrases"),
    (["--box", "cat=0,0,1,1", "--guided-steps", "9"], "guided steps 9"),
    (["--save-attention"], "needs phrases"),
    (["--box", "cat=0,0,1,1", "--scheduler", "lsm"], "use one of model, lms"),
])
def test_bad_layout_flags_exit_nonzero_with_one_line(tiny_model, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    line = cli_error(capsys, ["generate", "--model", str(tiny_model), "--prompt", "a cat and a dog",
                              "--out", str(out), *QUICK, *flags])
    assert message in line
    assert not out.exists()


GUIDED = ["--layout", "auto", "--phrase", "cat", "--phrase", "dog", "--steps", "10",
          "--num-images", "1", "--height", "32", "--width", "32"]
MET_AT_ONCE = ["--guided-steps", "3", "--max-iterations", "2", "--loss-threshold", "1"]


@pytest.mark.parametrize("flags,iterations", [
    ([], [5] * 10),  # official defaults; the tiny model's loss (~0.57) never reaches 0.2
    (["--guided-steps", "3", "--max-iterations", "2", "--loss-threshold", "0"], [2, 2, 2]),
    (MET_AT_ONCE, [1]),  # official rule: the step that meets the threshold is the last guided
    ([*MET_AT_ONCE, "--guidance-stop", "per-step"], [1, 1, 1]),
])
def test_guidance_flags_change_which_steps_and_iterations_run(tiny_model, tmp_path, flags, iterations):
    out = tmp_path / "run"
    assert main(["generate", "--model", str(tiny_model), "--prompt", "a cat and a dog",
                 "--out", str(out), *GUIDED, *flags]) == 0
    (losses,) = json.loads((out / "generation.json").read_text())["guidance_losses"]
    assert [len(step) for step in losses] == iterations


def test_unknown_scheduler_is_refused_before_any_model_loads(tmp_path):
    cfg = GenerateConfig(model=str(tmp_path / "no-model"), prompt="a cat", out=str(tmp_path / "o"),
                         scheduler="lsm")
    with pytest.raises(CompinvError, match="^scheduler 'lsm': use one of model, lms, ddim"):
        cfg.resolved()


def test_config_module_stays_torch_free():
    """`compinv --help` builds its flags from compinv.config, so importing it must not load torch."""
    code = "import sys, compinv.config; print(sorted(m for m in sys.modules if m.startswith('torch')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
