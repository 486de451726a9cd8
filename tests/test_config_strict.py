"""Options and config files are checked exactly, before any model loads (the model path in
these tests does not even exist: the option error must come first)."""

from __future__ import annotations

import pytest

from compinv.errors import CompinvError
from compinv.methods.textual_inversion import TrainConfig
from helpers import cli_error


def _train(tmp_path, *extra):
    return ["train", "textual-inversion", "--model", str(tmp_path / "no-model"), "--images",
            str(tmp_path), "--token", "<t>", "--class-word", "cat", "--out", str(tmp_path / "out"),
            *extra]


@pytest.mark.parametrize("yaml_text, message", [
    ("no_anchor: 'false'\n", "key 'no_anchor' must be true or false, got 'false'"),
    ("steps: 3.9\n", "key 'steps' must be a whole number, got 3.9"),
    ("steps: true\n", "key 'steps' must be a whole number, got True"),
    ("lr: '0.1'\n", "key 'lr' must be a number, got '0.1'"),
    ("lr: true\n", "key 'lr' must be a number"),
    ("validation_prompt: 5\n", "key 'validation_prompt' must be a string or a list of strings"),
    ("validation_prompt: {a: b}\n", "key 'validation_prompt' must be a string or a list of strings"),
    ("validation_prompt: [a, 3]\n", "must be a string or a list of strings"),
    ("token: 7\n", "key 'token' must be a string, got 7"),
    ("mixed_precision: fp8\n", "key 'mixed_precision' 'fp8': use one of no, fp16, bf16"),
    ("a: &x [1, 2]\nb: *x\n", "YAML aliases (*name) are not accepted"),
    ("", "the file is empty"),
    ("[1, 2]\n", "must hold a mapping of option names to values"),
    ("steps: [\n", "not valid YAML or JSON"),
    ("stepz: 3\n", "unknown key 'stepz'"),
])
def test_config_file_values_are_checked_exactly(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    line = cli_error(capsys, _train(tmp_path, "--config", str(config)))
    assert message in line and f"--config {config}" in line
    assert not (tmp_path / "out").exists()


def test_alias_bomb_fails_fast(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 2000
    assert "YAML aliases" in cli_error(capsys, _train(tmp_path, "--config", str(bomb)))


def test_large_and_binary_files_are_refused(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    assert "more than a settings file needs" in cli_error(capsys, _train(tmp_path, "--config", str(big)))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not a text file" in cli_error(capsys, _train(tmp_path, "--config", str(binary)))


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr nan: must be a number in (0.0, 1000.0]"),
    (["--lr", "inf"], "--lr inf"),
    (["--lr", "0"], "--lr 0.0"),
    (["--anchor-weight", "-1"], "--anchor-weight -1.0"),
    (["--recon-weight", "nan"], "--recon-weight nan"),
    (["--flip-p", "1.5"], "--flip-p 1.5: must be a number in [0.0, 1.0]"),
    (["--lr-warmup-steps", "-1"], "--lr-warmup-steps -1"),
    (["--checkpoint-every", "-5"], "--checkpoint-every -5"),
    (["--checkpoints-total-limit", "0"], "--checkpoints-total-limit 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2**40)], "--seed 1099511627776"),
    (["--adam-beta1", "1"], "--adam-beta1 1.0: must be a number in [0.0, 1.0)"),
    (["--adam-beta2", "-0.1"], "--adam-beta2 -0.1"),
    (["--adam-epsilon", "0"], "--adam-epsilon 0.0"),
    (["--resolution", "100"], "--resolution 100: must be a multiple of 8"),
    (["--resolution", "100000"], "--resolution 100000"),
    (["--num-vectors", "1000"], "--num-vectors 1000"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0"),
    (["--validation-steps", "0"], "--validation-steps 0"),
])
def test_numeric_options_are_validated_before_the_model_loads(tmp_path, capsys, flags, message):
    assert message in cli_error(capsys, _train(tmp_path, *flags))


def test_argparse_type_errors_also_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        from compinv.cli import main

        main(_train(tmp_path, "--steps", "3.9"))
    assert info.value.code == 2 and "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--guidance-scale", "nan"], "--guidance-scale nan"),
    (["--loss-scale", "0"], "--loss-scale 0.0"),
    (["--loss-threshold", "inf"], "--loss-threshold inf"),
    (["--height", "100"], "--height 100: must be a multiple of 8"),
    (["--width", "99999"], "--width 99999"),
    (["--num-images", "100000"], "--num-images 100000"),
    (["--steps", "2", "--box", "cat=0.5,0.2,0.1,0.8"], "x0 < x1"),  # the box, not the step count
])
def test_generation_options_are_validated_before_the_model_loads(tmp_path, capsys, flags, message):
    line = cli_error(capsys, ["generate", "--model", str(tmp_path / "no-model"), "--prompt", "a cat",
                              "--out", str(tmp_path / "out"), *flags])
    assert message in line


def test_python_errors_name_the_python_argument(tmp_path):
    cfg = TrainConfig(model="m", out=str(tmp_path), images=".", token="<t>", class_word="cat",
                      flip_p=2.0)
    with pytest.raises(CompinvError, match=r"^flip_p 2.0: must be a number in \[0.0, 1.0\]$"):
        cfg.resolved()
