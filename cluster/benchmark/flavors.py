"""Server flavours: the extra request fields that make a server produce exactly `max_tokens`
tokens, by the name of the server kind (--flavor, --peer-flavor). Apart from the HTTP
client, so that the command line can offer the names without importing it.
"""

from __future__ import annotations

from collections.abc import Callable


# return_token_ids: a token whose text the server holds back (part of a UTF-8 character)
# still arrives as a chunk, so ITL sees every token.
def pdserve_extras(max_tokens: int) -> dict:
    """pdserve refuses unknown fields, so only those it implements."""
    return {"ignore_eos": True, "return_token_ids": True}


def vllm_extras(max_tokens: int) -> dict:
    """vLLM: min_tokens as well, so that no stop token can end a request early."""
    return {"ignore_eos": True, "min_tokens": max_tokens, "return_token_ids": True}


def openai_extras(max_tokens: int) -> dict:
    """A plain OpenAI-compatible server: no extension (output lengths may then vary)."""
    return {}


Extras = Callable[[int], dict]
FLAVORS: dict[str, Extras] = {"pdserve": pdserve_extras, "vllm": vllm_extras, "openai": openai_extras}
