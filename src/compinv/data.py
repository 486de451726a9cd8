"""Concept data: read the user's images robustly and turn them into deterministic batches.

Every random choice of a training sample (which image, which prompt template, flip, crop,
VAE sample, noise, timestep) comes from a generator seeded by (run seed, global sample index).
A sample is therefore the same whether the run was resumed, and whether the batch is split
over one process or several: resume and data-parallel runs reproduce a single-process run.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from compinv.errors import CompinvError

log = logging.getLogger("compinv")

# Textual Inversion's prompt templates, filled with the concept ("<cute-cat> cat"). The official
# Compositional Inversion code uses its own list of 22 (no leading article); that is the default.
OFFICIAL_TEMPLATES = (
    "photo of a {}", "rendering of a {}", "cropped photo of the {}", "photo of a clean {}",
    "photo of a dirty {}", "dark photo of the {}", "photo of my {}", "photo of the cool {}",
    "bright photo of the {}", "cropped photo of a {}", "photo of the {}", "good photo of the {}",
    "photo of one {}", "rendition of the {}", "photo of the clean {}", "rendition of a {}",
    "photo of a nice {}", "good photo of a {}", "photo of the nice {}", "photo of the weird {}",
    "photo of the large {}", "photo of a cool {}",
)
# The original Textual Inversion list ("a photo of a {}", ...), for `templates="textual-inversion"`.
TEXTUAL_INVERSION_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
)
TEMPLATE_SETS = {"official": OFFICIAL_TEMPLATES, "textual-inversion": TEXTUAL_INVERSION_TEMPLATES}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency on white, 16-bit scaled, CMYK/gray/palette converted."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_images(folder: str | Path, argument: str = "`images`",
                what: str = "the concept's images") -> list[Image.Image]:
    """Read every decodable image of a folder; skip (with a warning) what cannot be decoded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompinvError(f"{argument} {folder}: no such folder; pass the folder with {what}")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise CompinvError(f"{argument} {folder}: the folder cannot be read ({exc.strerror}); fix "
                           "its permissions or pass another folder") from exc
    if not files:
        raise CompinvError(f"{argument} {folder}: the folder is empty; put {what} in it"
                           + (" (3-20 are typical)" if what == "the concept's images" else ""))
    images = []
    for path in files:
        try:
            images.append(_read_image(path))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
                Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            log.warning("skipping %s: not a readable image (%s)", path, exc)
    if not images:
        raise CompinvError(f"{argument} {folder}: none of its {len(files)} files is a readable image "
                           f"(PNG, JPEG, WebP, ...); add {what}")
    return images


def _read_image(path: Path) -> Image.Image:
    """One image; a header declaring more pixels than PIL's safety limit is an error, not a
    gigabyte allocation (PIL only warns below twice that limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                log.warning("%s has %d frames; using the first", path, img.n_frames)
            img.load()
            return to_rgb(img)


def resize_shorter_side(image: Image.Image, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size`; returns a [3, H, W] tensor in [-1, 1]."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def crop(pixels: torch.Tensor, size: int, center: bool, gen: torch.Generator) -> torch.Tensor:
    """A size x size crop of a [3, H, W] image whose shorter side is `size`."""
    _, h, w = pixels.shape
    if center:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    return pixels[:, top : top + size, left : left + size]


def sample_generator(seed: int, index: int, salt: int = 0) -> torch.Generator:
    """A CPU generator owned by one training sample (see the module docstring)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + salt) % (2**63 - 1))


@dataclass
class Batch:
    """What the trainer needs for one micro-batch; `generators` seed the sample's noise."""

    pixels: torch.Tensor
    input_ids: torch.Tensor
    generators: list[torch.Generator]
    mask: torch.Tensor | None = None  # [B, 1, h, w] at latent size: where the loss counts
    is_prior: torch.Tensor | None = None  # [B] bool: class images of prior preservation


# Custom Diffusion's scale augmentation (docs/official-code.md): the prompt says what happened.
SMALL_PREFIXES = ("a far away ", "very small ")
ZOOM_PREFIXES = ("zoomed in ", "close up ")


@dataclass
class ConceptSamples:
    """One concept's material: its photos, its prompt source and its prior-preservation images.

    `prompts` is the prompt source: each sample draws one (Textual Inversion: every template
    filled with the concept; Custom Diffusion / DreamBooth: the one instance prompt).
    """

    images: list[Image.Image]
    prompts: tuple[str, ...]
    placeholder_ids: tuple[int, ...]
    class_images: list[Image.Image] = field(default_factory=list)
    class_captions: list[str] = field(default_factory=list)


