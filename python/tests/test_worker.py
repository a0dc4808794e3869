"""The worker: Worker logic in memory, the registry, the demo adapter, and real processes."""

import io
import math
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock

import snakepit
from snakepit import demo
from snakepit.protocol import ProtocolError, encode_frame, frame_bytes, read_frame, write_all
from snakepit.worker import BUILTIN_COMMANDS, Worker, _frame_writer, _parse_args, _reply_sender, load_worker
from tests._host import run_in_thread, split_frames

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 15  # seconds for any single wait on a child process


# --- commands used by the in-memory tests (passed to Worker directly) ----------


class CustomError(Exception):
    pass


def add(a, b=0):
    return a + b


def no_args():
    return "nothing"


def explode():
    raise ValueError("bad thing")


def custom():
    raise CustomError("custom trouble")


def make_set():
    return {1, 2}


def make_nan():
    return float("nan")


def make_big():
    return "x" * 1000


def leave():
    raise SystemExit(4)


TEST_COMMANDS = {f.__name__: f for f in (add, no_args, explode, custom, make_set, make_nan, make_big, leave)}


def exchange(worker, *messages):
    """Feed messages to worker.serve() and return the decoded replies."""
    sent = []
    worker.serve(io.BytesIO(b"".join(encode_frame(m) for m in messages)), sent.append)
    return [read_frame(io.BytesIO(frame_bytes(data))) for data in sent]


def call(command, args=None, id=1, **extra):
    msg = {"type": "call", "id": id, "command": command, **extra}
    if args is not None:
        msg["args"] = args
    return msg


class WorkerTests(unittest.TestCase):
    def setUp(self):
        self.worker = Worker(TEST_COMMANDS, adapter="tests.fake")

    def reply(self, msg):
        replies = exchange(self.worker, msg)
        self.assertEqual(len(replies), 1)
        return replies[0]

    def assertError(self, reply, id, kind, message_part):
        self.assertEqual(reply["type"], "error", reply)
        self.assertEqual(reply["id"], id)
        self.assertEqual(reply["error"]["type"], kind)
        self.assertIn(message_part, reply["error"]["message"])
        self.assertIsInstance(reply["error"]["traceback"], str)

    def test_call_with_kwargs(self):
        self.assertEqual(self.reply(call("add", {"a": 1, "b": 2}, id=7)), {"type": "result", "id": 7, "value": 3})

    def test_call_with_positional_args(self):
        self.assertEqual(self.reply(call("add", [40, 2]))["value"], 42)

    def test_call_without_args(self):
        self.assertEqual(self.reply(call("no_args"))["value"], "nothing")
        self.assertEqual(self.reply(call("no_args", args=None, id=2))["value"], "nothing")
        msg = {"type": "call", "id": 3, "command": "no_args", "args": None}
        self.assertEqual(self.reply(msg)["value"], "nothing")

    def test_bad_args_type(self):
        for args in (5, "a", True):
            with self.subTest(args=args):
                self.assertError(self.reply(call("add", args)), 1, "TypeError", "must be an object, an array or null")

    def test_wrong_arity_is_a_command_error(self):
        self.assertError(self.reply(call("add", [1, 2, 3])), 1, "TypeError", "add()")

    def test_unknown_command(self):
        reply = self.reply(call("nope", id=9))
        self.assertError(reply, 9, "UnknownCommand", "'nope'")
        for name in ("add", "echo", "info", "ping"):
            self.assertIn(name, reply["error"]["message"])

    def test_non_string_command(self):
        self.assertError(self.reply(call(["add"])), 1, "UnknownCommand", "unknown command")

    def test_exception_becomes_error_with_traceback(self):
        reply = self.reply(call("explode", id=5))
        self.assertError(reply, 5, "ValueError", "bad thing")
        tb = reply["error"]["traceback"]
        self.assertTrue(tb.startswith("Traceback (most recent call last):"), tb)
        self.assertIn("explode", tb)
        self.assertIn("ValueError: bad thing", tb)
        self.assertNotIn("_call", tb)  # the worker's own frame is left out

    def test_non_builtin_exception_type_is_qualified(self):
        self.assertError(self.reply(call("custom")), 1, f"{__name__}.CustomError", "custom trouble")

    def test_unserialisable_results_and_worker_continues(self):
        replies = exchange(
            self.worker,
            call("make_set", id=1),
            call("make_nan", id=2),
            call("add", [1, 1], id=3),
        )
        self.assertError(replies[0], 1, "TypeError", "result of command 'make_set' has a set at value: it is not JSON-serialisable")
        self.assertError(replies[1], 2, "ValueError", "result of command 'make_nan' has the float nan at value: JSON has no NaN or Infinity")
        self.assertEqual(replies[2], {"type": "result", "id": 3, "value": 2})

    def test_oversized_result(self):
        worker = Worker(TEST_COMMANDS, max_frame_size=200)
        replies = exchange(worker, call("make_big", id=4), call("no_args", id=5))
        self.assertError(replies[0], 4, "FrameTooLarge", "result of command 'make_big' is ")
        self.assertIn("maximum frame size of 200 bytes", replies[0]["error"]["message"])
        self.assertEqual(replies[1]["value"], "nothing")

    def test_system_exit_is_not_caught(self):
        with self.assertRaises(SystemExit):
            exchange(self.worker, call("leave"))

    def test_ping_message(self):
        self.assertEqual(self.reply({"type": "ping", "id": 3}), {"type": "pong", "id": 3})

    def test_shutdown_ends_serve(self):
        frames = [encode_frame(m) for m in ({"type": "ping", "id": 1}, {"type": "shutdown"}, {"type": "ping", "id": 2})]
        reader = io.BytesIO(b"".join(frames))
        sent = []
        self.worker.serve(reader, sent.append)
        self.assertEqual(sent, [encode_frame({"type": "pong", "id": 1})])
        self.assertEqual(reader.tell(), len(frames[0]) + len(frames[1]))  # the last ping was never read

    def test_eof_ends_serve(self):
        self.assertEqual(exchange(self.worker), [])

    def test_unknown_message_type_without_id_is_ignored(self):
        with self.assertLogs("snakepit.worker", "WARNING") as logs:
            replies = exchange(self.worker, {"type": "bogus"}, {"type": "ping", "id": 1})
        self.assertEqual(replies, [{"type": "pong", "id": 1}])
        self.assertIn("bogus", logs.output[0])

    def test_unknown_message_type_with_id_gets_error(self):
        self.assertError(self.reply({"type": "bogus", "id": 6}), 6, "ProtocolError", "'bogus'")

    def test_request_without_integer_id_is_a_protocol_error(self):
        from snakepit.protocol import ProtocolError

        for msg in ({"type": "call", "command": "add"}, {"type": "ping", "id": "3"}, {"type": "ping", "id": True}):
            with self.subTest(msg=msg), self.assertRaises(ProtocolError):
                exchange(self.worker, msg)

    def test_builtin_ping(self):
        self.assertEqual(self.reply(call("ping"))["value"], "pong")

    def test_builtin_echo(self):
        self.assertEqual(self.reply(call("echo", {"a": [1, {"b": None}]}))["value"], {"a": [1, {"b": None}]})
        self.assertEqual(self.reply(call("echo", [1, "two", 3.5]))["value"], [1, "two", 3.5])
        self.assertEqual(self.reply(call("echo"))["value"], {})

    def test_builtin_info(self):
        info = self.reply(call("info"))["value"]
        self.assertEqual(info["pid"], os.getpid())
        self.assertEqual(info["python_version"].split(".")[:2], [str(sys.version_info[0]), str(sys.version_info[1])])
        self.assertEqual(info["implementation"], sys.implementation.name)
        self.assertIsInstance(info["free_threaded"], bool)
        self.assertIsInstance(info["gil_enabled"], bool)
        self.assertTrue(info["rss_bytes"] is None or info["rss_bytes"] > 0)
        self.assertEqual(info["commands"], sorted(list(TEST_COMMANDS) + list(BUILTIN_COMMANDS)))
        self.assertEqual(info["adapter"], "tests.fake")

    def test_ready_info(self):
        info = self.worker.ready_info()
        self.assertEqual(info["protocol_version"], 4)
        self.assertEqual(info["commands"], sorted(info["commands"]))
        self.assertIs(info["cancel_signal"], False)  # only a process given --cancel-file has it
        self.assertIn("echo", info["commands"])
        self.assertIn("add", info["commands"])

    def test_builtin_names_cannot_be_replaced(self):
        with self.assertRaisesRegex(ValueError, "echo"):
            Worker({"echo": add})


