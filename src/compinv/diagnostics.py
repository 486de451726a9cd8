"""Diagnostics of the paper's two failure signs, for any model and any learned concept.

1. **Out of distribution** (the paper's Figure 2): a learned vector far outside the cloud of
   real word embeddings. `embedding_report` puts each vector's norm and its distance to the
   nearest real word into the vocabulary's own distributions of those quantities, as
   percentiles, and gives its nearest words.
2. **Attention dominance** (the paper's Figure 3): the concept takes a growing share of the
   cross-attention until other words vanish. `attention_shares` measures each token position's
   share of cross-attention probability (BOS, every word, EOS and the padding after it),
   averaged over every cross-attention layer, head, pixel and denoising step.

`padding_blocked` lets cross-attention ignore the padding positions (renormalised over the
rest, through diffusers' own `encoder_attention_mask`), to measure how much a model reads its
words rather than a pooled summary in the padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from compinv.spatial.attention import AttentionRecorder, cross_attention_layers, recording
from compinv.tokens import is_whole_word

# A vector is called out of distribution when its score (the larger of its two percentiles)
# lies above this: fewer than 1 in 100 real words are that long or that isolated.
OOD_THRESHOLD = 99.0
_SAMPLE = 4096  # vocabulary rows sampled for the nearest-neighbour distance distribution


@dataclass(frozen=True)
class VectorReport:
    """Where one learned vector lies relative to the vocabulary's word embeddings."""

    name: str
    norm: float
    norm_percentile: float  # % of vocabulary rows with a smaller or equal norm
    nearest_distance: float  # L2 distance to the nearest vocabulary row
    nearest_distance_percentile: float  # % of sampled rows whose nearest neighbour is as near
    nearest_words: tuple[str, ...]

    @property
    def ood_score(self) -> float:
        """0-100: the larger percentile; above `OOD_THRESHOLD` the vector is out of distribution."""
        return max(self.norm_percentile, self.nearest_distance_percentile)

    def as_dict(self) -> dict:
        return {**asdict(self), "ood_score": self.ood_score,
                "out_of_distribution": self.ood_score > OOD_THRESHOLD}


def _vocabulary(tokenizer, text_encoder) -> tuple[torch.Tensor, list[str]]:
    """The base vocabulary's rows (added tokens left out) and their tokens."""
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    added = set(tokenizer.get_added_vocab().values())
    ids = [i for i in range(table.shape[0]) if i not in added]
    return table[ids], tokenizer.convert_ids_to_tokens(ids)


def word_rows(tokenizer, text_encoder, words: Sequence[str]) -> torch.Tensor:
    """[len(words), dim]: each word's input embedding, the mean of its tokens' rows when it is
    several tokens."""
    table = text_encoder.get_input_embeddings().weight.detach().float().cpu()
    return torch.stack([table[tokenizer(w, add_special_tokens=False).input_ids].mean(0) for w in words])


