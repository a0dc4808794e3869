"""Values beyond JSON: how bytes, arrays and the adapter's own types travel (protocol version 4).

A frame may carry binary attachments after its JSON (framing: protocol.py). The JSON refers to
them with reference objects, the only objects with the reserved key "__snakepit__":

    {"__snakepit__":"bytes","att":I}
    {"__snakepit__":"array","dtype":D,"shape":[d0,d1,...],"att":I}

or, where no attachment can travel, with "b64" (standard base64, padded) in place of "att". An
array's data is little-endian, in C (row-major) order, of one of the dtypes in DTYPES.

Receiving (find_references, attachment_kinds, substitute): a reference becomes ``bytes``, or a
``numpy.ndarray`` when numpy can be imported (it is, the first time an array arrives), else an
``Array``. Sending (lower): bytes, bytearray and memoryview travel as bytes; numpy arrays, numpy
complex scalars and Arrays as arrays; numpy's other scalars as the Python numbers they hold; the
types registered with ``@snakepit.encoder``, dataclasses and pydantic models as what their
encoder returns, which is encoded in turn.

Also Attacher, the json encoder's default hook that does the sending, and describe_problem's
part for these values (conversion_problem). protocol.py imports this module only when a value
beyond JSON first comes or goes, so that a worker's start does not pay for it (nor this module
for binascii and the b64 check, loaded at the first b64).
"""

import struct
import sys
from operator import index as _index

import snakepit
from snakepit.protocol import (
    _CLOSE,
    _RESERVED_KEY,
    MAX_ATTACHMENTS,
    TooManyAttachments,
    _article,
    _json_text,
    _place,
    _short_repr,
    describe_problem,
    exception_text as _text,
    reaches_host_exactly,
    type_name,
)

KEY = _RESERVED_KEY  # "__snakepit__"

#: The dtypes an array may have, by numpy's names: name -> (item size in bytes, numpy's
#: little-endian code, struct's code of an item, or of each half of a complex one).
DTYPES = {
    "bool": (1, "<b1", "?"),
    "int8": (1, "<i1", "b"),
    "int16": (2, "<i2", "h"),
    "int32": (4, "<i4", "i"),
    "int64": (8, "<i8", "q"),
    "uint8": (1, "<u1", "B"),
    "uint16": (2, "<u2", "H"),
    "uint32": (4, "<u4", "I"),
    "uint64": (8, "<u8", "Q"),
    "float16": (2, "<f2", "e"),
    "float32": (4, "<f4", "f"),
    "float64": (8, "<f8", "d"),
    "complex64": (8, "<c8", "f"),
    "complex128": (16, "<c16", "d"),
}
_DTYPE_NAMES = ", ".join(DTYPES)

#: How deep encoder conversions may nest: an encoder's value holding a value that needs an
#: encoder, and so on. Deeper is taken for an encoder that never ends (one that returns its own
#: type), stopped before it fills the memory.
MAX_CONVERSIONS = 32

# lower()'s answers: what a value that is not JSON becomes.
BYTES = "bytes"  # (BYTES, buffer): an attachment; len(buffer) is its size in bytes
ARRAY = "array"  # (ARRAY, dtype name, shape tuple, buffer)
VALUE = "value"  # (VALUE, replacement, type or None): the replacement is encoded in its place;
#                  the type whose encoder made it, None for a numpy scalar's Python number


