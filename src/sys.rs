//! The crate's only `unsafe`: signals to process groups, process file descriptors, `poll`, and
//! non-blocking pipes. Each function is a thin wrapper over one libc call with no pointers kept.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

/// Sends `signal` to the process group led by `pgid`. A group that no longer exists is not an
/// error (the work is already done).
pub(crate) fn kill_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid = pgid as libc::pid_t;
    if pgid <= 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "refusing to signal process group <= 1"));
    }
    // SAFETY: killpg takes plain integers and touches no memory of ours.
    signalled(unsafe { libc::killpg(pgid, signal) })
}

/// Sends `signal` to the one process `pid` (not its group). A process that no longer exists
/// is not an error.
pub(crate) fn kill(pid: u32, signal: i32) -> io::Result<()> {
    let pid = pid as libc::pid_t;
    if pid <= 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "refusing to signal pid <= 1"));
    }
    // SAFETY: kill takes plain integers and touches no memory of ours.
    signalled(unsafe { libc::kill(pid, signal) })
}

/// Sends `signal` to the main thread of process `pid` (`tgkill(pid, pid, signal)`), not to
/// whichever thread the kernel would pick. A process that no longer exists is not an error.
pub(crate) fn kill_main_thread(pid: u32, signal: i32) -> io::Result<()> {
    let pid = pid as libc::pid_t;
    if pid <= 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "refusing to signal pid <= 1"));
    }
    // SAFETY: the tgkill system call takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, signal) };
    signalled(rc as libc::c_int)
}

/// The result of `kill`/`killpg`: no such process is not an error.
fn signalled(rc: libc::c_int) -> io::Result<()> {
    match io::Error::last_os_error() {
        _ if rc == 0 => Ok(()),
        err if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        err => Err(err),
    }
}

pub(crate) use libc::{SIGINT, SIGKILL, SIGTERM, SIGUSR1, SIGUSR2};

/// Puts a file descriptor (our end of a worker's stdin pipe) in non-blocking mode, so a write
/// never waits on a worker that is not reading.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A file descriptor that becomes readable when process `pid` exits (Linux 5.3 and later). The
/// pid must be our unreaped child, so it cannot have been reused.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A non-blocking, close-on-exec eventfd: a counter that is readable while it is not zero. A
/// thread waiting in [`poll`] on it is woken by [`eventfd_add`] from another thread.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter (waking whoever polls it).
pub(crate) fn eventfd_add(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a local array that lives until the call returns. A full
    // counter (EAGAIN) already wakes its reader, so the result does not matter.
    let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
}

/// Resets an eventfd's counter to zero (it is no longer readable).
pub(crate) fn eventfd_clear(fd: RawFd) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a local array; on a non-blocking eventfd a zero
    // counter gives EAGAIN, which leaves nothing to do.
    let _ = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
}

/// One entry for [`poll`].
pub(crate) fn poll_entry(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd { fd, events, revents: 0 }
}

pub(crate) use libc::{POLLIN, POLLOUT};

/// Waits until one of `fds` is ready or `deadline` passes (`None`: no limit). Returns how many
/// are ready (0 once the deadline has passed); each entry's `revents` says what happened. An
/// interrupted wait resumes with the time left.
pub(crate) fn poll(fds: &mut [libc::pollfd], deadline: Option<Instant>) -> io::Result<usize> {
    loop {
        let ts = deadline.map(|d| {
            let t = d.saturating_duration_since(Instant::now());
            libc::timespec {
                tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            }
        });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `fds` is a valid slice of pollfd for the call, `ts_ptr` is null or points at a
        // timespec that lives until the call returns, and no signal mask is passed.
        let rc =
            unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A pipe: (read end, write end), both close-on-exec. For tests that stand in for a worker.
#[cfg(test)]
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints that pipe2 fills.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned these descriptors to us; nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The bytes of `data`, in place. Sound for any [`Element`](crate::Element): a primitive number
/// type, with no padding.
pub(crate) fn bytes_of<T: crate::Element>(data: &[T]) -> &[u8] {
    // SAFETY: the pointer and length cover exactly the memory of `data`, which lives as long
    // as the returned slice; `u8` has no alignment needs, and `T` has no padding bytes.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// `bytes` viewed as elements of `T`, in place: `None` unless their address is aligned for `T`
/// and their length a whole number of elements. Sound for any [`Element`](crate::Element):
/// every bit pattern is a valid value of it.
pub(crate) fn cast_slice<T: crate::Element>(bytes: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() % size != 0 || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0 {
        return None;
    }
    // SAFETY: checked just above: the pointer is aligned for `T`, and the length covers whole
    // elements inside `bytes`, which lives as long as the returned slice; `T` accepts every bit
    // pattern, and nothing can write through a shared slice.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
}
