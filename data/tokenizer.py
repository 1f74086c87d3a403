"""GPT-2's byte-pair encoding (the 50257-token vocabulary), through tiktoken, whose BPE files load (downloaded
once, then from its cache) on the first encode/decode, not on import."""

import functools

import tiktoken

from fileio import InputError

END_OF_TEXT = 50256  # GPT-2's <|endoftext|>: ends a document, and pads batches (masked out by position)


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its HTTP client raises
        raise InputError(f"could not load GPT-2's BPE files through tiktoken ({type(e).__name__}: {e}); offline, "
                         f"set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached copies of them (from a "
                         f"machine where tiktoken.get_encoding('gpt2') has run once)") from None


def encode(text):
    """Text -> token ids. Special-token strings such as "<|endoftext|>" inside the text stay plain text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids):
    return get_tokenizer().decode(list(ids))
