"""Adapter log records and warnings reach the host's ``log`` crate at their own level.

Each line of a record goes to stderr behind a tag, ``\\x1esnakepit:LEVEL\\x1e``, which the host
strips and logs at that level under the target ``snakepit::python`` (WARNING -> warn, INFO ->
info, ...). Lines without the tag (``print``, C libraries) stay at ``debug``.

``warnings`` are tagged WARNING. ``logging`` is bridged only when the adapter imported it
(importing it would cost every worker start ~5 ms): the handlers the adapter configured on the
root logger keep their format and get the tag; with none, records reach stderr the way
Python's own last-resort handler would print them, tagged.
"""

import sys

TAG = "\x1esnakepit:{}\x1e"


def tag_lines(level, text):
    """``text`` with every line behind the tag of ``level`` (a logging level name)."""
    tag = TAG.format(level)
    return "\n".join(tag + line for line in text.split("\n"))


def install():
    """Bridge ``warnings`` always, and ``logging`` if the adapter imported it."""
    import warnings

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
        try:
            (file or sys.stderr).write(tag_lines("WARNING", text) + "\n")
        except Exception:
            pass  # as Python's own: a warning never breaks the program

    warnings.showwarning = showwarning
    logging = sys.modules.get("logging")
    if logging is not None:
        _bridge_logging(logging)


def _bridge_logging(logging):
    root = logging.getLogger()
    handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
    if not root.handlers:
        # What Python's last-resort handler would print (WARNING and above), tagged.
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
        handlers = [handler]
    for handler in handlers:
        plain = handler.format

        def tagged(record, plain=plain):
            return tag_lines(record.levelname, plain(record))

        handler.format = tagged
