"""Cancellation (protocol 3): snakepit.Cancelled, cancelled(), check_cancelled(); cancel frames in
the thread profile (cooperative, then forced with an asynchronous Cancelled); the cancel file
and SIGINT in the process profile."""

import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock

import snakepit
from snakepit import _calls
from snakepit import worker as worker_module
from snakepit.protocol import CANCEL_FILE_SIZE, encode_frame, format_cancel_file, read_frame
from snakepit.worker import Worker

from tests._host import TIMEOUT, Host, call

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cancel(rid, force=False):
    return {"type": "cancel", "id": rid, "force": force}


class Commands:
    """Commands for these tests, with what they did."""

    def __init__(self):
        self.started = queue.Queue()
        self.ran = []
        self.gate = threading.Event()

    def commands(self):
        def poll(tag):
            """Stops when asked to (cooperative)."""
            self.started.put(tag)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                snakepit.check_cancelled()
                time.sleep(0.001)
            return "never asked"

        def look(tag):
            """Says whether it was asked, without raising."""
            self.started.put(tag)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and not snakepit.cancelled():
                time.sleep(0.001)
            return snakepit.cancelled()

        def spin(tag, seconds=TIMEOUT):
            """A Python loop that never looks: only an interruption stops it early."""
            self.started.put(tag)
            deadline = time.monotonic() + seconds
            turns = 0
            while time.monotonic() < deadline:
                turns += 1
            return turns

        def hold(tag):
            self.started.put(tag)
            self.gate.wait(TIMEOUT)
            return tag

        def record(tag):
            self.ran.append(tag)
            return tag

        def give_up():
            raise snakepit.Cancelled("I give up")

        def swallow():
            try:
                raise snakepit.Cancelled("inner")
            except Exception:  # what a command's broad handler does: Cancelled goes through
                return "swallowed"

        def give_up_in_session(session):
            snakepit.check_cancelled()  # not cancelled: nothing
            raise snakepit.Cancelled()

        return {
            "poll": poll,
            "look": look,
            "spin": spin,
            "hold": hold,
            "record": record,
            "give_up": give_up,
            "swallow": swallow,
            "give_up_in_session": give_up_in_session,
        }

    def worker(self):
        return Worker(self.commands(), session_commands=["give_up_in_session"])


def assert_cancelled(test, reply, rid, message="call cancelled"):
    test.assertEqual(reply["type"], "error", reply)
    test.assertEqual(reply["id"], rid)
    test.assertEqual(reply["error"]["type"], "Cancelled")
    test.assertEqual(reply["error"]["message"], message)


class ApiTests(unittest.TestCase):
    def test_cancelled_is_a_base_exception_that_except_exception_does_not_catch(self):
        self.assertTrue(issubclass(snakepit.Cancelled, BaseException))
        self.assertFalse(issubclass(snakepit.Cancelled, Exception))
        for name in ("Cancelled", "cancelled", "check_cancelled", "progress"):
            self.assertIn(name, snakepit.__all__)

    def test_outside_a_call_nothing_is_cancelled(self):
        self.assertIs(snakepit.cancelled(), False)
        snakepit.check_cancelled()  # does not raise
        results = []
        thread = threading.Thread(target=lambda: results.append(snakepit.cancelled()))
        thread.start()
        thread.join(TIMEOUT)
        self.assertEqual(results, [False])


class CancelledByTheCommandTests:
    """A command that raises Cancelled is answered as cancelled, and the worker goes on."""

    THREADS = 0

    def test_plain_and_session_calls(self):
        cmds = Commands()
        host = Host(self, cmds.worker(), self.THREADS).start()
        host.send(call("give_up", id=1))
        reply = host.recv()
        assert_cancelled(self, reply, 1, "I give up")
        self.assertIn("in give_up", reply["error"]["traceback"])
        self.assertIn("snakepit.Cancelled: I give up", reply["error"]["traceback"])
        host.send(call("give_up_in_session", id=2, session="s"), call("give_up_in_session", id=3))
        host.send(call("swallow", id=4), call("record", ["on"], id=5))
        replies = {m["id"]: m for m in (host.recv() for _ in range(4))}  # any order (threads)
        for rid in (2, 3):
            assert_cancelled(self, replies[rid], rid)
        assert_cancelled(self, replies[4], 4, "inner")
        self.assertEqual(replies[5], {"type": "result", "id": 5, "value": "on"})
        self.assertEqual(host.finish(), "returned")

    def test_cancel_and_credit_frames_for_unknown_ids_are_ignored(self):
        cmds = Commands()
        host = Host(self, cmds.worker(), self.THREADS).start()
        host.send(cancel(40), cancel(41, True), {"type": "credit", "id": 42, "n": 1}, call("record", [1], id=1))
        self.assertEqual(host.recv(), {"type": "result", "id": 1, "value": 1})
        self.assertIsNone(host.nothing(0.2))


