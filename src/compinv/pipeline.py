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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import diffusers
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from compinv.errors import CompinvError
from compinv.spatial.attention import AttentionRecorder, cross_attention_layers, recording
from compinv.spatial.guidance import (
    GuidedStep, Target, TargetBatch, check_scheduler, guide_step, map_grid,
)
from compinv.spatial.layout import Box, Layout, resolve_layout
from compinv.spatial.layout_model import SHIPPED as SHIPPED_LAYOUT_MODELS, load_layout_model
from compinv.spatial.options import GuidanceConfig
from compinv.spatial.phrases import phrase_positions
from compinv.spatial.propose import anchor_text, box_from_heat, check_anchors

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

    layouts: the layout each image was guided with, [(phrase, boxes)] per image; layout: that
    layout when every image shares it, else None; guidance_losses: one entry per step that was
    guided, in order, so entry k is denoising step k: the unscaled attention loss (mean over the
    images guided) of each iteration, before its update. Under the official stopping rule the
    list ends with the first step where every image's last loss met the threshold;
    image_guidance_losses: the same per image, [image][step][iteration] (an image's list ends
    with its own first step that met the threshold); attention_maps: per phrase, its
    cross-attention over the image, [batch, height, width] in [0, 1] (zeros for an image whose
    layout lacks the phrase); image_attention_maps / image_attention_mass: per image, each of
    its phrases' map and mean attention probability (over steps, recorded layers, the phrase's
    tokens and the image), in the order of its layout; their ratios are the phrases' shares.
    """

    layout: Layout | None = None
    guidance_losses: list[list[float]] | None = None
    attention_maps: dict[str, torch.Tensor] | None = None
    layouts: list[Layout] | None = None
    image_guidance_losses: list[list[list[float]]] | None = None
    image_attention_maps: list[list[torch.Tensor]] | None = None
    image_attention_mass: list[list[float]] | None = None


@dataclass
class _Session:
    """State of one guided `__call__`, read by the overridden hooks."""

    recorder: AttentionRecorder
    targets: TargetBatch
    config: GuidanceConfig
    cond_embeds: torch.Tensor | None
    cross_attention_kwargs: dict | None
    heat_maps: bool
    image_size: tuple[int, int] = (0, 0)
    losses: list[list[float]] = field(default_factory=list)
    image_losses: list[list[list[float]]] = field(default_factory=list)
    stopped: torch.Tensor | None = None

    def guides(self, step_index: int) -> bool:
        """Whether denoising step `step_index` gets guidance iterations (for some image)."""
        return (self.cond_embeds is not None and step_index < self.config.guided_steps
                and not bool(self.stopped.all()))

    def record(self, step: GuidedStep) -> None:
        """Keep the step's losses; under the official rule an image whose step converged is
        not guided again, because the official loop never recomputes a loss that met the
        threshold. Each image decides for itself."""
        self.losses.append(step.losses)
        for image, values in enumerate(step.image_losses):
            if values:
                self.image_losses[image].append(values)
        if self.config.stop_rule == "official":
            self.stopped |= step.done


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)


def per_image_layouts(layout: Any, num_images: int) -> list[Any]:
    """One layout request per image. A list whose items are not (phrase, boxes) pairs is a
    per-image list ("auto"/"anchor"/"learned", mappings or pair lists) and needs one per image."""
    if isinstance(layout, (list, tuple)) and layout and not all(_is_pair(x) for x in layout):
        if len(layout) != num_images:
            raise CompinvError(f"`layout`: a per-image list of {len(layout)} layouts for {num_images} "
                               "images; give one per image (len(prompt) x num_images_per_prompt) "
                               "or one layout for all")
        return list(layout)
    return [layout] * num_images


def _per_image_phrases(phrases: Any, num_images: int) -> list[list[str]]:
    """`phrases=[...]` shared by every image, or one list per image."""
    if phrases and all(isinstance(p, (list, tuple)) for p in phrases):
        if len(phrases) != num_images:
            raise CompinvError(f"`phrases`: {len(phrases)} per-image phrase lists for {num_images} "
                               "images; give one list per image or one list for all")
        return [list(p) for p in phrases]
    return [list(phrases or [])] * num_images


class CompositionalStableDiffusionPipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline + `layout=`: each phrase's cross-attention is steered into its boxes."""

    _session: _Session | None = None

    def __call__(self, prompt: str | list[str] | None = None, *args: Any,
                 layout: Any = None, phrases: list[str] | list[list[str]] | None = None,
                 guidance: GuidanceConfig | None = None, return_attention: bool = False,
                 anchors: Mapping[str, str] | None = None, layout_model: Any = None,
                 layout_temperature: float = 1.0, **kwargs: Any):
        """Everything `StableDiffusionPipeline.__call__` takes, plus:

        layout: {phrase: box or [boxes]} with normalised (x0, y0, x1, y1), a list of
            (phrase, boxes) pairs, or with `phrases=[...]`: "auto" (side by side, left to
            right), "anchor" (the model proposes the boxes from the anchor prompt's early
            attention, compinv.spatial.propose) or "learned" (sampled from `layout_model`).
            A list of such layouts gives each image its own (one per image).
        phrases: the phrases to place (one list for all images, or one list per image).
        anchors: {concept token: anchor words} for "anchor" and "learned" (default: read
            from the run by load_concepts into `pipe.concept_anchors`).
        layout_model: a LayoutPredictor, a folder from `compinv train layout`, or a shipped
            name ("toy"); layout_temperature: 0 is the most typical layout, 1 the learned spread.
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
        extra = arguments.pop("kwargs", {})
        requests = dict(anchors=anchors, layout_model=layout_model, temperature=layout_temperature)
        plans, targets, config = self._resolve_inputs(arguments, layout, phrases, guidance, requests)
        self._session = self._start_session(arguments, targets, config, guide=layout is not None,
                                            heat_maps=return_attention)
        user_callback = arguments["callback_on_step_end"]
        inputs = (user_callback.tensor_inputs
                  if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks))
                  else list(arguments["callback_on_step_end_tensor_inputs"]))
        arguments["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys([*inputs, "latents"]))
        arguments["callback_on_step_end"] = self._step_end_hook(user_callback)
        arguments.pop("self")
        try:
            with recording(self.unet, self._session.recorder):
                output = super().__call__(**arguments, **extra)
            session = self._session
        finally:
            self._session = None
        return self._output(output, session, plans, arguments, return_attention)

    def _image_prompts(self, arguments: dict) -> list[str]:
        prompt = arguments["prompt"]
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise CompinvError("layout guidance and attention maps need `prompt` as a string or a "
                               "list of strings (not prompt_embeds)")
        return [p for p in prompt for _ in range(arguments["num_images_per_prompt"] or 1)]

    def _resolve_inputs(self, arguments: dict, layout: Any, phrases: Any,
                        guidance: GuidanceConfig | None, requests: dict):
        """Check every input before the guided run; each image's layout and token positions."""
        prompts = self._image_prompts(arguments)
        config = guidance or GuidanceConfig()
        if layout is not None:
            config.validated(arguments["num_inference_steps"])
            if config.guided_steps:
                check_scheduler(self.scheduler)
        wanted = _per_image_phrases(phrases, len(prompts))
        if layout is None:
            plans = [[(p, ()) for p in dict.fromkeys(w)] for w in wanted]
            if not all(plans):
                raise CompinvError("return_attention=True without a layout needs phrases=[...]")
        else:
            plans = self._plans(arguments, prompts, per_image_layouts(layout, len(prompts)), wanted,
                                config, requests)
        expand = lambda text: self.maybe_convert_prompt(text, self.tokenizer)  # noqa: E731
        targets = []
        for prompt, plan in zip(prompts, plans):
            positions = phrase_positions(self.tokenizer, prompt, [p for p, _ in plan], expand=expand)
            targets.append([Target(p, tuple(positions[p]), boxes) for p, boxes in plan])
        return plans, TargetBatch(targets), config

    def _plans(self, arguments: dict, prompts: list[str], layouts: list, wanted: list[list[str]],
               config: GuidanceConfig, requests: dict) -> list[Layout]:
        """Resolve each image's layout request; "anchor" and "learned" images in one batch each."""
        plans: list[Layout | None] = [None] * len(prompts)
        for mode in ("anchor", "learned"):
            rows = [i for i, value in enumerate(layouts) if isinstance(value, str) and value == mode]
            for i in rows:
                if not wanted[i]:
                    raise CompinvError(f"layout {mode!r} needs the phrases to place: phrases=[...]")
            if not rows:
                continue
            anchors = requests["anchors"] if requests["anchors"] is not None else getattr(
                self, "concept_anchors", {})
            texts = [prompts[i] for i in rows] + [p for i in rows for p in wanted[i]]
            check_anchors(texts, set(getattr(self.tokenizer, "added_tokens_encoder", {})), anchors)
            if mode == "anchor":
                boxes = self._propose(arguments, rows, prompts, wanted, anchors, config)
            else:
                boxes = self._sample_learned(arguments, rows, prompts, wanted, anchors, requests)
            for i, image_boxes in zip(rows, boxes):
                plans[i] = resolve_layout([(p, b) for p, b in zip(wanted[i], image_boxes)])
        for i, value in enumerate(layouts):
            if plans[i] is None:
                plans[i] = resolve_layout(value, wanted[i] or None)
        return plans

    def _initial_noise(self, arguments: dict, num_images: int) -> torch.Tensor:
        """The unscaled initial latents (what `prepare_latents` draws), drawn once so that the
        proposal and the real generation start from the same noise."""
        if arguments["latents"] is not None:
            return arguments["latents"]
        height = arguments["height"] or self.unet.config.sample_size * self.vae_scale_factor
        width = arguments["width"] or self.unet.config.sample_size * self.vae_scale_factor
        shape = (num_images, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        noise = randn_tensor(shape, generator=arguments["generator"], device=self._execution_device,
                             dtype=self.text_encoder.dtype)
        arguments["latents"] = noise
        return noise

    def _propose(self, arguments: dict, rows: list[int], prompts: list[str], wanted: list[list[str]],
                 anchors: Mapping[str, str], config: GuidanceConfig) -> list[list[Box]]:
        """Boxes from the anchor prompts' attention over the first `proposal_steps` steps."""
        noise = self._initial_noise(arguments, len(prompts))
        steps = min(config.proposal_steps, arguments["num_inference_steps"])
        generator = arguments["generator"]
        if isinstance(generator, list):
            generator = [_copy_generator(generator[i]) for i in rows]
        elif generator is not None:
            generator = _copy_generator(generator)
        negative = arguments["negative_prompt"]
        if isinstance(negative, (list, tuple)):
            per_prompt = len(prompts) // len(negative)
            negative = [negative[i // per_prompt] for i in rows]

        def stop(pipe, step_index, timestep, tensors):
            if step_index + 1 >= steps:
                pipe._interrupt = True
            return {}

        heat = self.propose_attention([anchor_text(prompts[i], anchors) for i in rows],
                                      [[anchor_text(p, anchors) for p in wanted[i]] for i in rows],
                                      latents=noise[rows], generator=generator,
                                      negative_prompt=negative, stop=stop, blocks=config.attention_blocks,
                                      **{k: arguments[k] for k in ("num_inference_steps", "guidance_scale",
                                                                  "height", "width")})
        return [[box_from_heat(maps[k], config.proposal_threshold) for k in range(len(maps))]
                for maps in heat]

    def propose_layouts(self, prompts: list[str], phrases: list[list[str]],
                        anchors: Mapping[str, str] | None = None, num_inference_steps: int = 50,
                        guidance_scale: float = 7.5, generator=None, height: int | None = None,
                        width: int | None = None, guidance: GuidanceConfig | None = None,
                        ) -> list[Layout]:
        """What layout="anchor" would guide each prompt with, without generating: one Layout
        per prompt (one image each). Used to harvest training layouts for a layout model."""
        config = (guidance or GuidanceConfig()).validated(num_inference_steps)
        anchors = dict(getattr(self, "concept_anchors", {}) if anchors is None else anchors)
        check_anchors(list(prompts) + [p for ps in phrases for p in ps],
                      set(getattr(self.tokenizer, "added_tokens_encoder", {})), anchors)
        arguments = dict(latents=None, generator=generator, height=height, width=width,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         negative_prompt=None)
        boxes = self._propose(arguments, list(range(len(prompts))), list(prompts),
                              [list(p) for p in phrases], anchors, config)
        return [resolve_layout([(p, b) for p, b in zip(ps, image)]) for ps, image in zip(phrases, boxes)]

    def propose_attention(self, prompts: list[str], phrases: list[list[str]], stop, blocks=None,
                          **kwargs) -> list[list[torch.Tensor]]:
        """Each image's phrases' attention heat-maps [H, W] over the steps run before `stop`
        interrupts the loop (a `callback_on_step_end`), without decoding any image."""
        out = self(prompts, phrases=phrases, return_attention=True, output_type="latent",
                   callback_on_step_end=stop, guidance=GuidanceConfig(attention_blocks=blocks),
                   **kwargs)
        return out.image_attention_maps

    def _sample_learned(self, arguments: dict, rows: list[int], prompts: list[str],
                        wanted: list[list[str]], anchors: Mapping[str, str], requests: dict
                        ) -> list[list[Box]]:
        """Boxes sampled from the layout model, from the anchor prompts' encodings."""
        if requests["layout_model"] is None:
            raise CompinvError("layout 'learned' needs `layout_model`: a folder from `compinv "
                               f"train layout` or one of: {', '.join(SHIPPED_LAYOUT_MODELS)}")
        temperature = float(requests["temperature"])
        if not 0.0 <= temperature <= 10.0:
            raise CompinvError(f"`layout_temperature` {temperature}: must be between 0 and 10")
        model = load_layout_model(requests["layout_model"])
        model.check(self.text_encoder.config.hidden_size, max(len(wanted[i]) for i in rows))
        texts = [anchor_text(prompts[i], anchors) for i in rows]
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            encoded = self.text_encoder(ids.to(self.text_encoder.device))[0].cpu()
        generator = arguments["generator"]
        if isinstance(generator, list):  # each image's layout from its own seed, as its noise is
            samplers = [_layout_sampler(generator[row]) for row in rows]
        else:
            samplers = [_layout_sampler(generator)] * len(rows)
        boxes = [model.sample(encoded[k:k + 1], model.max_phrases, temperature, sampler)[0]
                 for k, sampler in enumerate(samplers)]
        result = []
        for row, image_boxes in zip(rows, boxes):
            order = _prompt_order(texts[rows.index(row)],
                                  [anchor_text(p, anchors) for p in wanted[row]])
            result.append([image_boxes[order.index(k)] for k in range(len(wanted[row]))])
        return result

    def _start_session(self, arguments: dict, targets: TargetBatch, config: GuidanceConfig,
                       guide: bool, heat_maps: bool) -> _Session:
        recorder = AttentionRecorder(cross_attention_layers(self.unet, config.attention_blocks),
                                     heads=config.heads)
        recorder.columns = targets.columns
        cond = None
        if guide and config.guided_steps:
            with torch.no_grad():  # the loss differentiates w.r.t. the latents only
                cond = self.encode_prompt(arguments["prompt"], self._execution_device,
                                          arguments["num_images_per_prompt"], False,
                                          clip_skip=arguments["clip_skip"])[0]
        num_images = len(targets.targets)
        return _Session(recorder, targets, config, cond, arguments["cross_attention_kwargs"],
                        heat_maps, image_losses=[[] for _ in range(num_images)],
                        stopped=torch.zeros(num_images, dtype=torch.bool))

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
                          session.cross_attention_kwargs, active=~session.stopped)
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

    def _output(self, output, session: _Session, plans: list[Layout], arguments: dict,
                return_attention: bool):
        images, nsfw = (output.images, output.nsfw_content_detected) if arguments["return_dict"] else output
        per_image = self._heat_maps(session) if return_attention else None
        maps = None
        if per_image is not None:
            height, width = session.image_size
            names = list(dict.fromkeys(p for image in per_image for p in image))
            maps = {p: torch.stack([image[p][0] if p in image else torch.zeros(height, width)
                                    for image in per_image]) for p in names}
        guided = any(boxes for plan in plans for _, boxes in plan)  # else phrases only looked at
        layouts = plans if guided else None
        layout = plans[0] if guided and all(plan == plans[0] for plan in plans) else None
        losses = session.losses if guided else None
        if not arguments["return_dict"]:
            return images, nsfw, losses, maps
        return CompositionalPipelineOutput(
            images=images, nsfw_content_detected=nsfw, layout=layout, guidance_losses=losses,
            attention_maps=maps, layouts=layouts,
            image_guidance_losses=session.image_losses if guided else None,
            image_attention_maps=([[m for m, _ in image.values()] for image in per_image]
                                  if per_image is not None else None),
            image_attention_mass=([[w for _, w in image.values()] for image in per_image]
                                  if per_image is not None else None))

    def _heat_maps(self, session: _Session) -> list[dict[str, tuple[torch.Tensor, float]]]:
        """Per image, each phrase's attention averaged over steps, recorded layers and its
        tokens, upsampled to the image and scaled to [0, 1]; with its mean before scaling."""
        height, width = session.image_size
        sums = session.recorder.sums
        columns = {p: i for i, p in enumerate(session.recorder.columns)}
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        per_image = []
        for b, targets in enumerate(session.targets.targets):
            maps = {}
            for target in targets:
                layers, mass = [], []
                for name, total in sums.items():
                    grid = map_grid(total.shape[1], latent_hw)
                    cols = [columns[p] for p in target.positions]
                    per_token = total[b, :, cols].mean(-1).unflatten(0, grid)
                    mass.append(float(per_token.mean()) / session.recorder.counts[name])
                    layers.append(F.interpolate(per_token[None, None].float(), size=(height, width),
                                                mode="bilinear", align_corners=False)[0, 0])
                heat = torch.stack(layers).mean(0)
                maps[target.phrase] = ((heat / heat.max().clamp_min(1e-12)).cpu(),
                                       sum(mass) / len(mass))
            per_image.append(maps)
        return per_image


def _layout_sampler(generator: torch.Generator | None) -> torch.Generator:
    """A CPU generator for layout sampling, seeded from the image's generator (not drawing from
    it, so the image's noise is what it would be without a learned layout)."""
    seed = generator.initial_seed() if generator is not None else torch.initial_seed()
    return torch.Generator().manual_seed(seed + 7919)


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    """A generator in the same state, so a proposal run leaves the caller's untouched."""
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _prompt_order(prompt: str, phrases: list[str]) -> list[int]:
    """Phrase indices in the order they appear in the prompt (the layout model's slots)."""
    text = prompt.lower()
    return sorted(range(len(phrases)), key=lambda k: (text.find(phrases[k].lower()), k))
