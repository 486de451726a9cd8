"""Flags spelled --no-… switch their option on (argparse's BooleanOptionalAction stores False
for any --no-… spelling, which made --no-anchor keep the anchor loss)."""

from __future__ import annotations

import pytest

from compinv.cli import build_parser
from compinv.methods import METHODS
from compinv.options import build_config


@pytest.mark.parametrize("method, flag, field", [
    ("textual-inversion", "--no-anchor", "no_anchor"),
    ("textual-inversion", "--no-class-word", "no_class_word"),
    ("custom-diffusion", "--no-aug", "no_aug"),
])
def test_negative_flags_turn_their_option_on(method, flag, field):
    parser = build_parser()
    on = parser.parse_args(["train", method, flag])
    off = parser.parse_args(["train", method])
    assert getattr(on, field) is True and getattr(off, field) is None
    config = build_config(METHODS[method].config_class, on)
    assert getattr(config, field) is True


def test_no_anchor_from_the_cli_gives_vanilla_weights(tmp_path):
    args = build_parser().parse_args(["train", "textual-inversion", "--no-anchor", "--model",
                                      str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    config = build_config(METHODS["textual-inversion"].config_class, args)
    from compinv.config import resolve_common

    resolved = resolve_common(config)
    assert (resolved.recon_weight, resolved.anchor_weight) == (1.0, 0.0)
