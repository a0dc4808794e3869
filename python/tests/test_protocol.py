"""Framing: snakepit.protocol against in-memory streams."""

import io
import json
import os
import struct
import unittest

from snakepit import protocol
from snakepit.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameTooLarge,
    ProtocolError,
    encode_frame,
    read_frame,
    write_frame,
)


def raw_frame(payload):
    """A frame around arbitrary payload bytes."""
    return struct.pack(">I", len(payload)) + payload


class OneByteReader:
    """A stream whose read() returns at most one byte, like a slow pipe."""

    def __init__(self, data):
        self._data = io.BytesIO(data)
        self.reads = 0

    def read(self, n=-1):
        self.reads += 1
        return self._data.read(min(n, 1) if n >= 0 else 1)


class TrackingReader(io.BytesIO):
    """Records the sizes passed to read()."""

    def __init__(self, data):
        super().__init__(data)
        self.requested = []

    def read(self, n=-1):
        self.requested.append(n)
        return super().read(n)


class ReadFrameTests(unittest.TestCase):
    def test_constants(self):
        self.assertEqual(PROTOCOL_VERSION, 4)
        self.assertEqual(DEFAULT_MAX_FRAME, 64 * 1024 * 1024)

    def test_round_trip(self):
        messages = [
            {"type": "call", "id": 7, "command": "add", "args": {"a": 1, "b": 2}},
            {"type": "result", "id": 7, "value": ["ünïcödé", "日本", 1.5, None, True]},
            {"type": "shutdown"},
        ]
        stream = io.BytesIO(b"".join(encode_frame(m) for m in messages))
        for expected in messages:
            self.assertEqual(read_frame(stream), expected)
        self.assertIsNone(read_frame(stream))

    def test_encoding_is_compact_utf8_with_big_endian_length(self):
        data = encode_frame({"type": "x", "text": "é"})
        payload = '{"type":"x","text":"é"}'.encode("utf-8")
        self.assertEqual(data, struct.pack(">I", len(payload)) + payload)

    def test_clean_eof_returns_none(self):
        self.assertIsNone(read_frame(io.BytesIO(b"")))

    def test_truncated_header(self):
        with self.assertRaisesRegex(ProtocolError, "truncated frame header"):
            read_frame(io.BytesIO(b"\x00\x00"))

    def test_truncated_body(self):
        data = encode_frame({"type": "ping", "id": 1})
        with self.assertRaisesRegex(ProtocolError, "truncated frame body"):
            read_frame(io.BytesIO(data[:-3]))

    def test_oversized_length_rejected_before_reading_body(self):
        stream = TrackingReader(struct.pack(">I", 2**31 - 1))  # the top bit would mean attachments
        with self.assertRaises(FrameTooLarge) as ctx:
            read_frame(stream)
        self.assertIsInstance(ctx.exception, ProtocolError)
        self.assertEqual((ctx.exception.size, ctx.exception.limit), (2**31 - 1, DEFAULT_MAX_FRAME))
        self.assertEqual(stream.requested, [4])  # only the header was asked for

    def test_two_reads_per_frame(self):
        frames = [encode_frame({"type": "call", "id": i, "command": "echo", "args": [i]}) for i in range(3)]
        stream = TrackingReader(b"".join(frames))
        for i in range(3):
            self.assertEqual(read_frame(stream)["id"], i)
        self.assertIsNone(read_frame(stream))
        self.assertEqual(stream.requested, [n for f in frames for n in (4, len(f) - 4)] + [4])

    def test_length_at_limit_is_accepted(self):
        data = encode_frame({"type": "x"})
        self.assertEqual(read_frame(io.BytesIO(data), max_size=len(data) - 4), {"type": "x"})
        with self.assertRaises(FrameTooLarge):
            read_frame(io.BytesIO(data), max_size=len(data) - 5)

    def test_invalid_utf8(self):
        with self.assertRaisesRegex(ProtocolError, "UTF-8"):
            read_frame(io.BytesIO(raw_frame(b'{"type":"\xff"}')))

    def test_invalid_json(self):
        with self.assertRaisesRegex(ProtocolError, "JSON"):
            read_frame(io.BytesIO(raw_frame(b'{"type":')))

    def test_empty_payload(self):
        with self.assertRaises(ProtocolError):
            read_frame(io.BytesIO(raw_frame(b"")))

    def test_non_object_json(self):
        for payload in (b"[1,2]", b'"call"', b"42", b"null"):
            with self.subTest(payload=payload), self.assertRaisesRegex(ProtocolError, "not an object"):
                read_frame(io.BytesIO(raw_frame(payload)))

    def test_missing_or_non_string_type(self):
        for payload in (b"{}", b'{"id":1}', b'{"type":1}', b'{"type":null}'):
            with self.subTest(payload=payload), self.assertRaisesRegex(ProtocolError, "'type'"):
                read_frame(io.BytesIO(raw_frame(payload)))

    def test_frame_split_over_one_byte_reads(self):
        messages = [{"type": "call", "id": i, "command": "echo", "args": ["x" * i]} for i in range(3)]
        stream = OneByteReader(b"".join(encode_frame(m) for m in messages))
        for expected in messages:
            self.assertEqual(read_frame(stream), expected)
        self.assertIsNone(read_frame(stream))
        self.assertGreater(stream.reads, 50)

    def test_truncated_body_over_one_byte_reads(self):
        with self.assertRaises(ProtocolError):
            read_frame(OneByteReader(encode_frame({"type": "ping", "id": 1})[:-1]))


