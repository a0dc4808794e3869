"""Demo adapter for the quickstart: ``python -m snakepit --adapter snakepit.demo``."""

import math
import sys
import time
import zlib
from array import array

import snakepit

EMBEDDING_DIM = 8


@snakepit.command(thread_safe=True)
def embed(text):
    """A toy embedding: unit-length vector of EMBEDDING_DIM floats from word hashes.

    Deterministic across runs and machines (crc32, not Python's salted hash()).
    Text without words gives the zero vector.
    """
    vector = [0.0] * EMBEDDING_DIM
    for word in _require_text(text).lower().split():
        h = zlib.crc32(word.encode("utf-8"))
        for i in range(EMBEDDING_DIM):  # each dimension gets 4 bits of the hash
            vector[i] += ((h >> (4 * i)) & 0xF) - 7.5
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


@snakepit.command(thread_safe=True)
def word_count(text):
    """Number of whitespace-separated words."""
    return len(_require_text(text).split())


@snakepit.command(thread_safe=True)
def fail(message="something went wrong"):
    """Always raises ValueError(message): shows how errors reach the host."""
    raise ValueError(message)


@snakepit.command(thread_safe=True)
def slow(seconds):
    """Sleep for ``seconds`` and return it: handy for timeouts and concurrency."""
    time.sleep(seconds)
    return seconds


@snakepit.command(thread_safe=True)
def upper(text):
    """The text in upper case."""
    return _require_text(text).upper()


@snakepit.command(thread_safe=True)
def checksum(data):
    """The length and CRC-32 of ``data``: bytes arrive as ``bytes``, with no base64 on the way."""
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    return {"len": len(data), "crc32": zlib.crc32(data)}


@snakepit.command(thread_safe=True)
def scale(x, factor):
    """A float64 array times ``factor``: a numpy ndarray when numpy is installed, else a
    snakepit.Array (little-endian bytes), which array.array computes with here."""
    if type(x).__name__ == "ndarray":
        return x * factor
    if x.dtype != "float64":
        raise TypeError(f"x must be a float64 array, not {x.dtype}")
    values = array("d", bytes(x.data))
    if sys.byteorder == "big":
        values.byteswap()
    scaled = array("d", (v * factor for v in values))
    if sys.byteorder == "big":
        scaled.byteswap()
    return snakepit.Array("float64", x.shape, scaled.tobytes())


def _require_text(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, not {type(text).__name__}")
    return text
