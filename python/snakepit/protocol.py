"""Framing of the host <-> worker protocol.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
UTF-8 JSON: one JSON object with a string "type" key. The length counts the
payload only, not the header.
"""

import json
import os
import struct

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The byte stream does not follow the protocol."""


class FrameTooLarge(ProtocolError):
    """A frame's payload is longer than the agreed maximum."""

    def __init__(self, size, limit):
        super().__init__(f"frame payload of {size} bytes exceeds the maximum of {limit} bytes")
        self.size = size
        self.limit = limit


def read_frame(stream, max_size=DEFAULT_MAX_FRAME):
    """Read one message from the binary ``stream``.

    Returns the decoded dict, or None on a clean EOF between frames. Raises
    ProtocolError for anything else that is not a well-formed frame; the
    length is checked against ``max_size`` before the body is read.
    """
    header = _read_exact(stream, _HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise ProtocolError(f"truncated frame header: got {len(header)} of {_HEADER.size} bytes")
    (length,) = _HEADER.unpack(header)
    if length > max_size:
        raise FrameTooLarge(length, max_size)
    payload = _read_exact(stream, length)
    if len(payload) < length:
        raise ProtocolError(f"truncated frame body: got {len(payload)} of {length} bytes")
    return decode_payload(payload)


def decode_payload(payload):
    """Decode a frame's payload bytes into a message dict."""
    try:
        msg = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not valid UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame holds a JSON {type(msg).__name__}, not an object")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("frame has no string 'type' key")
    return msg


def encode_frame(msg, max_size=DEFAULT_MAX_FRAME):
    """Return header + payload for ``msg`` as one bytes object.

    Raises TypeError/ValueError when ``msg`` is not strict JSON (NaN and
    Infinity are refused) and FrameTooLarge when the payload exceeds
    ``max_size``.
    """
    payload = json.dumps(msg, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(payload) > max_size:
        raise FrameTooLarge(len(payload), max_size)
    return _HEADER.pack(len(payload)) + payload


def write_frame(target, msg, max_size=DEFAULT_MAX_FRAME):
    """Encode ``msg`` and write it to ``target``: a file descriptor or a binary stream."""
    data = encode_frame(msg, max_size)
    if isinstance(target, int):
        write_all(target, data)
    else:
        target.write(data)
        target.flush()


def write_all(fd, data):
    """os.write ``data`` to ``fd`` until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(stream, n):
    """Read ``n`` bytes, looping over short reads; fewer only at EOF."""
    data = stream.read(n)
    if not data or len(data) == n:
        return data or b""
    parts = [data]
    got = len(data)
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
