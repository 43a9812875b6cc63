//! The programs' pure judgements, unit-tested on the host: the programs read the kernel and
//! the maps, then ask these.

use crate::{PEER_DEFERRED, PEER_LEFT, tuning};

/// Whether a socket is one of Istio's legs: a passive socket on a capture port (app → sidecar,
/// sidecar → sidecar), or either end of a connection from the inbound passthrough address
/// (sidecar → app). `local_passthrough` / `remote_passthrough`: whether that end's address is
/// the passthrough source.
#[inline(always)]
pub fn is_leg(
    active: bool,
    local_port: u32,
    capture_ports: [u32; 2],
    local_passthrough: bool,
    remote_passthrough: bool,
) -> bool {
    if active {
        local_passthrough
    } else {
        (local_port != 0 && capture_ports.contains(&local_port)) || remote_passthrough
    }
}

/// What an app's deferred socket showed at its first write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstWrite {
    /// Non-blocking and watched by epoll: an event loop's; adopt it.
    Ready,
    /// Non-blocking, watched by no epoll: a poll loop or a runtime's socket timeout, which may
    /// turn blocking at any moment.
    NoEpoll,
    /// Blocking (or unknown: no file, no offsets).
    Blocking,
}

#[inline(always)]
pub fn first_write(nonblocking: Option<bool>, watched_by_epoll: bool) -> FirstWrite {
    match nonblocking {
        Some(true) if watched_by_epoll => FirstWrite::Ready,
        Some(true) => FirstWrite::NoEpoll,
        _ => FirstWrite::Blocking,
    }
}

/// From a `PeerInfo`'s flags: an app's socket that left the sockhash for TCP before it was ever
/// adopted into it (deferred, then decided at its first write, or turned blocking first). It
/// never redirected anything and never will (a socket that left never comes back), so nothing
/// is ever redirected into its peer.
#[inline(always)]
pub fn left_unfed(flags: u64) -> bool {
    flags & (PEER_DEFERRED | PEER_LEFT) == PEER_DEFERRED | PEER_LEFT
}

/// Counts bytes redirected since a socket last looked at its peer's queue; true when it is
/// time to look again (then the count starts over).
#[inline(always)]
pub fn look_at_peer(unchecked: &mut u32, size: u64) -> bool {
    *unchecked = unchecked.saturating_add(size as u32);
    if *unchecked < tuning::CHECK_BYTES {
        return false;
    }
    *unchecked = 0;
    true
}

/// A held socket may redirect again once everything it wrote over TCP is acknowledged and its
/// peer has nothing unread (nothing of its TCP stream is left for a redirected byte to overtake).
#[inline(always)]
pub fn may_resume(all_acked: bool, peer_unread: Option<u32>) -> bool {
    all_acked && peer_unread == Some(0)
}