class ProcessProfileCancelledTests(CancelledByTheCommandTests, unittest.TestCase):
    THREADS = 0


class ThreadProfileCancelledTests(CancelledByTheCommandTests, unittest.TestCase):
    THREADS = 2


class ThreadProfileCancelTests(unittest.TestCase):
    def start(self, threads=2):
        self.cmds = Commands()
        self.host = Host(self, self.cmds.worker(), threads).start()
        self.addCleanup(self.cmds.gate.set)
        return self.host

    def started(self, tag):
        self.assertEqual(self.cmds.started.get(timeout=TIMEOUT), tag)

    def test_a_cooperative_cancel_reaches_a_command_that_polls(self):
        host = self.start()
        host.send(call("poll", ["p"], id=1), call("look", ["l"], id=2))
        self.assertEqual(sorted([self.cmds.started.get(timeout=TIMEOUT) for _ in range(2)]), ["l", "p"])
        host.send(cancel(1), cancel(2))
        replies = {m["id"]: m for m in (host.recv(), host.recv())}
        assert_cancelled(self, replies[1], 1)
        self.assertIn("in poll", replies[1]["error"]["traceback"])
        self.assertEqual(replies[2], {"type": "result", "id": 2, "value": True})

    def test_a_forced_cancel_interrupts_a_loop_and_the_thread_serves_on(self):
        host = self.start(threads=1)
        host.send(call("spin", ["s"], id=1))
        self.started("s")
        host.send(cancel(1))
        self.assertIsNone(host.nothing(0.3), "spin does not poll: a cooperative cancel cannot stop it")
        host.send(cancel(1, force=True))
        reply = host.recv()
        assert_cancelled(self, reply, 1)
        self.assertIn("in spin", reply["error"]["traceback"])
        # The same (only) thread: its next calls run normally, with no Cancelled left over.
        host.send(call("record", ["next"], id=2), call("spin", ["short", 0.3], id=3))
        self.assertEqual(host.recv(), {"type": "result", "id": 2, "value": "next"})
        self.started("short")
        reply = host.recv()
        self.assertEqual((reply["id"], reply["type"]), (3, "result"), reply)
        host.send(cancel(3, force=True), call("record", ["last"], id=4))  # after its end: ignored
        self.assertEqual(host.recv(), {"type": "result", "id": 4, "value": "last"})
        self.assertEqual(host.finish(), "returned")

    def test_a_call_cancelled_before_it_started_is_answered_without_running(self):
        host = self.start(threads=1)
        host.send(call("hold", ["h"], id=1))
        self.started("h")
        host.send(call("record", ["never"], id=2), call("record", ["forced"], id=3))
        host.send(cancel(2), cancel(3, force=True))
        self.assertIsNone(host.nothing(0.1))
        self.cmds.gate.set()
        self.assertEqual(host.recv(), {"type": "result", "id": 1, "value": "h"})
        for rid in (2, 3):
            reply = host.recv()
            assert_cancelled(self, reply, rid, "call cancelled before it started")
            self.assertEqual(reply["error"]["traceback"], "")
        self.assertEqual(self.cmds.ran, [])

    def test_forced_cancels_racing_the_end_of_their_calls_never_hit_the_loop_or_another_call(self):
        host = self.start(threads=2)
        rng = random.Random(7)
        count = 120

        def send_all():  # a spin of up to 10 ms, its forced cancel after up to 10 ms
            for rid in range(1, count + 1):
                host.send(call("spin", [rid, rng.random() * 0.01], id=rid))
                time.sleep(rng.random() * 0.01)
                host.send(cancel(rid, force=True))

        sender = threading.Thread(target=send_all)
        sender.start()
        replies = {}
        while len(replies) < count:
            msg = host.recv()
            self.assertNotIn(msg["id"], replies, "two replies to one call")
            replies[msg["id"]] = msg
        sender.join(TIMEOUT)
        kinds = {"result": 0, "Cancelled": 0}
        for msg in replies.values():
            kinds["result" if msg["type"] == "result" else msg["error"]["type"]] += 1
        self.assertEqual(sum(kinds.values()), count, kinds)
        # Both threads still serve, and nothing stray is raised in them.
        host.send(*(call("spin", [f"after{i}", 0.05], id=1000 + i) for i in range(4)))
        for _ in range(4):
            reply = host.recv()
            self.assertEqual(reply["type"], "result", reply)
        self.assertEqual(host.finish(), "returned")

    def test_a_force_that_comes_while_a_frame_is_written_is_raised_after_it(self):
        sent = []
        calls = _calls.ThreadCalls(sent.append, 1000)
        outcome = []

        def command_thread():
            me = calls.thread(threading.get_ident())
            msg = {"type": "call", "id": 1, "command": "c"}
            calls.running[1] = msg
            me.msg = msg
            me.shielded = True  # as while writing a frame
            calls.cancel(1, force=True)
            outcome.append(me.async_set)  # no asynchronous Cancelled while shielded
            outcome.append(me.is_cancelled())
            me.shielded = False
            try:
                me.send(b"frame")
            except snakepit.Cancelled:
                outcome.append("raised")
            me.end(None)
            outcome.append(me.is_cancelled())  # no call: nothing cancelled
            calls.forget_thread(me)

        thread = threading.Thread(target=command_thread)
        thread.start()
        thread.join(TIMEOUT)
        self.assertEqual(outcome, [False, True, "raised", False])
        self.assertEqual(sent, [b"frame"])


