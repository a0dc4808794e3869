//! The wire protocol: frames and message types. Pure: no threads, no processes.
//!
//! A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON,
//! one object whose `type` names the message. The Python side is `python/snakepit/protocol.py`.

use std::io;
#[cfg(test)]
use std::io::Read;
#[cfg(test)]
use std::io::Write;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::RemoteError;

/// The protocol version both sides speak; the worker reports its own in `ready`.
pub(crate) const PROTOCOL_VERSION: u32 = 3;

/// The default largest frame, in bytes (64 MiB).
pub(crate) const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// What a worker reports about itself once it has started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's process id.
    pub pid: u32,
    /// Python's version, e.g. `3.11.7`.
    pub python_version: String,
    /// `sys.implementation.name`, e.g. `cpython`.
    pub implementation: String,
    /// Whether the interpreter is a free-threaded build.
    pub free_threaded: bool,
    /// Whether the GIL is enabled right now.
    pub gil_enabled: bool,
    /// The protocol version the worker speaks.
    pub protocol_version: u32,
    /// The commands the worker serves, built-ins included.
    pub commands: Vec<String>,
    /// The commands declared `cpu_bound=True`.
    #[serde(default)]
    pub cpu_bound: Vec<String>,
    /// Whether it writes its Python stacks when the pool asks (for time-outs and the
    /// slow-call log).
    #[serde(default)]
    pub stack_dumps: bool,
    /// Whether a running call can be interrupted (process profile): it reads the pool's cancel
    /// requests from a shared file and raises `snakepit.Cancelled` on SIGINT when one asks.
    #[serde(default)]
    pub cancel_signal: bool,
}

/// How far a command has got, as it reported with `snakepit.progress(done, total, message)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Progress {
    /// The work done so far, in the command's own unit.
    pub done: f64,
    /// The whole, if the command knows it.
    #[serde(default)]
    pub total: Option<f64>,
    /// What it is doing.
    #[serde(default)]
    pub message: Option<String>,
}

/// One message, either way. Later message types (stream chunks, cancel) are added as variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Msg {
    /// Worker to host, once, when it can serve calls.
    Ready { info: WorkerInfo },
    /// Worker to host, instead of `ready`, when it cannot start (the adapter failed to import).
    StartupError { error: RemoteError },
    /// Host to worker: run `command` with `args`; in a session, with its id and context.
    Call {
        id: u64,
        command: String,
        #[serde(default)]
        args: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<Value>,
        /// A stream: the command may send this many chunks before it is granted more.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
    },
    /// Host to worker: stream `id` may send `n` more chunks.
    Credit { id: u64, n: u32 },
    /// Host to worker: cancel call `id`; `force`: interrupt it (the second step, after the
    /// command had its chance to stop by itself).
    Cancel { id: u64, force: bool },
    /// Worker to host: one item of stream `id`.
    Chunk { id: u64, value: Value },
    /// Worker to host: call `id` reported its progress.
    Progress {
        id: u64,
        done: f64,
        #[serde(default)]
        total: Option<f64>,
        #[serde(default)]
        message: Option<String>,
    },
    /// Host to worker: the session ended; free its state. No reply.
    EndSession { session: String },
    /// Worker to host: the command returned `value`.
    Result { id: u64, value: Value },
    /// Worker to host: the command raised.
    Error { id: u64, error: RemoteError },
    /// Host to worker: are you alive?
    Ping { id: u64 },
    /// Worker to host: yes.
    Pong { id: u64 },
    /// Host to worker: finish and exit.
    Shutdown,
}

/// Writes `msg` as one frame. The frame is built in memory first so that it goes out in one
/// write, and its size is checked against `max` before anything is written. (The pool itself
/// sends pre-encoded frames through a channel; this is the one-step form.)
#[cfg(test)]
pub(crate) fn write_frame(w: &mut impl Write, msg: &Msg, max: usize) -> io::Result<()> {
    let frame = encode_frame(msg, max)?;
    w.write_all(&frame)?;
    w.flush()
}

