"""Neural network parts: encoder registry, decoders, the PixNet module and its losses (imports torch)."""

from .._core.torch_compat import ensure_torchvision

ensure_torchvision()

from ._decoder import ConvBlock, Decoder, FusionBlock, IntensityHead  # noqa: E402
from ._encoders import Encoder, build_encoder, list_encoders  # noqa: E402
from ._pixnet import PixNetModule  # noqa: E402

__all__ = [
    "ConvBlock", "Decoder", "Encoder", "FusionBlock", "IntensityHead", "PixNetModule", "build_encoder",
    "list_encoders",
]
