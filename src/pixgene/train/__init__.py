"""The training layer: encoding training tiles into a cache, the Lightning plan, the member loop and the
resumable stores (member checkpoints, feature cache). Imports torch and Lightning."""

from ._checkpoint import image_hash, record_fingerprint, slide_digest
from ._fit import FitOptions, counts_with_library, fit_model, working_um_per_px
from ._store import ResumableStore, require_directory

__all__ = [
    "ResumableStore",
    "counts_with_library", "fit_model", "FitOptions", "image_hash", "record_fingerprint",
    "require_directory", "slide_digest",
    "working_um_per_px",
]
