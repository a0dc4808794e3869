"""A fake host for the tests of streams, cancellation and progress: Worker.serve or
serve_threaded fed through a pipe, so that the test can send credit and cancel frames while
the worker runs, and every frame the worker writes decoded onto a queue. Every wait is bounded.
"""

import io
import os
import queue
import threading

from snakepit.protocol import encode_frame, frame_bytes, read_frame, write_all

TIMEOUT = 15  # seconds for any single wait


def run_in_thread(target, *args):
    """Run ``target(*args)`` on a daemon thread; returns (thread, outcome: a list that gets
    "returned" or the exception)."""
    outcome = []

    def body():
        try:
            target(*args)
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


def call(command, args=None, id=1, **extra):
    msg = {"type": "call", "id": id, "command": command, **extra}
    if args is not None:
        msg["args"] = args
    return msg


def split_frames(data):
    """The frames in ``data``, which must hold whole frames only."""
    frames, stream = [], io.BytesIO(data)
    while True:
        msg = read_frame(stream)
        if msg is None:
            return frames
        frames.append(msg)


class Host:
    """The host side of one Worker: ``send`` frames, ``recv`` the worker's frames.

    ``threads``: 0 runs Worker.serve (the process profile), N serve_threaded with N threads.
    ``start()`` serves on a thread of its own; ``serve_here()`` on the calling thread (the main
    thread, for SIGINT), until the input ends. ``close()`` (a cleanup) ends the input and waits.
    """

    def __init__(self, test, worker, threads=0):
        self.worker = worker
        self.threads = threads
        rfd, self.host_out = os.pipe()
        self.reader = os.fdopen(rfd, "rb", buffering=65536)
        self.frames = queue.Queue()
        self.writes = []  # every write's bytes: each must hold whole frames
        self.outcome = []  # "returned", or the exception serve raised
        self.server = None
        test.addCleanup(self.close)

    def write(self, data):
        data = frame_bytes(data)  # a copy: a frame with attachments borrows the command's memory
        self.writes.append(data)
        for msg in split_frames(data):
            self.frames.put(msg)

    def _serve(self):
        try:
            if self.threads:
                self.worker.serve_threaded(self.reader, self.write, self.threads)
            else:
                self.worker.serve(self.reader, self.write)
            self.outcome.append("returned")
        except BaseException as exc:
            self.outcome.append(exc)

    def start(self):
        self.server = threading.Thread(target=self._serve, name="test-serve", daemon=True)
        self.server.start()
        return self

    def serve_here(self):
        self._serve()
        return self.outcome[-1]

    def send(self, *messages):
        write_all(self.host_out, b"".join(frame_bytes(encode_frame(m)) for m in messages))

    def recv(self, timeout=TIMEOUT):
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no frame from the worker within {timeout}s") from None

    def recv_until(self, rid, timeout=TIMEOUT):
        """Frames up to and including the reply (result or error) for ``rid``."""
        got = []
        while True:
            msg = self.recv(timeout)
            got.append(msg)
            if msg["type"] in ("result", "error") and msg.get("id") == rid:
                return got

    def nothing(self, seconds=0.2):
        """None if the worker sends nothing for ``seconds``, else what it sent."""
        try:
            return self.frames.get(timeout=seconds)
        except queue.Empty:
            return None

    def end_input(self):
        if self.host_out is not None:
            os.close(self.host_out)
            self.host_out = None

    def finish(self):
        """End the input and wait (bounded) for serve to return; its outcome."""
        self.end_input()
        if self.server is not None:
            self.server.join(TIMEOUT)
            if self.server.is_alive():
                raise AssertionError(f"serve did not return within {TIMEOUT}s")
        return self.outcome[-1]

    def close(self):
        self.end_input()
        if self.server is not None:
            self.server.join(TIMEOUT)
        self.reader.close()
