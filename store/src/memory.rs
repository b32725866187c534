//! The in-memory backend: the same log as the SQLite one, kept in maps, gone with the process.
//! For servers started without a data directory and for tests of the code above the trait.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
};

use crate::{Backend, Change, Error, Record, Result, Revision, Snapshot};

#[derive(Debug, Default)]
struct Log {
    rev: Revision,
    compacted: Revision,
    /// Every kept write by revision: key, the key's previous revision, value (`None`: deleted).
    writes: BTreeMap<Revision, (String, Revision, Option<Vec<u8>>)>,
    /// Each key's newest write.
    latest: HashMap<String, Revision>,
}

impl Log {
    fn live_rev(&self, key: &str) -> Revision {
        match self.latest.get(key) {
            Some(rev) if self.writes.get(rev).is_some_and(|w| w.2.is_some()) => *rev,
            _ => 0,
        }
    }
}

/// The in-memory backend.
#[derive(Debug, Default)]
pub struct Memory {
    log: Mutex<Log>,
}

impl Memory {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let log = self.lock();
        let mut records: Vec<Record> = log
            .latest
            .iter()
            .filter_map(|(key, rev)| {
                let value = log.writes.get(rev)?.2.clone()?;
                Some(Record {
                    key: key.clone(),
                    rev: *rev,
                    value,
                })
            })
            .collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Snapshot {
            rev: log.rev,
            compacted: log.compacted,
            records,
        })
    }

    fn write(&self, key: &str, expected: Revision, value: Option<&[u8]>) -> Result<Revision> {
        let mut log = self.lock();
        let actual = log.live_rev(key);
        if actual != expected || (value.is_none() && actual == 0) {
            return Err(Error::Conflict {
                key: key.to_owned(),
                expected,
                actual,
            });
        }
        let prev = log.latest.get(key).copied().unwrap_or(0);
        let rev = log.rev + 1;
        log.rev = rev;
        log.writes
            .insert(rev, (key.to_owned(), prev, value.map(<[u8]>::to_vec)));
        log.latest.insert(key.to_owned(), rev);
        Ok(rev)
    }

    fn changes(&self, after: Revision) -> Result<Vec<Change>> {
        let log = self.lock();
        if after < log.compacted {
            return Err(Error::Compacted {
                asked: after,
                compacted: log.compacted,
            });
        }
        Ok(log
            .writes
            .range(after + 1..)
            .map(|(rev, (key, prev, value))| Change {
                rev: *rev,
                key: key.clone(),
                value: value.clone(),
                previous: log.writes.get(prev).and_then(|w| w.2.clone()),
            })
            .collect())
    }

    fn compact(&self, upto: Revision) -> Result<()> {
        let mut log = self.lock();
        let upto = upto.min(log.rev.saturating_sub(1));
        if upto <= log.compacted {
            return Ok(());
        }
        // A write at or before `upto` goes when it is a deletion or a newer write at or before
        // `upto` replaced it (`upto` is below the newest write, which carries the revision).
        let mut newest: HashMap<&str, Revision> = HashMap::new();
        for (rev, (key, _, _)) in log.writes.range(..=upto) {
            newest.insert(key, *rev);
        }
        let gone: Vec<Revision> = log
            .writes
            .range(..=upto)
            .filter(|(rev, (key, _, value))| {
                value.is_none() || newest.get(key.as_str()) != Some(rev)
            })
            .map(|(rev, _)| *rev)
            .collect();
        for rev in gone {
            if let Some((key, _, _)) = log.writes.remove(&rev)
                && log.latest.get(&key) == Some(&rev)
            {
                log.latest.remove(&key);
            }
        }
        log.compacted = upto;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms() {
        crate::conformance::run(&|| Box::new(Memory::new()));
    }
}
