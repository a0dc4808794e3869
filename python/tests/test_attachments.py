"""Binary values (protocol 4): frames with attachments on buffers, the references in the JSON,
snakepit.Array, what a command may return (bytes, arrays, numpy values, registered types), the
writers (writev, threads), and the worker end to end. The numpy tests run where numpy is
installed (the Rust harness runs this suite in a virtual environment with it)."""

import dataclasses
import decimal
import importlib.util
import io
import os
import queue
import struct
import subprocess
import sys
import threading
import tracemalloc
import unittest
import unittest.mock

import snakepit
from snakepit import _values, protocol
from snakepit.protocol import (
    MAX_ATTACHMENTS,
    FrameTooLarge,
    ProtocolError,
    describe_problem,
    encode_frame,
    frame_bytes,
    reaches_host_exactly,
    read_frame,
    write_frame,
    writev_all,
)
from snakepit.worker import Worker, _frame_writer, _reply_sender

from tests._host import TIMEOUT, Host, call, run_in_thread, split_frames as _split

HAVE_NUMPY = importlib.util.find_spec("numpy") is not None
needs_numpy = unittest.skipUnless(HAVE_NUMPY, "numpy is not installed")
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = b"\x00\x00\x00\x00\x00\x00\xf0\x3f"  # 1.0 as a little-endian float64


def attached(json_text, attachments, sizes=None, count=None):
    """A frame with attachments as the host writes one; ``sizes`` and ``count`` may lie."""
    payload = json_text.encode("utf-8") if isinstance(json_text, str) else json_text
    sizes = [len(a) for a in attachments] if sizes is None else sizes
    count = len(sizes) if count is None else count
    table = struct.pack(f">{len(sizes)}Q", *sizes)
    return struct.pack(">II", 0x8000_0000 | len(payload), count) + table + payload + b"".join(attachments)


def plain(json_text):
    payload = json_text.encode("utf-8")
    return struct.pack(">I", len(payload)) + payload


def round_trip(msg, max_size=protocol.DEFAULT_MAX_FRAME):
    return read_frame(io.BytesIO(frame_bytes(encode_frame(msg, max_size))), max_size)


def no_numpy():
    """Arrays arrive as snakepit.Array, as in a worker without numpy."""
    return unittest.mock.patch.object(_values, "_numpy_tried", [True])


class OneByteReader:
    """A stream that gives at most one byte per read() (no readinto)."""

    def __init__(self, data):
        self._data = io.BytesIO(data)

    def read(self, n=-1):
        return self._data.read(min(n, 1) if n >= 0 else 1)


class OneByteIntoReader(OneByteReader):
    """The same, with a readinto() that fills at most one byte."""

    def readinto(self, view):
        return self._data.readinto(view[:1])


class SizeRecorder(io.BytesIO):
    """Records every size asked of read() and readinto(), and which was used."""

    def __init__(self, data):
        super().__init__(data)
        self.asked = []

    def read(self, n=-1):
        self.asked.append(("read", n))
        return super().read(n)

    def readinto(self, view):
        self.asked.append(("readinto", len(view)))
        return super().readinto(view)

    def largest(self):
        return max((n for _, n in self.asked), default=0)


# --- framing ------------------------------------------------------------------------------------


class FramingTests(unittest.TestCase):
    def test_a_frame_with_one_attachment_is_laid_out_as_the_spec_says(self):
        data = encode_frame({"type": "result", "id": 3, "value": b"\x01\x02\x03"})
        self.assertIsInstance(data, list)
        head = data[0]
        json_text = b'{"type":"result","id":3,"value":{"__snakepit__":"bytes","att":0}}'
        self.assertEqual(head[:4], struct.pack(">I", 0x8000_0000 | len(json_text)))
        self.assertEqual(head[4:8], b"\x00\x00\x00\x01")  # one attachment
        self.assertEqual(head[8:16], b"\x00" * 7 + b"\x03")  # of 3 bytes, as a big-endian u64
        self.assertEqual(head[16:], json_text)
        self.assertEqual(b"".join(data[1:]), b"\x01\x02\x03")
        self.assertEqual(
            read_frame(io.BytesIO(frame_bytes(data))), {"type": "result", "id": 3, "value": b"\x01\x02\x03"}
        )

    def test_several_attachments_round_trip_in_order_wherever_they_are(self):
        with no_numpy():
            arr = snakepit.Array("int16", (2, 2), struct.pack("<4h", 1, -2, 300, -400))
            value = {"a": [b"first", {"deep": [bytearray(b"second")]}], "b": arr, "c": memoryview(b"third"), "n": 1}
            got = round_trip({"type": "result", "id": 1, "value": value})["value"]
        self.assertEqual(got["a"], [b"first", {"deep": [b"second"]}])
        self.assertEqual(got["b"], arr)
        self.assertEqual(got["b"].tolist(), [[1, -2], [300, -400]])
        self.assertEqual((got["c"], got["n"]), (b"third", 1))
        frame = encode_frame({"type": "result", "id": 1, "value": value})
        self.assertEqual(len(frame), 5)  # head + 4 attachments, in the order the JSON has them
        self.assertEqual([bytes(b) for b in frame[1:]], [b"first", b"second", bytes(arr.data), b"third"])

    def test_a_frame_trickling_in_one_byte_at_a_time(self):
        with no_numpy():
            arr = snakepit.Array("float64", (3,), ONE * 3)
            messages = [
                {"type": "call", "id": 1, "command": "x", "args": [b"abc" * 50, arr, {"k": b""}]},
                {"type": "ping", "id": 2},
                {"type": "call", "id": 3, "command": "x", "args": [bytearray(200)]},
            ]
            data = b"".join(frame_bytes(encode_frame(m)) for m in messages)
            for reader in (OneByteReader(data), OneByteIntoReader(data)):
                with self.subTest(reader=type(reader).__name__):
                    got = read_frame(reader)
                    self.assertEqual(got["args"], [b"abc" * 50, arr, {"k": b""}])
                    self.assertEqual(read_frame(reader), {"type": "ping", "id": 2})
                    self.assertEqual(read_frame(reader)["args"], [bytes(200)])
                    self.assertIsNone(read_frame(reader))

    def test_each_attachment_is_one_read_of_its_own_size(self):
        with no_numpy():
            arr = snakepit.Array("uint8", (5,), b"\x01\x02\x03\x04\x05")
            data = frame_bytes(encode_frame({"type": "call", "id": 1, "command": "x", "args": [b"hello", arr]}))
            stream = SizeRecorder(data)
            msg = read_frame(stream)
        json_size = struct.unpack(">I", data[:4])[0] & 0x7FFF_FFFF
        # header, count, table, JSON, then the bytes read as they are and the array read into
        self.assertEqual(
            stream.asked, [("read", 4), ("read", 4), ("read", 16), ("read", json_size), ("read", 5), ("readinto", 5)]
        )
        self.assertIs(type(msg["args"][0]), bytes)
        self.assertEqual(msg["args"][1].tolist(), [1, 2, 3, 4, 5])
        self.assertFalse(msg["args"][1].data.readonly, "an array arrives writable")

    def test_a_frame_without_attachments_is_always_plain(self):
        class Celsius:
            pass

        with unittest.mock.patch.dict(snakepit._encoders, {Celsius: lambda c: {"c": 21.5}}):
            data = encode_frame({"type": "result", "id": 1, "value": [Celsius(), 1]})
        self.assertIs(type(data), bytes)
        self.assertEqual(data[4:], b'{"type":"result","id":1,"value":[{"c":21.5},1]}')

    def test_attachments_nothing_refers_to_are_skipped_and_the_stream_stays_in_step(self):
        frames = attached(
            '{"type":"call","id":1,"command":"x","args":[{"__snakepit__":"bytes","att":1}]}',
            [b"unused" * 1000, b"used"],
        )
        frames += attached('{"type":"ping","id":2}', [b"ignored"])
        frames += plain('{"type":"ping","id":3}')
        stream = SizeRecorder(frames)
        self.assertEqual(read_frame(stream)["args"], [b"used"])
        self.assertEqual(read_frame(stream), {"type": "ping", "id": 2})
        self.assertEqual(read_frame(stream), {"type": "ping", "id": 3})
        self.assertIsNone(read_frame(stream))

    def test_the_key_order_of_a_reference_does_not_matter(self):
        frame = attached('{"type":"call","id":1,"command":"x","args":[{"att":0,"__snakepit__":"bytes"}]}', [b"ok"])
        self.assertEqual(read_frame(io.BytesIO(frame))["args"], [b"ok"])

    def test_the_size_limit_counts_everything_after_the_first_four_bytes(self):
        msg = {"type": "result", "id": 1, "value": b"x" * 100}
        size = len(frame_bytes(encode_frame(msg))) - 4
        self.assertEqual(len(frame_bytes(encode_frame(msg, max_size=size))) - 4, size)
        with self.assertRaises(FrameTooLarge) as ctx:
            encode_frame(msg, max_size=size - 1)
        self.assertEqual((ctx.exception.size, ctx.exception.limit), (size, size - 1))
        data = frame_bytes(encode_frame(msg))
        self.assertEqual(read_frame(io.BytesIO(data), max_size=size)["value"], b"x" * 100)
        with self.assertRaises(FrameTooLarge) as ctx:
            read_frame(io.BytesIO(data), max_size=size - 1)
        self.assertEqual(ctx.exception.size, size)

    def test_write_frame_writes_every_piece_to_a_stream_and_to_a_file_descriptor(self):
        msg = {"type": "chunk", "id": 1, "value": [b"a" * 10, bytearray(b"b" * 20)]}
        stream = io.BytesIO()
        write_frame(stream, msg)
        self.assertEqual(stream.getvalue(), frame_bytes(encode_frame(msg)))
        r, w = os.pipe()
        with os.fdopen(r, "rb") as reader:
            try:
                write_frame(w, msg)
            finally:
                os.close(w)
            self.assertEqual(read_frame(reader), {"type": "chunk", "id": 1, "value": [b"a" * 10, b"b" * 20]})


