"""Samples from what generation wrote: a `generation.json` run folder, or a folder + prompts file.

A generation run names its concept runs (`--concept RUN`); each run's config.json gives the
token, its class word and its training images, which become the plain prompt (token replaced by
its class word, as the paper scores text alignment) and the references (image alignment).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from compinv.errors import CompinvError
from compinv.evaluation.defaults import COCO_CLASSES
from compinv.evaluation.metrics import reference_images
from compinv.evaluation.samples import Sample

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def concept_info(run: str | Path, argument: str | None = None) -> list[dict]:
    """[{token, class_word, images}] of a training run folder (one per concept it learned).

    argument: the Python argument that named the run; None when a generation.json named it."""
    config = Path(run) / "config.json"
    if not config.is_file():
        if argument:
            raise CompinvError(f"`{argument}` {run}: no config.json; pass the out folder of a "
                               "`compinv train` run")
        raise CompinvError(f"concept run {run} (named in a generation.json) has no config.json; "
                           "pass `class_word` and `references` for its token instead")
    record = json.loads(config.read_text())
    listed = record.get("concept_list") or [record]
    return [{"token": c.get("token"), "class_word": c.get("class_word") or "",
             "images": c.get("images")} for c in listed if c.get("token")]


def plain_prompt(prompt: str, class_words: Mapping[str, str]) -> str:
    """The prompt with each concept token replaced by its class word, without doubling a class
    word kept after the token ("<cute-cat> cat" -> "cat"), whitespace normalised."""
    text = prompt
    for token, word in sorted(class_words.items(), key=lambda kv: -len(kv[0])):
        pattern = re.escape(token) + (r"(\s+" + re.escape(word) + r"\b)?" if word else "")
        text = re.sub(pattern, word, text)
    return " ".join(text.split())


def other_objects(prompt: str, class_words: Mapping[str, str]) -> tuple[str, ...]:
    """The COCO classes a prompt names besides its concepts ("<cute-cat> cat and a dog" ->
    ("dog",)): what concept inclusion looks for when nobody said."""
    text = prompt
    for token, word in sorted(class_words.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(re.escape(token) + (r"(\s+" + re.escape(word) + r"\b)?" if word else ""), " ", text)
    return classes_in(text)


def generation_folders(folder: str | Path) -> list[Path]:
    """`folder` itself when it holds generation.json, else every folder below it that does
    (a `compinv benchmark` output), sorted; an error when there is none."""
    folder = Path(folder)
    if (folder / "generation.json").is_file():
        return [folder]
    if not folder.is_dir():
        raise CompinvError(f"`run` {folder}: no such folder; pass the --out folder of "
                           "`compinv generate` or `compinv benchmark`")
    found = sorted(p.parent for p in folder.rglob("generation.json") if not _staging(p, folder))
    if not found:
        raise CompinvError(f"`run` {folder}: no generation.json in it or below it; pass the --out "
                           "folder of `compinv generate` or `compinv benchmark`, or use `images` "
                           "with `prompts`")
    return found


def _staging(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def parse_pairs(items: Sequence[str], argument: str) -> dict[str, str]:
    """'TOKEN=VALUE' flags as a mapping."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CompinvError(f"`{argument}` {item!r}: write TOKEN=VALUE, e.g. '<cute-cat>=cat'")
        out[key.strip()] = value.strip()
    return out


