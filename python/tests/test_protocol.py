"""Framing: snakepit.protocol against in-memory streams."""

import io
import json
import os
import struct
import unittest

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


if __name__ == "__main__":
    unittest.main()