class LyingFrameTests(unittest.TestCase):
    """A frame whose header or table lies is refused before anything is allocated for it."""

    JSON = b'{"type":"call","id":1,"command":"x","args":[]}'

    def refused(self, data, max_size=protocol.DEFAULT_MAX_FRAME, too_large=True):
        stream = SizeRecorder(data)
        kind = FrameTooLarge if too_large else ProtocolError
        with self.assertRaises(kind) as ctx:
            read_frame(stream, max_size)
        if not too_large:
            self.assertNotIsInstance(ctx.exception, FrameTooLarge)
        return ctx.exception, stream

    def test_an_attachment_count_of_zero_or_above_the_maximum(self):
        for count in (0, MAX_ATTACHMENTS + 1, 2**32 - 1):
            with self.subTest(count=count):
                exc, stream = self.refused(
                    struct.pack(">II", 0x8000_0000 | len(self.JSON), count) + b"\x00" * 64, too_large=False
                )
                self.assertIn(f"{count} attachments", str(exc))
                self.assertEqual(stream.largest(), 4)  # header and count only

    def test_a_json_length_above_the_maximum(self):
        exc, stream = self.refused(struct.pack(">II", 0x8000_0000 | 5000, 1), max_size=4096)
        self.assertEqual((exc.size, exc.limit), (5000, 4096))
        self.assertEqual(stream.asked, [("read", 4)])

    def test_a_table_too_large_for_the_maximum_is_not_read(self):
        count = MAX_ATTACHMENTS  # a table of 8 MiB
        exc, stream = self.refused(struct.pack(">II", 0x8000_0000 | len(self.JSON), count), max_size=1 << 20)
        self.assertEqual(exc.size, 4 + 8 * count + len(self.JSON))
        self.assertEqual(stream.largest(), 4)

    def test_sizes_summing_over_the_maximum_are_refused_before_the_json(self):
        limit = 1 << 20
        room = limit - (4 + 16 + len(self.JSON))
        exc, stream = self.refused(attached(self.JSON, [], sizes=[room, 1]), max_size=limit)
        self.assertEqual((exc.size, exc.limit), (limit + 1, limit))
        self.assertEqual(stream.largest(), 16)  # the table, never the JSON or an attachment
        # Exactly at the limit is read (and then truncated: the attachments are not there).
        with self.assertRaisesRegex(ProtocolError, "truncated"):
            read_frame(io.BytesIO(attached(self.JSON, [], sizes=[room - 1, 1])), limit)

    def test_sizes_overflowing_64_bits_are_summed_exactly(self):
        sizes = [2**64 - 1, 2**64 - 1, 2]
        exc, stream = self.refused(attached(self.JSON, [], sizes=sizes))
        self.assertEqual(exc.size, 4 + 8 * 3 + len(self.JSON) + sum(sizes))  # not wrapped around
        self.assertEqual(stream.largest(), 24)

    def test_no_large_allocation_for_a_lying_table(self):
        frames = [
            attached(self.JSON, [], sizes=[2**63]),
            attached(self.JSON, [], sizes=[2**40, 2**40]),
            struct.pack(">II", 0x8000_0000 | (2**31 - 1), 1),
            struct.pack(">II", 0x8000_0000 | len(self.JSON), MAX_ATTACHMENTS) + b"\x00" * 100,
        ]
        tracemalloc.start()
        try:
            for data in frames:
                with self.assertRaises(ProtocolError):
                    read_frame(io.BytesIO(data))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 1 << 20, "a lying header made the reader allocate")

    def test_a_frame_that_ends_anywhere_inside_is_truncated_not_a_clean_end(self):
        with no_numpy():
            arr = snakepit.Array("float64", (2,), ONE * 2)
        frame = frame_bytes(encode_frame({"type": "call", "id": 1, "command": "x", "args": [b"abcdef", arr]}))
        # head (header, count, table, JSON) | b"abcdef" | the array's 16 bytes
        json_size = struct.unpack(">I", frame[:4])[0] & 0x7FFF_FFFF
        head = 8 + 16 + json_size
        cuts = {
            "in the header": 2,
            "in the count": 6,
            "in the table": 12,
            "in the JSON": 8 + 16 + 5,
            "before the attachments": head,
            "in a bytes attachment": head + 3,
            "in an array attachment": head + 6 + 8,
            "one byte short": len(frame) - 1,
        }
        for where, cut in cuts.items():
            for reader in (io.BytesIO, OneByteReader):
                with self.subTest(where=where, reader=reader.__name__):
                    with self.assertRaisesRegex(ProtocolError, "truncated") as ctx:
                        read_frame(reader(frame[:cut]))
                    self.assertNotIsInstance(ctx.exception, FrameTooLarge)
        unused = attached('{"type":"ping","id":1}', [b"x" * 10])
        with self.assertRaisesRegex(ProtocolError, "truncated frame: it ends in attachment 0"):
            read_frame(io.BytesIO(unused[:-1]))
        self.assertEqual(read_frame(io.BytesIO(unused)), {"type": "ping", "id": 1})


# --- references -----------------------------------------------------------------------------------


def bad_call(args_json, attachments=()):
    frame = attached if attachments else (lambda text, _a: plain(text))
    return read_frame(
        io.BytesIO(frame('{"type":"call","id":1,"command":"x","args":' + args_json + "}", list(attachments)))
    )


