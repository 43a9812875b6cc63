//! `--max-unread-bytes`: how much a receiving socket may hold unread before its sender is held
//! on TCP (kernel hazard 5: the kernel bounds no sk_msg ingress queue).
//!
//! The default is 4 MiB. `auto` is the most this node lets one TCP receive queue hold,
//! `net.ipv4.tcp_rmem`'s maximum: a redirected socket then never holds more than the operator's
//! own TCP settings allow a plain one, and a node tuned for bulk transfers (a large `tcp_rmem`)
//! gets them accelerated instead of held back on TCP (the sweep's 16 MiB transfers in 1 MiB
//! writes on the hop: 1.66× of TCP at 4 MiB, 2.59× at this VM's 32 MiB, as with no limit).
//! Not the default: a plain TCP receiver reaches that maximum only by autotuning while it reads
//! fast, so a stalled reader then queues several times what TCP would have held for it.
use std::fmt;

use meshaccel_common::tuning::QUEUE_LIMIT;

/// The flag's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueLimit {
    /// `net.ipv4.tcp_rmem`'s maximum, read at start.
    Auto,
    /// A number of bytes; 0: no limit.
    Bytes(u32),
}

impl fmt::Display for QueueLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Bytes(n) => write!(f, "{n}"),
        }
    }
}

/// Parses the flag: `auto` or a whole number of bytes (clap prefixes the flag's name).
pub fn parse(s: &str) -> Result<QueueLimit, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("auto") {
        return Ok(QueueLimit::Auto);
    }
    s.parse().map(QueueLimit::Bytes).map_err(|_| {
        format!(
            "{s:?} is neither \"auto\" (the node's net.ipv4.tcp_rmem maximum) nor a whole number of bytes up to {} (0: no limit)",
            u32::MAX
        )
    })
}

/// The third field of `net.ipv4.tcp_rmem` ("min default max"), capped to what the programs
/// compare with (u32); None when it is not three numbers.
pub fn tcp_rmem_max(tcp_rmem: &str) -> Option<u32> {
    let fields: Vec<u64> = tcp_rmem
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    match fields[..] {
        [_, _, max] if max > 0 => Some(max.min(u64::from(u32::MAX)) as u32),
        _ => None,
    }
}

/// The limit in bytes: `auto` from `tcp_rmem` (this process's network namespace: a new one
/// starts with the host's values), or 4 MiB with a warning when that cannot be read.
/// `tcp_rmem` reads it, only for `auto`.
pub fn resolve(
    limit: QueueLimit,
    tcp_rmem: impl FnOnce() -> std::io::Result<String>,
) -> (u32, Option<String>) {
    let QueueLimit::Bytes(n) = limit else {
        let tcp_rmem = tcp_rmem();
        return match tcp_rmem.as_deref().ok().and_then(tcp_rmem_max) {
            Some(max) => (max, None),
            None => (
                QUEUE_LIMIT,
                Some(format!(
                    "--max-unread-bytes auto: cannot read net.ipv4.tcp_rmem ({}); using {QUEUE_LIMIT} bytes",
                    match &tcp_rmem {
                        Ok(s) => format!("{:?} is not three numbers", s.trim()),
                        Err(e) => e.to_string(),
                    }
                )),
            ),
        };
    };
    (n, None)
}

/// Where `auto` reads from.
pub const TCP_RMEM: &str = "/proc/sys/net/ipv4/tcp_rmem";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_or_bytes_and_a_clear_error() {
        assert_eq!(parse("auto"), Ok(QueueLimit::Auto));
        assert_eq!(parse("AUTO"), Ok(QueueLimit::Auto));
        assert_eq!(parse("0"), Ok(QueueLimit::Bytes(0)));
        assert_eq!(parse("4194304"), Ok(QueueLimit::Bytes(4 << 20)));
        for bad in ["lots", "-1", "4MiB", "4294967296"] {
            let e = parse(bad).expect_err(bad);
            assert!(
                e.contains("auto") && e.contains("0: no limit"),
                "{bad}: {e}"
            );
        }
        assert_eq!(QueueLimit::Auto.to_string(), "auto");
    }

    #[test]
    fn auto_is_tcp_rmem_max() {
        assert_eq!(tcp_rmem_max("4096\t131072\t33554432\n"), Some(32 << 20));
        assert_eq!(tcp_rmem_max("4096 131072 6291456"), Some(6 << 20));
        assert_eq!(tcp_rmem_max("4096 131072 8589934592"), Some(u32::MAX));
        assert_eq!(tcp_rmem_max("4096 131072"), None);
        assert_eq!(tcp_rmem_max("a b c"), None);
        assert_eq!(tcp_rmem_max("1 2 0"), None);
        let ok = || Ok("4096 131072 6291456".to_string());
        assert_eq!(resolve(QueueLimit::Auto, ok), (6 << 20, None));
        let unread = || -> std::io::Result<String> { panic!("a number needs no tcp_rmem") };
        assert_eq!(resolve(QueueLimit::Bytes(7), unread), (7, None));
        let (n, warn) = resolve(
            QueueLimit::Auto,
            || Err(std::io::ErrorKind::NotFound.into()),
        );
        assert_eq!(n, QUEUE_LIMIT);
        assert!(warn.unwrap().contains("tcp_rmem"));
    }
}
