"""The state of a running call: what ``snakepit.cancelled()`` and ``snakepit.progress()`` see,
the host's cancel requests, and a stream's credit.

Process profile: one call at a time, on the main thread, described by ``MAIN`` (a MainCall whose
``id`` the worker sets around each call: the only per-call cost). The host asks for a cancel
through the cancel file, which MAIN maps, and interrupts with SIGINT (``MainCall.on_sigint``).

Thread profile: ``ThreadCalls`` knows the calls the reading loop has taken and the call
threads (a CallThread each, which holds the call it runs), and applies the host's ``credit``
and ``cancel`` frames. A forced cancel raises Cancelled in the call's thread asynchronously
(PyThreadState_SetAsyncExc), only while that thread runs the command's own code.

MainCall and CallThread have ``is_cancelled()`` and ``report_progress()`` for snakepit's
functions; ProcessStream and StreamCall have ``enter()``, ``leave()``, ``take_credit()``,
``is_cancelled()`` and ``post()`` for the worker's stream loop.
"""

import threading
from time import monotonic

import snakepit
from snakepit import Cancelled
from snakepit.protocol import (
    CANCEL_FILE_SIZE,
    FrameTooLarge,
    encode_frame,
    parse_cancel,
    parse_cancel_file,
    parse_credit,
    progress_message,
    read_frame,
    utf8_safe,
)

#: Seconds: snakepit.progress() sends at most one frame this often per call (done == total
#: always goes). The host shows progress to people; more would only cost pipe writes.
PROGRESS_INTERVAL = 0.05

# Thread profile: call thread ident -> its CallThread, which holds the call it runs.
THREAD_SLOTS = {}


def current_call(_slots=THREAD_SLOTS, _get_ident=threading.get_ident):
    """The call the calling thread runs, or None (snakepit._current_call)."""
    ident = _get_ident()
    thread = _slots.get(ident)
    if thread is not None:
        return thread if thread.msg is not None else None
    main = MAIN
    if main.id is not None and main.ident == ident:
        return main
    return None


