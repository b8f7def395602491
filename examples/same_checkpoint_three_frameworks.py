"""One checkpoint, three frameworks: build a small hybrid ViT (BiT backbone + ViT) classifier in PyTorch,
save it, load the same folder in Keras 3 and Flax, and compare their logits on real photos.

    python examples/same_checkpoint_three_frameworks.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import torch
from sklearn.datasets import load_sample_image

from vit_core import ViTHybridConfig, ViTHybridImageProcessor
from vit_flax import FlaxViTHybridForImageClassification
from vit_tf import TFViTHybridForImageClassification
from vit_torch import ViTHybridForImageClassification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="keep the checkpoint here (default: a temporary folder)")
    args = parser.parse_args()

    backbone = dict(layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True,
                    depths=[1, 1, 1], hidden_sizes=[64, 128, 256], embedding_size=32, num_groups=8)
    config = ViTHybridConfig(backbone_config=backbone, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, image_size=96, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    torch.manual_seed(0)
    model = ViTHybridForImageClassification(config).eval()
    processor = ViTHybridImageProcessor(size={"shortest_edge": 96}, crop_size=96)
    pixels = processor([load_sample_image("china.jpg"), load_sample_image("flower.jpg")]).pixel_values  # (2, 3, 96, 96)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp) / "hybrid"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        with torch.no_grad():
            logits = {"torch": model(torch.from_numpy(pixels)).logits.numpy()}
        logits["tf"] = np.asarray(TFViTHybridForImageClassification.from_pretrained(folder)(pixels).logits)
        logits["flax"] = np.asarray(FlaxViTHybridForImageClassification.from_pretrained(folder)(pixels).logits)
    print(f"{config.num_patches} tokens from a {config.backbone_featmap_shape} feature map")
    for name, value in logits.items():
        print(f"{name:>5}: logits {np.round(value[0], 5).tolist()}  max |diff vs torch| "
              f"{float(np.abs(value - logits['torch']).max()):.1e}")


if __name__ == "__main__":
    main()
