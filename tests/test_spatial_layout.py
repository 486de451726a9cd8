"""Boxes, automatic layouts, CLI box specs and masks on attention grids."""

from __future__ import annotations

import pytest
import torch

from compinv.errors import CompinvError
from compinv.spatial.layout import (
    OFFICIAL_PAIR, auto_boxes, box_mask, check_box, parse_box_flag, resolve_layout,
)


@pytest.mark.parametrize("box", [(-0.1, 0.2, 0.5, 0.8), (0.1, 0.2, 1.5, 0.8), (0.5, 0.2, 0.5, 0.8),
                                 (0.6, 0.2, 0.5, 0.8), (0.1, 0.8, 0.5, 0.2), (0.1, 0.2, 0.5)])
def test_bad_boxes_are_rejected_with_the_phrase(box):
    with pytest.raises(CompinvError, match="'cat'"):
        check_box(box, "cat")


def test_auto_layout_two_phrases_is_official_and_n_phrases_do_not_overlap():
    assert resolve_layout("auto", ["<cute-cat>", "backpack"]) == [
        ("<cute-cat>", (OFFICIAL_PAIR[0],)), ("backpack", (OFFICIAL_PAIR[1],))]
    boxes = auto_boxes(4)
    assert all(0 <= v <= 1 for b in boxes for v in b)
    assert all(a[2] < b[0] for a, b in zip(boxes, boxes[1:]))  # left to right, disjoint
    with pytest.raises(CompinvError, match="at least one phrase"):
        resolve_layout("auto", [])


def test_explicit_layouts_accept_one_or_several_boxes():
    layout = resolve_layout({"cat": (0.1, 0.2, 0.5, 0.8),
                             "dog": [(0, 0, 0.2, 0.2), (0.8, 0.8, 1, 1)]})
    assert layout == [("cat", ((0.1, 0.2, 0.5, 0.8),)),
                      ("dog", ((0.0, 0.0, 0.2, 0.2), (0.8, 0.8, 1.0, 1.0)))]


@pytest.mark.parametrize("pairs", [[("dog", (0, 0, 1, 1)), ("dog", (0, 0, 0.5, 0.5))],
                                   [("Hot  dog", (0, 0, 1, 1)), ("hot dog", (0, 0, 0.5, 0.5))]])
def test_same_phrase_twice_is_an_error(pairs):
    with pytest.raises(CompinvError, match="given twice"):
        resolve_layout(pairs)


def test_box_flag_parsing():
    assert parse_box_flag("<cute-cat>=0.1,0.2,0.5,0.8") == ("<cute-cat>", ((0.1, 0.2, 0.5, 0.8),))
    assert parse_box_flag("hot dog=0,0,.5,.5+.5,.5,1,1")[1] == ((0, 0, .5, .5), (.5, .5, 1, 1))
    for bad in ("cat", "=0,0,1,1", "cat=a,b,c,d", "cat=0,0,1"):
        with pytest.raises(CompinvError, match="--box|box"):
            parse_box_flag(bad)


def test_box_mask_rounds_down_like_the_official_code():
    mask = box_mask([(0.1, 0.2, 0.5, 0.8)], 8, 8)  # rows 1..5, columns 0..3
    expected = torch.zeros(8, 8)
    expected[1:6, 0:4] = 1
    assert torch.equal(mask, expected)
    union = box_mask([(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)], 4, 4)
    assert union.sum() == 8 and union[0, 0] == 1 and union[3, 3] == 1 and union[0, 3] == 0
