"""``pg.tl.reconstruct``: expression over a whole section predicted from its histology, trained on the part of it
whose spots were measured (or are kept as measured).

PixNet is fitted on the measured spots only (their counts; the image of the whole section is read for each
training tile's surroundings and the slide's feature statistics), the whole section's dense map is predicted,
and the map is read out over every spot of the shapes element, measured or not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._core.docs import doc_params
from .._core.keys import IMAGE_KEY, SPOTS_KEY, TABLE_KEY, UNS_KEY
from .._core.validate import check_not_exists, check_positive, fail, require_element

logger = logging.getLogger(__name__)

#: ``obs`` column of the reconstructed table: True where the spot's counts trained the model
MEASURED_OBS = "pixgene_measured"


def reconstructed_key(shapes_key: str) -> str:
    return f"{shapes_key}_reconstructed"


def _check_fit_kwargs(fit_kwargs: dict) -> dict:
    """The options reconstruct passes on to its fit, checked as ``pg.tl.fit`` checks them (configs filled in)."""
    from ._fit import FIT_OPTIONS, check_fit_options

    unknown = sorted(set(fit_kwargs) - set(FIT_OPTIONS))
    if unknown:
        fail("reconstruct", f"got arguments it does not pass on to its fit: {', '.join(unknown)}",
             f"Pass only {', '.join(FIT_OPTIONS)} (reconstruct sets the slides, keys, spots, genes, seed and "
             "progress of its fit itself)")
    checked = {"encoder_um_per_px": None, "n_members": None, "max_epochs": None, "decoder": None,
               "training": None, "precision": "auto"}
    checked.update({k: v for k, v in fit_kwargs.items() if k in checked})
    decoder, training = check_fit_options(**checked)
    return {**fit_kwargs, "decoder": decoder, "training": training}


def _read_out_everywhere(sdata: Any, model: Any, *, image_key: str, shapes_key: str, image_um_per_px: float,
                         um_per_px: float, uncertainty: bool, interval: Any, interval_kind: str, progress: bool):
    """``model``'s dense map of the whole section, predicted in a working object (never in ``sdata``), read out
    over every shape of ``shapes_key``, in the shapes' order (with the members' spread and count intervals when
    asked)."""
    from ._aggregate import aggregate
    from ._denoise import _subset
    from ._predict import predict_dense

    n = len(sdata.shapes[shapes_key])
    work = _subset(sdata, image_key, shapes_key, np.arange(n))
    map_key = f"{image_key}_reconstructed"
    predict_dense(work, model, image_key=image_key, um_per_px=um_per_px, image_um_per_px=image_um_per_px,
                  key_added=map_key, uncertainty=uncertainty, progress=progress)
    return aggregate(work, shapes=shapes_key, dense_key=map_key, image_key=image_key, uncertainty=uncertainty,
                     interval=interval, interval_kind=interval_kind, inplace=False, progress=False)


def _check_uncertainty(uncertainty: Any, interval: Any, interval_kind: str, n_members: Any) -> None:
    """reconstruct's uncertainty options, checked before its fit (the read-out's own checks come after it)."""
    from ._aggregate import INTERVAL_KINDS, _interval_levels

    if not isinstance(uncertainty, bool | np.bool_):
        fail("uncertainty", f"{uncertainty!r} is not True or False", "Pass uncertainty=True or False")
    _interval_levels(interval)
    if interval_kind not in INTERVAL_KINDS:
        fail("interval_kind", f"{interval_kind!r} is not one of {INTERVAL_KINDS}", "Pass interval_kind='nb' or 'mixture'")
    needs_members = uncertainty or (interval is not None and interval_kind == "mixture")
    if needs_members and n_members is not None and int(n_members) < 2:
        fail("uncertainty", "needs a model of several members, and n_members=1 fits one decoder",
             "Leave n_members at its default (5) or pass n_members >= 2")
    if interval is not None and interval_kind == "mixture" and not uncertainty:
        fail("interval_kind", "'mixture' needs the members' maps", "Pass uncertainty=True as well")


@doc_params
def reconstruct(
    sdata: Any,
    measured: Any,
    *,
    genes: list[str] | None = None,
    train_with: Any = None,
    image_key: str = IMAGE_KEY,
    shapes_key: str = SPOTS_KEY,
    table_key: str = TABLE_KEY,
    image_um_per_px: float | None = None,
    um_per_px: float = 4.0,
    key_added: str | None = None,
    overwrite: bool = False,
    uncertainty: bool = False,
    interval: float | Sequence[float] | None = None,
    interval_kind: str = "nb",
    random_state: int = 0,
    progress: bool = True,
    **fit_kwargs: Any,
):
    """Predict every spot of a section from its histology with a model trained on the measured part only.

    PixNet is fitted on the spots ``measured`` selects (and on every spot of ``train_with``), exactly as
    ``pg.tl.fit(sdata, spots=measured)`` fits it; the whole section's dense map is predicted at ``um_per_px``
    and read out over every spot of ``shapes_key``, measured or not. For a section measured in part (a
    capture area smaller than the tissue, a damaged region, a region kept aside), the unmeasured spots get the
    expression the image predicts for them, learned from the measured part.

    The fit goes through pixgene's training engine, not :func:`pixgene.tl.fit`, so the model is not
    remembered for ``sdata``: a model that saw part of the section would otherwise replace the one the user
    fitted on it and be taken up silently by a later ``pg.tl.predict_dense(sdata)``. The dense map is made in
    a working object and not stored either. To keep both, fit with ``model = pg.tl.fit(sdata, spots=measured,
    genes=..., random_state=...)`` (the same model, to the bit: its id is ``uns["pixgene"]["model_id"]`` of the
    result), then ``pg.tl.predict_dense`` and ``pg.tl.aggregate``.

    Scoring: where the spots not kept as measured do have counts (a region held out on purpose), score their
    rows against them, the measured ones left out (they trained the model: an in-sample score)::

        rec = pg.tl.reconstruct(sdata, measured=mask, genes=genes)
        sdata.tables["held_out"] = rec[~rec.obs["pixgene_measured"]].copy()
        pg.tl.evaluate(sdata, predicted="held_out", measured="table")   # PCC@F/S/M of log-normalised values

    Choose the genes on the measured spots only (the default does) so that the held-out counts take no part.

    What it cannot do: it predicts from the image alone. Expression that the histology does not show (or shows
    alike for different states) is predicted as the measured part's average for that appearance; tissue types
    absent from the measured part are extrapolated, and accuracy usually falls with the distance from the
    measured region. It does not interpolate the neighbouring measured counts into the unmeasured spots (a
    smooth gradient across the boundary is recovered only as far as the image shows it), the measured spots'
    own values are the model's fit to them, not their counts, and the predictions sit on the depth of the
    training slides (their capture efficiencies' geometric mean), not of a sequencing run that never happened.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image, the spots (circles or polygons) and their raw-count table, as for
        :func:`pixgene.tl.fit`; spots without counts in the table are predicted too.
    measured
        The spots whose counts train the model, in any form ``pg.tl.fit(spots=...)`` takes: a boolean mask over
        the rows of the shapes element, a list of ids from its index, or a region (the name of a shapes element
        of polygons, or a shapely polygon in the spots' coordinates) holding their centres.
    genes
        Genes to model; default: those marked by :func:`pixgene.pp.select_genes`, else its default choice on
        the measured spots (and ``train_with``'s), marked in the table.
    train_with
        Further slides (a SpatialData or a list) whose spots all train the model too, e.g. other sections of
        the same tissue; their keys are ``image_key``, ``shapes_key`` and ``table_key`` too.
    {spot_keys}
    image_um_per_px
        Microns per pixel of ``sdata``'s image; default: recorded by the reader or derived from the spots.
    um_per_px
        Output pixel size of the dense map that is read out (microns).
    key_added
        Name of the new table; default ``f"{shapes_key}_reconstructed"``.
    {overwrite}
    uncertainty
        Also predict the members' own maps and read out their spread, ``layers["pixgene_sd"]``, as
        ``pg.tl.predict_dense(uncertainty=True)`` and :func:`pixgene.tl.aggregate` do (needs ``n_members >= 2``;
        the default fits 5).
    interval, interval_kind
        Count-level predictive intervals of each spot, as :func:`pixgene.tl.aggregate` makes them (``0.9``
        adds ``layers["pixgene_q05"]`` and ``layers["pixgene_q95"]``), on the training slides' depth;
        ``"mixture"`` needs ``uncertainty=True``.
    {random_state}
    {progress}
    **fit_kwargs
        Options of the fit, as for :func:`pixgene.tl.fit`: ``encoder``, ``encoder_weights``,
        ``encoder_um_per_px``, ``n_members``, ``max_epochs``, ``decoder``, ``training``, ``precision``.

    Returns
    -------
    AnnData (also stored as ``sdata.tables[key_added]``), one row per spot of ``shapes_key`` in its order,
    linked to it like :func:`pixgene.tl.aggregate`'s tables (``X`` expected counts of the genes,
    ``obs["pixgene_total_counts"]`` the predicted library size), with ``obs["pixgene_measured"]``: True where
    the spot's counts trained the model, False for every other spot (unselected, or without counts);
    ``uns["pixgene"]``: the parameters, ``model_id``, ``n_measured``, ``n_unmeasured``, ``measured`` (which
    spots trained: the record ``model.training["slides"][0]["spots"]`` holds), ``n_train_spots_other_slides``
    and the dense map's record (and ``interval``, as ``aggregate`` records it). With ``uncertainty`` or
    ``interval``, the layers :func:`pixgene.tl.aggregate` adds for them.
    """
    import pandas as pd

    from ..data import prepare_spot_slide, select_slide_spots
    from ..train import FitOptions, fit_model
    from ._fit import as_list, resolve_genes

    # ---- every check before any work
    check_positive(um_per_px, "um_per_px", "reconstruct")
    fit_options = _check_fit_kwargs(fit_kwargs)
    _check_uncertainty(uncertainty, interval, interval_kind, fit_kwargs.get("n_members"))
    key = key_added or reconstructed_key(shapes_key)
    check_not_exists(sdata, key, overwrite)
    slide = prepare_spot_slide(sdata, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
                               um_per_px=image_um_per_px)
    train_slide = select_slide_spots(slide, measured, argument="measured")
    others = [] if train_with is None else as_list(train_with)
    if any(o is sdata for o in others):
        fail("train_with", "holds the section being reconstructed", "Pass only other slides in train_with")
    other_slides = [prepare_spot_slide(o, image_key=image_key, shapes_key=shapes_key, table_key=table_key)
                    for o in others]
    genes = resolve_genes(genes, [train_slide, *other_slides])
    shapes = require_element(sdata, shapes_key, "shapes")
    n_measured = len(train_slide.centers)
    if n_measured == len(shapes):
        logger.warning("measured selects every spot of %r: nothing is left to reconstruct (the read-out is the "
                       "in-sample fit)", shapes_key)

    # ---- the fit on the measured part, the whole section predicted and read out
    logger.info("reconstructing %d spots of %r from a model fitted on %d measured spot(s)%s",
                len(shapes) - n_measured, shapes_key, n_measured,
                f" and {len(others)} further slide(s)" if others else "")
    model = fit_model([train_slide, *other_slides], genes, FitOptions(
        image_key=image_key, shapes_key=shapes_key, table_key=table_key, random_state=random_state,
        progress=progress, **fit_options))
    table = _read_out_everywhere(sdata, model, image_key=image_key, shapes_key=shapes_key,
                                 image_um_per_px=slide.um_per_px, um_per_px=um_per_px, uncertainty=bool(uncertainty),
                                 interval=interval, interval_kind=interval_kind, progress=progress)
    flag = np.zeros(len(shapes), dtype=bool)
    flag[train_slide.positions] = True
    if not table.obs_names.equals(pd.Index([str(i) for i in shapes.index], dtype=str)):
        fail(f"shapes {shapes_key!r}", "changed while reconstruct ran", "Run reconstruct again")
    table.obs[MEASURED_OBS] = flag
    params = {
        "genes": list(genes), "image_key": image_key, "shapes_key": shapes_key, "table_key": table_key,
        "image_um_per_px": slide.um_per_px, "um_per_px": float(um_per_px), "key_added": key,
        "random_state": int(random_state), "train_with": len(others), "uncertainty": bool(uncertainty),
        "interval": interval if interval is None else np.atleast_1d(interval).astype(float).tolist(),
        "interval_kind": interval_kind,
        "fit_kwargs": json.loads(json.dumps(fit_kwargs, default=str)),
    }
    table.uns[UNS_KEY] = {
        "params": params, "model_id": model.model_id, "n_measured": int(n_measured),
        "n_unmeasured": int(len(shapes) - n_measured), "measured": train_slide.selection,
        "n_train_spots_other_slides": int(sum(len(s.centers) for s in other_slides)),
        "dense": table.uns[UNS_KEY]["dense"],
        **({"interval": table.uns[UNS_KEY]["interval"]} if "interval" in table.uns[UNS_KEY] else {}),
    }
    if overwrite and key in sdata.tables:
        del sdata.tables[key]
    sdata.tables[key] = table
    if sdata.is_backed():
        sdata.write_element(key, overwrite=overwrite)
    logger.info("reconstructed %d spots into table %r", len(shapes) - n_measured, key)
    return table