class EncodeFrameTests(unittest.TestCase):
    def test_nan_and_infinity_rejected(self):
        for value in (float("nan"), float("inf"), float("-inf")):
            with self.subTest(value=value), self.assertRaises(ValueError):
                encode_frame({"type": "result", "id": 1, "value": value})

    def test_unserialisable_rejected(self):
        with self.assertRaises(TypeError):
            encode_frame({"type": "result", "id": 1, "value": {1, 2}})

    def test_oversize_rejected(self):
        msg = {"type": "result", "id": 1, "value": "x" * 100}
        size = len(json.dumps(msg, separators=(",", ":")))
        with self.assertRaises(FrameTooLarge) as ctx:
            encode_frame(msg, max_size=size - 1)
        self.assertIsInstance(ctx.exception, ProtocolError)
        self.assertEqual((ctx.exception.size, ctx.exception.limit), (size, size - 1))
        self.assertEqual(len(encode_frame(msg, max_size=size)), size + 4)

    def test_write_frame_to_stream_and_fd(self):
        msg = {"type": "pong", "id": 3}
        stream = io.BytesIO()
        write_frame(stream, msg)
        self.assertEqual(stream.getvalue(), encode_frame(msg))

        r, w = os.pipe()
        try:
            write_frame(w, msg)
            os.close(w)
            w = None
            with os.fdopen(r, "rb") as reader:
                r = None
                self.assertEqual(read_frame(reader), msg)
        finally:
            for fd in (r, w):
                if fd is not None:
                    os.close(fd)


def _dumps(obj):
    """What encode_frame's payload has always been."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def _outcome(func, value):
    try:
        return "ok", func(value)
    except Exception as exc:
        return type(exc).__name__, str(exc)


class _Dict(dict):
    pass


class _Int(int):
    pass


class _Float(float):
    pass


class _Str(str):
    pass


class JsonEquivalenceTests(unittest.TestCase):
    """The pre-bound encoder and decoder give json.dumps/json.loads' results and errors."""

    def test_encoder_matches_json_dumps(self):
        circular = []
        circular.append(circular)
        self_ref = {}
        self_ref["me"] = self_ref
        deep = []
        inner = deep
        for _ in range(100_000):
            inner.append([])
            inner = inner[0]
        values = [
            {"type": "result", "id": 1, "value": ["ünïcödé", "日本", "\u2028\x00\"\\", 1.5, -0.0, 1e300, 10**30, None, True]},
            {"a": float("nan")},
            {"a": float("inf")},
            {"a": [float("-inf")]},
            {"a": {1, 2}},
            {"a": object()},
            {"a": circular},
            self_ref,
            {"a": deep},
            {1: "int", 2.5: "float", None: "none", False: "bool"},
            {(1,): "tuple key"},
            {"a": "\ud800"},  # the encoder passes a lone surrogate; UTF-8 encoding refuses it
            _Dict(a=1),
            {"a": _Dict(b=[_Int(3), _Float(1.5), _Str("s")])},
            "top-level string",
            [1, 2],
            7,
            None,
        ]
        for i, value in enumerate(values):
            with self.subTest(i=i, kind=type(value).__name__):
                self.assertEqual(_outcome(protocol._encode, value), _outcome(_dumps, value))
                expected = _outcome(lambda v: _dumps(v).encode("utf-8"), value)
                got = _outcome(lambda v: encode_frame(v)[4:], value)
                self.assertEqual(got, expected)

    def test_fast_encoder_in_use_where_json_has_its_c_encoder(self):
        import json.encoder
        import types

        if json.encoder.c_make_encoder is None:
            self.skipTest("this Python's json has no C encoder")
        self.assertNotIsInstance(protocol._encode, types.MethodType)  # not the JSONEncoder.encode fallback

    def test_decoder_matches_json_loads(self):
        texts = [
            '{"type":"call","id":1,"command":"echo","args":[1,"x",{"k":null}]}',
            ' {"type":"ping","id":2}',
            '{"type":"ping","id":2} \n',
            '\ufeff{"type":"ping"}',
            '{"type":"ping"} {"type":"ping"}',
            '{"type":"ping",}',
            '{"type":',
            '{"a":NaN,"b":Infinity,"c":-Infinity,"d":1e400,"e":12345678901234567890}',
            '{"a":1,"a":2}',
            '{"s":"\\ud800\\n\\u00e9"}',
            "[1,2]",
            "42",
            "",
            " ",
            "[" * 100_000 + "]" * 100_000,
        ]
        for text in texts:
            with self.subTest(text=text[:40]):
                got, expected = _outcome(protocol._decode, text), _outcome(json.loads, text)
                if got[0] == "ok" and isinstance(got[1], dict) and "a" in got[1] and got[1]["a"] != got[1]["a"]:
                    self.assertEqual(repr(got), repr(expected))  # NaN != NaN
                else:
                    self.assertEqual(got, expected)


