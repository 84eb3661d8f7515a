"""Coordinates: every computation runs in the H&E image's pixel space; transformations are carried."""

from __future__ import annotations

from typing import Any

import numpy as np

from .validate import fail


def element_of(sdata: Any, key: str) -> Any:
    for kind in ("images", "labels", "shapes", "points"):
        container = getattr(sdata, kind)
        if key in container:
            return container[key]
    fail(f"element {key!r}", "not found in the SpatialData object", "Pass the name of an existing element.")


def affine_between(sdata: Any, source_key: str, target_key: str) -> np.ndarray:
    """3x3 matrix taking intrinsic (x, y) of ``source_key`` to intrinsic (x, y) of ``target_key``.

    The two elements must share a coordinate system (directly or through intermediate ones).
    """
    from spatialdata.transformations import get_transformation_between_coordinate_systems

    source, target = element_of(sdata, source_key), element_of(sdata, target_key)
    shared = sorted(set(transformations_of(source)) & set(transformations_of(target)))
    if len(shared) > 1:
        # spatialdata refuses to pick one of several equally short paths (readers such as spatialdata-io give
        # every element several coordinate systems); each must give the same map, so compute all and compare
        matrices = [
            get_transformation_between_coordinate_systems(
                sdata, source, target, intermediate_coordinate_systems=cs
            ).to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
            for cs in shared
        ]
        for cs, m in zip(shared[1:], matrices[1:], strict=True):
            if not np.allclose(m, matrices[0], rtol=1e-6, atol=1e-6):
                fail(
                    f"elements {source_key!r} and {target_key!r}",
                    f"their transformations disagree: through {shared[0]!r} and {cs!r} they map differently",
                    "Give both elements consistent transformations "
                    "(spatialdata.transformations.set_transformation)",
                )
        return np.asarray(matrices[0], dtype=float)
    try:
        t = get_transformation_between_coordinate_systems(sdata, source, target)
    except Exception as err:  # spatialdata raises RuntimeError/KeyError for disconnected graphs
        fail(
            f"elements {source_key!r} and {target_key!r}",
            f"share no coordinate system, so one cannot be placed on the other ({err})",
            "Give both elements a transformation to a common coordinate system "
            "(spatialdata.transformations.set_transformation).",
        )
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    xy = np.asarray(xy, dtype=float)
    # elementwise, not xy @ A.T: BLAS on an (n, 2) x (2, 2) product is slow and erratic under thread contention
    out = np.empty(np.broadcast_shapes(xy.shape, (2,)))
    out[..., 0] = matrix[0, 0] * xy[..., 0] + matrix[0, 1] * xy[..., 1] + matrix[0, 2]
    out[..., 1] = matrix[1, 0] * xy[..., 0] + matrix[1, 1] * xy[..., 1] + matrix[1, 2]
    return out


def isotropic_scale(matrix: np.ndarray, what: str) -> float:
    """The scale of a similarity transform (rotation allowed); refuse shears and unequal axis scales."""
    lin = matrix[:2, :2]
    sv = np.linalg.svd(lin, compute_uv=False)
    if not np.isclose(sv[0], sv[1], rtol=1e-4):
        fail(
            what,
            f"the transformation scales x and y differently ({sv[0]:.6g} vs {sv[1]:.6g}), so circles would become "
            "ellipses",
            "Give shapes and image transformations that differ by a similarity (scale, rotation, translation), "
            "or convert the circles to polygons first",
        )
    return float(sv[0])


def transformations_of(element: Any) -> dict[str, Any]:
    from spatialdata.transformations import get_transformation

    return dict(get_transformation(element, get_all=True))