class Array:
    """An n-dimensional array of numbers as it travels between the host and a worker: what a
    command gets for an array argument when numpy cannot be imported in the worker (with numpy
    it gets a ``numpy.ndarray``), and what a command may return to send an array without numpy.

    ``Array(dtype, shape, data)``: ``dtype`` is one of numpy's names "bool", "int8", "int16",
    "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
    "complex64", "complex128"; ``shape`` a sequence of non-negative integers (``()`` for a single
    value); ``data`` a bytes-like object holding the elements little-endian, in C (row-major)
    order, exactly ``prod(shape) * itemsize`` bytes of them (a bool is one byte, 0 or 1; a
    complex number its real then its imaginary part). The data is not copied when it is
    contiguous; ``data`` is then a view of it, writable when it is (a bytearray). Raises
    TypeError or ValueError, saying what is wrong, for anything else.

    The attributes are read-only: ``dtype`` (the name), ``shape`` (a tuple), ``data`` (a
    memoryview of the raw bytes), ``nbytes``, ``itemsize``; ``tolist()`` gives the elements as
    nested lists of Python numbers (or the one number of a 0-d array), as numpy's does.
    """

    __slots__ = ("_dtype", "_shape", "_data")

    def __init__(self, dtype, shape, data):
        if not isinstance(dtype, str):
            raise TypeError(f"snakepit.Array: dtype must be a str (one of {_DTYPE_NAMES}), not {type(dtype).__name__}")
        spec = DTYPES.get(dtype)
        if spec is None:
            raise ValueError(f"snakepit.Array: dtype must be one of {_DTYPE_NAMES}, not {dtype!r}")
        if isinstance(shape, int):
            shape = (shape,)
        try:
            dims = list(shape)
        except TypeError:
            raise TypeError(
                f"snakepit.Array: shape must be a sequence of integers, not {type(shape).__name__}"
            ) from None
        for i, dim in enumerate(dims):
            try:
                dims[i] = _index(dim)  # an int, or what stands for one (numpy's integers)
            except TypeError:
                dims[i] = -1
            if dims[i] < 0 or isinstance(dim, bool):
                raise ValueError(f"snakepit.Array: shape items must be non-negative integers, not {dim!r}")
        shape = tuple(dims)
        try:
            view = memoryview(data)
        except TypeError:
            raise TypeError(f"snakepit.Array: data must be a bytes-like object, not {type(data).__name__}") from None
        view = byte_view(view)
        needed = _prod(shape) * spec[0]
        if view.nbytes != needed:
            raise ValueError(
                f"snakepit.Array: {dtype} data of shape {list(shape)} is {needed} bytes, not {view.nbytes}"
            )
        if dtype == "bool" and not _zeros_and_ones(view):
            raise ValueError("snakepit.Array: the data of a bool array must be bytes 0 and 1 only")
        self._dtype = dtype
        self._shape = shape
        self._data = view

    @classmethod
    def _trusted(cls, dtype, shape, view):
        """An Array of what has been checked already (a reference just read)."""
        array = cls.__new__(cls)
        array._dtype = dtype
        array._shape = shape
        array._data = view
        return array

    @property
    def dtype(self):
        return self._dtype

    @property
    def shape(self):
        return self._shape

    @property
    def data(self):
        return self._data

    @property
    def nbytes(self):
        return self._data.nbytes

    @property
    def itemsize(self):
        return DTYPES[self._dtype][0]

    def tolist(self):
        """The elements as nested lists of bool, int, float or complex (one per dimension); the
        element itself for a 0-d array."""
        size, _, code = DTYPES[self._dtype]
        count = self._data.nbytes // size
        if self._dtype.startswith("complex"):
            parts = struct.unpack(f"<{2 * count}{code}", self._data)
            flat = [complex(re_, im) for re_, im in zip(parts[::2], parts[1::2])]
        else:
            flat = struct.unpack(f"<{count}{code}", self._data)
        if not self._shape:
            return flat[0]
        return _nest(flat, self._shape)

    def __eq__(self, other):
        if type(other) is not Array:
            return NotImplemented
        return self._dtype == other._dtype and self._shape == other._shape and self._data == other._data

    __hash__ = None  # the data may be writable

    def __repr__(self):
        return f"snakepit.Array(dtype={self._dtype!r}, shape={self._shape!r}, nbytes={self._data.nbytes})"


def _prod(numbers):
    """The product of ``numbers`` (1 for none), as math.prod, without importing math."""
    product = 1
    for number in numbers:
        product *= number
    return product


def _nest(flat, shape):
    if len(shape) == 1:
        return list(flat)
    step = _prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _zeros_and_ones(data):
    """Whether every byte of ``data`` (bytes, a bytearray, or a memoryview of bytes) is 0 or 1:
    two C-level counts, nothing allocated but a memoryview's blocks of 64 KiB."""
    if type(data) is memoryview:  # no count(): a block at a time
        return all(_zeros_and_ones(data[i : i + 65536].tobytes()) for i in range(0, len(data), 65536))
    return data.count(b"\x00") + data.count(b"\x01") == len(data)


def byte_view(view):
    """``view`` (a memoryview) as a flat, C-contiguous memoryview of unsigned bytes, whose len()
    is its size: itself, or a cast of it (no copy), or a copy when it is not contiguous (or its
    format cannot be cast)."""
    if view.format == "B" and view.ndim == 1 and view.c_contiguous:
        return view
    if view.c_contiguous:
        try:
            return view.cast("B")
        except (TypeError, ValueError):  # a format memoryview cannot cast (numpy's structured ones)
            pass
    return memoryview(view.tobytes())


