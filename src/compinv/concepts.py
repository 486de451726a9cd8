"""Load learned concepts from our run folders into a pipeline, and check they really loaded.

Any mix of Textual Inversion, Custom Diffusion, DreamBooth and DreamBooth-LoRA runs can be
loaded together, with two exceptions that cannot be combined after training: two Custom
Diffusion runs (both replace the same attn2 K/V; train the concepts together with
`--concepts`), and two full DreamBooth runs (each is a whole model). Stock diffusers' Custom
Diffusion loader can silently load nothing (KNOWLEDGE.md §4), so we install the processors
ourselves and every loader verifies that the pipeline's weights now equal the artifact's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from safetensors.torch import load_file

from compinv.artifacts import EMBEDDINGS_FILE
from compinv.errors import CompinvError
from compinv.methods.custom_diffusion import ARTIFACT_DIR, WEIGHTS_NAME
from compinv.methods.dreambooth import LORA_DIR, LORA_WEIGHTS_NAME, PIPELINE_DIR

log = logging.getLogger("compinv")

# Which artifact a run folder holds, by the file that marks it; checked in this order.
KINDS = (("dreambooth", PIPELINE_DIR, "model_index.json"), ("lora", LORA_DIR, LORA_WEIGHTS_NAME),
         ("custom-diffusion", ARTIFACT_DIR, WEIGHTS_NAME),
         ("textual-inversion", ".", EMBEDDINGS_FILE))
_WEIGHT_FILES = {WEIGHTS_NAME, LORA_WEIGHTS_NAME}


def find_artifact(run: str | Path) -> tuple[str, Path]:
    """(kind, artifact folder) of a run folder, of its artifact folder, or of a TI embedding file."""
    run = Path(run)
    if run.is_file() and run.suffix == ".safetensors":
        return "textual-inversion", run
    for kind, sub, marker in KINDS:
        for folder in (run / sub, run):
            if (folder / marker).is_file():
                return kind, (folder / marker if kind == "textual-inversion" else folder)
    raise CompinvError(f"--concept {run}: not a compinv run folder (no {PIPELINE_DIR}/, {LORA_DIR}/, "
                       f"{ARTIFACT_DIR}/ or {EMBEDDINGS_FILE}); pass the --out folder of a "
                       "finished `compinv train` run")


def load_concepts(pipe: StableDiffusionPipeline, runs: str | Path | list[str | Path]) -> list[str]:
    """Load every run's concepts into `pipe` (in place); returns the tokens now usable in prompts."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    found = [(Path(run), *find_artifact(run)) for run in runs]
    for kind in ("dreambooth", "custom-diffusion"):
        same = [str(run) for run, k, _ in found if k == kind]
        if len(same) > 1:
            raise CompinvError(f"--concept {same[0]} and {same[1]} are both {kind} runs; they change "
                               "the same weights and cannot be combined. Train the concepts "
                               "together with --concepts FILE")
    found.sort(key=lambda item: item[1] != "dreambooth")  # a whole model goes in first
    tokens: list[str] = []
    adapters: list[str] = []
    for run, kind, artifact in found:
        if kind == "dreambooth":
            tokens += _load_dreambooth(pipe, run, artifact)
        elif kind == "custom-diffusion":
            _load_custom_diffusion(pipe, run, artifact / WEIGHTS_NAME)
        elif kind == "lora":
            adapters.append(_load_lora(pipe, run, artifact, len(adapters)))
        files = [artifact] if kind == "textual-inversion" else sorted(
            p for p in artifact.glob("*.safetensors") if p.name not in _WEIGHT_FILES)
        if kind != "dreambooth":
            tokens += [_load_embedding(pipe, run, f) for f in files]
    if len(adapters) > 1:
        pipe.set_adapters(adapters, [1.0] * len(adapters))
    return tokens


def _load_embedding(pipe: StableDiffusionPipeline, run: Path, path: Path) -> str:
    """One diffusers embedding file via `load_textual_inversion`; refuses to redefine a token."""
    data = load_file(str(path))
    if len(data) != 1:
        raise CompinvError(f"--concept {run}: {path.name} holds {len(data)} tensors; expected one "
                           "token's embedding")
    (token, vectors), = data.items()
    if token in pipe.tokenizer.get_vocab():
        raise CompinvError(f"--concept {run}: token {token!r} is already loaded (from another "
                           "--concept or the model); train the concepts with different tokens")
    pipe.load_textual_inversion(str(path))
    names = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    if not torch.equal(table[ids].cpu().float(), vectors.float()):
        raise CompinvError(f"--concept {run}: {token!r} did not load into the text encoder")
    return token