class _IntKind(int):
    pass


def _nested(value, levels):
    for _ in range(levels):
        value = [value]
    return value


def _records(n, extra=None, at=None):
    rows = [{"id": i, "name": f"n{i}", "score": i / 7, "ok": i % 2 == 0, "tags": ["a", str(i)], "none": None} for i in range(n)]
    if extra is not None:
        rows[at].update(extra)
    return rows


_VALID = [
    None,
    True,
    "text",
    1.5,
    0,
    protocol.INT_MIN,
    protocol.INT_MAX,
    2**63,  # above i64, within u64
    {},
    [],
    (),
    {"x": 1},
    [1, "a", 2.5, None, True, -(2**63), 2**64 - 1],
    {"a": 1, "b": "two", "c": [1, 2, {"d": (3, 4)}]},
    list(range(-5000, 5000)),
    [2**64 - 1 - i for i in range(100)],  # beyond i64: array("q") refuses them, all within u64
    [i / 3 for i in range(1000)],
    [str(i) for i in range(1000)],
    [True, False] * 100,
    [None] * 100,
    [1, 2.5, "x", None, True] * 50,  # one bag of mixed types
    {f"k{i}": i for i in range(100)},  # a dict too large to check key by key
    {f"k{i}": [i, {"v": i}] for i in range(100)},
    _records(200),
    _records(200) + [{"other": 1}],  # dicts of unequal sizes
    [[i, i + 1] for i in range(500)],
    [(i, str(i)) for i in range(500)],
    [[], {}, (), [[]]] * 20,
    _nested([1, {"k": 2**64 - 1}], 500),
    {"data": "x" * 100000},
    {_Str("sub"): _Float(0.5), "s": [_Str("t")] * 50},  # str and float subclasses are written as themselves
]


