"""Streams (protocol 3): a command that returns a generator, called with a "window", sends its
values as chunk frames, no more than the host's credit allows, then its result."""

import threading
import unittest

from snakepit.worker import Worker

from tests._host import TIMEOUT, Host, call


class Numbers:
    """Commands with a record of what their generators did."""

    def __init__(self):
        self.produced = 0  # values the generator has made (next() called on it)
        self.closed = threading.Event()  # its finally ran
        self.gate = threading.Event()

    def commands(self):
        def numbers(n, ret="done"):
            try:
                for i in range(n):
                    self.produced += 1
                    yield i
                return ret
            finally:
                self.closed.set()

        def one(x):
            return {"just": x}

        def broken(n):
            for i in range(n):
                yield i
            raise ValueError("ran dry")

        def unsendable():
            try:
                yield 1
                yield {1, 2}
                yield 3
            finally:
                self.closed.set()

        def stubborn():
            try:
                yield 1
            finally:
                raise RuntimeError("will not close")

        def tag(x):
            return x

        def big(n):
            yield "x" * n

        return {
            "big": big,
            "numbers": numbers,
            "one": one,
            "broken": broken,
            "unsendable": unsendable,
            "stubborn": stubborn,
            "tag": tag,
        }


def raw_payloads(data):
    """The payload bytes of each frame in ``data``."""
    payloads = []
    while data:
        size = int.from_bytes(data[:4], "big")
        payloads.append(data[4 : 4 + size])
        data = data[4 + size :]
    return payloads


def credit(rid, n):
    return {"type": "credit", "id": rid, "n": n}


def cancel(rid, force=False):
    return {"type": "cancel", "id": rid, "force": force}


