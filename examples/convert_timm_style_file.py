"""Convert a timm-style ViT state dict (here made from random weights, as a stand-in for a downloaded
``vit_*.safetensors``) to the canonical checkpoint, then load that single file directly in PyTorch.

    python examples/convert_timm_style_file.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import torch
from safetensors.numpy import save_file

from conversion import convert_to, read_source
from vit_torch import ViTForImageClassification


def timm_state(depth: int = 2, width: int = 64, mlp: int = 128, patch: int = 8, image: int = 32,
               classes: int = 4) -> dict[str, np.ndarray]:
    """timm's ``VisionTransformer`` names and layouts: fused qkv, ``pos_embed`` with the class token row."""
    rng = np.random.default_rng(0)
    tokens = (image // patch) ** 2 + 1
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, tokens, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,), "head.weight": (classes, width), "head.bias": (classes,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (width,), b + "norm1.bias": (width,), b + "norm2.weight": (width,),
                   b + "norm2.bias": (width,), b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                   b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                   b + "mlp.fc1.weight": (mlp, width), b + "mlp.fc1.bias": (mlp,),
                   b + "mlp.fc2.weight": (width, mlp), b + "mlp.fc2.bias": (width,)}
    return {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "vit_tiny_patch8_32.safetensors"
        save_file(timm_state(), str(source))
        fmt, converted = read_source(source, num_heads=4)
        print(f"read {source.name} as {fmt}: {converted.summary()}")
        convert_to(converted, Path(tmp) / "canonical")
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32))
        with torch.no_grad():
            from_folder = ViTForImageClassification.from_pretrained(Path(tmp) / "canonical")(x).logits
            from_file = ViTForImageClassification.from_pretrained(source, num_heads=4)(x).logits
        print(f"canonical folder: {sorted(p.name for p in (Path(tmp) / 'canonical').iterdir())}")
        print(f"logits from the folder and from the timm file directly agree: "
              f"max |diff| {float((from_folder - from_file).abs().max()):.1e}")


if __name__ == "__main__":
    main()
