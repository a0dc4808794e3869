"""The keeper: the process the host starts, which forks the worker and outlives it.

Nothing the worker starts may outlive it: not its child processes, not a daemon that left its
process group and session (double fork and ``setsid``), and not when the worker itself is
killed with SIGKILL, which no code of the worker's can catch. So the worker runs as the only
child of a keeper that:

- is a child subreaper (``PR_SET_CHILD_SUBREAPER``): every orphan in the worker's tree, a
  daemon included, is re-parented to the keeper instead of init, so the keeper can find it;
- runs no user code and holds nothing but ``waitpid``, so its signal handlers run at once,
  even while the worker holds the GIL in one long C call;
- when the worker ends, however it ends, kills everything left below it and exits the way
  the worker did (the same code, or the same signal), so the host sees the worker's end;
- when the host asks it to kill the worker (``KILL_SIGNAL``), or the host dies (the same
  signal, as its parent-death signal), kills the worker and everything below it.

The host sends its SIGTERM to the whole process group, which the keeper ignores: the worker
handles it. Only Linux has subreapers and parent-death signals; elsewhere the worker runs
alone (``split`` returns without forking).
"""

import os
import signal
import sys

# The host's "kill the worker now" (and the keeper's parent-death signal): a signal the keeper
# can catch, unlike SIGKILL, so that it can take the worker's whole tree down with it.
KILL_SIGNAL = signal.SIGUSR1

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

EXIT_ORPHANED = 1


def split(parent_pid):
    """Fork the worker. Returns True in the worker (the child), False where there is no
    keeper (nothing forked); the keeper itself never returns.

    ``parent_pid``: the host's pid, if the host is the parent (not under a launcher); the
    keeper exits at once if its parent is already another process.
    """
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    # KILL_SIGNAL stays blocked until the handler is in place, so that a kill the host sends
    # during the fork is neither lost nor fatal to the keeper alone.
    signal.pthread_sigmask(signal.SIG_BLOCK, {KILL_SIGNAL})
    if prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 or prctl(_PR_SET_PDEATHSIG, KILL_SIGNAL, 0, 0, 0) != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {KILL_SIGNAL})
        return False  # a sandbox that refuses them: run the worker alone
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)  # the host died before the parent-death signal was set
    worker = os.fork()
    if worker == 0:
        prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)  # not inherited, but say so
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {KILL_SIGNAL})
        return True
    _keep(worker)


def _keep(worker):
    """The keeper's whole life: wait for the worker, clean up below it, exit as it did."""
    # Not the protocol pipes: only the worker may hold them, so that its end is the end of
    # its output. stderr stays, for the keeper's own last words.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # for the worker, which gets it too
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def kill_worker(*_):
        try:
            os.kill(worker, signal.SIGKILL)
        except OSError:
            pass  # already gone: waitpid has it

    signal.signal(KILL_SIGNAL, kill_worker)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {KILL_SIGNAL})
    status = None
    while status is None:
        try:
            pid, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            status = 0  # cannot happen while the worker lives; exit as if it ended well
            break
        if pid == worker:
            status = raw
        # else: an orphan of the worker's tree, adopted and now reaped
    sweep(os.getpid())
    _exit_like(status)


def sweep(me):
    """SIGKILL every process below ``me`` and reap them, until ``me`` has no child left.

    A process that forks while this runs is killed in the next round: its children are
    re-parented to ``me``, the subreaper.
    """
    while True:
        for pid in descendants(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)  # blocks until one of the killed is reaped
        except ChildProcessError:
            return
        except InterruptedError:
            pass
        # Reap what else has died, then look again.
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return


def descendants(root):
    """Pids of every process below ``root``, from ``/proc``."""
    children = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])  # after the name: state, ppid
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def _exit_like(status):
    """Exit with the worker's wait status: its code, or the signal that ended it."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            if sig != signal.SIGKILL:  # whose handler cannot be set, nor needs to be
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
        os._exit(128 + sig)  # a signal whose default is not to end the process
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else EXIT_ORPHANED)
