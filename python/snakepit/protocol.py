"""Framing of the host <-> worker protocol.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
UTF-8 JSON: one JSON object with a string "type" key. The length counts the
payload only, not the header.

Version 3 adds streams, cancellation and progress (see "streams, cancellation and progress"
below): a ``call`` may carry a ``window``; the host sends ``credit`` and ``cancel``; the worker
sends ``chunk`` and ``progress``. Every frame the worker sends about a call starts with
``{"type":...,"id":...``, so the host can tell which call it concerns from its first bytes.

Version 4 adds frames with binary attachments, told apart by the top bit of the length (see
"frames with attachments" below), and the JSON objects that refer to them (_values.py): bytes
and arrays travel without base64 and, on the way out, without a copy.
"""

import json
import os
import struct
from array import array as _array
from collections import deque as _deque
from itertools import chain, compress, repeat
from operator import is_

PROTOCOL_VERSION = 4
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


def _make_encoder_with(use_c=True):
    """Return ``encode_with(obj, default, markers) -> str``: _encode's text for ``obj``, with
    ``default(o)`` called for each ``o`` that is not JSON, whose answer is written in its place.

    ``markers`` is the encoder's circular-reference dict (a new, empty one per call). While an
    object is being written it holds id -> object for it and each container and object around it,
    the objects given to ``default`` included: _values.Attacher counts nested conversions with it. (The
    C encoder and json's Python one, the fallback, both do so, in every Python from 3.8 on.)
    """
    join = "".join
    c_make_encoder = None
    if use_c:
        try:
            from json.encoder import c_make_encoder
        except ImportError:
            pass
    from json.encoder import encode_basestring

    if c_make_encoder is not None:

        def encode_with(obj, default, markers):
            c_encode = c_make_encoder(markers, default, encode_basestring, None, ":", ",", False, False, False)
            return join(c_encode(obj, 0))

        return encode_with

    from json.encoder import _make_iterencode  # what JSONEncoder.iterencode builds, less its markers

    def floatstr(number, _repr=float.__repr__, _inf=float("inf")):
        if number != number or number == _inf or number == -_inf:
            raise ValueError("Out of range float values are not JSON compliant: " + repr(number))
        return _repr(number)

    def encode_with(obj, default, markers):
        iterencode = _make_iterencode(markers, default, encode_basestring, None, floatstr, ":", ",", False, False, True)
        return join(iterencode(obj, 0))

    return encode_with


_encode = _make_encoder()
_encode_with = _make_encoder_with()
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

    Any other object that is not JSON is taken as fine: the encoder accepted it, so it went
    through the default hook (_values.Attacher), which turned it into an attachment or a number, or
    into an encoder's value, which it checked itself.

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
        elif issubclass(kind, _JSON_CONTAINERS_AND_INT):  # a subclass of one: see describe_problem
            return False
        else:  # bytes, an array, ...: see reaches_host_exactly
            continue
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
        elif issubclass(first, _JSON_CONTAINERS_AND_INT):  # a subclass of one of them
            return False
    return True


_JSON_CONTAINERS_AND_INT = (int, dict, list, tuple)


_CLOSE = object()  # describe_problem's marker: a container's items are all done
_KEY = object()  # describe_problem's marker: a dict key to check


