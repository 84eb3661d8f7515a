"""Augmentations: the eight dihedral transforms of a square tile and H&E stain jitter."""

from __future__ import annotations

import numpy as np

#: the order in which test-time augmentation adds dihedral transforms: the half turn, then the two mirror
#: images (these four keep a tile's height and width), then the quarter turns and the transposes
TTA_TRANSFORMS = (0, 2, 4, 6, 1, 3, 5, 7)
#: the numbers of transforms test-time augmentation takes (the first n of ``TTA_TRANSFORMS``: groups)
TTA_CHOICES = (1, 2, 4, 8)


def dihedral(x, d: int):
    """Apply dihedral transform ``d`` (0-7: optional transpose-flip then k quarter turns) to (..., H, W)."""
    import torch

    if d >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, d % 4, dims=(-2, -1))


def dihedral_inverse(x, d: int):
    import torch

    x = torch.rot90(x, -(d % 4), dims=(-2, -1))
    if d >= 4:
        x = torch.flip(x, dims=(-1,))
    return x


def stain_jitter(tile: np.ndarray, rng: np.random.Generator, strength: float = 0.05) -> np.ndarray:
    """Perturb haematoxylin, eosin and residual optical densities (colour deconvolution space).

    ``tile`` is (3, H, W) float in [0, 1]; each stain's density is scaled by 1 + N(0, strength) and shifted by
    N(0, strength / 2), which mimics lab-to-lab staining differences without changing morphology.
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(np.moveaxis(np.clip(tile, 1e-4, 1.0), 0, -1))
    alpha = 1.0 + rng.normal(0.0, strength, size=3)
    beta = rng.normal(0.0, strength / 2.0, size=3) * np.abs(hed).mean(axis=(0, 1))
    rgb = hed2rgb(hed * alpha + beta)
    return np.moveaxis(np.clip(rgb, 0.0, 1.0), -1, 0).astype(np.float32)
