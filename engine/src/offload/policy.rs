//! Eviction policies: which resident expert of a partition to give up for a new one.
//!
//! Each policy is bookkeeping only — no I/O, no clocks of its own. The cache core tells it
//! when a key is inserted, touched or removed, and asks it for a victim among the keys the
//! core allows (resident, not pinned, not in use). The live cache and the simulator drive the
//! very same code.

use super::{ExpertKey, KeyMap};

/// Which eviction policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Least recently used (the default).
    Lru,
    /// Least frequently used (use counts over the whole run; ties: least recent).
    Lfu,
    /// flash-moe's score: frequency × 0.25^(age / 128), age in tokens since the last use.
    Lcp,
    /// Belady's optimal demand paging: evict the key whose next use is farthest away. Needs
    /// the future, so only the simulator can run it.
    Belady,
}

impl PolicyKind {
    pub const NAMES: [&'static str; 4] = ["lru", "lfu", "lcp", "belady"];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Lcp => "lcp",
            PolicyKind::Belady => "belady",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "lru" => PolicyKind::Lru,
            "lfu" => PolicyKind::Lfu,
            "lcp" => PolicyKind::Lcp,
            "belady" => PolicyKind::Belady,
            _ => {
                return Err(format!(
                    "unknown policy `{s}` (expected one of {})",
                    Self::NAMES.join(", ")
                ));
            }
        })
    }
}

/// The future, for Belady: the time of `key`'s next use after `now` (`u64::MAX`: never).
pub trait NextUse {
    fn next_use(&self, key: ExpertKey, now: u64) -> u64;
}

/// Per-key bookkeeping shared by the policies.
#[derive(Debug, Clone, Copy, Default)]
struct Stat {
    /// Strictly increasing use stamp (recency order).
    stamp: u64,
    /// Token time of the last use (LCP age).
    last_time: u64,
}

/// One partition's policy state.
#[derive(Debug, Clone)]
pub struct Policy {
    kind: PolicyKind,
    /// Resident keys of this partition and their recency/frequency.
    resident: KeyMap<Stat>,
    /// LRU order as an index-linked list over `nodes` (O(1) touch and evict).
    lru: LruList,
}

/// Run-long use counts, shared by every partition (an expert's frequency survives its
/// eviction).
pub type Frequencies = KeyMap<u64>;

impl Policy {
    pub fn new(kind: PolicyKind) -> Self {
        Self {
            kind,
            resident: KeyMap::default(),
            lru: LruList::default(),
        }
    }

    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// `key` became resident (or started loading) at stamp `stamp`, token time `now`.
    pub fn inserted(&mut self, key: ExpertKey, stamp: u64, now: u64) {
        self.resident.insert(
            key,
            Stat {
                stamp,
                last_time: now,
            },
        );
        self.lru.push_front(key);
    }

    /// `key` was used.
    pub fn touched(&mut self, key: ExpertKey, stamp: u64, now: u64) {
        if let Some(s) = self.resident.get_mut(&key) {
            s.stamp = stamp;
            s.last_time = now;
            self.lru.move_to_front(key);
        }
    }

    /// `key` left the partition.
    pub fn removed(&mut self, key: ExpertKey) {
        if self.resident.remove(&key).is_some() {
            self.lru.remove(key);
        }
    }

    /// The key to evict among those `evictable` allows; `None` if none may go.
    pub fn victim(
        &self,
        now: u64,
        freq: &Frequencies,
        future: Option<&dyn NextUse>,
        evictable: impl Fn(ExpertKey) -> bool,
    ) -> Option<ExpertKey> {
        match self.kind {
            PolicyKind::Lru => self.lru.iter_back().find(|&k| evictable(k)),
            PolicyKind::Lfu => self.min_by(&evictable, |k, s| {
                (freq.get(&k).copied().unwrap_or(0) as f64, s.stamp)
            }),
            PolicyKind::Lcp => self.min_by(&evictable, |k, s| {
                let f = freq.get(&k).copied().unwrap_or(0) as f64;
                let age = now.saturating_sub(s.last_time) as f64;
                (f * 0.25f64.powf(age / 128.0), s.stamp)
            }),
            PolicyKind::Belady => {
                let future = future?;
                // Farthest next use; ties (e.g. never used again): least recent.
                self.resident
                    .iter()
                    .filter(|(k, _)| evictable(**k))
                    .max_by_key(|(k, s)| (future.next_use(**k, now), u64::MAX - s.stamp))
                    .map(|(k, _)| *k)
            }
        }
    }

    fn min_by(
        &self,
        evictable: &impl Fn(ExpertKey) -> bool,
        score: impl Fn(ExpertKey, &Stat) -> (f64, u64),
    ) -> Option<ExpertKey> {
        self.resident
            .iter()
            .filter(|(k, _)| evictable(**k))
            .map(|(k, s)| (score(*k, s), *k))
            .min_by(|(a, ka), (b, kb)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(ka.cmp(kb)))
            .map(|(_, k)| k)
    }
}

/// A doubly linked list of keys in recency order (front: most recent), with O(1) moves.
#[derive(Debug, Clone, Default)]
struct LruList {
    nodes: Vec<Node>,
    free: Vec<usize>,
    index: KeyMap<usize>,
    head: Option<usize>,
    tail: Option<usize>,
}

#[derive(Debug, Clone)]
struct Node {
    key: ExpertKey,
    prev: Option<usize>,
    next: Option<usize>,
}

impl LruList {
    fn push_front(&mut self, key: ExpertKey) {
        let node = Node {
            key,
            prev: None,
            next: self.head,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        if let Some(h) = self.head {
            self.nodes[h].prev = Some(i);
        }
        self.head = Some(i);
        if self.tail.is_none() {
            self.tail = Some(i);
        }
        self.index.insert(key, i);
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        match prev {
            Some(p) => self.nodes[p].next = next,
            None => self.head = next,
        }
        match next {
            Some(n) => self.nodes[n].prev = prev,
            None => self.tail = prev,
        }
    }

    fn remove(&mut self, key: ExpertKey) {
        if let Some(i) = self.index.remove(&key) {
            self.unlink(i);
            self.free.push(i);
        }
    }

    fn move_to_front(&mut self, key: ExpertKey) {
        let Some(&i) = self.index.get(&key) else { return };
        if self.head == Some(i) {
            return;
        }
        self.unlink(i);
        self.nodes[i].prev = None;
        self.nodes[i].next = self.head;
        if let Some(h) = self.head {
            self.nodes[h].prev = Some(i);
        }
        self.head = Some(i);
        if self.tail.is_none() {
            self.tail = Some(i);
        }
    }

    /// Keys from least to most recent.
    fn iter_back(&self) -> impl Iterator<Item = ExpertKey> + '_ {
        std::iter::successors(self.tail, |&i| self.nodes[i].prev).map(|i| self.nodes[i].key)
    }
}