class ExactnessTests(unittest.TestCase):
    """reaches_host_exactly (cheap) and describe_problem (exact): what json.dumps writes but the
    host would not read back as it was, wherever it sits in a value."""

    def assertProblem(self, value, kind, *parts):
        if _outcome(lambda v: _dumps(v).encode("utf-8"), value)[0] == "ok":  # what encode_frame takes
            self.assertFalse(protocol.reaches_host_exactly(value))
        problem = protocol.describe_problem(value)
        self.assertIsNotNone(problem)
        self.assertEqual(problem[0], kind, problem)
        for part in parts:
            self.assertIn(part, problem[1])
        return problem[1]

    def test_valid_values_pass_both_checks(self):
        for i, value in enumerate(_VALID):
            with self.subTest(i=i, value=repr(value)[:60]):
                self.assertTrue(protocol.reaches_host_exactly(value))
                self.assertIsNone(protocol.describe_problem(value))

    def test_message_names_the_key_its_type_and_the_place(self):
        text = self.assertProblem({"a": [0, 1, 2, {1: "x"}]}, "TypeError")
        self.assertEqual(text, 'has a dict key 1 (an int) at value["a"][3]: JSON object keys must be strings')

    def test_every_key_that_is_not_a_str_is_refused_even_without_a_collision(self):
        for key, note in ((1, "1 (an int)"), (2.5, "2.5 (a float)"), (True, "True (a bool)"), (None, "None"), ((1, 2), "(1, 2) (a tuple)")):
            with self.subTest(key=key):
                self.assertProblem({key: "v"}, "TypeError", f"has a dict key {note} at value:", "must be strings")

    def test_a_key_that_collides_with_a_str_key_is_refused(self):
        self.assertProblem({1: "a", "1": "b"}, "TypeError", "dict key 1 (an int) at value:")
        self.assertEqual(json.loads(_dumps({1: "a", "1": "b"})), {"1": "b"})  # what json.dumps would send

    def test_integers_outside_the_hosts_range_are_refused(self):
        cases = [
            (2**64, "the integer 18446744073709551616"),
            (2**64 + 1, "the integer 18446744073709551617"),
            (-(2**63) - 1, "the integer -9223372036854775809"),
            (10**400, "an integer of 401 digits"),
            (-(10**400), "a negative integer of 401 digits"),
            (10**399, "an integer of 400 digits"),
            (_IntKind(2**70), "the integer 1180591620717411303424"),
        ]
        for number, described in cases:
            with self.subTest(number=described):
                self.assertProblem(number, "ValueError", f"has {described} at value:", "-2**63 to 2**64-1")

    def test_the_edges_of_the_range_pass(self):
        for number in (protocol.INT_MIN, protocol.INT_MIN + 1, -1, 0, 2**63 - 1, 2**63, protocol.INT_MAX):
            with self.subTest(number=number):
                for value in (number, [number], [number] * 40, {"n": number}, _records(40, {"id": number}, 39)):
                    self.assertTrue(protocol.reaches_host_exactly(value))
                    self.assertIsNone(protocol.describe_problem(value))

    def test_problems_are_found_wherever_they_are(self):
        """Small containers are checked item by item and large ones in bags: a bad key or a bad
        integer is caught in each shape, and the place is exact."""
        big = 2**64
        shapes = [
            (lambda bad: [bad], "value[0]"),
            (lambda bad: [0] * 40 + [bad], "value[40]"),  # an int bag that array("q") refuses
            (lambda bad: [0.5] * 40 + [bad], "value[40]"),  # a float bag with one int: a mixed bag
            (lambda bad: ["s"] * 40 + [bad], "value[40]"),
            (lambda bad: {**{f"k{i}": i for i in range(40)}, "bad": bad}, 'value["bad"]'),
            (lambda bad: _records(100, {"id": bad}, 70), 'value[70]["id"]'),  # a column of records
            (lambda bad: _records(100, {"tags": ["a", bad]}, 70), 'value[70]["tags"][1]'),
            (lambda bad: _records(100, {"more": bad}, 70), 'value[70]["more"]'),  # unequal sizes
            (lambda bad: [[i, i] for i in range(50)] + [[1, bad]], "value[50][1]"),
            (lambda bad: _nested([1, bad], 6), "value" + "[0]" * 6 + "[1]"),
            (lambda bad: [(1, "x")] * 40 + [(bad,)], "value[40][0]"),
        ]
        for make, place in shapes:
            with self.subTest(place=place, problem="integer"):
                self.assertProblem(make(big), "ValueError", "has the integer 18446744073709551616")
                self.assertIn(f" at {place}: ", protocol.describe_problem(make(big))[1])
            with self.subTest(place=place, problem="key"):
                self.assertProblem(make({7: "x"}), "TypeError", "dict key 7 (an int)")
                self.assertProblem(make([{"a": 1}] * 40 + [{7: "x"}]), "TypeError", "dict key 7 (an int)")

    def test_a_bad_key_among_many_dicts_is_caught(self):
        rows = _records(500)
        rows[321] = {**rows[321], 5: "five"}
        self.assertProblem(rows, "TypeError", "dict key 5 (an int) at value[321]:")
        rows = _records(500)
        rows[321] = {("a",): 1, **rows[321]}
        self.assertProblem(rows, "TypeError", "dict key ('a',) (a tuple) at value[321]:")
        mixed = [{"a": 1}, {"a": 1, "b": 2}] * 30 + [{None: 1}]
        self.assertProblem(mixed, "TypeError", "dict key None at value[60]:")

    def test_nan_and_infinity_are_named_with_their_place(self):
        for number, shown in ((float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")):
            with self.subTest(number=shown):
                self.assertProblem({"xs": [0.5, number]}, "ValueError", f'has the float {shown} at value["xs"][1]:', "NaN or Infinity")

    def test_objects_that_are_not_json_are_named_with_their_place(self):
        for obj, shown in (({1, 2}, "a set"), (object(), "an object"), (range(2), "a range"), (1j, "a complex")):
            with self.subTest(shown=shown):
                self.assertProblem({"a": [obj]}, "TypeError", f'has {shown} at value["a"][0]:', "not JSON-serialisable")

    def test_cycles_are_named_and_shared_references_are_not_cycles(self):
        loop = {"a": []}
        loop["a"].append(loop)
        self.assertProblem(loop, "ValueError", 'has a circular reference at value["a"][0]:')
        shared = [1, {"k": 2}]
        self.assertIsNone(protocol.describe_problem([shared, shared, {"s": shared}]))

    def test_lone_surrogates_are_named_with_their_place(self):
        self.assertProblem(["ok", "bad \udcff"], "UnicodeEncodeError", "a string with a lone surrogate", "at value[1]:")
        self.assertProblem({"k": {"\ud800": 1}}, "UnicodeEncodeError", "a dict key with a lone surrogate", 'at value["k"]:')

    def test_the_first_problem_in_the_order_json_writes_is_the_one_named(self):
        self.assertProblem({"a": float("nan"), "b": {1: 2}}, "ValueError", 'at value["a"]')
        self.assertProblem({"b": {1: 2}, "a": float("nan")}, "TypeError", 'at value["b"]')
        self.assertProblem([2**64, {1: 2}], "ValueError", "at value[0]")

    def test_places_quote_keys_as_json_and_shorten_deep_paths(self):
        text = self.assertProblem({'qu"ote': {"日本": [{1: 0}]}}, "TypeError")
        self.assertIn('at value["qu\\"ote"]["日本"][0]:', text)
        text = self.assertProblem(_nested({1: 0}, 100), "TypeError")
        self.assertIn("more levels", text)
        self.assertLess(len(text), 300)

    def test_subclasses_are_left_to_the_exact_check(self):
        from collections import OrderedDict

        self.assertIsNone(protocol.describe_problem([_IntKind(5), OrderedDict(a=1), _Dict(b=[1])]))
        self.assertProblem(OrderedDict([(1, "x")]), "TypeError", "dict key 1 (an int) at value:")
        self.assertProblem([_IntKind(2**64)] * 40, "ValueError", "at value[0]")

    def test_randomised_values_agree_with_the_exact_check(self):
        import random

        rng = random.Random(20261127)
        bad = [lambda: {1: 0}, lambda: {None: 0}, lambda: 2**64, lambda: -(2**63) - 1, lambda: {2.5: 0}]
        leaves = [lambda: rng.randint(-(2**63), 2**64 - 1), lambda: rng.random(), lambda: "s", lambda: None, lambda: True]

        def make(depth):
            roll = rng.random()
            if depth > 3 or roll < 0.4:
                return rng.choice(bad)() if rng.random() < 0.01 else rng.choice(leaves)()
            size = rng.choice((0, 1, 3, 40, 80) if depth < 2 else (0, 1, 3))
            if roll < 0.7:
                return [make(depth + 1) for _ in range(size)]
            if roll < 0.8:
                return tuple(make(depth + 1) for _ in range(size))
            return {f"k{rng.randint(0, 9)}{i}": make(depth + 1) for i in range(size)}

        seen = {True: 0, False: 0}
        for _ in range(400):
            value = make(0)
            problem = protocol.describe_problem(value)
            self.assertEqual(protocol.reaches_host_exactly(value), problem is None, problem)
            seen[problem is None] += 1
        self.assertGreater(min(seen.values()), 20, seen)  # both outcomes were exercised


class ReplyKeyOrderTests(unittest.TestCase):
    """The host reads the id of a reply it cannot decode from the frame's first bytes."""

    def test_result_and_error_replies_start_with_type_then_id(self):
        cases = [
            ({"type": "result", "id": 12, "value": {"z": 1, "a": 2}}, b'{"type":"result","id":12,'),
            ({"type": "error", "id": 13, "error": {"type": "E", "message": "m", "traceback": ""}}, b'{"type":"error","id":13,'),
        ]
        for msg, start in cases:
            with self.subTest(msg=msg):
                self.assertTrue(encode_frame(msg)[4:].startswith(start), encode_frame(msg))


class Version3FrameTests(unittest.TestCase):
    """Streams, cancellation and progress: both sides of each new frame, on buffers."""

    def round_trip(self, msg):
        data = encode_frame(msg)
        self.assertEqual(read_frame(io.BytesIO(data)), msg)
        return data[4:]

    def test_chunk_and_progress_frames_start_with_type_then_id(self):
        payload = self.round_trip(protocol.chunk_message(12, {"token": "é", "n": [1, 2.5]}))
        self.assertEqual(payload, '{"type":"chunk","id":12,"value":{"token":"é","n":[1,2.5]}}'.encode("utf-8"))
        payload = self.round_trip(protocol.progress_message(12, 3, 10, "fitting"))
        self.assertEqual(payload, b'{"type":"progress","id":12,"done":3,"total":10,"message":"fitting"}')
        payload = self.round_trip(protocol.progress_message(2**64 - 1, 0.5))
        self.assertEqual(
            payload, b'{"type":"progress","id":18446744073709551615,"done":0.5,"total":null,"message":null}'
        )

    def test_credit_and_cancel_as_the_host_writes_them(self):
        credit = read_frame(io.BytesIO(raw_frame(b'{"type":"credit","id":5,"n":8}')))
        self.assertEqual(protocol.parse_credit(credit), (5, 8))
        cancel = read_frame(io.BytesIO(raw_frame(b'{"type":"cancel","id":5,"force":true}')))
        self.assertEqual(protocol.parse_cancel(cancel), (5, True))
        self.assertEqual(protocol.parse_cancel({"type": "cancel", "id": 5}), (5, False))
        self.round_trip({"type": "credit", "id": 5, "n": 0})
        self.round_trip({"type": "cancel", "id": 5, "force": False})

    def test_malformed_credit_and_cancel_are_protocol_errors(self):
        for msg in (
            {"type": "credit", "id": "5", "n": 1},
            {"type": "credit", "id": 5},
            {"type": "credit", "id": 5, "n": -1},
            {"type": "credit", "id": 5, "n": True},
            {"type": "credit", "id": 5, "n": 1.0},
        ):
            with self.subTest(msg=msg), self.assertRaises(ProtocolError):
                protocol.parse_credit(msg)
        for msg in (
            {"type": "cancel"},
            {"type": "cancel", "id": 5, "force": 1},
            {"type": "cancel", "id": 5, "force": None},
        ):
            with self.subTest(msg=msg), self.assertRaises(ProtocolError):
                protocol.parse_cancel(msg)

    def test_a_calls_window(self):
        self.assertIsNone(protocol.stream_window({"type": "call", "id": 1}))
        self.assertEqual(protocol.stream_window({"type": "call", "id": 1, "window": 64}), 64)
        call = read_frame(io.BytesIO(raw_frame(b'{"type":"call","id":5,"command":"tokens","args":[],"window":16}')))
        self.assertEqual(protocol.stream_window(call), 16)
        for window in (0, -3, 1.5, "2", True, [1]):
            with self.subTest(window=window), self.assertRaisesRegex(ProtocolError, "at least 1"):
                protocol.stream_window({"type": "call", "id": 1, "window": window})

    def test_the_cancel_file(self):
        data = protocol.format_cancel_file(123, 2)
        self.assertEqual(data, b"123 2" + b" " * 27)
        self.assertEqual(len(data), protocol.CANCEL_FILE_SIZE)
        self.assertEqual(protocol.parse_cancel_file(data), (123, 2))
        self.assertEqual(protocol.parse_cancel_file(protocol.format_cancel_file(2**64 - 1, 1)), (2**64 - 1, 1))
        for junk in (b" " * 32, b"", b"12", b"12 x", b"1 2 3", b"\x00" * 32):
            with self.subTest(junk=junk):
                self.assertEqual(protocol.parse_cancel_file(junk), (None, 0))
        with self.assertRaises(ValueError):
            protocol.format_cancel_file(10**40, 1)


if __name__ == "__main__":
    unittest.main()
