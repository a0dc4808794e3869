//! The wire protocol: frames and message types. Pure: no threads, no processes.
//!
//! A frame is a 4-byte big-endian unsigned length followed by that many bytes of UTF-8 JSON,
//! one object whose `type` names the message. The Python side is `python/snakepit/protocol.py`.
//!
//! A frame may also carry binary attachments (protocol version 4): then the top bit of the
//! length is set, the rest of it is the JSON's length, and the JSON is preceded by a table
//! and followed by the attachments:
//!
//! ```text
//! u32 BE  0x8000_0000 | json_len
//! u32 BE  count                        1 ..= 1,048,576
//! count x u64 BE  size                 each attachment's length in bytes
//! json_len bytes of JSON               referring to attachments by index (see binary.rs)
//! the attachments, back to back
//! ```
//!
//! Such a frame's size, checked against `max_frame_size`, is everything after its first four
//! bytes; a reader checks it from the table before it allocates anything for the attachments.

use std::io;
#[cfg(test)]
use std::io::Read;
#[cfg(test)]
use std::io::Write;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::binary::{Bytes, Payload};
use crate::error::RemoteError;

/// The protocol version both sides speak; the worker reports its own in `ready`.
pub(crate) const PROTOCOL_VERSION: u32 = 4;

/// The default largest frame, in bytes (64 MiB).
pub(crate) const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// The top bit of a frame's length word: the frame carries attachments.
const ATTACHED: u32 = 0x8000_0000;

/// The most attachments one frame may carry.
pub(crate) const MAX_ATTACHMENTS: usize = 1 << 20;

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

/// A frame ready to write: its head (the length word, an attachment table, the JSON) and the
/// attachments that follow it, which are written from where they are, never copied into it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Frame {
    head: Vec<u8>,
    attachments: Vec<Bytes>,
}

impl Frame {
    /// Its length in bytes, length word included.
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.attachments.iter().map(|a| a.len()).sum::<usize>()
    }

    /// The whole frame as one slice, when it carries no attachments.
    pub(crate) fn plain(&self) -> Option<&[u8]> {
        self.attachments.is_empty().then_some(&self.head[..])
    }

    /// Its pieces, in the order they are written.
    pub(crate) fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.head[..]).chain(self.attachments.iter().map(|a| a.as_slice()))
    }

    /// All of it in one buffer (for tests).
    #[cfg(test)]
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.parts().flatten().copied().collect()
    }
}

impl From<Vec<u8>> for Frame {
    fn from(head: Vec<u8>) -> Self {
        Frame { head, attachments: Vec::new() }
    }
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
    if len > max || len >= ATTACHED as usize {
        // A frame's JSON stays below 2 GiB whatever the limit (its length's top bit is a flag).
        return Err(too_large(len, max.min(ATTACHED as usize - 1)));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Serialises `msg` as JSON with `attachments` after it (a plain frame if there are none),
/// refusing a frame of more than `max` bytes before anything is written.
pub(crate) fn encode_attached<T: Serialize + ?Sized>(
    msg: &T,
    attachments: Vec<Bytes>,
    max: usize,
) -> io::Result<Frame> {
    if attachments.is_empty() {
        return encode_frame(msg, max).map(Frame::from);
    }
    let count = attachments.len();
    if count > MAX_ATTACHMENTS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{count} binary values in one frame: at most {MAX_ATTACHMENTS} may travel together"),
        ));
    }
    let table = 8 + 8 * count;
    let mut head = vec![0; table];
    serde_json::to_writer(&mut head, msg).map_err(io::Error::from)?;
    let json_len = head.len() - table;
    let size = attachments.iter().fold(head.len() - 4, |n, a| n.saturating_add(a.len()));
    if json_len >= ATTACHED as usize {
        return Err(too_large(json_len, ATTACHED as usize - 1));
    }
    if size > max {
        return Err(too_large(size, max));
    }
    head[..4].copy_from_slice(&(ATTACHED | json_len as u32).to_be_bytes());
    head[4..8].copy_from_slice(&(count as u32).to_be_bytes());
    for (i, a) in attachments.iter().enumerate() {
        head[8 + 8 * i..16 + 8 * i].copy_from_slice(&(a.len() as u64).to_be_bytes());
    }
    Ok(Frame { head, attachments })
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

