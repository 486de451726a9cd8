"""Custom Diffusion: train the cross-attention K and V projections (attn2) and the token rows.

The trainable projections live in diffusers' own `CustomDiffusionAttnProcessor`, installed on
every attn2 layer and initialised from the layer's K/V, so the saved weights are diffusers'
`pytorch_custom_diffusion_weights.safetensors` format. The numbers are the official script's
(learning rate, masked loss scale, mid-grey shrink canvas, clipping of trained gradients only);
the differences are fixes, listed in docs/official-code.md: every concept's token is trained
(its gradient masking froze all but the first) and each is anchored to its own word, and the
anchor loss does not need prior preservation.

Reading the weights back installs the processors ourselves: stock diffusers' loader can
silently load nothing, so every layer is checked to hold the file's weights.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from safetensors.torch import load_file, save_file

from compinv.artifacts import save_embeddings, staged_folder
from compinv.config import (ConceptOptions, ConceptsFileOptions, DataOptions, LossOptions,
                            OptimizerOptions, RunOptions, check_prior, concepts_of, resolve_common,
                            token_file_stem)
from compinv.data import DataRecipe, instance_prompt
from compinv.errors import CompinvError
from compinv.methods.registry import ArtifactReader, Method
from compinv.methods.textual_inversion import load_embedding_file, token_files
from compinv.options import option
from compinv.tokens import ConceptToken, TrainableRows

log = logging.getLogger("compinv")

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"
ARTIFACT_DIR = "custom_diffusion"


@dataclass
class CustomDiffusionConfig(ConceptsFileOptions, ConceptOptions, LossOptions, OptimizerOptions,
                            DataOptions, RunOptions):
    """Custom Diffusion (attn2 K/V + token rows) with the official code's settings.

    The official runs use lr 1e-5 scaled by the batch (2) and doubled with prior preservation:
    2e-5 without class images, 4e-5 with them.
    """

    freeze_model: str = option("crossattn_kv", "what of the cross-attention layers is trained: "
                                               "K and V, or K, V, Q and the output projection",
                               choices=["crossattn_kv", "crossattn"])
    no_aug: bool = option(False, "turn off the scale augmentation (shrink/zoom with loss masks)")
    hflip: bool = option(False, "random horizontal flips")
    lr: float = option(1e-5, "learning rate per sample (scaled by the batch with --scale-lr, and "
                             "doubled with prior preservation, as officially)")
    scale_lr: bool = option(True, "multiply --lr by batch size x grad accumulation x processes")
    steps: int = option(500, "optimisation steps")
    batch_size: int = option(2, "instance images per micro-batch and process (prior preservation "
                                "adds as many class images)")
    grad_accum: int = option(1, "micro-batches per optimisation step")
    flip_p: float = option(0.0, "probability of a horizontal flip")
    max_grad_norm: float = option(1.0, "clip the trained parameters' gradients to this norm "
                                       "(0: no clipping)")
    repeats: int = option(1, "how often each image appears per epoch")

    def resolved(self) -> CustomDiffusionConfig:
        """The run's settings with derived values filled and every check done (once per run)."""
        cfg = resolve_common(self)
        cfg = dataclasses.replace(cfg, concept_list=concepts_of(cfg),
                                  flip_p=0.5 if cfg.hflip else cfg.flip_p)
        check_prior(cfg)
        return cfg


def embedding_file_name(token: str) -> str:
    """One diffusers embedding file per token; the name keeps only filesystem-safe characters."""
    return f"{token_file_stem(token)}.safetensors"


def save_token_embeddings(folder: Path, concepts: list[ConceptToken], rows: TrainableRows) -> None:
    """One diffusers embedding file per token (`load_textual_inversion` takes one token per file)."""
    for concept in concepts:
        save_embeddings({concept.token: rows.vectors(concept)},
                        folder / embedding_file_name(concept.token))


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
        return [self._rows.rows, *self._projections]

    def prepare_gradients(self) -> None:
        self._rows.gather_gradients()

    def after_step(self) -> None:
        self._rows.write()

    def save(self, path: Path) -> Path:
        """The folder: diffusers' Custom Diffusion weights + one embedding file per token."""
        with staged_folder(path) as staging:
            save_file(processor_state_dict(self.processors), str(staging / WEIGHTS_NAME))
            save_token_embeddings(staging, self.concepts, self._rows)
        return path


def load_custom_diffusion(pipe, marker: Path, run: Path) -> list[str]:
    """Install a `CustomDiffusionAttnProcessor` per saved layer, check each holds the file's
    weights, then load the token files; returns the tokens."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(marker)).items():
        name, _, sub = key.partition(".processor.")
        grouped.setdefault(name + ".processor", {})[sub] = value
    processors = dict(pipe.unet.attn_processors)
    unknown = sorted(set(grouped) - set(processors))
    if unknown or not grouped:
        raise CompinvError(f"`runs` {run}: {marker.name} does not match this model's attention "
                           f"layers ({unknown[:1] or 'no layers'}); load it into the base model "
                           "it was trained from")
    for name, weights in grouped.items():
        processors[name] = _processor(weights, run, name).to(device=pipe.unet.device,
                                                             dtype=pipe.unet.dtype)
    pipe.unet.set_attn_processor(processors)
    _verify(pipe, run, grouped)
    return [t for f in token_files(marker.parent, {WEIGHTS_NAME})
            for t in load_embedding_file(pipe, f, run)]


def _processor(weights: dict[str, torch.Tensor], run: Path, name: str) -> CustomDiffusionAttnProcessor:
    k = weights["to_k_custom_diffusion.weight"]
    proc = CustomDiffusionAttnProcessor(
        train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights,
        hidden_size=k.shape[0], cross_attention_dim=k.shape[1])
    try:
        proc.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CompinvError(f"`runs` {run}: layer {name} does not fit this model ({exc}); "
                           "load it into the base model it was trained from") from exc
    return proc


def _verify(pipe, run: Path, grouped: dict[str, dict[str, torch.Tensor]]) -> None:
    active = pipe.unet.attn_processors
    for name, weights in grouped.items():
        state = active[name].state_dict()
        if not all(torch.equal(state[k].cpu().float(), v.float()) for k, v in weights.items()):
            raise CompinvError(f"`runs` {run}: layer {name} did not receive the trained weights")
    modules = dict(pipe.unet.named_modules())
    changed = any(not torch.equal(w["to_k_custom_diffusion.weight"].float(),
                                  modules[n[: -len(".processor")]].to_k.weight.detach().cpu().float())
                  for n, w in grouped.items())
    if not changed:
        log.warning("%s: the Custom Diffusion K weights equal the base model's (was the run "
                    "trained?)", run)


METHOD = Method(
    name="custom-diffusion",
    short="CD",
    help="Custom Diffusion (attn2 K/V + tokens) with semantic inversion",
    config_class=CustomDiffusionConfig,
    # The official loss is a masked sum for every concept image, augmented or not.
    recipe=lambda cfg: DataRecipe(prompts=instance_prompt, masked=True, scale_aug=not cfg.no_aug),
    build=lambda cfg, pipe, tokens: CustomDiffusion(pipe, tokens, cfg.freeze_model),
    artifact_name=lambda cfg: ARTIFACT_DIR,
    readers=(ArtifactReader("custom-diffusion", ARTIFACT_DIR, WEIGHTS_NAME, load_custom_diffusion,
                            exclusive=True),),
    prior_lr_factor=2.0,
)
