"""Sessions (per-session state, end_session and its hooks, the live count) and worker
initialisation (--init, --init-args)."""

import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock

import snakepit
from snakepit import worker as worker_module
from snakepit._sessions import Registry, Session
from snakepit.protocol import PROTOCOL_VERSION, encode_frame, read_frame
from snakepit.worker import EXIT_STARTUP, Worker, _parse_args, load_worker

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 15  # seconds for any single wait on a child process


# --- commands used by the in-memory tests (passed to Worker directly) ----------


def remember(key, value, session):
    """Store key=value in the session; return what the call saw."""
    before = session.get(key)
    session[key] = value
    return {
        "id": session.id,
        "before": before,
        "fresh": session.fresh,
        "calls": session.calls,
        "context": session.context,
        "keys": sorted(session),
    }


def count(session):
    session["n"] = session.get("n", 0) + 1
    return session["n"]


def join_args(a, b, session):
    return [a, b, session.id]


def plain(x=None):
    return x


def nap_and_look(seconds, session):
    time.sleep(seconds)
    return [session.id, session.fresh, session.calls]


SESSION_COMMANDS = {"remember": remember, "count": count, "join_args": join_args, "nap_and_look": nap_and_look}


def make_worker(hooks=()):
    return Worker(
        dict(SESSION_COMMANDS, plain=plain), session_commands=SESSION_COMMANDS, on_session_end=hooks, adapter="t"
    )


def call(command, args=None, id=1, **extra):
    msg = {"type": "call", "id": id, "command": command, **extra}
    if args is not None:
        msg["args"] = args
    return msg


def end(session_id):
    return {"type": "end_session", "session": session_id}


def exchange(worker, *messages, threads=0):
    """Feed messages to serve() (or serve_threaded() with ``threads``); return the decoded
    replies, sorted by id for the thread profile."""
    sent = []
    lock = threading.Lock()

    def write(data):
        with lock:
            sent.append(data)

    stream = io.BytesIO(b"".join(encode_frame(m) for m in messages))
    if threads:
        worker.serve_threaded(stream, write, threads)
    else:
        worker.serve(stream, write)
    replies = []
    for data in sent:  # the thread profile may write several frames at once
        frames = io.BytesIO(data)
        while (msg := read_frame(frames)) is not None:
            replies.append(msg)
    return sorted(replies, key=lambda r: r["id"]) if threads else replies


def values(replies):
    for reply in replies:
        if reply["type"] != "result":
            raise AssertionError(f"not a result: {reply}")
    return [reply["value"] for reply in replies]