def _progress_frame(rid, done, total, message, limit):
    """The encoded progress frame; a message too long for ``limit`` is cut short."""
    if message is not None:
        message = utf8_safe(message)
    while True:
        try:
            return encode_frame(progress_message(rid, done, total, message), limit)
        except FrameTooLarge as exc:
            if not message:
                raise
            # Cut in UTF-8 bytes (a character may take up to four). JSON escapes make the
            # frame's bytes over more than the message's: then keep half, and try again.
            data = message.encode("utf-8")
            keep = min(len(data) - 4, max(len(data) - (exc.size - exc.limit) - 3, len(data) // 2))
            message = data[:keep].decode("utf-8", "ignore") + "..." if keep > 0 else ""


def _due(last, done, total, now):
    """Whether a progress report goes out: the first of a call, one PROGRESS_INTERVAL after
    the last sent, or the last one (done == total)."""
    return last is None or now - last >= PROGRESS_INTERVAL or (total is not None and done == total)


# --- process profile -------------------------------------------------------------------


class MainCall:
    """The call the process profile's main thread runs (``id``; None between calls).

    A cancel request is in the mapped cancel file (``view``): "<call id> <step>". Step 1 makes
    ``is_cancelled()`` True; step 2 comes with a SIGINT, whose handler raises Cancelled in the
    command, at most once per call, and never while ``shielded``: while the worker writes a
    frame (a Cancelled there would cut it in half) or a stream is in the worker's own code.
    A SIGINT that came while shielded is acted on when the write is done (``send``); a stream
    sees the request in the file after its chunk.
    """

    def __init__(self):
        self.id = None
        self.ident = None  # the thread serving (the main thread of a worker process)
        self.write = None  # writes one whole frame: serve()'s
        self.max_frame_size = None
        self.view = None  # the cancel file, mapped; None without --cancel-file
        self.shielded = False
        self.raised = None  # the id of the call the SIGINT handler raised Cancelled in
        self.cancel_id = None  # a stream a cancel frame cancelled (read while it waited)
        self.progress_id = None  # the call of the last progress frame, and when it went
        self.progress_at = None

    def begin(self, ident, write, max_frame_size):
        """serve() starts: forget whatever an earlier serve() left (a test's, ended by an error)."""
        self.id = None
        self.ident = ident
        self.write = write
        self.max_frame_size = max_frame_size
        self.shielded = False
        self.cancel_id = None

    def cancel_request(self):
        """``(call id, step)`` from the cancel file, ``(None, 0)`` without one. The host may be
        rewriting it as we read: two equal reads in a row are taken, not a torn one."""
        view = self.view
        if view is None:
            return None, 0
        data = view[:CANCEL_FILE_SIZE]
        for _ in range(8):
            again = view[:CANCEL_FILE_SIZE]
            if again == data:
                break
            data = again
        return parse_cancel_file(data)

    def is_cancelled(self):
        rid = self.id
        if rid is None:
            return False
        if self.cancel_id == rid:
            return True
        cid, step = self.cancel_request()
        return cid == rid and step >= 1

    def interrupt_due(self):
        """Raise Cancelled if the file asks to interrupt the current call and that was not
        done yet (once per call: a second SIGINT must not hit the worker's handling of the
        first)."""
        rid = self.id
        if rid is not None and self.raised != rid:
            cid, step = self.cancel_request()
            if cid == rid and step >= 2:
                self.raised = rid
                raise Cancelled("call cancelled")

    def on_sigint(self, _signum, _frame):
        """The SIGINT handler: Cancelled when the file asks to interrupt the running call,
        nothing otherwise (between calls, for another call: it can come just after its call
        ended; and never KeyboardInterrupt, which would end the worker)."""
        if self.shielded or self.id is None:
            return
        self.interrupt_due()

    def report_progress(self, done, total, message):
        rid = self.id
        now = monotonic()
        if not _due(self.progress_at if self.progress_id == rid else None, done, total, now):
            return
        self.progress_id = rid
        self.progress_at = now
        self.send(_progress_frame(rid, done, total, message, self.max_frame_size))

    def send(self, data):
        """Write a frame from the command's code, shielded from SIGINT's Cancelled."""
        shielded = self.shielded
        self.shielded = True
        try:
            self.write(data)
        finally:
            self.shielded = shielded
        if not shielded:
            self.interrupt_due()


MAIN = MainCall()


class ProcessStream:
    """A stream call of the process profile, for the stream loop: MAIN's state plus the
    stream's credit, which it waits for by reading the host's frames itself (serve() is busy
    running it).

    While it waits: ``credit`` and ``cancel`` for this stream count, those for other ids are
    ignored; a ping (any frame but a call, end_session or shutdown) is answered at once; calls
    and ``end_session`` go to ``backlog`` for serve() to handle after the stream, in order; a
    shutdown or the end of input cancels the stream and goes to ``backlog`` too (the end of
    input as None), so that serve() ends where it would have.
    """

    def __init__(self, rid, window, reader, max_frame_size, write, respond, backlog):
        self.id = rid
        self.credit = window
        self.reader = reader
        self.max_frame_size = max_frame_size
        self.post = write
        self.respond = respond
        self.backlog = backlog
        self.cancel_message = "call cancelled"

    def is_cancelled(self):
        return MAIN.is_cancelled()

    def enter(self):
        """Into the generator's code: a SIGINT may raise Cancelled there."""
        MAIN.shielded = False

    def leave(self):
        MAIN.shielded = True

    def take_credit(self):
        """One chunk's credit: True, or False when the stream is cancelled (a cancel frame,
        the cancel file, shutdown, end of input)."""
        while self.credit <= 0:
            msg = read_frame(self.reader, self.max_frame_size)
            if msg is None or msg["type"] == "shutdown":
                self.backlog.append(msg)
                self.cancel_message = "call cancelled: the worker is " + (
                    "shutting down" if msg else "at the end of its input"
                )
                return False
            kind = msg["type"]
            if kind == "credit":
                rid, n = parse_credit(msg)
                if rid == self.id:
                    self.credit += n
            elif kind == "cancel":
                rid, _force = parse_cancel(msg)
                if rid == self.id:
                    MAIN.cancel_id = rid
                    return False
            elif kind == "call" or kind == "end_session":
                self.backlog.append(msg)
            else:
                data = self.respond(msg)
                if data is not None:
                    self.post(data)
            if MAIN.is_cancelled():  # the file: a host that asks there and not with a frame
                return False
        self.credit -= 1
        return True


# --- thread profile --------------------------------------------------------------------


_set_async_exc = None  # ctypes.pythonapi.PyThreadState_SetAsyncExc, loaded at the first force


def _raise_in(ident, exc_type):
    """PyThreadState_SetAsyncExc(ident, exc_type): ``exc_type`` is raised in thread ``ident`` at
    its next bytecode boundary; None clears one not raised yet. Returns whether a thread was
    found."""
    global _set_async_exc
    if _set_async_exc is None:
        import ctypes  # ~1 ms: only once a call is forced

        # No argtypes: None must reach C as NULL (clear), which a py_object argument would
        # turn into Py_None (raised as an exception: SystemError).
        _set_async_exc = (ctypes.pythonapi.PyThreadState_SetAsyncExc, ctypes.c_ulong, ctypes.py_object)
    func, c_ulong, py_object = _set_async_exc
    found = func(c_ulong(ident), None if exc_type is None else py_object(exc_type))
    if found > 1:  # cannot happen for a real thread id; undo, as the C API asks
        func(c_ulong(ident), None)
        return False
    return found == 1


class ThreadCalls:
    """The calls one serve_threaded() has taken and not yet answered, and its call threads.

    A plain call costs no object of its own (that would cost a thread-profile call a tenth of
    its time): the reading loop records its message in ``running``, and the call thread that
    runs it holds it in its CallThread (``msg``) while it does; what a cancel sets on a
    CallThread is keyed by call id, so nothing needs resetting between calls. A stream gets a
    StreamCall, for its credit.
    """

    def __init__(self, send, max_frame_size):
        self.send = send  # the reading loop's _reply_sender
        self.max_frame_size = max_frame_size
        # Guards the cancel and credit state of the calls and threads, and the three dicts'
        # updates by the reading loop; held for a few stores at a time, never across I/O or a
        # command. Call threads read without it where the order of stores makes that safe.
        self.lock = threading.Lock()
        self.running = {}  # id -> msg: the calls taken and not answered
        self.streams = {}  # id -> StreamCall, the streams among them
        self.early = {}  # id -> True: a cancel came for it (a call thread looks when it starts one)
        self.threads = []  # the CallThread of each call thread

    def thread(self, ident):
        """The state of a new call thread ``ident``, which snakepit.cancelled() finds."""
        state = CallThread(self, ident)
        with self.lock:
            self.threads.append(state)
        THREAD_SLOTS[ident] = state
        return state

    def forget_thread(self, state):
        THREAD_SLOTS.pop(state.ident, None)
        with self.lock:
            self.threads.remove(state)

    def stream(self, rid, msg):
        """Take the stream call ``msg``: the StreamCall the reading loop hands to a call thread."""
        stream = StreamCall(self, rid, msg)
        self.streams[rid] = stream
        return stream

    def credit(self, rid, n):
        """The host granted stream ``rid`` ``n`` more chunks (an unknown id is ignored)."""
        with self.lock:
            stream = self.streams.get(rid)
            if stream is not None:
                stream.credit += n
                stream.cond.notify()

    def cancel(self, rid, force):
        """The host cancels call ``rid`` (an unknown id is ignored: the call ended already).

        A call not started yet is answered Cancelled when a thread takes it (``early``). A
        running one sees it in cancelled(); ``force``: Cancelled is also raised in its thread
        if that is in the command's code (not ``shielded``); if not, the thread raises it
        itself when the frame it writes is out (CallThread.send), and a stream stops anyway.
        At most one asynchronous Cancelled per call: the call thread's handling of a
        Cancelled is never itself interrupted by a second one.

        The order of the stores makes it safe for call threads to go without the lock: this
        stores ``early`` before it reads a thread's ``msg``, the thread stores ``msg`` before
        it reads ``early``; this stores ``forced_id`` before it reads ``msg``, the thread clears
        ``msg`` before it reads ``forced_id``. In each pair one side sees the other's store.
        """
        with self.lock:
            msg = self.running.get(rid)
            if msg is None:
                return
            self.early[rid] = True
            stream = self.streams.get(rid)
            if stream is not None:
                stream.cancelled = True
                stream.cond.notify_all()
            for state in self.threads:
                if state.msg is msg:
                    state.cancelled_id = rid
                    if force and state.forced_id != rid:
                        state.forced_id = rid
                        # forced_id is stored before msg is read again: a thread that cleared
                        # msg before this read is left alone; one that clears it after sees
                        # forced_id and clears what this raises (end()).
                        if state.msg is msg and not state.shielded and _raise_in(state.ident, Cancelled):
                            state.async_set = True
                    break
            if rid not in self.running:  # it ended meanwhile, and its thread may not have seen this
                del self.early[rid]

    def end_stream(self, rid, thread):
        """Stream ``rid`` is answered; ``thread``, which ran it, runs plain calls again."""
        with self.lock:
            self.streams.pop(rid, None)
        thread.shielded = False  # after its msg was cleared: no force can come in between

    def forget_early(self, rid):
        with self.lock:
            self.early.pop(rid, None)

    def cancel_streams(self):
        """No more frames will come (end of input, shutdown): streams waiting for credit would
        wait forever, so every stream is cancelled; plain calls finish."""
        with self.lock:
            for stream in self.streams.values():
                stream.cancelled = True
                stream.cancel_message = "call cancelled: the worker is shutting down"
                stream.cond.notify_all()


class CallThread:
    """One call thread of the thread profile: the call it runs (``msg``, None between calls)
    and what the host asked of that call. It is also what snakepit.cancelled() and progress()
    see on that thread during a call.

    The thread may be interrupted by a forced cancel while ``msg`` is set and it is not
    ``shielded``: a stream is shielded outside the generator's code, a progress report while it
    writes its frame. ``end()`` clears an asynchronous Cancelled that was set and not raised yet,
    under the lock the forcing reading loop holds, so that none can reach the thread's own loop
    or its next call.
    """

    def __init__(self, calls, ident):
        self.calls = calls
        self.ident = ident
        self.msg = None
        self.shielded = False
        self.cancelled_id = None  # the last call the host cancelled while this thread ran it
        self.forced_id = None  # the call a force came for, until end()
        self.async_set = False  # an asynchronous Cancelled was set and may not be raised yet
        self.progress_id = None  # the call of the last progress frame, and when it went
        self.progress_at = None

    def _current_id(self):
        msg = self.msg
        return None if msg is None else msg["id"]

    def is_cancelled(self):
        rid = self._current_id()
        return rid is not None and self.cancelled_id == rid

    def end(self, data):
        """The call is over (its reply ``data``, or a Cancelled): from here no asynchronous
        Cancelled can reach this thread. Returns ``data``, or the Cancelled raised before it
        was cleared. The call thread's loop does the first line itself (the common case: no
        force) and calls this only when ``forced_id`` is set.
        """
        while True:  # twice at most: one asynchronous Cancelled per call
            try:
                self.msg = None
                if self.forced_id is not None:
                    with self.calls.lock:
                        self.forced_id = None
                        if self.async_set:
                            self.async_set = False
                            _raise_in(self.ident, None)
                return data
            except Cancelled as exc:
                data = exc

    def enter(self):
        """Back into the command's code (a stream's generator): interruptible again."""
        with self.calls.lock:
            self.shielded = False

    def leave(self):
        """Out of the command's code: not interruptible; an asynchronous Cancelled set but not
        raised yet is cleared (``forced_id`` stays: the stream sees it cancelled, send() raises)."""
        with self.calls.lock:
            self.shielded = True
            if self.async_set:
                self.async_set = False
                _raise_in(self.ident, None)

    def send(self, data):
        """Send a frame from the command's code (progress): never interrupted half way; a force
        that came meanwhile raises Cancelled here, once the frame is out."""
        if self.shielded:
            self.calls.send(data)
            return
        self.leave()
        try:
            self.calls.send(data)
        finally:
            self.enter()
        rid = self._current_id()
        if rid is not None and self.forced_id == rid:
            raise Cancelled("call cancelled")

    def report_progress(self, done, total, message):
        rid = self._current_id()
        if rid is None:
            return
        now = monotonic()
        if not _due(self.progress_at if self.progress_id == rid else None, done, total, now):
            return
        self.progress_id = rid
        self.progress_at = now
        self.send(_progress_frame(rid, done, total, message, self.calls.max_frame_size))


class StreamCall:
    """A stream call of the thread profile, for the stream loop (Worker._stream): its credit,
    which the reading loop adds to, and the CallThread that runs it (``begin``)."""

    cancel_message = "call cancelled"

    def __init__(self, calls, rid, msg):
        self.calls = calls
        self.id = rid
        self.msg = msg
        window = msg["window"]
        self.credit = window if type(window) is int and window > 0 else 0  # else _stream refuses it
        self.cancelled = False
        self.cond = threading.Condition(calls.lock)  # credit came, or a cancel
        self.thread = None

    def begin(self, thread):
        self.thread = thread
        return self

    def is_cancelled(self):
        return self.cancelled

    def take_credit(self):
        """Wait for one chunk's credit: True, or False when the stream was cancelled."""
        with self.cond:
            while self.credit <= 0 and not self.cancelled:
                self.cond.wait()
            if self.cancelled:
                return False
            self.credit -= 1
            return True

    def enter(self):
        self.thread.enter()

    def leave(self):
        self.thread.leave()

    def post(self, data):
        self.calls.send(data)


snakepit._current_call = current_call