class _Unlookable:
    """isinstance() on it raises: even the closer look at a result fails."""

    @property
    def __class__(self):
        raise RuntimeError("no class today")


def _deeply_nested(levels):
    value = []
    for _ in range(levels):
        value = [value]
    return value


_EXACT_VALUES = [
    {"x": 1},
    [1, "a", 2.5, None, True],
    {"min": -(2**63), "max_i64": 2**63 - 1, "max_u64": 2**64 - 1, "neg": [-1, -(2**63)]},
    {"é": "日本", "nested": [{"k": (1, 2)}, [], {}], "f": [1e300, -0.0, 5e-324]},
    [i / 3 for i in range(10000)],
    list(range(-(2**63), -(2**63) + 5000)) + [2**64 - 1 - i for i in range(5000)],
    [{"id": i, "name": f"n{i}", "tags": ["a", "b"], "score": i * 0.5} for i in range(500)],
]

FIDELITY_COMMANDS = {
    "int_keys": lambda: {"a": [0, 1, 2, {1: "x"}]},
    "colliding_keys": lambda: {1: "a", "1": "b"},
    "odd_key": lambda kind: {"k": {{"float": 2.5, "bool": True, "none": None}[kind]: "v"}},
    "tuple_key": lambda: [{(1, 2): "v"}],
    "number": lambda base, exp, add=0, sign=1: sign * base**exp + add,
    "in_records": lambda n: [{"id": i, "n": 2**64 + i if i == 70 else i} for i in range(100)],
    "nan_inside": lambda: {"xs": [0.5, float("nan")]},
    "inf_inside": lambda: [[float("-inf")]],
    "exact": lambda i: _EXACT_VALUES[i],
    "bad_key_deep": lambda: {"a": {"b": [{7: 0}]}},
    "unlookable": lambda: [_Unlookable()],
    "too_deep": lambda: _deeply_nested(100_000),
}


