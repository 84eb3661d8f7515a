"""The model layer: :class:`PixNet` (save / load / members), building its torch module, and feature
standardisation. Above :mod:`pixgene.nn`; below :mod:`pixgene.train` and :mod:`pixgene.infer`."""

from ._config import DecoderConfig, TrainConfig
from ._nb import nb_dispersion
from ._pixnet import (
    PixNet,
    build_module,
    check_tta,
    json_default,
    last_model,
    remember_model,
    trainable_encoder_keys,
    trained_state,
)
from ._standardize import feature_stats, pool_stats, slide_feature_stats, standardize_cache

__all__ = [
    "nb_dispersion",
    "build_module", "check_tta", "DecoderConfig", "feature_stats", "json_default", "last_model", "PixNet",
    "pool_stats", "remember_model", "slide_feature_stats", "standardize_cache", "trainable_encoder_keys",
    "TrainConfig", "trained_state",
]
