"""The worker process behind ``python -m snakepit``.

``Worker`` holds the protocol logic and touches no file descriptors, so tests
can drive it with in-memory streams. ``main`` does the process plumbing:
argument parsing, logging, parent-death handling, moving the protocol off
fds 0/1, importing the adapter, then ``Worker.serve``, and at the end a fast
exit that skips the interpreter's teardown (``_exit_fast``).
"""

import json
import os
import sys
import threading
import time
import traceback
from types import GeneratorType, SimpleNamespace

import snakepit
from snakepit import Cancelled, _calls, _keeper, _logbridge
from snakepit.protocol import (
    CANCEL_FILE_SIZE,
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameTooLarge,
    ProtocolError,
    TooManyAttachments,
    chunk_message,
    conversion_note,
    describe_problem,
    encode_frame,
    exception_text as _text,
    parse_cancel,
    parse_credit,
    reaches_host_exactly,
    read_frame,
    resolve_inline,
    stream_window,
    type_name as _type_name,
    utf8_safe,
    write_all,
)


class _LazyLog:
    """``logging.getLogger(__name__)``, imported only when a message passes the level.

    Importing logging costs ~5 ms of every worker start; at the default level
    (WARNING, from SNAKEPIT_LOG_LEVEL) a healthy worker never logs, so it never
    pays that.
    """

    _LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "WARN": 30, "ERROR": 40, "CRITICAL": 50}

    def __init__(self):
        self.level = self._LEVELS.get(os.environ.get("SNAKEPIT_LOG_LEVEL", "WARNING").strip().upper(), 30)
        self.prefix = "[snakepit]"
        self._logger = None

    def _emit(self, level, msg, args):
        if level < self.level:
            return
        if self._logger is None:
            import logging

            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(self.prefix.replace("%", "%%") + " %(levelname)s: %(message)s"))
            plain = handler.format
            handler.format = lambda record: _logbridge.tag_lines(record.levelname, plain(record))
            logger = logging.getLogger(__name__)
            logger.setLevel(self.level)
            logger.addHandler(handler)
            logger.propagate = False  # an adapter's logging.basicConfig must not print our lines twice
            self._logger = logger
        self._logger.log(level, msg, *args)

    def debug(self, msg, *args):
        self._emit(10, msg, args)

    def info(self, msg, *args):
        self._emit(20, msg, args)

    def warning(self, msg, *args):
        self._emit(30, msg, args)

    def error(self, msg, *args):
        self._emit(40, msg, args)


log = _LazyLog()

BUILTIN_COMMANDS = ("echo", "info", "ping")

EXIT_OK = 0
EXIT_ORPHANED = 1  # the parent died (or was already gone at start-up)
EXIT_PROTOCOL = 2
EXIT_STARTUP = 3

_SIGKILL = 9  # the same numbers on every POSIX system; saves importing signal at start-up
_SIGTERM = 15
_PR_SET_PDEATHSIG = 1
_WATCHDOG_INTERVAL = 0.5

_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}