class StreamTests:
    """The same behaviour in both profiles (THREADS: 0 for serve, else serve_threaded)."""

    THREADS = 0

    def host(self, **kwargs):
        self.gens = Numbers()
        return Host(self, Worker(self.gens.commands(), **kwargs), self.THREADS).start()

    def chunks(self, host, n):
        got = [host.recv() for _ in range(n)]
        for msg in got:
            self.assertEqual(msg["type"], "chunk", got)
        return [msg["value"] for msg in got]

    def test_no_more_chunks_than_the_credit_and_all_of_them_after_more_credit(self):
        host = self.host()
        host.send(call("numbers", [10], id=7, window=2))
        self.assertEqual(self.chunks(host, 2), [0, 1])
        self.assertIsNone(host.nothing(0.3), "a chunk beyond the window")
        self.assertEqual(self.gens.produced, 2, "the generator must wait for credit, not run ahead")
        host.send(credit(7, 3))
        self.assertEqual(self.chunks(host, 3), [2, 3, 4])
        self.assertIsNone(host.nothing(0.2))
        self.assertEqual(self.gens.produced, 5)
        host.send(credit(7, 1), credit(7, 100))
        self.assertEqual(self.chunks(host, 5), [5, 6, 7, 8, 9])
        self.assertEqual(host.recv(), {"type": "result", "id": 7, "value": "done"})
        self.assertTrue(self.gens.closed.is_set())
        self.assertEqual(host.finish(), "returned")

    def test_chunk_frames_are_written_whole_and_start_with_type_then_id(self):
        host = self.host()
        host.send(call("numbers", [3], id=4, window=5))
        host.recv_until(4)
        payloads = raw_payloads(b"".join(host.writes))
        chunks = [p for p in payloads if b'"chunk"' in p]
        self.assertEqual(len(chunks), 3)
        for payload in chunks:
            self.assertEqual(payload[:23], b'{"type":"chunk","id":4,')

    def test_a_window_on_a_command_that_is_not_a_generator_gives_one_chunk_then_null(self):
        host = self.host()
        host.send(call("one", ["x"], id=3, window=1))
        self.assertEqual(host.recv(), {"type": "chunk", "id": 3, "value": {"just": "x"}})
        self.assertEqual(host.recv(), {"type": "result", "id": 3, "value": None})

    def test_a_generator_called_without_a_window_is_a_type_error_and_is_closed(self):
        host = self.host()
        host.send(call("numbers", [3], id=2))
        reply = host.recv()
        self.assertEqual(reply["type"], "error")
        self.assertEqual(reply["id"], 2)
        self.assertEqual(reply["error"]["type"], "TypeError")
        self.assertEqual(
            reply["error"]["message"], "command 'numbers' is a generator: call it as a stream (Pool::stream)"
        )
        self.assertEqual(self.gens.produced, 0)
        host.send(call("tag", ["next"], id=3))
        self.assertEqual(host.recv()["value"], "next")

    def test_cancel_closes_the_generator_and_answers_cancelled(self):
        host = self.host()
        host.send(call("numbers", [10], id=5, window=2))
        self.chunks(host, 2)
        host.send(cancel(5))
        reply = host.recv()
        self.assertEqual(reply["type"], "error")
        self.assertEqual(reply["id"], 5)
        self.assertEqual(reply["error"]["type"], "Cancelled")
        self.assertEqual(reply["error"]["message"], "call cancelled")
        self.assertIn("in numbers", reply["error"]["traceback"], "where the generator was paused")
        self.assertTrue(self.gens.closed.wait(TIMEOUT), "the generator's finally did not run")
        self.assertEqual(self.gens.produced, 2)
        host.send(call("tag", ["after"], id=6))
        self.assertEqual(host.recv(), {"type": "result", "id": 6, "value": "after"})

    def test_a_generator_that_will_not_close_is_answered_with_its_error(self):
        host = self.host()
        host.send(call("stubborn", id=5, window=1))
        self.chunks(host, 1)
        host.send(cancel(5))
        reply = host.recv()
        self.assertEqual(reply["error"]["type"], "RuntimeError")
        self.assertEqual(reply["error"]["message"], "will not close")

    def test_credit_and_cancel_for_other_or_unknown_ids_are_ignored(self):
        host = self.host()
        host.send(credit(99, 5), cancel(98), cancel(97, True))
        host.send(call("numbers", [4], id=1, window=1))
        self.assertEqual(self.chunks(host, 1), [0])
        host.send(credit(99, 5), cancel(98))
        self.assertIsNone(host.nothing(0.2))
        host.send(credit(1, 10))
        self.assertEqual(self.chunks(host, 3), [1, 2, 3])
        self.assertEqual(host.recv()["type"], "result")
        host.send(cancel(1), credit(1, 3), call("tag", [1], id=2))  # after its end: ignored
        self.assertEqual(host.recv(), {"type": "result", "id": 2, "value": 1})

    def test_an_error_in_the_generator_comes_after_the_chunks_sent(self):
        host = self.host()
        host.send(call("broken", [2], id=3, window=8))
        self.assertEqual(self.chunks(host, 2), [0, 1])
        reply = host.recv()
        self.assertEqual(reply["error"]["type"], "ValueError")
        self.assertEqual(reply["error"]["message"], "ran dry")
        self.assertIn("in broken", reply["error"]["traceback"])

    def test_a_value_that_cannot_be_sent_ends_the_stream_and_closes_the_generator(self):
        host = self.host()
        host.send(call("unsendable", id=3, window=8))
        self.assertEqual(self.chunks(host, 1), [1])
        reply = host.recv()
        self.assertEqual(reply["id"], 3)
        self.assertEqual(reply["error"]["type"], "TypeError")
        self.assertIn("chunk of stream 'unsendable'", reply["error"]["message"])
        self.assertTrue(self.gens.closed.is_set())

    def test_a_chunk_too_large_ends_the_stream(self):
        host = self.host(max_frame_size=200)
        host.send(call("big", [500], id=3, window=1))
        reply = host.recv()
        self.assertEqual((reply["id"], reply["error"]["type"]), (3, "FrameTooLarge"))
        self.assertIn("chunk of stream 'big' is", reply["error"]["message"])

    def test_a_window_that_is_not_a_positive_integer_is_refused(self):
        host = self.host()
        for rid, window in ((1, 0), (2, "3"), (3, True), (4, -1)):
            host.send(call("numbers", [3], id=rid, window=window))
            reply = host.recv()
            self.assertEqual((reply["id"], reply["error"]["type"]), (rid, "ProtocolError"), reply)
        self.assertEqual(self.gens.produced, 0)
        host.send(call("tag", [1], id=5))
        self.assertEqual(host.recv()["value"], 1)

    def test_end_of_input_while_waiting_for_credit_cancels_and_serve_returns(self):
        host = self.host()
        host.send(call("numbers", [10], id=5, window=1))
        self.chunks(host, 1)
        self.assertEqual(host.finish(), "returned")
        reply = host.recv()
        self.assertEqual((reply["id"], reply["error"]["type"]), (5, "Cancelled"))
        self.assertTrue(self.gens.closed.is_set())

    def test_shutdown_while_waiting_for_credit_cancels_and_serve_returns(self):
        host = self.host()
        host.send(call("numbers", [10], id=5, window=1))
        self.chunks(host, 1)
        host.send({"type": "shutdown"})
        reply = host.recv()
        self.assertEqual((reply["id"], reply["error"]["type"]), (5, "Cancelled"))
        host.server.join(TIMEOUT)
        self.assertFalse(host.server.is_alive(), "serve did not return after shutdown")
        self.assertEqual(host.outcome, ["returned"])


