"""Data loading: in-memory uint8 image datasets and a fast, resumable batch loader."""

from selfsup.data.datasets import (
    DATASET_NAMES,
    EMBEDDED_PATH,
    IMAGE_EXTENSIONS,
    ImageArrayDataset,
    default_cache_dir,
    load_dataset,
)
from selfsup.data.loader import BatchLoader

__all__ = [
    "DATASET_NAMES",
    "EMBEDDED_PATH",
    "IMAGE_EXTENSIONS",
    "BatchLoader",
    "ImageArrayDataset",
    "default_cache_dir",
    "load_dataset",
]
