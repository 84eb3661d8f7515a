"""Former home of the encoders, kept while imports move to ``pixgene.nn``: re-exports only.

The encoder code is split by role: ``_registry`` (entries), ``_encoder`` (modules), ``_weights`` (loading),
``_build`` (:func:`build_encoder`). Import from :mod:`pixgene.nn` instead; this module will be removed.
"""

from ._build import build_encoder, check_encoder_weights
from ._encoder import CNNEncoder, Encoder, ViTEncoder, encoder_flops_per_pixel
from ._registry import IMAGENET_MEAN, IMAGENET_STD, EncoderEntry, encoder_entry, list_encoders

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "CNNEncoder", "Encoder", "EncoderEntry", "ViTEncoder", "build_encoder",
    "check_encoder_weights", "encoder_entry", "encoder_flops_per_pixel", "list_encoders",
]