# --- numpy, when the worker has it ------------------------------------------------------------

_numpy_tried = []  # [True] once importing numpy was tried and failed


def numpy():
    """The numpy module, imported the first time an array arrives (~0.1 s: never at start-up);
    None when it cannot be imported. Sending never imports it (see lower)."""
    if _numpy_tried:
        return None
    try:
        # Once imported, a lookup; one that waits if another thread (a command) is importing it,
        # where sys.modules would give the module half made.
        import numpy as module
    except Exception:  # not installed, or broken: arrays arrive as snakepit.Array
        _numpy_tried.append(True)
        return None
    return module


# --- receiving ------------------------------------------------------------------------------


class BadValue(ValueError):
    """A reference object that is malformed, or data that does not fit it; the message says what
    is wrong and where."""


class BadArgs:
    """Stands in for the ``args`` of a call whose binary values could not be decoded: the worker
    answers that call with a ValueError saying ``problem``, and goes on serving."""

    __slots__ = ("problem",)

    def __init__(self, problem):
        self.problem = problem


class _Ref:
    """One reference object, checked: where it is (``holder[key]``; holder None for the value
    itself), what it stands for, and its data's source: attachment ``att``, or ``data`` decoded
    from its "b64"."""

    __slots__ = ("holder", "key", "path", "kind", "dtype", "shape", "att", "data")


def _b64_decode(text):
    """The bytes of ``text`` if it is standard base64 with padding, in its one canonical
    spelling; else None. Linear in time, and a few copies of the text in memory at most: it is
    decoded, encoded again and compared (a pattern match took ~45 times the text's size)."""
    from binascii import Error, a2b_base64, b2a_base64

    if type(text) is not str or len(text) % 4:
        return None
    try:
        data = a2b_base64(text)
        return data if b2a_base64(data, newline=False) == text.encode("ascii") else None
    except (Error, ValueError):  # bad padding; not ASCII (UnicodeEncodeError is a ValueError)
        return None
_REF_KEYS = {BYTES: frozenset((KEY, "att", "b64")), ARRAY: frozenset((KEY, "att", "b64", "dtype", "shape"))}


def find_references(value, root, sizes):
    """The reference objects in ``value`` (a decoded JSON value, found at ``root``: "args" or
    "value"), each checked, in the order they appear: a list of _Ref. ``sizes``: the sizes of the
    frame's attachments (empty for a plain frame).

    Raises BadValue for the first one that is malformed: an unknown kind, a missing, unexpected or
    ill-typed field, an "att" out of range, "b64" that is not padded standard base64, an array
    whose data is not prod(shape) * itemsize bytes. An object without the key "__snakepit__" is a
    plain dict; a reference object is not looked into.
    """
    refs = []
    stack = [(value, None, None, None)]  # (item, holder, key, path): dicts and lists only
    pop = stack.pop
    while stack:
        node, holder, key, path = pop()
        if type(node) is dict:
            if KEY in node:
                refs.append(_check(node, holder, key, path, root, sizes))
                continue
            items = node.items()
            values = node.values()
        else:
            items = enumerate(node)
            values = node
        if len(node) > 16:  # one C-level pass says whether there is anything to look into
            kinds = set(map(type, values))
            if dict not in kinds and list not in kinds:
                continue
        found = [(item, node, k, (path, k)) for k, item in items if type(item) is dict or type(item) is list]
        found.reverse()  # popped in the order they appear
        stack.extend(found)
    return refs


