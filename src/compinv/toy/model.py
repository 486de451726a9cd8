"""The toy text-to-image model: Stable Diffusion's exact component classes, trained on toy scenes.

Nothing of real SD can be downloaded where compinv runs its tests, so the method is measured on
a model small enough to train on 2 CPU cores in under two hours, yet in SD's own format: an
AutoencoderKL (32x32 pixels -> 8x8x4 latents), a UNet2DConditionModel with SD's block pattern
(cross-attention in every block but the deepest, so layout guidance finds its maps where it does
in SD), a CLIPTextModel trained from scratch with the real CLIP tokenizer, and a scheduler with
SD's betas. `save_pretrained` writes it; stock `StableDiffusionPipeline.from_pretrained` loads it.

Training has two phases, each with fresh renders every step, seeded by (seed, phase, step), so a
resumed run draws exactly the batches an uninterrupted one would:
1. the autoencoder (reconstruction + a small KL term, as SD's), then its latent scale is measured;
2. UNet and text encoder jointly, on latents of the frozen autoencoder (epsilon prediction,
   min-SNR weighting, 10 % empty captions for classifier-free guidance).

Captions mix the world's templates with Textual Inversion's ("a cropped photo of the {}"), and
some omit the background: the prompts that inversion trains with must not be foreign words.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from compinv.artifacts import (
    atomic_write_text,
    ensure_writable_dir,
    load_optimizer_tensors,
    optimizer_tensors,
    save_tensors,
    staged_folder,
)
from compinv.data import TEXTUAL_INVERSION_TEMPLATES as OBJECT_TEMPLATES
from compinv.errors import CompinvError
from compinv.models import CLIP_MAX_LENGTH, clip_tokenizer
from compinv.toy.world import (
    BACKGROUND_PHRASES,
    IMAGE_SIZE,
    Scene,
    caption,
    object_phrase,
    render,
    sample_scenes,
)

SHIPPED_MODEL_DIR = Path(__file__).parent / "weights" / "model"  # `compinv toy train-model`
SHIPPED_MODEL_V2_DIR = Path(__file__).parent / "weights" / "v2" / "model"  # `... train-model --version 2`
SHIPPED_MODELS = {"v1": SHIPPED_MODEL_DIR, "v2": SHIPPED_MODEL_V2_DIR}
STATE_FILE = "state.json"
FORMAT = "compinv-toy-model"
LATENT_SIZE = IMAGE_SIZE // 4
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclass(frozen=True)
class ToyModelSettings:
    """Everything that fixes a run's batches and schedules; `--resume` must keep all of it."""

    vae_steps: int = 1200
    steps: int = 4000
    batch_size: int = 64
    vae_batch_size: int = 32
    seed: int = 0
    vae_lr: float = 1e-3
    lr: float = 6e-4
    unet_channels: tuple[int, int] = (96, 192)
    layers_per_block: int = 1
    text_hidden: int = 128
    text_layers: int = 3
    empty_caption_p: float = 0.1
    min_snr_gamma: float = 5.0


# ---- components ----------------------------------------------------------------------------------
def build_components(settings: ToyModelSettings) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32, sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        block_out_channels=settings.unet_channels, layers_per_block=settings.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=settings.text_hidden, attention_head_dim=4, norm_num_groups=32)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=settings.text_hidden,
        intermediate_size=4 * settings.text_hidden, num_hidden_layers=settings.text_layers,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=settings.text_hidden))
    return vae, unet, text_encoder


def inference_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ with SD's betas: good samples at the 25 steps the toy world is judged at."""
    return DPMSolverMultistepScheduler(**SD_BETAS, steps_offset=1)


# ---- captions ------------------------------------------------------------------------------------
def training_caption(scene: Scene, draw: float, template: int) -> str:
    """The world's caption (75 %), a TI template around the objects (15 %), or the objects alone
    (10 %); `draw` in [0, 1) picks which, `template` which TI template."""
    objects = " and ".join(object_phrase(o.colour, o.shape) for o in scene.objects)
    background = BACKGROUND_PHRASES[scene.background]
    if draw < 0.75:
        return caption(scene)
    if draw < 0.9:
        bare = objects.split(" ", 1)[1]  # TI templates bring their own article
        return f"{OBJECT_TEMPLATES[template % len(OBJECT_TEMPLATES)].format(bare)} {background}"
    return objects


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return clip_tokenizer()


@functools.lru_cache(maxsize=20000)
def _token_ids(text: str) -> tuple[int, ...]:
    return tuple(_tokenizer()(text, padding="max_length", max_length=CLIP_MAX_LENGTH,
                              truncation=True).input_ids)


