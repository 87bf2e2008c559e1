//! The ring's handshake: both ends of every ring connection prove that they hold the run's
//! join token, without sending it, before a gradient byte crosses the connection.
//!
//! The token reaches a worker through the authenticated control link (`Join`); anyone who can
//! reach a rank's listening port does not have it. Each side sends a fresh 32-byte challenge
//! and answers the other's with HMAC-SHA256 under a key derived from the token (`RingKey`),
//! over everything both said: the world size, both ranks, both challenges, and which side it
//! is (so an answer cannot be reflected back as the other side's). On the wire, after the TCP
//! connect:
//!
//! ```text
//! connector -> acceptor  "XKDRING2" | connector rank u32 | world u32 | connector challenge [32]
//! acceptor -> connector  "XKDRING2" | acceptor rank u32  | world u32 | acceptor challenge [32]
//! connector -> acceptor  tag(connector)  [32]
//! acceptor -> connector  tag(acceptor)   [32]   only after the connector's tag verified
//!
//! key      = HMAC-SHA256(join token, "xkd collective ring key v1")
//! tag(role) = HMAC-SHA256(key, "xkd ring handshake v1" | role u8 (1 connector, 2 acceptor)
//!              | world u32 | connector rank u32 | acceptor rank u32
//!              | connector challenge | acceptor challenge)          (integers little-endian)
//! ```
//!
//! The acceptor never computes a tag for a peer that has not proved itself first, so a
//! stranger learns nothing from it; the connector's tag covers the acceptor's fresh challenge,
//! so it cannot be replayed to another listener. Tags are compared in constant time
//! (`Mac::verify_slice`). The acceptor handshakes every accepted connection on its own thread
//! under `HANDSHAKE_LIMIT`, drops and logs one that fails, and keeps accepting: a stray or
//! hostile connection can neither inject into the ring nor hold it up beyond that limit.
//!
//! What it does not do: the bytes after the handshake are neither encrypted nor
//! MAC'd, so someone who can alter packets between two hosts can still alter gradients. The
//! ring belongs on a network only the job's hosts reach (ARCHITECTURE.md, deploy/README.md).

use super::{configure, PeerIds, ACCEPT_POLL};
use crate::CollectiveError;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

type HmacSha256 = Hmac<Sha256>;

/// Opens every ring connection, in both directions. `XKDRING1` was the unauthenticated
/// handshake (magic, rank, world size) of older workers.
const MAGIC: [u8; 8] = *b"XKDRING2";
const OLD_MAGIC: [u8; 8] = *b"XKDRING1";
const CHALLENGE_LEN: usize = 32;
const TAG_LEN: usize = 32;
/// Rank, world size and challenge after the magic.
const HELLO_BODY_LEN: usize = 4 + 4 + CHALLENGE_LEN;
/// The label under which the MAC key is derived from the join token, so the key is never the
/// token itself and serves only this purpose.
const KEY_LABEL: &[u8] = b"xkd collective ring key v1";
/// The first bytes every tag covers.
const TAG_LABEL: &[u8] = b"xkd ring handshake v1";
/// The longest an accepted connection may take to prove itself (or a connector's peer to
/// answer, once it has said hello). A genuine peer needs a few round trips.
pub(super) const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Unverified connections handshaking at once; more are dropped until one finishes, so a
/// flood of connections costs threads up to this many.
const MAX_PENDING: usize = 16;

/// The secret the ring's handshake proves knowledge of: HMAC-SHA256 keyed by the run's join
/// token over a fixed label. Its `Debug` never shows it.
#[derive(Clone)]
pub struct RingKey([u8; 32]);

impl RingKey {
    /// The key of the run whose join token is `token` (every rank of the run derives the same).
    pub fn from_token(token: &str) -> RingKey {
        let mut kdf = keyed(token.as_bytes());
        kdf.update(KEY_LABEL);
        RingKey(kdf.finalize().into_bytes().into())
    }