def _check(obj, holder, key, path, root, sizes):
    where = _place(root, path)
    kind = obj[KEY]
    if kind != BYTES and kind != ARRAY:
        raise BadValue(
            f'the object at {where} has an unknown "{KEY}" kind, {_json_text(kind)} (known: "bytes", "array")'
        )
    what = f"the {kind} reference at {where}"
    extra = sorted(k for k in obj if k not in _REF_KEYS[kind])
    if extra:
        raise BadValue(f"{what} has an unexpected key {_short_repr(extra[0], quote=True)}")
    ref = _Ref()
    ref.holder = holder
    ref.key = key
    ref.path = path
    ref.kind = BYTES if kind == BYTES else ARRAY  # the constants: compared with `is`
    ref.att = None
    ref.data = None
    if kind == ARRAY:
        dtype = obj.get("dtype")
        if type(dtype) is not str or dtype not in DTYPES:
            shown = "no dtype" if "dtype" not in obj else f"dtype {_json_text(dtype)}"
            raise BadValue(f"{what} has {shown}: expected one of {_DTYPE_NAMES}")
        shape = obj.get("shape")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            shown = "no shape" if "shape" not in obj else f"shape {_json_text(shape)}"
            raise BadValue(f"{what} has {shown}: expected an array of non-negative integers")
        ref.dtype = dtype
        ref.shape = tuple(shape)
    if ("att" in obj) == ("b64" in obj):
        raise BadValue(f"{what} needs one of \"att\" and \"b64\", not {'both' if 'att' in obj else 'neither'}")
    if "att" in obj:
        att = obj["att"]
        if type(att) is not int:
            raise BadValue(f'{what} has "att" {_json_text(att)}: expected an integer')
        if not 0 <= att < len(sizes):
            has = f"{len(sizes)} attachment{'s' if len(sizes) != 1 else ''}" if sizes else "no attachments"
            raise BadValue(f'{what} has "att" {att}, and its frame has {has}')
        ref.att = att
        size = sizes[att]
        source = f"attachment {att} holds"
    else:
        text = obj["b64"]
        ref.data = _b64_decode(text)
        if ref.data is None:
            raise BadValue(f'{what} has "b64" that is not standard base64 with padding: {_json_text(text)}')
        size = len(ref.data)
        source = "its b64 holds"
    if kind == ARRAY:
        needed = _prod(ref.shape) * DTYPES[ref.dtype][0]
        if size != needed:
            raise BadValue(
                f"{what}: {ref.dtype} data of shape {list(ref.shape)} is {needed} bytes, and {source} {size}"
            )
        if ref.data is not None:
            ref.data = bytearray(ref.data)  # writable, as one read from an attachment
    return ref


def attachment_kinds(refs, count):
    """For each of the frame's ``count`` attachments what it is read as: "array" (into a
    bytearray, so that the array is writable), "bytes", or None (no reference: skipped)."""
    kinds = [None] * count
    for ref in refs:
        if ref.att is not None and kinds[ref.att] != ARRAY:
            kinds[ref.att] = ref.kind
    return kinds


def substitute(value, refs, attachments, root):
    """Put the Python value of each reference of ``refs`` in its place, with the attachments
    read (``attachments``); returns ``value``, or what replaces it when it is a reference itself.
    Raises BadValue for a bool array holding bytes other than 0 and 1, or one numpy refuses."""
    for ref in refs:
        data = ref.data if ref.att is None else attachments[ref.att]
        if ref.kind == BYTES:
            obj = data if type(data) is bytes else bytes(data)
        else:
            obj = _array(ref, data, root)
        if ref.holder is None:
            value = obj
        else:
            ref.holder[ref.key] = obj
    return value


def _array(ref, data, root):
    if ref.dtype == "bool" and not _zeros_and_ones(data):
        raise BadValue(f"the bool array at {_place(root, ref.path)} holds bytes other than 0 and 1")
    np = numpy()
    if np is None:
        return Array._trusted(ref.dtype, ref.shape, memoryview(data))
    try:
        return np.frombuffer(data, dtype=np.dtype(DTYPES[ref.dtype][1])).reshape(ref.shape)
    except (ValueError, TypeError) as exc:  # more dimensions than numpy allows
        raise BadValue(f"the array at {_place(root, ref.path)} cannot be a numpy array: {exc}") from None


# --- sending ----------------------------------------------------------------------------------


class Unsendable(TypeError):
    """A value that cannot reach the host: ``what`` it is ("a set", "a numpy array of dtype
    object") and ``reason``, for describe_problem; ``message``, the exception's text, is json's
    own for an object of a type it does not know."""

    def __init__(self, what, reason, message=None):
        super().__init__(message or f"{what}: {reason}")
        self.what = what
        self.reason = reason


class EncoderFailed(Exception):
    """The encoder of ``kind`` raised ``cause``."""

    def __init__(self, kind, cause):
        super().__init__(f"the encoder for {type_name(kind)} raised {type(cause).__name__}: {_text(cause)}")
        self.kind = kind
        self.cause = cause