/// Serialises `payload` as JSON behind a length prefix, refusing more than `max` bytes.
pub(crate) fn encode_frame<T: Serialize + ?Sized>(payload: &T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut buf, payload).map_err(io::Error::from)?;
    let len = buf.len() - 4;
    if len > max || len > u32::MAX as usize {
        return Err(too_large(len, max));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Reads one frame's payload into `buf` (replacing its contents).
///
/// Returns `Ok(false)` on a clean end of stream between frames, `UnexpectedEof` when the stream
/// ends inside a frame, and `InvalidData` when the length exceeds `max`, which is checked
/// before anything is allocated. (The pool reads through [`FrameBuf`]; this is the blocking
/// form the tests compare it with.)
#[cfg(test)]
pub(crate) fn read_frame_bytes(r: &mut impl Read, buf: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated frame header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(too_large(len, max));
    }
    buf.clear();
    buf.reserve(len);
    let read = r.take(len as u64).read_to_end(buf)?;
    if read < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("truncated frame: expected {len} bytes, got {read}"),
        ));
    }
    Ok(true)
}

/// Decodes a frame's payload into a message.
pub(crate) fn decode(payload: &[u8]) -> io::Result<Msg> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("frame is not UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| {
        let detail = e.to_string();
        let detail = if detail.starts_with("unknown variant") {
            format!("unknown message type: {detail}")
        } else {
            format!("invalid message: {detail}")
        };
        io::Error::new(io::ErrorKind::InvalidData, detail)
    })
}

