"""The shipped tokenizer gives CLIP's real ids; tiny models save and load as SD folders."""

import pytest
from diffusers import StableDiffusionPipeline

from compinv.errors import CompinvError
from compinv.models import MODEL_SIZES, build_tiny_pipeline, clip_tokenizer, load_pipeline


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("teddybear", [49406, 25758, 4298, 49407]),
        ("dog!", [49406, 1929, 256, 49407]),
    ],
)
def test_tokenizer_ids_match_clip(text, ids):
    assert clip_tokenizer()(text).input_ids == ids


def test_tokenizer_has_full_clip_vocabulary():
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.convert_ids_to_tokens([49406, 49407]) == ["<|startoftext|>", "<|endoftext|>"]


def test_tiny_model_roundtrips_through_stock_diffusers(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, local_files_only=True)
    assert pipe.tokenizer("a photo of a cat").input_ids[5] == 2368
    assert pipe.text_encoder.config.hidden_size == MODEL_SIZES["tiny"]["text_hidden"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_every_size_is_a_working_sd_pipeline(size):
    """One embedding row per tokenizer entry, a UNet that reads the encoder's width, and an end
    to end forward pass: what breaks if a size's configs disagree."""
    import torch

    pipe = build_tiny_pipeline(size)
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        latents = torch.zeros(1, pipe.unet.config.in_channels, 8, 8)
        out = pipe.unet(latents, 10, hidden).sample
    assert hidden.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_missing_local_model_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CompinvError, match="not a local folder.*download"):
        load_pipeline("no-such-org/no-such-model")
    with pytest.raises(CompinvError, match="model_index.json"):
        load_pipeline(tmp_path)