_ENCODERS = snakepit._encoders  # type -> function, filled in by @snakepit.encoder


def lower(obj, attach=True):
    """How ``obj``, a value that is not JSON, travels: (BYTES, buffer), (ARRAY, dtype, shape,
    buffer) or (VALUE, replacement, type or None), see above. Raises Unsendable when it cannot,
    and EncoderFailed when its encoder raised.

    The first match wins: an encoder registered for its type, then for a base of it (in MRO
    order); bytes, bytearray, memoryview; numpy arrays and scalars (only when numpy was imported
    by someone: this never imports it); Array; dataclasses; objects with ``model_dump``.
    ``attach`` False: only say whether and how it can travel (an array is not made contiguous).
    """
    kind = type(obj)
    if _ENCODERS:
        func = _ENCODERS.get(kind)
        if func is None:
            for base in kind.__mro__[1:]:
                func = _ENCODERS.get(base)
                if func is not None:
                    break
        if func is not None:
            return VALUE, _convert(func, obj, kind), kind
    if kind is bytes:
        return BYTES, obj
    if kind is bytearray:
        return BYTES, memoryview(obj)  # the view keeps it from being resized until it is written
    if kind is memoryview:
        return BYTES, byte_view(obj)
    np = sys.modules.get("numpy")
    if np is not None:  # (its attributes may be missing while another thread imports it)
        if isinstance(obj, getattr(np, "ndarray", ())):
            return _lower_ndarray(np, obj, attach)
        if isinstance(obj, getattr(np, "generic", ())):
            return _lower_numpy_scalar(np, obj, attach)
    if kind is Array:
        return ARRAY, obj._dtype, obj._shape, obj._data
    if isinstance(obj, (bytes, bytearray)):  # a subclass
        return BYTES, memoryview(obj)
    fields = getattr(kind, "__dataclass_fields__", None)
    if fields is not None and not isinstance(obj, type):
        import dataclasses  # imported already: there is a dataclass

        return VALUE, _convert(lambda o: {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}, obj, kind), kind
    if callable(getattr(kind, "model_dump", None)) and not isinstance(obj, type):
        return VALUE, _convert(kind.model_dump, obj, kind), kind
    raise Unsendable(
        _article(kind.__qualname__),
        "it is not JSON-serialisable (a conversion for its type can be registered with @snakepit.encoder)",
        f"Object of type {kind.__name__} is not JSON serializable",
    )


def _convert(func, obj, kind):
    try:
        return func(obj)
    except Exception as exc:
        raise EncoderFailed(kind, exc) from exc


def _lower_ndarray(np, obj, attach):
    if type(obj) is not np.ndarray:
        masked = getattr(getattr(np, "ma", None), "MaskedArray", None)
        if masked is not None and isinstance(obj, masked):
            raise Unsendable(
                "a numpy masked array", "its mask would be lost; register an encoder for numpy.ma.MaskedArray"
            )
        obj = np.asarray(obj)  # a subclass (numpy.matrix, ...): its data
    dtype = obj.dtype
    spec = DTYPES.get(dtype.name)
    if dtype.kind == "b" and obj.size and obj.view(np.uint8).max() > 1:
        # Bytes other than 0 and 1 (made with view or frombuffer): numpy reads them as True,
        # and so will the host.
        obj = obj.view(np.uint8) != 0
    if spec is None or dtype.kind not in "biufc":
        raise Unsendable(
            f"a numpy array of dtype {dtype}",
            f"arrays travel with one of the dtypes {_DTYPE_NAMES}; convert it (astype) or register an encoder",
        )
    if not attach:
        return ARRAY, dtype.name, obj.shape, None
    little = np.dtype(spec[1])
    if dtype != little or not obj.flags.c_contiguous:  # big-endian, Fortran order, strided: one copy
        obj = obj.astype(little, order="C")
    return ARRAY, dtype.name, obj.shape, memoryview(obj.reshape(-1).view(np.uint8))