class SessionStateTests(unittest.TestCase):
    def setUp(self):
        self.worker = make_worker()

    def test_state_persists_across_the_calls_of_a_session(self):
        got = values(
            exchange(
                self.worker,
                call("remember", {"key": "a", "value": 1}, id=1, session="s1"),
                call("remember", {"key": "b", "value": 2}, id=2, session="s1"),
                call("remember", {"key": "a", "value": 3}, id=3, session="s1"),
            )
        )
        self.assertEqual([g["before"] for g in got], [None, None, 1])
        self.assertEqual(got[2]["keys"], ["a", "b"])
        self.assertEqual({g["id"] for g in got}, {"s1"})

    def test_sessions_have_separate_state(self):
        got = values(
            exchange(
                self.worker,
                call("count", id=1, session="a"),
                call("count", id=2, session="b"),
                call("count", id=3, session="a"),
                call("count", id=4, session="a"),
                call("count", id=5, session="b"),
            )
        )
        self.assertEqual(got, [1, 1, 2, 3, 2])

    def test_fresh_only_on_the_first_call_and_calls_counts_this_one_too(self):
        got = values(exchange(self.worker, *(call("remember", ["k", i], id=i, session="s") for i in range(1, 4))))
        self.assertEqual([(g["fresh"], g["calls"]) for g in got], [(True, 1), (False, 2), (False, 3)])

    def test_context_is_the_one_sent_with_each_call(self):
        got = values(
            exchange(
                self.worker,
                call("remember", ["k", 1], id=1, session="s", context={"user": "ann"}),
                call("remember", ["k", 2], id=2, session="s", context=[1, 2]),
                call("remember", ["k", 3], id=3, session="s"),
            )
        )
        self.assertEqual([g["context"] for g in got], [{"user": "ann"}, [1, 2], None])

    def test_a_session_command_without_a_session_gets_a_throwaway_one(self):
        got = values(
            exchange(
                self.worker,
                call("remember", ["k", 1], id=1),
                call("remember", ["k", 2], id=2),
                call("info", id=3),
            )
        )
        for g in got[:2]:
            self.assertEqual((g["id"], g["fresh"], g["calls"], g["context"], g["before"]), (None, True, 1, None, None))
        self.assertEqual(got[2]["sessions"], 0)

    def test_list_args_are_positional_with_the_session_as_a_keyword(self):
        self.assertEqual(values(exchange(self.worker, call("join_args", [1, 2], session="s"))), [[1, 2, "s"]])
        self.assertEqual(values(exchange(self.worker, call("join_args", {"b": 2, "a": 1}, session="s"))), [[1, 2, "s"]])

    def test_a_command_without_the_flag_never_gets_a_session_nor_makes_state(self):
        got = values(exchange(self.worker, call("plain", {"x": 5}, id=1, session="s", context=1), call("info", id=2)))
        self.assertEqual(got[0], 5)
        self.assertEqual(got[1]["sessions"], 0)

    def test_a_session_arg_of_the_call_is_a_command_error(self):
        reply = exchange(self.worker, call("join_args", {"a": 1, "b": 2, "session": 3}, session="s"))[0]
        self.assertEqual((reply["type"], reply["error"]["type"]), ("error", "TypeError"))
        self.assertIn("session", reply["error"]["message"])

    def test_a_session_id_that_is_not_a_string_is_an_error_reply(self):
        reply = exchange(self.worker, call("count", id=4, session=12), call("count", id=5, session="12"))
        self.assertEqual(reply[0]["type"], "error")
        self.assertEqual(reply[0]["id"], 4)
        self.assertEqual(reply[0]["error"]["type"], "ProtocolError")
        self.assertIn("must be a string, not number", reply[0]["error"]["message"])
        self.assertEqual(reply[1], {"type": "result", "id": 5, "value": 1})

    def test_unknown_commands_and_bad_args_are_still_reported(self):
        unknown, bad = exchange(self.worker, call("nope", id=1, session="s"), call("count", 5, id=2, session="s"))
        self.assertEqual(unknown["error"]["type"], "UnknownCommand")
        self.assertIn("count", unknown["error"]["message"])  # session commands are listed too
        self.assertEqual(bad["error"]["type"], "TypeError")
        self.assertEqual(values(exchange(self.worker, call("info")))[0]["sessions"], 0)

    def test_info_reports_the_live_session_count(self):
        got = values(
            exchange(
                self.worker,
                call("info", id=1),
                call("count", id=2, session="a"),
                call("count", id=3, session="b"),
                call("count", id=4, session="b"),
                call("info", id=5),
                end("a"),
                call("info", id=6),
            )
        )
        self.assertEqual([got[0]["sessions"], got[4]["sessions"], got[5]["sessions"]], [0, 2, 1])

    def test_an_exception_in_a_session_command_keeps_the_state(self):
        def fail_after_writing(session):
            session["written"] = True
            raise ValueError("nope")

        worker = Worker({"f": fail_after_writing, "count": count}, session_commands=["f", "count"])
        replies = exchange(worker, call("f", id=1, session="s"), call("f", id=2, session="s"))
        self.assertEqual([r["error"]["type"] for r in replies], ["ValueError", "ValueError"])
        self.assertEqual(len(worker.sessions), 1)

    def test_a_worker_without_session_commands_has_no_registry_and_does_not_import_it(self):
        worker = Worker({"plain": plain})
        self.assertIsNone(worker.sessions)
        got = values(exchange(worker, call("plain", [1], session="s"), end("s"), call("info", id=2)))
        self.assertEqual(got[1]["sessions"], 0)
        code = "import sys, snakepit.worker as w; w.Worker({}); print('snakepit._sessions' in sys.modules)"
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(out.stdout.strip(), "False", out.stderr)

    def test_session_commands_must_be_given_commands(self):
        with self.assertRaises(ValueError):
            Worker({"count": count}, session_commands=["count", "missing"])


