"""Framing of the host <-> worker protocol.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
UTF-8 JSON: one JSON object with a string "type" key. The length counts the
payload only, not the header.

Version 3 adds streams, cancellation and progress (see "streams, cancellation and progress"
below): a ``call`` may carry a ``window``; the host sends ``credit`` and ``cancel``; the worker
sends ``chunk`` and ``progress``. Every frame the worker sends about a call starts with
``{"type":...,"id":...``, so the host can tell which call it concerns from its first bytes.
"""

import json
import os
import struct
from array import array as _array
from collections import deque as _deque
from itertools import chain, compress, repeat
from operator import is_

PROTOCOL_VERSION = 3
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


# --- exactness of a reply's value ------------------------------------------------------
#
# json.dumps writes some values that the host (serde_json, without arbitrary precision) does
# not read back as they were: it turns int, float, bool and None dict keys into strings
# ({1: "a", "1": "b"} arrives as {"1": "b"}), and it writes integers of any size, where the
# host holds only -2**63 .. 2**64-1 exactly (a larger one becomes a float, or fails to
# decode). So a reply's value passes two checks beyond the encoder's own (which refuses NaN,
# Infinity and whatever is not JSON): reaches_host_exactly, cheap, and describe_problem, slow,
# which says what is wrong and where when the first one fails.

INT_MIN = -(1 << 63)  # the host's integers: i64 and u64
INT_MAX = (1 << 64) - 1

_LEAVES = frozenset((str, float, bool, type(None)))
_join = "".join
_chain = chain.from_iterable
_conjugate = float.conjugate  # TypeError for anything but a float: a C-speed type check
_dict_values = dict.values


def reaches_host_exactly(value):
    """Cheap check of a value the encoder accepted: True when every dict key in ``value`` is
    a str and every integer is within INT_MIN .. INT_MAX. False means "look closer"
    (describe_problem): something is wrong, or the value holds subclasses of int, dict, list
    or tuple, which this check leaves to the closer look.

    Only dicts, lists and tuples are gone into. The items of a small container are checked
    one by one (those of the value itself right here: most replies are a small dict or list);
    a container of more than _SMALL items is checked in bags of items of one type, one C-level
    pass per bag (_bags_ok).
    """
    kind = type(value)
    nested = None  # the containers found in a small dict or list, for _walk_ok
    if kind is dict:
        if len(value) > _SMALL:
            return _walk_ok([value])
        for key in value:
            if type(key) is not str and not isinstance(key, str):
                return False
            item = value[key]
            kind = type(item)
            if kind is int:
                if not -0x8000000000000000 <= item <= 0xFFFFFFFFFFFFFFFF:  # INT_MIN .. INT_MAX
                    return False
            elif kind is not str and kind not in _LEAVES:
                if nested is None:
                    nested = [item]
                else:
                    nested.append(item)
    elif kind is list:
        if len(value) > _SMALL:
            return _walk_ok([value])
        for item in value:
            kind = type(item)
            if kind is int:
                if not -0x8000000000000000 <= item <= 0xFFFFFFFFFFFFFFFF:
                    return False
            elif kind is not str and kind not in _LEAVES:
                if nested is None:
                    nested = [item]
                else:
                    nested.append(item)
    elif kind in _LEAVES:  # NaN and Infinity never get here: the encoder refuses them
        return True
    elif kind is int:
        return INT_MIN <= value <= INT_MAX
    else:
        return _walk_ok([value])
    return nested is None or _walk_ok(nested)


_SMALL = 32  # items: a larger container goes to _bags_ok, whose C passes cost more to start