class Worker:
    """Answers protocol messages with the given commands plus the built-ins.

    ``session_commands``: the names of the commands that get the call's Session (see
    _session_call); by default those of ``commands`` registered with
    ``@snakepit.command(session=True)``. ``on_session_end``: the hooks an ``end_session`` runs;
    by default those registered with ``@snakepit.on_session_end``, as they are at that time.
    """

    def __init__(
        self, commands=None, max_frame_size=DEFAULT_MAX_FRAME, adapter=None, session_commands=None, on_session_end=None
    ):
        commands = dict(commands or {})
        clash = sorted(set(commands).intersection(BUILTIN_COMMANDS))
        if clash:
            raise ValueError(f"commands may not use the built-in name(s) {', '.join(clash)}")
        if session_commands is None:
            registered = snakepit.registry()
            session_commands = [n for n, f in commands.items() if snakepit.takes_session(n) and registered.get(n) is f]
        session_commands = set(session_commands)
        unknown = sorted(session_commands.difference(commands))
        if unknown:
            raise ValueError(f"session_commands names commands that are not given: {', '.join(unknown)}")
        commands.update(echo=_echo, info=self.info, ping=_ping)
        self.commands = commands
        self.names = sorted(commands)
        self.max_frame_size = max_frame_size
        self.adapter = adapter
        # _call's table: session commands are missing from it, so a plain call pays nothing for them.
        self._plain = {n: f for n, f in commands.items() if n not in session_commands}
        self._with_session = {n: commands[n] for n in session_commands}
        # Session id -> state (see _sessions); None for a worker without session commands, which
        # never has any, and does not import _sessions (~0.3 ms of every start).
        self.sessions = None
        if session_commands:
            from snakepit._sessions import Registry, Session

            self.sessions = Registry()
            self._throwaway = Session  # the Session of a call without one
        self._on_session_end = None if on_session_end is None else list(on_session_end)
        self._hook_queue = None  # see run_hooks_in_thread
        self._hook_thread = None

    def serve(self, reader, write):
        """Answer frames from the binary stream ``reader`` until EOF or a shutdown.

        ``write(data)`` sends one encoded frame (encode_frame's bytes, or its list of buffers
        for a frame with attachments, which borrow the command's memory: they are written
        before ``write`` returns). Raises ProtocolError when the host sends something that is
        not a frame.

        A call runs with its id in ``_calls.MAIN``, for snakepit.cancelled() and progress()
        and the SIGINT handler (see _cancel_on_signal), which may raise Cancelled anywhere in
        the try block below, even after the command returned. A stream (a call with a
        "window") reads the host's frames itself while it waits for credit; the calls and
        end_session frames it read meanwhile are handled after it (``backlog``).
        """
        # The hot path of the process profile: keep it to the calls below. A plain call adds
        # the "window" test, two stores of MAIN.id and a try block.
        limit = self.max_frame_size
        respond = self.respond
        main = _calls.MAIN
        main.begin(threading.get_ident(), write, limit)
        backlog = []
        while True:
            msg = backlog.pop(0) if backlog else read_frame(reader, limit)
            if msg is None:
                log.debug("end of input; exiting")
                return
            kind = msg["type"]
            if kind == "call":
                if "window" in msg:
                    data = self._serve_stream(msg, reader, write, backlog)
                else:
                    try:
                        main.id = msg.get("id")
                        data = respond(msg)
                        main.id = None  # a SIGINT from here on raises nothing
                    except Cancelled as exc:  # SIGINT's, after the command returned (_call has the others)
                        main.id = None
                        data = _cancelled_frame(msg.get("id"), exc, limit)
            elif kind == "shutdown":
                log.debug("shutdown requested; exiting")
                return
            else:
                data = respond(msg)
            if data is not None:
                write(data)
            # Let go of the call's arguments and result before waiting for the next frame (which
            # may be long in coming): a large array would otherwise stay in memory until then.
            msg = data = None

    def _serve_stream(self, msg, reader, write, backlog):
        """serve() for a call with a "window": the stream's chunks are written as they come;
        returns its last frame (result or error)."""
        rid = _request_id(msg)
        main = _calls.MAIN
        main.shielded = True  # SIGINT raises only in the command's code (ProcessStream.enter)
        link = _calls.ProcessStream(rid, msg["window"], reader, self.max_frame_size, write, self.respond, backlog)
        try:
            main.id = rid
            return self._stream(msg, rid, link)
        finally:
            main.id = None
            main.cancel_id = None
            main.shielded = False

    def serve_threaded(self, reader, write, threads):
        """Like serve(), but calls run on up to ``threads`` threads at once, each reply written
        as soon as its call finishes (out of order, matched by id). Pings (and every message
        but a call) are answered by this reading loop, even while every thread is busy. At EOF
        or shutdown the calls already taken finish before this returns.

        ``write(data)`` sends one or more whole encoded frames (a bytes object, or a list of
        buffers: see _reply_sender); it is called by one thread at a time.

        The reading loop applies ``credit`` and ``cancel`` frames to the calls taken (see
        _calls.ThreadCalls); a stream runs on its call thread, sending its chunks as the
        replies are sent.
        """
        # The hot path of the thread profile. A call costs one put here and one get on a call
        # thread (a ThreadPoolExecutor's Future, locks and semaphore cost several times the
        # work of an echo), and its reply goes out in one write with the replies of calls that
        # finished meanwhile (_reply_sender). CPython's C SimpleQueue has a put wake a sleeping
        # get only when no woken one is on its way, and a get that takes a call wake the next
        # sleeper: a burst of calls does not wake every idle thread at once to fight over the
        # GIL, yet a call left in the queue finds a thread as long as one is free, so a call
        # that blocks delays no other call.
        try:
            from _queue import SimpleQueue
        except ImportError:  # an implementation without the C module
            from queue import SimpleQueue

        respond = self.respond
        stream = self._stream
        send = _reply_sender(write)
        queue = SimpleQueue()  # taken calls (msg, or a StreamCall), then one None per thread at the end
        get = queue.get
        put = queue.put
        limit = self.max_frame_size
        calls = _calls.ThreadCalls(send, limit)  # for cancel and credit frames, see there
        running = calls.running
        running_pop = running.pop
        early = calls.early
        pool = []  # the call threads, started when a call finds none free, at most `threads`
        # One token per call thread done with its call and bound for get(), that no call put
        # since has counted on: call threads append, only this loop pops.
        free = []
        free_pop = free.pop

        def run(free_append=free.append):
            me = calls.thread(threading.get_ident())
            try:
                serve_calls(me, free_append)
            finally:
                calls.forget_thread(me)

        def serve_calls(me, free_append):
            while True:
                item = get()
                if item is None:
                    return
                msg = item if type(item) is dict else item.msg
                rid = msg["id"]
                # A forced cancel (ThreadCalls.cancel) may raise Cancelled in this thread from
                # the store of me.msg until its clearing, once per call at most: anywhere in
                # here, even in the handler of a Cancelled that the command raised itself, hence
                # two levels of except (the outer one only ever gets the forced one, after
                # which none can come). See _calls.CallThread.
                try:
                    try:
                        me.msg = msg
                        if early and rid in early:
                            raise _NotStarted("call cancelled before it started")
                        data = respond(msg) if item is msg else stream(msg, rid, item.begin(me))
                    except Cancelled as exc:
                        data = exc
                    me.msg = None  # me.end()'s first line, inline: every call's path
                    if me.forced_id is not None:
                        data = me.end(data)
                except Cancelled as exc:
                    data = me.end(exc)
                except BaseException as exc:  # SystemExit from a command ends the worker, as in serve()
                    log.error("command %r ended the worker: %r", msg.get("command"), exc)
                    os._exit(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
                running_pop(rid, None)
                if early:
                    calls.forget_early(rid)
                if item is not msg:
                    calls.end_stream(rid, me)
                if type(data) is not bytes and type(data) is not list:  # a frame, or a Cancelled
                    data = _cancelled_frame(rid, data, limit)
                try:
                    send(data)
                except OSError:
                    pass  # the host is gone; the reading loop sees EOF
                item = msg = data = None  # not held while this thread waits (a large array, say)
                free_append(None)

        try:
            while True:
                msg = read_frame(reader, limit)
                if msg is None:
                    return
                kind = msg["type"]
                if kind == "call":
                    running[_request_id(msg)] = msg  # a call without an integer id is a protocol error, here
                    put(msg if "window" not in msg else calls.stream(msg["id"], msg))
                    if free:
                        free_pop()
                    elif len(pool) < threads:  # every thread is busy: one more, for this call
                        thread = threading.Thread(target=run, name=f"snakepit-call-{len(pool)}", daemon=False)
                        thread.start()
                        pool.append(thread)
                    msg = None  # its call thread holds it; not this loop, while it waits to read
                    continue
                if kind == "credit":
                    calls.credit(*parse_credit(msg))
                    continue
                if kind == "cancel":
                    calls.cancel(*parse_cancel(msg))
                    continue
                if kind == "shutdown":
                    return
                data = respond(msg)
                if data is not None:
                    send(data)
        finally:
            calls.cancel_streams()  # no credit can come any more
            for _ in pool:
                put(None)  # after every call taken: each thread finishes those first
            for thread in pool:
                thread.join()

    def respond(self, msg):
        """Handle ``msg`` and return its encoded reply frame (see encode_frame: bytes, or a list
        of buffers when the reply holds bytes or arrays), or None.

        A reply that cannot be encoded (not JSON, NaN, too large), or whose value would not
        reach the host as itself (a dict key that is not a str, an integer outside
        -2**63 .. 2**64-1), is replaced by an error reply saying why and where in the value.
        """
        reply = self._call(msg) if msg["type"] == "call" else self.handle(msg)
        if reply is None:
            return None
        # _encode_reply's first lines, inline: this is every call's path.
        try:
            data = encode_frame(reply, self.max_frame_size)
        except Exception as exc:  # TypeError/ValueError from json, UnicodeEncodeError, RecursionError
            return self._refused(msg, reply, exc)[0]
        # A value the encoder took may still not reach the host as itself (non-str dict
        # keys, integers beyond 64 bits): a cheap check, and a closer look only if it fails.
        if reply["type"] != "result" or reaches_host_exactly(reply["value"]):
            return data
        return self._refused(msg, reply, None, data)[0]

    def _encode_reply(self, msg, reply):
        """``(frame, True)`` for the reply (or chunk) dict ``reply`` to ``msg``, or ``(error
        frame, False)`` when it cannot be sent as it is (see respond)."""
        try:
            data = encode_frame(reply, self.max_frame_size)
        except Exception as exc:
            return self._refused(msg, reply, exc)
        if reply["type"] not in ("result", "chunk") or reaches_host_exactly(reply["value"]):
            return data, True
        return self._refused(msg, reply, None, data)

    def _refused(self, msg, reply, exc, data=None):
        """_encode_reply's slow path: ``exc`` is what the encoder raised, or None when it took
        the reply (``data``) but its value failed reaches_host_exactly. Returns ``(frame,
        sent_as_is)``: the error frame saying what is wrong and where, or ``data`` after all."""
        kind = reply["type"]
        has_value = kind == "result" or kind == "chunk"
        if exc is None:
            problem = _value_problem(reply["value"])
            if problem is None:
                return data, True
            error, text = problem
        elif isinstance(exc, FrameTooLarge):
            error = "FrameTooLarge"
            text = f"is {exc.size} bytes, above the maximum frame size of {exc.limit} bytes{conversion_note(exc)}"
        elif isinstance(exc, TooManyAttachments):
            error = "ValueError"
            text = _text(exc)
        else:
            if kind == "result" and type(reply["value"]) is GeneratorType:
                return self._generator_without_window(msg, reply), False
            error = _type_name(type(exc))
            text = f"is not JSON-serialisable: {_text(exc)}"
            if has_value:  # say what, and where in the value
                error, text = _value_problem(reply["value"]) or (error, text)
        if kind == "result":
            what = f"result of command {msg.get('command')!r}"
        elif kind == "chunk":
            what = f"chunk of stream {msg.get('command')!r}"
        else:
            what = f"{kind} reply to a {msg['type']!r} message"
        values = sys.modules.get("snakepit._values")  # loaded if an encoder ran
        if values is not None and isinstance(exc, values.EncoderFailed):  # show where it raised, if it fits
            reply = _error_reply(reply.get("id"), error, f"{what} {text}")
            reply["error"]["traceback"] = _error_info(exc.cause)["traceback"]
            try:
                return encode_frame(reply, self.max_frame_size), False
            except FrameTooLarge:
                pass
        return _error_frame(reply.get("id"), error, f"{what} {text}", self.max_frame_size), False

    def _generator_without_window(self, msg, reply):
        """The error frame for a command that returned a generator to a plain call: closed,
        unread (its ``finally`` runs)."""
        name = msg.get("command")
        _close_quietly(reply["value"], name)
        return _error_frame(
            reply["id"],
            "TypeError",
            f"command {name!r} is a generator: call it as a stream (Pool::stream)",
            self.max_frame_size,
        )

    def handle(self, msg):
        """Return the reply dict for one decoded message, or None for no reply.

        ``shutdown`` is acted on by serve(); here it simply gets no reply. ``end_session``
        never gets one either: it is done here, so in the thread profile the reading loop does
        it, without waiting for busy call threads.
        """
        kind = msg["type"]
        if kind == "call":
            return self._call(msg)
        if kind == "ping":
            return {"type": "pong", "id": _request_id(msg)}
        if kind == "shutdown":
            return None
        if kind == "end_session":
            self.end_session(msg.get("session"))
            return None
        if kind == "credit":  # for a call that is not running (any more): nothing to do
            parse_credit(msg)
            return None
        if kind == "cancel":
            parse_cancel(msg)
            return None
        if msg.get("id") is None:
            log.warning("ignoring message of unknown type %r", kind)
            return None
        return _error_reply(_request_id(msg), "ProtocolError", f"unknown message type {kind!r}")

    def _call(self, msg):
        # Every reply dict is built with "type" first and "id" second, and encoding keeps
        # that order: the host reads the id of a reply it cannot decode from the frame's
        # start, {"type":"result","id": or {"type":"error","id": (see _error_reply).
        rid = msg.get("id")
        if type(rid) is not int:
            _request_id(msg)  # raises the ProtocolError
        name = msg.get("command")
        func = self._plain.get(name) if isinstance(name, str) else None
        if func is None:
            return self._session_call(msg, rid, name)
        args = msg.get("args")
        kind = type(args)
        if kind is not list and kind is not dict and args is not None:
            return _bad_args(rid, name, args)
        try:
            if kind is list:
                value = func(*args)
            elif kind is dict:
                value = func(**args)
            else:
                value = func()
        except Exception as exc:  # not BaseException: SystemExit must still end the worker
            return {"type": "error", "id": rid, "error": _error_info(exc)}
        except Cancelled as exc:
            return _cancelled_reply(rid, exc)
        return {"type": "result", "id": rid, "value": value}

    def _session_call(self, msg, rid, name):
        """_call for a command that takes a session, or one that does not exist.

        The command gets ``session=``: the Session of the call's ``session`` id (its state
        created if this worker has none), or without one a throwaway Session, never kept.
        """
        func = self._with_session.get(name) if isinstance(name, str) else None
        if func is None:
            return _error_reply(
                rid, "UnknownCommand", f"unknown command {name!r}; known commands: {', '.join(self.names)}"
            )
        args = msg.get("args")
        kind = type(args)
        if kind is not list and kind is not dict and args is not None:
            return _bad_args(rid, name, args)
        session_id = msg.get("session")
        if session_id is None:
            session = self._throwaway()
        elif type(session_id) is str:
            session = self.sessions.enter(session_id, msg.get("context"))
        else:
            return _error_reply(
                rid, "ProtocolError", f"the 'session' of a call must be a string, not {_json_type(session_id)}"
            )
        try:
            if kind is list:
                value = func(*args, session=session)
            elif kind is dict:
                value = func(**args, session=session)
            else:
                value = func(session=session)
        except Exception as exc:  # not BaseException: SystemExit must still end the worker
            return {"type": "error", "id": rid, "error": _error_info(exc)}
        except Cancelled as exc:
            return _cancelled_reply(rid, exc)
        return {"type": "result", "id": rid, "value": value}

    def _stream(self, msg, rid, link):
        """Run the stream call ``msg`` (a call with a "window"): the command's generator is
        iterated while ``link`` has credit, each value sent as a chunk (``link.post``).
        Returns the frame that ends the stream: the result (the generator's return value),
        the error it raised or that a chunk could not be sent, or Cancelled.

        ``link`` is the call's state, a _calls.StreamCall or _calls.ProcessStream:
        ``take_credit()`` waits for one chunk's credit (False: cancelled), and ``enter()`` and
        ``leave()`` bracket the command's own code, the only place where a forced cancel
        raises Cancelled. The generator is paused (next() is not called) while there is no
        credit. A command that returns anything but a generator sends it as the one chunk,
        then result null.
        """
        limit = self.max_frame_size
        gen = None
        try:
            try:
                stream_window(msg)
            except ProtocolError as exc:
                return _error_frame(rid, "ProtocolError", _text(exc), limit)
            link.enter()
            reply = self._call(msg)
            link.leave()
            if reply["type"] != "result":
                return self._encode_reply(msg, reply)[0]
            value = reply["value"]
            if type(value) is not GeneratorType:
                if not link.take_credit():
                    return _cancelled_frame(rid, None, limit, link.cancel_message)
                data, sent_as_is = self._encode_reply(msg, chunk_message(rid, value))
                if not sent_as_is:
                    return data
                link.post(data)
                return self._encode_reply(msg, {"type": "result", "id": rid, "value": None})[0]
            gen = value
            while True:
                if link.is_cancelled() or not link.take_credit():
                    return self._cancel_stream(gen, rid, link)
                try:
                    link.enter()
                    item = next(gen)
                except StopIteration as stop:
                    link.leave()
                    return self._encode_reply(msg, {"type": "result", "id": rid, "value": stop.value})[0]
                except Exception as exc:
                    link.leave()
                    return self._encode_reply(msg, {"type": "error", "id": rid, "error": _error_info(exc)})[0]
                link.leave()
                data, sent_as_is = self._encode_reply(msg, chunk_message(rid, item))
                if not sent_as_is:
                    _close_quietly(gen, msg.get("command"))
                    return data
                link.post(data)
        except Cancelled as exc:  # raised by the command or in it (forced); its generator is done
            link.leave()
            if gen is not None:
                _close_quietly(gen, msg.get("command"))  # unless it was paused when forced
            return _cancelled_frame(rid, exc, limit)

    def _cancel_stream(self, gen, rid, link):
        """Close the generator of a cancelled stream (its ``finally`` runs, as the command's
        code) and return the Cancelled frame, whose traceback shows where it was paused. If
        close() raises an exception, that is the answer instead: a generator that will not
        stop is a bug to show."""
        message = link.cancel_message
        where = _paused_at(gen, message)
        try:
            link.enter()
            gen.close()
        except Exception as exc:
            link.leave()
            return self._encode_reply({"type": "call"}, {"type": "error", "id": rid, "error": _error_info(exc)})[0]
        link.leave()
        return _cancelled_frame(rid, None, self.max_frame_size, message, where)

    def end_session(self, session_id):
        """Forget ``session_id``'s state and run the on_session_end hooks with it, in order.

        Nothing happens when this worker has no state for it. A hook that raises is logged
        (a warning with its traceback) and the next one runs.
        """
        if type(session_id) is not str:
            log.warning("ignoring end_session whose 'session' is %s, not a string", _json_type(session_id))
            return
        session = None if self.sessions is None else self.sessions.remove(session_id)
        if session is None:
            return
        hooks = snakepit.session_end_hooks() if self._on_session_end is None else self._on_session_end
        if hooks and self._hook_queue is not None:
            self._hook_queue.put((session_id, session, hooks))
        elif hooks:
            self._run_hooks(session_id, session, hooks)

    def run_hooks_in_thread(self):
        """From now on, run the on_session_end hooks on a thread of their own, in order, so
        that a slow hook never holds up the frames after it (pings, calls). The worker process
        does this; ``stop_hook_thread`` lets the hooks queued so far finish."""
        if self.sessions is None:
            return  # no session commands: no sessions, no hooks to run
        import queue

        self._hook_queue = queue.SimpleQueue()

        def run():
            while True:
                item = self._hook_queue.get()
                if item is None:
                    return
                self._run_hooks(*item)

        self._hook_thread = threading.Thread(target=run, name="snakepit-session-end", daemon=True)
        self._hook_thread.start()

    def stop_hook_thread(self):
        """Wait for the hooks queued so far (the host's stop_timeout bounds a hook that hangs)."""
        if self._hook_thread is not None:
            self._hook_queue.put(None)
            self._hook_thread.join()

    def _run_hooks(self, session_id, session, hooks):
        for hook in hooks:
            try:
                hook(session)
            except Exception as exc:
                log.warning(
                    "on_session_end hook %s failed for session %r:\n%s",
                    snakepit._describe(hook),
                    session_id,
                    _error_info(exc)["traceback"].rstrip("\n"),
                )

    def run_init(self, name, args_json=None):
        """Run the command ``name`` once, as the worker's initialisation (``--init``): with the
        arguments ``args_json`` (JSON text: an object for keyword arguments, an array for
        positional ones, None or null for none), not in a session.

        Returns None, or the ``error`` of a startup_error frame when the command is unknown,
        the arguments are not valid, or the command raises (anything, even SystemExit): its
        message is ``init command 'NAME' failed: TYPE: MESSAGE``, with the traceback.
        """
        msg = {"type": "call", "id": 0, "command": name}
        error = None
        if args_json is not None:
            try:
                msg["args"] = json.loads(args_json)
            except ValueError as exc:  # json.JSONDecodeError
                error = _error_reply(0, "ValueError", f"--init-args is not valid JSON: {_text(exc)}")["error"]
            else:
                if "__snakepit__" in args_json:  # bytes or arrays, inline (b64)
                    from snakepit._values import BadArgs, BadValue

                    try:
                        msg["args"] = resolve_inline(msg["args"], "args")
                    except BadValue as exc:
                        msg["args"] = BadArgs(_text(exc))
        if error is None:
            try:
                reply = self._call(msg)
            except BaseException as exc:  # as for the adapter's import: SystemExit too
                error = _error_info(exc)
            else:
                if reply["type"] != "error":
                    return None
                error = reply["error"]
        error["message"] = utf8_safe(f"init command {name!r} failed: {error['type']}: {error['message']}")
        return error

    def ready_info(self):
        """The ``info`` of the ready message."""
        info = _runtime_info()
        info["protocol_version"] = PROTOCOL_VERSION
        info["commands"] = self.names
        info["cpu_bound"] = sorted(c for c in self.names if snakepit.is_cpu_bound(c))
        info["stack_dumps"] = bool(_stack_files)  # the host asks for stacks only then
        info["cancel_signal"] = bool(_cancel_signal)  # the host interrupts calls with SIGINT only then
        return info

    def info(self):
        """Built-in ``info`` command: runtime facts about this worker."""
        info = _runtime_info()
        info["rss_bytes"] = _rss_bytes()
        info["commands"] = self.names
        info["adapter"] = self.adapter
        info["sessions"] = 0 if self.sessions is None else len(self.sessions)
        return info


def load_worker(
    adapter, max_frame_size=DEFAULT_MAX_FRAME, threads=0, allow_unsafe_threads=False, init=None, init_args=None
):
    """Import the adapter module, build its Worker and run its ``init`` command.

    Returns ``(worker, None)``, or ``(None, startup_error_message)`` when the
    adapter cannot be imported, registers a built-in command name, (with
    ``threads``) has commands not declared thread-safe, or the ``init`` command fails
    (see Worker.run_init; ``init_args`` is its arguments as JSON text, or None).
    """
    if adapter:
        try:
            # __import__ (unlike importlib.import_module) has the import system
            # strip its own frames, so the traceback shows the adapter's code.
            __import__(adapter)
        except BaseException as exc:  # even SyntaxError, or a SystemExit at the adapter's top level
            error = _error_info(exc, f"adapter {adapter!r} failed to import: {_text(exc)}")
            return None, {"type": "startup_error", "error": error}
    commands = snakepit.registry() if adapter else {}
    if threads and not allow_unsafe_threads and adapter:
        module_safe = getattr(sys.modules.get(adapter), "SNAKEPIT_THREAD_SAFE", False) is True
        undeclared = sorted(c for c in commands if not module_safe and not snakepit.is_thread_safe(c))
        if undeclared:
            message = (
                f"adapter {adapter!r} has commands not declared thread-safe, which the thread profile "
                f"would run {threads} at a time: {', '.join(undeclared)}. Declare them with "
                "@snakepit.command(thread_safe=True), or set SNAKEPIT_THREAD_SAFE = True in the adapter "
                "module, or allow_unsafe_threads in the pool"
            )
            error = {"type": "ThreadSafetyError", "message": message, "traceback": ""}
            return None, {"type": "startup_error", "error": error}
    try:
        worker = Worker(commands, max_frame_size, adapter)
    except ValueError as exc:
        error = {"type": "ValueError", "message": f"adapter {adapter!r} is not usable: {exc}", "traceback": ""}
        return None, {"type": "startup_error", "error": error}
    if init is not None:
        error = worker.run_init(init, init_args)
        if error is not None:
            return None, {"type": "startup_error", "error": error}
    return worker, None


def main(argv=None, *, exit_fast=True):
    """Run a worker: the process entry point, ``sys.exit(main(sys.argv[1:]))``.

    Returns the process exit code when the worker stops before it serves (a bad
    command line exits with 2 through SystemExit). Once it has served, the worker
    does not return when it stops (shutdown, end of input, the host gone, or a
    protocol violation): it runs the atexit handlers and exits at once with the
    code it would have returned, skipping the interpreter's teardown (see
    _exit_fast). ``exit_fast=False`` returns the code instead.
    """
    args = _parse_args(argv)
    parent_pid = args.parent_pid
    if args.keeper and _keeper.split(parent_pid):
        parent_pid = os.getppid()  # the keeper's; from here on this process is the worker
    _setup_logging(args.pool, args.worker_id)
    if not _watch_parent(parent_pid):
        log.warning("parent process %s is already gone; exiting", parent_pid)
        return EXIT_ORPHANED
    reader, write = _take_over_stdio(threaded=bool(args.threads))
    snakepit.ARGS[:] = args.adapter_args

    worker, failure = load_worker(
        args.adapter, args.max_frame_size, args.threads, args.allow_unsafe_threads, args.init, args.init_args
    )
    if failure is not None:
        log.error("%s", failure["error"]["message"])
        write(_startup_error_frame(failure, args.max_frame_size))
        return EXIT_STARTUP
    _logbridge.install()  # after the adapter's import: it may have configured logging
    if args.stack_file:
        # Last before ready: after the adapter's import, whose own use of the signal it replaces.
        _dump_stacks_on_signal(args.stack_file, threaded=bool(args.threads))
    if args.cancel_file and not args.threads:  # the thread profile's calls get cancel frames
        _cancel_on_signal(args.cancel_file)
    write(encode_frame({"type": "ready", "info": worker.ready_info()}, args.max_frame_size))
    log.info("ready, serving %d commands", len(worker.names))

    if args.threads:
        # A slow hook must not hold up the reading loop (which answers pings). In the process
        # profile hooks run between calls on the main thread, like a command: an adapter that
        # is not thread-safe stays on one thread.
        worker.run_hooks_in_thread()
    code = EXIT_OK
    try:
        if args.threads:
            worker.serve_threaded(reader, write, args.threads)  # returns once the calls taken are done
        else:
            worker.serve(reader, write)
    except ProtocolError as exc:
        log.error("protocol violation, exiting: %s", exc)
        code = EXIT_PROTOCOL
    except BrokenPipeError:
        log.info("the host closed the pipe; exiting")
    worker.stop_hook_thread()
    if exit_fast:
        _exit_fast(code)
    return code


def _exit_fast(code):
    """End the process with ``code`` now, skipping the interpreter's teardown.

    A full teardown (destroying every module and object) takes ~0.4 s with numpy
    and scikit-learn imported, long enough under load for the host to lose
    patience and SIGTERM the worker. Like multiprocessing's children, do what a
    normal exit does for the program's sake, in the interpreter's order, and then
    os._exit: wait for non-daemon threads (threading._shutdown, which also runs
    threading's own exit hooks such as concurrent.futures'), run the atexit
    handlers, flush the standard streams.
    """
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:
            pass
    try:
        import atexit

        atexit._run_exitfuncs()  # reports a failing handler itself and goes on
    except Exception:
        pass
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
    os._exit(code)


# --- replies ---------------------------------------------------------------


def _ping():
    return "pong"


def _echo(*args, **kwargs):
    """Return the arguments: the list when called with an array, else the object."""
    return list(args) if args else kwargs


def _reply_sender(write):
    """Return ``send(data)``: ``write(data)`` from any thread, whole frames, never interleaved.

    A thread that finds another thread writing leaves its frame to that thread, which writes
    it next, together with any others left meanwhile, in one ``write``: no frame waits for
    more than the write in progress. A write's error goes to the thread that made it.

    A frame with attachments (a list of buffers) borrows the command's memory, which the
    command may change once send() returns (a stream that fills one array for every chunk):
    its sender leaves it too, but waits until it is written (or lost with a failed write).
    Frames left are written in the order they were left, so a stream's chunks and its result
    stay in order.
    """
    pending = []  # frames left by other threads for the one writing, in order
    lock = threading.Lock()  # guards the state below; never held across a write
    written = threading.Condition(lock)  # a write of frames left ended: for senders that wait
    writing = False
    left = 0  # frames left so far, counted
    done = 0  # of those, how many have been written (or lost with a failed write)
    waiting = 0  # senders waiting for their frame with attachments to be written

    def send(data):
        nonlocal writing, left, done, waiting
        with lock:
            if writing:
                pending.append(data)
                left += 1
                if type(data) is bytes:
                    return
                mine = left
                waiting += 1
                try:
                    while done < mine and writing:
                        written.wait()
                finally:
                    waiting -= 1
                if done >= mine:
                    return
                # The writer's write failed and it left (its error went to it): the frames left
                # since, this one among them, are this thread's to write.
                data = _combine(pending)
                pending.clear()
                upto = left
            elif pending:  # frames left when a write failed: before this one
                pending.append(data)
                left += 1
                data = _combine(pending)
                pending.clear()
                upto = left
            else:
                upto = done
            writing = True
        try:
            while True:
                write(data)
                with lock:
                    done = upto
                    if waiting:
                        written.notify_all()
                    if not pending:
                        writing = False
                        return
                    data = pending[0] if len(pending) == 1 else _combine(pending)
                    pending.clear()
                    upto = left
        except BaseException:
            with lock:
                done = upto
                writing = False
                if waiting:
                    written.notify_all()
            raise

    return send


def _combine(frames):
    """Several encoded frames as what one write takes: a bytes object when they are all plain
    (small: one copy costs less than a write each), else one list of all their buffers."""
    parts = []
    plain = True
    for frame in frames:
        if type(frame) is bytes:
            parts.append(frame)
        else:
            parts.extend(frame)
            plain = False
    return b"".join(parts) if plain else parts


def _error_frame(rid, kind, message, limit):
    """The frame of an error reply, its message cut short (ending in "...") if the whole would
    be larger than ``limit``: a small max_frame_size must not turn an error into a failure to
    report it."""
    while True:
        try:
            return encode_frame(_error_reply(rid, kind, message), limit)
        except FrameTooLarge as exc:
            if not message:
                raise
            # Bytes over, in characters: at least as many (JSON escapes and UTF-8 only add bytes).
            keep = len(message) - (exc.size - exc.limit) - 3
            message = message[:keep] + "..." if keep > 0 else ""


def _startup_error_frame(failure, limit):
    """The frame of a startup_error, its traceback (then its message) cut short if the whole
    would be larger than ``limit``. The traceback keeps its end, where the exception is."""
    error = failure["error"]
    while True:
        try:
            return encode_frame(failure, limit)
        except FrameTooLarge as exc:
            over = exc.size - exc.limit + 3  # bytes over, in characters: at least as many
            if error["traceback"]:
                keep = len(error["traceback"]) - over
                error["traceback"] = "..." + error["traceback"][-keep:] if keep > 0 else ""
            elif error["message"]:
                keep = len(error["message"]) - over
                error["message"] = error["message"][:keep] + "..." if keep > 0 else ""
            else:
                raise


class _NotStarted(Cancelled):
    """A call cancelled before its call thread started it: answered without a traceback."""


def _cancelled_reply(rid, exc, message=None):
    """The error reply of a call that ``exc`` (a Cancelled) stopped: error type "Cancelled",
    the traceback where it stopped."""
    error = _error_info(exc, message or _text(exc) or "call cancelled")
    error["type"] = "Cancelled"
    return {"type": "error", "id": rid, "error": error}


def _cancelled_frame(rid, exc, limit, message=None, traceback_text=""):
    """The frame of a Cancelled reply: for ``exc`` (a Cancelled), or without one for a call
    that was stopped without raising (a stream closed, a call never started), with
    ``traceback_text``. A traceback too large for ``limit`` is left out."""
    if exc is None or isinstance(exc, _NotStarted):
        message = message or (exc is not None and _text(exc)) or "call cancelled"
        reply = _error_reply(rid, "Cancelled", message)
        reply["error"]["traceback"] = utf8_safe(traceback_text)
    else:
        reply = _cancelled_reply(rid, exc, message)
    try:
        return encode_frame(reply, limit)
    except FrameTooLarge:
        return _error_frame(rid, "Cancelled", reply["error"]["message"], limit)


def _paused_at(gen, message):
    """A traceback of where the generator ``gen`` is paused, as if Cancelled had been raised
    there; "" when it is not paused (finished, or running)."""
    frame = gen.gi_frame
    if frame is None:
        return ""
    try:
        stack = "".join(traceback.format_stack(frame))
    except Exception:  # a frame whose source cannot be read is still no reason to fail
        return ""
    return f"Traceback (most recent call last):\n{stack}snakepit.Cancelled: {message}\n"


def _close_quietly(gen, name):
    """gen.close(); an exception it raises is logged (the reply says something else already).
    Cancelled goes through: the caller answers it."""
    try:
        gen.close()
    except Exception as exc:
        log.warning(
            "closing the generator of command %r failed:\n%s", name, _error_info(exc)["traceback"].rstrip("\n")
        )


def _value_problem(value):
    """describe_problem(value), or None also when looking fails (a MemoryError, an object whose
    isinstance check raises): the caller then keeps the message it has."""
    try:
        return describe_problem(value)
    except Exception:
        return None


def _request_id(msg):
    rid = msg.get("id")
    if type(rid) is not int:
        raise ProtocolError(f"{msg['type']!r} message needs an integer 'id', not {_json_type(rid)}")
    return rid


def _bad_args(rid, name, args):
    """The error reply to a call whose ``args`` are not an object, an array or null, or whose
    binary values could not be decoded (read_frame left a BadArgs)."""
    values = sys.modules.get("snakepit._values")  # loaded if the frame had binary values
    if values is not None and type(args) is values.BadArgs:
        return _error_reply(rid, "ValueError", f"args of command {name!r} cannot be decoded: {args.problem}")
    return _error_reply(
        rid, "TypeError", f"args of command {name!r} must be an object, an array or null, not {_json_type(args)}"
    )


def _error_reply(rid, kind, message):
    # Key order is part of the protocol: "type" first, "id" second, so the frame starts
    # with {"type":"error","id": and the host can tell which call failed even when it
    # cannot decode the rest (json keeps a dict's insertion order). The same holds for
    # the result and error replies built in Worker._call, and respond() replaces a reply
    # that cannot be encoded with one of these.
    return {"type": "error", "id": rid, "error": {"type": kind, "message": utf8_safe(message), "traceback": ""}}


def _error_info(exc, message=None):
    """The ``error`` object for an exception caught in this module.

    The first traceback entry is this module's own call site; it is dropped
    unless the exception was raised right there (e.g. wrong arguments, or no
    such module), so the text always starts with "Traceback".
    """
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return {
        "type": _type_name(type(exc)),
        "message": utf8_safe(_text(exc) if message is None else message),
        "traceback": utf8_safe("".join(traceback.format_exception(type(exc), exc, tb))),
    }


def _json_type(value):
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


# --- runtime facts ---------------------------------------------------------


def _runtime_info():
    v = sys.version_info
    version = f"{v.major}.{v.minor}.{v.micro}"
    if v.releaselevel != "final":
        version += {"alpha": "a", "beta": "b", "candidate": "rc"}.get(v.releaselevel, v.releaselevel) + str(v.serial)
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return {
        "pid": os.getpid(),
        "python_version": version,
        "implementation": sys.implementation.name,
        "free_threaded": _free_threaded(),
        "gil_enabled": bool(is_gil_enabled()) if is_gil_enabled is not None else True,
    }


def _free_threaded():
    if sys.version_info < (3, 13):  # free-threaded builds exist from 3.13; skip importing sysconfig
        return False
    import sysconfig

    return sysconfig.get_config_var("Py_GIL_DISABLED") == 1


def _rss_bytes():
    """Current resident set size, else peak RSS, else None."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


# --- process plumbing ------------------------------------------------------


_USAGE = "usage: python -m snakepit [--adapter MODULE] [--init COMMAND [--init-args JSON]] [--max-frame-size BYTES] [--parent-pid PID] [--worker-id ID] [--pool NAME] [--threads N [--allow-unsafe-threads]] [--keeper] [--stack-file PATH] [--cancel-file PATH] [-- ADAPTER_ARGS...]"

_OPTIONS = {
    "--adapter": ("adapter", str),
    "--max-frame-size": ("max_frame_size", int),
    "--parent-pid": ("parent_pid", int),
    "--worker-id": ("worker_id", str),
    "--pool": ("pool", str),
    "--threads": ("threads", int),
    "--stack-file": ("stack_file", str),
    "--cancel-file": ("cancel_file", str),
    "--init": ("init", str),
    "--init-args": ("init_args", str),
}


def _parse_args(argv):
    """Parse the worker's options (by hand: argparse costs ~2 ms of every start).

    A bad command line prints the usage to stderr and exits with code 2.
    """
    args = {
        "adapter": None,
        "max_frame_size": DEFAULT_MAX_FRAME,
        "parent_pid": None,
        "worker_id": None,
        "pool": None,
        "adapter_args": [],
        "threads": 0,
        "stack_file": None,
        "cancel_file": None,
        "allow_unsafe_threads": False,
        "keeper": False,
        "init": None,
        "init_args": None,
    }
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv:
        arg = argv.pop(0)
        if arg == "--":  # the rest is for the adapter (snakepit.ARGS)
            args["adapter_args"] = argv
            break
        if arg in ("-h", "--help"):
            print(_USAGE, file=sys.stderr)
            raise SystemExit(0)
        if arg == "--allow-unsafe-threads":
            args["allow_unsafe_threads"] = True
            continue
        if arg == "--keeper":  # the host's: run under a keeper process (see _keeper)
            args["keeper"] = True
            continue
        name, eq, value = arg.partition("=")
        if name not in _OPTIONS:
            _usage_error(f"unrecognized argument {arg!r}")
        if not eq:
            if not argv:
                _usage_error(f"{name} needs a value")
            value = argv.pop(0)
        key, kind = _OPTIONS[name]
        try:
            args[key] = kind(value)
        except ValueError:
            _usage_error(f"{name}: expected an integer, got {value!r}")
    if args["threads"] < 0:
        _usage_error(f"--threads: expected a non-negative integer, got {args['threads']}")
    if args["max_frame_size"] <= 0:
        _usage_error(f"--max-frame-size: expected a positive integer, got {args['max_frame_size']}")
    if args["init"] == "":
        _usage_error("--init: expected a command name, got ''")
    if args["init_args"] is not None and args["init"] is None:
        _usage_error("--init-args needs --init")
    return SimpleNamespace(**args)


def _usage_error(message):
    print(f"{_USAGE}\npython -m snakepit: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _setup_logging(pool, worker_id):
    parts = ["snakepit"]
    if pool:
        parts.append(f"pool={pool}")
    if worker_id:
        parts.append(f"worker={worker_id}")
    parts.append(f"pid={os.getpid()}")
    log.prefix = "[" + " ".join(parts) + "]"


_STACK_SIGNAL = 12  # SIGUSR2 on Linux
_stack_files = []  # kept open for the worker's whole life


def _dump_stacks_on_signal(path, threaded):
    """On SIGUSR2 (sent by the host to the main thread shortly before a call's deadline), write
    where Python is to ``path``.

    Process profile: the call runs in the main thread, and faulthandler writes its stack from
    the C signal handler, so even while the command holds the GIL in one long C call. Only that
    thread's: walking the frames of threads that keep running is not safe from a signal
    handler. Thread profile: the main thread only reads frames; a Python handler (run there
    with the GIL, between two reads) writes the stack of every call thread.
    """
    try:
        import signal

        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # open for the process's life
        if not threaded:
            import faulthandler

            faulthandler.register(_STACK_SIGNAL, file=fd, all_threads=False, chain=False)
            _stack_files.append(fd)  # only now does ready say the host may send the signal
            return
        busy = []  # a signal during a dump is dropped, not nested

        def dump(_signum, _frame):
            if busy:
                return
            busy.append(True)
            try:
                main = threading.main_thread().ident
                names = {t.ident: t.name for t in threading.enumerate()}
                parts = []
                for ident, frame in sys._current_frames().items():
                    if ident != main:
                        stack = "".join(traceback.format_stack(frame))
                        parts.append(f"Thread {ident:#x} ({names.get(ident, '?')}), most recent call last:\n{stack}")
                write_all(fd, memoryview(("\n".join(parts) or "no call thread\n").encode("utf-8", "replace")))
            except Exception:  # never let a dump break the worker's reading loop
                pass
            finally:
                busy.clear()

        signal.signal(_STACK_SIGNAL, dump)
        _stack_files.append(fd)
    except (OSError, ValueError, RuntimeError, AttributeError) as exc:
        log.warning("no stack dumps on time-outs: %s", exc)


_SIGINT = 2
_cancel_signal = []  # True once the SIGINT handler and the cancel file are in place


def _cancel_on_signal(path):
    """Process profile: let the host stop a running call (``--cancel-file``).

    ``path`` is a file of CANCEL_FILE_SIZE bytes that the host rewrites in place with
    "<call id> <step>" (see protocol.py). It is mapped, so that snakepit.cancelled() reads it
    without a system call: step 1 of the running call makes it True. For step 2 the host also
    sends SIGINT, whose handler (_calls.MainCall.on_sigint) raises Cancelled in the command
    if the file asks it for the running call, and does nothing otherwise: the signal may come
    just after the call it was meant for ended, and KeyboardInterrupt would end the worker.
    The host may unlink the file once the worker is ready. Returns whether it is in place.
    """
    try:
        import mmap
        import signal

        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < CANCEL_FILE_SIZE:
                raise ValueError(f"{path} holds {size} bytes, not {CANCEL_FILE_SIZE}")
            view = mmap.mmap(fd, CANCEL_FILE_SIZE, access=mmap.ACCESS_READ)  # shared: sees the host's writes
        finally:
            os.close(fd)  # the mapping keeps the file
        _calls.MAIN.view = view
        signal.signal(_SIGINT, _calls.MAIN.on_sigint)
    except (OSError, ValueError, RuntimeError) as exc:
        _calls.MAIN.view = None
        log.warning("no cancel signal: %s", exc)
        return False
    _cancel_signal[:] = [True]
    return True


def _watch_parent(parent_pid):
    """Make the worker die with its parent; False if the parent is already gone."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal()
    ppid = os.getppid()
    if parent_pid is not None and ppid != parent_pid:
        return False
    # prctl covers Linux instantly; the watchdog covers other systems, and
    # runs even while the main thread is busy in a long command.
    threading.Thread(target=_watchdog, args=(ppid,), name="snakepit-watchdog", daemon=True).start()
    return True


def _set_parent_death_signal():
    """prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills us when the parent exits.

    SIGKILL needs no handler, so it works even while a command holds the GIL in one long C
    call (a SIGTERM handler would never run then). The parent is the keeper (_keeper), which
    takes every process the adapter started down with the worker, however the worker ends.
    A SIGTERM from the host ends the worker at once (_die).
    """
    try:
        import ctypes
        import signal

        signal.signal(_SIGTERM, _die)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    except Exception:
        pass  # best effort; the watchdog still notices


def _die(*_):
    """Exit at once. Under a keeper, it kills what the worker started; without one (started
    by hand, or where there are no subreapers), the process group goes if the worker leads it.
    """
    try:
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), _SIGKILL)
    except (AttributeError, OSError):  # no process groups (Windows) or no permission
        pass
    os._exit(EXIT_ORPHANED)