def describe_problem(value, root="value"):
    """The first thing in ``value``, in the order the encoder writes it, that does not reach the
    host as itself: ``(error type name, text)`` with text like ``has a dict key 1 (an int) at
    value["a"][3]: JSON object keys must be strings``; None when there is nothing.

    Slow (Python code for every item): for a value the encoder refused, or one that
    reaches_host_exactly did not pass. Finds non-str dict keys, integers out of the host's range,
    NaN and Infinity, objects that cannot be sent (not JSON, no encoder; numpy arrays of other
    dtypes), encoders that fail or nest too deep (_values.MAX_CONVERSIONS), containers that contain
    themselves and strings that UTF-8 cannot carry (lone surrogates). What an encoder returns is
    looked into in the place of its object (the encoder is called again).
    """
    # (item, marker or None, path, conversions around it); a path is (parent path, key)
    stack = [(value, None, None, 0)]
    pop = stack.pop
    push = stack.append
    # id -> object for the containers (and converted objects) being written: meeting one again is
    # a cycle. The object is kept, so that its id is not reused (encoders make new objects).
    open_ids = {}
    conversion_problem = None  # _values', imported when first needed
    while stack:
        item, marker, path, depth = pop()
        if marker is _CLOSE:
            del open_ids[item]
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
                shown = float.__repr__(item)  # nan, not numpy's np.float64(nan)
                return "ValueError", f"has the float {shown} at {_place(root, path)}: JSON has no NaN or Infinity"
        elif isinstance(item, (dict, list, tuple)):
            oid = id(item)
            if oid in open_ids:
                return "ValueError", (
                    f"has a circular reference at {_place(root, path)}: a container that contains itself"
                )
            open_ids[oid] = item
            push((oid, _CLOSE, None, depth))
            if isinstance(item, dict):
                for key, child in reversed(list(item.items())):
                    push((child, None, (path, key), depth))
                    push((key, _KEY, path, depth))
            else:
                for index in range(len(item) - 1, -1, -1):
                    push((item[index], None, (path, index), depth))
        else:  # not JSON: bytes, an array, an object with an encoder, ...
            if conversion_problem is None:
                from snakepit._values import conversion_problem
            problem = conversion_problem(item, path, depth, root, open_ids, push)
            if problem is not None:
                return problem
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


def type_name(cls):
    """``module.Qualname``, or the bare name of a builtin: how error messages name a type."""
    module = getattr(cls, "__module__", None)
    if module in (None, "builtins"):
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def exception_text(exc):
    """``str(exc)``, or a placeholder when that raises."""
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


class ProtocolError(Exception):
    """The byte stream does not follow the protocol."""


class FrameTooLarge(ProtocolError):
    """A frame is larger than the agreed maximum: its payload, or for a frame with attachments
    everything after its first 4 bytes."""

    def __init__(self, size, limit):
        super().__init__(f"frame payload of {size} bytes exceeds the maximum of {limit} bytes")
        self.size = size
        self.limit = limit
        self.converted = ()  # the objects encoders converted for it, for conversion_note()


class TooManyAttachments(ValueError):
    """A value holds more bytes and arrays than one frame can carry (MAX_ATTACHMENTS)."""


def read_frame(stream, max_size=DEFAULT_MAX_FRAME):
    """Read one message from the binary ``stream``.

    Returns the decoded dict, or None on a clean EOF between frames. Raises
    ProtocolError for anything else that is not a well-formed frame; the
    length is checked against ``max_size`` before the body is read.

    The binary values of a call's "args", or of a result's or chunk's "value", are in it as
    ``bytes`` and arrays (see _read_attached). A call whose references are malformed gets a
    _values.BadArgs for its args, so that only that call fails; in a result or chunk they are a
    ProtocolError.
    """
    # The worker's hot path: two read() calls for a whole frame when the stream
    # delivers what is asked (a blocking buffered reader does); _read_rest() loops
    # over short reads otherwise. Version 4 added a comparison and a search of the
    # text (str's: bytes' `in` costs several times more, trying the key as an int).
    header = stream.read(_HEADER_SIZE)
    if not header:
        return None
    if len(header) != _HEADER_SIZE:
        header = _read_rest(stream, header, _HEADER_SIZE)
        if len(header) < _HEADER_SIZE:
            raise ProtocolError(f"truncated frame header: got {len(header)} of {_HEADER_SIZE} bytes")
    (length,) = _unpack_header(header)
    if length > max_size or length >= 0x8000_0000:  # too large, or the top bit (_ATTACHED)
        if length >= _ATTACHED:
            return _read_attached(stream, length - _ATTACHED, max_size)
        raise FrameTooLarge(length, max_size)
    payload = stream.read(length)
    if payload is None or len(payload) != length:
        payload = _read_rest(stream, payload, length) if payload else b""
        if len(payload) < length:
            raise ProtocolError(f"truncated frame body: got {len(payload)} of {length} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not valid UTF-8: {exc}") from None
    msg = _message(text)
    if _RESERVED_KEY in text:  # a binary value in its inline (b64) form, perhaps
        _resolve(msg, (), stream)
    return msg


