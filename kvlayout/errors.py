"""Exceptions raised by kvlayout. All derive from ``KVLayoutError`` (a ``ValueError``)."""


class KVLayoutError(ValueError):
    """Base class: a request kvlayout refuses, with a message saying what is wrong and how to fix it."""


class LayoutConflictError(KVLayoutError):
    """Two sides (specs, backend, connector) want incompatible layouts."""


class UnsupportedFeatureError(KVLayoutError):
    """A backend was asked for a dtype, head size, block size or feature it does not support."""


class BackendUnavailableError(KVLayoutError):
    """A backend is unknown, or its package or device is missing."""
