"""`CompositionalStableDiffusionPipeline`: Stable Diffusion with layout-guided concepts.

A subclass of diffusers' `StableDiffusionPipeline` that adds `layout=` (and `phrases=`,
`guidance=`, `return_attention=`) to `__call__`. It hooks into the stock denoising loop through
diffusers' own extension points instead of a forked loop: `prepare_latents` (guidance of the
first step), `callback_on_step_end` (guidance of each following step, applied to the latents
the next UNet call sees) and attention processors (the maps the loss reads). Without a layout
it *is* `StableDiffusionPipeline.__call__`, so outputs are bit-identical.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import diffusers
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from compinv.errors import CompinvError
from compinv.spatial.attention import AttentionRecorder, cross_attention_layers, recording
from compinv.spatial.guidance import GuidedStep, Target, check_scheduler, guide_step, map_grid
from compinv.spatial.layout import Layout, LayoutLike, resolve_layout
from compinv.spatial.options import GuidanceConfig
from compinv.spatial.phrases import phrase_positions

# `--scheduler` names -> diffusers classes; "model" keeps the scheduler saved with the model.
SCHEDULER_CLASSES = {
    "lms": "LMSDiscreteScheduler",  # the official code's guided runs
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


def check_scheduler_name(name: str) -> None:
    """Refuse an unknown `--scheduler` name, listing the valid ones (also before any model loads)."""
    if name != "model" and name not in SCHEDULER_CLASSES:
        raise CompinvError(f"`scheduler` {name!r}: use one of model, {', '.join(SCHEDULER_CLASSES)}")


def use_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    """Swap in scheduler `name` built from the model's scheduler config ("model": keep it)."""
    check_scheduler_name(name)
    if name == "model":
        return
    pipe.scheduler = getattr(diffusers, SCHEDULER_CLASSES[name]).from_config(pipe.scheduler.config)


@dataclass
class CompositionalPipelineOutput(StableDiffusionPipelineOutput):
    """`images` and `nsfw_content_detected` as in diffusers, plus what guidance did.

    layout: the resolved layout [(phrase, boxes)]; guidance_losses: one entry per step that was
    guided, in order, so entry k is denoising step k: the unscaled attention loss (mean over the
    batch) of each iteration, before its update. Under the official stopping rule the list ends
    with the first step whose last loss met the threshold, so it can be shorter than
    `guided_steps`; attention_maps: per phrase, its cross-attention over the image,
    [batch, height, width] in [0, 1].
    """

    layout: Layout | None = None
    guidance_losses: list[list[float]] | None = None
    attention_maps: dict[str, torch.Tensor] | None = None


@dataclass
class _Session:
    """State of one guided `__call__`, read by the overridden hooks."""

    recorder: AttentionRecorder
    targets: list[Target]
    config: GuidanceConfig
    cond_embeds: torch.Tensor | None
    cross_attention_kwargs: dict | None
    heat_maps: bool
    image_size: tuple[int, int] = (0, 0)
    losses: list[list[float]] = field(default_factory=list)
    stopped: bool = False

    def guides(self, step_index: int) -> bool:
        """Whether denoising step `step_index` gets guidance iterations."""
        return (self.cond_embeds is not None and step_index < self.config.guided_steps
                and not self.stopped)

    def record(self, step: GuidedStep) -> None:
        """Keep the step's losses; under the official rule a converged step is the last one
        guided, because the official loop never recomputes a loss that met the threshold."""
        self.losses.append(step.losses)
        self.stopped = self.config.stop_rule == "official" and step.converged


class CompositionalStableDiffusionPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline + `layout=`: each phrase's cross-attention is steered into its boxes."""

    _session: _Session | None = None

    def __call__(self, prompt: str | list[str] | None = None, *args: Any,
                 layout: LayoutLike | None = None, phrases: list[str] | None = None,
                 guidance: GuidanceConfig | None = None, return_attention: bool = False,
                 **kwargs: Any):
        """Everything `StableDiffusionPipeline.__call__` takes, plus:

        layout: {phrase: box or [boxes]} with normalised (x0, y0, x1, y1), a list of
            (phrase, boxes) pairs, or "auto" with `phrases=[...]` (side by side, left to right).
        guidance: a GuidanceConfig; default the official constants.
        return_attention: also return each phrase's attention heat-map (layout phrases, or
            `phrases=` without a layout to just look).
        """
        if layout is None and not return_attention:
            if phrases or guidance:
                raise CompinvError("phrases= and guidance= need layout= (or return_attention=True)")
            return super().__call__(prompt, *args, **kwargs)
        call = inspect.signature(StableDiffusionPipeline.__call__).bind(self, prompt, *args, **kwargs)
        call.apply_defaults()
        arguments = call.arguments
        resolved = self._resolve_inputs(arguments, layout, phrases, guidance)
        self._session = self._start_session(arguments, *resolved, guide=layout is not None,
                                            heat_maps=return_attention)
        user_callback = arguments["callback_on_step_end"]
        inputs = (user_callback.tensor_inputs
                  if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks))
                  else list(arguments["callback_on_step_end_tensor_inputs"]))
        arguments["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys([*inputs, "latents"]))
        arguments["callback_on_step_end"] = self._step_end_hook(user_callback)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        try:
            with recording(self.unet, self._session.recorder):
                output = super().__call__(**arguments, **extra)
            session = self._session
        finally:
            self._session = None
        return self._output(output, session, resolved[0], arguments, return_attention)

    def _resolve_inputs(self, arguments: dict, layout: LayoutLike | None,
                        phrases: list[str] | None, guidance: GuidanceConfig | None):
        """Check every input before any model runs; map phrases to token positions."""
        prompt = arguments["prompt"]
        if not isinstance(prompt, str):
            raise CompinvError("layout guidance and attention maps need the prompt as one string "
                               "(not prompt_embeds or a list); call once per prompt")
        plan = (resolve_layout(layout, phrases) if layout is not None
                else [(p, ()) for p in dict.fromkeys(phrases or [])])
        if not plan:
            raise CompinvError("return_attention=True without a layout needs phrases=[...]")
        config = guidance or GuidanceConfig()
        if layout is not None:
            config.validated(arguments["num_inference_steps"])
            if config.guided_steps:
                check_scheduler(self.scheduler)
        positions = phrase_positions(self.tokenizer, prompt, [p for p, _ in plan],
                                     expand=lambda text: self.maybe_convert_prompt(text, self.tokenizer))
        targets = [Target(p, tuple(positions[p]), boxes) for p, boxes in plan]
        return plan, targets, config

    def _start_session(self, arguments: dict, plan: Layout, targets: list[Target],
                       config: GuidanceConfig, guide: bool, heat_maps: bool) -> _Session:
        recorder = AttentionRecorder(cross_attention_layers(self.unet, config.attention_blocks),
                                     heads=config.heads)
        cond = None
        if guide and config.guided_steps:
            with torch.no_grad():  # the loss differentiates w.r.t. the latents only
                cond = self.encode_prompt(arguments["prompt"], self._execution_device,
                                          arguments["num_images_per_prompt"], False,
                                          clip_skip=arguments["clip_skip"])[0]
        return _Session(recorder, targets, config, cond, arguments["cross_attention_kwargs"],
                        heat_maps)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device,
                        generator, latents=None):
        """The stock initial latents; with a layout, then guided for the first step."""
        latents = super().prepare_latents(batch_size, num_channels_latents, height, width, dtype,
                                          device, generator, latents)
        session = self._session
        if session is not None:
            session.recorder.batch_slice = (slice(batch_size, None) if self.do_classifier_free_guidance
                                            else slice(None))
            session.recorder.mode = "accumulate" if session.heat_maps else "off"
            session.image_size = (height, width)
            if session.guides(0):
                latents = self._guide(latents, 0)
        return latents

    def _guide(self, latents: torch.Tensor, step_index: int) -> torch.Tensor:
        session = self._session
        step = guide_step(self.unet, self.scheduler, session.recorder, latents, step_index,
                          session.cond_embeds, session.targets, session.config,
                          session.cross_attention_kwargs)
        session.record(step)
        return step.latents

    def _step_end_hook(self, user_callback):
        """A `callback_on_step_end` that runs the user's callback, then guides the next step."""

        def hook(pipe, step_index, timestep, tensors):
            outputs = dict(user_callback(pipe, step_index, timestep, tensors) or {}) if user_callback else {}
            if self._session.guides(step_index + 1):
                outputs["latents"] = self._guide(outputs.get("latents", tensors["latents"]),
                                                 step_index + 1)
            return outputs

        return hook

    def _output(self, output, session: _Session, plan: Layout, arguments: dict,
                return_attention: bool):
        images, nsfw = (output.images, output.nsfw_content_detected) if arguments["return_dict"] else output
        maps = self._heat_maps(session) if return_attention else None
        layout = plan if any(boxes for _, boxes in plan) else None  # None: phrases only looked at
        losses = session.losses if layout else None
        if not arguments["return_dict"]:
            return images, nsfw, losses, maps
        return CompositionalPipelineOutput(images=images, nsfw_content_detected=nsfw,
                                           layout=layout, guidance_losses=losses, attention_maps=maps)

    def _heat_maps(self, session: _Session) -> dict[str, torch.Tensor]:
        """Each phrase's attention averaged over steps, recorded layers and its tokens,
        upsampled to the image and scaled to [0, 1] per image."""
        height, width = session.image_size
        sums = session.recorder.sums
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        maps = {}
        for target in session.targets:
            layers = []
            for total in sums.values():
                grid = map_grid(total.shape[1], latent_hw)
                per_token = total[..., list(target.positions)].mean(-1).unflatten(1, grid)
                layers.append(F.interpolate(per_token[:, None].float(), size=(height, width),
                                            mode="bilinear", align_corners=False)[:, 0])
            heat = torch.stack(layers).mean(0)
            peak = heat.flatten(1).amax(1).clamp_min(1e-12)
            maps[target.phrase] = (heat / peak[:, None, None]).cpu()
        return maps
