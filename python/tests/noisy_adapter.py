"""Adapter for the end-to-end tests: commands that write where they must not."""

import os
import subprocess
import sys

import snakepit

print("noisy adapter imported")  # stdout at import time, before the ready frame

_CHILD = "import sys; print('child says hi', flush=True); sys.stderr.write(str(len(sys.stdin.buffer.read())))"


@snakepit.command
def shout(text):
    """print() to stdout, through both sys.stdout and the original sys.__stdout__."""
    print(text)
    sys.__stdout__.write(text + "\n")
    sys.__stdout__.flush()
    return text


@snakepit.command
def scribble():
    """Write straight to fd 1, as a C library would."""
    os.write(1, b"junk")
    return "ok"


@snakepit.command
def child_process():
    """Run a child that prints to its stdout and drains its stdin; return how many bytes it read."""
    done = subprocess.run([sys.executable, "-c", _CHILD], stderr=subprocess.PIPE, timeout=30, check=True)
    return int(done.stderr)


@snakepit.command
def quit_worker(code):
    """sys.exit from a command must end the worker with that code."""
    sys.exit(code)
