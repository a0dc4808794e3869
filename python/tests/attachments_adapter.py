"""Adapter for the end-to-end tests of binary values (test_attachments.py). Imports no numpy:
the worker does, when an array first arrives, if it can."""

import sys

import snakepit

SNAKEPIT_THREAD_SAFE = True  # every command keeps its state per call


@snakepit.command
def same(*args):
    """Its arguments, as they arrived."""
    return list(args)


@snakepit.command
def kinds(*args):
    """The type of each argument, and whether it is writable (arrays)."""
    out = []
    for x in args:
        flags = getattr(x, "flags", None)
        out.append([type(x).__name__, None if flags is None else bool(flags.writeable)])
    return out


@snakepit.command
def numpy_loaded():
    return "numpy" in sys.modules


@snakepit.command
def filled(n, size):
    """``n`` byte strings of ``size`` bytes, each filled with its index, in one bytearray that is
    filled again for the next: each must be sent before it changes."""
    buffer = bytearray(size)
    for i in range(n):
        buffer[:] = bytes([i % 256]) * size
        yield buffer
    return n
