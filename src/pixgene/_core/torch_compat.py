"""Make timm importable next to a CPU torch when only a CUDA torchvision build is installed.

torchvision registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` without checking that
its compiled extension loaded; next to a CPU torch it cannot load, and ``import torchvision`` fails with
"operator torchvision::nms does not exist". Defining the two operator schemas first lets the import
succeed (the native ops nms/roi_align stay unavailable, and pixgene does not use them).
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)
_done = False


def _extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to patch: timm will report the missing package itself
    from pathlib import Path

    libs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision() -> None:
    """Call before the first import of timm, lightning or torchvision."""
    global _done
    if _done:
        return
    _done = True
    import sys

    if "torchvision" in sys.modules or _extension_loads():
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive by the registry below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _keepalive.append(lib)
    logger.debug("torchvision extension unavailable; defined nms/qnms schemas so timm can import")


_keepalive: list = []
