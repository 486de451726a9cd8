"""Tiny random metric models (CLIP, a DINO-shaped ViT, DETR) built from configs, saved like the
real ones: offline smoke runs of `compinv evaluate` / `compinv benchmark` and the tests load
them by path exactly as they would load openai/clip-vit-base-patch32. Their numbers mean
nothing; their shapes, preprocessing and file layout are the real models'.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compinv.artifacts import staged_folder
from compinv.evaluation.defaults import COCO_CLASSES

_LAYERS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def save_tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A CLIPModel + CLIPProcessor folder with SD's real tokenizer vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from compinv.models import clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(_LAYERS, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(_LAYERS, image_size=image_size, patch_size=8), projection_dim=16)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=clip_tokenizer())
    return _save(out, CLIPModel(config), processor)


def save_tiny_dino(out: str | Path, seed: int = 0) -> Path:
    """A ViTModel shaped like dino-vits16 at 224 px (patch 16), 2 layers of width 32."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(**_LAYERS, image_size=224, patch_size=16)
    return _save(out, ViTModel(config, add_pooling_layer=False))


def save_tiny_detr(out: str | Path, seed: int = 0, labels: tuple[str, ...] = COCO_CLASSES) -> Path:
    """A DetrForObjectDetection (ResNet backbone from its config, no timm) over `labels`."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    torch.manual_seed(seed)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                            out_features=["stage4"])
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    processor = DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    return _save(out, DetrForObjectDetection(config), processor)


def save_tiny_owlvit(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """An OwlViTForObjectDetection + OwlViTProcessor folder (the open-vocabulary detector)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from compinv.models import clip_tokenizer

    torch.manual_seed(seed)
    config = OwlViTConfig(text_config=dict(_LAYERS, vocab_size=49408, max_position_embeddings=16),
                          vision_config=dict(_LAYERS, image_size=image_size, patch_size=8),
                          projection_dim=_LAYERS["hidden_size"])  # the class head's width
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 16  # OWL-ViT's query length
    square = {"height": image_size, "width": image_size}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=square, crop_size=square),
                                tokenizer=tokenizer)
    return _save(out, OwlViTForObjectDetection(config), processor)


def _save(out: str | Path, model, processor=None) -> Path:
    out = Path(out)
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
    return out