class ReferenceTests(unittest.TestCase):
    def test_inline_base64_is_checked_in_linear_time_and_a_few_copies_of_memory(self):
        import base64
        import tracemalloc

        data = bytes(range(256)) * 8192  # 2 MiB
        text = base64.b64encode(data).decode()
        tracemalloc.start()
        try:
            msg = bad_call('[{"__snakepit__":"bytes","b64":"%s"}]' % text)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(msg["args"][0], data)
        # The frame's JSON (text) is itself held twice while it is decoded; a pattern match
        # over it once took ~45 times its size.
        self.assertLess(peak, 8 * len(text), f"peak {peak} bytes for {len(text)} bytes of base64")

    def test_the_inline_form_in_a_plain_frame(self):
        with no_numpy():
            msg = bad_call(
                '[{"__snakepit__":"bytes","b64":"AAEC"},{"__snakepit__":"bytes","b64":""},'
                '{"__snakepit__":"array","dtype":"int16","shape":[2],"b64":"AQD//w=="}]'
            )
        self.assertEqual(msg["args"][:2], [b"\x00\x01\x02", b""])
        self.assertEqual(msg["args"][2].tolist(), [1, -1])
        self.assertFalse(msg["args"][2].data.readonly)

    def test_array_data_is_read_as_little_endian(self):
        args = '[{"__snakepit__":"array","dtype":"float64","shape":[1],"att":0},'
        args += '{"__snakepit__":"array","dtype":"uint32","shape":[],"b64":"AQIDBA=="}]'
        with no_numpy():
            msg = bad_call(args, [ONE])
            self.assertEqual([a.tolist() for a in msg["args"]], [[1.0], 0x04030201])
        if HAVE_NUMPY:
            msg = bad_call(args, [ONE])
            self.assertEqual([a.tolist() for a in msg["args"]], [[1.0], 0x04030201])
            self.assertEqual([a.dtype.name for a in msg["args"]], ["float64", "uint32"])

    def test_both_forms_in_one_frame_and_a_reference_as_the_whole_value(self):
        frame = attached('{"type":"result","id":1,"value":{"att":0,"__snakepit__":"bytes"}}', [b"all"])
        self.assertEqual(read_frame(io.BytesIO(frame))["value"], b"all")
        msg = bad_call('{"a":{"__snakepit__":"bytes","att":0},"b":{"__snakepit__":"bytes","b64":"eA=="}}', [b"y"])
        self.assertEqual(msg["args"], {"a": b"y", "b": b"x"})

    def test_objects_without_the_key_and_other_messages_are_untouched(self):
        msg = bad_call('[{"att":0,"b64":"AA==","snakepit":"bytes"},"__snakepit__",{"k":["__snakepit__"]}]')
        self.assertEqual(
            msg["args"], [{"att": 0, "b64": "AA==", "snakepit": "bytes"}, "__snakepit__", {"k": ["__snakepit__"]}]
        )
        context = {"__snakepit__": "bytes", "b64": "AA=="}  # only args (and value) hold binary values
        msg = read_frame(
            io.BytesIO(plain('{"type":"call","id":1,"command":"x","context":{"__snakepit__":"bytes","b64":"AA=="}}'))
        )
        self.assertEqual(msg["context"], context)

    def test_references_among_many_items_are_found(self):
        items = ",".join(["1", '"s"', "2.5", "null"] * 30)
        msg = bad_call(f'[[{items}],{{"xs":[{items},[{{"__snakepit__":"bytes","att":0}}]]}}]', [b"found"])
        self.assertEqual(msg["args"][1]["xs"][-1], [b"found"])

    def test_a_malformed_reference_in_a_call_fails_that_call_only(self):
        cases = [
            (
                '[{"__snakepit__":"blob","att":0}]',
                'the object at args[0] has an unknown "__snakepit__" kind, string "blob"',
            ),
            ('[{"__snakepit__":null}]', "unknown"),
            ('[{"__snakepit__":"bytes"}]', 'the bytes reference at args[0] needs one of "att" and "b64", not neither'),
            ('[{"__snakepit__":"bytes","att":0,"b64":"AA=="}]', "not both"),
            ('[{"__snakepit__":"bytes","att":0,"extra":1}]', 'has an unexpected key "extra"'),
            ('[{"__snakepit__":"bytes","att":"0"}]', 'has "att" string "0": expected an integer'),
            ('[{"__snakepit__":"bytes","att":true}]', "expected an integer"),
            ('[{"__snakepit__":"bytes","att":0.0}]', "expected an integer"),
            ('[{"__snakepit__":"bytes","att":1}]', 'has "att" 1, and its frame has 1 attachment'),
            ('[{"__snakepit__":"bytes","att":-1}]', 'has "att" -1'),
            ('[{"__snakepit__":"bytes","b64":"AAE"}]', "not standard base64 with padding"),
            ('[{"__snakepit__":"bytes","b64":"AA-_"}]', "not standard base64"),
            ('[{"__snakepit__":"bytes","b64":"AA==\\n"}]', "not standard base64"),
            ('[{"__snakepit__":"bytes","b64":"Zh=="}]', "not standard base64"),  # stray bits: not canonical
            ('[{"__snakepit__":"bytes","b64":"A==="}]', "not standard base64"),
            ('[{"__snakepit__":"bytes","b64":"\u00e9AAA"}]', "not standard base64"),
            ('[{"__snakepit__":"bytes","b64":5}]', "not standard base64"),
            ('[{"__snakepit__":"array","shape":[1],"att":0}]', "has no dtype: expected one of bool, int8"),
            ('[{"__snakepit__":"array","dtype":"float128","shape":[1],"att":0}]', 'dtype string "float128"'),
            ('[{"__snakepit__":"array","dtype":["x"],"shape":[1],"att":0}]', "dtype array"),
            ('[{"__snakepit__":"array","dtype":"uint8","att":0}]', "has no shape"),
            (
                '[{"__snakepit__":"array","dtype":"uint8","shape":[-1],"att":0}]',
                "shape array [-1]: expected an array of non-negative integers",
            ),
            ('[{"__snakepit__":"array","dtype":"uint8","shape":[true],"att":0}]', "non-negative integers"),
            ('[{"__snakepit__":"array","dtype":"uint8","shape":2,"att":0}]', "shape number 2"),
            (
                '[{"__snakepit__":"array","dtype":"uint16","shape":[3],"att":0}]',
                "uint16 data of shape [3] is 6 bytes, and attachment 0 holds 4",
            ),
            (
                '[{"__snakepit__":"array","dtype":"float64","shape":[3],"b64":"AAEC"}]',
                "float64 data of shape [3] is 24 bytes, and its b64 holds 3",
            ),
            (
                '[{"__snakepit__":"array","dtype":"bool","shape":[4],"att":0}]',
                "the bool array at args[0] holds bytes other than 0 and 1",
            ),
            ('{"x":[1,{"y":{"__snakepit__":"bytes"}}]}', 'at args["x"][1]["y"]'),
        ]
        for args_json, expected in cases:
            with self.subTest(args=args_json):
                msg = bad_call(args_json, [b"\x00\x01\x02\x03"])
                self.assertIs(type(msg["args"]), _values.BadArgs)
                self.assertIn(expected, msg["args"].problem)
        # In a plain frame, "att" is always out of range.
        msg = bad_call('[{"__snakepit__":"bytes","att":0}]')
        self.assertIn('has "att" 0, and its frame has no attachments', msg["args"].problem)

    def test_the_worker_answers_a_malformed_reference_with_a_value_error_and_serves_on(self):
        for threads in (0, 2):
            with self.subTest(threads=threads):
                host = Host(self, Worker({"same": lambda *a: list(a)}), threads).start()
                host.send(call("same", [{"__snakepit__": "bytes", "b64": "not base64!"}], id=1))
                reply = host.recv()
                self.assertEqual((reply["type"], reply["id"], reply["error"]["type"]), ("error", 1, "ValueError"))
                self.assertEqual(
                    reply["error"]["message"],
                    "args of command 'same' cannot be decoded: the bytes reference at args[0] has \"b64\" that is "
                    'not standard base64 with padding: string "not base64!"',
                )
                host.send(call("same", [b"fine"], id=2))
                self.assertEqual(host.recv(), {"type": "result", "id": 2, "value": [b"fine"]})
                self.assertEqual(host.finish(), "returned")

    def test_a_malformed_reference_in_a_result_is_a_protocol_error(self):
        frame = attached('{"type":"result","id":1,"value":{"__snakepit__":"bytes","att":3}}', [b"x"])
        with self.assertRaisesRegex(ProtocolError, 'result frame: the bytes reference at value has "att" 3'):
            read_frame(io.BytesIO(frame))


# --- snakepit.Array -----------------------------------------------------------------------------