class ReplyFidelityTests(unittest.TestCase):
    """A result reaches the host as the value the command returned, or the call fails with an
    error that names the command and the place in the value: dict keys that are not strings
    and integers outside -2**63 .. 2**64-1, which json.dumps writes but the host cannot read
    back as they were, as well as NaN, Infinity and objects that are not JSON."""

    def setUp(self):
        self.worker = Worker(FIDELITY_COMMANDS)

    def error(self, command, args=None, id=1, worker=None):
        (reply,) = exchange(worker or self.worker, call(command, args, id=id))
        self.assertEqual(reply["type"], "error", reply)
        self.assertEqual(reply["id"], id)
        self.assertEqual(reply["error"]["traceback"], "")
        return reply["error"]

    def test_a_dict_key_that_is_not_a_str_names_the_command_the_key_and_the_place(self):
        error = self.error("int_keys")
        self.assertEqual(error["type"], "TypeError")
        self.assertEqual(
            error["message"],
            "result of command 'int_keys' has a dict key 1 (an int) at value[\"a\"][3]: JSON object keys must be strings",
        )

    def test_a_key_colliding_with_a_str_key_is_an_error_not_a_lost_entry(self):
        error = self.error("colliding_keys")
        self.assertEqual(error["type"], "TypeError")
        self.assertIn("result of command 'colliding_keys' has a dict key 1 (an int) at value:", error["message"])

    def test_float_bool_none_and_tuple_keys_are_refused(self):
        for kind, shown in (("float", "2.5 (a float)"), ("bool", "True (a bool)"), ("none", "None")):
            with self.subTest(kind=kind):
                error = self.error("odd_key", [kind])
                self.assertEqual(error["type"], "TypeError")
                self.assertIn(f"result of command 'odd_key' has a dict key {shown} at value[\"k\"]:", error["message"])
        error = self.error("tuple_key")  # json.dumps itself refuses this one; now it has a place too
        self.assertIn("has a dict key (1, 2) (a tuple) at value[0]:", error["message"])

    def test_integers_outside_the_hosts_range_name_the_command_the_number_and_the_place(self):
        cases = [
            ([2, 64, 1], "the integer 18446744073709551617"),
            ([2, 64], "the integer 18446744073709551616"),
            ([2, 63, -1, -1], "the integer -9223372036854775809"),
            ([10, 400], "an integer of 401 digits"),
        ]
        for args, shown in cases:
            with self.subTest(shown=shown):
                error = self.error("number", args)
                self.assertEqual(error["type"], "ValueError")
                self.assertIn(f"result of command 'number' has {shown} at value:", error["message"])
                self.assertIn("-2**63 to 2**64-1", error["message"])
        error = self.error("in_records", [100])
        self.assertIn('has the integer 18446744073709551686 at value[70]["n"]:', error["message"])

    def test_the_edges_of_the_range_are_sent_as_exact_integers(self):
        for args, number in (([2, 63, -1], 2**63 - 1), ([2, 63, 0, -1], -(2**63)), ([2, 64, -1], 2**64 - 1)):
            with self.subTest(number=number):
                data = self.worker.respond(call("number", args, id=5))
                self.assertEqual(data[4:], b'{"type":"result","id":5,"value":%d}' % number)

    def test_nan_and_infinity_name_the_command_and_the_place(self):
        error = self.error("nan_inside")
        self.assertEqual(error["type"], "ValueError")
        self.assertEqual(
            error["message"], "result of command 'nan_inside' has the float nan at value[\"xs\"][1]: JSON has no NaN or Infinity"
        )
        self.assertIn("has the float -inf at value[0][0]:", self.error("inf_inside")["message"])

    def test_valid_values_are_sent_byte_for_byte_as_json_dumps_writes_them(self):
        import json

        for i, value in enumerate(_EXACT_VALUES):
            with self.subTest(i=i):
                data = self.worker.respond(call("exact", [i], id=40 + i))
                reply = {"type": "result", "id": 40 + i, "value": value}
                self.assertEqual(data, encode_frame(reply))
                self.assertEqual(data[4:], json.dumps(reply, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode())

    def test_the_worker_goes_on_after_each_refusal(self):
        replies = exchange(
            self.worker,
            call("int_keys", id=1),
            call("number", [10, 400], id=2),
            call("nan_inside", id=3),
            call("exact", [0], id=4),
        )
        self.assertEqual([r["type"] for r in replies], ["error", "error", "error", "result"])
        self.assertEqual(replies[3]["value"], {"x": 1})

    def test_an_error_message_is_cut_to_fit_a_small_frame_limit(self):
        worker = Worker(FIDELITY_COMMANDS, max_frame_size=160)  # the value fits; the full error would not
        self.assertLess(len(encode_frame({"type": "result", "id": 9, "value": FIDELITY_COMMANDS["bad_key_deep"]()})), 100)
        data = worker.respond(call("bad_key_deep", id=9))
        self.assertLessEqual(len(data) - 4, 160)
        error = read_frame(io.BytesIO(data), 160)["error"]
        self.assertEqual(error["type"], "TypeError")
        self.assertTrue(error["message"].startswith("result of command 'bad_key_deep' has a dict key 7"), error)
        self.assertTrue(error["message"].endswith("..."), error)

    def test_when_the_closer_look_fails_the_encoders_message_stays(self):
        error = self.error("unlookable")  # json's default() trips over it too
        self.assertEqual(error["type"], "RuntimeError")
        self.assertEqual(error["message"], "result of command 'unlookable' is not JSON-serialisable: no class today")

    def test_a_result_nested_too_deep_for_the_encoder_is_still_an_error(self):
        error = self.error("too_deep")
        self.assertEqual(error["type"], "RecursionError")
        self.assertIn("result of command 'too_deep' is not JSON-serialisable: maximum recursion depth", error["message"])

    def test_the_thread_profile_sends_the_same_replies(self):
        messages = [call("int_keys", id=1), call("number", [2, 64, 1], id=2), call("exact", [2], id=3), call("nan_inside", id=4)]
        write = WriteRecorder()
        thread, outcome = serve_in_thread(self.worker, io.BytesIO(b"".join(encode_frame(m) for m in messages)), write, threads=2)
        thread.join(TIMEOUT)
        self.assertEqual(outcome, ["returned"])
        replies = {f["id"]: f for f in write.frames()}
        for msg in messages:
            self.assertEqual(replies[msg["id"]], read_frame(io.BytesIO(self.worker.respond(msg))))


class RegistryTests(unittest.TestCase):
    def forget(self, *names):
        for name in names:
            self.addCleanup(snakepit._registry.pop, name, None)
            self.addCleanup(snakepit._thread_safe.discard, name)

    def test_version(self):
        self.assertEqual(snakepit.__version__, "0.1.0")

    def test_bare_decorator(self):
        self.forget("t_bare")

        def t_bare():
            return 1

        self.assertIs(snakepit.command(t_bare), t_bare)
        self.assertIs(snakepit.registry()["t_bare"], t_bare)
        self.assertFalse(snakepit.is_thread_safe("t_bare"))

    def test_decorator_with_name_and_thread_safe(self):
        self.forget("t_other")

        @snakepit.command(name="t_other", thread_safe=True)
        def original():
            return 2

        self.assertIs(snakepit.registry()["t_other"], original)
        self.assertNotIn("original", snakepit.registry())
        self.assertTrue(snakepit.is_thread_safe("t_other"))

    def test_decorator_with_empty_parentheses(self):
        self.forget("t_parens")

        @snakepit.command()
        def t_parens():
            return 3

        self.assertIs(snakepit.registry()["t_parens"], t_parens)

    def test_duplicate_name_rejected_but_same_function_allowed(self):
        self.forget("t_dup")

        def t_dup():
            return 1

        snakepit.command(t_dup)
        snakepit.command(t_dup)
        with self.assertRaisesRegex(ValueError, "already registered"):
            snakepit.command(name="t_dup")(lambda: 2)

    def test_invalid_name(self):
        with self.assertRaises(ValueError):
            snakepit.command(name="")(add)

    def test_registry_is_a_copy(self):
        snakepit.registry()["t_injected"] = add
        self.assertNotIn("t_injected", snakepit.registry())


class LoadWorkerTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        sys.path.insert(0, self.tmp)
        self.addCleanup(shutil.rmtree, self.tmp)
        self.addCleanup(sys.path.remove, self.tmp)

    def module(self, name, source):
        with open(os.path.join(self.tmp, name + ".py"), "w", encoding="utf-8") as f:
            f.write(source)
        self.addCleanup(sys.modules.pop, name, None)

    def test_missing_module(self):
        worker, failure = load_worker("snakepit_no_such_adapter")
        self.assertIsNone(worker)
        self.assertEqual(failure["type"], "startup_error")
        self.assertEqual(failure["error"]["type"], "ModuleNotFoundError")
        self.assertIn("adapter 'snakepit_no_such_adapter' failed to import", failure["error"]["message"])
        self.assertTrue(failure["error"]["traceback"].startswith("Traceback"))

    def test_syntax_error(self):
        self.module("snakepit_bad_syntax", "def broken(:\n")
        _, failure = load_worker("snakepit_bad_syntax")
        self.assertEqual(failure["error"]["type"], "SyntaxError")
        self.assertIn("snakepit_bad_syntax", failure["error"]["message"])

    def test_exception_at_import(self):
        self.module("snakepit_raises", "def setup():\n    raise RuntimeError('no config')\nsetup()\n")
        _, failure = load_worker("snakepit_raises")
        self.assertEqual(failure["error"]["type"], "RuntimeError")
        self.assertIn("no config", failure["error"]["message"])
        self.assertIn("setup", failure["error"]["traceback"])

    def test_builtin_name_clash(self):
        self.addCleanup(snakepit._registry.pop, "echo", None)
        self.module("snakepit_clash", "import snakepit\n@snakepit.command\ndef echo(x):\n    return x\n")
        _, failure = load_worker("snakepit_clash")
        self.assertEqual(failure["error"]["type"], "ValueError")
        self.assertIn("'snakepit_clash'", failure["error"]["message"])
        self.assertIn("echo", failure["error"]["message"])

    def test_no_adapter_has_only_builtins(self):
        worker, failure = load_worker(None)
        self.assertIsNone(failure)
        self.assertEqual(worker.names, sorted(BUILTIN_COMMANDS))

    def test_demo_adapter(self):
        worker, failure = load_worker("snakepit.demo")
        self.assertIsNone(failure)
        for name in ("embed", "word_count", "fail", "slow", "upper"):
            self.assertIn(name, worker.names)


class DemoTests(unittest.TestCase):
    def setUp(self):
        commands = {name: f for name, f in snakepit.registry().items() if f.__module__ == "snakepit.demo"}
        self.assertEqual(sorted(commands), ["checksum", "embed", "fail", "scale", "slow", "upper", "word_count"])
        self.worker = Worker(commands)

    def value(self, command, args):
        reply = exchange(self.worker, call(command, args))[0]
        self.assertEqual(reply["type"], "result", reply)
        return reply["value"]

    def test_embed(self):
        vector = self.value("embed", {"text": "hello world"})
        self.assertEqual(len(vector), 8)
        self.assertAlmostEqual(math.sqrt(sum(x * x for x in vector)), 1.0)
        # crc32-based, so identical in every run (Python's hash() is salted per process).
        self.assertEqual([round(x, 6) for x in vector[:3]], [-0.33541, -0.167705, -0.447214])
        self.assertEqual(self.value("embed", ["Hello  WORLD"]), vector)
        self.assertNotEqual(self.value("embed", ["goodbye world"]), vector)
        self.assertEqual(self.value("embed", [""]), [0.0] * 8)

    def test_word_count(self):
        self.assertEqual(self.value("word_count", ["one two  three\nfour"]), 4)

    def test_upper(self):
        self.assertEqual(self.value("upper", {"text": "shout"}), "SHOUT")

    def test_checksum_of_bytes(self):
        import zlib

        checksum = snakepit.registry()["checksum"]
        self.assertEqual(checksum(b"\x00abc"), {"len": 4, "crc32": zlib.crc32(b"\x00abc")})
        with self.assertRaises(TypeError):
            checksum("text")

    def test_scale_without_numpy(self):
        import struct

        x = snakepit.Array("float64", (2,), struct.pack("<2d", 1.5, -2.0))
        y = snakepit.registry()["scale"](x, 2.0)
        self.assertEqual((y.dtype, y.shape, y.tolist()), ("float64", (2,), [3.0, -4.0]))
        with self.assertRaises(TypeError):
            snakepit.registry()["scale"](snakepit.Array("int32", (1,), b"\x01\x00\x00\x00"), 2.0)

    def test_slow(self):
        self.assertEqual(self.value("slow", [0.01]), 0.01)

    def test_fail(self):
        reply = exchange(self.worker, call("fail", {"message": "as planned"}))[0]
        self.assertEqual(reply["error"]["type"], "ValueError")
        self.assertEqual(reply["error"]["message"], "as planned")
        self.assertEqual(exchange(self.worker, call("fail"))[0]["error"]["type"], "ValueError")

    def test_text_type_checked(self):
        reply = exchange(self.worker, call("upper", [5]))[0]
        self.assertEqual(reply["error"]["type"], "TypeError")

    def test_demo_module_attributes(self):
        self.assertEqual(demo.EMBEDDING_DIM, 8)


# --- real processes ------------------------------------------------------------


class WorkerProcess:
    """A `python -m snakepit` child with a background thread reading its frames."""

    def __init__(self, *args, stdin=subprocess.PIPE):
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        env.pop("SNAKEPIT_LOG_LEVEL", None)
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snakepit", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=PYTHON_DIR,
            env=env,
        )
        self.frames = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        try:
            while True:
                msg = read_frame(self.proc.stdout)
                self.frames.put(msg)
                if msg is None:
                    return
        except Exception as exc:  # handed to recv() in the test thread
            self.frames.put(exc)

    def recv(self):
        """The next frame, None at EOF; fails the test after TIMEOUT seconds."""
        try:
            item = self.frames.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no frame from the worker within {TIMEOUT}s") from None
        if isinstance(item, Exception):
            raise item
        return item

    def send(self, msg):
        self.send_bytes(encode_frame(msg))

    def send_bytes(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def call(self, command, args=None, id=1):
        self.send(call(command, args, id=id))
        return self.recv()

    def wait(self):
        return self.proc.wait(timeout=TIMEOUT)

    def stderr_text(self):
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        self.reader.join(timeout=TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream is not None:
                stream.close()


class ProcessTests(unittest.TestCase):
    def start(self, *args, **kwargs):
        worker = WorkerProcess(*args, **kwargs)
        self.addCleanup(worker.close)
        return worker

    def test_demo_session(self):
        w = self.start("--adapter", "snakepit.demo", "--pool", "demo", "--worker-id", "1")
        ready = w.recv()
        self.assertEqual(ready["type"], "ready")
        info = ready["info"]
        self.assertEqual(info["pid"], w.proc.pid)
        self.assertEqual(info["protocol_version"], 4)
        self.assertEqual(info["implementation"], sys.implementation.name)
        self.assertIs(info["free_threaded"], False if sys.version_info < (3, 13) else info["free_threaded"])
        self.assertEqual(
            info["commands"], ["checksum", "echo", "embed", "fail", "info", "ping", "scale", "slow", "upper", "word_count"]
        )

        self.assertEqual(w.call("upper", {"text": "hi"}, id=7), {"type": "result", "id": 7, "value": "HI"})
        self.assertEqual(w.call("fail", {"message": "nope"}, id=8)["error"]["message"], "nope")
        w.send({"type": "ping", "id": 9})
        self.assertEqual(w.recv(), {"type": "pong", "id": 9})
        self.assertEqual(w.call("info", id=10)["value"]["adapter"], "snakepit.demo")

        w.send({"type": "shutdown"})
        self.assertIsNone(w.recv())
        self.assertEqual(w.wait(), 0)

    def test_eof_exits_zero(self):
        w = self.start()
        self.assertEqual(w.recv()["info"]["commands"], ["echo", "info", "ping"])
        w.proc.stdin.close()
        self.assertEqual(w.wait(), 0)

    def test_noise_does_not_corrupt_the_stream(self):
        w = self.start("--adapter", "tests.noisy_adapter")
        self.assertEqual(w.recv()["type"], "ready")
        self.assertEqual(w.call("shout", ["hello there"], id=1)["value"], "hello there")
        self.assertEqual(w.call("scribble", id=2)["value"], "ok")
        self.assertEqual(w.call("child_process", id=3)["value"], 0)  # the child read nothing from stdin
        self.assertEqual(w.call("echo", ["still fine"], id=4)["value"], ["still fine"])
        w.proc.stdin.close()
        self.assertEqual(w.wait(), 0)
        stderr = w.stderr_text()
        for text in ("noisy adapter imported", "hello there", "junk", "child says hi"):
            self.assertIn(text, stderr)

    def test_system_exit_from_command_ends_worker(self):
        w = self.start("--adapter", "tests.noisy_adapter")
        w.recv()
        w.send(call("quit_worker", [5]))
        self.assertIsNone(w.recv())
        self.assertEqual(w.wait(), 5)

    def test_system_exit_from_command_ends_a_thread_profile_worker(self):
        w = self.start("--adapter", "tests.noisy_adapter", "--threads", "2", "--allow-unsafe-threads")
        self.assertEqual(w.recv()["type"], "ready")
        self.assertEqual(w.call("echo", [1], id=1)["value"], [1])
        w.send(call("quit_worker", [5], id=2))
        self.assertIsNone(w.recv())
        self.assertEqual(w.wait(), 5)

    def test_bad_adapter(self):
        w = self.start("--adapter", "tests.no_such_adapter")
        msg = w.recv()
        self.assertEqual(msg["type"], "startup_error")
        self.assertEqual(msg["error"]["type"], "ModuleNotFoundError")
        self.assertIn("tests.no_such_adapter", msg["error"]["message"])
        self.assertTrue(msg["error"]["traceback"].startswith("Traceback"))
        self.assertEqual(w.wait(), 3)

    def test_oversized_frame_from_host_exits_2(self):
        w = self.start("--max-frame-size", "1024")
        w.recv()
        w.send_bytes(struct.pack(">I", 4096))
        self.assertEqual(w.wait(), 2)
        self.assertIn("4096", w.stderr_text())

    def test_unknown_argument_exits_2(self):
        w = self.start("--no-such-option")
        self.assertEqual(w.wait(), 2)
        self.assertIsNone(w.recv())

    def test_wrong_parent_pid_exits_at_once(self):
        w = self.start("--parent-pid", str(os.getpid() + 1_000_000))
        self.assertIsNone(w.recv())  # no ready frame
        self.assertEqual(w.wait(), 1)

    @unittest.skipUnless(sys.platform.startswith("linux"), "parent-death signal is Linux-only")
    def test_worker_dies_with_its_parent(self):
        # A middle process starts the worker, waits for its ready frame, reports
        # its pid and sleeps. The worker's stdin is our pipe, so it sees no EOF
        # when the middle process dies: only the parent-death handling ends it.
        middle_code = (
            "import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-m', 'snakepit', '--parent-pid', str(os.getpid())],"
            " stdout=subprocess.PIPE)\n"
            "p.stdout.read(4)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n"
        )
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        middle = subprocess.Popen(
            [sys.executable, "-c", middle_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=PYTHON_DIR, env=env
        )
        worker_pid = None
        try:
            line = _readline_with_timeout(middle.stdout)
            worker_pid = int(line)
            self.assertTrue(_alive(worker_pid))
            middle.kill()
            middle.wait(timeout=TIMEOUT)
            for _ in range(int(TIMEOUT / 0.05)):
                if not _alive(worker_pid):
                    break
                threading.Event().wait(0.05)
            self.assertFalse(_alive(worker_pid), "worker outlived its parent")
        finally:
            if worker_pid is not None and _alive(worker_pid):
                os.kill(worker_pid, signal.SIGKILL)
            if middle.poll() is None:
                middle.kill()
            middle.wait(timeout=TIMEOUT)
            middle.stdin.close()
            middle.stdout.close()


class CommandLineTests(unittest.TestCase):
    def test_options_with_and_without_equals(self):
        args = _parse_args(["--adapter", "m.x", "--pool=p1", "--parent-pid", "42", "--max-frame-size=2048"])
        self.assertEqual((args.adapter, args.pool, args.parent_pid, args.max_frame_size), ("m.x", "p1", 42, 2048))
        self.assertIsNone(args.worker_id)

    def test_adapter_args_follow_a_double_dash(self):
        args = _parse_args(["--pool", "p", "--", "--model", "small", "--pool"])
        self.assertEqual(args.pool, "p")
        self.assertEqual(args.adapter_args, ["--model", "small", "--pool"])

    def test_defaults(self):
        args = _parse_args([])
        self.assertEqual(args.adapter_args, [])
        self.assertIsNone(args.adapter)
        self.assertEqual(args.max_frame_size, 64 * 1024 * 1024)

    def test_bad_command_lines_exit_2(self):
        for argv in (["--nope"], ["--parent-pid", "x"], ["--max-frame-size", "0"], ["--adapter"], ["stray"]):
            with self.subTest(argv=argv), self.assertRaises(SystemExit) as cm:
                with _quiet_stderr():
                    _parse_args(argv)
            self.assertEqual(cm.exception.code, 2)

    def test_healthy_worker_does_not_import_logging(self):
        # logging costs ~5 ms per start; it is imported only when a message is emitted.
        code = "import sys, snakepit.worker as w; w.log.info('quiet'); print('logging' in sys.modules)"
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR, SNAKEPIT_LOG_LEVEL="WARNING")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(out.stdout.strip(), "False", out.stderr)
        env["SNAKEPIT_LOG_LEVEL"] = "DEBUG"
        code = "import sys, snakepit.worker as w; w.log.info('loud'); print('logging' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(out.stdout.strip(), "True", out.stderr)
        self.assertIn("loud", out.stderr)


class ThreadProfileTests(unittest.TestCase):
    def test_calls_run_at_once_and_replies_come_out_of_order(self):
        import time as _time

        def nap(seconds, tag):
            _time.sleep(seconds)
            return tag

        worker = Worker({"nap": nap})
        frames = b"".join(
            encode_frame({"type": "call", "id": i, "command": "nap", "args": {"seconds": d, "tag": i}}, 1 << 20)
            for i, d in ((1, 0.3), (2, 0.01), (3, 0.2))
        ) + encode_frame({"type": "ping", "id": 9}, 1 << 20)
        out = []
        lock = threading.Lock()

        def write(data):
            with lock:
                out.append(data)

        started = _time.monotonic()
        worker.serve_threaded(io.BytesIO(frames), write, threads=4)
        elapsed = _time.monotonic() - started
        replies = [read_frame(io.BytesIO(f), 1 << 20) for f in out]
        order = [r["id"] for r in replies]
        # The ping is answered by the reading loop at once; the short nap beats the long ones.
        self.assertEqual(order[0], 9)
        self.assertEqual(order[1:], [2, 3, 1])
        self.assertTrue(all(r["value"] == r["id"] for r in replies[1:]))
        self.assertLess(elapsed, 0.5, "the naps overlapped")

    def test_undeclared_commands_refuse_the_thread_profile(self):
        mod = "tests.thread_unsafe_adapter"
        path = os.path.join(PYTHON_DIR, "tests", "thread_unsafe_adapter.py")
        with open(path, "w") as f:
            f.write("import snakepit\n\n@snakepit.command\ndef risky():\n    return 1\n\n"
                    "@snakepit.command(thread_safe=True)\ndef fine():\n    return 2\n")
        try:
            worker, failure = load_worker(mod, threads=4)
            self.assertIsNone(worker)
            self.assertEqual(failure["error"]["type"], "ThreadSafetyError")
            self.assertIn("risky", failure["error"]["message"])
            self.assertNotIn("fine,", failure["error"]["message"])
            worker, failure = load_worker(mod, threads=4, allow_unsafe_threads=True)
            self.assertIsNone(failure)
            worker, failure = load_worker(mod)  # the process profile does not care
            self.assertIsNone(failure)
        finally:
            os.remove(path)
            sys.modules.pop(mod, None)
            for name in ("risky", "fine"):
                snakepit._registry.pop(name, None)


class WriteRecorder:
    """A ``write`` for serve_threaded that records each write and notices two at once."""

    def __init__(self, fd=None, delay=0.0):
        self.fd = fd
        self.delay = delay
        self.writes = []
        self.overlapped = False
        self.busy = threading.Lock()

    def __call__(self, data):
        if not self.busy.acquire(blocking=False):
            self.overlapped = True
            self.busy.acquire()  # the other write is quick
        try:
            if self.delay:
                threading.Event().wait(self.delay)  # a slow pipe: lets other threads finish meanwhile
            self.writes.append(frame_bytes(data))
            if self.fd is not None:
                write_all(self.fd, data)
        finally:
            self.busy.release()

    def frames(self):
        return split_frames(b"".join(self.writes))


def serve_in_thread(worker, reader, write, threads):
    """Run worker.serve_threaded on a thread; returns (thread, outcome: a list that gets
    "returned" or the exception)."""
    return run_in_thread(worker.serve_threaded, reader, write, threads)


class PipeServer:
    """Worker.serve_threaded on a thread, fed through a pipe as the host would, with a
    thread reading its replies. Commands: ``hold(tag)`` blocks until ``gate`` opens (at the
    latest at clean-up), telling ``started`` first; ``tag(x)`` returns x."""

    def __init__(self, test, threads, delay=0.0):
        self.gate = threading.Event()
        self.started = queue.Queue()

        def hold(tag):
            self.started.put(tag)
            if not self.gate.wait(TIMEOUT):
                raise RuntimeError("the gate never opened")
            return tag

        def tag(x):
            return x

        self.worker = Worker({"hold": hold, "tag": tag})
        rin, self.host_out = os.pipe()
        self.host_in, wout = os.pipe()
        self.wout = wout
        self.reader = os.fdopen(rin, "rb", buffering=65536)
        self.write = WriteRecorder(wout, delay)
        self.replies = queue.Queue()
        self.server, self.outcome = serve_in_thread(self.worker, self.reader, self.write, threads)
        self.receiver = threading.Thread(target=self._receive, daemon=True)
        self.receiver.start()
        test.addCleanup(self.close)

    def _receive(self):
        with os.fdopen(self.host_in, "rb") as stream:
            while True:
                try:
                    msg = read_frame(stream)
                except Exception as exc:
                    msg = exc
                self.replies.put(msg)
                if not isinstance(msg, dict):
                    return

    def send(self, *messages):
        write_all(self.host_out, b"".join(encode_frame(m) for m in messages))

    def recv(self, timeout=TIMEOUT):
        try:
            msg = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no reply within {timeout}s") from None
        if isinstance(msg, Exception):
            raise msg
        return msg

    def assertNothing(self, test, seconds=0.2):
        try:
            msg = self.replies.get(timeout=seconds)
        except queue.Empty:
            return
        test.fail(f"unexpected reply {msg!r}")

    def wait_started(self, n):
        return sorted(self.started.get(timeout=TIMEOUT) for _ in range(n))

    def end_input(self):
        if self.host_out is not None:
            os.close(self.host_out)
            self.host_out = None

    def finish(self):
        """EOF, then wait (bounded) for serve_threaded to return; its outcome."""
        self.end_input()
        self.server.join(TIMEOUT)
        if self.server.is_alive():
            raise AssertionError(f"serve_threaded did not return within {TIMEOUT}s")
        return self.outcome[0]

    def close(self):
        self.gate.set()
        self.end_input()
        self.server.join(TIMEOUT)
        if self.wout is not None and not self.server.is_alive():
            os.close(self.wout)  # the receiver sees EOF
            self.wout = None
            self.receiver.join(TIMEOUT)
        self.reader.close()


class ThreadedServeTests(unittest.TestCase):
    """Worker.serve_threaded: the thread profile's loop."""

    def test_many_concurrent_calls_are_each_answered_once(self):
        worker = Worker(TEST_COMMANDS)
        messages = []
        for i in range(1, 1501):
            messages.append(call("add", [i, 1000000], id=i))
            if i % 100 == 0:
                messages.append({"type": "ping", "id": -i})
        write = WriteRecorder(delay=0.0005)
        reader = io.BytesIO(b"".join(encode_frame(m) for m in messages))
        thread, outcome = serve_in_thread(worker, reader, write, threads=8)
        thread.join(TIMEOUT)
        self.assertEqual(outcome, ["returned"])
        self.assertFalse(write.overlapped, "two writes at once")
        frames = write.frames()  # fails unless every write holds whole frames
        results = {f["id"]: f["value"] for f in frames if f["type"] == "result"}
        self.assertEqual(len(frames), 1515)
        self.assertEqual(results, {i: i + 1000000 for i in range(1, 1501)})
        self.assertEqual(sorted(f["id"] for f in frames if f["type"] == "pong"), list(range(-1500, 0, 100)))
        # Replies that finish during a write go out together in the next one.
        self.assertLess(len(write.writes), len(frames))

    def test_replies_and_errors_as_in_respond(self):
        worker = Worker(TEST_COMMANDS, max_frame_size=200)
        messages = [
            call("make_set", id=1),
            call("make_big", id=2),
            call("explode", id=3),
            call("nope", id=4),
            {"type": "bogus", "id": 5},
            {"type": "bogus"},  # no id: ignored
            call("no_args", id=6),
            {"type": "ping", "id": 7},
        ]
        write = WriteRecorder()
        with self.assertLogs("snakepit.worker", "WARNING") as logs:
            reader = io.BytesIO(b"".join(encode_frame(m) for m in messages))
            thread, outcome = serve_in_thread(worker, reader, write, threads=3)
            thread.join(TIMEOUT)
        self.assertEqual(outcome, ["returned"])
        self.assertIn("bogus", logs.output[0])
        replies = {f["id"]: f for f in write.frames()}
        self.assertEqual(sorted(replies), [1, 2, 3, 4, 5, 6, 7])
        for msg in messages:
            if "id" in msg:
                self.assertEqual(replies[msg["id"]], read_frame(io.BytesIO(worker.respond(msg)), 200))

    def test_slow_call_does_not_delay_fast_ones(self):
        s = PipeServer(self, threads=2)
        s.send(call("hold", ["slow"], id=1))
        self.assertEqual(s.wait_started(1), ["slow"])
        s.send(*[call("tag", [i], id=100 + i) for i in range(50)])
        fast = [s.recv() for _ in range(50)]
        self.assertEqual(sorted(r["id"] for r in fast), list(range(100, 150)))
        self.assertTrue(all(r["value"] == r["id"] - 100 for r in fast))
        s.gate.set()
        self.assertEqual(s.recv(), {"type": "result", "id": 1, "value": "slow"})
        self.assertEqual(s.finish(), "returned")

    def test_pings_are_answered_while_every_thread_is_busy(self):
        s = PipeServer(self, threads=2)
        s.send(call("hold", ["a"], id=1), call("hold", ["b"], id=2))
        self.assertEqual(s.wait_started(2), ["a", "b"])
        s.send(call("tag", ["queued"], id=3), {"type": "ping", "id": 4})
        self.assertEqual(s.recv(), {"type": "pong", "id": 4})
        s.assertNothing(self)  # no third thread: the call waits for one of the two
        self.assertEqual(len([t for t in threading.enumerate() if t.name.startswith("snakepit-call")]), 2)
        s.gate.set()
        replies = sorted((s.recv() for _ in range(3)), key=lambda r: r["id"])
        self.assertEqual([r["value"] for r in replies], ["a", "b", "queued"])
        self.assertEqual(s.finish(), "returned")

    def test_end_of_input_waits_for_the_calls_taken(self):
        for end in ("eof", "shutdown"):
            with self.subTest(end=end):
                s = PipeServer(self, threads=3)
                s.send(call("hold", ["a"], id=1), call("hold", ["b"], id=2), call("tag", ["c"], id=3))
                self.assertEqual(s.wait_started(2), ["a", "b"])
                self.assertEqual(s.recv()["id"], 3)
                if end == "shutdown":
                    s.send({"type": "shutdown"}, call("tag", ["after"], id=4))
                else:
                    s.end_input()
                s.server.join(0.2)
                self.assertTrue(s.server.is_alive(), "returned before its calls finished")
                s.gate.set()
                self.assertEqual(s.finish(), "returned")
                # Every reply was written before serve_threaded returned.
                self.assertEqual(sorted(f["id"] for f in s.write.frames()), [1, 2, 3])
                self.assertFalse(any(t.name.startswith("snakepit-call") for t in threading.enumerate()))

    def test_threads_start_as_needed(self):
        s = PipeServer(self, threads=8)
        for i in range(30):  # one call at a time: busy at most is the thread finishing the last reply
            s.send(call("tag", [i], id=i))
            self.assertEqual(s.recv()["value"], i)
        self.assertLessEqual(len([t for t in threading.enumerate() if t.name.startswith("snakepit-call")]), 2)
        self.assertEqual(s.finish(), "returned")

    def test_protocol_error_after_finishing_the_calls_taken(self):
        s = PipeServer(self, threads=2)
        s.send(call("hold", ["a"], id=1))
        self.assertEqual(s.wait_started(1), ["a"])
        s.send({"type": "call", "id": "x", "command": "tag", "args": [1]})
        s.server.join(0.2)
        self.assertTrue(s.server.is_alive(), "returned before its call finished")
        s.gate.set()
        self.assertIsInstance(s.finish(), ProtocolError)
        self.assertEqual(s.recv(), {"type": "result", "id": 1, "value": "a"})

    def test_a_host_gone_does_not_stop_the_calls(self):
        worker = Worker(TEST_COMMANDS)

        def write(data):
            raise BrokenPipeError(32, "Broken pipe")

        frames = b"".join(encode_frame(call("add", [i], id=i)) for i in range(1, 101))
        thread, outcome = serve_in_thread(worker, io.BytesIO(frames), write, threads=4)
        thread.join(TIMEOUT)
        self.assertEqual(outcome, ["returned"])


class ReplySenderTests(unittest.TestCase):
    def test_frames_from_many_threads_are_written_whole_and_once(self):
        write = WriteRecorder(delay=0.001)
        send = _reply_sender(write)
        barrier = threading.Barrier(8, timeout=TIMEOUT)

        def sender(n):
            barrier.wait()
            for i in range(50):
                send(encode_frame({"type": "result", "id": n * 1000 + i, "value": "v" * i}))

        threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertFalse(any(t.is_alive() for t in threads))
        self.assertFalse(write.overlapped)
        frames = write.frames()
        self.assertEqual(sorted(f["id"] for f in frames), [n * 1000 + i for n in range(8) for i in range(50)])
        self.assertTrue(all(f["value"] == "v" * (f["id"] % 1000) for f in frames))
        self.assertLess(len(write.writes), 400, "frames left during a write go out together")

    def test_a_failed_write_raises_to_its_writer_and_later_ones_go_on(self):
        written = []

        def write(data):
            if data == b"bad":
                raise BrokenPipeError(32, "Broken pipe")
            written.append(data)

        send = _reply_sender(write)
        with self.assertRaises(BrokenPipeError):
            send(b"bad")
        send(b"good")
        self.assertEqual(written, [b"good"])


class ReplyKeyOrderTests(unittest.TestCase):
    """Replies start with "type" then "id": the host reads the id of a reply it cannot
    decode from the frame's first bytes, {"type":"result","id": or {"type":"error","id":."""

    def payload(self, worker, msg):
        data = worker.respond(msg)
        self.assertEqual(struct.unpack(">I", data[:4])[0], len(data) - 4)
        return data[4:]

    def test_result_reply(self):
        worker = Worker(TEST_COMMANDS)
        for msg in (call("add", {"b": 2, "a": 1}, id=21), call("echo", {"type": "x", "id": 0}, id=22)):
            with self.subTest(msg=msg):
                payload = self.payload(worker, msg)
                self.assertTrue(payload.startswith(b'{"type":"result","id":%d,' % msg["id"]), payload)

    def test_error_replies(self):
        worker = Worker(TEST_COMMANDS)
        messages = [
            call("explode", id=31),  # the command raised
            call("nope", id=32),  # unknown command
            call("add", 5, id=33),  # bad args
            {"type": "bogus", "id": 34},  # unknown message type
            call("make_set", id=35),  # result not JSON: replaced by an error reply
            call("make_nan", id=36),  # NaN: replaced too
        ]
        for msg in messages:
            with self.subTest(msg=msg):
                payload = self.payload(worker, msg)
                self.assertTrue(payload.startswith(b'{"type":"error","id":%d,' % msg["id"]), payload)

    def test_too_large_replacement_error_reply(self):
        worker = Worker(TEST_COMMANDS, max_frame_size=200)
        payload = self.payload(worker, call("make_big", id=41))
        self.assertTrue(payload.startswith(b'{"type":"error","id":41,'), payload)
        self.assertIn(b"FrameTooLarge", payload)


class FrameWriterTests(unittest.TestCase):
    def read_back(self, threaded, chunk=None):
        frames = [encode_frame({"type": "result", "id": i, "value": "v" * (i * 7)}) for i in range(1, 6)]
        r, w = os.pipe()
        try:
            write = _frame_writer(w, threaded)
            if chunk is None:
                for data in frames:
                    write(data)
            else:
                real_write = os.write
                calls = []

                def short_write(fd, data):  # a pipe that takes at most `chunk` bytes per write
                    calls.append(len(data))
                    return real_write(fd, bytes(data[:chunk]))

                with unittest.mock.patch("os.write", short_write):
                    write = _frame_writer(w, threaded)
                    for data in frames:
                        write(data)
                self.assertGreater(len(calls), len(frames))
            os.close(w)
            w = None
            with os.fdopen(r, "rb") as reader:
                r = None
                self.assertEqual(reader.read(), b"".join(frames))
        finally:
            for fd in (r, w):
                if fd is not None:
                    os.close(fd)

    def test_whole_frames_with_and_without_lock(self):
        for threaded in (False, True):
            with self.subTest(threaded=threaded):
                self.read_back(threaded)

    def test_short_writes_are_finished(self):
        for threaded in (False, True):
            with self.subTest(threaded=threaded):
                self.read_back(threaded, chunk=5)


# A stand-in for the worker's bootstrap (`from snakepit.worker import main; sys.exit(main(...))`)
# that leaves evidence of how the process ended in SNAKEPIT_TEST_MARKS: "atexit" from an atexit
# handler, "thread" from a non-daemon thread still running when the worker stops, and
# "teardown" from an object's __del__, which only the interpreter's full teardown runs.
_FAST_EXIT_SCRIPT = """
import atexit, os, sys, threading, time

def note(name, _open=open, _join=os.path.join, _marks=os.environ["SNAKEPIT_TEST_MARKS"]):
    with _open(_join(_marks, name), "w") as f:
        f.write(name)

def at_exit():
    note("atexit")
    sys.stdout.write("atexit-unflushed")  # stderr by now; flushed only if someone flushes it
    sys.__stdout__.write("dunder-unflushed")

class Teardown:
    def __del__(self, note=note):
        note("teardown")

keep = Teardown()
atexit.register(at_exit)
threading.Thread(target=lambda: (time.sleep(0.2), note("thread"))).start()

from snakepit.worker import main
if os.environ.get("SNAKEPIT_TEST_EXIT_FAST") == "0":
    sys.exit(main(sys.argv[1:], exit_fast=False))
sys.exit(main(sys.argv[1:]))
"""


class FastExitTests(unittest.TestCase):
    """A worker that stops serving runs its atexit handlers and ends with os._exit."""

    def run_worker(self, stdin, *args, exit_fast=True):
        marks = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, marks)
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR, SNAKEPIT_TEST_MARKS=marks)
        env.pop("SNAKEPIT_LOG_LEVEL", None)
        if not exit_fast:
            env["SNAKEPIT_TEST_EXIT_FAST"] = "0"
        done = subprocess.run(
            [sys.executable, "-c", _FAST_EXIT_SCRIPT, *args],
            input=stdin,
            capture_output=True,
            cwd=PYTHON_DIR,
            env=env,
            timeout=TIMEOUT,
        )
        frames = []
        stream = io.BytesIO(done.stdout)
        while (msg := read_frame(stream)) is not None:
            frames.append(msg)
        return done, frames, sorted(os.listdir(marks))

    def assertFastExit(self, done, marks, code=0):
        stderr = done.stderr.decode("utf-8", "replace")
        self.assertEqual(done.returncode, code, stderr)
        self.assertEqual(marks, ["atexit", "thread"], "no teardown, but atexit handlers and threads finished")
        self.assertIn("atexit-unflushed", stderr)
        self.assertIn("dunder-unflushed", stderr)

    def test_eof(self):
        done, frames, marks = self.run_worker(b"")
        self.assertFastExit(done, marks)
        self.assertEqual([f["type"] for f in frames], ["ready"])

    def test_shutdown(self):
        stdin = b"".join(encode_frame(m) for m in (call("echo", [1]), {"type": "shutdown"}, call("echo", [2], id=2)))
        done, frames, marks = self.run_worker(stdin)
        self.assertFastExit(done, marks)
        self.assertEqual(frames[1:], [{"type": "result", "id": 1, "value": [1]}])  # the call after shutdown: unread

    def test_protocol_violation_keeps_its_exit_code(self):
        done, _, marks = self.run_worker(struct.pack(">I", 4096), "--max-frame-size", "1024")
        self.assertFastExit(done, marks, code=2)
        self.assertIn("4096", done.stderr.decode("utf-8", "replace"))

    def test_thread_profile_finishes_the_calls_taken_first(self):
        stdin = b"".join(
            encode_frame(m) for m in (call("slow", [0.3], id=1), call("slow", [0.1], id=2), {"type": "shutdown"})
        )
        done, frames, marks = self.run_worker(stdin, "--adapter", "snakepit.demo", "--threads", "2")
        self.assertFastExit(done, marks)
        replies = sorted(frames[1:], key=lambda f: f["id"])  # in the order they finished
        self.assertEqual(replies, [{"type": "result", "id": 1, "value": 0.3}, {"type": "result", "id": 2, "value": 0.1}])

    def test_without_exit_fast_the_interpreter_tears_down(self):
        # The control: proves the "teardown" mark does show a full teardown.
        done, frames, marks = self.run_worker(b"", exit_fast=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(marks, ["atexit", "teardown", "thread"])
        self.assertEqual([f["type"] for f in frames], ["ready"])

    def test_startup_failure_returns_normally(self):
        done, frames, marks = self.run_worker(b"", "--adapter", "tests.no_such_adapter")
        self.assertEqual(done.returncode, 3, done.stderr)
        self.assertEqual(frames[0]["type"], "startup_error")
        self.assertIn("teardown", marks)


class _quiet_stderr:
    def __enter__(self):
        self.saved, sys.stderr = sys.stderr, io.StringIO()

    def __exit__(self, *exc):
        sys.stderr = self.saved


def _readline_with_timeout(stream):
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=TIMEOUT)
    except queue.Empty:
        raise AssertionError("the middle process did not report the worker's pid") from None