class EndSessionTests(unittest.TestCase):
    def test_in_the_worker_process_a_slow_hook_holds_up_nothing(self):
        # A hook that takes its time must not delay the frames after the end (a ping the host
        # times, the next call): the worker process runs hooks on a thread of their own.
        ran = threading.Event()

        def slow_hook(session):
            time.sleep(0.5)
            ran.set()

        worker = make_worker([slow_hook])
        worker.run_hooks_in_thread()
        got = exchange(worker, call("count", id=1, session="s"), end("s"), {"type": "ping", "id": 2})
        self.assertEqual([r["type"] for r in got], ["result", "pong"])
        self.assertFalse(ran.is_set(), "the ping was answered while the hook still ran")
        worker.stop_hook_thread()  # waits for the hooks queued so far
        self.assertTrue(ran.is_set())

    def test_end_session_frees_the_state_and_a_later_call_starts_fresh(self):
        worker = make_worker()
        got = values(
            exchange(
                worker,
                call("count", id=1, session="s"),
                call("count", id=2, session="s"),
                end("s"),
                call("remember", ["k", 1], id=3, session="s"),
            )
        )
        self.assertEqual(got[:2], [1, 2])
        self.assertEqual((got[2]["fresh"], got[2]["calls"], got[2]["before"], got[2]["keys"]), (True, 1, None, ["k"]))

    def test_hooks_run_in_registration_order_with_the_session_ended(self):
        seen = []
        hooks = [
            lambda s: seen.append(("first", s.id, s.calls, s.fresh, s.context, dict(s))),
            lambda s: seen.append(("second", s.id, len(s))),
        ]
        worker = make_worker(hooks)
        exchange(
            worker,
            call("count", id=1, session="s", context="c"),
            call("count", id=2, session="s"),
            call("count", id=3, session="other"),
            end("s"),
        )
        self.assertEqual(seen, [("first", "s", 2, False, None, {"n": 2}), ("second", "s", 1)])
        self.assertEqual(len(worker.sessions), 1)  # "other" lives on

    def test_a_raising_hook_is_logged_and_the_worker_goes_on(self):
        seen = []

        def broken(session):
            raise RuntimeError("hook trouble")

        worker = make_worker([broken, lambda s: seen.append(s.id)])
        with unittest.mock.patch.object(worker_module.log, "warning") as warning:
            replies = exchange(worker, call("count", id=1, session="s"), end("s"), call("count", id=2, session="s"))
        self.assertEqual(values(replies), [1, 1])
        self.assertEqual(seen, ["s"], "the next hook still runs")
        self.assertEqual(warning.call_count, 1)
        text = warning.call_args[0][0] % warning.call_args[0][1:]
        self.assertIn("on_session_end hook", text)
        self.assertIn("broken", text)
        self.assertIn("Traceback (most recent call last)", text)
        self.assertIn("RuntimeError: hook trouble", text)

    def test_an_unknown_session_is_a_no_op(self):
        seen = []
        worker = make_worker([seen.append])
        replies = exchange(worker, end("never"), call("count", id=1, session="s"), end("other"), call("info", id=2))
        self.assertEqual(values(replies)[0], 1)
        self.assertEqual(values(replies)[1]["sessions"], 1)
        self.assertEqual(seen, [])

    def test_a_malformed_end_session_is_ignored_with_a_warning(self):
        worker = make_worker()
        with unittest.mock.patch.object(worker_module.log, "warning") as warning:
            replies = exchange(worker, {"type": "end_session"}, {"type": "end_session", "session": 3}, call("count"))
        self.assertEqual(values(replies), [1])
        self.assertEqual(warning.call_count, 2)

    def test_no_reply_and_the_stream_stays_in_sync_in_both_profiles(self):
        for threads in (0, 1, 4):
            with self.subTest(threads=threads):
                seen = []
                worker = make_worker([lambda s: seen.append(s.id)])
                messages = [
                    call("count", id=1, session="a"),
                    end("a"),
                    end("unknown"),
                    {"type": "ping", "id": 2},
                    call("echo", ["after"], id=3),
                ]
                if not threads:  # one at a time: a call after the end starts a new state
                    messages += [call("count", id=4, session="a"), end("a"), call("info", id=5)]
                replies = exchange(worker, *messages, threads=threads)
                expected = [
                    {"type": "result", "id": 1, "value": 1},
                    {"type": "pong", "id": 2},
                    {"type": "result", "id": 3, "value": ["after"]},
                ]
                if not threads:
                    expected.append({"type": "result", "id": 4, "value": 1})
                    self.assertEqual(replies[-1]["value"]["sessions"], 0)
                    self.assertEqual(seen, ["a", "a"])
                    replies = replies[:-1]
                self.assertEqual(replies, expected)

    def test_the_thread_profile_ends_a_session_while_its_calls_run(self):
        # Every call thread is busy with a call of the session; the end_session that comes next
        # is done by the reading loop at once: its hook opens the gate the call waits for.
        started = threading.Event()
        gate = threading.Event()

        def wait_for_gate(session):
            started.set()
            return gate.wait(TIMEOUT)

        worker = Worker(
            {"wait_for_gate": wait_for_gate}, session_commands=["wait_for_gate"], on_session_end=[lambda s: gate.set()]
        )
        read_end, write_end = os.pipe()
        sent = []
        with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "wb", buffering=0) as writer:
            server = threading.Thread(target=worker.serve_threaded, args=(reader, sent.append, 1))
            server.start()
            writer.write(encode_frame(call("wait_for_gate", id=1, session="s")))
            self.assertTrue(started.wait(TIMEOUT))
            writer.write(encode_frame(end("s")) + encode_frame({"type": "ping", "id": 2}))
            self.assertTrue(gate.wait(TIMEOUT), "the end_session did not wait for the busy thread")
            writer.close()
            server.join(TIMEOUT)
        replies = sorted((read_frame(io.BytesIO(data)) for data in sent), key=lambda r: r["id"])
        self.assertEqual(replies, [{"type": "result", "id": 1, "value": True}, {"type": "pong", "id": 2}])
        self.assertEqual(len(worker.sessions), 0)


