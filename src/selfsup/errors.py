"""Errors a user can act on. The CLI prints these as one clear line, never a traceback."""


class SelfSupError(Exception):
    """Base class: a problem with the user's input or environment, with a message saying what to do."""


class ConfigError(SelfSupError):
    """A recipe or an override is wrong: unknown key, bad type, value out of range."""


class DataError(SelfSupError):
    """The data cannot be used: missing or empty folder, nothing decodable, dataset not downloaded."""


class CheckpointError(SelfSupError):
    """A checkpoint is missing, unreadable or from an incompatible run."""


class TrainingError(SelfSupError):
    """Training had to stop (e.g. repeated non-finite losses); the last good checkpoint is kept."""


class ExportError(SelfSupError):
    """Exported weights could not be written (unwritable folder, full disk); nothing partial is left."""


class WriteError(SelfSupError, OSError):
    """A file could not be written: the disk is full, or the target is no regular file. Also an
    OSError, so code that treats a failed write as an OSError (a cache that only warns) still does."""