def _walk_ok(stack):
    """reaches_host_exactly for every item of ``stack`` (a list it empties): an explicit-stack
    walk that pushes only containers (and subclasses of the JSON types)."""
    push = stack.append
    pop = stack.pop
    while stack:
        node = pop()
        kind = type(node)
        if kind is dict:
            if len(node) > _SMALL:
                if not _bags_ok([[node]]):
                    return False
                continue
            for key in node:
                if type(key) is not str and not isinstance(key, str):
                    return False
            items = node.values()
        elif kind is list or kind is tuple:
            if len(node) > _SMALL:
                if not _bags_ok([node]):
                    return False
                continue
            items = node
        elif kind is int:  # the value itself (items that are ints are checked below)
            if not INT_MIN <= node <= INT_MAX:
                return False
            continue
        elif kind in _LEAVES or issubclass(kind, (str, float)):
            continue
        else:  # a subclass of int, dict, list or tuple
            return False
        for item in items:
            kind = type(item)
            if kind is int:
                if not -0x8000000000000000 <= item <= 0xFFFFFFFFFFFFFFFF:
                    return False
            elif kind is not str and kind not in _LEAVES:
                push(item)
    return True


def _bags_ok(bags):
    """reaches_host_exactly for every item of ``bags``: lists or tuples of items, not empty.

    A bag of one type is checked in one C-level pass: "".join for strings (it copies them,
    still far cheaper than encoding them), float.conjugate for floats, array("q") for integers
    (it holds the i64 range; above that, a Python loop), a set of types for the rest.
    Containers are not visited one by one either: the items of a bag of lists become one bag;
    the keys of a bag of dicts are checked together (the set of them, "".join again) and their
    values become one bag per column when the dicts have equal sizes (records, whose columns
    tend to hold one type each), else one bag. A bag of mixed types is split by type, by C
    code too.
    """
    pop = bags.pop
    push = bags.append
    while bags:
        bag = pop()
        first = type(bag[0])
        try:
            if first is str:
                _join(bag)
                continue
            if first is float:
                _deque(map(_conjugate, bag), 0)  # consumed by C code, nothing kept
                continue
            if first is int:
                _array("q", bag)
                continue
        except (TypeError, OverflowError):
            pass  # not of one type, or integers beyond i64: see below
        kinds = set(map(type, bag))
        if kinds <= _LEAVES:
            continue
        if len(kinds) > 1:  # one bag per type that needs a look
            for kind in kinds:
                if kind not in _LEAVES:
                    push(list(compress(bag, map(is_, map(type, bag), repeat(kind)))))
            continue
        if first is dict:
            # Every key a str: "".join raises TypeError otherwise. For several dicts, the set of
            # their keys stands for them all (a key that is not a str never equals one).
            try:
                _join(bag[0] if len(bag) == 1 else set().union(*bag))
            except TypeError:
                return False
            if len(bag) == 1:
                values = list(bag[0].values())
            elif len(set(map(len, bag))) == 1:  # records: a bag per column
                bags.extend(zip(*map(_dict_values, bag)))
                continue
            else:
                values = list(_chain(map(_dict_values, bag)))
            if values:
                push(values)
        elif first is list or first is tuple:
            items = bag[0] if len(bag) == 1 else list(_chain(bag))
            if items:
                push(items)
        elif first is int:  # integers beyond i64 (array refused them): some may still fit u64
            for item in bag:
                if not INT_MIN <= item <= INT_MAX:
                    return False
        elif not issubclass(first, (str, float)):  # a subclass of int, dict, list or tuple
            return False
    return True


_CLOSE = object()  # describe_problem's marker: a container's items are all done
_KEY = object()  # describe_problem's marker: a dict key to check


