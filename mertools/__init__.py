"""mertools: turn Mixture-of-Experts models into aligned, checksummed per-expert shards.

>>> from mertools import extract, verify
>>> extract("fixtures/real/mixtral-q4_0.gguf", "out/")   # doctest: +SKIP
>>> verify("out/").ok                                    # doctest: +SKIP
True
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mertools")  # one source of truth: pyproject.toml, as installed
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from .errors import MertoolsError  # noqa: E402
from .extract import ExtractResult, extract  # noqa: E402
from .sources import open_source  # noqa: E402  (GGUF file or SafeTensors folder)
from .verify import VerifyReport, verify  # noqa: E402

__all__ = ["ExtractResult", "MertoolsError", "VerifyReport", "__version__", "extract", "open_source", "verify"]
