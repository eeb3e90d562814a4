"""The library's own exceptions; everything else it raises for bad input is a plain ValueError."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the cause and what to do about it."""


class BackendError(RuntimeError):
    """Generation failed after the request was accepted (out of memory, an upstream server's error).
    The message is written for the person chatting; the doors show it as it is."""