def token_ids(captions: list[str]) -> torch.Tensor:
    return torch.tensor([_token_ids(c) for c in captions])


# ---- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyModelRun:
    out: Path
    seconds: float
    vae_psnr: float


def train_toy_model(out: str | Path, settings: ToyModelSettings = ToyModelSettings(),
                    resume: bool = False, checkpoint_every: int = 100,
                    progress: bool = True) -> ToyModelRun:
    """Train both phases in `out/training` (resumable), then write the pipeline to `out/model`
    with `save_pretrained` in fp16 safetensors."""
    if min(settings.vae_steps, settings.steps, settings.batch_size, settings.vae_batch_size) < 1:
        raise CompinvError("--vae-steps, --steps, --batch-size and --vae-batch-size must be positive")
    out = ensure_writable_dir(out, "--out")
    work = out / "training"
    state = _read_state(work, settings) if resume else _fresh_state(work)
    state["settings"] = settings
    vae, unet, text_encoder = build_components(settings)
    started = time.perf_counter()
    if state["phase"] == "vae":
        vae_opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
        _restore(work, "vae", vae, vae_opt, state)
        _train_vae(vae, vae_opt, settings, state, work, checkpoint_every, progress)
    else:
        vae.load_state_dict(load_file(str(work / "vae.safetensors")))
    vae.requires_grad_(False).eval()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-2)
    if state["phase"] == "unet" and state["step"] > 0:
        unet.load_state_dict(load_file(str(work / "unet.safetensors")))
        text_encoder.load_state_dict(load_file(str(work / "text_encoder.safetensors")))
        load_optimizer_tensors(opt, load_file(str(work / "unet_optimizer.safetensors")))
    _train_unet(vae, unet, text_encoder, opt, settings, state, work, checkpoint_every, progress)
    model_dir = save_toy_model(vae, unet, text_encoder, out / "model")
    return ToyModelRun(model_dir, time.perf_counter() - started, state["vae_psnr"])


def _train_vae(vae: AutoencoderKL, opt: torch.optim.Optimizer, settings: ToyModelSettings,
               state: dict, work: Path, checkpoint_every: int, progress: bool) -> None:
    bar = tqdm(total=settings.vae_steps, initial=state["step"], desc="autoencoder", disable=not progress,
               dynamic_ncols=True)
    vae.train()
    for step in range(state["step"], settings.vae_steps):
        x = _pixels(sample_scenes(settings.vae_batch_size, "train", (settings.seed, 1, step)))
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        _set_lr(opt, _lr(step, settings.vae_steps, settings.vae_lr))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        state["step"] = step + 1
        if checkpoint_every and state["step"] % checkpoint_every == 0 and state["step"] < settings.vae_steps:
            _checkpoint(work, {"vae": vae}, "vae", opt, state)
    bar.close()
    vae.eval()
    scale, psnr = _measure_vae(vae, settings.seed)
    vae.register_to_config(scaling_factor=scale)
    state.update(phase="unet", step=0, vae_psnr=psnr, scaling_factor=scale)
    _checkpoint(work, {"vae": vae}, None, None, state)


@torch.no_grad()
def _measure_vae(vae: AutoencoderKL, seed: int, n: int = 512) -> tuple[float, float]:
    """SD's latent scale (1 / std of the latents, so diffusion sees unit variance) and the PSNR of
    reconstructions of held-out renders."""
    x = _pixels(sample_scenes(n, "heldout", (seed, 99)))
    latents = vae.encode(x).latent_dist.mean
    recon = vae.decode(latents).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    return float(1.0 / latents.std()), float(10 * math.log10(1.0 / max(mse, 1e-12)))


def _train_unet(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                opt: torch.optim.Optimizer, settings: ToyModelSettings, state: dict, work: Path,
                checkpoint_every: int, progress: bool) -> None:
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    noise_scheduler = DDPMScheduler(**SD_BETAS)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=settings.min_snr_gamma) / snr
    bar = tqdm(total=settings.steps, initial=state["step"], desc="unet+text", disable=not progress,
               dynamic_ncols=True)
    unet.train()
    text_encoder.train()
    for step in range(state["step"], settings.steps):
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + 500_000 + step)
        scenes = sample_scenes(settings.batch_size, "train", (settings.seed, 2, step))
        draws = torch.rand(len(scenes), generator=gen).tolist()
        templates = torch.randint(0, 10_000, (len(scenes),), generator=gen).tolist()
        captions = ["" if d < settings.empty_caption_p else
                    training_caption(s, (d - settings.empty_caption_p) / (1 - settings.empty_caption_p), t)
                    for s, d, t in zip(scenes, draws, templates)]
        with torch.no_grad():
            posterior = vae.encode(_pixels(scenes)).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen))
            latents = latents * state["scaling_factor"]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(scenes),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        _set_lr(opt, _lr(step, settings.steps, settings.lr))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = text_encoder(token_ids(captions))[0]
            pred = unet(noisy, t, encoder_hidden_states=states).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        state["step"] = step + 1
        if checkpoint_every and state["step"] % checkpoint_every == 0 and state["step"] < settings.steps:
            _checkpoint(work, {"unet": unet, "text_encoder": text_encoder}, "unet", opt, state)
    bar.close()
    _checkpoint(work, {"unet": unet, "text_encoder": text_encoder}, "unet", opt, state)


