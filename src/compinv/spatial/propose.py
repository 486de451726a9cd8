"""Layouts the model proposes: each phrase's box read off its early cross-attention.

`layout="anchor"` denoises the first `proposal_steps` steps of the prompt with every concept
token replaced by its anchor word(s) (an inverted token's own attention is what spatial
inversion distrusts), averages each phrase's cross-attention over those steps, the recorded
layers and the phrase's tokens, and turns it into one box with `box_from_heat`:

1. scale the map to [0, 1] (minimum 0, maximum 1);
2. keep the cells at or above `threshold` (default 0.5, half-maximum);
3. take the 4-connected region of those cells that holds the maximum;
4. its bounding box, widened about its centre to at least `MIN_SIDE` of the image per side.

The real, guided generation then starts from the same initial noise with those boxes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from compinv.errors import CompinvError
from compinv.spatial.layout import Box

MIN_SIDE = 0.125


def box_from_heat(heat: torch.Tensor | np.ndarray, threshold: float = 0.5) -> Box:
    """One normalised box around the peak region of a [H, W] attention map (rule above)."""
    heat = np.asarray(heat, dtype=np.float64)
    height, width = heat.shape
    span = heat.max() - heat.min()
    scaled = (heat - heat.min()) / span if span > 0 else np.ones_like(heat)
    regions, _ = ndimage.label(scaled >= threshold)
    peak = np.unravel_index(int(np.argmax(scaled)), scaled.shape)
    rows, cols = np.nonzero(regions == regions[peak])
    box = [cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height]
    for lo, hi in ((0, 2), (1, 3)):
        side = box[hi] - box[lo]
        if side < MIN_SIDE:
            centre = min(max((box[lo] + box[hi]) / 2, MIN_SIDE / 2), 1 - MIN_SIDE / 2)
            box[lo], box[hi] = centre - MIN_SIDE / 2, centre + MIN_SIDE / 2
    return tuple(float(v) for v in box)


def anchor_text(text: str, anchors: Mapping[str, str]) -> str:
    """`text` with each concept token (and its `_1`, `_2`... vectors) replaced by its anchor words.

    Tokens are matched as whole words, so "<cat>" is not replaced inside "<cat>-like".
    """
    for token, words in sorted(anchors.items(), key=lambda item: -len(item[0])):
        text = re.sub(rf"(?<!\S){re.escape(token)}(_\d+)?(?!\S)", words, text)
    return " ".join(text.split())


def check_anchors(texts: Sequence[str], added_tokens: set[str], anchors: Mapping[str, str]) -> None:
    """Every concept token in `texts` needs an anchor; otherwise one error naming the fix."""
    for text in texts:
        for word in text.split():
            base = re.sub(r"_\d+$", "", word)
            if word in added_tokens and base not in anchors:
                raise CompinvError(f"`anchors`: concept token {base!r} has no anchor word; give it "
                                   f"as {base}=WORD (in Python {{{base!r}: 'cat'}}), or load the "
                                   "concept from its run folder, which records it")
