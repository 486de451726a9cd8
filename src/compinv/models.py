"""Base models: load a Stable Diffusion pipeline offline-first, or build a tiny random one.

Real SD weights are never available on our CI machines, so every test runs on a tiny random
pipeline with the exact SD 1.x layout (same component classes, same folder format). Its
tokenizer is the real CLIP tokenizer, built from the BPE vocabulary shipped in this package,
so token ids in tests are the ids users get with real models.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from compinv.artifacts import staged_folder
from compinv.errors import CompinvError

CLIP_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of the 16e6 file.

# Model shapes for tests and benchmarks. "tiny" builds in well under a second; "mid" is a
# scaled-down SD 1.x (4 UNet levels, 2 layers per block) for benchmarks where the UNet
# must dominate a step as it does in real SD.
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(unet_channels=(32, 64), layers_per_block=1, heads=2, text_hidden=32,
                 text_layers=3, text_heads=4, vae_channels=(32, 64), sample_size=64),
    "mid": dict(unet_channels=(64, 128, 256, 256), layers_per_block=2, heads=8, text_hidden=256,
                text_layers=6, text_heads=4, vae_channels=(32, 64, 64, 64), sample_size=256),
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table (the first 256 vocabulary entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's 49,408-entry vocabulary exactly as OpenAI's simple_tokenizer does."""
    data = resources.files("compinv").joinpath("_vocab/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(pair) for pair in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP ViT-L/14 tokenizer of SD 1.x, built offline from the shipped vocabulary."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)


def build_tiny_pipeline(size: str = "tiny", seed: int = 0) -> StableDiffusionPipeline:
    """A random SD-1.x-shaped pipeline; every dimension follows from MODEL_SIZES[size]."""
    if size not in MODEL_SIZES:
        raise CompinvError(f"unknown model size {size!r}; use one of {sorted(MODEL_SIZES)}")
    s = MODEL_SIZES[size]
    torch.manual_seed(seed)
    levels = len(s["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=s["sample_size"] // 2 ** (len(s["vae_channels"]) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=s["unet_channels"],
        layers_per_block=s["layers_per_block"],
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=s["text_hidden"],
        attention_head_dim=s["heads"],
        norm_num_groups=min(32, s["unet_channels"][0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=s["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * len(s["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(s["vae_channels"]),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(32, s["vae_channels"][0]),
        sample_size=s["sample_size"],
    )
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=s["text_hidden"],
            intermediate_size=4 * s["text_hidden"],
            num_hidden_layers=s["text_layers"],
            num_attention_heads=s["text_heads"],
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=s["text_hidden"],
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_model(out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random SD-shaped pipeline folder (`save_pretrained`, safetensors) to `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompinvError(f"`out` {out} already exists and is not an empty folder; choose a new path")
    pipe = build_tiny_pipeline(size, seed)
    with staged_folder(out) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    return out


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"))


def _check_pipeline_folder(path: Path) -> None:
    """A local pipeline folder has model_index.json and a sub-folder for each component it names."""
    index = path / "model_index.json"
    if not index.is_file():
        raise CompinvError(
            f"`model` {path}: folder has no model_index.json; pass a diffusers pipeline folder "
            "(saved with save_pretrained) or a hub id such as runwayml/stable-diffusion-v1-5")
    try:
        names = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompinvError(f"`model` {path}: model_index.json is not valid JSON ({exc})") from exc
    needed = [n for n, v in names.items() if isinstance(v, list) and v[0] is not None
              and not n.startswith("_")]
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        if name not in needed:
            needed.append(name)
    missing = [n for n in needed if not (path / n).is_dir()]
    if missing:
        raise CompinvError(f"`model` {path}: the folder has no {missing[0]}/ (a Stable Diffusion "
                           "pipeline folder needs unet/, vae/, text_encoder/, tokenizer/ and "
                           "scheduler/); copy the whole folder")


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """Load an SD 1.x/2.x pipeline from a local diffusers folder or a hub id.

    A local folder is read without touching the network. A hub id goes through the hub cache;
    when the hub cannot be reached the error says how to get the weights instead of a traceback.
    """
    path = Path(model).expanduser()
    local = path.exists()
    if local:
        _check_pipeline_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path) if local else str(model), dtype=dtype, safety_checker=None,
            requires_safety_checker=False, local_files_only=local or _hub_offline())
    except (OSError, ValueError) as exc:
        if local:
            raise CompinvError(f"`model` {model}: cannot load the pipeline folder ({exc})") from exc
        raise CompinvError(
            f"`model` {model}: not a local folder and not available from the hub cache "
            f"({type(exc).__name__}). Download it once with `huggingface-cli download {model}` on a "
            "machine with internet, or pass a local diffusers folder (`compinv make-tiny-model DIR` "
            "makes a tiny offline one)") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
