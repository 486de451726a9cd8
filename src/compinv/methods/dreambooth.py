"""DreamBooth: fine-tune the whole UNet (or a peft LoRA of its attention) and the token rows.

The artifact of full DreamBooth is a complete diffusers pipeline folder whose tokenizer and text
encoder both hold the new tokens (the official code saved a grown text encoder next to the
original tokenizer: docs/official-code.md). The LoRA variant saves diffusers'
`pytorch_lora_weights.safetensors` (loadable with `pipe.load_lora_weights`) plus one embedding
file per token. As for Custom Diffusion, every concept's token is trained and anchored to its
own word, with or without prior preservation.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from compinv.artifacts import staged_folder
from compinv.config import (ConceptOptions, ConceptsFileOptions, DataOptions, LossOptions,
                            OptimizerOptions, RunOptions, check_prior, concepts_of, resolve_common)
from compinv.data import DataRecipe, instance_prompt
from compinv.errors import CompinvError
from compinv.methods.custom_diffusion import save_token_embeddings
from compinv.methods.registry import ArtifactReader, Method
from compinv.methods.textual_inversion import load_embedding_file, token_files
from compinv.options import option
from compinv.tokens import ConceptToken, TrainableRows

log = logging.getLogger("compinv")

PIPELINE_DIR = "pipeline"
LORA_DIR = "lora"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class DreamBoothConfig(ConceptsFileOptions, ConceptOptions, LossOptions, OptimizerOptions,
                       DataOptions, RunOptions):
    """DreamBooth (whole UNet, or a LoRA of it, + token rows) with the official code's settings."""

    train_text_encoder: bool = option(False, "also train the whole text encoder")
    lora: bool = option(False, "train a LoRA of the UNet's attention instead of the whole UNet")
    lora_rank: int = option(4, "rank of the LoRA matrices")
    lr: float = option(1e-5, "learning rate (LoRA typically needs ~1e-4)")
    scale_lr: bool = option(False, "multiply --lr by batch size x grad accumulation x processes")
    steps: int = option(800, "optimisation steps")
    batch_size: int = option(1, "instance images per micro-batch and process")
    grad_accum: int = option(1, "micro-batches per optimisation step")
    flip_p: float = option(0.0, "probability of a horizontal flip")
    max_grad_norm: float = option(1.0, "clip the trained parameters' gradients to this norm "
                                       "(0: no clipping)")
    repeats: int = option(1, "how often each image appears per epoch")
    recon_weight: float = option(0.6, "weight of the diffusion reconstruction loss")
    anchor_weight: float = option(0.4, "weight of the semantic anchor loss")

    def resolved(self) -> DreamBoothConfig:
        """The run's settings with derived values filled and every check done (once per run)."""
        cfg = resolve_common(self)
        if cfg.lora and cfg.train_text_encoder:
            raise CompinvError("`lora` with `train_text_encoder` is not supported; the LoRA adapts "
                               "the UNet (the token rows are trained either way)")
        cfg = dataclasses.replace(cfg, concept_list=concepts_of(cfg))
        check_prior(cfg)
        return cfg


class DreamBooth:
    """Trainable state: the UNet (or its LoRA), the token rows or the whole text encoder."""

    def __init__(self, pipe: StableDiffusionPipeline, concepts: list[ConceptToken],
                 train_text_encoder: bool = False, lora_rank: int | None = None):
        self.pipe, self.concepts = pipe, concepts
        self.text_encoder, self.unet = pipe.text_encoder, pipe.unet
        self.lora = lora_rank is not None
        self.text_encoder.requires_grad_(train_text_encoder)
        self._rows = TrainableRows(self.text_encoder, [i for c in concepts for i in c.ids])
        self.train_text_encoder = train_text_encoder
        if self.lora:
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                             init_lora_weights="gaussian",
                                             target_modules=LORA_TARGETS))
        else:
            self.unet.requires_grad_(True)
        self._unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        self.modules = [self.text_encoder, self.unet]

    def parameters(self) -> list[torch.nn.Parameter]:
        encoder = list(self.text_encoder.parameters()) if self.train_text_encoder else [self._rows.rows]
        return [*encoder, *self._unet_params]

    def prepare_gradients(self) -> None:
        """Only the concept rows of the table are trained unless the whole encoder is."""
        if not self.train_text_encoder:
            self._rows.gather_gradients()

    def after_step(self) -> None:
        """The optimised concept rows into the table, unless the whole encoder is trained."""
        if not self.train_text_encoder:
            self._rows.write()

    def save(self, path: Path) -> Path:
        with staged_folder(path) as staging:
            if self.lora:
                self._save_lora(staging)
            else:
                self._save_pipeline(staging)
        return path

    def _save_pipeline(self, folder: Path) -> None:
        """The whole pipeline: tokenizer and text encoder saved together, so they agree."""
        pipe = StableDiffusionPipeline(
            vae=self.pipe.vae, text_encoder=self.text_encoder, tokenizer=self.pipe.tokenizer,
            unet=self.unet, scheduler=self.pipe.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)

    def _save_lora(self, folder: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                                  weight_name=LORA_WEIGHTS_NAME,
                                                  safe_serialization=True)
        save_token_embeddings(folder, self.concepts, self._rows)


