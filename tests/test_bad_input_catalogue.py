"""The bad-input catalogue: every case exits 2 with exactly one `error:` line that names the
input (its flag), and leaves nothing in `--out`.

One row per bad input, across `train` (all three methods), `generate`, `--config`, `--concepts`,
`--embeddings`, `--concept` and `--box`. Option checks run against a model path that does not
exist: they must fail before any model loads. README's "Bad input" section lists this table.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import cli_error, write_concept_images

METHODS = ("textual-inversion", "custom-diffusion", "dreambooth")


@dataclass
class Ctx:
    model: Path  # the tiny model
    images: Path
    tmp: Path
    out: Path

    @property
    def missing_model(self) -> str:
        return str(self.tmp / "no-model")

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return str(path)


@pytest.fixture
def ctx(tiny_model, tmp_path) -> Ctx:
    return Ctx(tiny_model, write_concept_images(tmp_path / "imgs", n=2), tmp_path, tmp_path / "out")


def train(c: Ctx, *extra, method: str = "textual-inversion", model: str | None = None,
          images: str | None = None) -> list[str]:
    return ["train", method, "--model", model or str(c.model), "--images", images or str(c.images),
            "--token", "<t>", "--class-word", "cat", "--steps", "1", "--batch-size", "1",
            "--resolution", "32", "--checkpoint-every", "0", "--out", str(c.out), *extra]


def options(*extra, method: str = "textual-inversion") -> Callable[[Ctx], list[str]]:
    """A training option error, found before the (missing) model is read."""
    return lambda c: train(c, *extra, method=method, model=c.missing_model)


def generate(*extra, model: bool = True, prompt: str = "a cat and a dog") -> Callable[[Ctx], list[str]]:
    return lambda c: ["generate", "--model", str(c.model) if model else c.missing_model,
                      "--prompt", prompt, "--num-images", "1", "--steps", "2", "--guided-steps", "1",
                      "--height", "32",
                      "--width", "32", "--out", str(c.out), *extra]


def config(text: str | bytes) -> Callable[[Ctx], list[str]]:
    return lambda c: train(c, "--config", c.file("run.yaml", text), model=c.missing_model)


def concepts(text: str, method: str = "custom-diffusion") -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        path = c.file("concepts.yaml", text.replace("IMG", str(c.images))
                      .replace("NOPE", str(c.tmp / "nope")))
        return ["train", method, "--model", str(c.model), "--concepts", path, "--steps", "1",
                "--resolution", "32", "--out", str(c.out)]
    return argv


def embedding(flag: str, content) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        path = c.tmp / "x.safetensors"
        if isinstance(content, str):
            path.write_text(content)
        else:
            save_file(content, str(path))
        return generate(flag, str(path), prompt="a <t>")(c)
    return argv


def model_without(component: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        model = c.tmp / "model"
        shutil.copytree(c.model, model)
        shutil.rmtree(model / component)
        return generate(model=True)(Ctx(model, c.images, c.tmp, c.out))
    return argv


def images(kind: str) -> Callable[[Ctx], list[str]]:
    def argv(c: Ctx) -> list[str]:
        folder = c.tmp / kind
        if kind != "missing":
            folder.mkdir()
        if kind == "unreadable":
            (folder / "a.txt").write_text("hello")
        return train(c, images=str(folder))
    return argv


CONCEPT = "- {token: '<a>', images: IMG, class_word: cat}\n"
BAD_BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
                     + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)])

# (id, argv builder, flag the line names, what it says)
CASES = [
    # ---- --config: types checked exactly, no aliases, bounded files -----------------------------
    ("config-bool-string", config("no_anchor: 'false'\n"), "--config", "key 'no_anchor' must be true or false, got 'false'"),
    ("config-float-steps", config("steps: 3.9\n"), "--config", "key 'steps' must be a whole number, got 3.9"),
    ("config-bool-steps", config("steps: true\n"), "--config", "key 'steps' must be a whole number, got True"),
    ("config-string-lr", config("lr: '0.1'\n"), "--config", "key 'lr' must be a number, got '0.1'"),
    ("config-bool-lr", config("lr: true\n"), "--config", "key 'lr' must be a number"),
    ("config-int-prompt", config("validation_prompt: 5\n"), "--config", "key 'validation_prompt' must be a string or a list of strings"),
    ("config-dict-prompt", config("validation_prompt: {a: b}\n"), "--config", "must be a string or a list of strings"),
    ("config-mixed-list", config("validation_prompt: [a, 3]\n"), "--config", "must be a string or a list of strings"),
    ("config-int-token", config("token: 7\n"), "--config", "key 'token' must be a string, got 7"),
    ("config-choice", config("mixed_precision: fp8\n"), "--config", "key 'mixed_precision' 'fp8': use one of no, fp16, bf16"),
    ("config-alias", config("a: &x [1, 2]\nb: *x\n"), "--config", "YAML aliases (*name) are not accepted"),
    ("config-alias-bomb", config(BAD_BOMB), "--config", "YAML aliases"),
    ("config-empty", config(""), "--config", "the file is empty"),
    ("config-list", config("[1, 2]\n"), "--config", "must hold a mapping of option names to values"),
    ("config-syntax", config("steps: [\n"), "--config", "not valid YAML or JSON"),
    ("config-unknown-key", config("stepz: 3\n"), "--config", "unknown key 'stepz'"),
    ("config-too-large", config("# " + "x" * (2 << 20) + "\n"), "--config", "more than a settings file needs"),
    ("config-binary", config(bytes(range(256)) * 4), "--config", "not a text file"),
    ("config-missing", lambda c: train(c, "--config", str(c.tmp / "none.yaml")), "--config", "not found"),
    # ---- numeric training options, before any model loads ----------------------------------------
    ("steps-not-whole", options("--steps", "3.9"), "--steps", "invalid int value: '3.9'"),
    ("lr-nan", options("--lr", "nan"), "--lr", "--lr nan: must be a number in (0.0, 1000.0]"),
    ("lr-inf", options("--lr", "inf"), "--lr", "--lr inf"),
    ("lr-zero", options("--lr", "0"), "--lr", "--lr 0.0"),
    ("anchor-weight-negative", options("--anchor-weight", "-1"), "--anchor-weight", "-1.0"),
    ("recon-weight-nan", options("--recon-weight", "nan"), "--recon-weight", "nan"),
    ("flip-p-above-1", options("--flip-p", "1.5"), "--flip-p", "must be a number in [0.0, 1.0]"),
    ("warmup-negative", options("--lr-warmup-steps", "-1"), "--lr-warmup-steps", "-1"),
    ("checkpoint-every-negative", options("--checkpoint-every", "-5"), "--checkpoint-every", "-5"),
    ("checkpoint-limit-zero", options("--checkpoints-total-limit", "0"), "--checkpoints-total-limit", "0"),
    ("seed-negative", options("--seed", "-1"), "--seed", "-1"),
    ("seed-too-large", options("--seed", str(2**40)), "--seed", "1099511627776"),
    ("beta1-one", options("--adam-beta1", "1"), "--adam-beta1", "must be a number in [0.0, 1.0)"),
    ("beta2-negative", options("--adam-beta2", "-0.1"), "--adam-beta2", "-0.1"),
    ("epsilon-zero", options("--adam-epsilon", "0"), "--adam-epsilon", "0.0"),
    ("resolution-not-multiple", options("--resolution", "100"), "--resolution", "must be a multiple of 8"),
    ("resolution-huge", options("--resolution", "100000"), "--resolution", "100000"),
    ("num-vectors-1000", options("--num-vectors", "1000"), "--num-vectors", "1000"),
    ("num-vectors-zero", options("--num-vectors", "0"), "--num-vectors", "0"),
    ("batch-size-zero", options("--batch-size", "0"), "--batch-size", "0"),
    ("grad-norm-negative", options("--max-grad-norm", "-1"), "--max-grad-norm", "-1.0"),
    ("validation-steps-zero", options("--validation-steps", "0"), "--validation-steps", "0"),
    ("anchor-sparsity-negative", options("--anchor-sparsity", "-1"), "--anchor-sparsity", "-1.0"),
    ("cd-lr-nan", options("--lr", "nan", method="custom-diffusion"), "--lr", "nan"),
    ("cd-prior-weight-negative", options("--prior-weight", "-1", method="custom-diffusion"), "--prior-weight", "-1.0"),
    ("cd-freeze-model", options("--freeze-model", "all", method="custom-diffusion"), "--freeze-model", "all"),
    ("db-lora-rank-zero", options("--lora", "--lora-rank", "0", method="dreambooth"), "--lora-rank", "0"),
    ("db-class-images-zero", options("--num-class-images", "0", method="dreambooth"), "--num-class-images", "0"),
    ("db-lora-and-text-encoder", options("--lora", "--train-text-encoder", method="dreambooth"), "--lora", "--train-text-encoder"),
    # ---- training inputs ---------------------------------------------------------------------------
    ("images-missing", images("missing"), "--images", "no such folder"),
    ("images-empty", images("empty"), "--images", "empty"),
    ("images-unreadable", images("unreadable"), "--images", "none of its 1 files is a readable image"),
    ("token-in-vocabulary", lambda c: [("dog" if a == "<t>" else a) for a in train(c)], "--token", "'dog' is already in the tokenizer's vocabulary"),
    ("init-word-two-tokens", lambda c: train(c, "--init-word", "teddybear"), "--init-word", "'teddybear' is 2 tokens"),
    ("anchor-word-unknown", lambda c: train(c, "--anchor-word", "qxzqvkwjqxzq"), "--anchor-word", "'qxzqvkwjqxzq' is not in the vocabulary"),
    ("num-vectors-prompt-too-long", lambda c: train(c, "--num-vectors", "74"), "--num-vectors", "tokens, the text encoder reads 77; use at most"),
    ("out-is-a-file", lambda c: [*train(c)[:-1], c.file("file", "x")], "--out", "is a file"),
    ("resume-no-checkpoint", lambda c: train(c, "--resume", "latest"), "--resume", "latest: no checkpoint"),
    ("resume-not-a-checkpoint", lambda c: train(c, "--resume", str(c.images)), "--resume", "not a complete compinv checkpoint"),
    ("cd-token-in-vocabulary", lambda c: [("cat" if a == "<t>" else a) for a in train(c, method="custom-diffusion")], "--token", "already in the tokenizer's vocabulary"),
    ("db-images-missing", lambda c: train(c, method="dreambooth", images=str(c.tmp / "nope")), "--images", "no such folder"),
    ("db-class-images-unreadable", lambda c: train(c, "--prior-weight", "1", "--class-images", str(c.tmp), method="dreambooth"), "--class-images", "images of the class"),
    # ---- --concepts files --------------------------------------------------------------------------
    ("concepts-not-a-list", concepts("token: '<a>'\n"), "--concepts", "must be a non-empty list"),
    ("concepts-unknown-key", concepts("- {token: '<a>', images: IMG, clas_word: cat}\n"), "--concepts", "entry 1: unknown key 'clas_word'"),
    ("concepts-missing-images", concepts(CONCEPT + "- {token: '<b>', class_word: dog}\n"), "--concepts", "entry 2: missing key 'images'"),
    ("concepts-list-class-word", concepts("- {token: '<a>', images: IMG, class_word: [cat]}\n"), "--concepts", "entry 1: key 'class_word' must be a string"),
    ("concepts-duplicate-token", concepts(CONCEPT + CONCEPT), "--concepts", "entries 1 and 2 both use the token '<a>'"),
    ("concepts-no-class-word", concepts("- {token: '<a>', images: IMG}\n"), "--concepts", "entry 1: needs class_word"),
    ("concepts-missing-folder", concepts(CONCEPT + "- {token: '<b>', images: NOPE, class_word: dog}\n"), "--concepts", "entry 2 images"),
    ("concepts-file-names-collide", concepts("- {token: '<a.b>', images: IMG, class_word: cat}\n- {token: '<a_b>', images: IMG, class_word: dog}\n"), "--concepts", "would both be saved as a_b.safetensors"),
    ("concepts-db-unknown-anchor", concepts("- {token: '<a>', images: IMG, class_word: cat, anchor_words: [cat, qxzqvkwjqxzq]}\n", "dreambooth"), "--concepts", "qxzqvkwjqxzq"),
    ("concepts-with-flags", lambda c: [*concepts(CONCEPT)(c), "--token", "<x>"], "--concepts", "replaces --token"),
    # ---- --embeddings / --concept files ------------------------------------------------------------
    *[(f"{flag[2:]}-{name}", embedding(flag, content), flag, message)
      for flag in ("--embeddings", "--concept")
      for name, content, message in [
          ("not-safetensors", "text", "is not a safetensors file"),
          ("zero-rows", {"<t>": torch.zeros(0, 32)}, "holds 0 vectors"),
          ("wrong-width", {"<t>": torch.zeros(2, 7)}, "width 7, this model's text encoder has 32"),
          ("nan", {"<t>": torch.full((1, 32), float("nan"))}, "NaN or infinite values"),
          ("too-many-vectors", {"<t>": torch.zeros(20000, 32)}, "holds 20000 vectors"),
          ("two-tensors", {"<t>": torch.zeros(1, 32), "<u>": torch.zeros(1, 32)}, "holds 2 tensors")]],
    # ---- generation ----------------------------------------------------------------------------------
    ("model-without-unet", model_without("unet"), "--model", "the folder has no unet/"),
    ("model-without-tokenizer", model_without("tokenizer"), "--model", "the folder has no tokenizer/"),
    ("guidance-scale-nan", generate("--guidance-scale", "nan", model=False), "--guidance-scale", "nan"),
    ("loss-scale-zero", generate("--loss-scale", "0", model=False), "--loss-scale", "0.0"),
    ("loss-threshold-inf", generate("--loss-threshold", "inf", model=False), "--loss-threshold", "inf"),
    ("height-not-multiple", generate("--height", "100", model=False), "--height", "must be a multiple of 8"),
    ("width-huge", generate("--width", "99999", model=False), "--width", "99999"),
    ("num-images-huge", generate("--num-images", "100000", model=False), "--num-images", "100000"),
    ("generate-batch-size-zero", generate("--batch-size", "0", model=False), "--batch-size", "0"),
    ("scheduler-unknown", generate("--scheduler", "lsm", model=False), "--scheduler", "use one of"),
    # ---- --box: the layout is checked first (before step counts) -----------------------------------
    ("box-reversed-before-steps", generate("--box", "cat=0.5,0.2,0.1,0.8", model=False), "--box", "x0 < x1"),
    ("box-outside", generate("--box", "cat=0,0,1.5,1"), "--box", "cat=0,0,1.5,1"),
    ("box-three-numbers", generate("--box", "cat=0,0,1"), "--box", "cat=0,0,1"),
    ("box-not-numbers", generate("--box", "cat=a,b,c,d"), "--box", "cat=a,b,c,d"),
    ("box-no-phrase", generate("--box", "0,0,1,1"), "--box", "0,0,1,1"),
    ("box-twice", generate("--box", "cat=0,0,1,1", "--box", "cat=0,0,0.5,0.5"), "--box", "given twice"),
    ("box-phrase-not-in-prompt", generate("--box", "horse=0,0,1,1"), "phrase 'horse'", "tokens are: a cat and a dog"),
    ("box-guided-steps", generate("--box", "cat=0,0,1,1", "--guided-steps", "9"), "--guided-steps", "guided steps 9"),
]


def test_the_catalogue_covers_every_entry_point():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert {"--config", "--concepts", "--embeddings", "--concept", "--box"} <= {c[2] for c in CASES}
    assert any(i.startswith("cd-") for i in ids) and any(i.startswith("db-") for i in ids)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ctx, capsys, case):
    _, build, flag, message = case
    line = cli_error(capsys, build(ctx))
    assert flag in line and message in line, line
    assert not ctx.out.exists() or not any(ctx.out.iterdir()), f"{ctx.out} holds {list(ctx.out.iterdir())}"


def test_python_errors_name_the_python_argument(tmp_path):
    from compinv.errors import CompinvError
    from compinv.methods.textual_inversion import TrainConfig

    cfg = TrainConfig(model="m", out=str(tmp_path), images=".", token="<t>", class_word="cat",
                      flip_p=2.0)
    with pytest.raises(CompinvError, match=r"^flip_p 2.0: must be a number in \[0.0, 1.0\]$"):
        cfg.resolved()
