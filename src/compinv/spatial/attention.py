"""Record cross-attention probabilities with diffusers attention processors.

diffusers' default processor (SDPA) never materialises the attention probabilities, so on the
attn2 layers the loss reads we install a `RecordingProcessor` that wraps the processor already
there. While recording is off it calls that processor untouched (same numbers as without
compinv); while on it runs the processor's explicit-softmax twin with the same weights (a
Custom Diffusion processor keeps its own K/V) and hands the probabilities to the recorder.
The official code forked diffusers' UNet and attention files for this (docs/official-code.md,
"Bugs of the official code we do not repeat").
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
)

from compinv.errors import CompinvError

_ATTN2 = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.attentions\.(\d+)"
                    r"\.transformer_blocks\.(\d+)\.attn2\.processor$")
_STAGE = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


class StopForward(Exception):
    """Raised once the last attention map the loss reads is recorded: the rest of the UNet
    (the expensive high-resolution up blocks) would be computed for nothing."""


def _block(name: str) -> str:
    match = _ATTN2.match(name)
    return match.group(1) if match else ""


def _forward_order(name: str) -> tuple[int, ...]:
    """Sort key that puts attn2 layers in the order UNet2DConditionModel.forward runs them."""
    match = _ATTN2.match(name)
    stage = _STAGE[match.group(1).split(".")[0]]
    block = int(match.group(2) or match.group(3) or 0)
    return (stage, block, int(match.group(4)), int(match.group(5)))


def cross_attention_layers(unet: UNet2DConditionModel, blocks: Sequence[str] | str | None) -> list[str]:
    """attn2 processor names of the chosen blocks, in forward order.

    `blocks=None` is the official choice: the mid block and the first up block that has
    cross-attention; "all" is every block with cross-attention. Otherwise give diffusers block
    names such as "mid_block" or "up_blocks.1".
    """
    layers = sorted((n for n in unet.attn_processors if _ATTN2.match(n)), key=_forward_order)
    available = list(dict.fromkeys(_block(n) for n in layers))
    if blocks == "all":
        blocks = available
    if blocks is None:
        first_up = next((b for b in available if b.startswith("up_blocks")), None)
        blocks = [b for b in ("mid_block", first_up) if b in available]
    unknown = [b for b in blocks if b not in available]
    if unknown or not blocks:
        raise CompinvError(f"attention blocks {list(unknown or blocks)}: not blocks with cross-"
                           f"attention in this UNet; choose from {', '.join(available)}")
    return [n for n in layers if _block(n) in blocks]


def _explicit_twin(inner: object) -> object:
    """A processor computing the same attention as `inner` through `attn.get_attention_scores`."""
    if isinstance(inner, (AttnProcessor, CustomDiffusionAttnProcessor)):
        return inner
    if isinstance(inner, AttnProcessor2_0):
        return AttnProcessor()
    if isinstance(inner, (CustomDiffusionAttnProcessor2_0, CustomDiffusionXFormersAttnProcessor)):
        twin = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False,
                                            hidden_size=inner.hidden_size,
                                            cross_attention_dim=inner.cross_attention_dim)
        twin.train_kv, twin.train_q_out = inner.train_kv, inner.train_q_out
        for name in ("to_k_custom_diffusion", "to_v_custom_diffusion", "to_q_custom_diffusion",
                     "to_out_custom_diffusion"):
            if hasattr(inner, name):
                setattr(twin, name, getattr(inner, name))  # shared modules, not copies
        return twin
    raise CompinvError(
        f"cannot record cross-attention through {type(inner).__name__}; layout guidance supports "
        "diffusers' default and Custom Diffusion processors (call pipe.unet.set_default_attn_"
        "processor() or unfuse QKV projections first)")


class AttentionRecorder:
    """Collects the attention probabilities of the recording processors during one UNet pass.

    Modes: "off" (processors pass through), "guide" (keep each layer's per-head maps with their
    graph, raise StopForward after `stop_after`), "accumulate" (sum head-averaged maps of the
    conditional half of the batch over denoising steps, for heat-maps).

    `columns`: the token positions anyone reads (None: all); only those are kept, so a pass
    holds [batch, heads, HW, len(columns)] per layer, not every token's map.
    """

    def __init__(self, layers: Sequence[str], heads: str = "all"):
        self.layers = list(layers)
        self.heads = heads
        self.mode = "off"
        self.stop_after: str | None = self.layers[-1]
        self.batch_slice = slice(None)
        self.maps: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.columns: list[int] | None = None
        self.counts: dict[str, int] = {}  # accumulated passes per layer

    def record(self, name: str, probs: torch.Tensor, num_heads: int) -> None:
        """Store `probs` [batch*heads, HW, T] of layer `name` according to the mode."""
        maps = probs.unflatten(0, (-1, num_heads))
        if self.columns is not None:
            maps = maps[..., self.columns]
        if self.heads == "official":
            maps = maps[:, num_heads // 2 :]  # the official batch-chunk quirk: 4 of 8 heads
        if self.mode == "guide":
            self.maps[name] = maps
            if name == self.stop_after:
                raise StopForward
        else:
            mean = maps[self.batch_slice].mean(1).detach()
            self.sums[name] = self.sums[name] + mean if name in self.sums else mean
            self.counts[name] = self.counts.get(name, 0) + 1

    def take(self) -> dict[str, torch.Tensor]:
        """The maps of the pass just run, in layer order; forget them (and their graph)."""
        missing = [n for n in self.layers if n not in self.maps]
        if missing:
            raise RuntimeError(f"attention layers {missing} were not run; the UNet forward order "
                               "differs from UNet2DConditionModel's")
        maps, self.maps = {n: self.maps[n] for n in self.layers}, {}
        return maps


class _RecordingAttention:
    """Stands in for an Attention module inside one processor call: everything is the module's
    own except `get_attention_scores`, which also hands the probabilities to the recorder."""

    def __init__(self, attn: torch.nn.Module, recorder: AttentionRecorder, name: str):
        self._attn, self._recorder, self._name = attn, recorder, name

    def __getattr__(self, item: str):
        return getattr(self._attn, item)

    def get_attention_scores(self, query, key, attention_mask=None):
        probs = self._attn.get_attention_scores(query, key, attention_mask)
        self._recorder.record(self._name, probs, self._attn.heads)
        return probs


class RecordingProcessor(torch.nn.Module):
    """Wraps the processor of one attn2 layer; records its probabilities when asked to."""

    def __init__(self, inner: object, recorder: AttentionRecorder, name: str):
        super().__init__()
        self.inner = inner  # registered as a submodule when it is one (Custom Diffusion)
        self._twin = (_explicit_twin(inner),)  # a tuple: not registered twice
        self._recorder, self._name = recorder, name

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if self._recorder.mode == "off":
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        proxy = _RecordingAttention(attn, self._recorder, self._name)
        return self._twin[0](proxy, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


@contextlib.contextmanager
def recording(unet: UNet2DConditionModel, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Install recording processors on `recorder.layers` for the duration of the block."""
    original = dict(unet.attn_processors)
    wrapped = dict(original)
    for name in recorder.layers:
        wrapped[name] = RecordingProcessor(original[name], recorder, name)
    unet.set_attn_processor(wrapped)  # it empties the dict it is given: pass a copy
    try:
        yield recorder
    finally:
        unet.set_attn_processor(dict(original))
