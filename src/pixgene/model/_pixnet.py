"""The user-facing PixNet model: genes and encoder recorded, saved as config.json + safetensors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .._core.keys import TOTAL_CHANNEL, UNS_KEY
from .._core.validate import fail
from .._core.version import __version__
from ._config import DecoderConfig, TrainConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2

#: the model ``pg.tl.fit`` made for each SpatialData, held only as long as that SpatialData lives
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember_model(sdata: Any, model: PixNet) -> None:
    """Let ``predict_dense(sdata)`` follow a fit without ``model=``, and record the model in ``sdata.attrs``."""
    _FITTED[sdata] = model
    record = dict(sdata.attrs.get(UNS_KEY, {}))
    record["model"] = {"model_id": model.model_id, "genes": list(model.genes),
                       "encoder": model.encoder_config.get("name")}
    sdata.attrs[UNS_KEY] = record


def last_model(sdata: Any) -> PixNet | None:
    """The model fitted on ``sdata`` in this session, else the saved one its ``attrs`` point to, else None."""
    model = _FITTED.get(sdata)
    if model is not None:
        return model
    record = (getattr(sdata, "attrs", None) or {}).get(UNS_KEY, {}).get("model", {})
    path = record.get("path")
    if path and Path(path, CONFIG_FILE).is_file():
        model = PixNet.load(path)
        if model.model_id == record.get("model_id"):
            logger.info("using the model saved at %s (recorded in sdata.attrs)", path)
            return model
    return None


class PixNet:
    """A fitted pixgene model: image -> intensity (expected counts per um^2) for each gene.

    Build with :func:`pixgene.tl.fit`; save with :meth:`save`; restore with :meth:`PixNet.load`.
    """

    def __init__(
        self,
        module: Any,
        *,
        genes: list[str],
        encoder_config: dict,
        encoder_weights: str | None,
        decoder_config: dict,
        history: list[dict] | None = None,
        training: dict | None = None,
        finetuned: list[str] | None = None,
    ) -> None:
        self.module = module.eval()
        #: state-dict keys of encoder tensors changed by fine-tuning: saved with the decoder and head
        self.finetuned = sorted(finetuned or [])
        self.genes = list(genes)
        self.encoder_config = dict(encoder_config)
        self.encoder_weights = encoder_weights
        self.decoder_config = dict(decoder_config)
        self.history = list(history or [])
        self.training = dict(training or {})

    # ---------------------------------------------------------------- properties
    @property
    def outputs(self) -> list[str]:
        return [*self.genes, TOTAL_CHANNEL]

    @property
    def encoder_um_per_px(self) -> float:
        return float(self.module.encoder.um_per_px)

    @property
    def out_stride(self) -> int:
        return int(self.module.out_stride)

    @property
    def out_um_per_px(self) -> float:
        return self.encoder_um_per_px * self.out_stride

    @property
    def alignment(self) -> int:
        """Tile origins and sizes (encoder pixels) must be multiples of this for identical results."""
        return self.module.alignment

    @property
    def settings(self) -> tuple[DecoderConfig, TrainConfig] | None:
        """The fit's :class:`~pixgene.tl.DecoderConfig` and :class:`~pixgene.tl.TrainConfig`, read back from the
        model's record (pass them to ``pg.tl.fit`` to train another model the same way); None for a model
        without that record."""
        decoder, params = self.training.get("decoder"), self.training.get("params")
        if decoder is None or params is None:
            return None
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        # the record holds the tile and context the fit resolved; the config holds what was asked for
        asked = {k: v for k, v in params.items() if k in fields}
        asked.update(params.get("requested", {}))
        return DecoderConfig(**decoder), TrainConfig(**asked)

    def _trained_state(self) -> dict:
        return trained_state(self.module, self.finetuned)

    @property
    def model_id(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self._trained_state().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"PixNet({len(self.genes)} genes, encoder={self.encoder_config.get('name')!r}, "
            f"decoder={self.decoder_config.get('block')!r}"
            + (f" x {self.module.n_members}" if self.module.n_members > 1 else "")
            + f", {self.out_um_per_px:g} um/px output, id={self.model_id})"
        )

    # ---------------------------------------------------------------- inference
    def predict_intensity(self, tiles: np.ndarray, tta: int = 1) -> np.ndarray:
        """(B, 3, H, W) or (3, H, W) float RGB in [0, 1] at the encoder's um/px -> intensity per um^2.

        Returns (B, n_outputs, H / s, W / s) (or without B) float32, outputs = genes + total. ``tta`` > 1: the
        mean of the maps of that many dihedral transforms of the tiles (1, 2, 4 or 8: the first of
        ``TTA_TRANSFORMS``), each turned back; H and W must then be multiples of :attr:`alignment`, so that a
        transformed tile's output pixels are the original's.
        """
        import torch

        from ..data import TTA_TRANSFORMS, dihedral, dihedral_inverse

        check_tta(tta)
        single = tiles.ndim == 3
        x = torch.from_numpy(np.ascontiguousarray(tiles[None] if single else tiles, dtype=np.float32))
        if tta > 1 and (x.shape[-1] % self.alignment or x.shape[-2] % self.alignment):
            raise ValueError(f"tiles of {x.shape[-2]} x {x.shape[-1]} px are not multiples of the model's "
                             f"alignment ({self.alignment} px), which test-time transforms need")
        device = next(self.module.head.parameters()).device
        x = x.to(device)
        out = None
        with torch.inference_mode():
            for d in TTA_TRANSFORMS[:tta]:
                y = dihedral_inverse(self.module(dihedral(x, d)).float(), d)
                out = y if out is None else out + y
        out = (out / tta if tta > 1 else out).cpu().numpy()
        return out[0] if single else out

    @property
    def slide_standardized(self) -> bool:
        """Whether the decoder standardises each slide's features with that slide's own statistics."""
        return self.decoder_config.get("standardize") == "slide"

    def with_feature_stats(self, means: dict, stds: dict) -> PixNet:
        """A copy that standardises features with these statistics (a slide's own, for ``predict_dense``).

        The encoder is shared, not copied; decoders and heads are copied, so this model is left as it is.
        """
        import copy

        module = self.module.shallow_copy()  # shares the encoder
        module.decoder = copy.deepcopy(self.module.decoder)
        module.head = copy.deepcopy(self.module.head)
        module.members = copy.deepcopy(self.module.members)
        for decoder, _ in module.pairs():
            decoder.set_feature_stats(means, stds)
        return PixNet(module, genes=self.genes, encoder_config=self.encoder_config,
                      encoder_weights=self.encoder_weights, decoder_config=self.decoder_config,
                      history=self.history, training=self.training, finetuned=self.finetuned)

    @property
    def n_members(self) -> int:
        """Decoders whose mean intensity the model predicts (``n_members`` of :func:`pixgene.tl.fit`)."""
        return int(self.module.n_members)

    def member(self, k: int) -> PixNet:
        """Member ``k`` of the ensemble as a model of its own: one decoder and head, this model's encoder.

        The weights are shared, not copied. Member 0 of a fit is, to the bit, the model the same ``fit`` makes
        with ``n_members=1`` (same model id). Predicting each member (``predict_dense(sdata, model.member(k),
        key_added=...)``) shows how far the decoders agree; the model's map is their mean. Its ``training``
        holds member ``k``'s summary and ``"member_of"`` (this model's id and ``k``), its history member
        ``k``'s epochs.
        """
        n = self.n_members
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < n:
            fail("member", f"{k!r} is not a member index of this {n}-member model", f"Pass 0 to {n - 1}")
        k = int(k)
        if n == 1:
            return self
        training = {key: v for key, v in self.training.items() if key != "members"}
        training.update(self.training.get("members", [{}] * n)[k])
        training["params"] = {**training.get("params", {}), "n_members": 1}
        training["member_of"] = {"model_id": self.model_id, "member": k}
        history = [{key: v for key, v in h.items() if key != "member"} for h in self.history if h.get("member") == k]
        return PixNet(self.module.member(k), genes=self.genes, encoder_config=self.encoder_config,
                      encoder_weights=self.encoder_weights, decoder_config={**self.decoder_config, "members": 1},
                      history=history, training=training, finetuned=self.finetuned)

    def to(self, device: str) -> PixNet:
        self.module.to(device)
        return self

    # ---------------------------------------------------------------- persistence
    def config(self) -> dict:
        return {
            "class": "PixNet",
            "format_version": FORMAT_VERSION,
            "pixgene_version": __version__,
            "genes": self.genes,
            "outputs": self.outputs,
            "encoder": self.encoder_config,
            "encoder_weights": self.encoder_weights,
            "decoder": self.decoder_config,
            "encoder_finetuned": self.finetuned,
            "model_id": self.model_id,
            "training": self.training,
            "history": self.history,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors``: decoder, head and any fine-tuned encoder tensors (the
        rest of the encoder is rebuilt from its recorded weights)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            fail(
                f"model directory {str(path)!r}",
                "exists and is not empty",
                "Pass overwrite=True to replace it, or choose another directory",
            )
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self._trained_state().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"model_id": self.model_id})
        (path / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2, default=json_default))
        for sdata, model in list(_FITTED.items()):
            if model is self:  # slides this model was fitted on now say where it lives
                record = dict(sdata.attrs.get(UNS_KEY, {}))
                record["model"] = {**record.get("model", {}), "path": str(path.resolve())}
                sdata.attrs[UNS_KEY] = record
        logger.info("saved %r to %s", self, path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, encoder_weights: str | None = None, device: str = "cpu") -> PixNet:
        """Validate the directory (class, version, genes, files), rebuild, load weights, and call ``eval()``.

        Never touches the network for pixgene's bundled encoder and never unpickles (safetensors only).
        """
        from safetensors.torch import load_file

        path = Path(path)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        for f in (config_file, weights_file):
            if not f.is_file():
                fail(f"model directory {str(path)!r}", f"{f.name} is missing", "Point to a directory written by save()")
        config = json.loads(config_file.read_text())
        if config.get("class") != "PixNet":
            fail(f"model {str(path)!r}", f"holds a {config.get('class')!r}, not a PixNet", "Load it with its own class")
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            fail(f"model {str(path)!r}",
                 f"config.json has model format version {version!r}; this pixgene reads version {FORMAT_VERSION}",
                 "Upgrade pixgene to load it" if newer else
                 "Fit the model again with this pixgene (models of format version 1 are no longer read)")
        genes = config.get("genes") or []
        if not genes or config.get("outputs") != [*genes, TOTAL_CHANNEL]:
            fail(f"model {str(path)!r}", "config.json has no consistent gene list", "Re-save the model")
        encoder_config = dict(config["encoder"])
        module = build_module(
            encoder_config,
            encoder_weights if encoder_weights is not None else config.get("encoder_weights"),
            n_outputs=len(genes) + 1,
            decoder_config=config["decoder"],
        )
        try:
            state = load_file(str(weights_file))
        except Exception as err:  # safetensors raises its own SafetensorError (or OSError) on a damaged file
            fail(f"model file {str(weights_file)!r}", f"is not a readable safetensors file ({err})",
                 "The file is damaged or incomplete: copy the model directory again, or save the model again")
        finetuned = list(config.get("encoder_finetuned") or [])
        expected = {k for k in module.state_dict() if not k.startswith("encoder.")} | set(finetuned)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            fail(
                f"model {str(path)!r}",
                f"weights do not match the architecture in config.json (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})",
                "Re-save the model with this pixgene version",
            )
        module.load_state_dict(state, strict=False)
        model = cls(
            module.to(device),
            genes=genes,
            encoder_config=encoder_config,
            encoder_weights=config.get("encoder_weights"),
            decoder_config=config["decoder"],
            history=config.get("history"),
            training=config.get("training"),
            finetuned=finetuned,
        )
        if model.model_id != config.get("model_id"):
            fail(f"model {str(path)!r}", "weights do not match the recorded model_id", "The files were altered; re-save")
        return model


def trained_state(module, finetuned: list[str]) -> dict:
    """The tensors of ``module`` that training made: everything but the encoder, and the encoder's ``finetuned``
    keys (what a saved model and a member checkpoint hold)."""
    keep = set(finetuned)
    return {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.") or k in keep}


def trainable_encoder_keys(module) -> list[str]:
    """State-dict keys (``encoder.``-prefixed) of every encoder tensor that training can change: trainable
    parameters and the buffers (BatchNorm statistics) of the layers that own them."""
    saved = set(module.state_dict())  # persistent tensors only
    keys = []
    for name, layer in module.encoder.named_modules():
        own = list(layer.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"encoder.{name}." if name else "encoder."
        keys += [prefix + n for n, _ in own]
        keys += [prefix + n for n, _ in layer.named_buffers(recurse=False) if prefix + n in saved]
    return sorted(keys)


def build_module(
    encoder_config: dict,
    encoder_weights: str | None,
    *,
    n_outputs: int,
    decoder_config: dict,
    encoder: Any = None,
):
    """PixNetModule with a frozen encoder (built from its config unless given) and a fresh decoder."""
    from ..nn import PixNetModule, build_encoder

    if encoder is None:
        encoder = build_encoder(**encoder_config, weights=encoder_weights)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return PixNetModule(encoder, n_outputs, **decoder_config)


def json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in config.json")


def check_tta(tta: Any) -> None:
    """Fail unless ``tta`` is a number of test-time transforms pixgene takes (1, 2, 4 or 8)."""
    from .._core.validate import fail
    from ..data import TTA_CHOICES

    if isinstance(tta, bool) or not isinstance(tta, int | np.integer) or tta not in TTA_CHOICES:
        fail("tta", f"{tta!r} is not a number of test-time transforms",
             "Pass tta=1 (none), 2 (the half turn), 4 (and the mirror images) or 8 (every dihedral "
             "transform)")