    /// The tag `role` sends for the exchange `exchange`.
    fn tag(&self, role: Role, exchange: &Exchange) -> [u8; TAG_LEN] {
        self.mac(role, exchange).finalize().into_bytes().into()
    }

    /// Whether `tag` is what `role` must send for `exchange`; compared in constant time.
    fn verify(&self, role: Role, exchange: &Exchange, tag: &[u8]) -> bool {
        self.mac(role, exchange).verify_slice(tag).is_ok()
    }

    fn mac(&self, role: Role, exchange: &Exchange) -> HmacSha256 {
        let mut mac = keyed(&self.0);
        mac.update(TAG_LABEL);
        mac.update(&[role as u8]);
        mac.update(&exchange.world.to_le_bytes());
        mac.update(&exchange.connector.to_le_bytes());
        mac.update(&exchange.acceptor.to_le_bytes());
        mac.update(&exchange.connector_challenge);
        mac.update(&exchange.acceptor_challenge);
        mac
    }
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(<redacted>)")
    }
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length (a long one is hashed first): this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of every length")
}

/// Which end of a connection a tag comes from; part of what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Role {
    Connector = 1,
    Acceptor = 2,
}

/// Everything both sides said before the tags: what each tag covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exchange {
    world: u32,
    connector: u32,
    acceptor: u32,
    connector_challenge: [u8; CHALLENGE_LEN],
    acceptor_challenge: [u8; CHALLENGE_LEN],
}

/// One side's opening message.
#[derive(Debug, Clone, Copy)]
struct Hello {
    rank: u32,
    world: u32,
    challenge: [u8; CHALLENGE_LEN],
}

impl Hello {
    /// This side's hello, with a fresh challenge from the OS.
    fn fresh(rank: u32, world: u32) -> Result<Hello, String> {
        let mut challenge = [0u8; CHALLENGE_LEN];
        getrandom::fill(&mut challenge)
            .map_err(|e| format!("no randomness for the handshake's challenge: {e}"))?;
        Ok(Hello {
            rank,
            world,
            challenge,
        })
    }

    fn to_bytes(self) -> [u8; MAGIC.len() + HELLO_BODY_LEN] {
        let mut bytes = [0u8; MAGIC.len() + HELLO_BODY_LEN];
        bytes[..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&self.rank.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.world.to_le_bytes());
        bytes[16..].copy_from_slice(&self.challenge);
        bytes
    }

    /// Reads a hello: the magic first, so a stranger or an older worker is told apart at once
    /// instead of after a timeout waiting for bytes it will never send.
    fn read(stream: &mut TcpStream, deadline: Instant) -> Result<Hello, String> {
        let mut magic = [0u8; 8];
        read_full(stream, &mut magic, deadline).map_err(|e| io_reason("its hello", &e))?;
        if magic == OLD_MAGIC {
            return Err(
                "it sent the unauthenticated handshake of an older xkd worker \
                        (XKDRING1); every rank must run the same xkd"
                    .into(),
            );
        }
        if magic != MAGIC {
            return Err(format!(
                "not an xkd ring peer: its first bytes are {}",
                printable(&magic)
            ));
        }
        let mut body = [0u8; HELLO_BODY_LEN];
        read_full(stream, &mut body, deadline).map_err(|e| io_reason("its hello", &e))?;
        let u32_at =
            |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
        let mut challenge = [0u8; CHALLENGE_LEN];
        challenge.copy_from_slice(&body[8..]);
        Ok(Hello {
            rank: u32_at(0),
            world: u32_at(4),
            challenge,
        })
    }

    /// That the peer is the rank this side expects, in a world of this side's size.
    fn check(&self, ids: PeerIds) -> Result<(), String> {
        if self.rank as usize != ids.peer {
            return Err(format!(
                "it says it is rank {}, but rank {} was expected here",
                self.rank, ids.peer
            ));
        }
        if self.world as usize != ids.world {
            return Err(format!(
                "it has world size {}, this rank {}",
                self.world, ids.world
            ));
        }
        Ok(())
    }
}