class ProcessProfileStreamTests(StreamTests, unittest.TestCase):
    THREADS = 0

    def test_while_waiting_pings_are_answered_and_calls_and_session_ends_wait(self):
        host = self.host()
        host.send(call("numbers", [3], id=1, window=1))
        self.chunks(host, 1)
        host.send({"type": "ping", "id": 50}, call("tag", ["later"], id=2), {"type": "end_session", "session": "s"})
        self.assertEqual(host.recv(), {"type": "pong", "id": 50})
        self.assertIsNone(host.nothing(0.2), "the call must wait for the stream")
        host.send(credit(1, 5))
        self.assertEqual(self.chunks(host, 2), [1, 2])
        self.assertEqual(host.recv(), {"type": "result", "id": 1, "value": "done"})
        self.assertEqual(host.recv(), {"type": "result", "id": 2, "value": "later"})

    def test_a_call_read_while_waiting_is_still_answered_when_the_input_ends(self):
        host = self.host()
        host.send(call("numbers", [3], id=1, window=1))
        self.chunks(host, 1)
        host.send(call("tag", ["queued"], id=2))
        self.assertEqual(host.finish(), "returned")
        self.assertEqual(host.recv()["error"]["type"], "Cancelled")
        self.assertEqual(host.recv(), {"type": "result", "id": 2, "value": "queued"})


class ThreadProfileStreamTests(StreamTests, unittest.TestCase):
    THREADS = 4

    def test_streams_run_side_by_side_each_with_its_own_credit(self):
        host = self.host()
        host.send(call("numbers", [4, "a"], id=1, window=1), call("numbers", [4, "b"], id=2, window=2))
        first = [host.recv() for _ in range(3)]
        self.assertEqual(sorted((m["id"], m["value"]) for m in first), [(1, 0), (2, 0), (2, 1)])
        self.assertIsNone(host.nothing(0.2))
        host.send(credit(2, 10))
        got = host.recv_until(2)
        self.assertEqual([m["value"] for m in got], [2, 3, "b"])
        host.send(call("tag", ["meanwhile"], id=3))
        self.assertEqual(host.recv(), {"type": "result", "id": 3, "value": "meanwhile"})
        host.send(credit(1, 10))
        self.assertEqual([m["value"] for m in host.recv_until(1)], [1, 2, 3, "a"])


if __name__ == "__main__":
    unittest.main()
