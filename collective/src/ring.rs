//! The CPU ring all-reduce over TCP (see the crate's header for the algorithm), its listener
//! and framing. Every connection is authenticated first (`handshake`: both ends prove the
//! run's join token).

mod handshake;

pub use handshake::RingKey;

use crate::{Collective, CollectiveError};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Step number and payload byte length, both little-endian u32.
const HEADER_LEN: usize = 8;
const F32_BYTES: usize = 4;
/// How often a pending accept is polled; short because ring setup sits on the start-up path.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
const CONNECT_BACKOFF_START: Duration = Duration::from_millis(10);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The listening half of a ring member, bound before the ring forms so that its address can be
/// published (through the coordinator) to the other ranks.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl RingListener {
    /// Bind the listening socket first (port 0 allowed) so its address can be sent to the
    /// coordinator.
    pub fn bind(addr: &str) -> Result<RingListener, CollectiveError> {
        let bind_error = |source| CollectiveError::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_error)?;
        // Asked once here so `local_addr` can be infallible: the port is what peers need.
        let local = listener.local_addr().map_err(bind_error)?;
        Ok(RingListener {
            listener,
            addr: local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connect into a ring: connect to `peers[(rank+1)%W]` and accept from
    /// `peers[(rank+W-1)%W]`, both at once, each connection authenticated by the handshake
    /// (`handshake`: both ends prove they hold `key`, the run's join token, and say the rank
    /// and world size expected); connections that fail it are dropped and logged while the
    /// listener goes on accepting. Then TCP_NODELAY and read/write timeouts of `timeout`, so a
    /// dead peer yields an error, never a hang. The outgoing connect is retried with back-off
    /// until `timeout`, because peers start at different times.
    pub fn connect(
        self,
        rank: usize,
        peers: &[String],
        timeout: Duration,
        key: &RingKey,
    ) -> Result<TcpRing, CollectiveError> {
        let world = peers.len();
        validate_ring(rank, world, timeout)?;
        if world == 1 {
            // A ring of one has no neighbours; the listener is simply dropped.
            return Ok(TcpRing::alone());
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let ids = |peer| PeerIds { rank, peer, world };

        // Both halves at once: each rank's connecting half waits for its next rank's accepting
        // half to answer, so doing one after the other would wait in a circle.
        let abandon = AtomicBool::new(false);
        let (next, prev) = thread::scope(|scope| {
            let connecting = scope.spawn(|| {
                let next = connect_next(ids(next_rank), &peers[next_rank], key, timeout, deadline);
                if next.is_err() {
                    abandon.store(true, Ordering::Relaxed);
                }
                next
            });
            let prev =
                handshake::accept_verified(&self.listener, ids(prev_rank), key, deadline, &abandon);
            let next = connecting
                .join()
                .unwrap_or(Err(CollectiveError::SenderPanicked {
                    rank,
                    peer: next_rank,
                }));
            (next, prev)
        });
        // The connecting half's error first: when it failed, the accepting half only gave up.
        let next = next?;
        let prev = prev?;
        configure(&next, ids(next_rank), timeout)?;
        configure(&prev, ids(prev_rank), timeout)?;

        tracing::debug!(rank, world, "collective ring connected");
        Ok(TcpRing {
            rank,
            world,
            links: Some(Links {
                rank,
                world,
                next_rank,
                prev_rank,
                next,
                prev,
                timeout,
                step: 0,
                send_buf: Vec::new(),
                recv_buf: Vec::new(),
            }),
            poisoned: false,
        })
    }
}

/// A rank's place in the CPU ring: a stream to the next rank and one from the previous rank.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// None for a ring of one, which needs no sockets.
    links: Option<Links>,
    /// Set when a collective fails midway: peers are then at unknown steps, so the ring must not
    /// be reused (a retry would silently mix steps).
    poisoned: bool,
}

impl TcpRing {
    fn alone() -> TcpRing {
        TcpRing {
            rank: 0,
            world: 1,
            links: None,
            poisoned: false,
        }
    }

    /// Run `op` on the links, poisoning the ring if it fails.
    fn guarded(
        &mut self,
        op: impl FnOnce(&mut Links, usize) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        if self.poisoned {
            return Err(CollectiveError::Poisoned { rank: self.rank });
        }
        let Some(links) = self.links.as_mut() else {
            return Ok(());
        };
        let result = op(links, self.world);
        self.poisoned = result.is_err();
        result
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        // Even an empty buffer goes round the ring: the length check then catches ranks that
        // disagree about the buffer size.
        self.guarded(|links, world| ring_all_reduce_mean(links, world, data))
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        // After W-1 relay steps every rank has (transitively) heard from every other rank.
        self.guarded(|links, world| {
            for _ in 1..world {
                links.exchange(&[], 0)?;
            }
            Ok(())
        })
    }

    fn barrier_within(&mut self, limit: Duration) -> Result<(), CollectiveError> {
        if limit.is_zero() {
            return Err(CollectiveError::Config {
                rank: self.rank,
                reason: "a barrier's time limit must be greater than zero".into(),
            });
        }
        self.guarded(|links, _| links.set_timeout(limit))?;
        let waited = self.barrier();
        // Restored even after a failed barrier; the ring is poisoned then anyway.
        if let Some(links) = self.links.as_mut() {
            let timeout = links.timeout;
            links.set_timeout(timeout)?;
        }
        waited
    }
}

/// Who is talking to whom, for error messages and handshakes.
#[derive(Debug, Clone, Copy)]
struct PeerIds {
    rank: usize,
    peer: usize,
    world: usize,
}

#[derive(Debug)]
struct Links {
    rank: usize,
    world: usize,
    next_rank: usize,
    prev_rank: usize,
    next: TcpStream,
    prev: TcpStream,
    /// The sockets' read and write timeout (the collective timeout).
    timeout: Duration,
    /// Counts messages over the ring's life; every rank sends and receives the same sequence, so
    /// a mismatch on receipt means the ranks have drifted apart.
    step: u32,
    /// Reused between steps so a training loop does not allocate per message.
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

impl Links {
    fn ids(&self, peer: usize) -> PeerIds {
        PeerIds {
            rank: self.rank,
            peer,
            world: self.world,
        }
    }

    /// Sets both sockets' read and write timeouts to `limit` (`self.timeout` is unchanged).
    fn set_timeout(&mut self, limit: Duration) -> Result<(), CollectiveError> {
        configure(&self.next, self.ids(self.next_rank), limit)?;
        configure(&self.prev, self.ids(self.prev_rank), limit)
    }

    /// One ring step: send `outgoing` to the next rank while receiving `incoming_len` floats from
    /// the previous rank into `recv_buf`. Sending runs on its own thread because with large
    /// buffers both sides would otherwise block in write with full socket buffers.
    fn exchange(&mut self, outgoing: &[f32], incoming_len: usize) -> Result<(), CollectiveError> {
        let step = self.step;
        self.step = self.step.wrapping_add(1);
        encode_message(&mut self.send_buf, step, outgoing).map_err(|reason| {
            CollectiveError::Config {
                rank: self.rank,
                reason,
            }
        })?;
        let expected = Expected {
            step,
            bytes: incoming_len * F32_BYTES,
        };
        // Disjoint field borrows: the sender owns `next` and `send_buf`, this thread `prev` and
        // `recv_buf` (the two directions are separate sockets).
        let Links {
            next,
            prev,
            send_buf,
            recv_buf,
            ..
        } = self;
        let (sent, received) = thread::scope(|scope| {
            let sender = scope.spawn(move || next.write_all(send_buf));
            let received = receive_message(prev, recv_buf, expected);
            (sender.join(), received)
        });
        self.check_step(step, sent, received)
    }

    /// Turn the two halves of a step into one result. A failed send is reported first: it names
    /// the peer that went away, whereas the receive may merely have timed out as a consequence.
    fn check_step(
        &self,
        step: u32,
        sent: thread::Result<io::Result<()>>,
        received: Result<(), RecvFailure>,
    ) -> Result<(), CollectiveError> {
        match sent {
            Err(_) => {
                return Err(CollectiveError::SenderPanicked {
                    rank: self.rank,
                    peer: self.next_rank,
                })
            }
            Ok(Err(source)) => {
                return Err(CollectiveError::Send {
                    rank: self.rank,
                    peer: self.next_rank,
                    step,
                    source,
                })
            }
            Ok(Ok(())) => {}
        }
        received.map_err(|failure| failure.into_error(self.rank, self.prev_rank, step))
    }

    /// The floats of the last received message.
    fn received(&self) -> impl Iterator<Item = f32> + '_ {
        self.recv_buf
            .chunks_exact(F32_BYTES)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// What the next message from the previous rank must look like.
#[derive(Debug, Clone, Copy)]
struct Expected {
    step: u32,
    bytes: usize,
}

/// A receive failure before the ranks are known to the receiving code.
#[derive(Debug)]
enum RecvFailure {
    Io(io::Error),
    Desync {
        got_step: u32,
        got_len: usize,
        expected: Expected,
    },
}

impl RecvFailure {
    fn into_error(self, rank: usize, peer: usize, step: u32) -> CollectiveError {
        match self {
            RecvFailure::Io(source) => CollectiveError::Recv {
                rank,
                peer,
                step,
                source,
            },
            RecvFailure::Desync {
                got_step,
                got_len,
                expected,
            } => CollectiveError::Desync {
                rank,
                peer,
                expected_step: expected.step,
                expected_len: expected.bytes,
                got_step,
                got_len,
            },
        }
    }
}

/// Header plus little-endian payload in one buffer, so a step is a single bulk write.
fn encode_message(buf: &mut Vec<u8>, step: u32, values: &[f32]) -> Result<(), String> {
    let bytes = values.len() * F32_BYTES;
    let len = u32::try_from(bytes)
        .map_err(|_| format!("a ring chunk of {bytes} bytes does not fit the u32 length header"))?;
    buf.clear();
    buf.reserve(HEADER_LEN + bytes);
    buf.extend_from_slice(&step.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    for value in values {
        buf.extend_from_slice(&value.to_le_bytes());
    }
    Ok(())
}

/// Read one message into `buf`, checking its header against what this step must carry.
fn receive_message(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    expected: Expected,
) -> Result<(), RecvFailure> {
    let mut header = [0u8; HEADER_LEN];
    stream.read_exact(&mut header).map_err(recv_io_failure)?;
    let got_step = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let got_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if got_step != expected.step || got_len != expected.bytes {
        return Err(RecvFailure::Desync {
            got_step,
            got_len,
            expected,
        });
    }
    buf.resize(expected.bytes, 0);
    stream.read_exact(buf).map_err(recv_io_failure)
}

/// std reports a closed connection in read_exact as "failed to fill whole buffer"; say what it
/// means for a ring.
fn recv_io_failure(error: io::Error) -> RecvFailure {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        let closed = io::Error::new(error.kind(), "the peer closed the connection");
        return RecvFailure::Io(closed);
    }
    RecvFailure::Io(error)
}

/// The `index`-th of `world` contiguous chunks of a buffer of `len`; sizes differ by at most one
/// (the first `len % world` chunks get the extra element) and chunks may be empty.
fn chunk_range(len: usize, world: usize, index: usize) -> Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    start..start + size
}

fn ring_all_reduce_mean(
    links: &mut Links,
    world: usize,
    data: &mut [f32],
) -> Result<(), CollectiveError> {
    reduce_scatter(links, world, data)?;
    let owned = chunk_range(data.len(), world, (links.rank + 1) % world);
    // Only the owner divides, so every rank later copies the same rounded bytes.
    let divisor = world as f32;
    for value in &mut data[owned] {
        *value /= divisor;
    }
    all_gather(links, world, data)
}

/// After step s rank r holds the partial sum of chunk (r-s-1) over ranks r-s-1..=r; after W-1
/// steps it owns the complete sum of chunk r+1. Each chunk is summed in ring order starting at
/// its own index, which fixes the floating-point order.
fn reduce_scatter(
    links: &mut Links,
    world: usize,
    data: &mut [f32],
) -> Result<(), CollectiveError> {
    let rank = links.rank;
    for s in 0..world - 1 {
        let send = chunk_range(data.len(), world, (rank + world - s) % world);
        let recv = chunk_range(data.len(), world, (rank + 2 * world - s - 1) % world);
        links.exchange(&data[send], recv.len())?;
        for (value, partial) in data[recv].iter_mut().zip(links.received()) {
            *value += partial;
        }
    }
    Ok(())
}

/// Each owner's finished chunk travels once round the ring, overwriting the stale copies.
fn all_gather(links: &mut Links, world: usize, data: &mut [f32]) -> Result<(), CollectiveError> {
    let rank = links.rank;
    for s in 0..world - 1 {
        let send = chunk_range(data.len(), world, (rank + 1 + world - s) % world);
        let recv = chunk_range(data.len(), world, (rank + world - s) % world);
        links.exchange(&data[send], recv.len())?;
        for (value, finished) in data[recv].iter_mut().zip(links.received()) {
            *value = finished;
        }
    }
    Ok(())
}

fn validate_ring(rank: usize, world: usize, timeout: Duration) -> Result<(), CollectiveError> {
    let reason = if world == 0 {
        "the peer list is empty".to_string()
    } else if rank >= world {
        format!("rank {rank} is outside a world of {world}")
    } else if timeout.is_zero() {
        // A zero socket timeout is rejected by the OS and would mean "wait forever" in spirit.
        "the timeout must be greater than zero".to_string()
    } else {
        return Ok(());
    };
    Err(CollectiveError::Config { rank, reason })
}

/// The connecting half: reach the next rank (retrying until `deadline`) and authenticate.
fn connect_next(
    ids: PeerIds,
    addr: &str,
    key: &RingKey,
    timeout: Duration,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let mut next = connect_with_backoff(ids, addr, deadline)?;
    configure(&next, ids, timeout)?;
    handshake::connector(&mut next, ids, key, deadline)?;
    Ok(next)
}

fn connect_with_backoff(
    ids: PeerIds,
    addr: &str,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let mut delay = CONNECT_BACKOFF_START;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let error = match try_connect(addr, remaining) {
            Ok(stream) => return Ok(stream),
            Err(error) => error,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CollectiveError::Connect {
                rank: ids.rank,
                peer: ids.peer,
                addr: addr.to_string(),
                source: error,
            });
        }
        thread::sleep(delay.min(remaining));
        delay = (delay * 2).min(CONNECT_BACKOFF_MAX);
    }
}

/// One attempt at every address `addr` resolves to; resolved afresh each time because a peer's
/// name may only become resolvable once it is up.
fn try_connect(addr: &str, remaining: Duration) -> io::Result<TcpStream> {
    if remaining.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect deadline passed",
        ));
    }
    let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
    for candidate in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&candidate, remaining) {
            Ok(stream) => return Ok(stream),
            Err(error) => last = error,
        }
    }
    Err(last)
}

/// NODELAY because each step is one bulk write followed by waiting for the peer: Nagle would
/// only add latency. Timeouts turn a dead or stuck peer into an error.
fn configure(stream: &TcpStream, ids: PeerIds, timeout: Duration) -> Result<(), CollectiveError> {
    let socket_error = |action| {
        move |source| CollectiveError::Socket {
            rank: ids.rank,
            peer: ids.peer,
            action,
            source,
        }
    };
    stream
        .set_nodelay(true)
        .map_err(socket_error("setting TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(socket_error("setting the read timeout"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(socket_error("setting the write timeout"))
}

#[cfg(test)]
mod tests;
