//! A map bounded by bytes, not entries: what a rank keeps of the clips it has loaded. Each entry
//! is inserted with its size; when the sizes add up to more than the budget, the least recently
//! used entries go first. An entry larger than the whole budget is not kept at all.
//!
//! Hand-written rather than the `lru` crate: that one bounds the number of entries, and the
//! byte accounting and eviction by size would sit around it anyway. Recency is a counter per
//! entry and an ordered map from counter to key, so every operation is O(log n).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Least-recently-used entries, at most `budget` bytes of them (as their inserts said).
pub struct Lru<K, V> {
    budget: u64,
    bytes: u64,
    tick: u64,
    entries: HashMap<K, Entry<V>>,
    /// Last use -> key, oldest first.
    order: BTreeMap<u64, K>,
}

struct Entry<V> {
    value: V,
    bytes: u64,
    used: u64,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub fn new(budget: u64) -> Self {
        Lru {
            budget,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The entry of `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&mut V> {
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.used);
        self.tick += 1;
        entry.used = self.tick;
        self.order.insert(self.tick, key.clone());
        Some(&mut entry.value)
    }

    /// Whether `key` has an entry; its recency does not change.
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Keeps `value` (of `bytes` bytes) as the most recently used entry, replacing any entry of
    /// `key`, then drops the least recently used ones until the total fits the budget. Returns
    /// what was dropped, `value` itself when it alone is larger than the budget.
    pub fn insert(&mut self, key: K, value: V, bytes: u64) -> Vec<V> {
        let mut dropped: Vec<V> = self.remove(&key).into_iter().collect();
        if bytes > self.budget {
            dropped.push(value);
            return dropped;
        }
        let budget = self.budget;
        dropped.extend(self.set_budget(budget - bytes));
        self.budget = budget;
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(
            key,
            Entry {
                value,
                bytes,
                used: self.tick,
            },
        );
        self.bytes += bytes;
        dropped
    }

    /// A new budget, dropping the least recently used entries until the total fits it.
    pub fn set_budget(&mut self, budget: u64) -> Vec<V> {
        self.budget = budget;
        let mut dropped = Vec::new();
        while self.bytes > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= entry.bytes;
                dropped.push(entry.value);
            }
        }
        dropped
    }

    /// Takes the entry of `key` out.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.used);
        self.bytes -= entry.bytes;
        Some(entry.value)
    }

    /// Bytes held, as the inserts counted them.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_never_exceed_the_budget_and_the_least_recent_go_first() {
        let mut lru = Lru::new(100);
        for k in 0..5u32 {
            assert!(lru.insert(k, k, 30).len() <= 1);
            assert!(lru.bytes() <= 100, "{} bytes after {k}", lru.bytes());
        }
        // 3 entries of 30 fit in 100: 2, 3, 4 are left.
        assert_eq!((lru.len(), lru.bytes()), (3, 90));
        assert!(!lru.contains(&1) && lru.contains(&2));
        // Using 2 makes 3 the oldest: the next insert drops 3, not 2.
        assert_eq!(lru.get(&2), Some(&mut 2));
        assert_eq!(lru.insert(9, 9, 30), vec![3]);
        assert!(lru.contains(&2) && lru.contains(&4) && lru.contains(&9));
        // A larger entry drops as many as it needs.
        assert_eq!(lru.insert(10, 10, 70), vec![4, 2]);
        assert_eq!(lru.bytes(), 100);
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_kept() {
        let mut lru = Lru::new(10);
        lru.insert("a", 1, 5);
        assert_eq!(lru.insert("b", 2, 11), vec![2]);
        assert!(lru.contains(&"a") && !lru.contains(&"b"));
        assert_eq!(lru.bytes(), 5);
    }

    #[test]
    fn replacing_a_key_counts_its_bytes_once() {
        let mut lru = Lru::new(10);
        lru.insert("a", 1, 6);
        assert_eq!(lru.insert("a", 2, 8), vec![1]);
        assert_eq!((lru.len(), lru.bytes()), (1, 8));
        assert_eq!(lru.remove(&"a"), Some(2));
        assert!(lru.is_empty() && lru.bytes() == 0);
    }

    #[test]
    fn a_smaller_budget_drops_the_least_recent() {
        let mut lru = Lru::new(30);
        for k in 0..3 {
            lru.insert(k, k, 10);
        }
        lru.get(&0);
        assert_eq!(lru.set_budget(15), vec![1, 2]);
        assert_eq!((lru.len(), lru.bytes(), lru.budget()), (1, 10, 15));
    }
}