def _nearest_neighbour_distances(table: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each sampled row's L2 distance to its nearest *other* row of the table."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(table.shape[0], generator=gen)[: min(_SAMPLE, table.shape[0])]
    distances = torch.cdist(table[sample], table)
    distances[torch.arange(len(sample)), sample] = float("inf")
    return distances.min(1).values


def _percentile(value: float, population: torch.Tensor) -> float:
    return float((population <= value).float().mean() * 100)


class VocabularyStats:
    """The vocabulary's distributions a learned vector is compared with (computed once: the
    nearest-neighbour distances of a row sample cost a few seconds on a CPU)."""

    def __init__(self, tokenizer, text_encoder):
        self.table, self.tokens = _vocabulary(tokenizer, text_encoder)
        self.norms = self.table.norm(dim=1)
        self.neighbour = _nearest_neighbour_distances(self.table)
        self.readable = torch.tensor([is_whole_word(t) for t in self.tokens])
        self.unit = torch.nn.functional.normalize(self.table, dim=1)

    def report(self, name: str, v: torch.Tensor, top_k: int = 5) -> VectorReport:
        v = v.detach().float().cpu()
        nearest = float(torch.cdist(v[None], self.table).min())
        cosine = (self.unit @ torch.nn.functional.normalize(v, dim=0)).masked_fill(~self.readable, -2)
        return VectorReport(
            name=name, norm=float(v.norm()), norm_percentile=_percentile(float(v.norm()), self.norms),
            nearest_distance=nearest,
            nearest_distance_percentile=_percentile(nearest, self.neighbour),
            nearest_words=tuple(self.tokens[j][:-4] for j in cosine.topk(top_k).indices.tolist()))


def embedding_report(tokenizer, text_encoder, vectors: dict[str, torch.Tensor],
                     stats: VocabularyStats | None = None) -> list[VectorReport]:
    """A `VectorReport` for every row of every `{token: [N, dim]}` entry (diffusers' names:
    `<t>`, `<t>_1`, ...)."""
    stats = stats or VocabularyStats(tokenizer, text_encoder)
    dim = stats.table.shape[1]
    return [stats.report(token if i == 0 else f"{token}_{i}", v)
            for token, rows in vectors.items() for i, v in enumerate(rows.reshape(-1, dim))]


def projection_picture(tokenizer, text_encoder, vectors: dict[str, torch.Tensor],
                       anchors: Sequence[str] = (), size: int = 512) -> Image.Image:
    """A 2-D PCA of a vocabulary sample (grey), the learned vectors (red) and the anchor words
    (blue): a vector far from the grey cloud is out of distribution."""
    table, _ = _vocabulary(tokenizer, text_encoder)
    gen = torch.Generator().manual_seed(0)
    sample = table[torch.randperm(table.shape[0], generator=gen)[:_SAMPLE]]
    learned = torch.cat([r.detach().float().cpu().reshape(-1, table.shape[1]) for r in vectors.values()])
    anchor_rows = (word_rows(tokenizer, text_encoder, anchors) if anchors
                   else torch.zeros(0, table.shape[1]))
    mean = sample.mean(0)
    _, _, basis = torch.pca_lowrank(sample - mean, q=2, center=False)
    points = [(x - mean) @ basis for x in (sample, learned, anchor_rows)]
    frame = torch.cat([points[0], points[2]])  # the cloud and the anchors set the scale
    low, high = frame.min(0).values, frame.max(0).values
    margin = 0.25 * (high - low).clamp_min(1e-6)
    low, high = low - margin, high + margin
    scale = (size - 40) / (high - low)
    picture = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(picture)
    for group, colour, radius in zip(points, ((170, 170, 170), (220, 30, 30), (30, 80, 220)), (2, 6, 6)):
        for x, y in ((group - low) * scale + 20).tolist():
            off = not (0 <= x <= size and 0 <= y <= size)  # far outside: pinned to the edge
            x, y = min(max(x, 8), size - 8), size - min(max(y, 8), size - 8)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour,
                         outline=(0, 0, 0) if off else None, width=2 if off else 0)
    draw.text((8, 6), "grey: vocabulary  red: learned  blue: anchors  (ringed: off the scale)",
              fill=(0, 0, 0))
    return picture


@dataclass(frozen=True)
class TokenShare:
    """The share of cross-attention probability that went to one position (or the padding)."""

    kind: str  # "bos", "word", "eos" or "padding"
    token: str
    positions: tuple[int, ...]
    share: float


