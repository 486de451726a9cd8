"""The toy text-to-image model, version 2: trained the way Stable Diffusion was.

Three phases, each resumable, each drawing fresh renders of the v2 world
(`compinv.toy.world_v2`) seeded by (seed, phase, step), so a resumed run draws exactly the
batches an uninterrupted one would:

1. **clip**: the toy CLIP (`compinv.toy.clip`), text and image towers, contrastively on scenes
   and their captions (in `training/clip/`, resumable on its own); then frozen. Its held-out
   retrieval accuracy is measured at the end.
2. **vae**: the autoencoder, 48x48 pixels -> 24x24x4 latents (downsampled 2x, not v1's 4x: the
   objects' outlines stay spatial, where a small UNet can draw them; docs/toy-v2.md).
3. **unet**: the UNet on the *frozen* text tower's hidden states (epsilon prediction, min-SNR
   weighting, 10 % empty captions for classifier-free guidance).

The finished folder is the same stock diffusers layout as v1 (`save_toy_model`), whose
`text_encoder` is the frozen CLIP text tower. Version 1 (`compinv.toy.model`) stays the shipped
model until v2 is trained and meets the bars (docs/toy-v2.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import CLIPModel

from compinv.artifacts import ensure_writable_dir, load_optimizer_tensors
from compinv.data import TEXTUAL_INVERSION_TEMPLATES as OBJECT_TEMPLATES
from compinv.errors import CompinvError
from compinv.toy import world_v2
from compinv.toy.classifier_v2 import load_pattern_classifier
from compinv.toy.clip import (
    ToyClipSettings,
    embeddings,
    load_toy_clip,
    retrieval_accuracy,
    text_encoder,
    train_toy_clip,
)
from compinv.toy.metrics_v2 import score_generations_v2
from compinv.toy.model import (
    SD_BETAS,
    STATE_FILE,
    _checkpoint,
    _fresh_state,
    _lr,
    _read_state,
    _set_lr,
    _tokenizer,
    save_toy_model,
    token_ids,
)
from compinv.toy.world import BACKGROUND_PHRASES

FORMAT = "compinv-toy-model-v2"
PHASES = ("clip", "vae", "unet")


@dataclass(frozen=True)
class ToyModelV2Settings:
    """Everything that fixes a run's batches and schedules; `--resume` must keep all of it."""

    clip: ToyClipSettings = dataclasses.field(  # docs/toy-v2.md
        default_factory=lambda: ToyClipSettings(steps=3000, image_size=world_v2.IMAGE_SIZE, image_tower="resnet"))
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    vae_channels: tuple[int, ...] = (32, 64)  # one level per entry; downsampling 2 ** (levels - 1)
    vae_latent_channels: int = 4
    vae_norm_groups: int = 8  # 32 groups of 32 channels normalise each channel's flat colour away
    steps: int = 4100
    batch_size: int = 64
    lr: float = 6e-4
    seed: int = 0
    unet_channels: tuple[int, ...] = (32, 96, 192)
    unet_cross_attention: tuple[bool, ...] = (False, True, False)  # per level; the mid block always has it
    unet_norm_groups: int = 8
    layers_per_block: int = 1
    empty_caption_p: float = 0.1
    padding_mask_p: float = 0.5  # share of captions whose padding the UNet cannot see (docs/toy-v2.md)
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999  # the exported UNet is an exponential moving average of the trained one; 0: off
    timestep_sampling: str = "uniform"  # or "logit-normal": more of the mid-noise steps (docs/toy-v2.md)
    train_text_encoder: bool = False  # True: v1's recipe (the text tower learns with the UNet), a control
    eval_scenes: int = 256  # held-out scenes for the CLIP's retrieval and the autoencoder's PSNR
    clip_hard_negatives: float = 1.0  # share of CLIP batch scenes whose caption, one word swapped, is a negative
    clip_binding_negatives: float = 0.5  # share of two-object negatives that exchange an attribute between the objects


