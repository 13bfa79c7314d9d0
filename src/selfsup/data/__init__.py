"""Data loading: sources (in-memory uint8 image datasets, streamed image folders; see sources.py
for the protocol), their resumable batch loaders, and data.mode's choice between them (modes.py)."""

from selfsup.data.cache import default_cache_dir
from selfsup.data.datasets import (
    DATASET_NAMES,
    EMBEDDED_PATH,
    IMAGE_EXTENSIONS,
    ImageArrayDataset,
    load_dataset,
)
from selfsup.data.loader import BatchLoader, StreamLoader, make_loader
from selfsup.data.modes import open_data
from selfsup.data.sources import FolderStream, open_folder_stream

__all__ = [
    "DATASET_NAMES",
    "EMBEDDED_PATH",
    "IMAGE_EXTENSIONS",
    "BatchLoader",
    "FolderStream",
    "ImageArrayDataset",
    "StreamLoader",
    "default_cache_dir",
    "load_dataset",
    "make_loader",
    "open_data",
    "open_folder_stream",
]
