"""PixNet as a pure ``nn.Module``: frozen encoder pyramid -> decoder -> non-negative intensity per um^2."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ._decoder import Decoder, IntensityHead

#: ``precision`` values: float32 throughout, or bfloat16 autocast (convolutions and matrix products in bfloat16,
#: reductions, normalisation and the loss in float32)
PRECISIONS = ("32", "bf16")


def bf16_is_fast(device: str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 convolutions and matrix products natively (CPUs with AVX512-BF16 or
    AMX; CUDA GPUs from Ampere on); elsewhere bfloat16 is emulated and slower than float32."""
    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`bf16_is_fast` holds for ``device``, else ``"32"``."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of 'auto', {', '.join(map(repr, PRECISIONS))}")
    return precision


def autocast(precision: str, device_type: str):
    """The autocast context of ``precision`` on ``device_type`` (a no-op for ``"32"``)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


class Member(nn.Module):
    """One further decoder and intensity head of an ensemble (:class:`PixNetModule` with ``members`` > 1)."""

    def __init__(self, decoder: Decoder, head: IntensityHead) -> None:
        super().__init__()
        self.decoder, self.head = decoder, head


class PixNetModule(nn.Module):
    """Image (B, 3, H, W) in [0, 1] at the encoder's um/px -> intensity (B, n_outputs, H / s, W / s).

    With ``members`` > 1 the encoder feeds several decoders with their own intensity heads (``decoder`` and
    ``head`` are the first; ``members`` holds the others), trained apart on the same cached features, and the
    intensity is their mean: expected counts average, so every read-out of the map is the mean of the
    members' read-outs. The encoder, most of a prediction's cost at full size, runs once.
    """

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
        precision: str = "32",
        members: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"members={members!r} is not a positive integer")
        self.precision = resolve_precision(precision)
        self.encoder = encoder

        def decoder() -> Decoder:
            return Decoder(
                list(encoder.channels), list(encoder.reductions), width=width, out_stride=out_stride, block=block,
                heads=heads, window=window, standardize=standardize, smooth=smooth,
            )

        self.decoder = decoder()
        self.head = IntensityHead(width, n_outputs)
        # a single model keeps exactly the parameters (and state-dict keys) it has always had
        self.members = nn.ModuleList(Member(decoder(), IntensityHead(width, n_outputs)) for _ in range(members - 1))
        self.out_stride = out_stride

    @property
    def n_members(self) -> int:
        return 1 + len(self.members)

    def pairs(self) -> list[tuple[Decoder, IntensityHead]]:
        """``(decoder, head)`` of every member, the first one first."""
        return [(self.decoder, self.head)] + [(m.decoder, m.head) for m in self.members]

    def member(self, k: int) -> PixNetModule:
        """A view of member ``k`` as a single-member module: the same encoder, and member ``k``'s decoder and
        head (not copies: training the view trains the member)."""
        if k == 0 and not len(self.members):
            return self
        view = self.shallow_copy()
        view.decoder, view.head = self.pairs()[k]
        view.members = nn.ModuleList()
        return view

    def shallow_copy(self) -> PixNetModule:
        """A new module holding the same submodules (encoder, decoders, heads: nothing copied); assigning a
        submodule of the copy leaves this module as it is."""
        import copy

        view = copy.copy(self)
        view._modules = dict(self._modules)
        return view

    @property
    def alignment(self) -> int:
        """Tile origins and sizes, in encoder pixels, must be multiples of this."""
        return int(self.decoder.alignment)

    @property
    def used_levels(self) -> list[int]:
        return list(self.decoder.levels)

    def autocast(self, device_type: str):
        """The autocast context this module computes in (``precision``) on ``device_type``."""
        return autocast(self.precision, device_type)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's pyramid, float32 whatever the precision it was computed in."""
        with self.autocast(x.device.type):
            out = list(self.encoder(x))
        return [f if f is None else f.float() for f in out]

    def encode_compact(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's compact form of :meth:`encode` (see ``Encoder.compact``): what training caches."""
        with self.autocast(x.device.type):
            out = list(self.encoder.compact(x))
        return [f if f is None else f.float() for f in out]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Features as returned by :meth:`encode` (levels not in ``used_levels`` may be ``None``); float32, in
        the default (NCHW) layout."""
        return self._members_mean(features, lambda head, x: head(x)).contiguous()

    def decode_at(self, features: list[torch.Tensor], batch_index: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` at the output pixels ``pixel`` (flat, row-major) of images ``batch_index`` only:
        (P, n_outputs), float32. The decoders still run on the whole maps; the heads run on those pixels alone,
        which is what training needs where the spots cover part of each tile."""

        def at_pixels(head, x):
            # gathered from the (b, h * w, c) view, contiguous for a channels-last map (training's layout): the
            # gradient then comes back channels-last, with no copy into that layout in the decoder's backward
            return head.forward_pixels(x.permute(0, 2, 3, 1).flatten(1, 2)[batch_index, pixel])

        return self._members_mean(features, at_pixels)

    def _members_mean(self, features: list[torch.Tensor], apply) -> torch.Tensor:
        """The mean over members of ``apply(head, decoder(features))``, in the model's precision; float32.

        The decoders see the features channels-last, as training feeds them (``make_collate``), whatever layout
        they come in: oneDNN's convolutions run fastest in it and the layer norms take their fused path, so a
        prediction is the function training validated, to the bit, and decodes about 1.7x as fast as from the
        encoder's default layout (``benchmarks/results/layout.md``).
        """
        features = [f if f is None or f.dim() != 4 else f.contiguous(memory_format=torch.channels_last)
                    for f in features]
        device_type = next(f for f in features if f is not None).device.type
        out = None
        with self.autocast(device_type):
            for decoder, head in self.pairs():
                part = apply(head, decoder(features))
                out = part if out is None else out + part
        return out.float() / self.n_members if len(self.members) else out.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
