use super::*;
use crate::Solo;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Socket timeout given to rings in tests: long enough for a loaded machine.
const RING_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for a whole multi-rank test, so a bug fails the test instead of hanging it.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
const LENGTHS: [usize; 6] = [0, 1, 3, 7, 1000, 100_003];

/// The key every rank of the tests' run holds.
fn run_key() -> RingKey {
    RingKey::from_token("the run's join token")
}

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
            let ring = listener
                .connect(rank, &peers, timeout, &run_key())
                .expect("ring forms");
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
        .connect(0, &peers, RING_TIMEOUT, &run_key())
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
fn a_barrier_within_waits_past_the_timeout_and_then_the_timeout_applies_again() {
    let timeout = Duration::from_secs(1);
    let late = Duration::from_secs(3);
    let outcomes = run_ranks(2, timeout, move |rank, mut ring| {
        if rank == 1 {
            thread::sleep(late);
        }
        let setup = ring.barrier_within(Duration::from_secs(30));
        if rank == 1 {
            thread::sleep(late);
        }
        let step = ring.all_reduce_mean(&mut [rank as f32]);
        (setup.map_err(|e| e.to_string()), step.is_err())
    });
    for (rank, (setup, step_failed)) in outcomes.iter().enumerate() {
        assert!(setup.is_ok(), "rank {rank}: {setup:?}");
        // Rank 0 waits 3 s for a step under a 1 s timeout: the barrier's limit is gone.
        assert!(
            *step_failed,
            "rank {rank}: the step outlived the collective timeout"
        );
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
            .connect(0, &early_peers, RING_TIMEOUT, &run_key())
            .map(|mut ring| {
                let mut data = input(0, 3);
                ring.all_reduce_mean(&mut data).map(|()| data)
            });
        let _ = early_tx.send((0, result));
    });
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        let late = RingListener::bind(&late_addr.to_string()).expect("late bind");
        let result = late
            .connect(1, &peers, RING_TIMEOUT, &run_key())
            .map(|mut ring| {
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
    let key = run_key();
    let out_of_range = bind_local().connect(2, &peers, RING_TIMEOUT, &key);
    assert!(matches!(out_of_range, Err(CollectiveError::Config { .. })));
    let no_timeout = bind_local().connect(0, &peers, Duration::ZERO, &key);
    assert!(matches!(no_timeout, Err(CollectiveError::Config { .. })));
    let empty = bind_local().connect(0, &[], RING_TIMEOUT, &key);
    assert!(matches!(empty, Err(CollectiveError::Config { .. })));
}

/// What the threads that form rings log, for the tests that look for a line.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }

    /// Runs `f` with this log as the thread's subscriber (the ring's helper threads inherit it).
    fn capture<T>(&self, f: impl FnOnce() -> T) -> T {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f)
    }

    /// The one line about connections from `addr`.
    fn line_about(&self, addr: SocketAddr) -> String {
        let text = self.text();
        let needle = format!("peer={addr}");
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&needle)).collect();
        assert_eq!(lines.len(), 1, "one line about {addr} in:\n{text}");
        lines[0].to_string()
    }
}

impl io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Log {
    type Writer = Log;

    fn make_writer(&'a self) -> Log {
        self.clone()
    }
}

const SMALL: usize = 1000;

/// Rank `rank` on its own thread, logging into `log`: it forms its ring under `key` and sends
/// back its all-reduce of `input(rank, SMALL)`, or the error that kept the ring from forming.
fn start_rank(
    rank: usize,
    listener: RingListener,
    peers: &[String],
    (key, timeout): (RingKey, Duration),
    log: &Log,
    tx: &mpsc::Sender<(usize, Result<Vec<f32>, CollectiveError>)>,
) {
    let (peers, log, tx) = (peers.to_vec(), log.clone(), tx.clone());
    thread::spawn(move || {
        let result = log
            .capture(|| listener.connect(rank, &peers, timeout, &key))
            .and_then(|mut ring| {
                let mut data = input(rank, SMALL);
                ring.all_reduce_mean(&mut data).map(|()| data)
            });
        let _ = tx.send((rank, result));
    });
}