def decode_payload(payload):
    """Decode a frame's payload bytes into a message dict."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame is not valid UTF-8: {exc}") from None
    return _message(text)


def _message(text):
    """The message dict of a frame's JSON text."""
    try:
        msg = _decode(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if type(msg) is not dict:  # json makes plain dicts only
        raise ProtocolError(f"frame holds a JSON {type(msg).__name__}, not an object")
    if not isinstance(msg.get("type"), str):
        raise ProtocolError("frame has no string 'type' key")
    return msg


def encode_frame(msg, max_size=DEFAULT_MAX_FRAME):
    """Encode ``msg`` as a frame: a bytes object (header + JSON payload), or, when it holds
    bytes or arrays, a list of buffers to write in this order: header, attachment table and JSON
    as one bytes object, then the attachments, each the value's own memory (a bytes object or a
    memoryview: not copied, so the value must not change until the frame is written).

    Raises TypeError/ValueError when ``msg`` cannot be sent (not JSON and no conversion for it,
    NaN and Infinity, an encoder that fails, see describe_problem), TooManyAttachments, and
    FrameTooLarge when the frame is larger than ``max_size``.
    """
    # A plain message takes version 3's path: anything that is not JSON makes json raise
    # TypeError (cheaply: at the first such object), and the message is encoded again, by
    # _encode_binary, with a default hook that turns those objects into JSON and attachments.
    try:
        payload = _encode(msg).encode("utf-8")
    except TypeError:
        return _encode_binary(msg, max_size)
    size = len(payload)
    if size > max_size or size >= 0x8000_0000:  # a plain frame's length leaves the top bit clear
        raise FrameTooLarge(size, max_size)
    return _pack_header(size) + payload


def frame_bytes(data):
    """An encoded frame (``encode_frame``'s bytes or list of buffers) as one bytes object: a
    copy, for tests and small frames."""
    return data if type(data) is bytes else b"".join(data)


def write_frame(target, msg, max_size=DEFAULT_MAX_FRAME):
    """Encode ``msg`` and write it to ``target``: a file descriptor or a binary stream."""
    data = encode_frame(msg, max_size)
    if isinstance(target, int):
        write_all(target, data)
    else:
        for piece in [data] if type(data) is bytes else data:
            target.write(piece)
        target.flush()


def write_all(fd, data):
    """os.write ``data`` to ``fd`` until every byte is written. ``data``: a bytes-like object,
    or a list (or tuple) of them (an encoded frame with attachments, see writev_all)."""
    if type(data) is list or type(data) is tuple:
        writev_all(fd, data)
        return
    written = os.write(fd, data)
    if written != len(data):  # a short write: a signal, or a non-blocking fd
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


def writev_all(fd, buffers):
    """Write ``buffers`` (bytes-like objects whose len() is their size in bytes, as
    encode_frame makes them) to ``fd`` in order, with as few os.writev calls as the kernel
    allows: at most _IOV_MAX buffers per call, a short write finished by the next call."""
    writev = getattr(os, "writev", None)
    pending = [buffer for buffer in buffers if len(buffer)]
    if writev is None:  # a system without writev: one write per buffer
        for buffer in pending:
            write_all(fd, buffer)
        return
    i = 0
    n = len(pending)
    while i < n:
        written = writev(fd, pending[i : i + _IOV_MAX])
        while i < n and written >= len(pending[i]):  # the buffers written whole
            written -= len(pending[i])
            i += 1
        if written:  # one written in part: its rest goes first next time
            pending[i] = memoryview(pending[i])[written:]


def _iov_max():
    """How many buffers one writev takes: IOV_MAX (1024 on Linux and macOS), at most 1024."""
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 1024
    return value if 0 < value < 1024 else 1024


_IOV_MAX = _iov_max()


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


# --- frames with attachments (version 4) -------------------------------------------------
#
# A frame whose length has its top bit set carries attachments after its JSON:
#
#   u32 BE  0x8000_0000 | J        J: the JSON's length (< 2**31)
#   u32 BE  count                  1 ..= MAX_ATTACHMENTS
#   count x u64 BE  size_i         the attachments' sizes, in order
#   J bytes of UTF-8 JSON          the message, as a plain frame would carry it
#   the attachments, back to back
#
# Its size, for the maximum frame size, is 4 + 8*count + J + sum(size_i): everything after the
# first 4 bytes. A reader checks it in steps before it allocates anything for them, so that a
# table that lies is refused at once. A frame without attachments is always a plain one. The
# JSON refers to the attachments (and holds binary values inline) as _values.py describes; only
# a call's "args" and a result's or chunk's "value" hold them.

MAX_ATTACHMENTS = 1_048_576
_ATTACHED = 0x8000_0000  # the length's top bit
_RESERVED_KEY = "__snakepit__"  # the key of the objects that stand for binary values
_VALUE_FIELDS = {"call": "args", "result": "value", "chunk": "value"}
_SKIP_CHUNK = 1 << 20  # an attachment nothing refers to is read and dropped this much at a time


def _read_attached(stream, json_size, max_size):
    """read_frame for a frame with attachments, after its header (``json_size``: J)."""
    if json_size > max_size:
        raise FrameTooLarge(json_size, max_size)
    (count,) = _unpack_header(_read_exactly(stream, 4, "attachment count"))
    if not 1 <= count <= MAX_ATTACHMENTS:
        raise ProtocolError(f"frame has {count} attachments: a frame with attachments has 1 to {MAX_ATTACHMENTS}")
    size = 4 + 8 * count + json_size
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    sizes = struct.unpack(f">{count}Q", _read_exactly(stream, 8 * count, "attachment table"))
    size += sum(sizes)  # exact: Python's integers do not overflow
    if size > max_size:
        raise FrameTooLarge(size, max_size)
    msg = decode_payload(_read_exactly(stream, json_size, "JSON"))
    _resolve(msg, sizes, stream)
    return msg


def _resolve(msg, sizes, stream):
    """Read the frame's attachments (``sizes``; none for a plain frame) from ``stream`` and put
    the binary values the message refers to in their places.

    The references are found (and checked) before the attachments are read, so that each is
    read once, into what it becomes: a bytes object (the read itself makes it), or a bytearray
    for an array (read into, so the array is writable); one nothing refers to is skipped.
    """
    from snakepit._values import BadArgs, BadValue, attachment_kinds, find_references, substitute

    kind = msg["type"]
    field = _VALUE_FIELDS.get(kind)
    refs = ()
    problem = None
    if field is not None and field in msg:
        try:
            refs = find_references(msg[field], field, sizes)
        except BadValue as exc:
            problem = exc
    if sizes:
        attachments = _read_attachments(stream, sizes, attachment_kinds(refs, len(sizes)))
    if refs and problem is None:
        try:
            msg[field] = substitute(msg[field], refs, attachments if sizes else (), field)
        except BadValue as exc:
            problem = exc
    if problem is not None:
        if kind != "call":
            raise ProtocolError(f"{kind} frame: {problem}")
        msg["args"] = BadArgs(str(problem))


def resolve_inline(value, root):
    """``value`` (decoded JSON, found at ``root``) with its inline binary values (b64) decoded;
    _values.BadValue for a malformed one, or one that refers to an attachment."""
    from snakepit._values import find_references, substitute

    return substitute(value, find_references(value, root, ()), (), root)


def _read_attachments(stream, sizes, kinds):
    attachments = []
    for index, size in enumerate(sizes):
        kind = kinds[index]
        if kind == "array":
            attachments.append(_read_into(stream, size, index))
        elif kind == "bytes":
            attachments.append(_read_exactly(stream, size, f"attachment {index}"))
        else:
            while size:
                chunk = stream.read(min(size, _SKIP_CHUNK))
                if not chunk:
                    raise ProtocolError(f"truncated frame: it ends in attachment {index}")
                size -= len(chunk)
            attachments.append(None)
    return attachments


def _read_exactly(stream, n, what):
    """``n`` bytes of ``stream`` as one bytes object: one read() when the stream gives what is
    asked; a truncated-frame ProtocolError at EOF."""
    data = stream.read(n)
    if data is None or len(data) != n:
        data = _read_rest(stream, data, n) if data else b""
        if len(data) < n:
            raise ProtocolError(f"truncated frame: got {len(data)} of the {n} bytes of its {what}")
    return data


def _read_into(stream, n, index):
    """``n`` bytes of ``stream`` read into a new bytearray (readinto(), where the stream has it)."""
    buffer = bytearray(n)
    got = 0
    with memoryview(buffer) as view:
        readinto = getattr(stream, "readinto", None)
        while got < n:
            if readinto is not None:
                count = readinto(view[got:])
            else:
                chunk = stream.read(n - got)
                count = len(chunk) if chunk else 0
                view[got : got + count] = chunk
            if not count:
                raise ProtocolError(f"truncated frame: got {got} of the {n} bytes of its attachment {index}")
            got += count
    return buffer


def _encode_binary(msg, max_size):
    """encode_frame for a message that holds objects that are not JSON: encoded with a
    _values.Attacher, into a frame with attachments (or a plain one when none were needed)."""
    from snakepit._values import Attacher

    hook = Attacher()
    payload = _encode_with(msg, hook.default, hook.markers).encode("utf-8")
    size = len(payload)
    buffers = hook.buffers
    if not buffers:  # numpy scalars and encoders' values only: a plain frame
        if size > max_size or size >= _ATTACHED:
            raise _too_large(size, max_size, hook)
        return _pack_header(size) + payload
    count = len(buffers)
    sizes = [len(buffer) for buffer in buffers]
    total = 4 + 8 * count + size + sum(sizes)
    if total > max_size or size >= _ATTACHED:
        raise _too_large(total, max_size, hook)
    head = _pack_head(_ATTACHED | size, count) + struct.pack(f">{count}Q", *sizes) + payload
    return [head, *buffers]


_pack_head = struct.Struct(">II").pack


def _too_large(size, limit, hook):
    exc = FrameTooLarge(size, limit)
    exc.converted = list(hook.converted.values())
    return exc


def conversion_note(exc):
    """For a FrameTooLarge whose value encoders converted: which encoder's value was the largest,
    as ``; encoding a mymod.Big made 70000000 bytes of it``; "" without conversions."""
    if not exc.converted:
        return ""
    from snakepit._values import Attacher, type_name

    largest = None
    for obj in exc.converted[:1000]:  # the outermost of nested conversions is the largest
        hook = Attacher()
        try:
            size = len(_encode_with(obj, hook.default, hook.markers).encode("utf-8"))
        except Exception:
            continue
        size += sum(len(buffer) for buffer in hook.buffers)
        if largest is None or size > largest[0]:
            largest = (size, type(obj))
    if largest is None:
        return ""
    return f"; encoding {_article(type_name(largest[1]))} made {largest[0]} bytes of it"


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