def _pixels(scenes: list[Scene]) -> torch.Tensor:
    return torch.from_numpy(render(scenes)).float().div(127.5).sub(1).permute(0, 3, 1, 2).contiguous()


def _lr(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# ---- checkpoints ---------------------------------------------------------------------------------
def _fresh_state(work: Path) -> dict:
    if (work / STATE_FILE).exists():
        raise CompinvError(f"{work.parent} already holds a toy-model run; pass --resume to continue "
                           "it or choose a new --out")
    return {"phase": "vae", "step": 0}


def _read_state(work: Path, settings, fmt: str = FORMAT, first_phase: str = "vae") -> dict:
    """The saved state; its settings must equal this run's (batches and schedules depend on them)."""
    if not (work / STATE_FILE).exists():
        return {"phase": first_phase, "step": 0}
    state = json.loads((work / STATE_FILE).read_text())
    saved = state.pop("settings")
    wanted = json.loads(json.dumps(asdict(settings)))
    changed = [f"{k}={saved.get(k)!r}" for k in wanted if saved.get(k) != wanted[k]]
    if state.get("format") != fmt or changed:
        raise CompinvError(f"--resume: {work.parent} was trained with {', '.join(changed) or 'another format'}; "
                           "pass the same settings to continue it")
    return state


def _restore(work: Path, name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    if state["step"] > 0:
        model.load_state_dict(load_file(str(work / f"{name}.safetensors")))
        load_optimizer_tensors(opt, load_file(str(work / f"{name}_optimizer.safetensors")))


def _checkpoint(work: Path, models: dict[str, torch.nn.Module], opt_name: str | None,
                opt: torch.optim.Optimizer | None, state: dict, fmt: str = FORMAT) -> None:
    """Weights and optimizer moments first, then the state file that names the step: a run killed
    between the writes resumes from the previous step count with at most one interval redone."""
    for name, model in models.items():
        save_tensors(model.state_dict(), work / f"{name}.safetensors")
    if opt is not None:
        save_tensors(optimizer_tensors(opt), work / f"{opt_name}_optimizer.safetensors")
    record = {**{k: v for k, v in state.items() if k != "settings"}, "format": fmt,
              "settings": json.loads(json.dumps(asdict(state["settings"])))}
    atomic_write_text(work / STATE_FILE, json.dumps(record, indent=2))


# ---- the finished model --------------------------------------------------------------------------
def save_toy_model(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                   out: Path) -> Path:
    """`save_pretrained` in fp16 safetensors to a temp folder, renamed into place."""
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        scheduler=inference_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.to(torch.float16)
    with staged_folder(out) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        _declare_float32(staging / "text_encoder" / "config.json")
    pipe.to(torch.float32)
    return out


def _declare_float32(config_path: Path) -> None:
    """transformers loads a model in its config's dtype, diffusers in float32: with "float16"
    there, stock `from_pretrained` without a dtype would mix fp16 text states into an fp32 UNet.
    The weights stay fp16 on disk (half the size); `dtype=torch.float16` still loads them as such."""
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    atomic_write_text(config_path, json.dumps(config, indent=2))


def shipped_or_folder(folder: str | Path | None) -> Path:
    """A shipped toy model's folder by name ("v1", "v2"; None: v1), else `folder` itself."""
    if folder is None or str(folder) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(folder or "v1")]
    return Path(folder)


def load_toy_model(folder: str | Path | None = None) -> StableDiffusionPipeline:
    """The toy pipeline in float32 (CPUs have no fast fp16); no folder: the shipped v1, "v2":
    the shipped v2."""
    from compinv.models import load_pipeline

    folder = shipped_or_folder(folder)
    if not (folder / "model_index.json").is_file():
        raise CompinvError(f"{folder} holds no toy model; train one with `compinv toy train-model`")
    return load_pipeline(folder, torch.float32)