/// The frame for a call, built by the calling thread; `session`: its session's id and context;
/// `window`: a stream's first credit.
pub(crate) fn encode_call(
    id: u64,
    command: &str,
    args: &Payload,
    session: Option<(&str, Option<&Value>)>,
    window: Option<u32>,
    max: usize,
) -> io::Result<Frame> {
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
    let call = CallRef { kind: "call", id, command, args: &args.value, session, context, window };
    encode_attached(&call, args.attachments.clone(), max)
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

/// One frame read: its JSON and its attachments.
#[derive(Debug)]
pub(crate) struct RawFrame<'a> {
    pub(crate) json: &'a [u8],
    pub(crate) attachments: Vec<Bytes>,
}

/// Bytes read from a stream that may hand them out in any pieces (a non-blocking pipe), cut
/// into frames as they complete. Pure: the owner reads into [`spare`](FrameBuf::spare), reports
/// how much with [`filled`](FrameBuf::filled), and takes frames with
/// [`next_frame`](FrameBuf::next_frame).
///
/// A large attachment is read straight into memory of its own, which the frame then hands
/// out as [`Bytes`]: its data is never copied after the read.
#[derive(Debug, Default)]
pub(crate) struct FrameBuf {
    buf: Vec<u8>,
    /// Where the unconsumed bytes start and end.
    start: usize,
    end: usize,
    /// The frame with attachments whose head has been read, while its attachments are.
    partial: Option<Partial>,
    /// The JSON of the last frame with attachments taken (the frame borrows it).
    json: Vec<u8>,
    /// Whether the last `spare` was room in an attachment, not in `buf`.
    direct: bool,
    /// The head (its length, its JSON's length) of the frame with attachments whose table is
    /// held and was checked against the limit, while the rest of its head comes: the table is
    /// read once, not at every read (it may hold a million entries).
    checked: Option<(usize, usize)>,
}

/// A frame with attachments, part-read.
#[derive(Debug)]
struct Partial {
    json: Vec<u8>,
    sizes: Vec<usize>,
    done: Vec<Bytes>,
    /// The attachment being read, and how much of it is.
    current: Option<(Vec<u8>, usize)>,
}

impl Partial {
    /// The attachment being read (started if need be) and how much of it is, or `None` when
    /// all are.
    fn current(&mut self) -> Option<(&mut Vec<u8>, &mut usize)> {
        let size = *self.sizes.get(self.done.len())?;
        let (data, got) = self.current.get_or_insert_with(|| (vec![0; size], 0));
        Some((data, got))
    }

    /// Files the current attachment if it is complete; true if it was.
    fn file_if_done(&mut self) -> bool {
        match self.current.take() {
            Some((data, got)) if got == data.len() => {
                self.done.push(Bytes::from(data));
                true
            }
            other => {
                self.current = other;
                false
            }
        }
    }
}

/// What the header at the start of the held bytes announces.
enum Head {
    /// Not all of it is here yet.
    Incomplete,
    /// A plain frame of `len` JSON bytes.
    Plain { len: usize },
    /// A frame with attachments: its head is `len` bytes, the JSON its last `json_len`.
    Attached { len: usize, json_len: usize, sizes: Vec<usize> },
}

impl FrameBuf {
    /// The smallest read.
    const CHUNK: usize = 64 * 1024;
    /// The most the buffer grows by at once: a header is not trusted with more (it may be
    /// garbage, and its size is checked against the limit only by `next_frame`).
    const STEP: usize = 4 * 1024 * 1024;

