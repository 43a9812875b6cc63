//! Minimal HTTP/1.1 framing for the tool's `http-server` and `http-load`: message heads, bodies
//! (Content-Length, chunked, or until EOF) and the deterministic bodies `GET /bytes/<n>` serves.
//!
//! [`HttpReader`] works on any [`Read`], so the tool can read through its event-loop style
//! reader (`sock::read_ready`: poll, then a non-blocking recv).

use std::io::{self, Read};

use crate::pattern::{Pattern, crc32_of};

/// The largest message head (start line and headers) accepted.
pub const MAX_HEAD: usize = 64 * 1024;

/// The seed of the body of `GET /bytes/<size>`.
pub fn body_seed(size: u64) -> u64 {
    0x6874_7470_0000_0000 ^ size
}

/// The body of `GET /bytes/<size>`: the first `size` bytes of the [`Pattern`] of [`body_seed`].
pub fn body(size: usize) -> Vec<u8> {
    let mut body = vec![0u8; size];
    Pattern::new(body_seed(size as u64)).fill(&mut body);
    body
}

/// The crc32 of [`body`]`(size)`, without holding it in memory.
pub fn body_crc(size: u64) -> u32 {
    crc32_of(body_seed(size), size)
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A message head: the start line and the header fields, in order.
#[derive(Clone, Debug, Default)]
pub struct Head {
    pub start_line: String,
    /// Names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header `name` (lowercase) holds `token` (case-insensitively).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// How the body that follows this head is delimited (for a request, `UntilEof` means none).
    pub fn framing(&self) -> io::Result<Framing> {
        if self.headers.iter().any(|(n, _)| n == "transfer-encoding") {
            if self.has_token("transfer-encoding", "chunked") {
                return Ok(Framing::Chunked);
            }
            return Err(invalid("unsupported transfer-encoding"));
        }
        match self.header("content-length") {
            Some(v) => v
                .parse()
                .map(Framing::Length)
                .map_err(|_| invalid(format!("bad content-length {v:?}"))),
            None => Ok(Framing::UntilEof),
        }
    }
}

/// How a body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Until the peer closes (responses only: a request without length has no body).
    UntilEof,
}

/// `GET /path HTTP/1.1` → (method, target, version).
pub fn parse_request_line(line: &str) -> Option<(&str, &str, &str)> {
    let mut it = line.split(' ').filter(|s| !s.is_empty());
    let (m, t, v) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || !v.starts_with("HTTP/") {
        return None;
    }
    Some((m, t, v))
}

/// `HTTP/1.1 200 OK` → (version, status).
pub fn parse_status_line(line: &str) -> Option<(&str, u16)> {
    let mut it = line.splitn(3, ' ');
    let v = it.next()?;
    if !v.starts_with("HTTP/") {
        return None;
    }
    let code = it.next()?;
    if code.len() != 3 {
        return None;
    }
    Some((v, code.parse().ok()?))
}

/// The path of a request target without query, also for the absolute form (`http://h/p?q`).
pub fn target_path(target: &str) -> &str {
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    path.split(['?', '#']).next().unwrap_or(path)
}

