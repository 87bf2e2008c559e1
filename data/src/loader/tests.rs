use super::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A value that depends only on its key; 10 bytes as weighed.
fn value(key: &u32) -> anyhow::Result<Vec<u32>> {
    match key {
        13 => anyhow::bail!("clip 13 is broken"),
        14 => panic!("clip 14 panicked"),
        k => Ok((0..*k % 7 + 1)
            .map(|i| k.wrapping_mul(2654435761) ^ i)
            .collect()),
    }
}

fn weigh(_: &Vec<u32>) -> u64 {
    10
}

/// Polls `done` until it holds; fails (never times) after a minute of not holding.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(60), "never: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `value`, counting its calls.
fn counted(loads: &Arc<AtomicU64>) -> impl Fn(&u32) -> anyhow::Result<Vec<u32>> {
    let loads = loads.clone();
    move |k| {
        loads.fetch_add(1, Ordering::SeqCst);
        value(k)
    }
}

#[test]
fn prefetched_values_equal_loaded_ones_and_are_taken_without_loading_again() {
    let sync = Loader::new(0, 1000, value, weigh);
    let ahead = Loader::new(2, 1000, value, weigh);
    let keys: Vec<u32> = (0..12).collect();
    ahead.prefetch(keys.clone());
    eventually("12 keys made ahead", || {
        keys.iter().all(|k| ahead.is_held(k))
    });
    for k in &keys {
        assert_eq!(ahead.get(k).unwrap(), sync.get(k).unwrap(), "key {k}");
    }
    let stats = ahead.stats();
    assert_eq!((stats.misses, stats.ahead, stats.prefetched), (0, 12, 12));
    // Asked again, they are hits.
    assert_eq!(ahead.get(&3).unwrap(), sync.get(&3).unwrap());
    assert_eq!(ahead.stats().hits, 1);
    assert_eq!(sync.stats().misses, 12);
}

#[test]
fn background_failures_and_panics_surface_on_the_caller() {
    let loader = Loader::new(2, 1000, value, weigh);
    loader.prefetch([13, 14, 1]);
    eventually("three loads", || loader.stats().prefetched == 3);
    let e = format!("{:#}", loader.get(&13).unwrap_err());
    assert!(e.contains("clip 13 is broken"), "{e}");
    let e = format!("{:#}", loader.get(&14).unwrap_err());
    assert!(e.contains("panicked") && e.contains("clip 14"), "{e}");
    assert_eq!(loader.get(&1).unwrap().len(), 2);
    // Without threads the same errors come from the caller's own load.
    let sync = Loader::new(0, 1000, value, weigh);
    assert!(format!("{:#}", sync.get(&13).unwrap_err()).contains("broken"));
    assert!(format!("{:#}", sync.get(&14).unwrap_err()).contains("clip 14"));
}

/// What a training step sees: the current batch taken and in hand (its forward runs), the
/// next batch already being made on the loader's threads, and ready when asked for.
#[test]
fn the_next_batch_is_made_on_the_loader_threads_while_the_current_one_is_in_hand() {
    // Loads of the next batch (keys from 100) wait at a gate the test opens, so it can see
    // them under way while the current batch is in hand.
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let started = Arc::new(Mutex::new(Vec::<(u32, String)>::new()));
    let (g, s) = (gate.clone(), started.clone());
    let load = move |k: &u32| {
        if *k >= 100 {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            s.lock().unwrap().push((*k, name));
            let (open, opened) = &*g;
            let mut open = open.lock().unwrap();
            while !*open {
                open = opened.wait(open).unwrap();
            }
        }
        value(k)
    };
    // No cache at all: prefetching must not need one.
    let loader = Loader::new(2, 0, load, weigh);
    let current = [1u32, 2, 3, 4];
    let next = [101u32, 102, 103, 104];
    loader.prefetch(current.iter().chain(&next).copied());
    let in_hand: Vec<Arc<Vec<u32>>> = current.iter().map(|k| loader.get(k).unwrap()).collect();
    eventually("both threads making the next batch", || {
        started.lock().unwrap().len() == 2
    });
    for (k, thread) in started.lock().unwrap().iter() {
        assert!(next.contains(k), "{k}");
        assert!(
            thread.starts_with("xkd-loader-"),
            "clip {k} made on {thread}"
        );
    }
    let before = loader.stats();
    {
        let (open, opened) = &*gate;
        *open.lock().unwrap() = true;
        opened.notify_all();
    }
    eventually("the next batch made", || {
        next.iter().all(|k| loader.is_held(k))
    });
    for k in &next {
        assert_eq!(*loader.get(k).unwrap(), value(k).unwrap());
    }
    let after = loader.stats();
    assert_eq!(
        (after.ahead - before.ahead, after.misses - before.misses),
        (4, 0),
        "{after:?}"
    );
    let made_on = started.lock().unwrap();
    assert_eq!(made_on.len(), 4);
    assert!(made_on.iter().all(|(_, t)| t.starts_with("xkd-loader-")));
    for (k, v) in current.iter().zip(&in_hand) {
        assert_eq!(**v, value(k).unwrap());
    }
}

/// Steps of 4 clips over 40 (so clips come back in later epochs), the window the current
/// step and the next two: the loader never holds more than the budget plus the window's 12
/// values, and its cache alone never more than the budget.
#[test]
fn memory_stays_within_the_budget_plus_the_window() {
    const WINDOW_BYTES: u64 = 12 * 10;
    // Clips 20 to 59: `value` breaks 13 and 14 on purpose.
    let step_keys = |s: u32| {
        (4 * s..4 * s + 4)
            .map(|k| 20 + k % 40)
            .collect::<Vec<u32>>()
    };
    for budget in [0, 35, 1000] {
        let loads = Arc::new(AtomicU64::new(0));
        let loader = Loader::new(2, budget, counted(&loads), weigh);
        let within = |when: &str| {
            let (bytes, cached) = (loader.bytes(), loader.cache_bytes());
            assert!(
                bytes <= budget + WINDOW_BYTES && cached <= budget,
                "budget {budget}, {when}: {bytes} bytes held, {cached} cached"
            );
        };
        for s in 0..30 {
            loader.prefetch((s..s + 3).flat_map(step_keys));
            within(&format!("step {s} named"));
            for k in step_keys(s) {
                assert_eq!(*loader.get(&k).unwrap(), value(&k).unwrap());
                within(&format!("clip {k} of step {s} taken"));
            }
        }
        loader.prefetch([]);
        assert!(loader.bytes() <= budget, "budget {budget}");
        // A budget that holds all 40 clips makes each once; smaller ones make some again.
        let made = loads.load(Ordering::SeqCst);
        if budget >= 400 {
            assert_eq!(made, 40);
        } else {
            assert!(made > 40, "budget {budget}: {made} loads");
        }
    }
}

/// The window's values stay whatever the budget, so every model of a step reads its batch
/// from one load; out of the window, a zero budget keeps nothing.
#[test]
fn a_window_value_is_made_once_whatever_the_budget() {
    let loads = Arc::new(AtomicU64::new(0));
    let loader = Loader::new(0, 0, counted(&loads), weigh);
    loader.prefetch([5, 6]);
    for k in [5, 5, 6, 5, 6] {
        loader.get(&k).unwrap();
    }
    assert_eq!((loads.load(Ordering::SeqCst), loader.bytes()), (2, 20));
    loader.prefetch([6]);
    assert_eq!(loader.bytes(), 10);
    loader.get(&6).unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    loader.prefetch([]);
    assert_eq!(loader.bytes(), 0);
    loader.get(&6).unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 3);
}
