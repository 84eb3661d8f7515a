"""The data layer: numpy building blocks on the image grid and SpatialData containers (slides, spots,
tiling, geometry, operators, masks, augmentation, segmentation). Never runs a network."""

from ._augment import TTA_CHOICES, TTA_TRANSFORMS, dihedral, dihedral_inverse, stain_jitter
from ._build import build_spot_sdata, parse_rgb_image
from ._geometry import circle_weights, polygon_weights, scaled_polygons
from ._mask import block_mean, mask_fraction_in_region, tissue_mask
from ._operator import integrate_labels, integrate_map
from ._reader import SlideReader
from ._segment import expand_cells, hematoxylin, label_polygons, nuclei_threshold, nucleus_mask, split_nuclei
from ._slides import SpotSlide, linked_table_rows, prepare_spot_slide, select_slide_spots, spot_selection
from ._training import SlideSpots, TileView, TrainingCache, plan_tiles, spots_inside

__all__ = [
    "expand_cells", "hematoxylin", "label_polygons", "nuclei_threshold", "nucleus_mask", "split_nuclei",
    "build_spot_sdata", "circle_weights", "dihedral", "dihedral_inverse", "integrate_labels",
    "integrate_map", "linked_table_rows", "mask_fraction_in_region", "parse_rgb_image", "plan_tiles",
    "polygon_weights", "prepare_spot_slide", "scaled_polygons", "SlideReader", "SlideSpots",
    "spots_inside", "SpotSlide", "stain_jitter", "TileView", "tissue_mask", "TrainingCache",
    "TTA_CHOICES", "TTA_TRANSFORMS",
    "block_mean",
    "select_slide_spots", "spot_selection",
]