/// A buffered reader of HTTP messages.
pub struct HttpReader<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<R: Read> HttpReader<R> {
    pub fn new(inner: R) -> Self {
        HttpReader {
            inner,
            buf: vec![0u8; MAX_HEAD].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads more into the buffer (after compacting it); Ok(0) at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(invalid("line too long"));
        }
        let n = self.inner.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// One line without its LF (and CR). Ok(None) on EOF before any byte of it.
    fn read_line(&mut self) -> io::Result<Option<String>> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[self.start + scanned..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let line_end = self.start + scanned + i;
                let mut line = &self.buf[self.start..line_end];
                if line.last() == Some(&b'\r') {
                    line = &line[..line.len() - 1];
                }
                let line = std::str::from_utf8(line)
                    .map_err(|_| invalid("non-UTF-8 header line"))?
                    .to_string();
                self.start = line_end + 1;
                return Ok(Some(line));
            }
            scanned = self.end - self.start;
            if self.fill()? == 0 {
                if self.start == self.end {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a line",
                ));
            }
        }
    }

    /// Reads a message head up to its empty line. Ok(None) on a clean EOF before the message
    /// (empty lines before the start line are skipped, as RFC 9112 allows).
    pub fn read_head(&mut self) -> io::Result<Option<Head>> {
        let start_line = loop {
            match self.read_line()? {
                None => return Ok(None),
                Some(l) if l.is_empty() => continue,
                Some(l) => break l,
            }
        };
        let mut head = Head {
            start_line,
            headers: Vec::new(),
        };
        let mut size = head.start_line.len();
        loop {
            let Some(line) = self.read_line()? else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in the middle of a message head",
                ));
            };
            if line.is_empty() {
                return Ok(Some(head));
            }
            size += line.len() + 2;
            if size > MAX_HEAD {
                return Err(invalid("message head too large"));
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(invalid(format!("bad header line {line:?}")));
            };
            head.headers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }

    /// Up to `max` bytes of the body, from the buffer or one read; Ok(empty) at EOF.
    fn next_bytes(&mut self, max: u64) -> io::Result<&[u8]> {
        if self.start == self.end && self.fill()? == 0 {
            return Ok(&[]);
        }
        let n = (self.end - self.start).min(usize::try_from(max).unwrap_or(usize::MAX));
        let out = &self.buf[self.start..self.start + n];
        self.start += n;
        Ok(out)
    }

    /// Reads exactly `len` body bytes, handing them to `sink` piece by piece.
    fn read_exact_to(&mut self, mut len: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while len > 0 {
            let piece = self.next_bytes(len)?;
            if piece.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed with {len} body bytes missing"),
                ));
            }
            len -= piece.len() as u64;
            sink(piece);
        }
        Ok(())
    }

    /// Reads a body framed as `framing`, handing it to `sink` piece by piece; returns its length.
    pub fn read_body(&mut self, framing: Framing, sink: &mut dyn FnMut(&[u8])) -> io::Result<u64> {
        match framing {
            Framing::Length(len) => {
                self.read_exact_to(len, sink)?;
                Ok(len)
            }
            Framing::UntilEof => {
                let mut total = 0u64;
                loop {
                    let piece = self.next_bytes(u64::MAX)?;
                    if piece.is_empty() {
                        return Ok(total);
                    }
                    total += piece.len() as u64;
                    sink(piece);
                }
            }
            Framing::Chunked => {
                let mut total = 0u64;
                loop {
                    let eof = || {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed in a chunked body",
                        )
                    };
                    let line = self.read_line()?.ok_or_else(eof)?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16)
                        .map_err(|_| invalid(format!("bad chunk size line {line:?}")))?;
                    if size == 0 {
                        // Trailer fields, up to the empty line.
                        loop {
                            let line = self.read_line()?.ok_or_else(eof)?;
                            if line.is_empty() {
                                return Ok(total);
                            }
                        }
                    }
                    self.read_exact_to(size, sink)?;
                    total += size;
                    let line = self.read_line()?.ok_or_else(eof)?;
                    if !line.is_empty() {
                        return Err(invalid("missing CRLF after a chunk"));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pipelined_messages_of_every_framing() {
        let wire = b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A:  b \r\n\r\nabc\
HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nde\r\n1\r\nf\r\n0\r\nT: 1\r\n\r\n\
HTTP/1.1 404 Not Found\nconnection: close\n\nrest";
        // One byte per read: every boundary lands somewhere awkward.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(1).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut r = HttpReader::new(Trickle(wire));
        let mut bodies = Vec::new();
        while let Some(head) = r.read_head().unwrap() {
            let mut body = Vec::new();
            r.read_body(head.framing().unwrap(), &mut |b| body.extend_from_slice(b))
                .unwrap();
            bodies.push((head, body));
        }
        assert_eq!(bodies.len(), 3);
        assert_eq!(
            parse_status_line(&bodies[0].0.start_line),
            Some(("HTTP/1.1", 200))
        );
        assert_eq!(bodies[0].0.header("x-a"), Some("b"));
        assert_eq!(bodies[0].1, b"abc");
        assert_eq!(bodies[1].1, b"def");
        assert!(bodies[2].0.has_token("connection", "Close"));
        assert_eq!(bodies[2].0.framing().unwrap(), Framing::UntilEof);
        assert_eq!(bodies[2].1, b"rest");
    }

    #[test]
    fn targets_and_bodies() {
        assert_eq!(target_path("/bytes/10?x=1"), "/bytes/10");
        assert_eq!(target_path("http://h:80/echo"), "/echo");
        assert_eq!(target_path("http://h"), "/");
        assert_eq!(
            parse_request_line("GET /x HTTP/1.1"),
            Some(("GET", "/x", "HTTP/1.1"))
        );
        assert_eq!(parse_request_line("GET /x"), None);
        for size in [0usize, 1, 7, 1000] {
            assert_eq!(crc32fast::hash(&body(size)), body_crc(size as u64));
        }
    }
}
