"""What is kept of an image when the image itself is not.

- `perceptual_hash`: imagehash's pHash (64 bits, 16 hex digits): the low frequencies of the
  DCT of a 32x32 grey copy, so re-encoding and resizing move it by a few bits only. The
  inference log keeps it per request; the data gate compares test and training images by it.
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


def perceptual_hash(image: Image.Image) -> str:
    """pHash as 16 hex digits."""
    import imagehash
    return str(imagehash.phash(image.convert("RGB")))


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