@dataclass(frozen=True)
class ToyModelV2Run:
    out: Path
    seconds: float
    state: dict


def latent_size(settings: ToyModelV2Settings) -> int:
    return world_v2.IMAGE_SIZE // 2 ** (len(settings.vae_channels) - 1)


def build_unet_and_vae(settings: ToyModelV2Settings) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """The autoencoder downsamples 2x to a 4-channel latent (v1: 4x). At 4x the second run's
    UNet drew the captioned colours as blobs: an outline was a code inside two or three 8-channel
    latent cells. At 2x an object of radius 10 spans ten cells and its outline is spatial. The
    UNet's extra 24x24 level is narrow (32 channels, no attention) so that a step costs what
    the 4x UNet's did; cross-attention stays at 12x12 (and the 6x6 mid block), as wide as the
    CLIP text tower."""
    if len(settings.unet_cross_attention) != len(settings.unet_channels):
        raise CompinvError("`settings`: give `unet_cross_attention` one entry per `unet_channels` level")
    torch.manual_seed(settings.seed + 1)
    levels = len(settings.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=settings.vae_latent_channels, layers_per_block=1,
        block_out_channels=settings.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=settings.vae_norm_groups,
        sample_size=world_v2.IMAGE_SIZE)
    attention = settings.unet_cross_attention
    unet = UNet2DConditionModel(
        sample_size=latent_size(settings), in_channels=settings.vae_latent_channels,
        out_channels=settings.vae_latent_channels,
        block_out_channels=settings.unet_channels, layers_per_block=settings.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=settings.clip.text_hidden, attention_head_dim=4,
        norm_num_groups=settings.unet_norm_groups)
    return vae, unet


def training_caption(scene: world_v2.SceneV2, draw: float, template: int) -> str:
    """As v1's: the world's caption (75 %), a TI template around the objects (15 %), or the
    objects alone (10 %)."""
    objects = " and ".join(world_v2.object_phrase(*o.identity) for o in scene.objects)
    if draw < 0.75:
        return world_v2.caption(scene)
    if draw < 0.9:
        bare = objects.split(" ", 1)[1]
        return f"{OBJECT_TEMPLATES[template % len(OBJECT_TEMPLATES)].format(bare)} {BACKGROUND_PHRASES[scene.background]}"
    return objects


def _caption_draws(n: int, gen: torch.Generator) -> tuple[list[float], list[int]]:
    """Per caption, the draw that picks its form and the template index (`training_caption`)."""
    return torch.rand(n, generator=gen).tolist(), torch.randint(0, 10_000, (n,), generator=gen).tolist()


def _captions(scenes: list[world_v2.SceneV2], gen: torch.Generator, empty_p: float) -> list[str]:
    draws, templates = _caption_draws(len(scenes), gen)
    return ["" if d < empty_p else training_caption(s, (d - empty_p) / (1 - empty_p), t)
            for s, d, t in zip(scenes, draws, templates)]