    /// Room to read into: the rest of a large attachment, or, after the bytes already held, at
    /// least 64 KiB, or as much of the rest of a frame whose header has arrived as one step
    /// allows.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        self.direct = false;
        if self.start == self.end {
            let large = |(data, got): (&mut Vec<u8>, &mut usize)| data.len() - *got >= Self::CHUNK;
            if self.partial.as_mut().and_then(Partial::current).is_some_and(large) {
                self.direct = true;
                let (data, got) = self.partial.as_mut().and_then(Partial::current).expect("just seen");
                let got = *got;
                return &mut data[got..];
            }
        }
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
        let pending = match self.partial.as_mut() {
            Some(p) => p.current().map_or(0, |(data, got)| data.len() - *got),
            None => self.wanted(),
        };
        let want = self.end + pending.saturating_sub(self.end).clamp(Self::CHUNK, Self::STEP);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into the slice `spare` returned.
    pub(crate) fn filled(&mut self, n: usize) {
        if std::mem::take(&mut self.direct) {
            if let Some((data, got)) = self.partial.as_mut().and_then(Partial::current) {
                *got = (*got + n).min(data.len());
            }
            return;
        }
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Whether no bytes are held (no partial frame).
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end && self.partial.is_none()
    }

    /// The bytes held and not yet taken as frames.
    pub(crate) fn held(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops the first `n` bytes held (text that is not a frame).
    pub(crate) fn skip(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        self.checked = None;
    }

    /// How many bytes the next frame (or its head) needs, as far as its header tells yet: for
    /// sizing reads only; `head` checks every size.
    fn wanted(&self) -> usize {
        if let Some((len, _)) = self.checked {
            return len;
        }
        let held = &self.buf[self.start..self.end];
        let word =
            |at: usize| u32::from_be_bytes([held[at], held[at + 1], held[at + 2], held[at + 3]]) as usize;
        match held.len() {
            0..=3 => 4,
            _ if word(0) & ATTACHED as usize == 0 => 4 + word(0),
            4..=7 => 8,
            _ => 8 + 8 * word(4).min(MAX_ATTACHMENTS),
        }
    }

    /// Reads the header at the start of the held bytes, checking every size it announces
    /// against `max` as soon as it is known, before anything is allocated for it.
    fn head(&mut self, max: usize) -> io::Result<Head> {
        let held = &self.buf[self.start..self.end];
        let word =
            |at: usize| u32::from_be_bytes([held[at], held[at + 1], held[at + 2], held[at + 3]]) as usize;
        let table = |count: usize| -> Vec<usize> {
            (0..count)
                .map(|i| u64::from_be_bytes(held[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes")))
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
                .collect()
        };
        if let Some((len, json_len)) = self.checked {
            if held.len() < len {
                return Ok(Head::Incomplete);
            }
            return Ok(Head::Attached { len, json_len, sizes: table(word(4)) });
        }
        if held.len() < 4 {
            return Ok(Head::Incomplete);
        }
        let first = word(0);
        if first & ATTACHED as usize == 0 {
            if first > max {
                return Err(too_large(first, max));
            }
            return Ok(Head::Plain { len: first });
        }
        let json_len = first & !(ATTACHED as usize);
        // At least a count and one table entry come with the JSON.
        if json_len + 12 > max {
            return Err(too_large(json_len + 12, max));
        }
        if held.len() < 8 {
            return Ok(Head::Incomplete);
        }
        let count = word(4);
        if count == 0 || count > MAX_ATTACHMENTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a frame announces {count} attachments (1 to {MAX_ATTACHMENTS} are allowed)"),
            ));
        }
        let len = 8 + 8 * count + json_len;
        if len - 4 > max {
            return Err(too_large(len - 4, max));
        }
        if held.len() < 8 + 8 * count {
            return Ok(Head::Incomplete);
        }
        let sizes = table(count);
        let total = sizes.iter().try_fold(len - 4, |n, &a| n.checked_add(a)).unwrap_or(usize::MAX);
        if total > max {
            return Err(too_large(total, max));
        }
        if held.len() < len {
            self.checked = Some((len, json_len));
            return Ok(Head::Incomplete);
        }
        Ok(Head::Attached { len, json_len, sizes })
    }

    /// The next complete frame, if one is held. A header announcing more than `max` bytes, or
    /// an attachment table that does, is an error before anything is allocated for it.
    pub(crate) fn next_frame(&mut self, max: usize) -> io::Result<Option<RawFrame<'_>>> {
        // Give back memory held for the JSON of an unusually large frame (taken by now).
        if self.json.capacity() > 1 << 20 {
            self.json = Vec::new();
        }
        if self.partial.is_none() {
            match self.head(max)? {
                Head::Incomplete => return Ok(None),
                Head::Plain { len } => {
                    if self.end - self.start < 4 + len {
                        return Ok(None);
                    }
                    let at = self.start + 4;
                    self.start = at + len;
                    return Ok(Some(RawFrame { json: &self.buf[at..at + len], attachments: Vec::new() }));
                }
                Head::Attached { len, json_len, sizes } => {
                    self.checked = None;
                    let json = self.buf[self.start + len - json_len..self.start + len].to_vec();
                    self.start += len;
                    let done = Vec::with_capacity(sizes.len());
                    self.partial = Some(Partial { json, sizes, done, current: None });
                }
            }
        }
        let Some(p) = self.partial.as_mut() else { return Ok(None) };
        // The attachments take the bytes held, in order.
        while let Some((data, got)) = p.current() {
            let take = (data.len() - *got).min(self.end - self.start);
            data[*got..*got + take].copy_from_slice(&self.buf[self.start..self.start + take]);
            *got += take;
            self.start += take;
            if !p.file_if_done() {
                return Ok(None);
            }
        }
        let Partial { json, done, .. } = self.partial.take().expect("checked above");
        self.json = json;
        Ok(Some(RawFrame { json: &self.json, attachments: done }))
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

    /// Frames read from a blocking reader through a [`FrameBuf`], as the pool reads a pipe.
    struct Frames<R> {
        r: R,
        fb: FrameBuf,
        max: usize,
        /// The largest room `spare` offered: what the reader was trusted with.
        widest: usize,
    }

    impl<R: Read> Frames<R> {
        fn new(r: R, max: usize) -> Self {
            Frames { r, fb: FrameBuf::default(), max, widest: 0 }
        }

        /// The next message and its attachments; `Ok(None)` at a clean end between frames.
        fn next_raw(&mut self) -> io::Result<Option<(Msg, Vec<Bytes>)>> {
            loop {
                if let Some(f) = self.fb.next_frame(self.max)? {
                    return decode(f.json).map(|m| Some((m, f.attachments)));
                }
                let spare = self.fb.spare();
                self.widest = self.widest.max(spare.len());
                match self.r.read(spare)? {
                    0 if self.fb.is_empty() => return Ok(None),
                    0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated frame")),
                    n => self.fb.filled(n),
                }
            }
        }

        fn next(&mut self) -> io::Result<Option<Msg>> {
            self.next_raw().map(|m| m.map(|(m, _)| m))
        }
    }

    /// The one message `r` holds.
    fn read_frame(r: impl Read, max: usize) -> io::Result<Option<Msg>> {
        Frames::new(r, max).next()
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
            while let Some(frame) = fb.next_frame(max)? {
                out.push(decode(frame.json)?);
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
        assert_eq!(decode(fb.next_frame(DEFAULT_MAX_FRAME).unwrap().unwrap().json).unwrap(), ready);
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
        assert_eq!(
            as_too_large(&err).unwrap().size,
            0x7fff_ffff + 12,
            "at least the JSON and one table entry"
        );
        assert!(fb.buf.len() < 1 << 20, "nothing allocated for the announced size");
    }

    #[test]
    fn round_trips_every_message_then_clean_eof() {
        let mut wire = Vec::new();
        for m in sample_messages() {
            write_frame(&mut wire, &m, DEFAULT_MAX_FRAME).unwrap();
        }
        let mut r = Frames::new(Cursor::new(wire), DEFAULT_MAX_FRAME);
        for m in sample_messages() {
            assert_eq!(r.next().unwrap(), Some(m));
        }
        assert_eq!(r.next().unwrap(), None);
    }

    #[test]
    fn encode_call_matches_the_message_form() {
        let args = json!({"text": "hi"});
        let bytes = encode_call(9, "embed", &args.clone().into(), None, None, DEFAULT_MAX_FRAME).unwrap();
        let bytes = bytes.plain().expect("no attachments: a plain frame").to_vec();
        assert!(!String::from_utf8_lossy(&bytes).contains("session"), "a plain call carries no session keys");
        let msg = read_frame(Cursor::new(bytes), DEFAULT_MAX_FRAME).unwrap();
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
        let bytes = encode_call(
            3,
            "predict",
            &args.clone().into(),
            Some(("12", Some(&context))),
            None,
            DEFAULT_MAX_FRAME,
        )
        .unwrap();
        let msg = read_frame(Cursor::new(bytes.to_vec()), DEFAULT_MAX_FRAME).unwrap();
        let expected = Msg::Call {
            id: 3,
            command: "predict".into(),
            args: args.clone(),
            session: Some("12".into()),
            context: Some(context),
            window: None,
        };
        assert_eq!(msg, Some(expected));
        let bytes =
            encode_call(4, "predict", &args.into(), Some(("12", None)), None, DEFAULT_MAX_FRAME).unwrap();
        assert!(!String::from_utf8_lossy(&bytes.to_vec()).contains("context"), "no context, no key");
        let end = encode_end_session("12").unwrap();
        assert_eq!(&end[4..], br#"{"type":"end_session","session":"12"}"#);
    }

    #[test]
    fn stream_and_cancel_frames_have_their_wire_form() {
        let call = encode_call(5, "tokens", &json!([]).into(), None, Some(16), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(
            &call.to_vec()[4..],
            br#"{"type":"call","id":5,"command":"tokens","args":[],"window":16}"#
        );
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
        let mut r = Frames::new(Trickle(Cursor::new(wire)), DEFAULT_MAX_FRAME);
        for m in sample_messages() {
            assert_eq!(r.next().unwrap(), Some(m));
        }
        assert_eq!(r.next().unwrap(), None);
    }

    #[test]
    fn truncated_header_and_body_are_errors_not_eof() {
        let err = read_frame(Cursor::new(vec![0, 0]), 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut wire = frame(br#"{"type":"shutdown"}"#);
        wire.truncate(wire.len() - 3);
        let err = read_frame(Cursor::new(wire), 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        // The header claims 4 GiB - 1; the stream holds nothing more. If the reader trusted the
        // header it would try to reserve 4 GiB; instead the check fails first.
        let mut r = Frames::new(Cursor::new(vec![0x7f, 0xff, 0xff, 0xff]), 1024);
        let err = r.next().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(as_too_large(&err).unwrap().size, 0x7fff_ffff);
        assert!(r.widest <= FrameBuf::CHUNK, "the reader was never offered more than one read");
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
            let err = read_frame(Cursor::new(frame(payload)), 100).unwrap_err();
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
        assert_eq!(read_frame(Cursor::new(wire), 100).unwrap(), Some(Msg::Pong { id: 5 }));
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
        let with = vec![Bytes::from(vec![1u8; 40]), Bytes::from(vec![2u8; 3])];
        valid.extend(encode_attached(&Msg::Pong { id: 1 }, with, DEFAULT_MAX_FRAME).unwrap().to_vec());
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
            let mut r = Frames::new(Cursor::new(bytes), 4096);
            for _ in 0..16 {
                match r.next_raw() {
                    Ok(Some((_, attachments))) => {
                        assert!(attachments.iter().map(|a| a.len()).sum::<usize>() <= 4096);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            assert!(r.widest <= FrameBuf::CHUNK, "offered {} bytes of room", r.widest);
        }
    }

    fn attached(json: &[u8], sizes: &[u64]) -> Vec<u8> {
        let mut v = (ATTACHED | json.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&(sizes.len() as u32).to_be_bytes());
        for s in sizes {
            v.extend_from_slice(&s.to_be_bytes());
        }
        v.extend_from_slice(json);
        v
    }

    #[test]
    fn a_frame_with_attachments_has_its_wire_form() {
        let msg = Msg::Result { id: 1, value: json!({"__snakepit__": "bytes", "att": 0}) };
        let frame = encode_attached(&msg, vec![Bytes::from(vec![0xab, 0xcd]), Bytes::new()], 1000).unwrap();
        let json = br#"{"type":"result","id":1,"value":{"__snakepit__":"bytes","att":0}}"#;
        let mut expected = attached(json, &[2, 0]);
        expected.extend_from_slice(&[0xab, 0xcd]);
        assert_eq!(frame.to_vec(), expected);
        assert_eq!(frame.len(), expected.len());
        assert!(frame.plain().is_none());
        // Its size for the limit is everything after the first four bytes.
        let size = expected.len() - 4;
        assert!(encode_attached(&msg, vec![Bytes::from(vec![0xab, 0xcd]), Bytes::new()], size).is_ok());
        let err = encode_attached(&msg, vec![Bytes::from(vec![0xab, 0xcd])], size - 9).unwrap_err();
        assert_eq!(as_too_large(&err).unwrap().size, size - 8, "one table entry fewer");
        // None at all: a plain frame.
        assert!(encode_attached(&msg, vec![], 1000).unwrap().plain().is_some());
    }

    #[test]
    fn attachments_arrive_whole_from_pieces_of_any_size() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let attachments = vec![Bytes::from(vec![1, 2, 3]), Bytes::new(), Bytes::from(big.clone())];
        let msg = Msg::Chunk { id: 7, value: json!([{"__snakepit__": "bytes", "att": 2}]) };
        let mut wire = encode_attached(&msg, attachments.clone(), DEFAULT_MAX_FRAME).unwrap().to_vec();
        write_frame(&mut wire, &Msg::Pong { id: 8 }, DEFAULT_MAX_FRAME).unwrap();
        wire.extend(encode_attached(&msg, attachments.clone(), DEFAULT_MAX_FRAME).unwrap().to_vec());
        for step in [1, 7, 4096, 70_000, wire.len()] {
            let mut fb = FrameBuf::default();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let spare = fb.spare();
                let n = spare.len().min(step).min(rest.len());
                spare[..n].copy_from_slice(&rest[..n]);
                fb.filled(n);
                rest = &rest[n..];
                while let Some(f) = fb.next_frame(DEFAULT_MAX_FRAME).unwrap() {
                    got.push((decode(f.json).unwrap(), f.attachments));
                }
            }
            assert!(fb.is_empty(), "step {step}");
            let expected = vec![
                (msg.clone(), attachments.clone()),
                (Msg::Pong { id: 8 }, vec![]),
                (msg.clone(), attachments.clone()),
            ];
            assert_eq!(got, expected, "step {step}");
        }
        // Read by a trickle, too.
        let mut r = Frames::new(Trickle(Cursor::new(wire)), DEFAULT_MAX_FRAME);
        assert_eq!(r.next_raw().unwrap().unwrap().1[2], big[..]);
    }

    #[test]
    fn a_large_attachment_is_read_straight_into_its_own_memory() {
        let data = vec![7u8; 1 << 20];
        let msg = Msg::Result { id: 1, value: json!({"__snakepit__": "bytes", "att": 0}) };
        let wire =
            encode_attached(&msg, vec![Bytes::from(data.clone())], DEFAULT_MAX_FRAME).unwrap().to_vec();
        let mut r = Frames::new(Cursor::new(wire), DEFAULT_MAX_FRAME);
        let (_, attachments) = r.next_raw().unwrap().unwrap();
        assert_eq!(attachments[0], data[..]);
        // The frame buffer itself never grew to hold it.
        assert!(r.fb.buf.len() <= FrameBuf::CHUNK, "the buffer grew to {}", r.fb.buf.len());
    }

    #[test]
    fn an_attachment_table_that_lies_is_refused_before_any_large_allocation() {
        let json = br#"{"type":"pong","id":1}"#;
        for (wire, needle) in [
            (attached(json, &[]), "announces 0 attachments"),
            (
                {
                    let mut w = attached(json, &[]);
                    w[4..8].copy_from_slice(&((MAX_ATTACHMENTS + 1) as u32).to_be_bytes());
                    w
                },
                "announces 1048577 attachments",
            ),
            (attached(json, &[1 << 40]), "frame too large"),
            (attached(json, &[u64::MAX, u64::MAX]), "frame too large"),
            (attached(json, &[4000, 4000]), "frame too large"),
            (
                {
                    let mut w = attached(json, &[1]);
                    w[..4].copy_from_slice(&(ATTACHED | 0x7fff_0000).to_be_bytes());
                    w
                },
                "frame too large",
            ),
        ] {
            let mut r = Frames::new(Cursor::new(wire), 4096);
            let err = r.next().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{needle}");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
            assert!(r.widest <= FrameBuf::CHUNK);
            assert!(r.fb.partial.is_none(), "nothing was allocated for the attachments");
        }
        // A frame whose attachments end early is truncated, not a clean end.
        let mut wire = attached(json, &[10]);
        wire.extend_from_slice(&[1, 2, 3]);
        let err = read_frame(Cursor::new(wire), 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // Ending inside the table, too.
        let err = read_frame(Cursor::new(attached(json, &[10, 20])[..14].to_vec()), 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_attachment_table_is_read_once_while_the_rest_of_its_head_comes() {
        // 100 000 entries (800 kB of table): checked once, when whole, not at every read.
        let attachments = vec![Bytes::from(vec![7u8]); 100_000];
        let msg = Msg::Pong { id: 3 };
        let wire = encode_attached(&msg, attachments, DEFAULT_MAX_FRAME).unwrap().to_vec();
        let table_end = 8 + 8 * 100_000;
        let mut fb = FrameBuf::default();
        let mut fed = 0;
        let mut feed = |fb: &mut FrameBuf, upto: usize| {
            while fed < upto {
                let spare = fb.spare();
                let n = spare.len().min(upto - fed);
                spare[..n].copy_from_slice(&wire[fed..fed + n]);
                fb.filled(n);
                fed += n;
            }
        };
        feed(&mut fb, table_end - 1);
        assert!(fb.next_frame(DEFAULT_MAX_FRAME).unwrap().is_none());
        assert_eq!(fb.checked, None, "the table is not whole yet");
        feed(&mut fb, table_end + 5); // the table and part of the JSON
        assert!(fb.next_frame(DEFAULT_MAX_FRAME).unwrap().is_none());
        let checked = fb.checked.expect("the table was checked and remembered");
        assert_eq!(fb.wanted(), checked.0, "reads are sized from what was checked");
        feed(&mut fb, wire.len());
        let frame = fb.next_frame(DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!((decode(frame.json).unwrap(), frame.attachments.len()), (msg, 100_000));
        assert_eq!(fb.checked, None);
        assert!(fb.is_empty());
    }

    #[test]
    fn the_json_of_a_large_frame_is_not_held_after_it_is_taken() {
        let msg = Msg::Result { id: 1, value: json!("j".repeat(2 << 20)) };
        let mut wire =
            encode_attached(&msg, vec![Bytes::from(vec![1u8])], DEFAULT_MAX_FRAME).unwrap().to_vec();
        write_frame(&mut wire, &Msg::Pong { id: 2 }, DEFAULT_MAX_FRAME).unwrap();
        let mut r = Frames::new(Cursor::new(wire), DEFAULT_MAX_FRAME);
        assert_eq!(r.next().unwrap(), Some(msg));
        assert!(r.fb.json.capacity() >= 2 << 20);
        assert_eq!(r.next().unwrap(), Some(Msg::Pong { id: 2 }));
        assert!(r.fb.json.capacity() < 1 << 20, "given back at the next frame");
    }

    #[test]
    fn too_many_attachments_are_refused_before_writing() {
        let many = vec![Bytes::new(); MAX_ATTACHMENTS + 1];
        let err = encode_attached(&Msg::Pong { id: 1 }, many, usize::MAX).unwrap_err();
        assert!(err.to_string().contains("at most 1048576"), "{err}");
    }

    #[test]
    fn a_call_carries_its_arguments_attachments() {
        let args = Payload::from_serialize(&(Bytes::from(vec![5u8; 3]),)).unwrap();
        let frame = encode_call(2, "f", &args, None, None, DEFAULT_MAX_FRAME).unwrap();
        let (msg, attachments) =
            Frames::new(Cursor::new(frame.to_vec()), DEFAULT_MAX_FRAME).next_raw().unwrap().unwrap();
        let Msg::Call { args: value, .. } = msg else { panic!("{msg:?}") };
        assert_eq!(value, json!([{"__snakepit__": "bytes", "att": 0}]));
        assert_eq!(attachments, vec![Bytes::from(vec![5u8; 3])]);
    }
}
