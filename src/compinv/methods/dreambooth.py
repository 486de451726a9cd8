"""DreamBooth: fine-tune the whole UNet (or a peft LoRA of its attention) and the token rows.

The artifact of full DreamBooth is a complete diffusers pipeline folder whose tokenizer and text
encoder both hold the new tokens (the official code saved a grown text encoder next to the
original tokenizer: KNOWLEDGE.md §3.8). The LoRA variant saves diffusers'
`pytorch_lora_weights.safetensors` (loadable with `pipe.load_lora_weights`) plus one embedding
file per token. As for Custom Diffusion, every concept's token is trained and anchored to its
own word, with or without prior preservation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from compinv.artifacts import output_folder
from compinv.config import DreamBoothConfig
from compinv.data import build_concept_dataset, read_concept_material
from compinv.methods.custom_diffusion import save_token_embeddings
from compinv.models import load_pipeline
from compinv.tokens import ConceptToken, TrainableRows, expand_concepts
from compinv.trainer import Trainer, TrainResult, find_checkpoint, staged_folder

PIPELINE_DIR = "pipeline"
LORA_DIR = "lora"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class DreamBooth:
    """Trainable state: the UNet (or its LoRA), the token rows or the whole text encoder."""

    name = "dreambooth"
    snapshot_dir = "snapshots"

    def __init__(self, pipe: StableDiffusionPipeline, concepts: list[ConceptToken],
                 train_text_encoder: bool = False, lora_rank: int | None = None):
        self.pipe, self.concepts = pipe, concepts
        self.text_encoder, self.unet = pipe.text_encoder, pipe.unet
        self.lora = lora_rank is not None
        self.artifact_name = LORA_DIR if self.lora else PIPELINE_DIR
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
        encoder = list(self.text_encoder.parameters()) if self.train_text_encoder else [self._rows.table]
        return [*encoder, *self._unet_params]

    def after_step(self) -> None:
        """Keep non-concept rows at the base model's unless the whole encoder is trained."""
        if not self.train_text_encoder:
            self._rows.restore()

    def expand_prompt(self, prompt: str) -> str:
        return expand_concepts(prompt.replace("{}", self.concepts[0].token), self.concepts)

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


def train_dreambooth(config: DreamBoothConfig) -> TrainResult:
    """Learn one or several concepts with DreamBooth (or its LoRA); returns the artifact folder."""
    with output_folder(config.resolved().out, "--out") as out:
        return build_trainer(config, out).run()


def build_trainer(config: DreamBoothConfig, out: Path) -> Trainer:
    """Check the inputs, load the model, add the tokens and set up the shared loop."""
    cfg = config.resolved()
    resume_from = find_checkpoint(out, cfg.resume)
    material = read_concept_material(cfg)
    pipe = load_pipeline(cfg.model)
    concepts, dataset = build_concept_dataset(cfg, pipe, out, material, scale_aug=False)
    method = DreamBooth(pipe, concepts, cfg.train_text_encoder,
                        cfg.lora_rank if cfg.lora else None)
    return Trainer(cfg, pipe, dataset, method, out, resume_from)
