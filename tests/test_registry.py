"""The method registry is the one list of methods: the CLI, `compinv.train` and `load_concepts`
derive from it; generation does not import the training stack; errors name what the caller typed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import compinv
from compinv.cli import build_parser
from compinv.errors import CompinvError
from compinv.methods import METHODS, method_of
from compinv.methods.registry import Method
from compinv.methods.textual_inversion import METHOD as TI
from compinv.methods.textual_inversion import TrainConfig
from compinv.options import flag_for, user_fields
from helpers import cli_error, ti_config


def _train_subcommands(parser) -> dict:
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    return train._subparsers._group_actions[0].choices


def test_cli_has_one_subcommand_per_registered_method_with_every_option():
    commands = _train_subcommands(build_parser())
    assert set(commands) == set(METHODS) | {"layout"}  # `train layout` fits a layout model, not a concept
    for name, method in METHODS.items():
        flags = {s for a in commands[name]._actions for s in a.option_strings}
        missing = {flag_for(f.name) for f in user_fields(method.config_class)} - flags
        assert not missing, f"{name} lacks {missing}"


def test_a_new_registry_entry_is_a_new_subcommand_and_train_target(monkeypatch):
    @dataclasses.dataclass
    class EchoConfig(TrainConfig):
        """A Textual Inversion variant under another name."""

    echo = dataclasses.replace(TI, name="echo", short="EC", config_class=EchoConfig)
    monkeypatch.setitem(METHODS, "echo", echo)
    assert "echo" in _train_subcommands(build_parser())
    assert method_of(EchoConfig()) is echo
    assert isinstance(echo, Method)


def test_train_refuses_a_config_of_no_method():
    with pytest.raises(CompinvError, match="pass one of TrainConfig"):
        method_of(object())


def test_config_json_names_the_method_and_the_concepts(tiny_model, concept_images, tmp_path):
    result = compinv.train(ti_config(tiny_model, concept_images, tmp_path / "run", steps=1))
    record = json.loads((result.out / "config.json").read_text())
    assert record["method"] == "textual-inversion"
    assert [c["token"] for c in record["concept_list"]] == ["<cute-cat>"]
    assert result.artifact == result.out / "learned_embeds.safetensors" and result.artifact.is_file()


def test_generation_does_not_import_the_training_stack():
    """Loading concepts pulls in no training module and no more of accelerate than diffusers'
    own pipeline import does (diffusers itself imports accelerate when it is installed)."""
    code = (
        "import sys\n"
        "from diffusers import StableDiffusionPipeline\n"
        "before = {m for m in sys.modules if m.startswith('accelerate')}\n"
        "import compinv.concepts, compinv.generate\n"
        "from compinv import load_concepts\n"
        "after = {m for m in sys.modules if m.startswith('accelerate')}\n"
        "ours = sorted(m for m in sys.modules if m in ('compinv.trainer', 'compinv.training', "
        "'compinv.validation', 'compinv.losses', 'compinv.semantic'))\n"
        "print(sorted(after - before), ours)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[] []"


def test_library_errors_name_python_arguments_and_the_cli_names_flags(tiny_model, tmp_path, capsys):
    from compinv import load_concepts, load_pipeline

    with pytest.raises(CompinvError) as info:
        load_concepts(load_pipeline(str(tiny_model)), tmp_path)
    assert str(info.value).startswith(f"runs {tmp_path}: not a compinv run folder")
    assert "--concept" not in str(info.value)
    line = cli_error(capsys, ["generate", "--model", str(tiny_model), "--concept", str(tmp_path),
                              "--prompt", "a cat", "--out", str(tmp_path / "gen")])
    assert line.startswith(f"error: --concept {tmp_path}: not a compinv run folder")
    with pytest.raises(CompinvError, match="^images is required$"):
        TrainConfig(model="m", out="o", token="<t>", class_word="cat").resolved()
