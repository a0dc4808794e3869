"""Per-session state: what a ``@snakepit.command(session=True)`` command keeps between the calls
of one host session.

The worker holds a ``Registry`` of session id -> state. Each call of a session command gets a
new ``Session``: a view of the session's one shared store (a dict) and lock, plus what belongs
to that call alone (``context``, ``fresh``, ``calls``), so calls of one session that run at once
on several threads (the thread profile) never see each other's per-call values.
"""

import threading
from collections.abc import MutableMapping

__all__ = ["Session", "Registry"]

_MISSING = object()  # Session.pop's "no default given"


class Session(MutableMapping):
    """The state of one session in this worker, as one call of it sees it.

    A dict-like store (``session["model"] = ...``) shared by every call of the session that
    this worker runs, with attributes:

    ``id``
        The session's id (a str), or None for a session command called without a session.
    ``context``
        The context the host sent with this call, or None.
    ``fresh``
        True when this worker had no state for the session before this call: the command
        should expect an empty store (the session is new here, or moved from a lost worker).
    ``calls``
        How many calls of this session this worker has run, this one included.
    ``lock``
        A ``threading.RLock`` shared by the session's calls: in the thread profile several
        calls of one session may run at once, and only the command knows what needs guarding.
        Single operations (``setdefault``, ``pop``, getting and setting one key) are atomic
        without it.
    """

    __slots__ = ("id", "context", "fresh", "calls", "lock", "_data")

    def __init__(self, id=None, context=None, fresh=True, calls=1, lock=None, data=None):
        self.id = id
        self.context = context
        self.fresh = fresh
        self.calls = calls
        self.lock = threading.RLock() if lock is None else lock
        self._data = {} if data is None else data

    # The abstract methods, and the mixins that a dict does in one atomic step (the mixins
    # would take several, each a Python call).
    def __getitem__(self, key):
        return self._data[key]

    def __setitem__(self, key, value):
        self._data[key] = value

    def __delitem__(self, key):
        del self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        return key in self._data

    def get(self, key, default=None):
        return self._data.get(key, default)

    def pop(self, key, default=_MISSING):
        if default is _MISSING:
            return self._data.pop(key)
        return self._data.pop(key, default)

    def setdefault(self, key, default=None):
        return self._data.setdefault(key, default)

    def clear(self):
        self._data.clear()

    def __repr__(self):
        return f"<snakepit.Session id={self.id!r} calls={self.calls} fresh={self.fresh} keys={list(self._data)!r}>"


class _State:
    """What a session keeps between calls: its store, its lock and its call count."""

    __slots__ = ("data", "lock", "calls")

    def __init__(self):
        self.data = {}
        self.lock = threading.RLock()
        self.calls = 0


class Registry:
    """Session id -> state, safe to use from several threads."""

    def __init__(self):
        self._states = {}
        self._lock = threading.Lock()  # held for dict and counter updates only, never for a command

    def __len__(self):
        """The number of live session states."""
        return len(self._states)

    def enter(self, session_id, context):
        """The Session for one call of ``session_id``, creating its state if there is none."""
        with self._lock:
            state = self._states.get(session_id)
            fresh = state is None
            if fresh:
                state = self._states[session_id] = _State()
            state.calls += 1
            calls = state.calls
        return Session(session_id, context, fresh, calls, state.lock, state.data)

    def remove(self, session_id):
        """Forget ``session_id``'s state; return it as a Session (context None, fresh False), or
        None when there was none."""
        with self._lock:
            state = self._states.pop(session_id, None)
        if state is None:
            return None
        return Session(session_id, None, False, state.calls, state.lock, state.data)