def _watchdog(ppid):
    while os.getppid() == ppid:
        time.sleep(_WATCHDOG_INTERVAL)
    log.warning("parent process %s died; exiting", ppid)
    _die()


def _take_over_stdio(threaded=True):
    """Move the protocol to private fds; return (reader, write).

    Afterwards fd 1 and sys.stdout go to stderr and fd 0 reads /dev/null, so
    print(), C libraries and child processes cannot touch the frame stream.
    ``threaded``: several threads will write (the thread profile), see _frame_writer.
    """
    proto_in = os.dup(0)  # os.dup() makes non-inheritable fds (PEP 446),
    proto_out = os.dup(1)  # so child processes never get the protocol pipes
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull, encoding="utf-8")

    reader = os.fdopen(proto_in, "rb", buffering=65536)

    # A plain fork() (multiprocessing's default on Linux) copies every fd: a forked child
    # would keep the protocol pipes open after the worker dies, so the host would never see
    # the worker's output end. The child closes its copies first thing.
    # (Pointed at /dev/null rather than closed, so the fd numbers stay valid for the objects
    # that still hold them.)
    def close_protocol_fds():
        try:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (proto_in, proto_out):
                os.dup2(null, fd, inheritable=False)
            os.close(null)
        except OSError:
            pass

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=close_protocol_fds)

    return reader, _frame_writer(proto_out, threaded)


def _frame_writer(fd, threaded):
    """Return ``write(frame)``, which writes one whole encoded frame to ``fd``.

    Usually one os.write; write_all finishes a short one. A frame with attachments (a list of
    buffers: see encode_frame) goes out with os.writev, as few calls as IOV_MAX and short
    writes allow. With ``threaded`` a lock, held until the last byte of the frame is out, keeps
    frames from several threads whole; serve() writes from one thread only and skips it.
    """
    os_write = os.write

    def write(data):
        if type(data) is not bytes:  # a list of buffers
            write_all(fd, data)
            return
        written = os_write(fd, data)
        if written != len(data):
            write_all(fd, memoryview(data)[written:])

    if not threaded:
        return write
    lock = threading.Lock()  # one frame at a time, even with several writer threads

    def write_locked(data):
        with lock:
            write(data)

    return write_locked
