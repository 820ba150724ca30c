"""Errors the runtime raises; each message names the file and what to do."""


class MerError(Exception):
    """Base class: a problem with a shard folder or its use. The CLI prints it as one line, exit code 2."""


class ManifestError(MerError, ValueError):
    """manifest.json is missing, malformed, or describes an impossible layout."""


class ShardIOError(MerError, OSError):
    """Reading a shard failed (short file, I/O error, refused O_DIRECT...)."""


class CacheError(MerError, ValueError):
    """The cache cannot do what was asked: too many pins for its slots, or every slot pinned or in use."""


class NotRegularFileError(ShardIOError):
    """A FIFO, device, socket or folder where a shard file belongs: refused without blocking on it."""


class ConcurrentUseError(MerError, RuntimeError):
    """An object documented as single-threaded (one per stream of tokens) was called from two threads at once."""
