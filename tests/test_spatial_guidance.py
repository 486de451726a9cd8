"""The attention loss, noise levels and the guided latent update."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, LMSDiscreteScheduler

from compinv.errors import CompinvError
from compinv.models import build_tiny_pipeline
from compinv.spatial.attention import AttentionRecorder, cross_attention_layers, recording
from compinv.spatial.guidance import (
    Target, attention_loss, check_scheduler, guide_step, guided_pass, map_grid, noise_level,
)
from compinv.spatial.options import GuidanceConfig

LEFT = (0.0, 0.0, 0.5, 1.0)


def _map(grid: torch.Tensor, token: int = 1, tokens: int = 3) -> torch.Tensor:
    """[1 batch, 1 head, HW, tokens] with `grid` as the token's attention."""
    probs = torch.full((1, 1, grid.numel(), tokens), 0.1)
    probs[0, 0, :, token] = grid.flatten()
    return probs


def test_loss_is_zero_inside_the_box_and_area_based_for_uniform_attention():
    inside = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert attention_loss({"m": _map(inside)}, [Target("a", (1,), (LEFT,))], (2, 2)).item() == 0
    uniform = torch.ones(2, 2)
    loss = attention_loss({"m": _map(uniform)}, [Target("a", (1,), (LEFT,))], (2, 2))
    assert loss.item() == pytest.approx((1 - 0.5) ** 2)
    # two maps, two concepts: the sum is divided by (#concepts x #maps)
    targets = [Target("a", (1,), (LEFT,)), Target("b", (2,), ((0.5, 0.0, 1.0, 1.0),))]
    two = {"m1": _map(inside), "m2": _map(inside)}
    two["m1"][..., 2] = inside.flatten()  # b attends left: act 0, term 1
    two["m2"][..., 2] = inside.flip(1).flatten()  # b attends right: term 0
    assert attention_loss(two, targets, (2, 2)).item() == pytest.approx(1 / 4)


def test_map_grid_handles_non_square_latents():
    assert map_grid(8 * 12, (16, 24)) == (8, 12)
    assert map_grid(5 * 7, (9, 13)) == (5, 7)  # odd sizes round up at each level


def test_noise_level_uses_sigmas_else_alphas():
    lms = LMSDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    lms.set_timesteps(10)
    assert noise_level(lms, 3, lms.timesteps[3]) == pytest.approx(float(lms.sigmas[3]))
    ddim = DDIMScheduler.from_config(lms.config)
    ddim.set_timesteps(10)
    t = ddim.timesteps[0]
    a = ddim.alphas_cumprod[t]
    assert noise_level(ddim, 0, t) == pytest.approx(float(((1 - a) / a).sqrt()), rel=1e-5)
    del ddim.alphas_cumprod
    with pytest.raises(CompinvError, match="noise level"):
        check_scheduler(ddim)


def test_bad_guidance_settings_are_rejected():
    with pytest.raises(CompinvError, match="guided steps 11"):
        GuidanceConfig(guided_steps=11).validated(10)
    with pytest.raises(CompinvError, match="heads"):
        GuidanceConfig(heads="some").validated(10)
    with pytest.raises(CompinvError, match="stop rule 'never': use one of official, per-step"):
        GuidanceConfig(stop_rule="never").validated(10)


def test_guidance_lowers_the_attention_loss_on_the_tiny_model():
    pipe = build_tiny_pipeline()
    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(20)
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat and a red backpack", "cpu", 1, False)[0]
    targets = [Target("cat", (2,), ((0.1, 0.2, 0.5, 0.8),)),
               Target("backpack", (5, 6), ((0.6, 0.2, 0.95, 0.8),))]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = latents * scheduler.init_noise_sigma
    recorder = AttentionRecorder(cross_attention_layers(pipe.unet, None))
    config = GuidanceConfig(max_iterations=3, loss_threshold=0.0)

    def loss_at(z):
        with torch.no_grad():
            maps = guided_pass(pipe.unet, recorder, scheduler.scale_model_input(z, scheduler.timesteps[0]),
                               scheduler.timesteps[0], embeds, None)
        return attention_loss(maps, targets, (16, 16)).item()

    with recording(pipe.unet, recorder):
        before = loss_at(latents)
        step = guide_step(pipe.unet, scheduler, recorder, latents, 0, embeds, targets, config)
        after = loss_at(step.latents)
    assert len(step.losses) == 3 and step.losses[0] == pytest.approx(before)
    assert after < before and step.losses == sorted(step.losses, reverse=True)
    assert not step.converged  # threshold 0 is never met
    assert recorder.mode == "off" and not step.latents.requires_grad


def test_threshold_stops_guidance_early():
    pipe = build_tiny_pipeline()
    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(20)
    embeds = torch.zeros(1, 77, 32)
    targets = [Target("x", (1,), ((0.0, 0.0, 1.0, 1.0),))]  # the whole image: loss 0
    recorder = AttentionRecorder(cross_attention_layers(pipe.unet, None))
    with recording(pipe.unet, recorder):
        step = guide_step(pipe.unet, scheduler, recorder, torch.randn(1, 4, 16, 16), 0,
                          embeds, targets, GuidanceConfig())
    assert len(step.losses) == 1 and step.losses[0] == pytest.approx(0.0, abs=1e-6)
    assert step.converged


def test_a_batch_converges_only_when_every_image_meets_the_threshold():
    pipe = build_tiny_pipeline()
    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        embeds = pipe.encode_prompt("a cat and a red backpack", "cpu", 2, False)[0]
    targets = [Target("cat", (2,), ((0.1, 0.2, 0.5, 0.8),)),
               Target("backpack", (5, 6), ((0.6, 0.2, 0.95, 0.8),))]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    latents = latents * scheduler.init_noise_sigma
    recorder = AttentionRecorder(cross_attention_layers(pipe.unet, None))
    with recording(pipe.unet, recorder):
        with torch.no_grad():
            maps = guided_pass(pipe.unet, recorder, scheduler.scale_model_input(latents, t), t,
                               embeds, None)
        low, high = sorted(attention_loss(maps, targets, (16, 16)).tolist())
        steps = {threshold: guide_step(pipe.unet, scheduler, recorder, latents, 0, embeds, targets,
                                       GuidanceConfig(max_iterations=2, loss_threshold=threshold))
                 for threshold in (low, high)}
    assert low < high
    assert not steps[low].converged and len(steps[low].losses) == 2  # one image is not enough
    assert steps[high].converged and steps[high].losses == [pytest.approx((low + high) / 2)]


def test_update_scale_is_the_official_sigma_squared_in_each_schedulers_space():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LMSDiscreteScheduler

    from compinv.spatial.guidance import update_scale

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    lms = LMSDiscreteScheduler(**betas)
    lms.set_timesteps(25)
    assert update_scale(lms, 0, lms.timesteps[0]) == pytest.approx(float(lms.sigmas[0]) ** 2)
    for vp in (DDIMScheduler(**betas), DPMSolverMultistepScheduler(**betas)):
        vp.set_timesteps(25)
        t = vp.timesteps[0]
        alpha = float(vp.alphas_cumprod[int(t)])
        # x_t = sqrt(alpha) z: a step of sigma^2 on z is a step of (1 - alpha) on x_t.
        assert update_scale(vp, 0, t) == pytest.approx(1 - alpha, rel=1e-4)
        assert update_scale(vp, 0, t) < 1.0