class ConceptDataset:
    """Concept photos (+ class images) of every method; `batch()` is a pure function of its indices.

    Sample i is a concept photo from a stream that visits every photo of every concept once per
    epoch, shuffled; with prior preservation, a class image of the same concept joins it in the
    batch. `masked` gives every sample a latent-size loss mask (Custom Diffusion's loss is a
    masked sum); `scale_aug` is Custom Diffusion's shrink/zoom augmentation, which needs it.
    """

    def __init__(self, concepts: list[ConceptSamples], resolution: int, tokenizer, seed: int,
                 latent_factor: int = 8, scale_aug: bool = False, masked: bool = False,
                 flip_p: float = 0.0, center_crop: bool = True, prior: bool = False):
        self.concepts = concepts
        self.resolution, self.tokenizer, self.seed = resolution, tokenizer, seed
        self.latent_factor, self.scale_aug, self.flip_p = latent_factor, scale_aug, flip_p
        self.masked = masked or scale_aug
        self.center_crop, self.prior = center_crop, prior
        self.pixels = [[resize_shorter_side(im, resolution) for im in c.images] for c in concepts]
        self.class_pixels = [[resize_shorter_side(im, resolution) for im in c.class_images]
                             for c in concepts]
        self.stream = [(c, i) for c, imgs in enumerate(self.pixels) for i in range(len(imgs))]
        self._ids: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.stream)

    def tokenize(self, prompt: str) -> torch.Tensor:
        if prompt not in self._ids:
            self._ids[prompt] = self.tokenizer(
                prompt, padding="max_length", truncation=True,
                max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids[0]
        return self._ids[prompt]

    @staticmethod
    def _choice(options: tuple[str, ...], gen: torch.Generator) -> str:
        """One of `options`; a single option draws nothing, so it leaves the sample's stream as is."""
        if len(options) == 1:
            return options[0]
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]

    def _full_mask(self) -> torch.Tensor:
        side = self.resolution // self.latent_factor
        return torch.ones(1, side, side)

    def augment(self, pixels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Custom Diffusion's scale augmentation: (pixels, latent-size loss mask, prompt prefix).

        With p 0.66 the photo shrinks to [size/3, size] on a mid-grey canvas (0 in [-1, 1], as
        the official code) and the loss only counts where it lies; otherwise it is zoomed to
        [1.2, 1.4] x size and cropped.
        """
        size, f = self.resolution, self.latent_factor
        if not self.scale_aug:
            return pixels, self._full_mask() if self.masked else None, ""
        mask = self._full_mask()
        if float(torch.rand(1, generator=gen)) < 0.66:
            scale = int(torch.randint(size // 3, size + 1, (1,), generator=gen))
        else:
            scale = int(torch.randint(int(1.2 * size), int(1.4 * size) + 1, (1,), generator=gen))
        scale += scale % 2
        resized = F.interpolate(pixels[None], size=(scale, scale), mode="bilinear",
                                antialias=True, align_corners=False)[0]
        if scale >= size:
            top, left = (int(torch.randint(0, scale - size + 1, (1,), generator=gen)) for _ in range(2))
            prefix = self._choice(ZOOM_PREFIXES, gen) if scale > size else ""
            return resized[:, top : top + size, left : left + size], mask, prefix
        top, left = (int(torch.randint(0, size - scale + 1, (1,), generator=gen)) for _ in range(2))
        canvas = torch.zeros_like(pixels)
        canvas[:, top : top + scale, left : left + scale] = resized
        mask = torch.zeros_like(mask)
        # One latent cell of margin, as the official code: edge cells mix image and canvas.
        y0, y1 = top // f + 1, max(top // f + 2, (top + scale) // f - 1)
        x0, x1 = left // f + 1, max(left // f + 2, (left + scale) // f - 1)
        mask[:, y0:y1, x0:x1] = 1.0
        prefix = self._choice(SMALL_PREFIXES, gen) if scale < 0.6 * size else ""
        return canvas, mask, prefix

    def _stream_entry(self, index: int) -> tuple[int, int]:
        epoch, offset = divmod(index, len(self.stream))
        order = torch.randperm(len(self.stream), generator=sample_generator(self.seed, epoch, salt=1))
        return self.stream[int(order[offset])]

    def _flipped(self, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return pixels.flip(-1) if float(torch.rand(1, generator=gen)) < self.flip_p else pixels

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concept photo `index`: pixels, prompt ids, loss mask."""
        gen = sample_generator(self.seed, index)
        c, image = self._stream_entry(index)
        pixels = self._flipped(crop(self.pixels[c][image], self.resolution, self.center_crop, gen), gen)
        prompt = self._choice(self.concepts[c].prompts, gen)
        pixels, mask, prefix = self.augment(pixels, gen)
        return pixels, self.tokenize(prefix + prompt), mask

    def class_sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The class image paired with concept photo `index` (same concept), unaugmented."""
        gen = sample_generator(self.seed, index, salt=3)
        c, _ = self._stream_entry(index)
        k = int(torch.randint(0, len(self.class_pixels[c]), (1,), generator=gen))
        pixels = self._flipped(crop(self.class_pixels[c][k], self.resolution, self.center_crop, gen), gen)
        return pixels, self.tokenize(self.concepts[c].class_captions[k]), (
            self._full_mask() if self.masked else None)

    def batch(self, indices: list[int]) -> Batch:
        samples = [self.sample(i) for i in indices]
        gens = [sample_generator(self.seed, i, salt=2) for i in indices]
        if self.prior:
            samples += [self.class_sample(i) for i in indices]
            gens += [sample_generator(self.seed, i, salt=4) for i in indices]
        pixels, ids, masks = zip(*samples)
        is_prior = torch.arange(len(samples)) >= len(indices) if self.prior else None
        return Batch(pixels=torch.stack(pixels), input_ids=torch.stack(ids), generators=gens,
                     mask=torch.stack(masks) if self.masked else None, is_prior=is_prior)


def read_captions(class_prompt: str | None, count: int, where: str) -> list[str] | None:
    """Captions from a .txt file (one line per class image, in file-name order), or None."""
    if not class_prompt or not class_prompt.endswith(".txt"):
        return None
    path = Path(class_prompt)
    if not path.is_file():
        raise CompinvError(f"{where}: class prompt file {path} not found; give a prompt or a .txt "
                           "file with one caption per class image")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < count:
        raise CompinvError(f"{where}: {path} has {len(lines)} captions for {count} class images; "
                           "write one line per image (in file-name order)")
    return lines[:count]


def ensure_class_images(pipe, prompt: str, folder: Path, count: int, resolution: int, steps: int,
                        seed: int) -> list[Image.Image]:
    """`count` images of `prompt` from the base model, generated once and cached in `folder`.

    Image i uses seed + i and is written atomically as soon as it exists, so an interrupted run
    generates only the missing ones when started again.
    """
    from tqdm.auto import tqdm

    from compinv.artifacts import atomic_write_text, save_image

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "prompt.txt", prompt + "\n")
    missing = [i for i in range(count) if not (folder / f"class-{i:05d}.png").is_file()]
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(missing, desc=f"class images '{prompt}'", disable=not missing):
        generator = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            image = pipe(prompt, num_inference_steps=steps, height=resolution, width=resolution,
                         generator=generator).images[0]
        save_image(image, folder / f"class-{i:05d}.png")
    return [_read_png(folder / f"class-{i:05d}.png") for i in range(count)]


def _read_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)


@dataclass
class ConceptMaterial:
    """What one concept's files hold, read before any model loads (bad inputs fail in seconds)."""

    photos: list[Image.Image]
    class_images: list[Image.Image]
    captions: list[str] | None  # None: prompt the class images with the class prompt


def _argument(spec, key: str) -> str:
    """How an error names a concept's folder: the argument itself, or the concepts-file entry."""
    return f"`{key}`" if spec.where == "`token`" else f"{spec.where} {key}"


def read_concept_material(specs, prior_weight: float) -> list[ConceptMaterial]:
    """Every concept's photos and real class images (+ captions).

    No class images with prior preservation on means "generate them" (`build_dataset`).
    """
    material = []
    for spec in specs:
        photos = load_images(spec.images, _argument(spec, "images"))
        classes: list[Image.Image] = []
        captions = None
        if prior_weight > 0 and spec.class_images:
            where = _argument(spec, "class_images")
            classes = load_images(spec.class_images, where, "images of the class (any number >= 1)")
            captions = read_captions(spec.class_prompt, len(classes), where)
        material.append(ConceptMaterial(photos, classes, captions))
    return material


def subject(spec, token_text: str) -> str:
    """What stands for the concept in prompts: all its vector names, then its class word."""
    return token_text + (f" {spec.class_word}" if spec.class_word else "")


def template_prompts(templates: tuple[str, ...]):
    """Prompt source of Textual Inversion: every template, filled with the concept's subject."""
    return lambda spec, token_text: tuple(t.format(subject(spec, token_text)) for t in templates)


def instance_prompt(spec, token_text: str) -> tuple[str, ...]:
    """Prompt source of Custom Diffusion / DreamBooth: '{}' becomes the token (all vectors) and
    its class word; a prompt naming the token itself gets all its vector names."""
    prompt = spec.instance_prompt or "photo of a {}"
    if "{}" in prompt:
        return (prompt.replace("{}", subject(spec, token_text)),)
    return (" ".join(token_text if w == spec.token else w for w in prompt.split(" ")),)


@dataclass(frozen=True)
class DataRecipe:
    """How a method turns concepts into samples: its prompt source and loss-mask handling."""

    prompts: Callable[..., tuple[str, ...]]
    masked: bool = False
    scale_aug: bool = False


def build_dataset(cfg, pipe, out: Path, material: list[ConceptMaterial],
                  recipe: DataRecipe) -> tuple[list, ConceptDataset]:
    """Add every concept's token and build the training data.

    Missing class images are generated with the base model *before* the tokens are added, and
    cached under `out/class_images/`. Returns (concept tokens, dataset).
    """
    from compinv.tokens import add_concept_tokens

    specs = cfg.concept_list
    tokenizer = pipe.tokenizer
    check_prompts_fit(tokenizer, specs, recipe, cfg.num_vectors)
    class_sets = [_class_set(cfg, pipe, out, spec, m) for spec, m in zip(specs, material)]
    tokens = add_concept_tokens(tokenizer, pipe.text_encoder,
                                [(s.token, s.init_word, _argument(s, "init_word")) for s in specs],
                                cfg.num_vectors)
    concepts = [ConceptSamples(images=m.photos, prompts=recipe.prompts(spec, tok.text),
                               placeholder_ids=tok.ids, class_images=cls[0], class_captions=cls[1])
                for spec, tok, m, cls in zip(specs, tokens, material, class_sets)]
    latent_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    prior = getattr(cfg, "prior_weight", 0.0) > 0
    dataset = ConceptDataset(concepts, cfg.resolution, tokenizer, cfg.seed, latent_factor,
                             scale_aug=recipe.scale_aug, masked=recipe.masked, flip_p=cfg.flip_p,
                             center_crop=cfg.center_crop, prior=prior)
    return tokens, dataset


def check_prompts_fit(tokenizer, specs, recipe: DataRecipe, num_vectors: int) -> None:
    """Refuse vectors that the text encoder would never see: a training prompt longer than its
    77 tokens is cut, and the vectors past the cut would not be trained."""
    prefixes = ("",) + ((*ZOOM_PREFIXES, *SMALL_PREFIXES) if recipe.scale_aug else ())
    limit = tokenizer.model_max_length
    for spec in specs:
        length, prompt = max((len(tokenizer(p + q).input_ids), p + q)
                             for p in prefixes for q in recipe.prompts(spec, ""))
        if length + num_vectors > limit:
            fits = limit - length
            fix = (f"use at most {fits} vectors" if fits >= 1 else "shorten the prompt")
            raise CompinvError(f"`num_vectors` {num_vectors}: the longest training prompt of "
                               f"{spec.token!r} ({prompt.strip()!r}) would need {length + num_vectors} "
                               f"tokens, the text encoder reads {limit}; {fix}")


def _class_set(cfg, pipe, out: Path, spec, material: ConceptMaterial) -> tuple[list[Image.Image], list[str]]:
    """(class images, their captions) of one concept; generated when no real ones were given.

    Under data parallelism every process generates the same seeded images and writes them
    atomically, so the cache is consistent (the work is repeated, not coordinated).
    """
    if getattr(cfg, "prior_weight", 0.0) <= 0:
        return [], []
    prompt = spec.class_prompt or f"photo of a {spec.class_word}"
    if material.class_images:
        return material.class_images, material.captions or [prompt] * len(material.class_images)
    if prompt.endswith(".txt"):
        raise CompinvError(f"class prompt {prompt}: a captions file needs real class images; give "
                           "`class_images` too, or a plain class prompt")
    slug = "".join(c if c.isalnum() else "-" for c in prompt).strip("-")[:80]
    images = ensure_class_images(pipe, prompt, out / "class_images" / slug, cfg.num_class_images,
                                 cfg.resolution, cfg.class_image_steps, cfg.seed)
    return images, [prompt] * len(images)
