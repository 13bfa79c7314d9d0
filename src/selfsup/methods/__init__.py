"""Importing this package registers every method."""

from selfsup.methods import simclr  # noqa: F401
from selfsup.methods.base import Method, Progress, StepOutput

__all__ = ["Method", "Progress", "StepOutput"]
