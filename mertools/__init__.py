"""mertools: turn Mixture-of-Experts models into aligned, checksummed per-expert shards.

>>> from mertools import extract, verify
>>> extract("fixtures/real/mixtral-q4_0.gguf", "out/")   # doctest: +SKIP
>>> verify("out/").ok                                    # doctest: +SKIP
True
"""

__version__ = "0.1.0"

from .errors import MertoolsError  # noqa: E402
from .extract import ExtractResult, extract  # noqa: E402
from .sources import open_source  # noqa: E402  (GGUF file or SafeTensors folder)
from .verify import VerifyReport, verify  # noqa: E402

__all__ = ["ExtractResult", "MertoolsError", "VerifyReport", "__version__", "extract", "open_source", "verify"]