/// Whether `stream` is closed by the other side within `limit` without a byte from it: a
/// clean close, or a reset (closing with unread bytes sends one).
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Result<(), String> {
    stream.set_read_timeout(Some(limit)).expect("read timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
        Ok(_) => Err("the ring answered a stranger".into()),
        Err(e) => Err(format!("still open after {limit:?}: {e}")),
    }
}

/// Connects to `target`, sends `bytes` and checks the connection is dropped; its address.
fn refused(target: SocketAddr, bytes: &[u8]) -> SocketAddr {
    let mut stream = TcpStream::connect(target).expect("stranger connects");
    stream.write_all(bytes).expect("stranger writes");
    closed_within(&mut stream, RING_TIMEOUT).expect("the stranger is dropped");
    stream.local_addr().expect("stranger's address")
}

#[test]
fn connections_without_the_token_are_dropped_and_logged_and_the_ring_still_forms() {
    let world = 3;
    let mut listeners: Vec<Option<RingListener>> = (0..world).map(|_| Some(bind_local())).collect();
    let peers: Vec<String> = listeners
        .iter()
        .flatten()
        .map(|l| l.local_addr().to_string())
        .collect();
    let target = listeners[1]
        .as_ref()
        .expect("rank 1's listener")
        .local_addr();
    let (log, (tx, rx)) = (Log::default(), mpsc::channel());
    let honest = (run_key(), RING_TIMEOUT);
    // Rank 1 accepts first, so every stranger below reaches it before rank 0 does.
    for rank in [1, 2] {
        let listener = listeners[rank].take().expect("listener");
        start_rank(rank, listener, &peers, honest.clone(), &log, &tx);
    }

    // One that says nothing, left open while the ring forms: it must hold up nothing.
    let mut silent = TcpStream::connect(target).expect("silent stranger connects");
    let garbage = refused(target, b"GET / HTTP/1.1\r\nHost: ring\r\n\r\n");
    let mut old_hello = b"XKDRING1".to_vec();
    old_hello.extend(0u32.to_le_bytes());
    old_hello.extend(3u32.to_le_bytes());
    let old_worker = refused(target, &old_hello);
    // The whole handshake as rank 0, but under another run's token.
    let mut forged = TcpStream::connect(target).expect("forger connects");
    forged
        .set_read_timeout(Some(RING_TIMEOUT))
        .expect("timeout");
    let ids = PeerIds {
        rank: 0,
        peer: 1,
        world,
    };
    let other_run = RingKey::from_token("another run's token");
    let deadline = Instant::now() + RING_TIMEOUT;
    let error = handshake::connector(&mut forged, ids, &other_run, deadline)
        .expect_err("a listener of this run refuses another run's proof");
    assert!(
        error.to_string().contains("instead of answering"),
        "{error}"
    );

    let listener = listeners[0].take().expect("rank 0's listener");
    start_rank(0, listener, &peers, honest, &log, &tx);
    let results: Vec<Vec<f32>> = collect(&rx, world)
        .into_iter()
        .map(|r| r.expect("the ring forms and all-reduces"))
        .collect();
    assert_mean(world, SMALL, &results);

    let expected = [
        (
            garbage,
            "not an xkd ring peer: its first bytes are \"GET / HT\"",
        ),
        (
            old_worker,
            "unauthenticated handshake of an older xkd worker",
        ),
        (forged.local_addr().expect("addr"), "wrong MAC"),
    ];
    for (addr, reason) in expected {
        let line = log.line_about(addr);
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("ring connection refused"), "{line}");
        assert!(line.contains(reason), "{reason:?} in {line}");
    }
    // The silent one is dropped too, once its handshake's time is up.
    closed_within(&mut silent, handshake::HANDSHAKE_LIMIT + RING_TIMEOUT)
        .expect("the silent one is dropped");
    let line = log.line_about(silent.local_addr().expect("addr"));
    assert!(line.contains("did not come within"), "{line}");
}

