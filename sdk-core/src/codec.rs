//! Encoding frames into WebSocket messages and back.
//!
//! One WebSocket message carries one or more frames so that a sender can
//! coalesce: binary messages hold `varint(len) ++ postcard(frame)` repeated;
//! JSON (text) messages hold one JSON object per line, separated by `\n`.

use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{ClientFrame, ServerFrame};

/// Default largest WebSocket message, bytes (64 KiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Most frames one message may carry.
pub const MAX_FRAMES_PER_MESSAGE: usize = 4096;

/// Which of the two encodings a connection speaks (chosen by subprotocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// postcard in binary messages, subprotocol `ferry.v1`.
    #[default]
    Binary,
    /// JSON in text messages, subprotocol `ferry.v1.json`.
    Json,
}

impl Encoding {
    /// The WebSocket subprotocol name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Binary => crate::frame::SUBPROTOCOL_BINARY,
            Encoding::Json => crate::frame::SUBPROTOCOL_JSON,
        }
    }
    /// From a WebSocket subprotocol name.
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        match name {
            crate::frame::SUBPROTOCOL_BINARY => Some(Encoding::Binary),
            crate::frame::SUBPROTOCOL_JSON => Some(Encoding::Json),
            _ => None,
        }
    }
    /// Whether messages go as WebSocket text (else binary).
    pub fn is_text(self) -> bool {
        self == Encoding::Json
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message is larger than the limit.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Message size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A binary length prefix is malformed or runs past the end.
    #[error("bad frame length prefix")]
    BadLength,
    /// A frame does not decode as the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// More frames than [`MAX_FRAMES_PER_MESSAGE`].
    #[error("too many frames in one message")]
    TooManyFrames,
    /// The message holds no frame.
    #[error("empty message")]
    Empty,
    /// A compressed payload is corrupt.
    #[error("corrupt compressed payload")]
    BadCompression,
    /// A compressed payload inflates past the size limit.
    #[error("payload inflates past {limit} bytes")]
    InflateLimit {
        /// The limit.
        limit: usize,
    },
}

/// Append one encoded frame (with its separator/prefix) to `out`.
pub fn encode_into<T: Serialize>(enc: Encoding, frame: &T, out: &mut Vec<u8>) {
    match enc {
        Encoding::Binary => {
            // Serialising our own types to a Vec cannot fail.
            let body = postcard::to_allocvec(frame).expect("postcard encode");
            write_varint(body.len() as u64, out);
            out.extend_from_slice(&body);
        }
        Encoding::Json => {
            if !out.is_empty() {
                out.push(b'\n');
            }
            serde_json::to_writer(&mut *out, frame).expect("json encode");
        }
    }
}

/// Encode one frame as a whole message.
pub fn encode<T: Serialize>(enc: Encoding, frame: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(enc, frame, &mut out);
    out
}

/// Join separately encoded frames (each from [`encode`]) into one message.
pub fn join_into(enc: Encoding, encoded_frame: &[u8], out: &mut Vec<u8>) {
    if enc == Encoding::Json && !out.is_empty() {
        out.push(b'\n');
    }
    out.extend_from_slice(encoded_frame);
}

/// Encode one client frame as a message.
pub fn encode_client(enc: Encoding, f: &ClientFrame) -> Vec<u8> {
    encode(enc, f)
}

/// Encode one server frame as a message.
pub fn encode_server(enc: Encoding, f: &ServerFrame) -> Vec<u8> {
    encode(enc, f)
}

/// Decode every frame of a message.
pub fn decode_message<T: DeserializeOwned>(enc: Encoding, msg: &[u8], max_size: usize) -> Result<Vec<T>, DecodeError> {
    if msg.len() > max_size {
        return Err(DecodeError::TooLarge { size: msg.len(), limit: max_size });
    }
    let mut frames = Vec::new();
    match enc {
        Encoding::Binary => {
            let mut rest = msg;
            while !rest.is_empty() {
                if frames.len() == MAX_FRAMES_PER_MESSAGE {
                    return Err(DecodeError::TooManyFrames);
                }
                let (len, used) = read_varint(rest).ok_or(DecodeError::BadLength)?;
                rest = &rest[used..];
                let len = usize::try_from(len).map_err(|_| DecodeError::BadLength)?;
                if len > rest.len() {
                    return Err(DecodeError::BadLength);
                }
                let (body, tail) = rest.split_at(len);
                let (frame, extra) =
                    postcard::take_from_bytes::<T>(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
                if !extra.is_empty() {
                    return Err(DecodeError::Malformed("trailing bytes in frame".into()));
                }
                frames.push(frame);
                rest = tail;
            }
        }
        Encoding::Json => {
            for line in msg.split(|&b| b == b'\n') {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                if frames.len() == MAX_FRAMES_PER_MESSAGE {
                    return Err(DecodeError::TooManyFrames);
                }
                let frame = serde_json::from_slice::<T>(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
                frames.push(frame);
            }
        }
    }
    if frames.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(frames)
}

/// Decode a message from a client.
pub fn decode_client(enc: Encoding, msg: &[u8], max: usize) -> Result<Vec<ClientFrame>, DecodeError> {
    decode_message(enc, msg, max)
}

/// Decode a message from a server.
pub fn decode_server(enc: Encoding, msg: &[u8], max: usize) -> Result<Vec<ServerFrame>, DecodeError> {
    decode_message(enc, msg, max)
}

/// LEB128 unsigned varint, as postcard uses.
pub fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Read a LEB128 varint; returns the value and bytes used. At most 10 bytes.
pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        let part = u64::from(b & 0x7f);
        if i == 9 && part > 1 {
            return None;
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Frames waiting to be sent, coalesced into messages of at most `max` bytes.
#[derive(Debug, Default)]
pub struct Batcher {
    queue: std::collections::VecDeque<Vec<u8>>,
    bytes: usize,
}

impl Batcher {
    /// Queue one encoded frame (from [`encode`]).
    pub fn push(&mut self, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.queue.push_back(frame);
    }
    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Frames queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }
    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
    /// Drop everything queued.
    pub fn clear(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }
    /// Take the next message: as many whole frames as fit in `max` bytes
    /// and [`MAX_FRAMES_PER_MESSAGE`] (always at least one, so an oversized
    /// frame still leaves).
    pub fn next_message(&mut self, enc: Encoding, max: usize) -> Option<Vec<u8>> {
        let first = self.queue.pop_front()?;
        self.bytes -= first.len();
        let mut out = first;
        let mut frames = 1;
        while let Some(next) = self.queue.front() {
            let sep = usize::from(enc == Encoding::Json);
            if out.len() + sep + next.len() > max || frames == MAX_FRAMES_PER_MESSAGE {
                break;
            }
            frames += 1;
            let next = self.queue.pop_front().expect("front exists");
            self.bytes -= next.len();
            join_into(enc, &next, &mut out);
        }
        Some(out)
    }
}
