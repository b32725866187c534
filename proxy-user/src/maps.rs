//! The seam between the map programmers ([`crate::services`], [`crate::policymap`]) and the kernel's BPF maps:
//! [`KvMap`], the three things they do to a map (insert, remove, list). aya's pinned hash maps and
//! LPM tries are the real ones; [`Memory`] is an in-memory map with the kernel's capacity rule (a full map
//! refuses a new key with `E2BIG`) and a write log shared between maps, so unit tests can check
//! what was written, and in what order, without root. The privileged tests remain the proof
//! that the programs read what is written.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aya::Pod;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, MapError};

/// A BPF map as the programmers use it.
pub trait KvMap<K, V>: Send {
    /// Inserts or replaces `key`.
    fn insert(&mut self, key: K, value: V) -> Result<(), MapError>;
    /// Removes `key`.
    fn remove(&mut self, key: &K) -> Result<(), MapError>;
    /// Every entry.
    fn entries(&self) -> Result<Vec<(K, V)>, MapError>;
}

impl<K: Pod + Send, V: Pod + Send> KvMap<K, V> for HashMap<MapData, K, V> {
    fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
        HashMap::insert(self, key, value, 0)
    }
    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        HashMap::remove(self, key)
    }
    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        self.iter().collect()
    }
}

/// An LPM trie, keyed by (prefix length, data).
impl<K: Pod + Send, V: Pod + Send> KvMap<(u32, K), V> for LpmTrie<MapData, K, V> {
    fn insert(&mut self, key: (u32, K), value: V) -> Result<(), MapError> {
        LpmTrie::insert(self, &Key::new(key.0, key.1), value, 0)
    }
    fn remove(&mut self, key: &(u32, K)) -> Result<(), MapError> {
        LpmTrie::remove(self, &Key::new(key.0, key.1))
    }
    fn entries(&self) -> Result<Vec<((u32, K), V)>, MapError> {
        self.iter()
            .map(|e| e.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect()
    }
}

/// One write to a [`Memory`] map, as its log records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// An insert into the named map (the key, formatted).
    Insert(&'static str, String),
    /// A removal from the named map.
    Remove(&'static str, String),
}

/// A log several [`Memory`] maps write to, in order.
pub type Log = Arc<Mutex<Vec<Write>>>;

/// An in-memory map of at most `capacity` entries.
#[derive(Debug)]
pub struct Memory<K, V> {
    name: &'static str,
    capacity: usize,
    entries: BTreeMap<K, V>,
    log: Log,
}

impl<K: Ord, V> Memory<K, V> {
    /// An empty map named `name` (in the log) holding at most `capacity` entries.
    pub fn new(name: &'static str, capacity: usize, log: Log) -> Self {
        Self {
            name,
            capacity,
            entries: BTreeMap::new(),
            log,
        }
    }

    /// A map holding `entries` already (as a restarted agent finds its pinned maps).
    pub fn with(mut self, entries: impl IntoIterator<Item = (K, V)>) -> Self {
        self.entries.extend(entries);
        self
    }

    fn record(&self, w: Write) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(w);
    }
}

impl<K, V> KvMap<K, V> for Memory<K, V>
where
    K: Ord + Copy + std::fmt::Debug + Send,
    V: Copy + Send,
{
    fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
            }));
        }
        self.record(Write::Insert(self.name, format!("{key:?}")));
        self.entries.insert(key, value);
        Ok(())
    }
    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        if self.entries.remove(key).is_none() {
            return Err(MapError::KeyNotFound);
        }
        self.record(Write::Remove(self.name, format!("{key:?}")));
        Ok(())
    }
    fn entries(&self) -> Result<Vec<(K, V)>, MapError> {
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }
}