def run_samples(folder: str | Path, variant: str | None = None,
                class_words: Mapping[str, str] | None = None,
                references: Mapping[str, str] | None = None,
                objects: Sequence[str] = ()) -> list[Sample]:
    """The samples of one `compinv generate` (or `compinv benchmark`) output folder.

    class_words / references: {token: class word / reference folder}, overriding (or standing
    in for) what the concept runs' config.json say. objects: what inclusion looks for, when
    generation.json does not say (the benchmark writes it).
    """
    folder = Path(folder)
    manifest = folder / "generation.json"
    if not manifest.is_file():
        raise CompinvError(f"`run` {folder}: no generation.json; pass the --out folder of "
                           "`compinv generate` or `compinv benchmark`, or use `images` with `prompts`")
    try:
        record = json.loads(manifest.read_text())
        config = record["config"]
        names = record["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CompinvError(f"`run` {manifest}: not a generation.json written by compinv ({exc})") from exc
    missing = [n for n in names if not (folder / n).is_file()]
    if not names or missing:
        raise CompinvError(f"`run` {manifest} lists {len(names)} image(s) but "
                           f"{len(missing) if names else 'none'} {'are' if names else 'is'} missing"
                           f"{' (' + missing[0] + ', ...)' if missing else ''}; regenerate the run")
    info = [c for run in config.get("concept") or [] for c in concept_info(run)]
    words = {c["token"]: c["class_word"] for c in info} | dict(class_words or {})
    refs = {c["token"]: c["images"] for c in info if c["images"]} | dict(references or {})
    tokens = [t for t in (record.get("tokens_loaded") or list(words)) if t in record["config"]["prompt"]]
    tokens = [t for t in dict.fromkeys(tokens) if not re.search(r"_\d+$", t) or t in words]
    prompt = config["prompt"]
    plain = record.get("plain_prompt") or plain_prompt(prompt, {t: words.get(t, "") for t in tokens})
    ref_files = tuple(p for t in tokens if t in refs for p in reference_images(refs[t], "references"))
    attention = [folder / n for n in record.get("attention_maps") or []]
    return [Sample(image=folder / name, prompt=prompt, plain_prompt=plain,
                   variant=variant or record.get("variant") or folder.name, index=i,
                   references=ref_files, objects=tuple(record.get("objects") or objects
                                                       or other_objects(prompt, words)),
                   concepts=tuple(tokens),
                   attention=tuple(p for p in attention if p.name.startswith(f"attention-{i:04d}-")))
            for i, name in enumerate(names)]


def folder_samples(images: str | Path, prompts: str | Path, variant: str | None = None,
                   class_words: Mapping[str, str] | None = None,
                   references: Mapping[str, str] | None = None,
                   objects: Sequence[str] = ()) -> list[Sample]:
    """Samples of a plain image folder: `prompts` holds one prompt per image (in file-name
    order), or one prompt for all of them."""
    folder = Path(images)
    if not folder.is_dir():
        raise CompinvError(f"`images` {folder}: no such folder; pass the folder of generated images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(("attention-", ".")))
    if not files:
        raise CompinvError(f"`images` {folder}: the folder holds no images (PNG, JPEG, WebP); pass "
                           "the folder of generated images")
    path = Path(prompts)
    if not path.is_file():
        raise CompinvError(f"`prompts` {path}: no such file; pass a text file with one prompt a line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) == 1:
        lines = lines * len(files)
    if len(lines) != len(files):
        raise CompinvError(f"`prompts` {path}: {len(lines)} prompts for {len(files)} images in "
                           f"{folder}; give one prompt per image (in file-name order) or one for all")
    words = dict(class_words or {})
    refs = {t: reference_images(f, "references") for t, f in (references or {}).items()}
    samples = []
    for i, (file, prompt) in enumerate(zip(files, lines)):
        tokens = tuple(t for t in set(words) | set(refs) if t in prompt)
        samples.append(Sample(image=file, prompt=prompt, plain_prompt=plain_prompt(prompt, {
            t: words.get(t, "") for t in tokens}), variant=variant or folder.name, index=i,
            references=tuple(p for t in sorted(tokens) for p in refs.get(t, ())),
            objects=tuple(objects) or other_objects(prompt, words), concepts=tokens))
    return samples


def classes_in(text: str, classes: Sequence[str] = COCO_CLASSES) -> tuple[str, ...]:
    """The classes named in `text` as whole words, longest first so that "hot dog" is not also
    "dog"; in the order of `classes`."""
    text = " " + " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split()) + " "
    found = []
    for name in sorted(classes, key=len, reverse=True):
        if f" {name} " in text:
            found.append(name)
            text = text.replace(f" {name} ", "  ")
    return tuple(sorted(found, key=list(classes).index))
