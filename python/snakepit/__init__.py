"""snakepit: Python commands served to a Rust host by long-lived worker processes.

An adapter module registers the functions the host may call::

    import snakepit

    @snakepit.command
    def add(a, b):
        return a + b

    @snakepit.command(name="shout")
    def upper(text):
        return text.upper()

and the host starts workers with ``python -m snakepit --adapter my_adapter``.

This module only holds the registry; it must stay cheap to import because
every worker imports it before anything else.
"""

__version__ = "0.1.0"

#: The pool's `args` setting: extra arguments for the adapter, set before it is imported.
ARGS = []

__all__ = ["command", "registry", "is_thread_safe", "is_cpu_bound", "ARGS", "__version__"]

# Command name -> function, filled in by @command while adapters import.
_registry = {}
# Names of commands declared thread_safe=True: the thread profile runs only these (unless the
# adapter module sets SNAKEPIT_THREAD_SAFE = True or the pool allows unsafe threads).
_thread_safe = set()
# Names of commands declared cpu_bound=True: a thread-profile pool on an interpreter whose GIL
# is on warns about them (threads would not run them in parallel).
_cpu_bound = set()


def command(func=None, *, name=None, thread_safe=False, cpu_bound=False):
    """Register ``func`` as a command the host can call.

    Usable bare (``@command``) or with options
    (``@command(name="other", thread_safe=True, cpu_bound=True)``). The function is returned
    unchanged. Registering a second, different function under a name that is
    already taken raises ValueError, so two adapters cannot silently shadow
    each other; registering the same function twice is harmless.
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
        for flag, names in ((thread_safe, _thread_safe), (cpu_bound, _cpu_bound)):
            if flag:
                names.add(key)
            else:
                names.discard(key)
        return f

    if func is None:
        return register
    return register(func)


def registry():
    """Return a copy of the registry: a dict of command name -> function."""
    return dict(_registry)


def is_thread_safe(name):
    """Whether the command ``name`` was registered with ``thread_safe=True``."""
    return name in _thread_safe


def is_cpu_bound(name):
    """Whether the command ``name`` was registered with ``cpu_bound=True``."""
    return name in _cpu_bound


def _describe(f):
    module = getattr(f, "__module__", None) or "?"
    qualname = getattr(f, "__qualname__", None) or repr(f)
    return f"{module}.{qualname}"