def _load_custom_diffusion(pipe: StableDiffusionPipeline, run: Path, path: Path) -> None:
    """Install a `CustomDiffusionAttnProcessor` per saved layer, then check each holds the file's weights."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, _, sub = key.partition(".processor.")
        grouped.setdefault(name + ".processor", {})[sub] = value
    processors = dict(pipe.unet.attn_processors)
    unknown = sorted(set(grouped) - set(processors))
    if unknown or not grouped:
        raise CompinvError(f"--concept {run}: {path.name} does not match this model's attention "
                           f"layers ({unknown[:1] or 'no layers'}); load it into the base model "
                           "it was trained from")
    dtype, device = pipe.unet.dtype, pipe.unet.device
    for name, weights in grouped.items():
        k = weights["to_k_custom_diffusion.weight"]
        proc = CustomDiffusionAttnProcessor(
            train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights,
            hidden_size=k.shape[0], cross_attention_dim=k.shape[1])
        try:
            proc.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CompinvError(f"--concept {run}: layer {name} does not fit this model ({exc}); "
                               "load it into the base model it was trained from") from exc
        processors[name] = proc.to(device=device, dtype=dtype)
    pipe.unet.set_attn_processor(processors)
    _verify_custom_diffusion(pipe, run, grouped)


def _verify_custom_diffusion(pipe, run: Path, grouped: dict[str, dict[str, torch.Tensor]]) -> None:
    active = pipe.unet.attn_processors
    for name, weights in grouped.items():
        state = active[name].state_dict()
        if not all(torch.equal(state[k].cpu().float(), v.float()) for k, v in weights.items()):
            raise CompinvError(f"--concept {run}: layer {name} did not receive the trained weights")
    modules = dict(pipe.unet.named_modules())
    changed = any(not torch.equal(w["to_k_custom_diffusion.weight"].float(),
                                  modules[n[: -len(".processor")]].to_k.weight.detach().cpu().float())
                  for n, w in grouped.items())
    if not changed:
        log.warning("--concept %s: the Custom Diffusion K weights equal the base model's "
                    "(was the run trained?)", run)


def _load_lora(pipe: StableDiffusionPipeline, run: Path, folder: Path, index: int) -> str:
    """diffusers' `load_lora_weights`, as its own adapter; checks LoRA layers appeared in the UNet."""
    name = f"concept{index}"
    before = sum("lora_" in n for n, _ in pipe.unet.named_parameters())
    try:
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_NAME, adapter_name=name)
    except (ValueError, OSError, RuntimeError) as exc:
        raise CompinvError(f"--concept {run}: the LoRA cannot be loaded ({exc})") from exc
    if sum("lora_" in n for n, _ in pipe.unet.named_parameters()) <= before:
        raise CompinvError(f"--concept {run}: the LoRA loaded no layer into the UNet; load it into "
                           "the base model it was trained from")
    return name


def _load_dreambooth(pipe: StableDiffusionPipeline, run: Path, folder: Path) -> list[str]:
    """Swap in the fine-tuned UNet, text encoder and tokenizer (they were saved together)."""
    loaded = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True,
                                                     torch_dtype=pipe.unet.dtype)
    vocabulary, rows = len(loaded.tokenizer), loaded.text_encoder.get_input_embeddings().weight.shape[0]
    if vocabulary != rows:
        raise CompinvError(f"--concept {run}: tokenizer ({vocabulary} entries) and text encoder "
                           f"({rows} rows) disagree; the pipeline folder is damaged")
    lost = sorted(set(pipe.tokenizer.get_added_vocab()) - set(loaded.tokenizer.get_added_vocab()))
    if lost:
        raise CompinvError(f"--concept {run}: a DreamBooth run replaces the text encoder, which "
                           f"would drop the tokens already loaded ({', '.join(lost)}); load the "
                           "DreamBooth run first (one load_concepts call orders them for you)")
    old = next(pipe.unet.parameters()).detach().clone()
    pipe.register_modules(unet=loaded.unet.to(pipe.device), tokenizer=loaded.tokenizer,
                          text_encoder=loaded.text_encoder.to(pipe.device))
    if old.shape == next(pipe.unet.parameters()).shape and torch.equal(old, next(pipe.unet.parameters())):
        log.warning("--concept %s: the DreamBooth UNet's first weights equal the model's", run)
    added = [t for t in loaded.tokenizer.get_added_vocab()
             if t not in loaded.tokenizer.all_special_tokens and not _is_extra_vector(t)]
    return sorted(added)


def _is_extra_vector(token: str) -> bool:
    """diffusers' `<tok>_1`, `<tok>_2`, ... name the extra vectors of a multi-vector token."""
    head, _, tail = token.rpartition("_")
    return bool(head) and tail.isdigit()
