"""The library's own exceptions; everything else it raises is a plain ValueError for bad input."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the cause and what to do about it."""
