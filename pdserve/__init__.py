"""pdserve: a disaggregated prefill/decode LLM serving cluster."""

from pdserve.version import __version__

__all__ = ["__version__"]
