"""selfsup: self-supervised pretraining, evaluation and export in one library."""

__version__ = "0.1.0"
