"""snakepit: Python commands served to a Rust host by long-lived worker processes.

An adapter module registers the functions the host may call::

    import snakepit

    @snakepit.command
    def add(a, b):
        return a + b

    @snakepit.command(name="shout")
    def upper(text):
        return text.upper()

    @snakepit.command(session=True)
    def chat(message, session):
        history = session.setdefault("history", [])
        history.append(message)
        return len(history)

    @snakepit.on_session_end
    def goodbye(session):
        print("session", session.id, "ended after", session.calls, "calls")

and the host starts workers with ``python -m snakepit --adapter my_adapter``.

A command that returns a generator is a stream (the host calls it with ``Pool::stream``): each
value it yields reaches the host as one chunk, as fast as the host takes them. While a command
runs it may report how far it got, and notice that the host cancelled it::

    @snakepit.command
    def tokens(text):
        words = text.split()
        for i, word in enumerate(words):
            snakepit.progress(i, len(words), "tokenising")
            yield word

    @snakepit.command
    def fit(rows):
        for step in range(1000):
            snakepit.check_cancelled()  # raises snakepit.Cancelled once the host cancels
            ...

``cancelled()`` says whether the host asked to cancel the current call, ``check_cancelled()``
raises ``Cancelled`` if so, and ``progress(done, total=None, message=None)`` reports progress
(at most one frame every 0.05 s per call; ``done == total`` always gets through). ``Cancelled``
is a BaseException, so ``except Exception`` does not swallow it; a command that lets it out is
answered as cancelled. If the command does not stop by itself, the host may interrupt it: the
worker then raises ``Cancelled`` wherever the command's Python code is.

Bytes and arrays travel beside the JSON, without base64 and without a copy on the way out. A
command gets ``bytes`` for the host's bytes, and a ``numpy.ndarray`` (writable, little-endian)
for its arrays when numpy can be imported in the worker, else a ``snakepit.Array``. It may return
(or yield) ``bytes``, ``bytearray``, ``memoryview``, numpy arrays of the dtypes bool, int8 ..
int64, uint8 .. uint64, float16, float32, float64, complex64 and complex128 (any layout and byte
order), numpy scalars and ``snakepit.Array``, anywhere in its value. Dataclasses travel as a dict
of their fields and pydantic models as their ``model_dump()``; other types once registered::

    @snakepit.encoder(Money)
    def _money(m):
        return {"amount": str(m.amount), "currency": m.currency}

    snakepit.encoder(decimal.Decimal, str)  # exact, as a string (float: a number, rounded)

This module only holds the registries; it must stay cheap to import because
every worker imports it before anything else.
"""

__version__ = "0.1.0"

#: The pool's `args` setting: extra arguments for the adapter, set before it is imported.
ARGS = []

__all__ = [
    "command",
    "on_session_end",
    "registry",
    "session_end_hooks",
    "is_thread_safe",
    "is_cpu_bound",
    "takes_session",
    "Session",
    "Cancelled",
    "cancelled",
    "check_cancelled",
    "progress",
    "encoder",
    "Array",
    "ARGS",
    "__version__",
]

# Command name -> function, filled in by @command while adapters import.
_registry = {}
# Names of commands declared thread_safe=True: the thread profile runs only these (unless the
# adapter module sets SNAKEPIT_THREAD_SAFE = True or the pool allows unsafe threads).
_thread_safe = set()
# Names of commands declared cpu_bound=True: a thread-profile pool on an interpreter whose GIL
# is on warns about them (threads would not run them in parallel).
_cpu_bound = set()
# Names of commands declared session=True: they get the call's Session as the keyword `session`.
_session = set()
# Functions registered with @on_session_end, in registration order.
_session_end_hooks = []
# Type -> function, filled in by @encoder: how values of the type reach the host (see _values).
_encoders = {}


def command(func=None, *, name=None, thread_safe=False, cpu_bound=False, session=False):
    """Register ``func`` as a command the host can call.

    Usable bare (``@command``) or with options
    (``@command(name="other", thread_safe=True, cpu_bound=True, session=True)``). The function is
    returned unchanged. Registering a second, different function under a name that is
    already taken raises ValueError, so two adapters cannot silently shadow
    each other; registering the same function twice is harmless.

    ``session=True``: the command keeps state between the calls of a host session. It gets a
    ``Session`` (a dict-like store with ``id``, ``context``, ``fresh``, ``calls`` and ``lock``)
    as the keyword argument ``session``, besides the call's own arguments. Called without a
    session, it gets a throwaway one (``id`` None) that is gone after the call.
    """

    def register(f):
        if not callable(f):
            raise TypeError(f"@snakepit.command needs a callable, not {type(f).__name__}")
        key = getattr(f, "__name__", None) if name is None else name
        if not isinstance(key, str) or not key:
            raise ValueError(f"command name must be a non-empty string, not {key!r}")
        existing = _registry.get(key)
        if existing is not None and existing is not f:
            raise ValueError(f"command {key!r} is already registered by {_describe(existing)}")
        _registry[key] = f
        for flag, names in ((thread_safe, _thread_safe), (cpu_bound, _cpu_bound), (session, _session)):
            if flag:
                names.add(key)
            else:
                names.discard(key)
        return f

    if func is None:
        return register
    return register(func)


