"""Custom Diffusion: train the cross-attention K and V projections (attn2) and the token rows.

The trainable projections live in diffusers' own `CustomDiffusionAttnProcessor`, installed on
every attn2 layer and initialised from the layer's K/V, so the saved weights are diffusers'
`pytorch_custom_diffusion_weights.safetensors` format. Differences from the official code:
every concept's token is trained (its gradient masking froze all but the first: KNOWLEDGE.md
§3.3) and each is anchored to its own word; the anchor loss does not need prior preservation
(§3.4); the loss mask of the scale augmentation really restricts the loss (§3.5).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from safetensors.torch import save_file

from compinv.artifacts import output_folder, save_embeddings
from compinv.config import CustomDiffusionConfig
from compinv.data import build_concept_dataset, read_concept_material
from compinv.models import load_pipeline
from compinv.tokens import ConceptToken, TrainableRows, expand_concepts
from compinv.trainer import Trainer, TrainResult, find_checkpoint, staged_folder

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"
ARTIFACT_DIR = "custom_diffusion"


def embedding_file_name(token: str) -> str:
    """One diffusers embedding file per token; the name keeps only filesystem-safe characters."""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in token).strip("_") or "token"
    return f"{slug}.safetensors"


def install_processors(unet, train_q_out: bool) -> dict[str, CustomDiffusionAttnProcessor]:
    """A `CustomDiffusionAttnProcessor` on every attn2 layer, starting from the layer's own K/V(/Q/out).

    Returns the new processors by name; the other layers keep theirs.
    """
    installed = {}
    processors = dict(unet.attn_processors)
    attention = dict(unet.named_modules())
    for name in processors:
        if not name.endswith("attn2.processor"):
            continue
        attn = attention[name[: -len(".processor")]]
        proc = CustomDiffusionAttnProcessor(
            train_kv=True, train_q_out=train_q_out, hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features)
        with torch.no_grad():
            proc.to_k_custom_diffusion.weight.copy_(attn.to_k.weight)
            proc.to_v_custom_diffusion.weight.copy_(attn.to_v.weight)
            if train_q_out:
                proc.to_q_custom_diffusion.weight.copy_(attn.to_q.weight)
                proc.to_out_custom_diffusion[0].load_state_dict(attn.to_out[0].state_dict())
        processors[name] = installed[name] = proc.to(attn.to_k.weight.device)
    unet.set_attn_processor(processors)
    return installed


def processor_state_dict(processors: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """diffusers' key layout: '<processor name>.to_k_custom_diffusion.weight', ..."""
    return {f"{name}.{key}": value.detach().to("cpu", torch.float32).contiguous()
            for name, proc in processors.items() for key, value in proc.state_dict().items()}


class CustomDiffusion:
    """Trainable state: the attn2 processors' projections and the concepts' embedding rows."""

    name = "custom-diffusion"
    artifact_name = ARTIFACT_DIR
    snapshot_dir = "snapshots"

    def __init__(self, pipe, concepts: list[ConceptToken], freeze_model: str):
        self.text_encoder = pipe.text_encoder
        self.unet = pipe.unet
        self.concepts = concepts
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.processors = install_processors(self.unet, train_q_out=freeze_model == "crossattn")
        self._rows = TrainableRows(self.text_encoder, [i for c in concepts for i in c.ids])
        self._projections = [p for proc in self.processors.values() for p in proc.parameters()]
        for param in self._projections:
            param.requires_grad_(True)
        self.modules = [self.text_encoder, self.unet]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self._rows.table, *self._projections]

    def after_step(self) -> None:
        self._rows.restore()

    def expand_prompt(self, prompt: str) -> str:
        return expand_concepts(prompt.replace("{}", self.concepts[0].token), self.concepts)

    def save(self, path: Path) -> Path:
        """The folder: diffusers' Custom Diffusion weights + one embedding file per token."""
        with staged_folder(path) as staging:
            save_file(processor_state_dict(self.processors), str(staging / WEIGHTS_NAME))
            save_token_embeddings(staging, self.concepts, self._rows)
        return path


def save_token_embeddings(folder: Path, concepts: list[ConceptToken], rows: TrainableRows) -> None:
    """One diffusers embedding file per token (`load_textual_inversion` takes one token per file)."""
    for concept in concepts:
        save_embeddings({concept.token: rows.vectors(concept)},
                        folder / embedding_file_name(concept.token))


def train_custom_diffusion(config: CustomDiffusionConfig) -> TrainResult:
    """Learn one or several concepts with Custom Diffusion; returns where the weights were written."""
    with output_folder(config.resolved().out, "--out") as out:
        return build_trainer(config, out).run()


def build_trainer(config: CustomDiffusionConfig, out: Path) -> Trainer:
    """Check the inputs, load the model, add the tokens and set up the shared loop."""
    cfg = config.resolved()
    resume_from = find_checkpoint(out, cfg.resume)
    material = read_concept_material(cfg)
    pipe = load_pipeline(cfg.model)
    concepts, dataset = build_concept_dataset(cfg, pipe, out, material, scale_aug=not cfg.no_aug)
    method = CustomDiffusion(pipe, concepts, cfg.freeze_model)
    return Trainer(cfg, pipe, dataset, method, out, resume_from)