def load_lora(pipe, marker: Path, run: Path) -> list[str]:
    """diffusers' `load_lora_weights` as an adapter of its own, checked to have added LoRA
    layers to the UNet; then the token files. Several LoRA runs are active together."""
    name = f"concept{len(pipe.get_list_adapters().get('unet', []))}"
    before = sum("lora_" in n for n, _ in pipe.unet.named_parameters())
    try:
        pipe.load_lora_weights(str(marker.parent), weight_name=LORA_WEIGHTS_NAME, adapter_name=name)
    except (ValueError, OSError, RuntimeError) as exc:
        raise CompinvError(f"`runs` {run}: the LoRA cannot be loaded ({exc})") from exc
    if sum("lora_" in n for n, _ in pipe.unet.named_parameters()) <= before:
        raise CompinvError(f"`runs` {run}: the LoRA loaded no layer into the UNet; load it into "
                           "the base model it was trained from")
    adapters = pipe.get_list_adapters().get("unet", [])
    if len(adapters) > 1:
        pipe.set_adapters(adapters, [1.0] * len(adapters))
    return [t for f in token_files(marker.parent, {LORA_WEIGHTS_NAME})
            for t in load_embedding_file(pipe, f, run)]


def load_dreambooth(pipe, marker: Path, run: Path) -> list[str]:
    """Swap in the fine-tuned UNet, text encoder and tokenizer (they were saved together)."""
    loaded = StableDiffusionPipeline.from_pretrained(marker.parent, local_files_only=True,
                                                     torch_dtype=pipe.unet.dtype)
    vocabulary, rows = len(loaded.tokenizer), loaded.text_encoder.get_input_embeddings().weight.shape[0]
    if vocabulary != rows:
        raise CompinvError(f"`runs` {run}: tokenizer ({vocabulary} entries) and text encoder "
                           f"({rows} rows) disagree; the pipeline folder is damaged")
    lost = sorted(set(pipe.tokenizer.get_added_vocab()) - set(loaded.tokenizer.get_added_vocab()))
    if lost:
        raise CompinvError(f"`runs` {run}: a DreamBooth run replaces the text encoder, which "
                           f"would drop the tokens already loaded ({', '.join(lost)}); load the "
                           "DreamBooth run first (one load_concepts call orders them for you)")
    old = next(pipe.unet.parameters()).detach().clone()
    pipe.register_modules(unet=loaded.unet.to(pipe.device), tokenizer=loaded.tokenizer,
                          text_encoder=loaded.text_encoder.to(pipe.device))
    if old.shape == next(pipe.unet.parameters()).shape and torch.equal(old, next(pipe.unet.parameters())):
        log.warning("%s: the DreamBooth UNet's first weights equal the model's", run)
    added = [t for t in loaded.tokenizer.get_added_vocab()
             if t not in loaded.tokenizer.all_special_tokens and not _is_extra_vector(t)]
    return sorted(added)


def _is_extra_vector(token: str) -> bool:
    """diffusers' `<tok>_1`, `<tok>_2`, ... name the extra vectors of a multi-vector token."""
    head, _, tail = token.rpartition("_")
    return bool(head) and tail.isdigit()


METHOD = Method(
    name="dreambooth",
    short="DB",
    help="DreamBooth (whole UNet or --lora) with semantic inversion",
    config_class=DreamBoothConfig,
    recipe=lambda cfg: DataRecipe(prompts=instance_prompt),
    build=lambda cfg, pipe, tokens: DreamBooth(pipe, tokens, cfg.train_text_encoder,
                                               cfg.lora_rank if cfg.lora else None),
    artifact_name=lambda cfg: LORA_DIR if cfg.lora else PIPELINE_DIR,
    readers=(ArtifactReader("dreambooth", PIPELINE_DIR, "model_index.json", load_dreambooth,
                            exclusive=True, first=True),
             ArtifactReader("lora", LORA_DIR, LORA_WEIGHTS_NAME, load_lora)),
)
