"""The numbers that must equal the official scripts' (docs/official-code.md), each tested by
what the code does with them, not by restating a constant."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from compinv.data import OFFICIAL_TEMPLATES, TEXTUAL_INVERSION_TEMPLATES
from compinv.losses import reconstruction_terms
from compinv.methods.custom_diffusion import CustomDiffusionConfig
from compinv.training import prepare, train
from helpers import ti_config, write_concept_images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbers")
    return write_concept_images(root / "concept", seed=0), write_concept_images(root / "class", seed=1)


def _cd(tiny_model, out, images, **overrides) -> CustomDiffusionConfig:
    """Custom Diffusion at its default optimiser settings (batch 2, lr 1e-5, scale_lr)."""
    settings = dict(model=str(tiny_model), images=str(images), token="<c>", class_word="cat",
                    out=str(out), steps=1, resolution=32, checkpoint_every=0, save_every=0,
                    validation_every=0)
    return CustomDiffusionConfig(**{**settings, **overrides})


@pytest.mark.parametrize("prior, expected", [(False, 2e-5), (True, 4e-5)])
def test_custom_diffusion_effective_lr_is_the_official_one(tiny_model, folders, tmp_path, prior,
                                                           expected):
    """Official: --learning_rate 1e-5 --scale_lr at batch 2, doubled with prior preservation."""
    extra = dict(prior_weight=1.0, class_images=str(folders[1])) if prior else {}
    result = train(_cd(tiny_model, tmp_path / "run", folders[0], **extra))
    record = json.loads((result.out / "config.json").read_text())
    assert record["effective_lr"] == pytest.approx(expected, rel=1e-12)


def test_masked_reconstruction_sums_the_latent_channels():
    """(mse * mask).sum([1,2,3]) / mask.sum([1,2,3]) with a B x 1 x h x w mask, as officially."""
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    full = torch.ones(2, 1, 6, 6)
    terms = reconstruction_terms(pred, target, full, None)
    torch.testing.assert_close(terms["rec"], 4 * F.mse_loss(pred, target))
    part = torch.zeros(2, 1, 6, 6)
    part[0, :, 1:4, 2:5] = 1
    part[1, :, :2, :] = 1
    official = ((F.mse_loss(pred, target, reduction="none") * part).sum([1, 2, 3])
                / part.sum([1, 2, 3])).mean()
    torch.testing.assert_close(reconstruction_terms(pred, target, part, None)["rec"], official)


def test_prior_term_is_a_plain_mean_and_unmasked_rec_too():
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 4, 5, 5, generator=gen), torch.randn(4, 4, 5, 5, generator=gen)
    is_prior = torch.tensor([False, False, True, True])
    terms = reconstruction_terms(pred, target, torch.ones(4, 1, 5, 5), is_prior)
    torch.testing.assert_close(terms["prior"], F.mse_loss(pred[2:], target[2:]))
    torch.testing.assert_close(terms["rec"], 4 * F.mse_loss(pred[:2], target[:2]))
    assert torch.equal(reconstruction_terms(pred, target, None, None)["rec"], F.mse_loss(pred, target))


def test_custom_diffusion_trains_with_the_masked_sum(tiny_model, folders, tmp_path):
    """Every CD batch carries a loss mask, augmented or not, so its loss has the official scale."""
    trainer = prepare(_cd(tiny_model, tmp_path / "run", folders[0], no_aug=True).resolved())
    batch = trainer.dataset.batch([0, 1])
    assert batch.mask is not None and batch.mask.shape == (2, 1, 16, 16) and bool(batch.mask.all())


@pytest.mark.parametrize("method", ["custom-diffusion", "textual-inversion"])
def test_gradient_clipping_sees_only_the_trained_rows(tiny_model, folders, tmp_path, method):
    """Clipping measures the concept rows' gradient, not the frozen rows' (official CD/DB): the
    optimiser and the clip get the concept rows alone, with the table's gradient for them."""
    cfg = (_cd(tiny_model, tmp_path / "run", folders[0]) if method == "custom-diffusion"
           else ti_config(tiny_model, folders[0], tmp_path / "run", max_grad_norm=1.0))
    trainer = prepare(cfg.resolved())
    table = trainer.method.text_encoder.get_input_embeddings().weight
    concept_rows = list(trainer.dataset.concepts[0].placeholder_ids)
    seen = {}

    def record_table_grad(grad):
        seen["table"] = grad[concept_rows].clone()

    table.register_hook(record_table_grad)
    clip = trainer.accelerator.clip_grad_norm_

    def recording_clip(parameters, max_norm):
        parameters = list(parameters)
        seen["rows"] = parameters[0].grad.clone()
        seen["shapes"] = [tuple(p.shape) for p in parameters]
        return clip(parameters, max_norm)

    trainer.accelerator.clip_grad_norm_ = recording_clip
    frozen_before = table.detach().clone()
    trainer.step()
    assert seen["shapes"][0] == (len(concept_rows), table.shape[1])
    assert all(shape[0] != table.shape[0] for shape in seen["shapes"])  # never the whole table
    assert torch.equal(seen["rows"], seen["table"]) and float(seen["rows"].abs().max()) > 0
    frozen = torch.ones(table.shape[0], dtype=torch.bool)
    frozen[concept_rows] = False
    assert torch.equal(table.detach()[frozen], frozen_before[frozen])
    assert not torch.equal(table.detach()[concept_rows], frozen_before[concept_rows])


def test_textual_inversion_uses_the_official_templates_by_default(tiny_model, folders, tmp_path):
    official = prepare(ti_config(tiny_model, folders[0], tmp_path / "a").resolved())
    prompts = official.dataset.concepts[0].prompts
    assert prompts == tuple(t.format("<cute-cat> cat") for t in OFFICIAL_TEMPLATES)
    assert len(prompts) == 22 and prompts[0] == "photo of a <cute-cat> cat"
    vanilla = prepare(ti_config(tiny_model, folders[0], tmp_path / "b",
                                templates="textual-inversion").resolved())
    assert vanilla.dataset.concepts[0].prompts[0] == "a photo of a <cute-cat> cat"
    assert len(vanilla.dataset.concepts[0].prompts) == len(TEXTUAL_INVERSION_TEMPLATES)
