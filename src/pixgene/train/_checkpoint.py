"""Member checkpoints of ``pg.tl.fit(checkpoint_dir=...)``: a fit that stops resumes with the members it finished.

Each trained member is written as ``member_<k>.safetensors`` (its decoder and head, and any fine-tuned encoder
tensors) and ``member_<k>.json`` (its history and summary), under a fingerprint of everything member ``k``'s
training depends on: the slides' images, spots and counts, the genes, the fit's settings and seed, the encoder's
weights, member ``k``'s initial weights, the precision and the kind of device. A fit given the same directory
loads every member whose fingerprint matches instead of training it again, so the resumed model is the one an
uninterrupted fit makes, to the bit (the same model id). A member file with another fingerprint is never
overwritten: the fit stops before any work and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from .._core.raster import full_resolution
from .._core.validate import fail
from ..model import json_default, trained_state
from ._store import ResumableStore

logger = logging.getLogger(__name__)

#: rows of the full-resolution image hashed at a time
_ROWS = 1024


def _update_array(h, a: Any) -> None:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


def image_hash(image: Any):
    """A blake2b hash fed the shape and every pixel of the full-resolution image (in strips): made once per fit
    and copied into each digest that covers the image (:func:`slide_digest`)."""
    h = hashlib.blake2b(digest_size=16)
    data = full_resolution(image).data
    _update_array(h, np.asarray(data.shape))
    for y in range(0, int(data.shape[1]), _ROWS):
        strip = data[:, y : y + _ROWS]
        _update_array(h, strip.compute() if hasattr(strip, "compute") else strip)
    return h


def slide_digest(image_hashed: Any, centers: np.ndarray, footprint: np.ndarray, counts: np.ndarray | None,
                 um_per_px: float) -> str:
    """Hash of what training reads from one slide: its image (``image_hashed``, from :func:`image_hash`), the
    spots' centres and footprints (radii, or polygons: ``SpotSlide.footprint``), the counts (genes and library
    size; ``None``: not hashed, for what depends on the image and the spots alone) and the image's microns per
    pixel."""
    h = image_hashed.copy()
    for a in (centers, footprint, counts, np.float64(um_per_px)):
        if a is not None:
            _update_array(h, a)
    return h.hexdigest()


def state_digest(state: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in sorted(state.items()):
        h.update(k.encode())
        _update_array(h, v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy())
    return h.hexdigest()


def member_fingerprint(common: dict, member_state: dict, k: int) -> str:
    """Fingerprint of member ``k``: the fit's common record (settings, data and encoder digests) and the
    member's initial weights (``member_state``: :func:`~pixgene.tl._model.trained_state` of its view)."""
    return record_fingerprint({**common, "member": k, "initial_weights": state_digest(member_state)})


def record_fingerprint(record: dict) -> str:
    """sha256 (32 hex digits) of a JSON record of what a saved result depends on."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]


class MemberCheckpoints:
    """The member files in ``path`` for a fit whose members have the given fingerprints, in a
    :class:`~pixgene.train._store.ResumableStore` (a member of another fit stops the fit here, before any
    work)."""

    SUFFIX = ".safetensors"

    def __init__(self, path: str | os.PathLike, fingerprints: list[str]) -> None:
        self.store = ResumableStore(path, argument="checkpoint_dir")
        self.fingerprints = fingerprints
        self.records = [self.store.finished(f"member_{k}", self.SUFFIX, want, f"member {k} of another fit")
                        for k, want in enumerate(fingerprints)]

    def done(self, k: int) -> bool:
        return self.records[k] is not None

    def load(self, k: int, module, tuned_keys: list[str]) -> tuple[list[dict], dict]:
        """Put member ``k``'s saved tensors into ``module`` (its single-member view); its history and summary."""
        from safetensors.torch import load_file

        weights = self.store.payload(f"member_{k}", self.SUFFIX)
        state = load_file(str(weights))
        want = trained_state(module, tuned_keys)
        if set(state) != set(want) or any(state[n].shape != want[n].shape for n in want):
            fail(f"checkpoint_dir {str(self.store.path)!r}", f"{weights.name} does not fit member {k}'s "
                 "architecture", "Delete that member's files to train it again, or pass another directory")
        module.load_state_dict(state, strict=False)  # the frozen encoder's tensors are not in the file
        logger.info("member %d loaded from %s (trained before; not trained again)", k, weights)
        return self.records[k]["history"], self.records[k]["summary"]

    def save(self, k: int, module, tuned_keys: list[str], history: list[dict], summary: dict) -> None:
        """Write member ``k``: its weights, then the record that marks it complete."""
        from safetensors.torch import save_file

        state = {n: v.detach().cpu().contiguous() for n, v in trained_state(module, tuned_keys).items()}
        self.store.save(f"member_{k}", self.SUFFIX, self.fingerprints[k],
                        lambda tmp: save_file(state, str(tmp), metadata={"fingerprint": self.fingerprints[k]}),
                        {"member": k, "history": history, "summary": summary}, default=json_default)
        self.records[k] = {"history": history, "summary": summary}
        logger.info("member %d saved to %s", k, self.store.payload(f"member_{k}", self.SUFFIX))
