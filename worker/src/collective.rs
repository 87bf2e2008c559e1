//! The gradient collective: every rank hands in its local gradients and gets back the mean over
//! all ranks.
//!
//! On GPUs it is NCCL (`crate::nccl`, the `cuda` feature); on CPU a ring all-reduce over TCP
//! stands in (see DESIGN.md, "Control plane and data plane"). Both sit behind [`Collective`] so
//! the training step does not care which one it talks to.
//!
//! The CPU ring is the classic bandwidth-optimal one: the buffer is split into W chunks, a
//! reduce-scatter of W-1 steps leaves each rank owning one fully summed chunk, the owner divides
//! it by W, and an all-gather of W-1 steps copies the owner's bytes to everyone. Because each
//! chunk is summed in a fixed ring order and only the owner divides, every rank ends with
//! bit-identical values and a run repeats bit-for-bit.

use candle_core::Tensor;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::thread;
use std::time::{Duration, Instant};

/// Sent first on every ring connection so a stray connection (or another program) is rejected.
const MAGIC: [u8; 8] = *b"XKDRING1";
/// Magic, then rank and world size as little-endian u32.
const HANDSHAKE_LEN: usize = 16;
/// Step number and payload byte length, both little-endian u32.
const HEADER_LEN: usize = 8;
const F32_BYTES: usize = 4;
/// How often a pending accept is polled; short because ring setup sits on the start-up path.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
const CONNECT_BACKOFF_START: Duration = Duration::from_millis(10);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A group of ranks that can average buffers and synchronise.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replace `data` on every rank by the elementwise mean over ranks. Every rank ends with
    /// bit-identical values, and the result is a deterministic function of the inputs.
    fn all_reduce_mean(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Replace each of `buckets` (flat f32 tensors of the same lengths on every rank) by its
    /// elementwise mean over ranks, on the bucket's device, with the guarantees of
    /// `all_reduce_mean`. This default goes through host memory one bucket at a time (the CPU
    /// ring); the NCCL collective averages on the GPU, all buckets in one NCCL group.
    fn all_reduce_buckets(&mut self, buckets: &mut [Tensor]) -> Result<(), CollectiveError> {
        let rank = self.rank();
        let tensor = |source| CollectiveError::Tensor { rank, source };
        for bucket in buckets.iter_mut() {
            let mut host = bucket.to_vec1::<f32>().map_err(tensor)?;
            self.all_reduce_mean(&mut host)?;
            let n = host.len();
            *bucket = Tensor::from_vec(host, n, bucket.device()).map_err(tensor)?;
        }
        Ok(())
    }
    /// Block until every rank has called barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// Everything that can go wrong in the collective; each variant names who failed and at what.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("invalid collective configuration for rank {rank}: {reason}")]
    Config { rank: usize, reason: String },
    #[error("cannot bind the collective listener on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("rank {rank} could not connect to rank {peer} at {addr} before the timeout: {source}")]
    Connect {
        rank: usize,
        peer: usize,
        addr: String,
        source: io::Error,
    },
    #[error("rank {rank} did not get a connection from rank {peer}: {source}")]
    Accept {
        rank: usize,
        peer: usize,
        source: io::Error,
    },
    #[error("rank {rank}: socket {action} with rank {peer} failed: {source}")]
    Socket {
        rank: usize,
        peer: usize,
        action: &'static str,
        source: io::Error,
    },
    #[error("rank {rank}: handshake with expected rank {peer} failed: {reason}")]
    Handshake {
        rank: usize,
        peer: usize,
        reason: String,
    },
    #[error("rank {rank}: sending step {step} to rank {peer} failed: {source}")]
    Send {
        rank: usize,
        peer: usize,
        step: u32,
        source: io::Error,
    },
    #[error("rank {rank}: receiving step {step} from rank {peer} failed: {source}")]
    Recv {
        rank: usize,
        peer: usize,
        step: u32,
        source: io::Error,
    },
    #[error(
        "rank {rank}: rank {peer} is out of step: expected step {expected_step} with \
         {expected_len} bytes, got step {got_step} with {got_len} bytes"
    )]
    Desync {
        rank: usize,
        peer: usize,
        expected_step: u32,
        expected_len: usize,
        got_step: u32,
        got_len: usize,
    },
    #[error("rank {rank}: the thread sending to rank {peer} panicked")]
    SenderPanicked { rank: usize, peer: usize },
    #[error("rank {rank}: an earlier collective failed, the collective is no longer usable")]
    Poisoned { rank: usize },
    #[error("rank {rank}: moving a gradient bucket: {source}")]
    Tensor {
        rank: usize,
        source: candle_core::Error,
    },
    #[error("rank {rank}: NCCL {op} failed: {detail}")]
    Nccl {
        rank: usize,
        op: &'static str,
        detail: String,
    },
    #[error(
        "rank {rank}: the NCCL all-reduce did not finish within {timeout:?} (a rank is gone or \
         stuck); the communicator was aborted"
    )]
    Timeout { rank: usize, timeout: Duration },
}