def _lower_numpy_scalar(np, obj, attach):
    if isinstance(obj, (np.datetime64, np.timedelta64)):  # timedelta64 is an np.integer too
        raise Unsendable(
            f"a {type_name(type(obj))}",
            "numpy dates and durations have no JSON form; convert it (say, with .astype(str) or "
            "/ np.timedelta64(1, 's')) or register an encoder for its type",
        )
    if isinstance(obj, np.bool_):
        return VALUE, bool(obj), None
    if isinstance(obj, np.integer):
        return VALUE, int(obj), None
    if isinstance(obj, np.floating):
        return VALUE, float(obj), None  # NaN and Infinity are then refused, as any float's
    if isinstance(obj, np.complexfloating):
        return _lower_ndarray(np, np.asarray(obj), attach)  # JSON has no complex numbers: a 0-d array
    if isinstance(obj, np.bytes_):
        return BYTES, bytes(obj)
    if isinstance(obj, np.str_):
        return VALUE, str(obj), None
    raise Unsendable(
        f"a {type_name(type(obj))}",
        "numpy scalars of this type have no JSON form; convert it or register an encoder for its type",
    )


class Attacher:
    """The json encoder's ``default`` for one frame (a new one for each, see protocol's
    _encode_binary): it turns each object that is not JSON into what lower() says, and collects
    the attachments (``buffers``).

    An encoder's value is encoded in its object's place, and may hold objects that need an
    encoder in turn: the encoder's ``markers`` (see protocol._make_encoder_with) hold the objects
    being written, so the converted ones among them are the conversions this one is nested in;
    more than MAX_CONVERSIONS is taken for an encoder that never ends. An encoder's value is
    checked with reaches_host_exactly here, since the check of the whole value cannot see it.
    """

    __slots__ = ("buffers", "markers", "converted")

    def __init__(self):
        self.buffers = []
        self.markers = {}
        self.converted = {}  # id -> object, for every object an encoder converted (kept: ids stay unique)

    def default(self, obj):
        try:
            lowered = lower(obj)
        except Unsendable as exc:  # as json's own default raises it (describe_problem says more)
            raise TypeError(str(exc)) from None
        kind = lowered[0]
        if kind is BYTES:
            return {KEY: BYTES, "att": self._attach(lowered[1])}
        if kind is ARRAY:
            return {KEY: ARRAY, "dtype": lowered[1], "shape": list(lowered[2]), "att": self._attach(lowered[3])}
        value, via = lowered[1], lowered[2]
        if via is not None:
            converted = self.converted
            if converted and len(self.markers.keys() & converted.keys()) >= MAX_CONVERSIONS:
                raise ValueError(
                    f"encoder conversions nest more than {MAX_CONVERSIONS} deep, at {_article(type_name(via))}"
                )
            converted[id(obj)] = obj
            if not reaches_host_exactly(value) and describe_problem(value) is not None:
                raise ValueError(
                    f"the encoder for {type_name(via)} returned a value that does not reach the host as itself"
                )
        return value

    def _attach(self, buffer):
        index = len(self.buffers)
        if index == MAX_ATTACHMENTS:
            raise TooManyAttachments(
                f"holds more than {MAX_ATTACHMENTS} bytes and array values, the most one frame carries"
            )
        self.buffers.append(buffer)
        return index


def conversion_problem(item, path, depth, root, open_ids, push):
    """describe_problem's part for an object that is not JSON: what is wrong with it, as
    ``(error type name, text)``, or None, after pushing what an encoder (or numpy scalar) turns
    it into, to be looked into in its place (``depth``: the conversions around it)."""
    try:
        lowered = lower(item, attach=False)
    except Unsendable as exc:
        return "TypeError", f"has {exc.what} at {_place(root, path)}: {exc.reason}"
    except EncoderFailed as exc:
        cause = exc.cause
        return type_name(type(cause)), (
            f"has {_article(type_name(exc.kind))} at {_place(root, path)}: its encoder raised "
            f"{type(cause).__name__}: {_text(cause)}"
        )
    if lowered[0] is not VALUE:  # bytes or an array: an attachment
        return None
    via = lowered[2]
    if via is not None:
        if id(item) in open_ids:
            return "ValueError", (
                f"has a circular reference at {_place(root, path)}: the encoder for {type_name(via)} "
                "returned a value that holds the object itself"
            )
        depth += 1
        if depth > MAX_CONVERSIONS:
            return "ValueError", (
                f"has {_article(type_name(via))} at {_place(root, path)} whose encoding nests more than "
                f"{MAX_CONVERSIONS} encoder conversions: an encoder returned a value needing an encoder, "
                "and so on (one that returns its own type never ends)"
            )
        open_ids[id(item)] = item  # kept, so that its id is not reused meanwhile
        push((id(item), _CLOSE, None, depth))
    push((lowered[1], None, path, depth))
    return None
