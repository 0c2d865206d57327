"""pdserve: a disaggregated prefill/decode LLM serving cluster.

The offline API is imported lazily so that `import pdserve` stays cheap:

    from pdserve import LLM, SamplingParams
"""

from pdserve.version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from pdserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
