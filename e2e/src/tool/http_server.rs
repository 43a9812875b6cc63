//! `http-server`: a minimal HTTP/1.1 server (keep-alive, a thread per connection).

use std::{
    io::{self, Write},
    net::{Shutdown, SocketAddrV4, TcpStream},
};

use clap::Args;

use super::{BUF, Patient, log, serve};
use crate::{
    http::{self, Framing, Head, HttpReader},
    pattern::Pattern,
};

#[derive(Args, Clone, Debug)]
pub struct HttpServerArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddrV4,
}

pub fn run(args: &HttpServerArgs) -> anyhow::Result<()> {
    serve(args.listen, "http", http_conn)
}

/// Bodies up to this size are generated once per connection and kept; larger ones are streamed.
const HTTP_CACHE_MAX: u64 = 4 << 20;
/// Largest body `POST /echo` accepts (413 beyond).
const HTTP_ECHO_MAX: usize = 64 << 20;

fn http_conn(conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let peer = conn
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut reader = HttpReader::new(Patient(&conn));
    let mut cache: Option<(u64, Vec<u8>, u32)> = None;
    let mut served = 0u64;
    let result = loop {
        let head = match reader.read_head() {
            Ok(Some(head)) => head,
            Ok(None) => break Ok(()),
            Err(e) => {
                if e.kind() == io::ErrorKind::InvalidData {
                    let _ =
                        write_response(&conn, 400, "Bad Request", None, b"bad request\n", false);
                }
                break Err(e);
            }
        };
        served += 1;
        match http_request(&conn, &mut reader, &head, &mut cache) {
            Ok(true) => continue,
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(()) => {
            let _ = conn.shutdown(Shutdown::Write);
            log(format_args!("http: {peer} closed requests={served}"));
        }
        Err(e) => log(format_args!("http: {peer} requests={served}: {e}")),
    }
}

/// Answers one request; Ok(keep-alive).
fn http_request(
    conn: &TcpStream,
    reader: &mut HttpReader<Patient<'_>>,
    head: &Head,
    cache: &mut Option<(u64, Vec<u8>, u32)>,
) -> io::Result<bool> {
    let Some((method, target, version)) = http::parse_request_line(&head.start_line) else {
        write_response(conn, 400, "Bad Request", None, b"bad request line\n", false)?;
        return Ok(false);
    };
    let keep = if version == "HTTP/1.0" {
        head.has_token("connection", "keep-alive")
    } else {
        !head.has_token("connection", "close")
    };
    let framing = match head.framing() {
        // A request without Content-Length or chunked coding has no body.
        Ok(Framing::UntilEof) => Framing::Length(0),
        Ok(framing) => framing,
        Err(e) => {
            write_response(
                conn,
                400,
                "Bad Request",
                None,
                format!("{e}\n").as_bytes(),
                false,
            )?;
            return Ok(false);
        }
    };
    let path = http::target_path(target);
    let echo = method == "POST" && path == "/echo";
    if framing != Framing::Length(0) && head.has_token("expect", "100-continue") {
        (&*conn).write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut body = Vec::new();
    let mut too_big = false;
    reader.read_body(framing, &mut |piece| {
        if echo && !too_big {
            if body.len() + piece.len() > HTTP_ECHO_MAX {
                too_big = true;
                body = Vec::new();
            } else {
                body.extend_from_slice(piece);
            }
        }
    })?;
    if echo {
        if too_big {
            write_response(
                conn,
                413,
                "Content Too Large",
                None,
                b"body too large\n",
                false,
            )?;
            return Ok(false);
        }
        let crc = crc32fast::hash(&body);
        write_response(conn, 200, "OK", Some(crc), &body, keep)?;
        return Ok(keep);
    }
    let size = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok());
    match (method, size) {
        ("GET", Some(size)) if size <= HTTP_CACHE_MAX => {
            if cache.as_ref().is_none_or(|(n, _, _)| *n != size) {
                let body = http::body(size as usize);
                let crc = crc32fast::hash(&body);
                *cache = Some((size, body, crc));
            }
            let (_, body, crc) = cache.as_ref().expect("just filled");
            write_response(conn, 200, "OK", Some(*crc), body, keep)?;
        }
        ("GET", Some(size)) => {
            let crc = http::body_crc(size);
            (&*conn).write_all(response_head(200, "OK", Some(crc), size, keep).as_bytes())?;
            let mut pattern = Pattern::new(http::body_seed(size));
            let mut buf = vec![0u8; BUF];
            let mut left = size;
            while left > 0 {
                let n = left.min(BUF as u64) as usize;
                pattern.fill(&mut buf[..n]);
                (&*conn).write_all(&buf[..n])?;
                left -= n as u64;
            }
        }
        _ => write_response(conn, 404, "Not Found", None, b"not found\n", keep)?,
    }
    Ok(keep)
}

fn response_head(status: u16, reason: &str, crc: Option<u32>, len: u64, keep: bool) -> String {
    let crc = crc
        .map(|c| format!("x-crc32: {c:08x}\r\n"))
        .unwrap_or_default();
    let close = if keep { "" } else { "connection: close\r\n" };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-length: {len}\r\n\
         content-type: application/octet-stream\r\n{crc}{close}\r\n"
    )
}

/// The response in one write when small (one segment), else head then body.
fn write_response(
    conn: &TcpStream,
    status: u16,
    reason: &str,
    crc: Option<u32>,
    body: &[u8],
    keep: bool,
) -> io::Result<()> {
    let head = response_head(status, reason, crc, body.len() as u64, keep);
    if body.len() <= 64 * 1024 {
        let mut msg = Vec::with_capacity(head.len() + body.len());
        msg.extend_from_slice(head.as_bytes());
        msg.extend_from_slice(body);
        (&*conn).write_all(&msg)
    } else {
        (&*conn).write_all(head.as_bytes())?;
        (&*conn).write_all(body)
    }
}