/// World size 1: nothing to talk to, so the mean is the data itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_buckets(&mut self, _buckets: &mut [Tensor]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

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

    /// Connect into a ring: connect to `peers[(rank+1)%W]`, accept one connection from
    /// `peers[(rank+W-1)%W]` (verified by a handshake of magic bytes, rank and world size, answered
    /// by the same handshake back), set TCP_NODELAY and read/write timeouts of `timeout` so a dead
    /// peer yields an error, never a hang. The outgoing connect is retried with back-off until
    /// `timeout`, because peers start at different times.
    pub fn connect(
        self,
        rank: usize,
        peers: &[String],
        timeout: Duration,
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

        // Connecting first never waits on a peer's accept (the kernel backlog completes it), so
        // every rank can reach its accept and the ring cannot deadlock while forming.
        let mut next = connect_with_backoff(ids(next_rank), &peers[next_rank], deadline)?;
        configure(&next, ids(next_rank), timeout)?;
        send_hello(&mut next, ids(next_rank))?;

        let mut prev = accept_until(&self.listener, ids(prev_rank), deadline)?;
        configure(&prev, ids(prev_rank), timeout)?;
        expect_hello(&mut prev, ids(prev_rank))?;
        // The reply tells the connecting side that its `next` really is the rank it meant.
        send_hello(&mut prev, ids(prev_rank))?;
        expect_hello(&mut next, ids(next_rank))?;

        tracing::debug!(rank, world, "collective ring connected");
        Ok(TcpRing {
            rank,
            world,
            links: Some(Links {
                rank,
                next_rank,
                prev_rank,
                next,
                prev,
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
    next_rank: usize,
    prev_rank: usize,
    next: TcpStream,
    prev: TcpStream,
    /// Counts messages over the ring's life; every rank sends and receives the same sequence, so
    /// a mismatch on receipt means the ranks have drifted apart.
    step: u32,
    /// Reused between steps so a training loop does not allocate per message.
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

impl Links {
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

/// Accept one connection before `deadline`. The listener is polled non-blocking because a plain
/// accept has no timeout and a peer that never starts must not hang this rank.
fn accept_until(
    listener: &TcpListener,
    ids: PeerIds,
    deadline: Instant,
) -> Result<TcpStream, CollectiveError> {
    let accept_error = |source| CollectiveError::Accept {
        rank: ids.rank,
        peer: ids.peer,
        source,
    };
    listener.set_nonblocking(true).map_err(accept_error)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // Some platforms let accepted sockets inherit the listener's non-blocking mode.
                stream.set_nonblocking(false).map_err(accept_error)?;
                return Ok(stream);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let timed_out = io::Error::new(io::ErrorKind::TimedOut, "no peer connected");
                    return Err(accept_error(timed_out));
                }
                thread::sleep(ACCEPT_POLL);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(accept_error(error)),
        }
    }
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

fn send_hello(stream: &mut TcpStream, ids: PeerIds) -> Result<(), CollectiveError> {
    let mut hello = [0u8; HANDSHAKE_LEN];
    hello[..8].copy_from_slice(&MAGIC);
    hello[8..12].copy_from_slice(&handshake_u32(ids.rank, ids)?.to_le_bytes());
    hello[12..].copy_from_slice(&handshake_u32(ids.world, ids)?.to_le_bytes());
    stream
        .write_all(&hello)
        .map_err(|source| CollectiveError::Socket {
            rank: ids.rank,
            peer: ids.peer,
            action: "sending the handshake",
            source,
        })
}

fn handshake_u32(value: usize, ids: PeerIds) -> Result<u32, CollectiveError> {
    u32::try_from(value).map_err(|_| CollectiveError::Config {
        rank: ids.rank,
        reason: format!("{value} does not fit the u32 handshake field"),
    })
}

/// Read the peer's handshake and check it is the rank we expect, in a world of our size.
fn expect_hello(stream: &mut TcpStream, ids: PeerIds) -> Result<(), CollectiveError> {
    let mut hello = [0u8; HANDSHAKE_LEN];
    stream
        .read_exact(&mut hello)
        .map_err(|source| CollectiveError::Socket {
            rank: ids.rank,
            peer: ids.peer,
            action: "receiving the handshake",
            source,
        })?;
    let reject = |reason: String| CollectiveError::Handshake {
        rank: ids.rank,
        peer: ids.peer,
        reason,
    };
    if hello[..8] != MAGIC {
        return Err(reject(
            "wrong magic bytes: not an xkd ring peer".to_string(),
        ));
    }
    let their_rank = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
    let their_world = u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
    if their_rank != ids.peer {
        return Err(reject(format!("the peer says it is rank {their_rank}")));
    }
    if their_world != ids.world {
        return Err(reject(format!(
            "the peer has world size {their_world}, this rank {}",
            ids.world
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};

    /// Socket timeout given to rings in tests: long enough for a loaded machine.
    const RING_TIMEOUT: Duration = Duration::from_secs(10);
    /// Upper bound for a whole multi-rank test, so a bug fails the test instead of hanging it.
    const TEST_DEADLINE: Duration = Duration::from_secs(120);
    const LENGTHS: [usize; 6] = [0, 1, 3, 7, 1000, 100_003];

    fn bind_local() -> RingListener {
        RingListener::bind("127.0.0.1:0").expect("bind on loopback")
    }

    /// Wait for `count` results tagged by rank, failing if they do not all arrive in time.
    fn collect<T>(rx: &mpsc::Receiver<(usize, T)>, count: usize) -> Vec<T> {
        let deadline = Instant::now() + TEST_DEADLINE;
        let mut slots: Vec<Option<T>> = (0..count).map(|_| None).collect();
        for _ in 0..count {
            let left = deadline.saturating_duration_since(Instant::now());
            let (rank, value) = rx
                .recv_timeout(left)
                .expect("a rank hung or panicked before reporting");
            slots[rank] = Some(value);
        }
        slots
            .into_iter()
            .map(|slot| slot.expect("every rank reports once"))
            .collect()
    }

    /// Form a ring of `world` threads on loopback and run `job` on each rank; results by rank.
    fn run_ranks<T, F>(world: usize, timeout: Duration, job: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(usize, TcpRing) -> T + Send + Sync + 'static,
    {
        let listeners: Vec<RingListener> = (0..world).map(|_| bind_local()).collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().to_string())
            .collect();
        let job = Arc::new(job);
        let (tx, rx) = mpsc::channel();
        for (rank, listener) in listeners.into_iter().enumerate() {
            let (tx, job, peers) = (tx.clone(), Arc::clone(&job), peers.clone());
            thread::spawn(move || {
                let ring = listener.connect(rank, &peers, timeout).expect("ring forms");
                let _ = tx.send((rank, job(rank, ring)));
            });
        }
        collect(&rx, world)
    }

    /// Deterministic positive inputs in [0.5, 1.5): positive so the relative-error check is not
    /// dominated by cancellation.
    fn input(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let mut h = ((rank as u64) << 32) ^ (i as u64) ^ 0x9e37_79b9_7f4a_7c15;
                h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                h ^= h >> 31;
                0.5 + (h >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    fn assert_mean(world: usize, len: usize, results: &[Vec<f32>]) {
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
        for (i, got) in results[0].iter().enumerate() {
            let want = inputs.iter().map(|x| f64::from(x[i])).sum::<f64>() / world as f64;
            let error = (f64::from(*got) - want).abs();
            assert!(
                error <= 1e-6 * want.abs(),
                "W={world} len={len} i={i}: got {got}, want {want}"
            );
        }
        for (rank, result) in results.iter().enumerate() {
            assert_eq!(result.len(), len);
            assert_eq!(
                bits(result),
                bits(&results[0]),
                "W={world} len={len}: rank {rank} differs from rank 0"
            );
        }
    }

    fn reduce_on_ring(world: usize, len: usize) -> Vec<Vec<f32>> {
        run_ranks(world, RING_TIMEOUT, move |rank, mut ring| {
            let mut data = input(rank, len);
            ring.all_reduce_mean(&mut data).expect("all-reduce");
            data
        })
    }

    #[test]
    fn chunks_cover_the_buffer_and_differ_by_at_most_one() {
        for world in 1..=5 {
            for len in [0, 1, 2, 3, 4, 7, 11, 1000] {
                let ranges: Vec<Range<usize>> =
                    (0..world).map(|i| chunk_range(len, world, i)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[world - 1].end, len);
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min(), sizes.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{sizes:?}");
            }
        }
    }

    #[test]
    fn solo_is_the_identity() {
        let mut solo = Solo;
        let mut data = vec![1.5f32, -2.0, 3.25];
        let before = data.as_ptr();
        solo.all_reduce_mean(&mut data).expect("solo all-reduce");
        solo.barrier().expect("solo barrier");
        assert_eq!(data, [1.5, -2.0, 3.25]);
        assert_eq!(data.as_ptr(), before);
        assert_eq!((solo.rank(), solo.world_size()), (0, 1));
    }

    #[test]
    fn ring_of_one_needs_no_sockets() {
        let listener = bind_local();
        // The peer address is never dialled in a world of one.
        let peers = vec!["unreachable.invalid:1".to_string()];
        let mut ring = listener
            .connect(0, &peers, RING_TIMEOUT)
            .expect("ring of one");
        let mut data = input(0, 7);
        let expected = data.clone();
        ring.all_reduce_mean(&mut data).expect("all-reduce");
        ring.barrier().expect("barrier");
        assert_eq!(bits(&data), bits(&expected));
        assert_eq!((ring.rank(), ring.world_size()), (0, 1));
    }

    #[test]
    fn all_reduce_matches_the_f64_mean_on_every_rank() {
        for world in 1..=4 {
            for len in LENGTHS {
                assert_mean(world, len, &reduce_on_ring(world, len));
            }
        }
    }

    #[test]
    fn repeated_runs_are_bit_identical() {
        let len = 10_007;
        let world = 3;
        // Twice on the same ring, and once more on a fresh ring.
        let twice = run_ranks(world, RING_TIMEOUT, move |rank, mut ring| {
            let mut first = input(rank, len);
            let mut second = input(rank, len);
            ring.all_reduce_mean(&mut first).expect("first all-reduce");
            ring.all_reduce_mean(&mut second)
                .expect("second all-reduce");
            (first, second)
        });
        let fresh = reduce_on_ring(world, len);
        for ((first, second), again) in twice.iter().zip(&fresh) {
            assert_eq!(bits(first), bits(second));
            assert_eq!(bits(first), bits(again));
        }
    }

    #[test]
    fn barrier_waits_for_every_rank() {
        for world in 1..=4 {
            let arrived = Arc::new(AtomicUsize::new(0));
            let counter = Arc::clone(&arrived);
            let seen = run_ranks(world, RING_TIMEOUT, move |rank, mut ring| {
                // Staggered arrival makes a barrier that does not wait visibly wrong.
                thread::sleep(Duration::from_millis(30 * rank as u64));
                counter.fetch_add(1, Ordering::SeqCst);
                ring.barrier().expect("barrier");
                let seen = counter.load(Ordering::SeqCst);
                ring.barrier().expect("second barrier");
                seen
            });
            assert!(seen.iter().all(|&n| n == world), "W={world}: {seen:?}");
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let timeout = Duration::from_secs(2);
        let outcomes = run_ranks(3, timeout, move |rank, mut ring| {
            ring.barrier().expect("barrier while everyone is alive");
            if rank == 2 {
                drop(ring);
                return None;
            }
            let started = Instant::now();
            let mut data = input(rank, 100_003);
            let result = ring.all_reduce_mean(&mut data);
            let elapsed = started.elapsed();
            let after = ring.barrier();
            Some((result, elapsed, after))
        });
        for (rank, outcome) in outcomes.into_iter().enumerate().take(2) {
            let (result, elapsed, after) = outcome.expect("surviving rank reports");
            let error = result.expect_err("all-reduce with a dead peer must fail");
            // Generous bound: each blocked call gives up after one socket timeout.
            assert!(
                elapsed < timeout * 4,
                "rank {rank} took {elapsed:?}: {error}"
            );
            assert!(
                matches!(after, Err(CollectiveError::Poisoned { .. })),
                "rank {rank}: {after:?}"
            );
        }
    }

    #[test]
    fn mismatched_lengths_are_an_error() {
        let results = run_ranks(2, Duration::from_secs(2), |rank, mut ring| {
            let mut data = input(rank, 5 + rank);
            ring.all_reduce_mean(&mut data)
        });
        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(CollectiveError::Desync { .. }))),
            "{results:?}"
        );
    }

    #[test]
    fn handshake_rejects_a_stranger() {
        let ring_listener = bind_local();
        let stranger = TcpListener::bind("127.0.0.1:0").expect("bind stranger");
        let peers = vec![
            ring_listener.local_addr().to_string(),
            stranger.local_addr().expect("stranger addr").to_string(),
        ];
        let target = ring_listener.local_addr();
        // The stranger accepts rank 0's connection and dials in with garbage.
        let imposter = thread::spawn(move || {
            let accepted = stranger.accept().expect("stranger accepts");
            let mut stream = TcpStream::connect(target).expect("stranger connects");
            stream
                .write_all(b"GET / HTTP/1.1\r\n")
                .expect("stranger writes");
            (accepted, stream)
        });
        let result = ring_listener.connect(0, &peers, Duration::from_secs(5));
        assert!(
            matches!(
                result,
                Err(CollectiveError::Handshake {
                    rank: 0,
                    peer: 1,
                    ..
                })
            ),
            "{result:?}"
        );
        drop(imposter.join());
    }

    #[test]
    fn connect_retries_until_the_peer_binds() {
        // Reserve a free port, release it, and bind rank 1 there only after rank 0 started.
        let late_addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("reserve a port");
        let early = bind_local();
        let peers = vec![early.local_addr().to_string(), late_addr.to_string()];
        let (tx, rx) = mpsc::channel();
        let early_peers = peers.clone();
        let early_tx = tx.clone();
        thread::spawn(move || {
            let result = early
                .connect(0, &early_peers, RING_TIMEOUT)
                .map(|mut ring| {
                    let mut data = input(0, 3);
                    ring.all_reduce_mean(&mut data).map(|()| data)
                });
            let _ = early_tx.send((0, result));
        });
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let late = RingListener::bind(&late_addr.to_string()).expect("late bind");
            let result = late.connect(1, &peers, RING_TIMEOUT).map(|mut ring| {
                let mut data = input(1, 3);
                ring.all_reduce_mean(&mut data).map(|()| data)
            });
            let _ = tx.send((1, result));
        });
        let results: Vec<Vec<f32>> = collect(&rx, 2)
            .into_iter()
            .map(|r| r.expect("ring forms").expect("all-reduce"))
            .collect();
        assert_mean(2, 3, &results);
    }

    #[test]
    fn bad_configuration_is_rejected() {
        let peers = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let out_of_range = bind_local().connect(2, &peers, RING_TIMEOUT);
        assert!(matches!(out_of_range, Err(CollectiveError::Config { .. })));
        let no_timeout = bind_local().connect(0, &peers, Duration::ZERO);
        assert!(matches!(no_timeout, Err(CollectiveError::Config { .. })));
        let empty = bind_local().connect(0, &[], RING_TIMEOUT);
        assert!(matches!(empty, Err(CollectiveError::Config { .. })));
    }
}
