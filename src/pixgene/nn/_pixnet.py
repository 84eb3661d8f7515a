"""PixNet as a pure ``nn.Module``: frozen encoder pyramid -> decoder -> non-negative intensity per um^2."""

from __future__ import annotations

import torch
from torch import nn

from ._decoder import Decoder, IntensityHead


class PixNetModule(nn.Module):
    """Image (B, 3, H, W) in [0, 1] at the encoder's um/px -> intensity (B, n_outputs, H / s, W / s)."""

    def __init__(
        self,
        encoder: nn.Module,
        n_outputs: int,
        *,
        width: int = 64,
        out_stride: int = 4,
        block: str = "fusion",
        heads: int = 4,
        window: int = 8,
        standardize: bool = False,
        smooth: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = Decoder(
            list(encoder.channels), list(encoder.reductions), width=width, out_stride=out_stride, block=block,
            heads=heads, window=window, standardize=standardize, smooth=smooth,
        )
        self.head = IntensityHead(width, n_outputs)
        self.out_stride = out_stride

    @property
    def alignment(self) -> int:
        """Tile origins and sizes, in encoder pixels, must be multiples of this."""
        return int(self.decoder.alignment)

    @property
    def used_levels(self) -> list[int]:
        return list(self.decoder.levels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.encoder(x))

    def encode_compact(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's compact form of :meth:`encode` (see ``Encoder.compact``): what training caches."""
        return list(self.encoder.compact(x))

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Features as returned by :meth:`encode` (levels not in ``used_levels`` may be ``None``)."""
        return self.head(self.decoder(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
