"""Modalities: what a batch holds, which data sources and encoders belong to it, how it is viewed.

A batch names its modality by its keys (``images``; later ``tokens`` + ``attention_mask``,
``series``, ``audio``, ``video``, ``text``). Each modality registers one ``Modality`` entry in
``selfsup.registry`` (its batch keys, the data sources it claims, its reader); encoders are
registered with the modality they encode (``register_backbone(name, modality=...)``), and each
Method declares the modalities it accepts (``Method.modalities``), so a method given another
modality's data or encoder is refused in one line: at config load where that can be told without
reading the data, else when the data is opened, else on the first batch.

Adding a modality adds its files (its reader, views, encoders and methods) and one line in
``register_all`` below; no shared file changes.
"""

from __future__ import annotations

import importlib

MODULES = ("image", "text", "series", "audio", "video")
"""One per modality: importing it registers the modality."""


def register_all() -> None:
    """Import every modality module (the registry calls this on its first modality lookup)."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")


__all__ = ["MODULES", "register_all"]
