"""Adapter for the end-to-end cancel tests: a command that does not poll for a cancel."""

import time

import snakepit


@snakepit.command(thread_safe=True)
def spin(seconds):
    """A Python loop of ``seconds``, after a progress report that says it started."""
    snakepit.progress(0, 1, "spinning")
    deadline = time.monotonic() + seconds
    turns = 0
    while time.monotonic() < deadline:
        turns += 1
    return turns
