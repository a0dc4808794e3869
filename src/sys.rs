//! The crate's only `unsafe`: signals to process groups and waiting for a child's exit without
//! reaping it. Each function is a thin wrapper over one libc call with no pointers kept.
#![allow(unsafe_code)]

use std::io;

/// Sends `signal` to the process group led by `pgid`. A group that no longer exists is not an
/// error (the work is already done).
pub(crate) fn kill_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid = pgid as libc::pid_t;
    if pgid <= 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "refusing to signal process group <= 1"));
    }
    // SAFETY: killpg takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::killpg(pgid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Blocks until the child `pid` has exited, but leaves it a zombie: its pid (and so its
/// process group id) cannot be reused until it is reaped, which makes signalling the group
/// afterwards safe.
pub(crate) fn wait_exit_no_reap(pid: u32) -> io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value and waitid only writes it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, exclusive pointer for the duration of the call.
        let rc =
            unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

pub(crate) use libc::{SIGKILL, SIGTERM};

/// Puts a file descriptor (our end of a worker's stdin pipe) in non-blocking mode, so a write
/// never waits on a worker that is not reading.
pub(crate) fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
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

/// Waits until `fd` can take more bytes, an error is pending on it, or `timeout` passes.
pub(crate) fn wait_writable(fd: std::os::fd::RawFd, timeout: std::time::Duration) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}