def _alive(pid):
    """Whether pid runs (Linux; a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")



# A stand-in for a worker under its keeper: the worker (the keeper's child) starts a child
# process and a daemon (double fork, setsid), prints their pids, then ends as argv[1] says.
_KEEPER_SCRIPT = r"""
import os, signal, subprocess, sys, time
from snakepit import _keeper
if not _keeper.split(os.getppid()):
    sys.exit("no keeper")
child = subprocess.Popen(["sleep", "60"])
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        time.sleep(60)
    os._exit(0)
daemon = int(os.read(r, 32))
print(os.getpid(), child.pid, daemon, flush=True)
how = sys.argv[1]
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
elif how == "exit":
    os._exit(7)
else:  # wait for the keeper's KILL_SIGNAL
    time.sleep(60)
"""


@unittest.skipUnless(sys.platform.startswith("linux"), "subreapers and /proc")
class KeeperTests(unittest.TestCase):
    """The keeper takes everything below the worker down with it, and exits as it did."""

    def run_keeper(self, how):
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        proc = subprocess.Popen(
            [sys.executable, "-c", _KEEPER_SCRIPT, how],
            stdout=subprocess.PIPE,
            text=True,
            cwd=PYTHON_DIR,
            env=env,
            start_new_session=True,
        )
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            self.assertEqual(len(pids), 3, "worker, child and daemon")
            if how == "ask":
                from snakepit import _keeper

                os.kill(proc.pid, _keeper.KILL_SIGNAL)
            code = proc.wait(timeout=TIMEOUT)
            end = time.monotonic() + 3
            while time.monotonic() < end and any(_alive(p) for p in pids):
                time.sleep(0.02)
            left = [p for p in pids if _alive(p)]
            for p in left:
                os.kill(p, signal.SIGKILL)
            self.assertEqual(left, [], "processes outlived the worker")
            return code
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            proc.stdout.close()

    def test_the_worker_killed_with_sigkill(self):
        self.assertEqual(self.run_keeper("kill"), -signal.SIGKILL, "the keeper ends by the same signal")

    def test_the_worker_exiting(self):
        self.assertEqual(self.run_keeper("exit"), 7, "the keeper exits with the worker's code")

    def test_the_host_asking_for_a_kill(self):
        self.assertEqual(self.run_keeper("ask"), -signal.SIGKILL)


if __name__ == "__main__":
    unittest.main()
