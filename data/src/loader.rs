//! A prefetching loader over a byte-bounded cache: what a rank reads its clips through.
//!
//! The training thread knows which clips its next steps draw (the shard plan is a pure
//! function of the step), so before each step it names the keys of that step and the next few
//! (`prefetch`: the *window*), and background threads make them (decode, features, a model's
//! processor) while the step computes. `get` then takes a value made ahead, waits for one being
//! made, finds one in the cache, or makes it on the calling thread when no thread has started
//! it. A value is the same whichever thread made it: the load function is the only thing that
//! makes one.
//!
//! Memory: the window's values are held whatever the budget until a later `prefetch` no longer
//! names them, so neither the batch in hand (which every model of a step reads) nor one made
//! ahead is ever dropped and made twice. Values leaving the window join an `Lru` of `budget`
//! bytes, where a clip drawn again (a later epoch, another task) is found. So the loader holds
//! at most `budget` plus the window's values (and the values its threads are making); a value
//! a caller holds (`Arc`) lives until the caller drops it.
//!
//! Errors: a failed background load is kept until its key is asked for (or leaves the window),
//! and `get` returns it there, on the calling thread. A panicking load becomes an error the
//! same way.

use crate::cache::Lru;
use anyhow::anyhow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

type LoadFn<K, V> = dyn Fn(&K) -> anyhow::Result<V> + Send + Sync;

/// Makes values by key on background threads ahead of use, keeping used ones within a byte
/// budget.
pub struct Loader<K, V> {
    shared: Arc<Shared<K, V>>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared<K, V> {
    state: Mutex<State<K, V>>,
    /// A load finished (or failed): `get` may find its key.
    loaded: Condvar,
    /// Keys were queued, or the loader is closing: a thread may start a load.
    work: Condvar,
    load: Box<LoadFn<K, V>>,
    weigh: fn(&V) -> u64,
}

struct State<K, V> {
    /// Values used before and no longer in the window, within the budget.
    cache: Lru<K, Arc<V>>,
    /// The keys the last `prefetch` named.
    window: HashSet<K>,
    /// Values of window keys, made ahead or on `get`, held until the window leaves them.
    held: HashMap<K, Held<V>>,
    /// What `held` weighs.
    held_bytes: u64,
    /// Window keys no thread has started, in the order they will be needed.
    queue: VecDeque<K>,
    /// Being made by some thread.
    loading: HashSet<K>,
    /// Background loads of window keys that failed, until their key is asked for.
    failed: HashMap<K, anyhow::Error>,
    closed: bool,
    stats: Stats,
}

struct Held<V> {
    value: Arc<V>,
    bytes: u64,
    /// Made by a background thread and not asked for yet.
    ahead: bool,
}

/// What the loader did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// `get`s answered with a value a background thread had made before it was asked for.
    pub ahead: u64,
    /// `get`s that waited for a background load to finish.
    pub waits: u64,
    /// `get`s answered with a value used before (held in the window, or cached).
    pub hits: u64,
    /// `get`s that made the value on the calling thread.
    pub misses: u64,
    /// Loads the background threads started.
    pub prefetched: u64,
}

impl Stats {
    /// What was done after `earlier` was read.
    pub fn since(self, earlier: Stats) -> Stats {
        Stats {
            ahead: self.ahead.saturating_sub(earlier.ahead),
            waits: self.waits.saturating_sub(earlier.waits),
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            prefetched: self.prefetched.saturating_sub(earlier.prefetched),
        }
    }
}

