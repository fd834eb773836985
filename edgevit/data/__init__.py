"""Datasets, transforms, splits and calibration sampling."""

from edgevit.data.datasets import (
    DIGITS,
    augmentation,
    classifier_classes,
    data_ref,
    default_input,
    load_ref,
    load_split,
    source_classes,
    split_arrays,
)
from edgevit.data.sampling import (
    balanced_indices,
    calibration_batch,
    class_balanced_weights,
    class_counts,
    fraction_subset,
)
from edgevit.data.transforms import default_preprocessing, image_to_tensor

__all__ = [
    "DIGITS",
    "augmentation",
    "balanced_indices",
    "calibration_batch",
    "class_balanced_weights",
    "class_counts",
    "classifier_classes",
    "data_ref",
    "default_input",
    "default_preprocessing",
    "fraction_subset",
    "image_to_tensor",
    "load_ref",
    "load_split",
    "source_classes",
    "split_arrays",
]