def _token_groups(tokenizer, prompt: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(kind, token, positions) of a prompt padded to the tokenizer's length."""
    ids = tokenizer(prompt, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids
    eos = ids.index(tokenizer.eos_token_id, 1)
    names = [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]
    groups = [("bos", names[0], (0,))]
    groups += [("word", names[p], (p,)) for p in range(1, eos)]
    groups.append(("eos", names[eos], (eos,)))
    if eos + 1 < len(ids):
        groups.append(("padding", f"padding x{len(ids) - eos - 1}", tuple(range(eos + 1, len(ids)))))
    return groups


def _keep_mask(tokenizer, prompts: list[str]) -> torch.Tensor:
    """[len(prompts), T]: 1 up to and including <|endoftext|>, 0 on the padding after it."""
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length).input_ids
        eos = ids.index(tokenizer.eos_token_id, 1)
        rows.append([1.0] * (eos + 1) + [0.0] * (len(ids) - eos - 1))
    return torch.tensor(rows)


@contextlib.contextmanager
def padding_blocked(pipe) -> Iterator[None]:
    """Within the block, the pipeline's cross-attention ignores the padding positions.

    Each call's prompts (and negative prompts) are tokenised when the pipeline encodes them; the
    mask goes to the UNet as `encoder_attention_mask`, which diffusers turns into an attention
    bias, so the probabilities renormalise over BOS, the words and EOS.
    """
    state: dict[str, torch.Tensor] = {}
    original = pipe.encode_prompt

    def encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt=None,
                      *args, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        keep = _keep_mask(pipe.tokenizer, prompts).repeat_interleave(num_images_per_prompt, 0)
        if do_cfg:
            negatives = negative_prompt or ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            negative_keep = _keep_mask(pipe.tokenizer, negatives)
            keep = torch.cat([negative_keep.repeat_interleave(num_images_per_prompt, 0), keep])
        state["keep"] = keep
        return original(prompt, device, num_images_per_prompt, do_cfg, negative_prompt, *args, **kwargs)

    def inject(module, args, kwargs):
        keep = state.get("keep")
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if keep is None or hidden is None:
            return None
        rows = keep if hidden.shape[0] == keep.shape[0] else keep[-hidden.shape[0]:]
        return args, {**kwargs, "encoder_attention_mask": rows.to(hidden.device, hidden.dtype)}

    pipe.encode_prompt = encode_prompt
    handle = pipe.unet.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        del pipe.encode_prompt


def attention_shares(pipe, prompt: str, num_inference_steps: int = 25, guidance_scale: float = 7.5,
                     seeds: Sequence[int] = (0,), block_padding: bool = False) -> list[TokenShare]:
    """Each token position's share of cross-attention while `pipe` draws `prompt`.

    The share is the attention probability a position receives, averaged over every
    cross-attention layer, head, pixel, denoising step and image (conditional half of the
    batch only); the shares of all positions sum to 1.
    """
    recorder = AttentionRecorder(cross_attention_layers(pipe.unet, "all"))
    recorder.mode, recorder.stop_after = "accumulate", None
    recorder.batch_slice = slice(len(seeds), None) if guidance_scale > 1 else slice(None)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    blocked = padding_blocked(pipe) if block_padding else contextlib.nullcontext()
    with torch.no_grad(), recording(pipe.unet, recorder), blocked:
        pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
             num_images_per_prompt=len(seeds), generator=generators, output_type="latent")
    per_position = torch.stack([s.float().mean(dim=(0, 1)) for s in recorder.sums.values()]).mean(0)
    per_position = per_position / per_position.sum()
    # What the text encoder saw: diffusers writes every vector of a multi-vector token.
    seen = pipe.maybe_convert_prompt(prompt, pipe.tokenizer) if hasattr(pipe, "maybe_convert_prompt") else prompt
    return [TokenShare(kind, token, positions, float(per_position[list(positions)].sum()))
            for kind, token, positions in _token_groups(pipe.tokenizer, seen)]


def shares_table(shares: list[TokenShare]) -> str:
    """A plain-text table of `attention_shares`, for a terminal."""
    width = max(len(s.token) for s in shares)
    bars = [f"{s.kind:<8}{s.token:<{width + 2}}{s.share * 100:6.1f} %  {'#' * round(s.share * 50)}"
            for s in shares]
    return "\n".join(bars)


def mean_share(shares: list[TokenShare], kind: str) -> float:
    """Total share of the positions of one kind ("padding", "word", ...)."""
    return float(np.sum([s.share for s in shares if s.kind == kind]))