impl<K, V> Loader<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Send + Sync + 'static,
{
    /// A loader of `threads` background threads (0: every value made on the caller's thread,
    /// `prefetch` only holding the window) and a cache of `budget` bytes, each value weighing
    /// `weigh(value)`.
    pub fn new(
        threads: usize,
        budget: u64,
        load: impl Fn(&K) -> anyhow::Result<V> + Send + Sync + 'static,
        weigh: fn(&V) -> u64,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cache: Lru::new(budget),
                window: HashSet::new(),
                held: HashMap::new(),
                held_bytes: 0,
                queue: VecDeque::new(),
                loading: HashSet::new(),
                failed: HashMap::new(),
                closed: false,
                stats: Stats::default(),
            }),
            loaded: Condvar::new(),
            work: Condvar::new(),
            load: Box::new(load),
            weigh,
        });
        // Threads the OS refuses are done without: with fewer (or none) the loader still
        // works, the rest on the caller's thread.
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let worker = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("xkd-loader-{i}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(_) => break,
            }
        }
        Loader {
            shared,
            threads: handles,
        }
    }

    /// Names the keys the caller will ask for next, in order: the new window. The background
    /// threads make those not made or being made, first things first. Values of keys the
    /// window no longer names join the cache, and their failures are forgotten; a window key
    /// found in the cache is held again, out of the least recently used's reach.
    pub fn prefetch(&self, keys: impl IntoIterator<Item = K>) {
        let shared = &*self.shared;
        let mut st = shared.lock();
        let st = &mut *st;
        st.window.clear();
        st.queue.clear();
        let mut order = Vec::new();
        for key in keys {
            if st.window.insert(key.clone()) {
                order.push(key);
            }
        }
        let leaving: Vec<K> = (st.held.keys())
            .filter(|k| !st.window.contains(*k))
            .cloned()
            .collect();
        for key in leaving {
            if let Some(held) = st.held.remove(&key) {
                st.held_bytes -= held.bytes;
                st.cache.insert(key, held.value, held.bytes);
            }
        }
        let window = &st.window;
        st.failed.retain(|k, _| window.contains(k));
        for key in order {
            if st.held.contains_key(&key)
                || st.loading.contains(&key)
                || st.failed.contains_key(&key)
            {
                continue;
            }
            if let Some(value) = st.cache.remove(&key) {
                let bytes = (shared.weigh)(&value);
                st.hold(key, value, bytes, false);
            } else if !self.threads.is_empty() {
                st.queue.push_back(key);
            }
        }
        shared.work.notify_all();
    }

    /// The value of `key`: made ahead, used before, being made by a background thread
    /// (waiting for it), or made now. A background load's error is returned here.
    pub fn get(&self, key: &K) -> anyhow::Result<Arc<V>> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        let mut waited = false;
        loop {
            let found = match st.held.get_mut(key) {
                Some(held) => Some((held.value.clone(), std::mem::take(&mut held.ahead))),
                None => st.cache.get(key).map(|value| (value.clone(), false)),
            };
            if let Some((value, ahead)) = found {
                let stats = &mut st.stats;
                match (waited, ahead) {
                    (true, _) => stats.waits += 1,
                    (false, true) => stats.ahead += 1,
                    (false, false) => stats.hits += 1,
                }
                return Ok(value);
            }
            if let Some(e) = st.failed.remove(key) {
                return Err(e);
            }
            if !st.loading.contains(key) {
                break;
            }
            waited = true;
            st = shared.loaded.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.queue.retain(|k| k != key);
        st.loading.insert(key.clone());
        st.stats.misses += 1;
        drop(st);
        let result = shared.load_one(key).map(Arc::new);
        let mut st = shared.lock();
        st.loading.remove(key);
        if let Ok(value) = &result {
            let bytes = (shared.weigh)(value);
            st.keep(key.clone(), value.clone(), bytes, false);
        }
        drop(st);
        shared.loaded.notify_all();
        result
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats
    }

    /// Bytes held: the window's values and the cache.
    pub fn bytes(&self) -> u64 {
        let st = self.shared.lock();
        st.held_bytes + st.cache.bytes()
    }

    /// Bytes of the cache alone: values used before and out of the window.
    pub fn cache_bytes(&self) -> u64 {
        self.shared.lock().cache.bytes()
    }

    /// Whether `key`'s value is made and held for the window.
    pub fn is_held(&self, key: &K) -> bool {
        self.shared.lock().held.contains_key(key)
    }
}

impl<K, V> Drop for Loader<K, V> {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.work.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl<K: Hash + Eq + Clone, V> State<K, V> {
    /// Keeps a value just made: held while its key is in the window, else cached.
    fn keep(&mut self, key: K, value: Arc<V>, bytes: u64, ahead: bool) {
        if self.window.contains(&key) {
            self.hold(key, value, bytes, ahead);
        } else {
            self.cache.insert(key, value, bytes);
        }
    }

    fn hold(&mut self, key: K, value: Arc<V>, bytes: u64, ahead: bool) {
        self.held_bytes += bytes;
        let old = self.held.insert(
            key,
            Held {
                value,
                bytes,
                ahead,
            },
        );
        if let Some(old) = old {
            self.held_bytes -= old.bytes;
        }
    }
}

impl<K: Hash + Eq + Clone, V> Shared<K, V> {
    fn lock(&self) -> MutexGuard<'_, State<K, V>> {
        // A panicking load is caught before it can poison the lock; this only keeps a panic
        // elsewhere from becoming a second one.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A background thread: makes queued window keys, one at a time, until closed.
    fn run(&self) {
        loop {
            let mut st = self.lock();
            let key = loop {
                if st.closed {
                    return;
                }
                if let Some(key) = st.queue.pop_front() {
                    let done = st.held.contains_key(&key)
                        || st.loading.contains(&key)
                        || st.failed.contains_key(&key)
                        || !st.window.contains(&key);
                    if done {
                        continue;
                    }
                    break key;
                }
                st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
            };
            st.loading.insert(key.clone());
            st.stats.prefetched += 1;
            drop(st);
            let result = self.load_one(&key);
            let mut st = self.lock();
            st.loading.remove(&key);
            match result {
                Ok(value) => {
                    let bytes = (self.weigh)(&value);
                    st.keep(key, Arc::new(value), bytes, true);
                }
                // A key the window left meanwhile is nobody's to report to.
                Err(e) if st.window.contains(&key) => {
                    st.failed.insert(key, e);
                }
                Err(_) => {}
            }
            drop(st);
            self.loaded.notify_all();
        }
    }

    /// `load`, with a panic turned into an error.
    fn load_one(&self, key: &K) -> anyhow::Result<V> {
        match catch_unwind(AssertUnwindSafe(|| (self.load)(key))) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                Err(anyhow!("loading panicked: {message}"))
            }
        }
    }
}

#[cfg(test)]
mod tests;
