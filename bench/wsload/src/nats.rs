//! The NATS client protocol (text: CONNECT, SUB, PUB, MSG, PING/PONG) as
//! carried by nats-server's WebSocket listener: the WebSocket messages are
//! a byte stream, so one protocol line may span messages and one message
//! may hold many; the parser keeps the unfinished tail.

/// The CONNECT line: no `+OK` per command (verbose off), no headers.
pub const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false,\
\"name\":\"ferry-wsload\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1,\"headers\":false}\r\n";
/// `PING`: its `PONG` confirms that everything sent before was processed.
pub const PING: &[u8] = b"PING\r\n";
/// The answer to the server's PING.
pub const PONG: &[u8] = b"PONG\r\n";

/// Append `SUB <subject> <sid>`.
pub fn sub(subject: &str, sid: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("SUB {subject} {sid}\r\n").as_bytes());
}

/// Append `PUB <subject> <len>` and the payload.
pub fn publish(subject: &str, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// One server protocol message.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// `INFO {...}`.
    Info,
    /// `MSG <subject> <sid> [reply-to] <len>` and its payload.
    Msg {
        /// Subscription id.
        sid: u32,
        /// The payload.
        payload: &'a [u8],
    },
    /// `PING` (answer with PONG).
    Ping,
    /// `PONG`.
    Pong,
    /// `+OK`.
    Ok,
    /// `-ERR '...'`.
    Err(String),
}

/// A streaming parser of server messages.
#[derive(Default)]
pub struct Parser {
    tail: Vec<u8>,
}

impl Parser {
    /// Feed the bytes of one WebSocket message; `on` sees every complete
    /// protocol message in order. An error means the stream is not NATS.
    pub fn feed(&mut self, data: &[u8], mut on: impl FnMut(Event<'_>)) -> Result<(), String> {
        if self.tail.is_empty() {
            // The common case: parse the message in place, keep only a tail.
            let used = parse(data, &mut on)?;
            self.tail.extend_from_slice(&data[used..]);
        } else {
            self.tail.extend_from_slice(data);
            let buf = std::mem::take(&mut self.tail);
            let used = parse(&buf, &mut on)?;
            self.tail = buf[used..].to_vec();
        }
        Ok(())
    }
}

/// Parse complete messages from the start of `buf`; returns bytes consumed.
fn parse(buf: &[u8], on: &mut impl FnMut(Event<'_>)) -> Result<usize, String> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return Ok(at) };
        let line = &rest[..eol];
        let next = at + eol + 2;
        if let Some(args) = line.strip_prefix(b"MSG ") {
            let args = std::str::from_utf8(args).map_err(|_| "MSG line is not UTF-8".to_string())?;
            // No allocation per message: at most four fields.
            let mut f = [""; 4];
            let mut n = 0;
            for w in args.split_ascii_whitespace() {
                if n == 4 {
                    return Err(format!("bad MSG line {args:?}"));
                }
                f[n] = w;
                n += 1;
            }
            if n < 3 {
                return Err(format!("bad MSG line {args:?}"));
            }
            let sid = f[1].parse().map_err(|_| format!("bad sid in {args:?}"))?;
            let len: usize = f[n - 1].parse().map_err(|_| format!("bad length in {args:?}"))?;
            if buf.len() < next + len + 2 {
                return Ok(at); // the payload has not all arrived yet
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err("MSG payload not followed by CRLF".into());
            }
            on(Event::Msg { sid, payload: &buf[next..next + len] });
            at = next + len + 2;
            continue;
        }
        let ev = match line {
            b"PING" => Event::Ping,
            b"PONG" => Event::Pong,
            b"+OK" => Event::Ok,
            l if l.starts_with(b"INFO ") => Event::Info,
            l if l.starts_with(b"-ERR") => Event::Err(String::from_utf8_lossy(l).into_owned()),
            l => return Err(format!("unknown protocol line {:?}", String::from_utf8_lossy(l))),
        };
        on(ev);
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(p: &mut Parser, chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| out.push(format!("{e:?}"))).expect("parses");
        }
        out
    }

    #[test]
    fn parses_real_shaped_server_output_split_anywhere() {
        let stream: &[u8] = b"INFO {\"server_id\":\"NABC\",\"version\":\"2.9.10\",\"max_payload\":1048576}\r\n\
PONG\r\nMSG bench.c0 1 5\r\nhello\r\nMSG bench.c1 2 _INBOX.x 3\r\na\r\n\r\nPING\r\n-ERR 'Slow Consumer'\r\n";
        let whole = collect(&mut Parser::default(), &[stream]);
        assert_eq!(
            whole,
            vec![
                "Info",
                "Pong",
                "Msg { sid: 1, payload: [104, 101, 108, 108, 111] }",
                "Msg { sid: 2, payload: [97, 13, 10] }",
                "Ping",
                "Err(\"-ERR 'Slow Consumer'\")",
            ]
        );
        // Every split point gives the same events (lines and payloads span
        // WebSocket messages).
        for cut in 1..stream.len() {
            let mut p = Parser::default();
            assert_eq!(collect(&mut p, &[&stream[..cut], &stream[cut..]]), whole, "split at {cut}");
            assert!(p.tail.is_empty());
        }
    }

    #[test]
    fn encoders_write_the_text_protocol() {
        let mut out = Vec::new();
        sub("bench.c3", 4, &mut out);
        publish("bench.c3", b"xy", &mut out);
        assert_eq!(out, b"SUB bench.c3 4\r\nPUB bench.c3 2\r\nxy\r\n");
        assert!(CONNECT.ends_with(b"}\r\n") && CONNECT.starts_with(b"CONNECT {"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Parser::default().feed(b"HTTP/1.1 400\r\n", |_| {}).is_err());
        assert!(Parser::default().feed(b"MSG a b c\r\n", |_| {}).is_err());
    }
}
