"""Encoded training tiles shared between fits: ``pg.tl.fit(feature_cache=...)``.

Encoding the training tiles is a large share of a fit on a CPU (on her2st, three sections, about a third of it)
and depends only on the images, the spots, the encoder and the tiling and augmentation settings, not on the
decoder, the loss or the optimiser. A fit given a feature-cache directory writes its encoded tiles there as
``features_<fingerprint>.safetensors``; a later fit whose encoding has the same fingerprint loads them instead
of encoding again, so fits that differ only in the decoder, the loss terms, the members or the learning
settings encode once. The fingerprint covers everything the encoded features depend on: every pixel of each
slide's image, the spots' centres and radii, the encoder's architecture, weights and microns per pixel, the
precision and kind of device, the tile, margin, context, views, stain and scale jitter, the decoder levels
read and the state of the random generator that draws the views. Loaded features are the features an
encoding would give, to the bit, so the fitted model is the same (the same model id). Files are written
atomically and never overwritten; a file of another fingerprint is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .._core.validate import fail
from ._store import ResumableStore

logger = logging.getLogger(__name__)


class FeatureCache:
    """The encoded training features of one fingerprint (:func:`~pixgene.train._checkpoint.record_fingerprint`
    of what they depend on) in a :class:`~pixgene.train._store.ResumableStore`; features of other fingerprints
    in the same directory are other fits' and are left alone."""

    SUFFIX = ".safetensors"

    def __init__(self, path: str | os.PathLike, fingerprint: str) -> None:
        self.store = ResumableStore(path, argument="feature_cache")
        self.fingerprint = fingerprint
        self.name = f"features_{fingerprint}"
        self.file = self.store.payload(self.name, self.SUFFIX)

    def load(self, n_tiles: int, n_views: int, levels: list[int]) -> list[Any] | None:
        """The cached features (one float16 tensor per level in ``levels``), or None when there are none."""
        if self.store.finished(self.name, self.SUFFIX, self.fingerprint, "encoded tiles of another fit") is None:
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(self.file))
        except (OSError, SafetensorError) as err:
            fail(f"feature_cache {str(self.store.path)!r}", f"{self.file.name} is not readable ({err})",
                 "Delete that file to encode the tiles again")
        keys = [f"level_{i}" for i in levels]
        if sorted(state) != sorted(keys) or any(state[k].shape[:2] != (n_tiles, n_views) for k in keys):
            fail(f"feature_cache {str(self.store.path)!r}", f"{self.file.name} does not hold {n_tiles} tiles x "
                 f"{n_views} views of levels {levels}", "Delete that file to encode the tiles again")
        logger.info("training tiles' features loaded from %s (not encoded again)", self.file)
        return [state[k] for k in keys]

    def save(self, features: list[Any], levels: list[int]) -> None:
        """Write the features (an existing piece of this fingerprint is kept as it is)."""
        from safetensors.torch import save_file

        if self.store.record(self.name, self.SUFFIX) is not None:
            return
        tensors = {f"level_{i}": f.contiguous() for i, f in zip(levels, features, strict=True)}
        self.store.save(self.name, self.SUFFIX, self.fingerprint,
                        lambda tmp: save_file(tensors, str(tmp), metadata={"fingerprint": self.fingerprint}),
                        {"levels": list(levels)})
        logger.info("training tiles' features saved to %s", self.file)
