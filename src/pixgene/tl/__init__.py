"""Tools: fit PixNet, predict dense maps, read them out over shapes, and score them."""

from ..model import DecoderConfig, PixNet, TrainConfig
from ._aggregate import aggregate
from ._baselines import colour_control
from ._denoise import denoise
from ._evaluate import Scores, evaluate
from ._fit import fit
from ._grid import make_grid
from ._predict import predict_dense
from ._reconstruct import reconstruct
from ._segment import segment_cells

__all__ = ["DecoderConfig", "PixNet", "Scores", "TrainConfig", "aggregate", "colour_control", "denoise", "evaluate", "fit", "make_grid",
           "predict_dense", "reconstruct", "segment_cells"]
