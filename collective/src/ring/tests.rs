use super::*;
use crate::Solo;
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