class ArrayTests(unittest.TestCase):
    def test_every_dtype_reads_back_its_values(self):
        cases = {
            "bool": ("<3?", [False, True, True]),
            "int8": ("<3b", [0, -1, 127]),
            "int16": ("<3h", [0, -2, 300]),
            "int32": ("<3i", [0, -3, 2**31 - 1]),
            "int64": ("<3q", [0, -4, -(2**63)]),
            "uint8": ("<3B", [0, 1, 255]),
            "uint16": ("<3H", [0, 2, 65535]),
            "uint32": ("<3I", [0, 3, 2**32 - 1]),
            "uint64": ("<3Q", [0, 4, 2**64 - 1]),
            "float16": ("<3e", [0.0, 1.0, -2.5]),
            "float32": ("<3f", [0.0, 1.5, -2.25]),
            "float64": ("<3d", [0.0, 0.1, -1e300]),
        }
        self.assertEqual(set(cases) | {"complex64", "complex128"}, set(_values.DTYPES))
        for dtype, (fmt, values) in cases.items():
            with self.subTest(dtype=dtype):
                a = snakepit.Array(dtype, [3], struct.pack(fmt, *values))
                self.assertEqual(a.tolist(), values)
                self.assertEqual(
                    (a.dtype, a.shape, a.nbytes, a.itemsize),
                    (dtype, (3,), struct.calcsize(fmt), struct.calcsize(fmt) // 3),
                )
        c = snakepit.Array("complex128", (2,), struct.pack("<4d", 1.0, 2.0, -0.5, 0.0))
        self.assertEqual(c.tolist(), [1 + 2j, -0.5 + 0j])
        c = snakepit.Array("complex64", (), struct.pack("<2f", 0.0, -1.0))
        self.assertEqual(c.tolist(), -1j)

    def test_shapes_zero_d_and_empty(self):
        self.assertEqual(snakepit.Array("float64", (), ONE).tolist(), 1.0)
        self.assertEqual(snakepit.Array("float64", [], ONE).shape, ())
        self.assertEqual(snakepit.Array("int8", (2, 3), bytes(range(6))).tolist(), [[0, 1, 2], [3, 4, 5]])
        self.assertEqual(snakepit.Array("int8", (2, 1, 2), bytes(range(4))).tolist(), [[[0, 1]], [[2, 3]]])
        self.assertEqual(snakepit.Array("float32", (0, 3), b"").tolist(), [])
        self.assertEqual(snakepit.Array("float32", (2, 0), b"").tolist(), [[], []])
        self.assertEqual(snakepit.Array("uint8", 4, b"abcd").shape, (4,))

    def test_the_data_is_a_view_not_a_copy(self):
        raw = bytearray(b"\x01\x02")
        a = snakepit.Array("uint8", (2,), raw)
        raw[0] = 9
        self.assertEqual(a.tolist(), [9, 2])
        self.assertFalse(a.data.readonly)
        self.assertTrue(snakepit.Array("uint8", (2,), b"\x01\x02").data.readonly)
        strided = memoryview(bytes(range(8)))[::2]  # not contiguous: copied
        self.assertEqual(snakepit.Array("uint8", (4,), strided).tolist(), [0, 2, 4, 6])
        import array

        doubles = array.array("d", [1.0, 2.0])  # another format: its bytes
        self.assertEqual(snakepit.Array("float64", (2,), doubles).tolist(), [1.0, 2.0])

    def test_equality_repr_and_read_only_attributes(self):
        a = snakepit.Array("int8", (2,), b"\x01\x02")
        self.assertEqual(a, snakepit.Array("int8", [2], bytearray(b"\x01\x02")))
        self.assertNotEqual(a, snakepit.Array("uint8", (2,), b"\x01\x02"))
        self.assertNotEqual(a, snakepit.Array("int8", (1, 2), b"\x01\x02"))
        self.assertNotEqual(a, b"\x01\x02")
        self.assertEqual(repr(a), "snakepit.Array(dtype='int8', shape=(2,), nbytes=2)")
        with self.assertRaises(AttributeError):
            a.shape = (1, 2)
        with self.assertRaises(TypeError):
            hash(a)

    def test_bad_arguments_say_what_is_wrong(self):
        cases = [
            ((1, (1,), b"x"), TypeError, "dtype must be a str"),
            (("float128", (1,), b"x" * 16), ValueError, "dtype must be one of bool, int8"),
            (("int8", None, b"x"), TypeError, "shape must be a sequence of integers"),
            (("int8", (-1,), b""), ValueError, "non-negative integers, not -1"),
            (("int8", (True,), b"x"), ValueError, "non-negative integers, not True"),
            (("int8", (1.0,), b"x"), ValueError, "non-negative integers, not 1.0"),
            (("int8", (2,), "ab"), TypeError, "data must be a bytes-like object, not str"),
            (("int16", (2, 2), b"x" * 7), ValueError, "int16 data of shape [2, 2] is 8 bytes, not 7"),
            (("bool", (2,), b"\x01\x02"), ValueError, "bytes 0 and 1 only"),
        ]
        for args, kind, text in cases:
            with self.subTest(args=args), self.assertRaisesRegex(kind, text.replace("[", r"\[").replace("]", r"\]")):
                snakepit.Array(*args)

    def test_it_travels_as_an_array(self):
        a = snakepit.Array("float64", (1, 2), ONE + struct.pack("<d", -2.0))
        data = encode_frame({"type": "result", "id": 1, "value": a})
        self.assertIn(b'{"__snakepit__":"array","dtype":"float64","shape":[1,2],"att":0}', data[0])
        self.assertEqual(bytes(data[1]), ONE + b"\x00\x00\x00\x00\x00\x00\x00\xc0")  # little-endian
        self.assertIs(data[1].obj, a.data.obj, "sent without a copy")
        with no_numpy():
            self.assertEqual(round_trip({"type": "result", "id": 1, "value": a})["value"], a)


# --- what a command may return ----------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    x: float
    label: bytes
    tags: list = dataclasses.field(default_factory=list)
    unit = "m"  # a class attribute, not a field


@dataclasses.dataclass
class Segment:
    start: Point
    end: Point


class Model:
    """Stands for a pydantic v2 model: only model_dump() matters."""

    def __init__(self, **fields):
        self.fields = fields

    def model_dump(self):
        return dict(self.fields)


class Celsius:
    def __init__(self, degrees):
        self.degrees = degrees


class Kelvin(Celsius):
    pass


class Node:
    """A linked list: each conversion holds the next Node."""

    def __init__(self, depth):
        self.depth = depth


class Selfish:
    pass


class EncodeTests(unittest.TestCase):
    def setUp(self):
        patcher = unittest.mock.patch.dict(snakepit._encoders, clear=False)
        patcher.start()
        self.addCleanup(patcher.stop)

    def value(self, value, max_size=protocol.DEFAULT_MAX_FRAME):
        with no_numpy():
            return round_trip({"type": "result", "id": 1, "value": value}, max_size)["value"]

    def test_bytes_likes_travel_as_bytes_without_a_copy(self):
        data = b"abc"
        raw = bytearray(b"def")
        frame = encode_frame({"type": "result", "id": 1, "value": [data, raw, memoryview(raw)]})
        self.assertIs(frame[1], data)
        self.assertIs(frame[2].obj, raw)
        self.assertIs(frame[3].obj, raw)
        self.assertEqual(self.value([data, raw, memoryview(raw)]), [b"abc", b"def", b"def"])

    def test_memoryviews_of_any_layout_and_format_travel_as_their_bytes(self):
        import array

        doubles = array.array("d", [1.0, 2.0])
        cases = [
            (memoryview(bytes(range(8)))[::2], b"\x00\x02\x04\x06"),  # not contiguous
            (memoryview(doubles), doubles.tobytes()),  # not bytes: its raw bytes
            (memoryview(bytes(range(6))).cast("B", (2, 3)), bytes(range(6))),  # two dimensions
            (memoryview(b""), b""),
        ]
        for view, expected in cases:
            with self.subTest(view=view):
                self.assertEqual(self.value(view), expected)
        self.assertIs(encode_frame({"type": "result", "id": 1, "value": memoryview(doubles)})[1].obj, doubles)

    def test_a_result_with_only_converted_values_stays_exact(self):
        self.assertEqual(self.value({"p": Point(1.5, b"\x00", [1])}), {"p": {"x": 1.5, "label": b"\x00", "tags": [1]}})

    def test_dataclasses_are_a_shallow_dict_of_their_fields_encoded_in_turn(self):
        seg = Segment(Point(0.0, b"a"), Point(1.0, b"b", ["t"]))
        self.assertEqual(
            self.value(seg),
            {"start": {"x": 0.0, "label": b"a", "tags": []}, "end": {"x": 1.0, "label": b"b", "tags": ["t"]}},
        )

    def test_objects_with_model_dump(self):
        self.assertEqual(self.value([Model(a=1, blob=b"z")]), [{"a": 1, "blob": b"z"}])

    def test_registered_encoders_by_type_then_by_base_and_overriding_the_built_in_ones(self):
        snakepit.encoder(Celsius, lambda c: {"celsius": c.degrees})
        self.assertEqual(self.value([Celsius(21.5), Kelvin(3)]), [{"celsius": 21.5}, {"celsius": 3}])
        snakepit.encoder(Kelvin, lambda k: {"kelvin": k.degrees})
        self.assertEqual(self.value([Celsius(1), Kelvin(2)]), [{"celsius": 1}, {"kelvin": 2}])

        @snakepit.encoder(Point)
        def point_as_pair(p):
            return [p.x, p.label]

        self.assertIs(snakepit._encoders[Point], point_as_pair)
        self.assertEqual(self.value(Point(2.0, b"q")), [2.0, b"q"])
        snakepit.encoder(bytes, lambda b: b.hex())  # even how bytes travel
        self.assertEqual(self.value(b"\x01\xff"), "01ff")

    def test_decimal_is_not_built_in_and_registers_as_str_or_float(self):
        with self.assertRaisesRegex(TypeError, "Decimal is not JSON serializable"):
            encode_frame({"type": "result", "id": 1, "value": decimal.Decimal("1.10")})
        self.assertEqual(describe_problem([decimal.Decimal(1)])[0], "TypeError")
        self.assertIn("@snakepit.encoder", describe_problem([decimal.Decimal(1)])[1])
        snakepit.encoder(decimal.Decimal, str)
        self.assertEqual(self.value([decimal.Decimal("1.10")]), ["1.10"])
        snakepit.encoder(decimal.Decimal, float)
        self.assertEqual(self.value([decimal.Decimal("1.10")]), [1.1])

    def test_registration_is_checked(self):
        with self.assertRaisesRegex(TypeError, "needs a class"):
            snakepit.encoder("Decimal")
        for cls in (str, int, bool, float, list, tuple, dict, type(None), type("MyTuple", (tuple,), {})):
            with self.subTest(cls=cls), self.assertRaisesRegex(TypeError, "json writes"):
                snakepit.encoder(cls, repr)
        with self.assertRaisesRegex(TypeError, "needs a callable"):
            snakepit.encoder(Celsius, "str")

    def test_an_encoder_that_returns_its_own_type_is_stopped_with_the_type_named(self):
        snakepit.encoder(Selfish, lambda s: Selfish())
        with self.assertRaisesRegex(ValueError, "nest more than 32 deep, at a tests.test_attachments.Selfish"):
            encode_frame({"type": "result", "id": 1, "value": Selfish()})
        kind, text = describe_problem({"a": [Selfish()]})
        self.assertEqual(kind, "ValueError")
        self.assertIn('has a tests.test_attachments.Selfish at value["a"][0] whose encoding nests more than 32', text)
        snakepit.encoder(Selfish, lambda s: [s])  # returns a value holding the object itself
        with self.assertRaisesRegex(ValueError, "Circular"):
            encode_frame({"type": "result", "id": 1, "value": Selfish()})
        self.assertIn("circular reference at value[0]", describe_problem(Selfish())[1])

    def test_conversions_nest_up_to_32_deep(self):
        snakepit.encoder(
            Node, lambda n: {"d": n.depth, "next": Node(n.depth + 1)} if n.depth < n.limit else {"d": n.depth}
        )
        for limit, fits in ((32, True), (33, False)):
            Node.limit = limit
            with self.subTest(limit=limit):
                if fits:
                    got = self.value([Node(1)])
                    depth = 0
                    while got:
                        got = (got[0] if isinstance(got, list) else got).get("next")
                        depth += 1
                    self.assertEqual(depth, 32)
                    self.assertIsNone(describe_problem([Node(1)]))
                else:
                    with self.assertRaisesRegex(ValueError, "nest more than 32"):
                        encode_frame({"type": "result", "id": 1, "value": [Node(1)]})
                    self.assertIn('at value[0]["next"]', describe_problem([Node(1)])[1])

    def test_what_an_encoder_returns_must_reach_the_host_as_itself(self):
        snakepit.encoder(Celsius, lambda c: {"big": c.degrees})
        with self.assertRaisesRegex(
            ValueError, "encoder for tests.test_attachments.Celsius returned a value that does not reach"
        ):
            encode_frame({"type": "result", "id": 1, "value": [Celsius(2**70)]})
        kind, text = describe_problem([Celsius(2**70)])
        self.assertEqual(kind, "ValueError")
        self.assertIn('has the integer 1180591620717411303424 at value[0]["big"]', text)
        snakepit.encoder(Celsius, lambda c: {c.degrees: "key"})
        self.assertIn("has a dict key 5 (an int) at value[0]", describe_problem([Celsius(5)])[1])

    def test_values_that_cannot_travel_are_named_with_their_place(self):
        self.assertEqual(
            describe_problem({"a": [b"ok", {1, 2}]}),
            (
                "TypeError",
                'has a set at value["a"][1]: it is not JSON-serialisable (a conversion for its type can be registered with @snakepit.encoder)',
            ),
        )
        snakepit.encoder(Celsius, lambda c: 1 / 0)
        self.assertEqual(
            describe_problem([b"x", Celsius(1)]),
            (
                "ZeroDivisionError",
                "has a tests.test_attachments.Celsius at value[1]: its encoder raised ZeroDivisionError: division by zero",
            ),
        )

    def test_the_cheap_check_passes_binary_values_and_still_catches_the_rest(self):
        good = [b"x", bytearray(2), memoryview(b"y"), snakepit.Array("uint8", (1,), b"z"), Point(1.0, b"")]
        for value in (good, {"k": good}, good * 20, [{"b": b"x", "n": i} for i in range(50)]):
            self.assertTrue(reaches_host_exactly(value))
            self.assertIsNone(describe_problem(value))
        for bad, where in (
            ([b"x", 2**64], "value[1]"),
            ([{"b": b"x", 1: 2}] * 40, "value[0]"),
            ({"b": [b"x"] * 40 + [{2: 3}]}, 'value["b"][40]'),
        ):
            self.assertFalse(reaches_host_exactly(bad))
            self.assertIn(f" at {where}", describe_problem(bad)[1])

    def test_too_many_attachments_for_one_frame(self):
        with unittest.mock.patch.object(_values, "MAX_ATTACHMENTS", 3):
            encode_frame({"type": "result", "id": 1, "value": [b"a", b"b", b"c"]})
            with self.assertRaisesRegex(protocol.TooManyAttachments, "more than 3 bytes and array values"):
                encode_frame({"type": "result", "id": 1, "value": [b"a", b"b", b"c", b"d"]})

    def test_the_encoder_without_the_c_accelerator_does_the_same(self):
        encode_with = protocol._make_encoder_with(use_c=False)
        snakepit.encoder(Selfish, lambda s: Selfish())
        for value in ([b"x", {"p": Point(1.0, b"y")}, 1.5, "é"], [Model(a=[b"z"])]):
            hooks = [_values.Attacher(), _values.Attacher()]
            texts = [
                encode(value, h.default, h.markers) for encode, h in zip((protocol._encode_with, encode_with), hooks)
            ]
            self.assertEqual(texts[0], texts[1])
            self.assertEqual([bytes(b) for b in hooks[0].buffers], [bytes(b) for b in hooks[1].buffers])
        hook = _values.Attacher()
        with self.assertRaisesRegex(ValueError, "nest more than 32"):
            encode_with([Selfish()], hook.default, hook.markers)
        with self.assertRaisesRegex(ValueError, "Out of range float"):
            encode_with([float("nan")], hook.default, hook.markers)


class WorkerRepliesTests(unittest.TestCase):
    """What the worker answers for results that hold binary values and converted objects."""

    def setUp(self):
        patcher = unittest.mock.patch.dict(snakepit._encoders, clear=False)
        patcher.start()
        self.addCleanup(patcher.stop)

    def reply(self, func, max_size=protocol.DEFAULT_MAX_FRAME, args=None):
        worker = Worker({"f": func}, max_frame_size=max_size)
        with no_numpy():
            return read_frame(io.BytesIO(frame_bytes(worker.respond(call("f", args, id=5)))), max_size)

    def test_results_with_bytes_and_arrays(self):
        arr = snakepit.Array("int8", (2,), b"\x01\xff")
        self.assertEqual(
            self.reply(lambda: {"b": b"\x00", "a": arr}), {"type": "result", "id": 5, "value": {"b": b"\x00", "a": arr}}
        )

    def test_a_result_too_large_with_its_attachments(self):
        reply = self.reply(lambda: [b"x" * 1000], max_size=500)
        self.assertEqual(reply["error"]["type"], "FrameTooLarge")
        self.assertRegex(
            reply["error"]["message"],
            r"^result of command 'f' is 10\d\d bytes, above the maximum frame size of 500 bytes$",
        )

    def test_a_frame_too_large_names_the_encoder_whose_value_made_it(self):
        snakepit.encoder(Celsius, lambda c: {"history": [c.degrees] * 2000})
        reply = self.reply(lambda: {"small": Model(a=1), "big": Celsius(1.5)}, max_size=2000)
        self.assertEqual(reply["error"]["type"], "FrameTooLarge")
        self.assertRegex(
            reply["error"]["message"], r"; encoding a tests\.test_attachments\.Celsius made 80\d\d bytes of it$"
        )

    def test_an_encoder_that_raises_is_answered_with_its_error_and_traceback(self):
        def broken(c):
            raise KeyError("no such unit")

        snakepit.encoder(Celsius, broken)
        reply = self.reply(lambda: {"t": Celsius(1)})
        self.assertEqual(reply["error"]["type"], "KeyError")
        self.assertEqual(
            reply["error"]["message"],
            "result of command 'f' has a tests.test_attachments.Celsius at value[\"t\"]: its encoder raised KeyError: 'no such unit'",
        )
        self.assertIn("in broken", reply["error"]["traceback"])
        self.assertIn("KeyError: 'no such unit'", reply["error"]["traceback"])

    def test_a_runaway_encoder_fails_its_call(self):
        snakepit.encoder(Selfish, lambda s: Selfish())
        reply = self.reply(lambda: Selfish())
        self.assertEqual(reply["error"]["type"], "ValueError")
        self.assertIn(
            "result of command 'f' has a tests.test_attachments.Selfish at value whose encoding nests more than 32",
            reply["error"]["message"],
        )

    def test_args_that_are_one_binary_value_are_not_an_object_or_array(self):
        worker = Worker({"f": lambda *a: a})
        msg = read_frame(
            io.BytesIO(attached('{"type":"call","id":1,"command":"f","args":{"__snakepit__":"bytes","att":0}}', [b"x"]))
        )
        reply = read_frame(io.BytesIO(frame_bytes(worker.respond(msg))))
        self.assertEqual(
            reply["error"]["message"], "args of command 'f' must be an object, an array or null, not bytes"
        )

    def test_init_args_may_hold_inline_binary_values(self):
        got = []
        worker = Worker({"setup": lambda blob: got.append(blob)})
        self.assertIsNone(worker.run_init("setup", '[{"__snakepit__":"bytes","b64":"AAEC"}]'))
        self.assertEqual(got, [b"\x00\x01\x02"])
        error = worker.run_init("setup", '[{"__snakepit__":"bytes","b64":"?"}]')
        self.assertEqual(error["type"], "ValueError")
        self.assertIn(
            "init command 'setup' failed: ValueError: args of command 'setup' cannot be decoded", error["message"]
        )


# --- numpy ----------------------------------------------------------------------------------------------


@needs_numpy
class NumpyTests(unittest.TestCase):
    def setUp(self):
        import numpy

        self.np = numpy

    def value(self, value):
        return round_trip({"type": "result", "id": 1, "value": value})["value"]

    def test_every_dtype_round_trips_as_the_same_dtype(self):
        np = self.np
        for name in _values.DTYPES:
            with self.subTest(dtype=name):
                a = np.array([0, 1, 1 if name == "bool" else 2], dtype=name)
                got = self.value(a)
                self.assertIs(type(got), np.ndarray)
                self.assertEqual((got.dtype.name, got.shape), (name, (3,)))
                self.assertTrue(np.array_equal(got, a))
                self.assertTrue(got.flags.writeable, "the command may change it in place")

    def test_shapes_zero_d_empty_and_many_dimensions(self):
        np = self.np
        for a in (
            np.array(3.5),
            np.zeros((0, 3), np.float32),
            np.zeros((2, 0)),
            np.arange(24, dtype=np.int16).reshape(2, 3, 4),
            np.ones((1,) * 10),
        ):
            with self.subTest(shape=a.shape):
                got = self.value(a)
                self.assertEqual((got.shape, got.dtype), (a.shape, a.dtype))
                self.assertTrue(np.array_equal(got, a))

    def test_any_layout_and_byte_order_goes_out_c_contiguous_and_little_endian(self):
        np = self.np
        big = np.array([1.0, -2.0], dtype=">f8")
        frame = encode_frame({"type": "result", "id": 1, "value": big})
        self.assertEqual(bytes(frame[1]), ONE + b"\x00\x00\x00\x00\x00\x00\x00\xc0")
        self.assertIn(b'"dtype":"float64"', frame[0])
        got = self.value(big)
        self.assertEqual(got.dtype.byteorder in "<=|", True)
        self.assertEqual(got.tolist(), [1.0, -2.0])
        fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
        self.assertEqual(
            bytes(encode_frame({"type": "result", "id": 1, "value": fortran})[1]), np.arange(6.0).tobytes()
        )
        strided = np.arange(10, dtype=np.int32)[::3]
        self.assertEqual(self.value(strided).tolist(), [0, 3, 6, 9])
        self.assertEqual(self.value(np.arange(4, dtype=">i4").reshape(2, 2).T).tolist(), [[0, 2], [1, 3]])

    def test_a_bool_array_holding_other_bytes_goes_out_as_zeros_and_ones(self):
        np = self.np
        odd = np.frombuffer(b"\x00\x02\x01\xff", dtype=np.bool_)
        frame = encode_frame({"type": "result", "id": 1, "value": odd})
        self.assertEqual(bytes(frame[1]), b"\x00\x01\x01\x01")
        self.assertEqual(self.value(odd).tolist(), [False, True, True, True])

    def test_numpy_dates_and_durations_are_refused_with_their_place(self):
        np = self.np
        for value in (np.timedelta64(5, "ns"), np.timedelta64(3, "s"), np.datetime64("2026-11-27")):
            with self.subTest(value=repr(value)):
                reply = Worker({"f": lambda v=value: {"when": [v]}}).respond(call("f", None, id=1))
                error = read_frame(io.BytesIO(frame_bytes(reply)))["error"]
                self.assertEqual(error["type"], "TypeError")
                self.assertIn('value["when"][0]', error["message"])
                self.assertIn("no JSON form", error["message"])

    def test_c_contiguous_little_endian_arrays_go_out_without_a_copy(self):
        a = self.np.arange(1000, dtype=self.np.float64)
        frame = encode_frame({"type": "result", "id": 1, "value": a})
        self.assertTrue(self.np.shares_memory(self.np.frombuffer(frame[1], dtype=self.np.uint8), a))

    def test_arrays_arrive_writable_without_a_second_copy(self):
        np = self.np
        msg = read_frame(
            io.BytesIO(frame_bytes(encode_frame({"type": "call", "id": 1, "command": "x", "args": [np.arange(4.0)]})))
        )
        got = msg["args"][0]
        base = got
        while isinstance(base, (np.ndarray, memoryview)):
            base = base.base if isinstance(base, np.ndarray) else base.obj
        self.assertIs(type(base), bytearray, "a view of the bytearray the attachment was read into")
        got += 1
        self.assertEqual(got.tolist(), [1.0, 2.0, 3.0, 4.0])
        inline = read_frame(
            io.BytesIO(
                plain(
                    '{"type":"call","id":1,"command":"x","args":[{"__snakepit__":"array","dtype":"int16","shape":[2],"b64":"AQD//w=="}]}'
                )
            )
        )
        self.assertEqual(inline["args"][0].tolist(), [1, -1])
        self.assertTrue(inline["args"][0].flags.writeable)

    def test_a_big_endian_array_from_anywhere_arrives_with_its_values(self):
        np = self.np
        a = np.array([[1, 2], [3, 4]], dtype=">u2")
        got = self.value({"a": a})["a"]
        self.assertEqual((got.dtype.name, got.tolist()), ("uint16", [[1, 2], [3, 4]]))

    def test_numpy_scalars(self):
        np = self.np
        value = {
            "b": np.bool_(True),
            "i": np.int64(-5),
            "u": np.uint64(2**64 - 1),
            "f32": np.float32(1.5),
            "f64": np.float64(0.1),
            "s": np.str_("é"),
            "y": np.bytes_(b"\x00z"),
        }
        frame = encode_frame({"type": "result", "id": 1, "value": value})
        self.assertIn(
            b'"b":true,"i":-5,"u":18446744073709551615,"f32":1.5,"f64":0.1,"s":"\xc3\xa9","y":{"__snakepit__":"bytes","att":0}',
            frame[0],
        )
        self.assertTrue(reaches_host_exactly(value))
        got = self.value(np.complex128(1 + 2j))
        self.assertEqual((got.shape, got.dtype.name, complex(got)), ((), "complex128", 1 + 2j))
        self.assertEqual(self.value([np.complex64(-1j)])[0].dtype.name, "complex64")

    def test_nan_and_infinity_scalars_are_refused_with_their_place(self):
        np = self.np
        for bad in (np.float32("nan"), np.float16("inf"), np.float64("-inf")):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    encode_frame({"type": "result", "id": 1, "value": {"x": [bad]}})
                kind, text = describe_problem({"x": [bad]})
                self.assertEqual(kind, "ValueError")
                self.assertIn(f'has the float {float(bad)} at value["x"][0]: JSON has no NaN or Infinity', text)

    def test_other_dtypes_are_a_type_error_naming_the_dtype_and_the_place(self):
        np = self.np
        cases = [
            (np.array([object()], dtype=object), "dtype object"),
            (np.array(["a", "bc"]), "dtype <U2"),
            (np.array(["2020-01-01"], dtype="datetime64[D]"), "dtype datetime64[D]"),
            (np.zeros(2, dtype=[("x", "f8"), ("y", "i4")]), "dtype [('x', '<f8'), ('y', '<i4')]"),
            (np.zeros(2, dtype=np.longdouble), f"dtype {np.dtype(np.longdouble)}"),
        ]
        for bad, named in cases:
            if bad.dtype.name in _values.DTYPES:  # longdouble is float64 on some platforms
                continue
            with self.subTest(named=named):
                with self.assertRaisesRegex(TypeError, "dtype"):
                    encode_frame({"type": "result", "id": 1, "value": {"ok": np.ones(2), "bad": [bad]}})
                kind, text = describe_problem({"ok": np.ones(2), "bad": [bad]})
                self.assertEqual(kind, "TypeError")
                self.assertIn(
                    f'has a numpy array of {named} at value["bad"][0]: arrays travel with one of the dtypes bool, int8',
                    text,
                )
        kind, text = describe_problem([np.datetime64("2020-01-01")])
        self.assertEqual(kind, "TypeError")
        self.assertIn("has a numpy.datetime64 at value[0]: numpy dates and durations have no JSON form", text)
        kind, text = describe_problem([np.ma.masked_array([1, 2], mask=[0, 1])])
        self.assertIn("has a numpy masked array at value[0]: its mask would be lost", text)

    def test_a_worker_answers_an_unsupported_dtype_with_a_clear_error_and_serves_on(self):
        np = self.np
        worker = Worker({"f": lambda: {"bad": np.array([object()], dtype=object)}, "g": lambda: np.arange(3)})
        reply = read_frame(io.BytesIO(frame_bytes(worker.respond(call("f", id=1)))))
        self.assertEqual(reply["error"]["type"], "TypeError")
        self.assertIn(
            "result of command 'f' has a numpy array of dtype object at value[\"bad\"]", reply["error"]["message"]
        )
        reply = read_frame(io.BytesIO(frame_bytes(worker.respond(call("g", id=2)))))
        self.assertEqual(reply["value"].tolist(), [0, 1, 2])

    def test_sending_does_not_import_numpy_and_receiving_does_when_an_array_arrives(self):
        script = (
            "import io, sys\n"
            "from snakepit.protocol import encode_frame, frame_bytes, read_frame\n"
            "import snakepit.worker\n"
            "frame = frame_bytes(encode_frame({'type': 'result', 'id': 1, 'value': [b'x', bytearray(1)]}))\n"
            "read_frame(io.BytesIO(frame))\n"
            "before = 'numpy' in sys.modules\n"
            "msg = read_frame(io.BytesIO(bytes.fromhex(sys.argv[1])))\n"
            "print(before, 'numpy' in sys.modules, type(msg['args'][0]).__name__)\n"
        )
        frame = plain(
            '{"type":"call","id":1,"command":"x","args":[{"__snakepit__":"array","dtype":"uint8","shape":[1],"b64":"AA=="}]}'
        )
        out = subprocess.run(
            [sys.executable, "-c", script, frame.hex()], cwd=PYTHON_DIR, capture_output=True, text=True, timeout=TIMEOUT
        )
        self.assertEqual(out.stdout.split(), ["False", "True", "ndarray"], out.stderr)


# --- writers -------------------------------------------------------------------------------------------


class PipeReader:
    """Reads everything from the read end of a pipe on a thread of its own (bounded wait)."""

    def __init__(self, test, fd, slow=False):
        self.data = []
        self.slow = slow
        self.fd = fd
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        test.addCleanup(self.thread.join, TIMEOUT)

    def _run(self):
        while True:
            chunk = os.read(self.fd, 4096 if self.slow else 1 << 20)
            if not chunk:
                os.close(self.fd)
                return
            self.data.append(chunk)
            if self.slow:
                threading.Event().wait(0.0005)

    def result(self):
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise AssertionError(f"the pipe did not end within {TIMEOUT}s")
        return b"".join(self.data)


class WritevTests(unittest.TestCase):
    def test_more_buffers_than_iov_max_through_a_pipe(self):
        buffers = [bytes([i % 256]) * (i % 7) for i in range(3000)]  # empty ones among them
        calls = []
        real = os.writev

        def counting(fd, bufs):
            calls.append(len(bufs))
            return real(fd, bufs)

        r, w = os.pipe()
        reader = PipeReader(self, r, slow=True)
        try:
            with unittest.mock.patch("os.writev", counting):
                writev_all(w, buffers)
        finally:
            os.close(w)
        self.assertEqual(reader.result(), b"".join(buffers))
        self.assertGreaterEqual(len(calls), 3)
        self.assertLessEqual(max(calls), protocol._IOV_MAX)
        self.assertLessEqual(protocol._IOV_MAX, 1024)

    def test_short_writes_are_finished_in_order(self):
        pieces = [b"head", memoryview(b"0123456789"), b"", bytearray(b"abc"), b"tail" * 300]
        for limit in (1, 3, 7, 1000):
            with self.subTest(limit=limit):
                out = []
                seen = []

                def short_writev(fd, bufs, limit=limit):
                    seen.append(len(bufs))
                    data = b"".join(bytes(b) for b in bufs)[:limit]
                    out.append(data)
                    return len(data)

                with unittest.mock.patch("os.writev", short_writev):
                    writev_all(99, pieces)
                self.assertEqual(b"".join(out), b"".join(bytes(p) for p in pieces))
                self.assertGreater(len(seen), 1)

    def test_the_frame_writers_take_frames_with_attachments(self):
        frames = [encode_frame({"type": "chunk", "id": i, "value": [b"v" * (i * 5000), "text"]}) for i in range(1, 6)]
        frames.append(encode_frame({"type": "result", "id": 9, "value": None}))
        for threaded in (False, True):
            with self.subTest(threaded=threaded):
                r, w = os.pipe()
                reader = PipeReader(self, r)
                try:
                    write = _frame_writer(w, threaded)
                    for data in frames:
                        write(data)
                finally:
                    os.close(w)
                self.assertEqual(reader.result(), b"".join(frame_bytes(f) for f in frames))


class ThreadProfileWritingTests(unittest.TestCase):
    def test_frames_from_many_threads_never_interleave(self):
        r, w = os.pipe()
        send = _reply_sender(_frame_writer(w, threaded=True))
        received = []

        def receive():
            with os.fdopen(r, "rb") as stream:
                while True:
                    msg = read_frame(stream)
                    if msg is None:
                        return
                    received.append(msg)

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        barrier = threading.Barrier(8, timeout=TIMEOUT)

        def sender(n):
            barrier.wait()
            for i in range(20):
                fill = bytes([n * 20 + i])
                if i % 3 == 0:
                    send(encode_frame({"type": "result", "id": n * 100 + i, "value": "plain"}))
                else:
                    send(
                        encode_frame(
                            {"type": "result", "id": n * 100 + i, "value": [fill * 70000, bytearray(fill * 3)]}
                        )
                    )

        threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertFalse(any(t.is_alive() for t in threads))
        os.close(w)
        receiver.join(TIMEOUT)
        self.assertFalse(receiver.is_alive())
        self.assertEqual(sorted(m["id"] for m in received), sorted(n * 100 + i for n in range(8) for i in range(20)))
        for msg in received:
            n, i = divmod(msg["id"], 100)
            fill = bytes([n * 20 + i])
            self.assertEqual(msg["value"], "plain" if i % 3 == 0 else [fill * 70000, fill * 3])

    def test_the_locked_frame_writer_keeps_a_frame_whole_across_short_writes(self):
        r, w = os.pipe()
        write = _frame_writer(w, threaded=True)
        reader = PipeReader(self, r, slow=True)  # a slow host: each writev writes part of a frame
        frames = {n: encode_frame({"type": "chunk", "id": n, "value": [bytes([n]) * 100000]}) for n in range(6)}
        barrier = threading.Barrier(6, timeout=TIMEOUT)

        def writer(n):
            barrier.wait()
            for _ in range(3):
                write(frames[n])

        threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertFalse(any(t.is_alive() for t in threads))
        os.close(w)
        got = _split(reader.result())
        self.assertEqual(sorted(m["id"] for m in got), sorted(list(range(6)) * 3))
        self.assertTrue(all(m["value"] == [bytes([m["id"]]) * 100000] for m in got))

    def blocked_writer(self, fail=False):
        """A write() whose first call blocks until ``release`` is set (and then fails if
        ``fail``), recording the frames of each call."""
        writing = threading.Event()
        release = threading.Event()
        writes = []
        first = []

        def write(data):
            if not first:
                first.append(True)
                writing.set()
                if not release.wait(TIMEOUT):
                    raise AssertionError("never released")
                if fail:
                    raise BrokenPipeError(32, "Broken pipe")
            writes.append(frame_bytes(data))

        return write, writing, release, writes

    def test_a_frame_with_attachments_is_written_before_its_send_returns(self):
        write, writing, release, writes = self.blocked_writer()
        send = _reply_sender(write)
        writer, _ = run_in_thread(send, encode_frame({"type": "pong", "id": 0}))
        self.assertTrue(writing.wait(TIMEOUT))
        buffer = bytearray(b"first")
        chunk = encode_frame({"type": "chunk", "id": 1, "value": buffer})
        later, outcome = run_in_thread(send, chunk)
        plain_sender, plain_outcome = run_in_thread(send, encode_frame({"type": "pong", "id": 2}))
        plain_sender.join(TIMEOUT)
        self.assertEqual(plain_outcome, ["returned"], "a plain frame is left to the writer")
        later.join(0.2)
        self.assertTrue(later.is_alive(), "returned before its borrowed buffer was written")
        release.set()
        later.join(TIMEOUT)
        writer.join(TIMEOUT)
        self.assertEqual(outcome, ["returned"])
        buffer[:] = b"later"  # the command may reuse it now: what was sent stays
        frames = [m for w in writes for m in _split(w)]
        self.assertEqual(frames[0], {"type": "pong", "id": 0})
        self.assertEqual(
            sorted(frames[1:], key=lambda m: m["id"]),
            [{"type": "chunk", "id": 1, "value": b"first"}, {"type": "pong", "id": 2}],
        )

    def test_frames_left_keep_their_order(self):
        write, writing, release, writes = self.blocked_writer()
        send = _reply_sender(write)
        writer, _ = run_in_thread(send, encode_frame({"type": "pong", "id": 0}))
        self.assertTrue(writing.wait(TIMEOUT))

        def stream():
            send(encode_frame({"type": "chunk", "id": 1, "value": "one"}))  # left, returns
            send(encode_frame({"type": "chunk", "id": 1, "value": b"two"}))  # waits
            send(encode_frame({"type": "result", "id": 1, "value": None}))

        streamer, outcome = run_in_thread(stream)
        streamer.join(0.2)
        release.set()
        streamer.join(TIMEOUT)
        writer.join(TIMEOUT)
        self.assertEqual(outcome, ["returned"])
        values = [m.get("value") for w in writes for m in _split(w)]
        self.assertEqual(values, [None, "one", b"two", None])

    def test_a_failed_write_goes_to_its_writer_and_a_waiting_frame_still_goes_out(self):
        write, writing, release, writes = self.blocked_writer(fail=True)
        send = _reply_sender(write)
        writer, writer_outcome = run_in_thread(send, encode_frame({"type": "pong", "id": 0}))
        self.assertTrue(writing.wait(TIMEOUT))
        waiter, outcome = run_in_thread(send, encode_frame({"type": "chunk", "id": 1, "value": b"kept"}))
        waiter.join(0.2)
        self.assertTrue(waiter.is_alive())
        release.set()
        writer.join(TIMEOUT)
        waiter.join(TIMEOUT)
        self.assertIsInstance(writer_outcome[0], BrokenPipeError)
        self.assertEqual(outcome, ["returned"])
        self.assertEqual([m["value"] for w in writes for m in _split(w)], [b"kept"])


def _raw_frames(data):
    """(has attachments, JSON bytes) for each frame in ``data``."""
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        if length < 0x8000_0000:
            frames.append((False, data[4 : 4 + length]))
            data = data[4 + length :]
            continue
        json_size = length - 0x8000_0000
        (count,) = struct.unpack(">I", data[4:8])
        sizes = struct.unpack(f">{count}Q", data[8 : 8 + 8 * count])
        start = 8 + 8 * count
        frames.append((True, data[start : start + json_size]))
        data = data[start + json_size + sum(sizes) :]
    return frames


# --- the worker, end to end --------------------------------------------------------------------------


def credit(rid, n):
    return {"type": "credit", "id": rid, "n": n}


class WorkerTests:
    """The same behaviour in both profiles (THREADS: 0 for serve, else serve_threaded)."""

    THREADS = 0

    def setUp(self):
        self.seen = queue.Queue()

        def same(*args):
            return list(args)

        def kinds(*args):
            self.seen.put(args)
            return [type(a).__name__ for a in args]

        def filled(n, size):
            buffer = bytearray(size)
            for i in range(n):
                buffer[:] = bytes([i]) * size
                yield buffer
            return bytes(buffer[:3])

        def keep(blob, session):
            session["blob"] = blob
            return len(blob)

        def kept(session):
            snakepit.progress(1, 1, "found")
            return session["blob"]

        self.worker = Worker(
            {"same": same, "kinds": kinds, "filled": filled, "keep": keep, "kept": kept},
            session_commands=["keep", "kept"],
        )

    def host(self):
        return Host(self, self.worker, self.THREADS).start()

    def test_calls_with_attachments_get_bytes_and_arrays_and_the_replies_carry_them_back(self):
        host = self.host()
        with no_numpy():
            arr = snakepit.Array("float64", (2,), ONE * 2)
            host.send(call("kinds", [b"\x00" * 100000, arr, {"x": bytearray(b"y")}], id=1))
            self.assertEqual(host.recv(), {"type": "result", "id": 1, "value": ["bytes", "Array", "dict"]})
            args = self.seen.get(timeout=TIMEOUT)
            self.assertEqual((args[0], args[1], args[2]), (b"\x00" * 100000, arr, {"x": b"y"}))
            host.send(*[call("same", [bytes([i]) * (i * 1000), arr], id=10 + i) for i in range(20)])
            replies = {m["id"]: m["value"] for m in (host.recv() for _ in range(20))}
        self.assertEqual(replies, {10 + i: [bytes([i]) * (i * 1000), arr] for i in range(20)})
        self.assertEqual(host.finish(), "returned")
        for data in host.writes:  # each write held whole frames, whatever their kind
            self.assertTrue(_split(data))

    def test_a_stream_that_refills_one_buffer_sends_each_chunk_as_it_was(self):
        host = self.host()
        host.send(call("filled", [12, 50000], id=3, window=4))
        chunks = [host.recv() for _ in range(4)]
        host.send(credit(3, 100))
        chunks += [host.recv() for _ in range(8)]
        self.assertEqual([c["type"] for c in chunks], ["chunk"] * 12)
        for i, c in enumerate(chunks):
            self.assertEqual(c["value"], bytes([i]) * 50000, f"chunk {i}")
        self.assertEqual(host.recv(), {"type": "result", "id": 3, "value": bytes([11]) * 3})
        self.assertEqual(host.finish(), "returned")

    def test_calls_with_attachments_that_come_while_a_stream_waits_for_credit(self):
        host = self.host()
        host.send(call("filled", [3, 10], id=1, window=1))
        self.assertEqual(host.recv()["value"], bytes(10))
        host.send(call("same", [b"during", bytearray(70000)], id=2))  # read by the waiting stream
        if self.THREADS:  # another thread answers it at once
            self.assertEqual(host.recv(), {"type": "result", "id": 2, "value": [b"during", bytes(70000)]})
        host.send(credit(1, 5))
        got = host.recv_until(1)
        self.assertEqual([m["value"] for m in got if m["type"] == "chunk"], [bytes([1]) * 10, bytes([2]) * 10])
        if not self.THREADS:  # after the stream, in order
            self.assertEqual(host.recv(), {"type": "result", "id": 2, "value": [b"during", bytes(70000)]})
        self.assertEqual(host.finish(), "returned")

    def test_sessions_keep_binary_values_and_progress_stays_json(self):
        host = self.host()
        host.send(call("keep", [b"\x01\x02"], id=1, session="s1"))
        self.assertEqual(host.recv(), {"type": "result", "id": 1, "value": 2})
        host.send(call("kept", id=2, session="s1"))
        got = host.recv_until(2)
        self.assertEqual(got[0], {"type": "progress", "id": 2, "done": 1, "total": 1, "message": "found"})
        self.assertEqual(got[-1], {"type": "result", "id": 2, "value": b"\x01\x02"})
        kinds = [(attached, json_text) for w in host.writes for attached, json_text in _raw_frames(w)]
        progress = [attached for attached, json_text in kinds if json_text.startswith(b'{"type":"progress"')]
        self.assertEqual(progress, [False], "a progress frame is plain")
        self.assertIn((True, b'{"type":"result","id":2,"value":{"__snakepit__":"bytes","att":0}}'), kinds)
        self.assertEqual(host.finish(), "returned")


class ProcessProfileTests(WorkerTests, unittest.TestCase):
    THREADS = 0


class ThreadProfileTests(WorkerTests, unittest.TestCase):
    THREADS = 4


class WorkerProcessTests(unittest.TestCase):
    """A real `python -m snakepit` worker with the attachments adapter."""

    def start(self, *args):
        from tests.test_worker import WorkerProcess

        worker = WorkerProcess("--adapter", "tests.attachments_adapter", *args)
        self.addCleanup(worker.close)
        ready = worker.recv()
        self.assertEqual((ready["type"], ready["info"]["protocol_version"]), ("ready", 4))
        return worker

    def exchange(self, worker, msg):
        worker.send_bytes(frame_bytes(encode_frame(msg)))
        return worker.recv()

    def test_binary_values_both_ways_in_both_profiles(self):
        for args in ((), ("--threads", "3")):
            with self.subTest(args=args):
                w = self.start(*args)
                self.assertEqual(self.exchange(w, call("numpy_loaded", id=1))["value"], False, "numpy at start-up")
                blob = os.urandom(300000)
                arr = snakepit.Array("int32", (2, 2), struct.pack("<4i", 1, -2, 3, -4))
                with no_numpy():
                    reply = self.exchange(w, call("same", [blob, arr, {"n": 1}], id=2))
                self.assertEqual(reply["value"], [blob, arr, {"n": 1}])
                reply = self.exchange(w, call("kinds", [arr], id=3))
                expected = [["ndarray", True]] if HAVE_NUMPY else [["Array", None]]
                self.assertEqual(reply["value"], expected)
                w.send_bytes(
                    b"".join(
                        frame_bytes(encode_frame(call("same", [bytes([i]) * 70000], id=10 + i))) for i in range(10)
                    )
                )
                replies = {m["id"]: m["value"] for m in (w.recv() for _ in range(10))}
                self.assertEqual(replies, {10 + i: [bytes([i]) * 70000] for i in range(10)})
                w.send({"type": "shutdown"})
                self.assertIsNone(w.recv())
                self.assertEqual(w.wait(), 0)


if __name__ == "__main__":
    unittest.main()
