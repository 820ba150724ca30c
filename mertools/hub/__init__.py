"""Hugging Face Hub pipelines: ``pull`` (download, verify, convert), ``push`` (upload a verified folder), and
``describe_remote`` (``inspect hf://org/repo`` from headers read by range requests).

>>> from mertools.hub import pull, push
>>> pull("org/mixtral-gguf", "out/", gguf="*q4_0.gguf")   # doctest: +SKIP
>>> push("out/", "me/mixtral-shards")                     # doctest: +SKIP
"""

from .convert import StreamingConverter
from .pull import PullResult, pull
# eager, not lazy: the submodule of the same name, once imported (mertools.hub.push), would replace a lazily
# provided function as the package's attribute, and `from mertools.hub import push` gave the module (push.py
# imports huggingface_hub only inside its functions, so this costs nothing at import)
from .push import push
from .remote import HubError, IntegrityError, RepoSpec

__all__ = ["HubError", "IntegrityError", "PullResult", "RepoSpec", "StreamingConverter", "pull", "push",
           "describe_remote"]


def __getattr__(name: str):  # inspect imports more of huggingface_hub; load them when asked
    if name == "describe_remote":
        from .inspect import describe_remote

        return describe_remote
    raise AttributeError(name)