def on_session_end(func):
    """Register ``func(session)`` to run when the host ends a session this worker has state for.

    It gets the ``Session`` being ended (its store, ``id``, ``calls``; ``context`` None), after
    the worker has forgotten it. Hooks run in registration order, between calls in the process
    profile and on the thread that reads the host's messages in the thread profile, so keep
    them short. A hook that raises is logged as a warning and the others still run. The
    function is returned unchanged; registering it twice is harmless (it runs once).
    """
    if not callable(func):
        raise TypeError(f"@snakepit.on_session_end needs a callable, not {type(func).__name__}")
    if not any(hook is func for hook in _session_end_hooks):
        _session_end_hooks.append(func)
    return func


def encoder(cls, func=None):
    """Register ``func(obj) -> value`` as how instances of ``cls`` (and of its subclasses) reach
    the host: ``value`` is sent in the object's place, and is encoded in turn, so it may hold
    bytes, arrays or other registered types (at most 32 conversions deep).

    Usable as a decorator, ``@snakepit.encoder(Money)``, or directly,
    ``snakepit.encoder(decimal.Decimal, str)``; returns ``func``. A later registration for the
    same type replaces the earlier one. An object's type is looked up first, then its bases in
    method resolution order; registered types come before the built-in conversions (bytes-like
    objects, numpy's arrays and scalars, ``Array``; dataclasses as a dict of their fields,
    objects with ``model_dump`` such as pydantic models as what it returns), so they can change
    those. Decimal has none built in: register ``str`` (exact) or ``float`` (rounded).

    Raises TypeError for a ``cls`` that is not a class, or one whose instances json writes
    itself (subclasses of str, int, float, list, tuple, dict, and None), whose encoder would
    never be called.
    """
    if not isinstance(cls, type):
        raise TypeError(f"@snakepit.encoder needs a class, not {cls!r}")
    if issubclass(cls, (str, int, float, list, tuple, dict, type(None))):
        raise TypeError(
            f"@snakepit.encoder: json writes {cls.__qualname__} values itself (a subclass of a JSON type), "
            "so an encoder for it would never be called"
        )

    def register(f):
        if not callable(f):
            raise TypeError(f"@snakepit.encoder needs a callable, not {type(f).__name__}")
        _encoders[cls] = f
        return f

    if func is None:
        return register
    return register(func)


def session_end_hooks():
    """Return a copy of the list of @on_session_end hooks, in registration order."""
    return list(_session_end_hooks)


def registry():
    """Return a copy of the registry: a dict of command name -> function."""
    return dict(_registry)


def is_thread_safe(name):
    """Whether the command ``name`` was registered with ``thread_safe=True``."""
    return name in _thread_safe


def is_cpu_bound(name):
    """Whether the command ``name`` was registered with ``cpu_bound=True``."""
    return name in _cpu_bound


def takes_session(name):
    """Whether the command ``name`` was registered with ``session=True``."""
    return name in _session


def __getattr__(name):
    # snakepit.Session, for type hints, and snakepit.Array, without importing their modules
    # whenever snakepit is imported.
    if name == "Session":
        from snakepit._sessions import Session

        return Session
    if name == "Array":
        from snakepit._values import Array

        return Array
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Cancelled(BaseException):
    """The host cancelled the call that is running.

    Raised by ``check_cancelled()``, and by the worker in the command's thread when the host
    interrupts a call that did not stop by itself. A BaseException, like KeyboardInterrupt, so
    that ``except Exception`` in a command does not swallow it; a command that lets it out is
    answered as cancelled (error type "Cancelled") and the worker goes on serving.
    """


def _no_call():
    return None


# The worker's: returns the calling thread's running call (an object with is_cancelled() and
# report_progress(done, total, message)), or None outside a call. Kept here, and set by the
# worker module when it is imported, so that importing snakepit stays cheap.
_current_call = _no_call


def cancelled():
    """Whether the host asked to cancel the call this thread is running (False outside a call).

    Cheap enough to call in a command's inner loop.
    """
    call = _current_call()
    return call is not None and call.is_cancelled()


def check_cancelled():
    """Raise ``Cancelled`` if the host asked to cancel the call this thread is running."""
    call = _current_call()
    if call is not None and call.is_cancelled():
        raise Cancelled("call cancelled")


def progress(done, total=None, message=None):
    """Report how far the running call has got: ``done`` of ``total`` (numbers, in the
    command's own unit; ``total`` None when unknown), with an optional ``message``.

    Does nothing outside a call (or on a thread the command started). The host gets at most
    one report every 0.05 s per call, and always one with ``done == total``; the others are
    dropped, not delayed. Raises TypeError for a ``done`` or ``total`` that is not an int or
    a float (bool is not a number here) or a ``message`` that is not a str or None, and
    ValueError for NaN or infinity.
    """
    done = _progress_number(done, "done")
    if total is not None:
        total = _progress_number(total, "total")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"snakepit.progress: message must be a str or None, not {type(message).__name__}")
    call = _current_call()
    if call is not None:
        call.report_progress(done, total, message)


def _progress_number(value, name):
    """``value`` as a JSON number: an int or a float (a finite one), else TypeError/ValueError."""
    kind = type(value)
    if kind is not int and kind is not float:
        value = _real_number(value, name)
    if value != value or value in (_INF, -_INF):
        raise ValueError(f"snakepit.progress: {name} must be finite, not {value!r}")
    return value


def _real_number(value, name):
    # Number types that are not int or float (numpy's, Fraction): the host wants a JSON
    # number, so they become one. Slow path: numbers is imported only here.
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"snakepit.progress: {name} must be an int or a float, not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value)


_INF = float("inf")


def _describe(f):
    module = getattr(f, "__module__", None) or "?"
    qualname = getattr(f, "__qualname__", None) or repr(f)
    return f"{module}.{qualname}"
