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
        self.assertEqual(PROTOCOL_VERSION, 1)
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
        stream = TrackingReader(struct.pack(">I", 2**31))
        with self.assertRaises(FrameTooLarge) as ctx:
            read_frame(stream)
        self.assertIsInstance(ctx.exception, ProtocolError)
        self.assertEqual((ctx.exception.size, ctx.exception.limit), (2**31, DEFAULT_MAX_FRAME))
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


if __name__ == "__main__":
    unittest.main()
