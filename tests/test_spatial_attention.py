"""Recording processors: exact probabilities, early exit, Custom Diffusion, SD 2.x heads."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    AttnProcessor2_0, CustomDiffusionAttnProcessor2_0, XFormersAttnProcessor,
)

from compinv.errors import CompinvError
from compinv.models import build_tiny_pipeline
from compinv.spatial.attention import AttentionRecorder, cross_attention_layers, recording
from compinv.spatial.guidance import Target, attention_loss, guided_pass

MID = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
TARGETS = [Target("cat", (2,), ((0.1, 0.2, 0.5, 0.8),)), Target("pack", (5, 6), ((0.6, 0.2, 0.95, 0.8),))]


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def inputs(pipe):
    torch.manual_seed(0)
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat and a red backpack", "cpu", 1, False)[0]
    return torch.randn(1, 4, 16, 16), torch.tensor(700), embeds


def _module(unet, processor_name):
    return unet.get_submodule(processor_name.removesuffix(".processor"))


def _manual_probs(attn, hidden, context, key_proj=None):
    """softmax(Q K^T / sqrt(d)) per head, written out by hand."""
    q = attn.to_q(hidden)
    k = (key_proj or attn.to_k)(context)
    d = q.shape[-1] // attn.heads
    q = q.unflatten(-1, (attn.heads, d)).transpose(1, 2)
    k = k.unflatten(-1, (attn.heads, d)).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)


def _capture_inputs(module):
    seen = {}

    def hook(mod, args, kwargs):
        seen["hidden"], seen["context"] = args[0], kwargs["encoder_hidden_states"]

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_default_layers_are_mid_and_first_up_block_in_forward_order(pipe):
    layers = cross_attention_layers(pipe.unet, None)
    assert layers[0] == MID
    assert all(n.startswith("up_blocks.1.") for n in layers[1:]) and len(layers) == 3
    with pytest.raises(CompinvError, match="choose from"):
        cross_attention_layers(pipe.unet, ["up_blocks.0"])


def test_recorded_probabilities_equal_a_manual_softmax(pipe, inputs):
    latents, t, embeds = inputs
    recorder = AttentionRecorder(cross_attention_layers(pipe.unet, None))
    seen, handle = _capture_inputs(_module(pipe.unet, MID))
    try:
        with torch.no_grad(), recording(pipe.unet, recorder):
            maps = guided_pass(pipe.unet, recorder, latents, t, embeds, None)
    finally:
        handle.remove()
    expected = _manual_probs(_module(pipe.unet, MID), seen["hidden"], seen["context"])
    assert maps[MID].shape == expected.shape == (1, 2, 64, 77)
    torch.testing.assert_close(maps[MID], expected, rtol=1e-5, atol=1e-6)


def test_official_heads_option_keeps_the_second_half_of_the_heads(pipe, inputs):
    latents, t, embeds = inputs
    maps = {}
    for heads in ("all", "official"):
        recorder = AttentionRecorder(cross_attention_layers(pipe.unet, None), heads=heads)
        with torch.no_grad(), recording(pipe.unet, recorder):
            maps[heads] = guided_pass(pipe.unet, recorder, latents, t, embeds, None)[MID]
    torch.testing.assert_close(maps["official"], maps["all"][:, 1:])


def test_guidance_pass_stops_after_the_last_map_with_the_same_gradient(pipe, inputs):
    latents, t, embeds = inputs
    calls = []
    handle = pipe.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    grads = []
    try:
        for stop in ("last", None):
            recorder = AttentionRecorder(cross_attention_layers(pipe.unet, None))
            recorder.stop_after = recorder.layers[-1] if stop else None
            z = latents.clone().requires_grad_(True)
            with recording(pipe.unet, recorder):
                loss = attention_loss(guided_pass(pipe.unet, recorder, z, t, embeds, None),
                                      TARGETS, (16, 16))
            grads.append(torch.autograd.grad(loss.sum(), z)[0])
            assert recorder.maps == {}  # nothing (and no graph) kept after the pass
    finally:
        handle.remove()
    assert len(calls) == 1  # only the reference pass reached the UNet's output layer
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_processors_are_restored_and_unsupported_ones_rejected(pipe):
    before = dict(pipe.unet.attn_processors)
    recorder = AttentionRecorder(cross_attention_layers(pipe.unet, None))
    with recording(pipe.unet, recorder):
        assert type(pipe.unet.attn_processors[MID]).__name__ == "RecordingProcessor"
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
    pipe.unet.set_attn_processor(XFormersAttnProcessor())
    try:
        with pytest.raises(CompinvError, match="XFormersAttnProcessor"):
            with recording(pipe.unet, recorder):
                pass
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_custom_diffusion_processors_stay_in_effect_while_recording(inputs):
    pipe = build_tiny_pipeline()
    unet = pipe.unet
    latents, t, embeds = inputs
    with torch.no_grad():
        plain = unet(latents, t, encoder_hidden_states=embeds).sample
    processors = {}
    for name, proc in unet.attn_processors.items():
        attn = _module(unet, name)
        processors[name] = (CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features) if name.endswith("attn2.processor") else proc)
    unet.set_attn_processor(dict(processors))
    custom = processors[MID]
    keys_before = set(unet.state_dict())
    with torch.no_grad():
        with_cd = unet(latents, t, encoder_hidden_states=embeds).sample
        recorder = AttentionRecorder(cross_attention_layers(unet, None))
        seen, handle = _capture_inputs(_module(unet, MID))
        with recording(unet, recorder):
            recorder.mode = "accumulate"
            recorded = unet(latents, t, encoder_hidden_states=embeds).sample
        handle.remove()
    assert not torch.allclose(with_cd, plain, atol=1e-4)  # the CD weights matter
    torch.testing.assert_close(recorded, with_cd, rtol=1e-4, atol=1e-5)
    expected = _manual_probs(_module(unet, MID), seen["hidden"], seen["context"],
                             key_proj=custom.to_k_custom_diffusion).mean(1)
    torch.testing.assert_close(recorder.sums[MID], expected, rtol=1e-5, atol=1e-6)
    assert unet.attn_processors[MID] is custom and set(unet.state_dict()) == keys_before


def test_sd2_style_head_counts_per_block():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32)
    recorder = AttentionRecorder(cross_attention_layers(unet, None))
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    with recording(unet, recorder):
        maps = guided_pass(unet, recorder, z, torch.tensor(500), torch.randn(1, 77, 24), None)
    heads = {name.split(".")[0]: m.shape[1] for name, m in maps.items()}
    assert heads == {"mid_block": 4, "up_blocks": 2}
    loss = attention_loss(maps, TARGETS, (8, 8))
    (grad,) = torch.autograd.grad(loss.sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
