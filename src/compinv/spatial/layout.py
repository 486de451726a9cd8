"""Layouts: where each phrase of the prompt should appear, as normalised boxes.

A box is (x0, y0, x1, y1) in [0, 1], x to the right and y downwards, as in the official code.
A layout is an ordered list of (phrase, boxes); a phrase may own several boxes (their union).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import torch

from compinv.errors import CompinvError

Box = tuple[float, float, float, float]
BoxesLike = Union[Sequence[float], Sequence[Sequence[float]]]
LayoutLike = Union[Mapping[str, BoxesLike], Iterable[tuple[str, BoxesLike]], str]
Layout = list[tuple[str, tuple[Box, ...]]]

# The official code's two boxes: the inverted concept on the left, the other object right.
OFFICIAL_PAIR: tuple[Box, Box] = ((0.1, 0.2, 0.5, 0.8), (0.6, 0.2, 0.95, 0.8))
_AUTO_MARGIN, _AUTO_GAP, _AUTO_TOP, _AUTO_BOTTOM = 0.05, 0.05, 0.2, 0.8


def check_box(box: Sequence[float], phrase: str) -> Box:
    """A valid box as a tuple of floats, or a CompinvError naming the phrase and the rule."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise CompinvError(f"box {box!r} of phrase {phrase!r}: give four numbers x0,y0,x1,y1") from exc
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise CompinvError(f"box {box!r} of phrase {phrase!r}: coordinates must lie in [0, 1] "
                           "(they are fractions of the image width and height)")
    if x0 >= x1 or y0 >= y1:
        raise CompinvError(f"box {box!r} of phrase {phrase!r}: needs x0 < x1 and y0 < y1 "
                           "(left, top, right, bottom)")
    return (x0, y0, x1, y1)


def _boxes(value: BoxesLike, phrase: str) -> tuple[Box, ...]:
    """One box or a sequence of boxes -> a non-empty tuple of checked boxes."""
    items = list(value) if not isinstance(value, str) else [value]
    if items and all(isinstance(v, (int, float)) for v in items):
        items = [items]
    if not items:
        raise CompinvError(f"phrase {phrase!r} has no box; give at least one x0,y0,x1,y1")
    return tuple(check_box(b, phrase) for b in items)


def auto_boxes(n: int) -> list[Box]:
    """N non-overlapping boxes side by side; for two, the official left and right boxes."""
    if n < 1:
        raise CompinvError("layout 'auto' needs at least one phrase (pass phrases=[...] or --phrase)")
    if n == 2:
        return list(OFFICIAL_PAIR)
    width = (1 - 2 * _AUTO_MARGIN - (n - 1) * _AUTO_GAP) / n
    if width <= 0.02:
        raise CompinvError(f"layout 'auto' cannot fit {n} phrases side by side; give boxes instead")
    return [(_AUTO_MARGIN + i * (width + _AUTO_GAP), _AUTO_TOP,
             _AUTO_MARGIN + i * (width + _AUTO_GAP) + width, _AUTO_BOTTOM) for i in range(n)]


def _same_phrase_key(phrase: str) -> str:
    """CLIP lowercases and splits on whitespace, so these spellings are the same phrase."""
    return " ".join(phrase.lower().split())


def resolve_layout(layout: LayoutLike, phrases: Sequence[str] | None = None) -> Layout:
    """Normalise a mapping, a list of (phrase, boxes) pairs, or "auto" with `phrases`."""
    if isinstance(layout, str):
        if layout != "auto":
            raise CompinvError(f"layout {layout!r}: give a mapping phrase -> boxes, or 'auto', "
                               "'anchor' or 'learned' with phrases=[...]")
        pairs = list(zip(phrases or [], ((b,) for b in auto_boxes(len(phrases or [])))))
    else:
        if phrases:
            raise CompinvError("phrases= is only used with layout='auto', 'anchor' or 'learned'; "
                               "an explicit layout names its phrases itself")
        items = layout.items() if isinstance(layout, Mapping) else layout
        pairs = [(str(p), _boxes(v, str(p))) for p, v in items]
    seen: dict[str, str] = {}
    for phrase, _ in pairs:
        key = _same_phrase_key(phrase)
        if not key:
            raise CompinvError("layout has an empty phrase; name words of the prompt")
        if key in seen:
            raise CompinvError(f"phrase {phrase!r} is given twice (also as {seen[key]!r}); give "
                               "all its boxes once, e.g. --box 'dog=0.1,0.1,0.4,0.4+0.6,0.6,0.9,0.9'")
        seen[key] = phrase
    return [(p.strip(), b) for p, b in pairs]


def parse_box_flag(spec: str) -> tuple[str, tuple[Box, ...]]:
    """CLI `--box 'PHRASE=x0,y0,x1,y1[+x0,y0,x1,y1...]'` -> (phrase, boxes)."""
    phrase, sep, boxes = spec.rpartition("=")
    if not sep or not phrase.strip():
        raise CompinvError(f"`boxes` {spec!r}: write PHRASE=x0,y0,x1,y1, e.g. 'backpack=0.6,0.2,0.95,0.8'")
    try:
        parsed = [tuple(float(v) for v in part.split(",")) for part in boxes.split("+")]
    except ValueError as exc:
        raise CompinvError(f"`boxes` {spec!r}: coordinates must be numbers, e.g. 0.1,0.2,0.5,0.8") from exc
    return phrase.strip(), tuple(check_box(b, phrase.strip()) for b in parsed)


def box_mask(boxes: Sequence[Box], height: int, width: int) -> torch.Tensor:
    """The union of boxes on an attention-map grid, rounded down as the official code does."""
    mask = torch.zeros(height, width)
    for x0, y0, x1, y1 in boxes:
        mask[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)] = 1.0
    return mask


def layout_to_json(layout: Layout) -> list[dict]:
    return [{"phrase": p, "boxes": [list(b) for b in boxes]} for p, boxes in layout]
