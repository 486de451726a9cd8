"""The published settings evaluation defaults to, torch-free so that the CLI builds instantly.

Metric models as the paper and CustomConcept101 use them, the official detector threshold, the
80 COCO classes of the composition prompts and the protocol's four variants.
"""

from __future__ import annotations

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # the paper's and CustomConcept101's backbone
DEFAULT_DINO = "facebook/dino-vits16"  # CustomConcept101's DINO
DEFAULT_DETECTOR = "facebook/detr-resnet-50"  # the official code's detector
DEFAULT_OPEN_VOCABULARY_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_THRESHOLD = 0.8  # the official code's DETR score threshold
OPEN_VOCABULARY_THRESHOLD = 0.1  # OWL-ViT's usual threshold (its scores are sigmoids, not softmax)

METRIC_SETS = ("clip", "dino", "detector", "toy")
DEFAULT_METRICS = ("clip", "dino", "detector")

VARIANTS = ("baseline", "semantic", "spatial", "both")
SEMANTIC_VARIANTS = frozenset({"semantic", "both"})
GUIDED_VARIANTS = frozenset({"spatial", "both"})

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
IMAGE_METRICS = frozenset({"clip_i", "dino", "toy_image", "toy_colours"})  # need references
