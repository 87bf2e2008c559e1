//! A slow, lossy switch for tests, in place of the hub's bridge (this machine's kernel has no
//! netem): raw Ethernet frames (`AF_PACKET`) read from each port in the hub's namespace and
//! written to the port their destination address was last seen on (every other port for
//! broadcasts and unknown addresses), as a learning switch does. What it models, per frame and
//! for every protocol alike (UDP, so QUIC; TCP, so the gradient ring and the S3 store; ARP):
//! - delay: each frame is held 20-50 ms (drawn per frame) before it leaves the switch, so a
//!   round trip between two hosts takes 40-100 ms; frames leaving by one port keep their order
//!   (a frame never overtakes an earlier one), so there is no reordering, only delay and loss;
//! - loss: each frame is dropped with probability `loss`, drawn from a seeded generator.
//!   TCP sees real loss and retransmits (fast retransmit, or its timeout of at least 200 ms);
//!   QUIC recovers by its own loss detection.
//!
//! Not modelled: jitter that reorders, duplication, corruption, bandwidth limits. Frames must
//! be plain (hosts' `eth0` have `gso_max_segs 1`, netns.rs): the relay rewrites the TCP and
//! UDP checksums of IPv4 packets, since a veth leaves them to an offload that never runs when a
//! frame crosses a raw socket. Threads and libc sockets only; stopped on drop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the links misbehave.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Probability that a frame is dropped.
    pub loss: f64,
    pub seed: u64,
}

/// What passed the switch, by protocol.
#[derive(Default, Debug)]
pub struct Counts {
    pub tcp_forwarded: AtomicU64,
    pub tcp_dropped: AtomicU64,
    pub udp_forwarded: AtomicU64,
    pub udp_dropped: AtomicU64,
    pub other_forwarded: AtomicU64,
    pub other_dropped: AtomicU64,
    /// Frames the kernel refused to send (too large: an offload was left on).
    pub send_errors: AtomicU64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "tcp {} forwarded, {} dropped; udp {} forwarded, {} dropped; other {} forwarded, \
             {} dropped; {} send errors",
            n(&self.tcp_forwarded),
            n(&self.tcp_dropped),
            n(&self.udp_forwarded),
            n(&self.udp_dropped),
            n(&self.other_forwarded),
            n(&self.other_dropped),
            n(&self.send_errors)
        )
    }
}

/// A running relay; its threads end on drop.
pub struct Relay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counts: Arc<Counts>,
}

/// A frame on its way out of a port, and when it may leave.
type Queued = (Instant, Vec<u8>);