/// The call id of a `result` or `error` frame, read from its start without decoding the rest.
/// The worker writes `type` then `id` first, so a reply whose body cannot be decoded can still
/// be matched to its call.
pub(crate) fn reply_id(payload: &[u8]) -> Option<u64> {
    let rest = [&br#"{"type":"result","id":"#[..], &br#"{"type":"error","id":"#[..]]
        .iter()
        .find_map(|prefix| payload.strip_prefix(*prefix))?;
    leading_id(rest)
}

/// The stream id of a `chunk` frame, read from its start like [`reply_id`].
pub(crate) fn chunk_id(payload: &[u8]) -> Option<u64> {
    leading_id(payload.strip_prefix(&br#"{"type":"chunk","id":"#[..])?)
}

/// The integer at the start of `rest`, followed by a comma.
fn leading_id(rest: &[u8]) -> Option<u64> {
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest.get(digits) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Reads and decodes one message; `Ok(None)` on a clean end of stream between frames. (The
/// worker's reader uses the two steps with one reused buffer instead.)
#[cfg(test)]
pub(crate) fn read_frame(r: &mut impl Read, max: usize) -> io::Result<Option<Msg>> {
    let mut buf = Vec::new();
    if !read_frame_bytes(r, &mut buf, max)? {
        return Ok(None);
    }
    decode(&buf).map(Some)
}

/// The frame for a call, built by the calling thread; `session`: its session's id and context;
/// `window`: a stream's first credit.
pub(crate) fn encode_call(
    id: u64,
    command: &str,
    args: &Value,
    session: Option<(&str, Option<&Value>)>,
    window: Option<u32>,
    max: usize,
) -> io::Result<Vec<u8>> {
    #[derive(Serialize)]
    struct CallRef<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        id: u64,
        command: &'a str,
        args: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        context: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        window: Option<u32>,
    }
    let (session, context) = match session {
        Some((id, context)) => (Some(id), context),
        None => (None, None),
    };
    encode_frame(&CallRef { kind: "call", id, command, args, session, context, window }, max)
}

/// The frame granting stream `id` `n` more chunks (a few dozen bytes: one atomic pipe write).
pub(crate) fn encode_credit(id: u64, n: u32) -> Vec<u8> {
    encode_frame(&Msg::Credit { id, n }, DEFAULT_MAX_FRAME).expect("a credit frame always encodes")
}

/// The frame asking the worker to cancel call `id` (a few dozen bytes).
pub(crate) fn encode_cancel(id: u64, force: bool) -> Vec<u8> {
    encode_frame(&Msg::Cancel { id, force }, DEFAULT_MAX_FRAME).expect("a cancel frame always encodes")
}

/// The frame that tells a worker a session ended.
pub(crate) fn encode_end_session(session: &str) -> io::Result<Vec<u8>> {
    encode_frame(&Msg::EndSession { session: session.to_string() }, DEFAULT_MAX_FRAME)
}

/// Bytes read from a stream that may hand them out in any pieces (a non-blocking pipe), cut
/// into frames as they complete. Pure: the owner reads into [`spare`](FrameBuf::spare), reports
/// how much with [`filled`](FrameBuf::filled), and takes frames with
/// [`next_frame`](FrameBuf::next_frame).
#[derive(Debug, Default)]
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
    /// Where the unconsumed bytes start and end.
    start: usize,
    end: usize,
}

impl FrameBuf {
    /// The smallest read.
    const CHUNK: usize = 64 * 1024;
    /// The most the buffer grows by at once: a header is not trusted with more (it may be
    /// garbage, and its size is checked against the limit only by `next_frame`).
    const STEP: usize = 4 * 1024 * 1024;

    /// Room to read into, after the bytes already held: at least 64 KiB, or as much of the
    /// rest of a frame whose header has arrived as one step allows.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // Give back memory held for one unusually large frame.
            if self.buf.len() > 1 << 20 {
                self.buf = Vec::new();
            }
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let pending = self.frame_len().map_or(0, |len| (4 + len).saturating_sub(self.end));
        let want = self.end + pending.clamp(Self::CHUNK, Self::STEP);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into the slice `spare` returned.
    pub(crate) fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Whether no bytes are held (no partial frame).
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The bytes held and not yet taken as frames.
    pub(crate) fn held(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops the first `n` bytes held (text that is not a frame).
    pub(crate) fn skip(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// The length the header of the next frame announces, once its 4 bytes are here.
    fn frame_len(&self) -> Option<usize> {
        let h = self.buf.get(self.start..self.start + 4).filter(|_| self.end - self.start >= 4)?;
        Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize)
    }

    /// The next complete frame's payload, if one is held. A header announcing more than `max`
    /// bytes is an error before anything is allocated for it.
    pub(crate) fn next_frame(&mut self, max: usize) -> io::Result<Option<&[u8]>> {
        let Some(len) = self.frame_len() else { return Ok(None) };
        if len > max {
            return Err(too_large(len, max));
        }
        if self.end - self.start < 4 + len {
            return Ok(None);
        }
        let at = self.start + 4;
        self.start = at + len;
        Ok(Some(&self.buf[at..at + len]))
    }
}

/// Where a worker's first frame (`ready` or `startup_error`) starts in `bytes`, found by its
/// opening (the worker writes `type` first): whatever comes before it is not the worker's, but
/// text the interpreter wrote to stdout before the worker took it over (a `sitecustomize`
/// module or a `.pth` file that prints).
pub(crate) fn first_frame_at(bytes: &[u8]) -> Option<usize> {
    const OPENINGS: [&[u8]; 2] = [br#"{"type":"ready""#, br#"{"type":"startup_error""#];
    (4..bytes.len()).find(|&i| OPENINGS.iter().any(|o| bytes[i..].starts_with(o))).map(|i| i - 4)
}

/// What kind of JSON value `v` is, for error messages ("a number", "an object", ...).
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn too_large(size: usize, max: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TooLarge { size, max })
}

/// The size error carried inside an `io::Error`, so callers can turn it into
/// [`Error::FrameTooLarge`](crate::Error::FrameTooLarge) without parsing text.
#[derive(Debug)]
pub(crate) struct TooLarge {
    pub(crate) size: usize,
    pub(crate) max: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "frame too large: {} bytes exceeds max_frame_size {}", self.size, self.max)
    }
}

impl std::error::Error for TooLarge {}

/// If `e` is this module's size error, its sizes.
pub(crate) fn as_too_large(e: &io::Error) -> Option<&TooLarge> {
    e.get_ref()?.downcast_ref::<TooLarge>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Cursor;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// A reader that hands out at most one byte per read, like a slow pipe.
    struct Trickle(Cursor<Vec<u8>>);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1);
            self.0.read(&mut buf[..n])
        }
    }

    fn sample_messages() -> Vec<Msg> {
        vec![
            Msg::Call {
                id: 1,
                command: "add".into(),
                args: json!({"a": 1, "b": [1, 2]}),
                session: None,
                context: None,
                window: None,
            },
            Msg::Call {
                id: 2,
                command: "tokens".into(),
                args: json!([]),
                session: Some("3".into()),
                context: None,
                window: Some(64),
            },
            Msg::Credit { id: 2, n: 32 },
            Msg::Cancel { id: 2, force: false },
            Msg::Cancel { id: 2, force: true },
            Msg::Chunk { id: 2, value: json!({"token": "é"}) },
            Msg::Progress { id: 2, done: 3.0, total: Some(10.0), message: Some("fitting".into()) },
            Msg::Progress { id: 2, done: 0.5, total: None, message: None },
            Msg::EndSession { session: "7".into() },
            Msg::Result { id: u64::MAX, value: json!({"ok": "é"}) },
            Msg::Error {
                id: 3,
                error: RemoteError {
                    error_type: "ValueError".into(),
                    message: "bad".into(),
                    traceback: "Traceback...".into(),
                    command: None,
                },
            },
            Msg::Ping { id: 4 },
            Msg::Pong { id: 4 },
            Msg::Shutdown,
            Msg::Ready {
                info: WorkerInfo {
                    pid: 7,
                    python_version: "3.11.7".into(),
                    implementation: "cpython".into(),
                    free_threaded: false,
                    gil_enabled: true,
                    protocol_version: PROTOCOL_VERSION,
                    commands: vec!["echo".into(), "ping".into()],
                    cpu_bound: vec![],
                    stack_dumps: false,
                    cancel_signal: true,
                },
            },
        ]
    }

    /// Feeds `wire` to a FrameBuf in pieces of `step` bytes and collects every frame.
    fn feed(wire: &[u8], step: usize, max: usize) -> io::Result<Vec<Msg>> {
        let mut fb = FrameBuf::default();
        let mut out = Vec::new();
        for piece in wire.chunks(step) {
            let spare = fb.spare();
            spare[..piece.len()].copy_from_slice(piece);
            fb.filled(piece.len());
            while let Some(payload) = fb.next_frame(max)? {
                out.push(decode(payload)?);
            }
        }
        assert!(fb.is_empty(), "bytes left over");
        Ok(out)
    }

    #[test]
    fn frame_buf_cuts_frames_from_pieces_of_any_size() {
        let mut wire = Vec::new();
        for m in sample_messages() {
            write_frame(&mut wire, &m, DEFAULT_MAX_FRAME).unwrap();
        }
        for step in [1, 2, 3, 7, 64, wire.len()] {
            assert_eq!(feed(&wire, step, DEFAULT_MAX_FRAME).unwrap(), sample_messages(), "step {step}");
        }
        // A frame larger than one read, arriving in 10 KiB pieces.
        let big = Msg::Result { id: 1, value: json!("y".repeat(300_000)) };
        let mut wire = Vec::new();
        write_frame(&mut wire, &big, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(feed(&wire, 10_240, DEFAULT_MAX_FRAME).unwrap(), vec![big]);
    }

    #[test]
    fn the_first_frame_is_found_behind_text_printed_before_the_worker_started() {
        let ready = Msg::Ready {
            info: WorkerInfo {
                pid: 1,
                python_version: "3.11.7".into(),
                implementation: "cpython".into(),
                free_threaded: false,
                gil_enabled: true,
                protocol_version: PROTOCOL_VERSION,
                commands: vec![],
                cpu_bound: vec![],
                stack_dumps: false,
                cancel_signal: false,
            },
        };
        let mut wire = b"hello from sitecustomize\n".to_vec();
        let junk = wire.len();
        write_frame(&mut wire, &ready, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(first_frame_at(&wire), Some(junk));
        assert_eq!(first_frame_at(&wire[junk..]), Some(0), "nothing before it");
        assert_eq!(first_frame_at(b"no frame here"), None);
        let mut fb = FrameBuf::default();
        fb.spare()[..wire.len()].copy_from_slice(&wire);
        fb.filled(wire.len());
        fb.skip(junk);
        assert_eq!(decode(fb.next_frame(DEFAULT_MAX_FRAME).unwrap().unwrap()).unwrap(), ready);
    }

    #[test]
    fn frame_buf_never_trusts_a_header_with_a_large_allocation() {
        // Text that is no frame ("hell" read as a length of 1.75 GB), as an interpreter that
        // prints at start-up sends.
        let mut fb = FrameBuf::default();
        let text = b"hello from sitecustomize\n";
        fb.spare()[..text.len()].copy_from_slice(text);
        fb.filled(text.len());
        assert!(fb.spare().len() <= FrameBuf::STEP, "room for at most one step");
        assert!(fb.buf.len() <= FrameBuf::STEP + text.len());
    }

    #[test]
    fn frame_buf_refuses_an_oversized_header_before_allocating() {
        let mut fb = FrameBuf::default();
        fb.spare()[..4].copy_from_slice(&[0xff; 4]);
        fb.filled(4);
        let err = fb.next_frame(1024).unwrap_err();
        assert_eq!(as_too_large(&err).unwrap().size, u32::MAX as usize);
        assert!(fb.buf.len() < 1 << 20, "nothing allocated for the announced size");
    }

    #[test]
    fn round_trips_every_message_then_clean_eof() {
        let mut wire = Vec::new();
        for m in sample_messages() {
            write_frame(&mut wire, &m, DEFAULT_MAX_FRAME).unwrap();
        }
        let mut r = Cursor::new(wire);
        for m in sample_messages() {
            assert_eq!(read_frame(&mut r, DEFAULT_MAX_FRAME).unwrap(), Some(m));
        }
        assert_eq!(read_frame(&mut r, DEFAULT_MAX_FRAME).unwrap(), None);
    }

    #[test]
    fn encode_call_matches_the_message_form() {
        let args = json!({"text": "hi"});
        let bytes = encode_call(9, "embed", &args, None, None, DEFAULT_MAX_FRAME).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("session"), "a plain call carries no session keys");
        let msg = read_frame(&mut Cursor::new(bytes), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(
            msg,
            Some(Msg::Call {
                id: 9,
                command: "embed".into(),
                args,
                session: None,
                context: None,
                window: None
            })
        );
    }

    #[test]
    fn a_session_call_carries_its_id_and_context_and_its_end_is_a_frame() {
        let (args, context) = (json!([1]), json!({"model": "m1"}));
        let bytes =
            encode_call(3, "predict", &args, Some(("12", Some(&context))), None, DEFAULT_MAX_FRAME).unwrap();
        let msg = read_frame(&mut Cursor::new(bytes), DEFAULT_MAX_FRAME).unwrap();
        let expected = Msg::Call {
            id: 3,
            command: "predict".into(),
            args: args.clone(),
            session: Some("12".into()),
            context: Some(context),
            window: None,
        };
        assert_eq!(msg, Some(expected));
        let bytes = encode_call(4, "predict", &args, Some(("12", None)), None, DEFAULT_MAX_FRAME).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("context"), "no context, no key");
        let end = encode_end_session("12").unwrap();
        assert_eq!(&end[4..], br#"{"type":"end_session","session":"12"}"#);
    }

    #[test]
    fn stream_and_cancel_frames_have_their_wire_form() {
        let call = encode_call(5, "tokens", &json!([]), None, Some(16), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(&call[4..], br#"{"type":"call","id":5,"command":"tokens","args":[],"window":16}"#);
        assert_eq!(&encode_credit(5, 8)[4..], br#"{"type":"credit","id":5,"n":8}"#);
        assert_eq!(&encode_cancel(5, true)[4..], br#"{"type":"cancel","id":5,"force":true}"#);
        // What the worker writes: type first, then id (see `reply_id`), integers or floats.
        let chunk = decode(br#"{"type":"chunk","id":5,"value":[1,2]}"#).unwrap();
        assert_eq!(chunk, Msg::Chunk { id: 5, value: json!([1, 2]) });
        let progress = decode(br#"{"type":"progress","id":5,"done":3,"total":null,"message":"m"}"#).unwrap();
        assert_eq!(progress, Msg::Progress { id: 5, done: 3.0, total: None, message: Some("m".into()) });
        let bare = decode(br#"{"type":"progress","id":5,"done":0.25}"#).unwrap();
        assert_eq!(bare, Msg::Progress { id: 5, done: 0.25, total: None, message: None });
        assert!(decode(br#"{"type":"progress","id":5,"done":"3"}"#).is_err(), "done must be a number");
        assert!(decode(br#"{"type":"credit","id":5,"n":-1}"#).is_err(), "a credit is not negative");
        // An old host's call (no window) still decodes: a plain call.
        let old = decode(br#"{"type":"call","id":1,"command":"c","args":null}"#).unwrap();
        assert!(matches!(old, Msg::Call { window: None, .. }));
    }

    #[test]
    fn frame_split_across_one_byte_reads() {
        let mut wire = Vec::new();
        for m in sample_messages() {
            write_frame(&mut wire, &m, DEFAULT_MAX_FRAME).unwrap();
        }
        let mut r = Trickle(Cursor::new(wire));
        for m in sample_messages() {
            assert_eq!(read_frame(&mut r, DEFAULT_MAX_FRAME).unwrap(), Some(m));
        }
        assert_eq!(read_frame(&mut r, DEFAULT_MAX_FRAME).unwrap(), None);
    }

    #[test]
    fn truncated_header_and_body_are_errors_not_eof() {
        let err = read_frame(&mut Cursor::new(vec![0, 0]), 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut wire = frame(br#"{"type":"shutdown"}"#);
        wire.truncate(wire.len() - 3);
        let err = read_frame(&mut Cursor::new(wire), 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        // The header claims 4 GiB - 1; the stream holds nothing more. If the reader trusted the
        // header it would try to reserve 4 GiB; instead the check fails first.
        let mut buf = Vec::new();
        let err = read_frame_bytes(&mut Cursor::new(vec![0xff; 4]), &mut buf, 1024).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(as_too_large(&err).unwrap().size, u32::MAX as usize);
        assert_eq!(buf.capacity(), 0);
    }

    #[test]
    fn oversized_message_is_refused_before_writing() {
        let mut wire = Vec::new();
        let big = Msg::Result { id: 1, value: json!("x".repeat(200)) };
        let err = write_frame(&mut wire, &big, 100).unwrap_err();
        assert!(as_too_large(&err).unwrap().size > 200);
        assert!(wire.is_empty());
    }

    #[test]
    fn invalid_utf8_json_and_types_are_invalid_data() {
        for (payload, needle) in [
            (&b"\xff\xfe"[..], "not UTF-8"),
            (&b"{not json"[..], "invalid message"),
            (&b"[1,2]"[..], "invalid message"),
            (&br#"{"id":1}"#[..], "invalid message"),
            (&br#"{"type":"teleport","id":1}"#[..], "unknown message type"),
            (&br#"{"type":"result","value":1}"#[..], "invalid message"),
        ] {
            let err = read_frame(&mut Cursor::new(frame(payload)), 100).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{payload:?}");
            assert!(err.to_string().contains(needle), "{payload:?}: {err}");
        }
    }

    #[test]
    fn reply_ids_are_found_without_decoding_the_body() {
        let deep = format!(r#"{{"type":"result","id":42,"value":{}{}}}"#, "[".repeat(500), "]".repeat(500));
        assert!(decode(deep.as_bytes()).is_err(), "deeper than the decoder allows");
        assert_eq!(reply_id(deep.as_bytes()), Some(42));
        assert_eq!(reply_id(br#"{"type":"error","id":7,"error":{}}"#), Some(7));
        assert_eq!(reply_id(br#"{"type":"pong","id":7}"#), None);
        assert_eq!(reply_id(br#"{"type":"result","id":"7","value":1}"#), None);
        assert_eq!(reply_id(br#"{"type":"result","id":7"#), None);
        assert_eq!(reply_id(b""), None);
        let deep_chunk =
            format!(r#"{{"type":"chunk","id":9,"value":{}{}}}"#, "[".repeat(500), "]".repeat(500));
        assert!(decode(deep_chunk.as_bytes()).is_err());
        assert_eq!(chunk_id(deep_chunk.as_bytes()), Some(9));
        assert_eq!(reply_id(deep_chunk.as_bytes()), None, "a chunk is not a reply");
        assert_eq!(chunk_id(br#"{"type":"result","id":9,"value":1}"#), None);
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let wire = frame(br#"{"type":"pong","id":5,"extra":true}"#);
        assert_eq!(read_frame(&mut Cursor::new(wire), 100).unwrap(), Some(Msg::Pong { id: 5 }));
    }

    #[test]
    fn fuzz_random_bytes_never_panic_or_over_allocate() {
        // A small deterministic fuzz: random byte strings and random mutations of valid frames.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut valid = Vec::new();
        for m in sample_messages() {
            write_frame(&mut valid, &m, DEFAULT_MAX_FRAME).unwrap();
        }
        for round in 0..5000 {
            let mut bytes = if round % 2 == 0 {
                (0..(next() % 64)).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                valid.clone()
            };
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let i = (next() as usize) % bytes.len();
                    bytes[i] = next() as u8;
                }
            }
            let mut r = Cursor::new(bytes);
            let mut buf = Vec::new();
            for _ in 0..16 {
                match read_frame_bytes(&mut r, &mut buf, 4096) {
                    Ok(true) => {
                        assert!(buf.len() <= 4096);
                        let _ = decode(&buf);
                    }
                    Ok(false) | Err(_) => break,
                }
            }
        }
    }
}