def describe_problem(value, root="value"):
    """The first thing in ``value``, in the order the encoder writes it, that does not reach the
    host as itself: ``(error type name, text)`` with text like ``has a dict key 1 (an int) at
    value["a"][3]: JSON object keys must be strings``; None when there is nothing.

    Slow (Python code for every item): for a value the encoder refused, or one that
    reaches_host_exactly did not pass. Finds non-str dict keys, integers out of the host's range,
    NaN and Infinity, objects that are not JSON, containers that contain themselves and strings
    that UTF-8 cannot carry (lone surrogates).
    """
    stack = [(value, None, None)]  # (item, marker or None, path); a path is (parent path, key)
    pop = stack.pop
    push = stack.append
    open_ids = set()  # the containers being written: meeting one again is a cycle
    while stack:
        item, marker, path = pop()
        if marker is _CLOSE:
            open_ids.discard(item)
            continue
        if marker is _KEY:
            if not isinstance(item, str):
                return "TypeError", (
                    f"has a dict key {_short_repr(item)}{_type_note(item)} at {_place(root, path)}: "
                    "JSON object keys must be strings"
                )
            if not _utf8_ok(item):
                return "UnicodeEncodeError", (
                    f"has a dict key with a lone surrogate, {_short_repr(item)}, at {_place(root, path)}: "
                    "UTF-8 cannot carry it"
                )
            continue
        if isinstance(item, str):
            if not _utf8_ok(item):
                return "UnicodeEncodeError", (
                    f"has a string with a lone surrogate, {_short_repr(item)}, at {_place(root, path)}: "
                    "UTF-8 cannot carry it"
                )
        elif item is None or item is True or item is False:
            pass
        elif isinstance(item, int):
            if not INT_MIN <= item <= INT_MAX:
                return "ValueError", (
                    f"has {_describe_int(item)} at {_place(root, path)}: the host holds integers from "
                    "-2**63 to 2**64-1 exactly; return a larger one as a string (or as a float, if "
                    "rounding is acceptable)"
                )
        elif isinstance(item, float):
            if item != item or item in (_INF, -_INF):
                return "ValueError", f"has the float {item!r} at {_place(root, path)}: JSON has no NaN or Infinity"
        elif isinstance(item, (dict, list, tuple)):
            oid = id(item)
            if oid in open_ids:
                return "ValueError", (
                    f"has a circular reference at {_place(root, path)}: a container that contains itself"
                )
            open_ids.add(oid)
            push((oid, _CLOSE, None))
            if isinstance(item, dict):
                for key, child in reversed(list(item.items())):
                    push((child, None, (path, key)))
                    push((key, _KEY, path))
            else:
                for index in range(len(item) - 1, -1, -1):
                    push((item[index], None, (path, index)))
        else:
            return "TypeError", f"has {_article(type(item).__qualname__)} at {_place(root, path)}: it is not JSON-serialisable"
    return None


_INF = float("inf")