/// The connecting half: rank `ids.rank` has connected to rank `ids.peer`'s listener; prove the
/// token to it and check that it holds the token too. The stream's timeouts are the caller's.
pub(super) fn connector(
    stream: &mut TcpStream,
    ids: PeerIds,
    key: &RingKey,
    deadline: Instant,
) -> Result<(), CollectiveError> {
    let reject = |reason: String| CollectiveError::Handshake {
        rank: ids.rank,
        peer: ids.peer,
        reason,
    };
    let (rank, world) = (wire_u32(ids.rank, ids)?, wire_u32(ids.world, ids)?);
    let ours = Hello::fresh(rank, world).map_err(reject)?;
    send(stream, &ours.to_bytes(), ids, "sending the handshake")?;
    // The peer answers only once it accepts, which may be long after this connect completed
    // (ranks start at different times): wait for it until the ring's deadline.
    let theirs = Hello::read(stream, deadline).map_err(reject)?;
    theirs.check(ids).map_err(reject)?;
    let exchange = Exchange {
        world,
        connector: rank,
        acceptor: theirs.rank,
        connector_challenge: ours.challenge,
        acceptor_challenge: theirs.challenge,
    };
    let tag = key.tag(Role::Connector, &exchange);
    send(stream, &tag, ids, "sending the handshake's answer")?;
    let mut answer = [0u8; TAG_LEN];
    let answer_by = deadline.min(Instant::now() + HANDSHAKE_LIMIT);
    read_full(stream, &mut answer, answer_by).map_err(|e| {
        let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
            "it closed the connection instead of answering: it refused this rank's proof of the \
             join token (do both ranks have the same XKD_JOIN_TOKEN?)"
                .to_string()
        } else {
            io_reason("its answer", &e)
        };
        reject(reason)
    })?;
    if !key.verify(Role::Acceptor, &exchange, &answer) {
        return Err(reject(
            "its answer does not prove the run's join token (wrong MAC): it is not a rank of \
             this run"
                .into(),
        ));
    }
    Ok(())
}

/// The accepting half: accepts connections until one proves it is rank `ids.peer` of this
/// run, each handshaking on its own thread (a silent connection holds up no other). A
/// connection that fails is dropped and logged with its address and the reason. Gives up at
/// `deadline`, or as soon as `abandon` is set (the connecting half failed).
pub(super) fn accept_verified(
    listener: &TcpListener,
    ids: PeerIds,
    key: &RingKey,
    deadline: Instant,
    abandon: &AtomicBool,
) -> Result<TcpStream, CollectiveError> {
    let accept_error = |source| CollectiveError::Accept {
        rank: ids.rank,
        peer: ids.peer,
        source,
    };
    listener.set_nonblocking(true).map_err(accept_error)?;
    let (done_tx, done) = mpsc::channel();
    let mut pending = 0usize;
    let mut refused = 0usize;
    loop {
        while let Ok(outcome) = done.try_recv() {
            pending -= 1;
            match outcome {
                Some(stream) => return Ok(stream),
                None => refused += 1,
            }
        }
        if abandon.load(Ordering::Relaxed) {
            let gave_up = io::Error::other("the connection to the next rank failed first");
            return Err(accept_error(gave_up));
        }
        match listener.accept() {
            Ok((stream, addr)) if pending < MAX_PENDING => {
                pending += 1;
                let limit = deadline.min(Instant::now() + HANDSHAKE_LIMIT);
                spawn_acceptor(stream, addr, ids, key.clone(), limit, done_tx.clone());
            }
            Ok((stream, addr)) => {
                tracing::warn!(
                    peer = %addr, rank = ids.rank, pending,
                    "ring connection dropped: too many connections are still handshaking"
                );
                drop(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let reason = format!(
                        "no connection proved it is rank {} of this run in time ({refused} refused)",
                        ids.peer
                    );
                    return Err(accept_error(io::Error::new(
                        io::ErrorKind::TimedOut,
                        reason,
                    )));
                }
                thread::sleep(ACCEPT_POLL);
            }
            // A connection that went away before it was accepted is not the listener's fault.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Err(accept_error(e)),
        }
    }
}

