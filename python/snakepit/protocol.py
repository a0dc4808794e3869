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
_HEADER_SIZE = _HEADER.size
_unpack_header = _HEADER.unpack
_pack_header = _HEADER.pack


def _make_encoder():
    """Return ``encode(obj) -> str``: exactly ``json.dumps(obj, allow_nan=False,
    separators=(",", ":"), ensure_ascii=False)``, without its per-call overhead.

    json.dumps with options builds a new JSONEncoder on every call, and
    JSONEncoder.encode then goes through iterencode(); for a dict this calls the C
    encoder straight away, with the same arguments iterencode() would pass it (a
    fresh circular-reference ``markers`` dict each call, so it is safe from several
    threads). Anything else, or a Python without the C encoder, takes
    JSONEncoder.encode, as does every Python where the shortcut does not give
    byte-identical output for a sample.
    """
    encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    slow = encoder.encode
    try:
        from json.encoder import c_make_encoder, encode_basestring
    except ImportError:
        return slow
    if c_make_encoder is None:
        return slow
    default = encoder.default
    indent = encoder.indent
    key_separator = encoder.key_separator
    item_separator = encoder.item_separator
    sort_keys = encoder.sort_keys
    skipkeys = encoder.skipkeys
    allow_nan = encoder.allow_nan
    join = "".join

    def encode(obj):
        if type(obj) is not dict:
            return slow(obj)
        # encode_basestring is what iterencode() picks for ensure_ascii=False.
        c_encode = c_make_encoder(
            {}, default, encode_basestring, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan
        )
        return join(c_encode(obj, 0))

    sample = {"type": "result", "id": 1, "value": [None, True, 1.5, -2, "é\n\"", {"k": []}]}
    try:
        if encode(sample) == slow(sample):
            return encode
    except Exception:
        pass
    return slow


def _make_decoder():
    """Return ``decode(text) -> object``: exactly ``json.loads(text)``, faster for a compact
    object.

    The scanner behind JSONDecoder.decode is called directly; whatever it does not parse
    in one go from the first character to the last (leading or trailing whitespace, a
    byte-order mark, bad JSON) goes to json.loads, for its exact result or exception.
    """
    scan_once = json.JSONDecoder().scan_once
    loads = json.loads

    def decode(text):
        try:
            obj, end = scan_once(text, 0)
        except (StopIteration, ValueError, RecursionError):
            return loads(text)
        if end != len(text):
            return loads(text)
        return obj

    return decode


_encode = _make_encoder()
_decode = _make_decoder()


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
    # The worker's hot path: two read() calls for a whole frame when the stream
    # delivers what is asked (a blocking buffered reader does); _read_rest() loops
    # over short reads otherwise.
    header = stream.read(_HEADER_SIZE)
    if not header:
        return None
    if len(header) != _HEADER_SIZE:
        header = _read_rest(stream, header, _HEADER_SIZE)
        if len(header) < _HEADER_SIZE:
            raise ProtocolError(f"truncated frame header: got {len(header)} of {_HEADER_SIZE} bytes")
    (length,) = _unpack_header(header)
    if length > max_size:
        raise FrameTooLarge(length, max_size)
    payload = stream.read(length)
    if payload is None or len(payload) != length:
        payload = _read_rest(stream, payload, length) if payload else b""
        if len(payload) < length:
            raise ProtocolError(f"truncated frame body: got {len(payload)} of {length} bytes")
    return decode_payload(payload)


def decode_payload(payload):
    """Decode a frame's payload bytes into a message dict."""
    try:
        msg = _decode(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not valid UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if type(msg) is not dict:  # json makes plain dicts only
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
    payload = _encode(msg).encode("utf-8")
    size = len(payload)
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    return _pack_header(size) + payload


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
    written = os.write(fd, data)
    if written != len(data):  # a short write: a signal, or a non-blocking fd
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


def _read_rest(stream, data, n):
    """``data`` (fewer than ``n`` bytes already read) plus reads until there are ``n``
    bytes; fewer only at EOF."""
    parts = [data]
    got = len(data)
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