def utf8_safe(text):
    """``text`` with anything UTF-8 cannot carry (lone surrogates) escaped, so that an error
    report or a progress message can always be sent."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _utf8_ok(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _place(root, path):
    """``value["a"][3]`` for a path of (parent, key) pairs; a long one keeps its ends."""
    parts = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if type(key) is int else "[" + _short_repr(key, quote=True) + "]")
    parts.reverse()
    if len(parts) > 24:
        parts[10:-10] = [f"...({len(parts) - 20} more levels)..."]
    return root + "".join(parts)


def _short_repr(obj, quote=False, limit=60):
    try:
        text = json.dumps(obj, ensure_ascii=False) if quote and isinstance(obj, str) else repr(obj)
    except Exception:
        text = f"<unprintable {type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_note(key):
    if key is None:
        return ""
    return f" ({_article(type(key).__qualname__)})"


def _article(name):
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _describe_int(number):
    """``the integer 18446744073709551616``, or for a long one ``an integer of 401 digits``."""
    size = abs(number)
    if size.bit_length() <= 256:
        return f"the integer {int(number)}"
    digits = int(size.bit_length() * 0.30102999566398120)  # log10(2); at most one short
    if size >= 10**digits:
        digits += 1
    sign = "a negative" if number < 0 else "an"
    return f"{sign} integer of {digits} digits"


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


# --- streams, cancellation and progress (version 3) --------------------------------------
#
# Host -> worker:
#   {"type":"call",...,"window":N}       a stream: the worker may send N chunks before more credit
#   {"type":"credit","id":I,"n":K}       K more chunks for stream I
#   {"type":"cancel","id":I,"force":F}   cancel call I; F: interrupt it (the second step)
# Worker -> host:
#   {"type":"chunk","id":I,"value":V}    one item of stream I
#   {"type":"progress","id":I,"done":D,"total":T,"message":M}
# A stream ends with the call's usual result (the generator's return value) or error reply; a
# cancelled call with an error reply of type "Cancelled". A credit or cancel for an id the
# worker does not know (a call that already ended) is ignored.
#
# The process profile's main thread is busy in the command while a call runs, so there the
# host asks for a cancel through a file the worker maps (--cancel-file): CANCEL_FILE_SIZE bytes
# of ASCII "<call id> <step>", padded with spaces; step 1 asks, step 2 interrupts (the host
# then also sends SIGINT).

CANCEL_FILE_SIZE = 32


def stream_window(msg):
    """A call's ``window``: None for a plain call, else the stream's first credit (an int >= 1).

    Raises ProtocolError for a window that is not an integer of at least 1.
    """
    window = msg.get("window")
    if window is None or (type(window) is int and window >= 1):
        return window
    raise ProtocolError(f"the 'window' of a call must be an integer of at least 1, not {_json_text(window)}")


def parse_credit(msg):
    """``(id, n)`` of a ``credit`` message; ProtocolError unless both are integers, n >= 0."""
    rid, n = msg.get("id"), msg.get("n")
    if type(rid) is not int:
        raise ProtocolError(f"'credit' message needs an integer 'id', not {_json_text(rid)}")
    if type(n) is not int or n < 0:
        raise ProtocolError(f"'credit' message needs a non-negative integer 'n', not {_json_text(n)}")
    return rid, n


def parse_cancel(msg):
    """``(id, force)`` of a ``cancel`` message; ``force`` absent is False. ProtocolError unless
    the id is an integer and force a boolean."""
    rid, force = msg.get("id"), msg.get("force", False)
    if type(rid) is not int:
        raise ProtocolError(f"'cancel' message needs an integer 'id', not {_json_text(rid)}")
    if type(force) is not bool:
        raise ProtocolError(f"the 'force' of a 'cancel' message must be a boolean, not {_json_text(force)}")
    return rid, force


def chunk_message(rid, value):
    """The ``chunk`` frame's message: "type" first, "id" second (the host reads them first)."""
    return {"type": "chunk", "id": rid, "value": value}


def progress_message(rid, done, total=None, message=None):
    """The ``progress`` frame's message, "type" first and "id" second; every key is present."""
    return {"type": "progress", "id": rid, "done": done, "total": total, "message": message}


def parse_cancel_file(data):
    """``(call id, step)`` from the cancel file's bytes, or ``(None, 0)`` when they hold no
    request (the spaces the host starts with, or anything unreadable)."""
    parts = data.split()
    if len(parts) != 2:
        return None, 0
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return None, 0


def format_cancel_file(rid, step):
    """The cancel file's bytes asking for ``step`` (1: ask, 2: interrupt) of call ``rid``:
    what the host writes, here for tests and as its specification."""
    text = f"{rid} {step}".encode("ascii")
    if len(text) > CANCEL_FILE_SIZE:
        raise ValueError(f"cancel request {text!r} is longer than {CANCEL_FILE_SIZE} bytes")
    return text.ljust(CANCEL_FILE_SIZE, b" ")


def _json_text(value):
    """``value`` as an error message names it: its JSON type, and the value itself when short
    (``null``, ``number 0``, ``string "3"``, ``boolean true``)."""
    kind = _JSON_KINDS.get(type(value), type(value).__name__)
    if value is None:
        return kind
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return kind
    return f"{kind} {text}" if len(text) <= 30 else kind


_JSON_KINDS = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}