class ConcurrencyTests(unittest.TestCase):
    def test_concurrent_entries_create_exactly_one_state_per_session(self):
        registry = Registry()
        sessions = [f"s{i}" for i in range(4)]
        per_thread = 50
        barrier = threading.Barrier(16)
        seen = []
        lock = threading.Lock()

        def enter_many():
            barrier.wait(TIMEOUT)
            got = []
            for i in range(per_thread):
                s = registry.enter(sessions[i % len(sessions)], None)
                s.setdefault("created_by", threading.get_ident())
                got.append((s.id, s.fresh, s.calls, s["created_by"], id(s.lock)))
            with lock:
                seen.extend(got)

        threads = [threading.Thread(target=enter_many) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertEqual(len(registry), len(sessions))
        for sid in sessions:
            mine = [entry for entry in seen if entry[0] == sid]
            self.assertEqual(sum(1 for entry in mine if entry[1]), 1, f"one fresh entry for {sid}")
            self.assertEqual(sorted(entry[2] for entry in mine), list(range(1, len(mine) + 1)))
            self.assertEqual(len({entry[3] for entry in mine}), 1, "one store")
            self.assertEqual(len({entry[4] for entry in mine}), 1, "one lock")

    def test_the_thread_profile_creates_one_state_per_session(self):
        worker = make_worker()
        messages = [call("nap_and_look", [0.005], id=i, session=f"s{i % 3}") for i in range(1, 61)]
        replies = exchange(worker, *messages, call("info", id=99), threads=8)
        looks = values(replies[:-1])
        for sid in ("s0", "s1", "s2"):
            mine = [look for look in looks if look[0] == sid]
            self.assertEqual(sum(1 for look in mine if look[1]), 1)
            self.assertEqual(sorted(look[2] for look in mine), list(range(1, 21)))
        self.assertEqual(len(worker.sessions), 3)

    def test_the_lock_is_shared_and_reentrant(self):
        registry = Registry()
        a, b = registry.enter("x", None), registry.enter("x", None)
        self.assertIs(a.lock, b.lock)
        with a.lock, b.lock:  # an RLock: the same thread may take it twice
            pass


class SessionMappingTests(unittest.TestCase):
    def test_the_mutable_mapping_protocol(self):
        from collections.abc import MutableMapping

        s = Session("id", {"ctx": 1})
        self.assertIsInstance(s, MutableMapping)
        self.assertIs(snakepit.Session, Session)
        s["a"] = 1
        self.assertEqual(s.setdefault("b", []), [])
        s["b"].append(2)
        self.assertEqual((s["a"], s.get("b"), s.get("z"), s.get("z", 0)), (1, [2], None, 0))
        self.assertIn("a", s)
        self.assertNotIn("z", s)
        self.assertEqual((len(s), sorted(s), dict(s.items())), (2, ["a", "b"], {"a": 1, "b": [2]}))
        self.assertEqual(s.pop("a"), 1)
        self.assertEqual(s.pop("a", "gone"), "gone")
        with self.assertRaises(KeyError):
            s.pop("a")
        del s["b"]
        with self.assertRaises(KeyError):
            s["b"]
        s.update(x=1, y=2)
        s.clear()
        self.assertEqual(len(s), 0)
        self.assertEqual((s.id, s.context, s.fresh, s.calls), ("id", {"ctx": 1}, True, 1))
        self.assertIn("id='id'", repr(s))

    def test_each_call_has_its_own_view_of_one_store(self):
        registry = Registry()
        first = registry.enter("s", "one")
        second = registry.enter("s", "two")
        first["k"] = "v"
        self.assertEqual(second["k"], "v")
        self.assertEqual((first.context, first.fresh, first.calls), ("one", True, 1))
        self.assertEqual((second.context, second.fresh, second.calls), ("two", False, 2))
        ended = registry.remove("s")
        self.assertEqual(
            (ended.id, ended.context, ended.fresh, ended.calls, dict(ended)), ("s", None, False, 2, {"k": "v"})
        )
        self.assertIsNone(registry.remove("s"))
        self.assertEqual(len(registry), 0)


class RegistryTests(unittest.TestCase):
    def forget(self, name):
        snakepit._registry.pop(name, None)
        for names in (snakepit._thread_safe, snakepit._cpu_bound, snakepit._session):
            names.discard(name)

    def test_the_session_flag_and_the_default_worker(self):
        self.addCleanup(self.forget, "t_sess_counter")

        @snakepit.command(name="t_sess_counter", session=True, thread_safe=True)
        def counter(session):
            return count(session)

        self.assertIs(snakepit.command(name="t_sess_counter", session=True, thread_safe=True)(counter), counter)
        self.assertTrue(snakepit.takes_session("t_sess_counter"))
        self.assertTrue(snakepit.is_thread_safe("t_sess_counter"))
        self.assertFalse(snakepit.takes_session("echo"))
        worker = Worker({"t_sess_counter": counter})  # session commands from the registry
        got = values(exchange(worker, *(call("t_sess_counter", id=i, session="s") for i in (1, 2))))
        self.assertEqual(got, [1, 2])
        # Another function under an unregistered name is not a session command.
        self.assertEqual(Worker({"other": counter}).names, ["echo", "info", "other", "ping"])
        self.assertEqual(Worker({"other": counter})._with_session, {})

    def test_on_session_end_registers_each_hook_once_in_order(self):
        before = list(snakepit._session_end_hooks)
        self.addCleanup(snakepit._session_end_hooks.__setitem__, slice(None), before)
        seen = []

        def first(session):
            seen.append(("first", session.id))

        def second(session):
            seen.append(("second", session.id))

        self.assertIs(snakepit.on_session_end(first), first)
        snakepit.on_session_end(second)
        snakepit.on_session_end(first)
        self.assertEqual(snakepit.session_end_hooks()[-2:], [first, second])
        with self.assertRaises(TypeError):
            snakepit.on_session_end(42)
        worker = Worker({"count": count}, session_commands=["count"])  # the registered hooks
        exchange(worker, call("count", session="s"), end("s"))
        self.assertEqual(seen, [("first", "s"), ("second", "s")])


class InitTests(unittest.TestCase):
    """--init in process: load_worker and Worker.run_init."""

    def test_no_init_no_change(self):
        worker, failure = load_worker(None)
        self.assertIsNone(failure)
        self.assertIsNone(worker.run_init("echo", '{"a": 1}'))
        self.assertIsNone(worker.run_init("ping", None))
        self.assertIsNone(worker.run_init("echo", "null"))

    def test_init_arguments_follow_the_call_convention(self):
        seen = []

        def setup(*args, **kwargs):
            seen.append((args, kwargs))

        worker = Worker({"setup": setup})
        for text in ('{"model": "small", "n": 2}', "[1, 2]", None, " null "):
            self.assertIsNone(worker.run_init("setup", text))
        self.assertEqual(seen, [((), {"model": "small", "n": 2}), ((1, 2), {}), ((), {}), ((), {})])

    def test_a_session_command_runs_outside_any_session(self):
        worker = Worker({"count": count}, session_commands=["count"])
        self.assertIsNone(worker.run_init("count"))
        self.assertEqual(len(worker.sessions), 0)

    def test_a_raising_init_command(self):
        def setup(model):
            raise LookupError(f"no model {model}")

        error = Worker({"setup": setup}).run_init("setup", '{"model": "big"}')
        self.assertEqual(error["type"], "LookupError")
        self.assertEqual(error["message"], "init command 'setup' failed: LookupError: no model big")
        self.assertTrue(error["traceback"].startswith("Traceback (most recent call last)"), error["traceback"])
        self.assertIn("in setup", error["traceback"])
        self.assertIn("LookupError: no model big", error["traceback"])

    def test_system_exit_in_init_is_a_startup_error(self):
        def leave():
            raise SystemExit(4)

        error = Worker({"leave": leave}).run_init("leave")
        self.assertEqual(error["message"], "init command 'leave' failed: SystemExit: 4")

    def test_unknown_command_bad_json_and_bad_args(self):
        worker = Worker()
        error = worker.run_init("nope")
        self.assertEqual(error["type"], "UnknownCommand")
        prefix = "init command 'nope' failed: UnknownCommand: unknown command 'nope'"
        self.assertTrue(error["message"].startswith(prefix), error["message"])
        error = worker.run_init("echo", "{not json")
        self.assertEqual(error["type"], "ValueError")
        prefix = "init command 'echo' failed: ValueError: --init-args is not valid JSON: "
        self.assertTrue(error["message"].startswith(prefix), error["message"])
        error = worker.run_init("echo", "5")
        self.assertEqual(error["type"], "TypeError")
        self.assertIn("must be an object, an array or null, not number", error["message"])

    def test_load_worker_turns_a_failed_init_into_a_startup_error(self):
        worker, failure = load_worker(None, init="nope")
        self.assertIsNone(worker)
        self.assertEqual(failure["type"], "startup_error")
        self.assertTrue(failure["error"]["message"].startswith("init command 'nope' failed: "))
        worker, failure = load_worker(None, init="echo", init_args="[1]")
        self.assertIsNone(failure)

    def test_command_line(self):
        args = _parse_args(["--init", "setup", "--init-args", '{"a": [1, "b c"]}'])
        self.assertEqual((args.init, args.init_args), ("setup", '{"a": [1, "b c"]}'))
        args = _parse_args(["--init=setup", "--init-args=[1]"])
        self.assertEqual((args.init, args.init_args), ("setup", "[1]"))
        args = _parse_args([])
        self.assertEqual((args.init, args.init_args), (None, None))
        for argv in (["--init-args", "[]"], ["--init"], ["--init="], ["--init", "x", "--init-args"]):
            with self.subTest(argv=argv), self.assertRaises(SystemExit) as cm:
                with unittest.mock.patch.object(sys, "stderr", io.StringIO()):
                    _parse_args(argv)
            self.assertEqual(cm.exception.code, 2)
        self.assertIn("--init COMMAND", worker_module._USAGE)


# --- real processes ------------------------------------------------------------

_ADAPTER = '''
import sys
import snakepit

_config = {}


@snakepit.command(thread_safe=True)
def configure(model="small", size=1):
    _config.update(model=model, size=size)


@snakepit.command(thread_safe=True)
def config():
    return _config


@snakepit.command(thread_safe=True)
def break_init(reason):
    raise RuntimeError(reason)


@snakepit.command(session=True, thread_safe=True)
def tally(amount, session):
    with session.lock:
        session["total"] = session.get("total", 0) + amount
        return [session["total"], session.fresh, session.calls, session.context]


@snakepit.on_session_end
def goodbye(session):
    print(f"goodbye {session.id} total={session.get('total')} calls={session.calls}", file=sys.stderr)


@snakepit.on_session_end
def grumble(session):
    raise ValueError("grumpy hook")
'''


class ProcessTests(unittest.TestCase):
    """Real ``python -m snakepit`` workers, given all their input at once."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        with open(os.path.join(self.tmp, "sp_session_adapter.py"), "w", encoding="utf-8") as f:
            f.write(_ADAPTER)

    def run_worker(self, messages, *args):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join((PYTHON_DIR, self.tmp)))
        env.pop("SNAKEPIT_LOG_LEVEL", None)
        done = subprocess.run(
            [sys.executable, "-m", "snakepit", "--adapter", "sp_session_adapter", *args],
            input=b"".join(encode_frame(m) for m in messages),
            capture_output=True,
            cwd=self.tmp,
            env=env,
            timeout=TIMEOUT,
        )
        frames = []
        stream = io.BytesIO(done.stdout)
        while (msg := read_frame(stream)) is not None:
            frames.append(msg)
        return done, frames, done.stderr.decode("utf-8", "replace")

    def test_init_runs_before_ready_and_its_effect_is_visible(self):
        for profile in ([], ["--threads", "2"]):
            with self.subTest(profile=profile):
                init = ["--init", "configure", "--init-args", '{"model": "large", "size": 3}']
                done, frames, stderr = self.run_worker([call("config", id=1)], *init, *profile)
                self.assertEqual(done.returncode, 0, stderr)
                self.assertEqual(frames[0]["type"], "ready")
                self.assertEqual(frames[0]["info"]["protocol_version"], PROTOCOL_VERSION)
                self.assertEqual(frames[1], {"type": "result", "id": 1, "value": {"model": "large", "size": 3}})

    def test_positional_init_args(self):
        done, frames, stderr = self.run_worker([call("config")], "--init=configure", "--init-args=[\"tiny\", 9]")
        self.assertEqual(frames[1]["value"], {"model": "tiny", "size": 9}, stderr)

    def test_a_failing_init_is_a_startup_error(self):
        done, frames, stderr = self.run_worker([call("config")], "--init", "break_init", "--init-args", '["disk full"]')
        self.assertEqual(done.returncode, EXIT_STARTUP, stderr)
        self.assertEqual(len(frames), 1, "a startup_error and nothing else")
        self.assertEqual(frames[0]["type"], "startup_error")
        error = frames[0]["error"]
        self.assertEqual(error["type"], "RuntimeError")
        self.assertEqual(error["message"], "init command 'break_init' failed: RuntimeError: disk full")
        self.assertTrue(error["traceback"].startswith("Traceback (most recent call last)"), error["traceback"])
        self.assertIn("sp_session_adapter.py", error["traceback"])
        self.assertIn("in break_init", error["traceback"])
        self.assertIn("init command 'break_init' failed", stderr)

    def test_an_unknown_init_command_or_invalid_init_args_is_a_startup_error(self):
        for args, prefix in (
            (["--init", "nope"], "init command 'nope' failed: UnknownCommand: unknown command 'nope'"),
            (
                ["--init", "configure", "--init-args", "{model: 1}"],
                "init command 'configure' failed: ValueError: --init-args is not valid JSON",
            ),
        ):
            with self.subTest(args=args):
                done, frames, stderr = self.run_worker([], *args)
                self.assertEqual(done.returncode, EXIT_STARTUP, stderr)
                self.assertEqual([f["type"] for f in frames], ["startup_error"])
                self.assertTrue(frames[0]["error"]["message"].startswith(prefix), frames[0]["error"]["message"])

    def test_a_long_traceback_is_cut_to_fit_a_small_frame_limit(self):
        long_reason = '["' + "x" * 3000 + '"]'
        done, frames, stderr = self.run_worker(
            [], "--init", "break_init", "--init-args", long_reason, "--max-frame-size", "1024"
        )
        self.assertEqual(done.returncode, EXIT_STARTUP, stderr)
        self.assertEqual(frames[0]["type"], "startup_error")
        self.assertLessEqual(len(encode_frame(frames[0])), 1024 + 4)

    def test_a_session_command_in_both_profiles(self):
        for profile in ([], ["--threads", "1"]):  # one call thread: the info comes after the tally
            with self.subTest(profile=profile):
                messages = [
                    call("tally", [5], id=1, session="12", context={"user": "ann"}),
                    call("info", id=2),
                    {"type": "ping", "id": 3},
                    {"type": "shutdown"},
                ]
                done, frames, stderr = self.run_worker(messages, *profile)
                self.assertEqual(done.returncode, 0, stderr)
                replies = sorted(frames[1:], key=lambda f: f["id"])
                self.assertEqual(replies[0], {"type": "result", "id": 1, "value": [5, True, 1, {"user": "ann"}]})
                self.assertEqual(replies[1]["value"]["sessions"], 1)
                self.assertEqual(replies[2], {"type": "pong", "id": 3})

    def test_end_session_gets_no_reply_and_runs_the_hooks(self):
        # Process profile: in order, so the second tally sees the first and the end comes after.
        messages = [
            call("tally", [5], id=1, session="12"),
            call("tally", [2], id=2, session="12"),
            {"type": "end_session", "session": "12"},
            {"type": "end_session", "session": "unknown"},
            call("info", id=3),
            call("tally", [1], id=4, session="12"),
        ]
        done, frames, stderr = self.run_worker(messages)
        self.assertEqual(done.returncode, 0, stderr)
        self.assertEqual([f["type"] for f in frames], ["ready", "result", "result", "result", "result"])
        self.assertEqual([f["id"] for f in frames[1:]], [1, 2, 3, 4])
        self.assertEqual(frames[2]["value"], [7, False, 2, None])
        self.assertEqual(frames[3]["value"]["sessions"], 0)
        self.assertEqual(frames[4]["value"], [1, True, 1, None], "a new state after the end")
        self.assertIn("goodbye 12 total=7 calls=2", stderr)
        self.assertIn("ValueError: grumpy hook", stderr)
        self.assertIn("on_session_end hook sp_session_adapter.grumble failed for session '12'", stderr)

    def test_end_session_in_the_thread_profile(self):
        messages = [
            call("tally", [5], id=1, session="12"),
            {"type": "ping", "id": 2},
            {"type": "end_session", "session": "unknown"},
            call("echo", ["x"], id=3),
        ]
        done, frames, stderr = self.run_worker(messages, "--threads", "2")
        self.assertEqual(done.returncode, 0, stderr)
        replies = sorted(frames[1:], key=lambda f: f["id"])
        self.assertEqual(
            replies,
            [
                {"type": "result", "id": 1, "value": [5, True, 1, None]},
                {"type": "pong", "id": 2},
                {"type": "result", "id": 3, "value": ["x"]},
            ],
        )


if __name__ == "__main__":
    unittest.main()
