"""What is kept of an image when the image itself is not.

- `perceptual_hash`: imagehash's pHash (64 bits, 16 hex digits): the low frequencies of the
  DCT of a 32x32 grey copy, so re-encoding and resizing move it by a few bits only. The
  inference log keeps it per request; the data gate compares test and training images by it.
  The grey copy is made as PIL makes thumbnails: a box reduction by a whole factor first
  (`reducing_gap`), then Lanczos. That is 4x cheaper than Lanczos from full size on an
  800x800 image (the log hashes every served image) and moves a hash by 0-2 bits;
  `PHASH_VERSION` names this variant, so a cache never mixes the two.
- `image_signature`: the frozen vision encoder's patch tokens, mean-pooled, then projected
  to `SIGNATURE_DIMS` numbers by a fixed random (seeded) Gaussian matrix. The encoder is
  frozen in both stages, so the served model and its training data share this space; a
  fixed projection keeps the log small and the same across versions of one encoder.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SIGNATURE_DIMS = 16
SIGNATURE_SEED = 20240101  # fixed: a signature must mean the same on every day and replica
HASH_BITS = 64
PHASH_VERSION = 2  # 1: imagehash.phash as is (Lanczos from full size); 2: reducing_gap first
PHASH_REDUCING_GAP = 3.0  # reduce to at least 3x the 32x32 target, then Lanczos (PIL's thumbnail uses 2)


def perceptual_hash(image: Image.Image) -> str:
    """pHash as 16 hex digits (version `PHASH_VERSION`)."""
    import imagehash
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # palette, alpha and 16-bit images, as version 1 read them
    small = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=PHASH_REDUCING_GAP)
    return str(imagehash.phash(small))  # already 32x32 grey: imagehash resizes nothing


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hashes of `perceptual_hash`."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def projection(width: int, dims: int = SIGNATURE_DIMS) -> torch.Tensor:
    """The (width, dims) matrix of the signature, scaled so projections keep the input's norm."""
    gen = torch.Generator().manual_seed(SIGNATURE_SEED + width)
    return torch.randn(width, dims, generator=gen) / dims ** 0.5


@torch.no_grad()
def signature_of_tokens(vision_tokens: torch.Tensor) -> np.ndarray:
    """(B, N, D) frozen-encoder tokens -> (B, SIGNATURE_DIMS) float32 signatures."""
    pooled = vision_tokens.float().mean(dim=1).cpu()
    return (pooled @ projection(pooled.shape[-1])).numpy().astype(np.float32)


@torch.no_grad()
def image_signature(model, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
    """Signatures of `images` under `model`'s frozen vision encoder (a SkyEyeGPT)."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = model.preprocess(images[i:i + batch_size]).to(model.device, model.alignment_layer.proj.weight.dtype)
        out.append(signature_of_tokens(model.vision(pixels)))
    return np.concatenate(out) if out else np.zeros((0, SIGNATURE_DIMS), np.float32)
