"""snakepit.progress(): its argument checks, its rate limit, and its frames in both profiles."""

import fractions
import threading
import unittest
import unittest.mock

import snakepit
from snakepit import _calls
from snakepit.protocol import encode_frame
from snakepit.worker import Worker

from tests._host import Host, call


def report(steps, total=None, message=None, final=False):
    for i in range(steps):
        snakepit.progress(i, total, message)
    if final:
        snakepit.progress(total, total, "done")
    return steps


def report_from_a_helper_thread():
    thread = threading.Thread(target=snakepit.progress, args=(1, 2))
    thread.start()
    thread.join()
    return "helped"


def long_message(n):
    snakepit.progress(1, None, "é" * n)
    return 1


def reporting_stream(n):
    for i in range(n):
        snakepit.progress(i, n)
        yield i


COMMANDS = {
    "long_message": long_message,
    "report": report,
    "helper": report_from_a_helper_thread,
    "reporting_stream": reporting_stream,
}


class ArgumentTests(unittest.TestCase):
    def test_numbers_only(self):
        for bad in ("3", None, True, [1], 1j):
            with self.subTest(done=bad), self.assertRaisesRegex(TypeError, "done must be an int or a float"):
                snakepit.progress(bad)
        with self.assertRaisesRegex(TypeError, "total must be an int or a float, not bool"):
            snakepit.progress(1, False)
        with self.assertRaisesRegex(TypeError, "message must be a str or None, not int"):
            snakepit.progress(1, 2, 3)
        for bad in (float("nan"), float("inf"), -float("inf")):
            with self.subTest(done=bad), self.assertRaisesRegex(ValueError, "done must be finite"):
                snakepit.progress(bad)

    def test_other_real_numbers_become_ints_or_floats(self):
        self.assertEqual(snakepit._progress_number(fractions.Fraction(1, 4), "done"), 0.25)
        self.assertIs(type(snakepit._progress_number(3, "done")), int)
        self.assertIs(type(snakepit._progress_number(2.5, "done")), float)

    def test_outside_a_call_it_does_nothing(self):
        snakepit.progress(1, 2, "nobody listens")  # no error, nothing to send it to


class RateTests(unittest.TestCase):
    def test_due(self):
        interval = _calls.PROGRESS_INTERVAL
        self.assertTrue(_calls._due(None, 0, None, 100.0), "the first report of a call")
        self.assertFalse(_calls._due(100.0, 1, 10, 100.0 + interval / 2))
        self.assertTrue(_calls._due(100.0, 1, 10, 100.0 + 2 * interval))
        self.assertTrue(_calls._due(100.0, 10, 10, 100.0), "done == total always goes")
        self.assertTrue(_calls._due(100.0, 2.0, 2, 100.0))
        self.assertFalse(_calls._due(100.0, 5, None, 100.01))


class ProgressFrameTests:
    THREADS = 0

    def host(self, **kwargs):
        return Host(self, Worker(COMMANDS, **kwargs), self.THREADS).start()

    def test_reports_come_before_the_result_with_the_calls_id(self):
        host = self.host()
        with unittest.mock.patch.object(_calls, "PROGRESS_INTERVAL", 0):
            host.send(call("report", [3, 3, "step"], id=9))
            frames = host.recv_until(9)
        self.assertEqual(
            frames,
            [
                {"type": "progress", "id": 9, "done": 0, "total": 3, "message": "step"},
                {"type": "progress", "id": 9, "done": 1, "total": 3, "message": "step"},
                {"type": "progress", "id": 9, "done": 2, "total": 3, "message": "step"},
                {"type": "result", "id": 9, "value": 3},
            ],
        )
        payload = encode_frame(frames[0])[4:]
        self.assertTrue(payload.startswith(b'{"type":"progress","id":9,"done":0,'))
        self.assertEqual([w[4:30] for w in host.writes if b'"progress"' in w][:1], [b'{"type":"progress","id":9,'])

    def test_at_most_one_report_per_interval_but_always_the_last(self):
        host = self.host()
        with unittest.mock.patch.object(_calls, "PROGRESS_INTERVAL", 60):
            host.send(call("report", [500, 500, None, True], id=1))
            frames = host.recv_until(1)
            sent = [(f["type"], f.get("done")) for f in frames]
            self.assertEqual(sent, [("progress", 0), ("progress", 500), ("result", None)])
            self.assertEqual(frames[1]["message"], "done")
            # The limit is per call: the next call's first report goes at once.
            host.send(call("report", [2], id=2))
            frames = host.recv_until(2)
            self.assertEqual([(f["type"], f.get("done")) for f in frames], [("progress", 0), ("result", None)])

    def test_a_helper_thread_of_the_command_is_not_in_the_call(self):
        host = self.host()
        host.send(call("helper", id=4))
        self.assertEqual(host.recv(), {"type": "result", "id": 4, "value": "helped"})

    def test_a_stream_reports_between_its_chunks(self):
        host = self.host()
        with unittest.mock.patch.object(_calls, "PROGRESS_INTERVAL", 0):
            host.send(call("reporting_stream", [2], id=5, window=5))
            frames = host.recv_until(5)
        self.assertEqual(
            [(f["type"], f.get("done", f.get("value"))) for f in frames],
            [("progress", 0), ("chunk", 0), ("progress", 1), ("chunk", 1), ("result", None)],
        )

    def test_a_message_too_long_for_a_frame_is_cut_short(self):
        host = self.host(max_frame_size=300)
        host.send(call("long_message", [1000], id=6))
        frames = host.recv_until(6)
        self.assertEqual(frames[0]["type"], "progress")
        self.assertTrue(frames[0]["message"].endswith("..."))
        self.assertEqual(frames[1], {"type": "result", "id": 6, "value": 1})


class ProcessProfileProgressTests(ProgressFrameTests, unittest.TestCase):
    THREADS = 0


class ThreadProfileProgressTests(ProgressFrameTests, unittest.TestCase):
    THREADS = 3


if __name__ == "__main__":
    unittest.main()