impl Relay {
    /// Switches between `ports`: raw sockets, one per port, opened in the caller's thread's
    /// network namespace (call it inside the hub's: `Network::within_hub`).
    pub fn start(ports: &[String], shape: Shape) -> Relay {
        let sockets: Vec<Arc<OwnedFd>> = ports.iter().map(|p| Arc::new(open(p))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let table = Arc::new(Mutex::new(HashMap::<[u8; 6], usize>::new()));
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        for socket in &sockets {
            let (tx, rx) = channel::<Queued>();
            queues.push(tx);
            let (socket, stop, counts) = (socket.clone(), stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || {
                send_loop(&socket, rx, &stop, &counts)
            }));
        }
        for (port, socket) in sockets.iter().enumerate() {
            let ingress = Ingress {
                port,
                socket: socket.clone(),
                queues: queues.clone(),
                table: table.clone(),
                shape,
                rng: shape.seed ^ (port as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                last_due: vec![Instant::now(); queues.len()],
            };
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || ingress.run(&stop, &counts)));
        }
        Relay {
            stop,
            threads,
            counts,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One port's incoming side: reads frames, drops or delays them, queues them out.
struct Ingress {
    port: usize,
    socket: Arc<OwnedFd>,
    queues: Vec<Sender<Queued>>,
    table: Arc<Mutex<HashMap<[u8; 6], usize>>>,
    shape: Shape,
    rng: u64,
    /// When the last frame this port queued to each port leaves: a later one never leaves
    /// before it.
    last_due: Vec<Instant>,
}

impl Ingress {
    fn run(mut self, stop: &AtomicBool, counts: &Counts) {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let Some(n) = receive(&self.socket, &mut buf) else {
                continue;
            };
            if n < 14 {
                continue;
            }
            let frame = &mut buf[..n];
            let (forwarded, dropped) = counters(frame, counts);
            if self.draw() < self.shape.loss {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            fix_checksums(frame);
            forwarded.fetch_add(1, Ordering::Relaxed);
            self.forward(frame);
        }
    }

    /// Learns where the source is; queues the frame to its destination's port or floods it.
    fn forward(&mut self, frame: &[u8]) {
        let dst: [u8; 6] = frame[0..6].try_into().unwrap();
        let src: [u8; 6] = frame[6..12].try_into().unwrap();
        let out = {
            let mut table = self.table.lock().unwrap();
            table.insert(src, self.port);
            table.get(&dst).copied()
        };
        let delay = self.delay();
        let targets: Vec<usize> = match out {
            Some(p) if p != self.port => vec![p],
            Some(_) => Vec::new(),
            None => (0..self.queues.len()).filter(|&p| p != self.port).collect(),
        };
        for p in targets {
            let due = (Instant::now() + delay).max(self.last_due[p]);
            self.last_due[p] = due;
            let _ = self.queues[p].send((due, frame.to_vec()));
        }
    }

    /// A uniform draw in [0, 1).
    fn draw(&mut self) -> f64 {
        (xkd_protocol::splitmix64(&mut self.rng) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn delay(&mut self) -> Duration {
        let span = self.shape.max_delay - self.shape.min_delay;
        self.shape.min_delay + span.mul_f64(self.draw())
    }
}

/// The counters a frame falls under: (forwarded, dropped).
fn counters<'a>(frame: &[u8], c: &'a Counts) -> (&'a AtomicU64, &'a AtomicU64) {
    match ipv4_protocol(frame) {
        Some(6) => (&c.tcp_forwarded, &c.tcp_dropped),
        Some(17) => (&c.udp_forwarded, &c.udp_dropped),
        _ => (&c.other_forwarded, &c.other_dropped),
    }
}

/// One port's outgoing side: sends each queued frame when it is due.
fn send_loop(socket: &OwnedFd, rx: Receiver<Queued>, stop: &AtomicBool, counts: &Counts) {
    while !stop.load(Ordering::Relaxed) {
        let (due, frame) = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(q) => q,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // SAFETY: a valid socket and a buffer of frame.len() bytes.
        let sent = unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if sent < 0 {
            counts.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

const ETH_P_ALL: u16 = 0x0003;

/// A raw socket on interface `name` that reads every frame arriving there and sends to it;
/// reads time out every 100 ms so the thread can see it should stop.
fn open(name: &str) -> OwnedFd {
    let index = super::netns::interface_index(name);
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: addr is a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "binding to {name}: {}",
        std::io::Error::last_os_error()
    );
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    socket
}

/// The next frame that arrived at the port (not one the relay itself sent out of it), or
/// None after the read timeout.
fn receive(socket: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: sockaddr_ll is plain data; all zero is a valid value.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: buf and from are valid for the sizes given.
    let n = unsafe {
        libc::recvfrom(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut from as *mut libc::sockaddr_ll).cast(),
            &mut len,
        )
    };
    (n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING).then_some(n as usize)
}

/// The IP protocol of an IPv4 frame (6 TCP, 17 UDP), if it is one.
fn ipv4_protocol(frame: &[u8]) -> Option<u8> {
    (frame.len() >= 34 && frame[12..14] == [0x08, 0x00]).then(|| frame[23])
}

/// Writes the TCP or UDP checksum of an unfragmented IPv4 frame.
fn fix_checksums(frame: &mut [u8]) {
    let Some(protocol) = ipv4_protocol(frame) else {
        return;
    };
    let ip = &frame[14..];
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let fragmented = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let field = match protocol {
        6 => 16,
        17 => 6,
        _ => return,
    };
    if fragmented || header < 20 || total > ip.len() || total < header + field + 2 {
        return;
    }
    let (src, dst) = (ip[12..16].to_vec(), ip[16..20].to_vec());
    let segment = &mut frame[14 + header..14 + total];
    segment[field..field + 2].copy_from_slice(&[0, 0]);
    let mut sum: u32 = 0;
    for pair in src.chunks(2).chain(dst.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum += u32::from(protocol) + segment.len() as u32;
    for pair in segment.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        sum += hi | pair.get(1).copied().map_or(0, u32::from);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut checksum = !(sum as u16);
    if protocol == 17 && checksum == 0 {
        checksum = 0xffff;
    }
    segment[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
}