# --- process profile: the cancel file and SIGINT -------------------------------------


def write_request(path, rid, step):
    """What the host does: rewrite the file's 32 bytes in place."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, format_cancel_file(rid, step), 0)
    finally:
        os.close(fd)


def make_cancel_file(test):
    fd, path = tempfile.mkstemp(prefix="snakepit-cancel-")
    os.write(fd, b" " * CANCEL_FILE_SIZE)
    os.close(fd)
    test.addCleanup(os.unlink, path)
    return path


def install_cancel_signal(test, path):
    """_cancel_on_signal(path) on this (main) thread, undone by the test's cleanup."""
    previous = signal.getsignal(signal.SIGINT)

    def restore():
        signal.signal(signal.SIGINT, previous)
        if _calls.MAIN.view is not None:
            _calls.MAIN.view.close()
        _calls.MAIN.view = None
        worker_module._cancel_signal.clear()

    test.addCleanup(restore)
    test.assertTrue(worker_module._cancel_on_signal(path))


def run_script(test, host, script):
    """Worker.serve on this (the main) thread, while ``script(host)`` plays the host on another;
    the input ends when the script does. Re-raises what the script raised."""
    failures = []

    def target():
        try:
            script(host)
        except BaseException as exc:
            failures.append(exc)
        finally:
            host.end_input()

    thread = threading.Thread(target=target, name="test-host")
    thread.start()
    outcome = host.serve_here()
    thread.join(TIMEOUT)
    test.assertFalse(thread.is_alive())
    if failures:
        raise failures[0]
    test.assertEqual(outcome, "returned")


@unittest.skipUnless(threading.current_thread() is threading.main_thread(), "signals need the main thread")
class CancelFileTests(unittest.TestCase):
    def setUp(self):
        self.cmds = Commands()
        self.path = make_cancel_file(self)
        install_cancel_signal(self, self.path)
        self.host = Host(self, self.cmds.worker(), threads=0)

    def started(self, tag):
        got = self.cmds.started.get(timeout=TIMEOUT)
        if got != tag:
            raise AssertionError(f"started {got!r}, expected {tag!r}")

    def test_ready_says_the_host_may_interrupt(self):
        self.assertIs(self.host.worker.ready_info()["cancel_signal"], True)

    def test_step_1_makes_cancelled_true_for_that_call_only(self):
        got = {}

        def script(host):
            write_request(self.path, 9, 1)  # another call's request
            host.send(call("look", ["a"], id=3))
            self.started("a")
            time.sleep(0.1)
            write_request(self.path, 3, 1)
            got[3] = host.recv()
            host.send(call("poll", ["b"], id=4))
            self.started("b")
            write_request(self.path, 4, 1)
            got[4] = host.recv()

        run_script(self, self.host, script)
        self.assertEqual(got[3], {"type": "result", "id": 3, "value": True})
        assert_cancelled(self, got[4], 4)
        self.assertIn("in poll", got[4]["error"]["traceback"])

    def test_step_2_with_sigint_interrupts_the_call_and_the_worker_serves_on(self):
        got = {}

        def script(host):
            host.send(call("spin", ["s"], id=5))
            self.started("s")
            write_request(self.path, 5, 2)
            threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
            got[5] = host.recv()
            os.kill(os.getpid(), signal.SIGINT)  # between calls (the file still names 5): nothing
            time.sleep(0.1)
            host.send(call("record", ["after"], id=6))
            got[6] = host.recv()

        run_script(self, self.host, script)
        assert_cancelled(self, got[5], 5)
        self.assertIn("in spin", got[5]["error"]["traceback"])
        self.assertEqual(got[6], {"type": "result", "id": 6, "value": "after"})

    def test_sigint_for_another_call_does_nothing(self):
        got = {}

        def script(host):
            host.send(call("spin", ["s", 0.4], id=7))
            self.started("s")
            write_request(self.path, 99, 2)
            os.kill(os.getpid(), signal.SIGINT)
            got[7] = host.recv()

        run_script(self, self.host, script)
        self.assertEqual((got[7]["type"], got[7]["id"]), ("result", 7), got[7])
        self.assertGreater(got[7]["value"], 0)

    def test_a_stream_stops_after_its_chunk_when_the_file_asks(self):
        closed = threading.Event()

        def numbers():
            try:
                yield from range(100)
            finally:
                closed.set()

        self.host.worker = Worker({"numbers": numbers})
        got = []

        def script(host):
            host.send(call("numbers", id=8, window=1))
            got.append(host.recv())
            write_request(self.path, 8, 1)
            host.send({"type": "credit", "id": 8, "n": 5})
            got.append(host.recv())

        run_script(self, self.host, script)
        self.assertEqual(got[0], {"type": "chunk", "id": 8, "value": 0})
        assert_cancelled(self, got[1], 8)
        self.assertTrue(closed.is_set())


