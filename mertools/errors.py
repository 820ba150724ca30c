"""The converter's error type. The CLI prints one line per error and exits with code 2, never a traceback."""

from mer_runtime.errors import MerError


class MertoolsError(MerError):
    """Bad input or an environment problem, with a message that names the file, the tensor and what to do."""


class NotMoEError(MertoolsError):
    """The model has no routed-expert tensors."""


class SourceError(MertoolsError):
    """A source file is unreadable: truncated, corrupt, of an unknown type, or inconsistent."""


class OutputError(MertoolsError):
    """The output folder cannot be written as asked (not empty, disk full, ...)."""