/// The handshake of one accepted connection, on its own thread so that the accept loop goes
/// on meanwhile. It logs through the subscriber of the thread that forms the ring, and sends
/// the verified stream (or `None`) to the accept loop; one that comes after the ring formed
/// is dropped.
fn spawn_acceptor(
    mut stream: TcpStream,
    addr: SocketAddr,
    ids: PeerIds,
    key: RingKey,
    deadline: Instant,
    done: mpsc::Sender<Option<TcpStream>>,
) {
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    thread::spawn(move || {
        tracing::dispatcher::with_default(&dispatch, || {
            let outcome = match acceptor(&mut stream, ids, &key, deadline) {
                Ok(()) => Some(stream),
                Err(reason) => {
                    // Logged before the stream is dropped, so a peer that sees the connection
                    // close can count on the line being there.
                    tracing::warn!(
                        peer = %addr, rank = ids.rank, expected = ids.peer, %reason,
                        "ring connection refused: it failed the handshake"
                    );
                    drop(stream);
                    None
                }
            };
            let _ = done.send(outcome);
        });
    });
}

/// The accepting side of one connection; `Err` is the reason to drop it.
pub(super) fn acceptor(
    stream: &mut TcpStream,
    ids: PeerIds,
    key: &RingKey,
    deadline: Instant,
) -> Result<(), String> {
    // Some platforms let accepted sockets inherit the listener's non-blocking mode.
    stream
        .set_nonblocking(false)
        .map_err(|e| io_reason("setting up", &e))?;
    let limit = deadline.saturating_duration_since(Instant::now());
    configure(stream, ids, limit.max(Duration::from_millis(1))).map_err(|e| e.to_string())?;
    let theirs = Hello::read(stream, deadline)?;
    theirs.check(ids)?;
    let rank = u32::try_from(ids.rank).map_err(|_| "rank does not fit u32".to_string())?;
    let ours = Hello::fresh(rank, theirs.world)?;
    stream
        .write_all(&ours.to_bytes())
        .map_err(|e| io_reason("sending this rank's hello", &e))?;
    let exchange = Exchange {
        world: theirs.world,
        connector: theirs.rank,
        acceptor: rank,
        connector_challenge: theirs.challenge,
        acceptor_challenge: ours.challenge,
    };
    let mut tag = [0u8; TAG_LEN];
    read_full(stream, &mut tag, deadline).map_err(|e| io_reason("its proof of the token", &e))?;
    if !key.verify(Role::Connector, &exchange, &tag) {
        return Err(
            "wrong MAC: it does not prove the run's join token (another run's worker, or not \
             a worker)"
                .into(),
        );
    }
    stream
        .write_all(&key.tag(Role::Acceptor, &exchange))
        .map_err(|e| io_reason("sending this rank's answer", &e))
}

/// `read_exact` that ends at `deadline` however the peer trickles its bytes: the socket's read
/// timeout is what is left before each read.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake's time ran out",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn send(
    stream: &mut TcpStream,
    bytes: &[u8],
    ids: PeerIds,
    action: &'static str,
) -> Result<(), CollectiveError> {
    stream
        .write_all(bytes)
        .map_err(|source| CollectiveError::Socket {
            rank: ids.rank,
            peer: ids.peer,
            action,
            source,
        })
}

fn wire_u32(value: usize, ids: PeerIds) -> Result<u32, CollectiveError> {
    u32::try_from(value).map_err(|_| CollectiveError::Config {
        rank: ids.rank,
        reason: format!("{value} does not fit the u32 handshake field"),
    })
}

/// Why reading `what` failed, in words: a closed connection and a timeout say so plainly.
fn io_reason(what: &str, error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::UnexpectedEof => format!("the connection closed before {what}"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("{what} did not come within the handshake's time limit")
        }
        _ => format!("{what}: {error}"),
    }
}

/// Up to 8 bytes a stranger sent, as text where printable and as hex otherwise.
fn printable(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests;
