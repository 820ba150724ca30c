"""Hugging Face Hub pipelines: ``pull`` (download, verify, convert), ``push`` (upload a verified folder), and
``describe_remote`` (``inspect hf://org/repo`` from headers read by range requests).

>>> from mertools.hub import pull, push
>>> pull("org/mixtral-gguf", "out/", gguf="*q4_0.gguf")   # doctest: +SKIP
>>> push("out/", "me/mixtral-shards")                     # doctest: +SKIP
"""

from .convert import StreamingConverter
# The modules are named apart from the functions (pulling.py, pushing.py): a submodule called ``push`` becomes the
# package's attribute ``push`` once imported, so either the function hid the module (``import mertools.hub.push``
# gave a function, monkeypatch paths broke) or the module hid the function. pushing.py imports huggingface_hub only
# inside its functions, so importing it eagerly costs nothing.
from .pulling import PullResult, pull
from .pushing import push
from .remote import HubError, IntegrityError, RepoSpec

__all__ = ["HubError", "IntegrityError", "PullResult", "RepoSpec", "StreamingConverter", "pull", "push",
           "describe_remote"]


def __getattr__(name: str):  # inspect imports more of huggingface_hub; load them when asked
    if name == "describe_remote":
        from .inspect import describe_remote

        return describe_remote
    raise AttributeError(name)