def padding_dropout(ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[B, T] cross-attention keep mask: in the `masked` rows, 0 on the padding after the first
    `<|endoftext|>`.

    The CLIP tokenizer pads with `<|endoftext|>`, and a causal text tower makes each padding state
    a summary of the whole caption, so a UNet may read that summary instead of the words. Hiding
    the padding from part of the batch forces it to read the words; stock pipelines, which show
    the padding, still see captions as the unmasked rows did.
    """
    after_eos = (ids == _tokenizer().eos_token_id).long().cumsum(1) > 1  # pads are EOS, as in SD 1.x
    return (~(after_eos & masked[:, None])).float()


def pixels(scenes: list[world_v2.SceneV2]) -> torch.Tensor:
    return torch.from_numpy(world_v2.render(scenes)).float().div(127.5).sub(1).permute(0, 3, 1, 2).contiguous()


# ---- training ------------------------------------------------------------------------------------
def train_toy_model_v2(out: str | Path, settings: ToyModelV2Settings = ToyModelV2Settings(),
                       resume: bool = False, checkpoint_every: int = 100, progress: bool = True,
                       stop_after: str | None = None) -> ToyModelV2Run:
    """Train the phases in `out/training` (resumable) and write the pipeline to `out/model`.

    `stop_after` ("clip" or "vae") ends the run after that phase (pilots, staged training);
    `--resume` later continues with the next one.
    """
    if min(settings.vae_steps, settings.steps, settings.batch_size, settings.vae_batch_size) < 1:
        raise CompinvError("`settings`: every step count and batch size must be positive")
    if stop_after not in (None, "clip", "vae"):
        raise CompinvError(f"`stop_after` {stop_after!r}: use 'clip', 'vae' or nothing")
    out = ensure_writable_dir(out, "out")
    work = out / "training"
    state = _read_state(work, settings, FORMAT, "clip") if resume else _fresh_state(work) | {"phase": "clip"}
    state["settings"] = settings
    started = time.perf_counter()
    vae, unet = build_unet_and_vae(settings)
    if state["phase"] == "clip":
        clip = _train_clip(settings, state, work, resume, checkpoint_every, progress)
    else:
        clip = load_toy_clip(work / "clip")
    if stop_after == "clip":
        return ToyModelV2Run(out, time.perf_counter() - started, _public(state))
    if state["phase"] == "vae":
        _train_vae(vae, settings, state, work, checkpoint_every, progress)
    else:
        vae.load_state_dict(load_file(str(work / "vae.safetensors")))
    if stop_after == "vae":
        return ToyModelV2Run(out, time.perf_counter() - started, _public(state))
    text_tower = text_encoder(clip)
    vae.requires_grad_(False).eval()
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    ema = _train_unet(vae, unet, text_tower, settings, state, work, checkpoint_every, progress)
    save_toy_model(vae, unet if ema is None else ema.module, text_tower, out / "model")
    return ToyModelV2Run(out / "model", time.perf_counter() - started, _public(state))


def _public(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "settings"}


def _run_phase(name: str, steps: int, step: Callable[[int], float], models: dict[str, torch.nn.Module],
               opt: torch.optim.Optimizer, state: dict, work: Path, checkpoint_every: int,
               progress: bool) -> None:
    """Steps `state["step"]` .. `steps` of one phase, with periodic checkpoints; the timing of
    each step goes to state["seconds_per_step"][name] (the training plan's estimates)."""
    if state["step"] > 0:
        for key, model in models.items():
            model.load_state_dict(load_file(str(work / f"{key}.safetensors")))
        load_optimizer_tensors(opt, load_file(str(work / f"{name}_optimizer.safetensors")))
    bar = tqdm(total=steps, initial=state["step"], desc=name, disable=not progress, dynamic_ncols=True)
    timings = []
    for i in range(state["step"], steps):
        started = time.perf_counter()
        loss = step(i)
        timings.append(time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        state["step"] = i + 1
        if checkpoint_every and state["step"] % checkpoint_every == 0 and state["step"] < steps:
            _checkpoint(work, models, name, opt, state, FORMAT)
    bar.close()
    if timings:
        state.setdefault("seconds_per_step", {})[name] = float(np.median(timings))
    _checkpoint(work, models, name, opt, state, FORMAT)


def _optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip_norm: float | None = None) -> float:
    _set_lr(opt, lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_norm)
    opt.step()
    return float(loss.detach())


def clip_batches(batch_size: int, seed: tuple[int, ...], hard_negatives: float = 0.0,
                 binding_negatives: float = 0.0) -> tuple[np.ndarray, list[str], list[str]]:
    """The CLIP phase's batch `seed` = (run seed, step): training scenes, their captions (the
    same caption mix the UNet sees, without empty ones), and for a `hard_negatives` share of
    the scenes their caption with one attribute of one object swapped (`world_v2.swap_attribute`):
    the fourth run's CLIP picked a scene's shape word right in 0.33 of one-word choices (chance 0.125).
    A `binding_negatives` share of the two-object scenes' negatives instead exchanges an
    attribute between the objects (`world_v2.exchange_attribute`): same words, other binding."""
    scenes = world_v2.sample_scenes(batch_size, "train", (*seed, 0))
    gen = torch.Generator().manual_seed(seed[0] * 1_000_003 + 100_000 + seed[1])
    draws, templates = _caption_draws(len(scenes), gen)
    rng = np.random.default_rng([*seed, 3])
    negatives = [training_caption(_negative(s, rng, binding_negatives), d, t)
                 for s, d, t in zip(scenes, draws, templates) if rng.random() < hard_negatives]
    return world_v2.render(scenes), [training_caption(s, d, t) for s, d, t in zip(scenes, draws, templates)], negatives


def _negative(scene: world_v2.SceneV2, rng: np.random.Generator, binding: float) -> world_v2.SceneV2:
    """One hard negative of `scene`; draws nothing extra when `binding` is 0, so the fifth run's
    batches (no binding negatives) stay as they were."""
    if binding > 0 and len(scene.objects) == 2 and rng.random() < binding:
        exchanged = world_v2.exchange_attribute(scene, rng)
        if exchanged is not None:
            return exchanged
    return world_v2.swap_attribute(scene, rng)


def _train_clip(settings: ToyModelV2Settings, state: dict, work: Path, resume: bool,
                checkpoint_every: int, progress: bool) -> CLIPModel:
    clip_settings = ToyClipSettings(**{**asdict(settings.clip), "seed": settings.seed})
    batches = functools.partial(clip_batches, hard_negatives=settings.clip_hard_negatives,
                                binding_negatives=settings.clip_binding_negatives)
    run = train_toy_clip(work / "clip", batches, clip_settings, resume=resume,
                         checkpoint_every=checkpoint_every, progress=progress)
    if run.steps > 0 and run.seconds > 0:
        state.setdefault("seconds_per_step", {})["clip"] = run.step_seconds
    state.update(retrieval=clip_retrieval(run.model, settings.seed, settings.eval_scenes),
                 clip_attributes=clip_attribute_choice(run.model, settings.seed, settings.eval_scenes // 2), phase="vae", step=0)
    _checkpoint(work, {}, None, None, state, FORMAT)
    return run.model


def clip_retrieval(clip: CLIPModel, seed: int, n: int = 256) -> dict[str, float]:
    """Top-1 retrieval among `n` held-out scenes (combinations training never showed)."""
    scenes = world_v2.sample_scenes(n, "heldout", (seed, 98))
    return retrieval_accuracy(clip, world_v2.render(scenes), [world_v2.caption(s) for s in scenes])


ATTRIBUTES = world_v2.OBJECT_ATTRIBUTES  # the caption words the one-word choice asks about


def attribute_variants(scene: world_v2.SceneV2, attribute: str) -> list[world_v2.SceneV2] | None:
    """The one-object `scene` with its `attribute` set to every value the world allows there
    (the scene itself among them); None for the pattern of a solid object (nothing to swap)."""
    (obj,) = scene.objects
    if attribute == "shape":
        objects = [dataclasses.replace(obj, shape=shape) for shape in world_v2.SHAPES]
    elif attribute == "colour":
        objects = [dataclasses.replace(obj, colour=c, colour2=c if obj.pattern == "solid" else obj.colour2)
                   for c in world_v2.COLOURS if obj.pattern == "solid" or c != obj.colour2]
    elif attribute == "pattern" and obj.pattern != "solid":
        objects = [dataclasses.replace(obj, pattern=p) for p in world_v2.PATTERNS[1:]]
    elif attribute == "pattern":
        return None
    else:
        raise CompinvError(f"`attribute` {attribute!r}: use one of {', '.join(ATTRIBUTES)}")
    return [dataclasses.replace(scene, objects=(o,)) for o in objects]


@torch.no_grad()
def clip_attribute_choice(clip: CLIPModel, seed: int, n: int = 128) -> dict[str, float]:
    """Per caption attribute, how often the CLIP picks a held-out scene's own caption among the
    captions that differ from it in that attribute only (chance: 1 / the values there).

    Retrieval among random pairs can be won on colours and backgrounds alone; this says whether
    the frozen text tower has learned each word the UNet must read (docs/toy-v2.md: shapes
    0.32, colours 1.00 on the v2 CLIP).
    """
    scenes = [s for s in world_v2.sample_scenes(4 * n, "heldout", (seed, 97)) if len(s.objects) == 1][:n]
    images = world_v2.render(scenes)
    was_training = clip.training
    clip.eval()
    result: dict[str, float] = {}
    for attribute in ATTRIBUTES:
        hits, chance = [], []
        for scene, image in zip(scenes, images):
            variants = attribute_variants(scene, attribute)
            if variants is None:
                continue
            captions = [world_v2.caption(v) for v in variants]
            image_embedding, text_embeddings = embeddings(clip, image[None], captions)
            hits.append(captions[int((text_embeddings @ image_embedding[0]).argmax())] == world_v2.caption(scene))
            chance.append(1 / len(captions))
        result[attribute], result[f"{attribute}_chance"] = float(np.mean(hits)), float(np.mean(chance))
    result["binding"], result["binding_chance"] = clip_binding_choice(clip, seed, n), 0.5
    clip.train(was_training)
    return result


def clip_binding_choice(clip: CLIPModel, seed: int, n: int = 128) -> float:
    """How often the CLIP scores a held-out two-object scene's caption above the same words
    bound the other way (`world_v2.exchange_attribute`; chance 0.5). A UNet on this text tower
    can only bind colours to shapes as far as the tower does (the fifth run: 0.86, and its UNet
    drew one object's colour on the other's shape in 0.61 of two-object captions)."""
    rng = np.random.default_rng([seed, 98])
    pairs = [(s, e) for s in world_v2.sample_scenes(8 * n, "heldout", (seed, 98)) if len(s.objects) == 2
             for e in [world_v2.exchange_attribute(s, rng)] if e is not None][:n]
    images = world_v2.render([s for s, _ in pairs])
    with torch.no_grad():
        image_embeddings, right = embeddings(clip, images, [world_v2.caption(s) for s, _ in pairs])
        _, wrong = embeddings(clip, images, [world_v2.caption(e) for _, e in pairs])
    return float(((image_embeddings * right).sum(-1) > (image_embeddings * wrong).sum(-1)).float().mean())


def _train_vae(vae: AutoencoderKL, settings: ToyModelV2Settings, state: dict, work: Path,
               checkpoint_every: int, progress: bool) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    vae.train()

    def step(i: int) -> float:
        x = pixels(world_v2.sample_scenes(settings.vae_batch_size, "train", (settings.seed, 1, i)))
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + i)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        return _optimise(opt, loss, _lr(i, settings.vae_steps, settings.vae_lr))

    _run_phase("vae", settings.vae_steps, step, {"vae": vae}, opt, state, work, checkpoint_every, progress)
    vae.eval()
    scale, psnr, judged = _measure_vae(vae, settings.seed, settings.eval_scenes)
    vae.register_to_config(scaling_factor=scale)
    state.update(phase="unet", step=0, vae_psnr=psnr, scaling_factor=scale, vae_reconstructions=judged)
    _checkpoint(work, {}, None, None, state, FORMAT)


@torch.no_grad()
def _measure_vae(vae: AutoencoderKL, seed: int, n: int = 256) -> tuple[float, float, dict[str, float]]:
    """SD's latent scale (1 / latent std), the PSNR on held-out renders, and the base-quality
    metrics of the reconstructions: no generation can score above what its decoder can show."""
    scenes = world_v2.sample_scenes(n, "heldout", (seed, 99))
    x = pixels(scenes)
    latents = vae.encode(x).latent_dist.mean
    recon = vae.decode(latents).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    judged = score_generations_v2(load_pattern_classifier(), ((recon + 1) / 2).permute(0, 2, 3, 1).numpy(), scenes)
    return float(1.0 / latents.std()), float(10 * math.log10(1.0 / max(mse, 1e-12))), judged


def unet_ema(unet: UNet2DConditionModel, decay: float) -> AveragedModel:
    """An exponential moving average of `unet`'s weights, as DDPM and SD sample from, with
    diffusers' warm-up (the decay is min(`decay`, (1 + n) / (10 + n)) at update n), so that the
    random initial weights are forgotten in a run of a few thousand steps."""

    def average(ema: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return ema * d + current * (1.0 - d)

    return AveragedModel(unet, avg_fn=average)


def _train_unet(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder, settings: ToyModelV2Settings,
                state: dict, work: Path, checkpoint_every: int, progress: bool) -> AveragedModel | None:
    """Only the UNet learns: the text states come from the frozen CLIP text tower (unless
    `train_text_encoder`, the control that trains the tower with the UNet as v1 did). Returns
    the weights' moving average when `ema_decay` is set (checkpointed with the run)."""
    noise_scheduler = DDPMScheduler(**SD_BETAS)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=settings.min_snr_gamma) / snr
    models = {"unet": unet}
    params = list(unet.parameters())
    if settings.train_text_encoder:
        text_encoder.requires_grad_(True).train()
        models["text_encoder"] = text_encoder
        params += list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-2)
    unet.train()
    ema = unet_ema(unet, settings.ema_decay) if settings.ema_decay else None
    if ema is not None:
        models["unet_ema"] = ema

    def step(i: int) -> float:
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + 500_000 + i)
        scenes = world_v2.sample_scenes(settings.batch_size, "train", (settings.seed, 2, i))
        captions = _captions(scenes, gen, settings.empty_caption_p)
        with torch.no_grad():
            posterior = vae.encode(pixels(scenes)).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen))
            latents = latents * state["scaling_factor"]
        ids = token_ids(captions)
        with torch.set_grad_enabled(settings.train_text_encoder):
            states = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = training_timesteps(settings.timestep_sampling, len(scenes), len(alphas), gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        keep = padding_dropout(ids, torch.rand(len(scenes), generator=gen) < settings.padding_mask_p)
        pred = unet(noisy, t, encoder_hidden_states=states, encoder_attention_mask=keep).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = _optimise(opt, (per_sample * weight[t]).mean(), _lr(i, settings.steps, settings.lr), 1.0)
        if ema is not None:
            ema.update_parameters(unet)
        return loss

    _run_phase("unet", settings.steps, step, models, opt, state, work, checkpoint_every, progress)
    return ema


def training_timesteps(sampling: str, n: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """`n` diffusion timesteps: uniform (DDPM, SD's own training) or logit-normal (SD3's
    density, m=0, s=1), which puts ~1.5x more of the batch on the mid-noise steps where an
    object's position is already fixed but its outline is not: the steps where a shape word can
    lower the loss (at high noise the position is unknown and the best guess averages shapes away)."""
    if sampling == "uniform":
        return torch.randint(0, steps, (n,), generator=gen)
    if sampling == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=gen))
        return (u * steps).long().clamp(0, steps - 1)
    raise CompinvError(f"`timestep_sampling` {sampling!r}: use 'uniform' or 'logit-normal'")


def saved_state(out: str | Path) -> dict:
    """The state file of a v2 run folder (phase, step, retrieval, PSNR, seconds per step)."""
    import json

    path = Path(out) / "training" / STATE_FILE
    if not path.is_file():
        raise CompinvError(f"`out` {out}: no v2 toy-model run there")
    return json.loads(path.read_text())
