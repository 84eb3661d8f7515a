"""Neural network parts: encoder registry, decoders, the PixNet module and its losses (imports torch).

Encoders are split by role, as timm splits its models: ``_registry`` (names -> :class:`EncoderEntry`),
``_encoder`` (the :class:`Encoder` modules), ``_weights`` (bundled, hub and local weights, strict loading),
``_build`` (:func:`build_encoder`) and ``_vit_pyramid`` (a plain ViT's tokens -> strides 4 to 32).
"""

from .._core.torch_compat import ensure_torchvision

ensure_torchvision()

from ._build import build_encoder, check_encoder_weights  # noqa: E402
from ._decoder import (  # noqa: E402
    ChannelLayerNorm,
    ConvBlock,
    Decoder,
    FusionBlock,
    IntensityHead,
    WindowAttention,
    inverse_std,
)
from ._encoder import CNNEncoder, Encoder, ViTEncoder, encoder_flops_per_pixel  # noqa: E402
from ._losses import log_normalize, negative_binomial_nll, pearson_loss, poisson_nll  # noqa: E402
from ._pixnet import PixNetModule, resolve_precision  # noqa: E402
from ._registry import IMAGENET_MEAN, IMAGENET_STD, EncoderEntry, encoder_entry, list_encoders  # noqa: E402
from ._weights import StateFit  # noqa: E402

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ChannelLayerNorm", "CNNEncoder", "ConvBlock", "Decoder", "Encoder", "EncoderEntry",
    "FusionBlock", "IntensityHead", "PixNetModule", "StateFit", "ViTEncoder", "build_encoder",
    "check_encoder_weights", "encoder_entry", "encoder_flops_per_pixel", "inverse_std", "list_encoders",
    "log_normalize", "negative_binomial_nll", "pearson_loss", "poisson_nll", "resolve_precision", "WindowAttention",
]