/// One message of the small-write watch (`SockState::small_run` / `small_behind`): every
/// `tuning::SMALL_RUN` small messages in a row it looks at the peer's unread bytes
/// (`peer_unread`, called only then); `tuning::SMALL_BEHIND` looks in a row that find bytes
/// unread make it a small-write stream (true; the watch starts over).
#[inline(always)]
pub fn small_write_stream(
    run: &mut u32,
    behind: &mut u32,
    size: u64,
    peer_unread: impl FnOnce() -> Option<u32>,
) -> bool {
    if size >= tuning::SMALL_WRITE_BYTES {
        *run = 0;
        *behind = 0;
        return false;
    }
    *run += 1;
    if *run < tuning::SMALL_RUN {
        return false;
    }
    *run = 0;
    if peer_unread().is_none_or(|n| n == 0) {
        *behind = 0;
        return false;
    }
    *behind += 1;
    if *behind < tuning::SMALL_BEHIND {
        return false;
    }
    *behind = 0;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PEER_APP, PEER_PAIRED};

    #[test]
    fn only_a_socket_that_left_before_adoption_frees_its_peer() {
        let app = PEER_APP | PEER_PAIRED;
        assert!(left_unfed(app | PEER_DEFERRED | PEER_LEFT));
        // Still waiting for its first write: it may yet be adopted and redirect.
        assert!(!left_unfed(app | PEER_DEFERRED));
        // Adopted (the flag cleared), then left: it may have redirected before.
        assert!(!left_unfed(app | PEER_LEFT));
        assert!(!left_unfed(PEER_PAIRED));
    }

    #[test]
    fn legs() {
        let capture = [15001, 15006];
        // app → sidecar and sidecar → sidecar: the passive end on a capture port.
        assert!(is_leg(false, 15001, capture, false, false));
        assert!(is_leg(false, 15006, capture, false, false));
        // sidecar → app: either end of a connection from the passthrough address.
        assert!(is_leg(true, 40000, capture, true, false));
        assert!(is_leg(false, 8080, capture, false, true));
        // anything else, and an active socket whatever its port.
        assert!(!is_leg(false, 8080, capture, false, false));
        assert!(!is_leg(true, 15001, capture, false, true));
        assert!(!is_leg(false, 0, [0, 0], false, false));
    }

    #[test]
    fn first_write_verdicts() {
        assert_eq!(first_write(Some(true), true), FirstWrite::Ready);
        assert_eq!(first_write(Some(true), false), FirstWrite::NoEpoll);
        assert_eq!(first_write(Some(false), true), FirstWrite::Blocking);
        assert_eq!(first_write(None, true), FirstWrite::Blocking);
    }

    #[test]
    fn looks_at_the_peer_every_check_bytes() {
        let mut u = 0;
        let step = (tuning::CHECK_BYTES / 4) as u64;
        assert!(!look_at_peer(&mut u, step));
        assert!(!look_at_peer(&mut u, step));
        assert!(!look_at_peer(&mut u, step));
        assert!(look_at_peer(&mut u, step));
        assert_eq!(u, 0);
        // A huge message does not wrap the count.
        let mut u = u32::MAX - 1;
        assert!(look_at_peer(&mut u, u64::from(u32::MAX)));
    }

    #[test]
    fn resumes_only_when_everything_was_read() {
        assert!(may_resume(true, Some(0)));
        assert!(!may_resume(false, Some(0)));
        assert!(!may_resume(true, Some(1)));
        assert!(!may_resume(true, None));
    }

    #[test]
    fn a_small_write_stream_needs_small_behind_looks_in_a_row() {
        let (mut run, mut behind) = (0, 0);
        let mut looks = 0;
        let mut judged = None;
        for i in 0..(tuning::SMALL_RUN * tuning::SMALL_BEHIND) {
            if small_write_stream(&mut run, &mut behind, 64, || {
                looks += 1;
                Some(10)
            }) {
                judged = Some(i + 1);
            }
        }
        assert_eq!(
            looks,
            tuning::SMALL_BEHIND,
            "looks only every SMALL_RUN messages"
        );
        assert_eq!(judged, Some(tuning::SMALL_RUN * tuning::SMALL_BEHIND));
        assert_eq!((run, behind), (0, 0));
    }

    #[test]
    fn a_reader_that_keeps_up_or_a_large_write_resets_the_watch() {
        let (mut run, mut behind) = (0, tuning::SMALL_BEHIND - 1);
        for _ in 0..tuning::SMALL_RUN {
            assert!(!small_write_stream(&mut run, &mut behind, 64, || Some(0)));
        }
        assert_eq!(behind, 0, "a look that finds nothing unread starts over");
        let (mut run, mut behind) = (tuning::SMALL_RUN - 1, 2);
        assert!(!small_write_stream(
            &mut run,
            &mut behind,
            tuning::SMALL_WRITE_BYTES,
            || { panic!("no look at a large write") }
        ));
        assert_eq!((run, behind), (0, 0));
    }
}