class CancelFileOptionTests(unittest.TestCase):
    def test_parse_args(self):
        args = worker_module._parse_args(["--cancel-file", "/tmp/x"])
        self.assertEqual(args.cancel_file, "/tmp/x")
        self.assertIsNone(worker_module._parse_args([]).cancel_file)
        self.assertIn("[--cancel-file PATH]", worker_module._USAGE)

    def test_a_missing_or_short_file_gives_no_cancel_signal(self):
        previous = signal.getsignal(signal.SIGINT)
        self.addCleanup(signal.signal, signal.SIGINT, previous)
        fd, short = tempfile.mkstemp()
        os.write(fd, b"  ")
        os.close(fd)
        self.addCleanup(os.unlink, short)
        with unittest.mock.patch.object(worker_module.log, "warning") as warning:
            self.assertFalse(worker_module._cancel_on_signal(short))
            self.assertFalse(worker_module._cancel_on_signal(short + ".missing"))
        self.assertEqual(warning.call_count, 2)
        self.assertIs(signal.getsignal(signal.SIGINT), previous)
        self.assertIsNone(_calls.MAIN.view)
        self.assertEqual(worker_module._cancel_signal, [])


class CancelFileProcessTests(unittest.TestCase):
    """A real `python -m snakepit --cancel-file PATH`."""

    def start(self, *args):
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        env.pop("SNAKEPIT_LOG_LEVEL", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakepit", "--adapter", "tests.cancel_adapter", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=PYTHON_DIR,
            env=env,
        )
        frames = queue.Queue()

        def read():
            try:
                while True:
                    msg = read_frame(proc.stdout)
                    frames.put(msg)
                    if msg is None:
                        return
            except Exception as exc:
                frames.put(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def cleanup():
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
            reader.join(TIMEOUT)
            proc.stdin.close()
            proc.stdout.close()

        self.addCleanup(cleanup)

        def recv():
            msg = frames.get(timeout=TIMEOUT)
            if isinstance(msg, Exception):
                raise msg
            return msg

        def send(msg):
            proc.stdin.write(encode_frame(msg))
            proc.stdin.flush()

        return proc, recv, send

    def test_the_host_interrupts_a_call_and_a_stray_sigint_does_not_end_the_worker(self):
        path = make_cancel_file(self)
        proc, recv, send = self.start("--cancel-file", path)
        ready = recv()
        self.assertIs(ready["info"]["cancel_signal"], True)
        fd = os.open(path, os.O_WRONLY)  # the host keeps its own fd, and may unlink the file
        self.addCleanup(os.close, fd)
        send(call("spin", [TIMEOUT], id=1))
        self.assertEqual(recv()["type"], "progress")  # it started
        os.kill(proc.pid, signal.SIGINT)  # the file asks nothing yet: ignored
        time.sleep(0.1)
        self.assertIsNone(proc.poll(), "a SIGINT ended the worker")
        os.pwrite(fd, format_cancel_file(1, 2), 0)
        os.kill(proc.pid, signal.SIGINT)
        reply = recv()
        assert_cancelled(self, reply, 1)
        self.assertIn("in spin", reply["error"]["traceback"])
        os.kill(proc.pid, signal.SIGINT)  # between calls
        time.sleep(0.1)
        send(call("spin", [0], id=2))
        self.assertEqual(recv()["type"], "progress")
        reply = recv()
        self.assertEqual((reply["type"], reply["id"]), ("result", 2))
        proc.stdin.close()
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_the_thread_profile_has_no_cancel_signal(self):
        path = make_cancel_file(self)
        proc, recv, send = self.start("--threads", "2", "--cancel-file", path)
        self.assertIs(recv()["info"]["cancel_signal"], False)