#[test]
fn a_rank_with_another_token_cannot_join_the_ring() {
    let world = 3;
    let timeout = Duration::from_secs(3);
    let listeners: Vec<RingListener> = (0..world).map(|_| bind_local()).collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    let (log, (tx, rx)) = (Log::default(), mpsc::channel());
    let started = Instant::now();
    for (rank, listener) in listeners.into_iter().enumerate() {
        let token = if rank == 2 {
            "a stale token"
        } else {
            "the run's join token"
        };
        let key = (RingKey::from_token(token), timeout);
        start_rank(rank, listener, &peers, key, &log, &tx);
    }
    let results = collect(&rx, world);
    assert!(started.elapsed() < timeout * 3, "{:?}", started.elapsed());
    // Rank 1 dials rank 2 and rank 2 dials rank 0: each is refused, by whichever refusal
    // comes first (the others then see their peer give up, in an order that varies).
    let errors: Vec<&CollectiveError> = results
        .iter()
        .map(|r| r.as_ref().map(|_| ()).expect_err("no ring forms"))
        .collect();
    assert!(
        matches!(
            errors[1],
            CollectiveError::Handshake {
                rank: 1,
                peer: 2,
                ..
            }
        ),
        "{}",
        errors[1]
    );
    assert!(
        matches!(
            errors[2],
            CollectiveError::Handshake {
                rank: 2,
                peer: 0,
                ..
            }
        ),
        "{}",
        errors[2]
    );
    let text = log.text();
    assert!(text.contains("wrong MAC"), "{text}");
}

#[test]
fn a_listener_without_the_token_cannot_pose_as_the_next_rank() {
    // One stranger answers with a well-formed hello and a made-up tag; the other speaks the
    // handshake under another run's token.
    let made_up = |stream: &mut TcpStream| {
        let mut hello = [0u8; 48];
        stream.read_exact(&mut hello).expect("rank 0's hello");
        let mut reply = b"XKDRING2".to_vec();
        reply.extend(1u32.to_le_bytes());
        reply.extend(2u32.to_le_bytes());
        reply.extend([0x42; 32]);
        stream.write_all(&reply).expect("hello back");
        let mut tag = [0u8; 32];
        stream.read_exact(&mut tag).expect("rank 0's tag");
        stream.write_all(&[0x5a; 32]).expect("made-up tag");
    };
    let other_run = |stream: &mut TcpStream| {
        let ids = PeerIds {
            rank: 1,
            peer: 0,
            world: 2,
        };
        let key = RingKey::from_token("another run's token");
        let deadline = Instant::now() + RING_TIMEOUT;
        let refused = handshake::acceptor(stream, ids, &key, deadline);
        assert!(refused.is_err_and(|r| r.contains("wrong MAC")));
    };
    type Stranger = fn(&mut TcpStream);
    let strangers: [(Stranger, &str); 2] = [
        (made_up, "does not prove the run's join token"),
        (other_run, "instead of answering"),
    ];
    for (stranger, reason) in strangers {
        let ring_listener = bind_local();
        let impostor = TcpListener::bind("127.0.0.1:0").expect("bind impostor");
        let peers = vec![
            ring_listener.local_addr().to_string(),
            impostor.local_addr().expect("impostor addr").to_string(),
        ];
        let answering = thread::spawn(move || {
            let (mut stream, _) = impostor.accept().expect("impostor accepts");
            stranger(&mut stream);
        });
        let started = Instant::now();
        let result = ring_listener.connect(0, &peers, RING_TIMEOUT, &run_key());
        // The failed connecting half ends the accepting half too, long before the timeout.
        assert!(started.elapsed() < RING_TIMEOUT, "{:?}", started.elapsed());
        match result {
            Err(CollectiveError::Handshake {
                rank: 0,
                peer: 1,
                reason: got,
            }) => assert!(got.contains(reason), "{reason:?} in {got}"),
            other => panic!("{reason}: {other:?}"),
        }
        answering.join().expect("the impostor's thread");
    }
}
