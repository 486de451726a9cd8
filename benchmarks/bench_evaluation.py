"""Cost of the evaluation's CLIP text alignment against torchmetrics' CLIPScore, same model.

A CLIP with ViT-B/32's shapes (random weights, built from its config: the real one cannot be
downloaded here) scores N 512 px images against their prompts, once through
`compinv.evaluation.metrics.ClipMetrics` (batched) and once through torchmetrics' `CLIPScore`
fed one image at a time and in one batch; the runs alternate, the median is compared, and the
scores are checked to agree. Writes benchmarks/results/evaluation.json.

    python benchmarks/bench_evaluation.py [--images 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from compinv.evaluation.loading import features
from compinv.evaluation.metrics import ClipMetrics
from compinv.evaluation.samples import Sample
from compinv.versions import library_versions

RESULTS = Path(__file__).parent / "results" / "evaluation.json"


def save_vit_b32_shaped_clip(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from compinv.models import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                         num_attention_heads=8),
                        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=32),
                        projection_dim=512)
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer()).save_pretrained(out)
    return out


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.x expects tensors from get_*_features; transformers 5 returns outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return features(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return features(self.model.get_text_features(*args, **kwargs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from torchmetrics.multimodal.clip_score import CLIPScore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_vit_b32_shaped_clip(Path(tmp) / "clip")
        clip = ClipMetrics(str(model), batch_size=32)
        images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
                  for _ in range(args.images)]
        prompts = [f"a cat and a {w}" for w in ("dog", "cup", "car", "kite")] * (args.images // 4)
        samples = [Sample(image=Path("x"), prompt=p, plain_prompt=p) for p in prompts]
        tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
        metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(clip.model), clip.processor))

        def ours():
            return clip.score(samples, images)["clip_t"]

        def theirs_each():
            out = []
            for t, p in zip(tensors, prompts):
                metric.reset()
                metric.update(t, p)
                out.append(float(metric.compute()) / 100)
            return np.array(out)

        def theirs_batch():
            metric.reset()
            metric.update(tensors, prompts)
            return float(metric.compute()) / 100

        times = {"compinv ClipMetrics (batch 32)": [], "torchmetrics CLIPScore, per image": [],
                 "torchmetrics CLIPScore, one batch": []}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name, fn in zip(times, (ours, theirs_each, theirs_batch)):
                    start = time.perf_counter()
                    result = fn()
                    times[name].append(time.perf_counter() - start)
                    if name.startswith("compinv"):
                        cos = result
                    elif "per image" in name:
                        assert np.allclose(result, np.maximum(cos, 0), atol=1e-4)
    base = statistics.median(times["torchmetrics CLIPScore, per image"])
    rows = {name: {"median_s": statistics.median(t), "images_per_s": args.images / statistics.median(t),
                   "ratio_to_torchmetrics_per_image": statistics.median(t) / base}
            for name, t in times.items()}
    print(f"{'':38}{'median s':>10}{'images/s':>10}{'ratio':>8}")
    for name, r in rows.items():
        print(f"{name:38}{r['median_s']:10.3f}{r['images_per_s']:10.1f}{r['ratio_to_torchmetrics_per_image']:8.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"images": args.images, "repeats": args.repeats, "image_px": 512,
                                   "model": "CLIP ViT-B/32 shapes, random weights", "device": "cpu",
                                   "threads": torch.get_num_threads(), "results": rows,
                                   "versions": library_versions()}, indent=2))


if __name__ == "__main__":
    main()
