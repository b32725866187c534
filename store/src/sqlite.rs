//! The embedded backend: the log as rows of one SQLite table, in WAL mode.
//!
//! ```text
//! log(rev INTEGER PRIMARY KEY, key TEXT, prev INTEGER, value BLOB)   -- value NULL: a deletion
//! meta(name TEXT PRIMARY KEY, value INTEGER)                         -- compacted, floor
//! ```
//!
//! A write is one `BEGIN IMMEDIATE` transaction that reads the key's newest row, checks the
//! expected revision and appends a row; it returns after SQLite's commit, which with
//! `synchronous=FULL` has synced the WAL: an acknowledged write survives `kill -9` and a power
//! loss, and a write cut short by either is not there at all. Writes are O(log n) in the number of
//! rows, never O(objects) as rewriting a file would be. Compaction deletes superseded rows and
//! deletions at or before the compaction point, which stops below the newest row (that row
//! carries the revision counter; `floor` keeps it when an import starts above the revisions it
//! has rows for).

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::{Backend, Change, Error, Record, Result, Revision, Snapshot};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    rev INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    prev INTEGER NOT NULL,
    value BLOB
);
CREATE INDEX IF NOT EXISTS log_key ON log (key, rev);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// The SQLite backend.
#[derive(Debug)]
pub struct Sqlite {
    path: PathBuf,
    db: Mutex<Connection>,
}

fn rev_of(v: i64) -> Revision {
    Revision::try_from(v).unwrap_or(0)
}

fn sql(v: Revision) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Sqlite {
    /// Opens (creating if need be) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let context = || format!("opening {}", path.display());
        let db = Connection::open(path).map_err(|e| Error::engine(context(), e))?;
        db.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| Error::engine(context(), e))?;
        let mode: String = db
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| Error::engine(context(), e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::engine(
                context(),
                format!("journal mode is {mode}, not wal"),
            ));
        }
        db.execute_batch("PRAGMA synchronous=FULL;")
            .and_then(|()| db.execute_batch(SCHEMA))
            .map_err(|e| Error::engine(context(), e))?;
        Ok(Self {
            path: path.to_owned(),
            db: Mutex::new(db),
        })
    }

    /// Where the database is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads `records` (each at its own, distinct revision) into this empty store and makes
    /// `rev` its revision: how an older store format is converted.
    pub fn import(&self, rev: Revision, records: &[Record]) -> Result<()> {
        let mut db = self.lock();
        let fail = |e: rusqlite::Error| Error::engine("importing", e);
        let tx = db
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        let rows: i64 = tx
            .query_row("SELECT COUNT(*) FROM log", [], |r| r.get(0))
            .map_err(fail)?;
        if rows > 0 {
            return Err(Error::engine("importing", "the store is not empty"));
        }
        {
            let mut insert = tx
                .prepare("INSERT INTO log (rev, key, prev, value) VALUES (?1, ?2, 0, ?3)")
                .map_err(fail)?;
            for r in records {
                insert
                    .execute(params![sql(r.rev), r.key, r.value])
                    .map_err(fail)?;
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('floor', ?1)",
            params![sql(rev)],
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn meta(db: &Connection, name: &str) -> rusqlite::Result<Revision> {
    db.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get::<_, i64>(0)
    })
    .optional()
    .map(|v| v.map_or(0, rev_of))
}

fn current(db: &Connection) -> rusqlite::Result<Revision> {
    let newest: Option<i64> = db.query_row("SELECT MAX(rev) FROM log", [], |r| r.get(0))?;
    Ok(newest.map_or(0, rev_of).max(meta(db, "floor")?))
}

impl Backend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let db = self.lock();
        let fail = |e: rusqlite::Error| Error::engine("reading the store", e);
        let tx = db.unchecked_transaction().map_err(fail)?;
        let rev = current(&tx).map_err(fail)?;
        let compacted = meta(&tx, "compacted").map_err(fail)?;
        let mut q = tx
            .prepare(
                "SELECT l.key, l.rev, l.value FROM log l
                 JOIN (SELECT key, MAX(rev) AS rev FROM log GROUP BY key) n ON l.rev = n.rev
                 WHERE l.value IS NOT NULL ORDER BY l.key",
            )
            .map_err(fail)?;
        let records = q
            .query_map([], |r| {
                Ok(Record {
                    key: r.get(0)?,
                    rev: rev_of(r.get(1)?),
                    value: r.get(2)?,
                })
            })
            .map_err(fail)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(fail)?;
        Ok(Snapshot {
            rev,
            compacted,
            records,
        })
    }

    fn write(&self, key: &str, expected: Revision, value: Option<&[u8]>) -> Result<Revision> {
        let mut db = self.lock();
        let fail = |e: rusqlite::Error| Error::engine(format!("writing {key}"), e);
        let tx = db
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        let newest: Option<(i64, bool)> = tx
            .query_row(
                "SELECT rev, value IS NOT NULL FROM log WHERE key = ?1 ORDER BY rev DESC LIMIT 1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(fail)?;
        let prev = newest.map_or(0, |(rev, _)| rev_of(rev));
        let actual = match newest {
            Some((rev, true)) => rev_of(rev),
            _ => 0,
        };
        if actual != expected || (value.is_none() && actual == 0) {
            return Err(Error::Conflict {
                key: key.to_owned(),
                expected,
                actual,
            });
        }
        let rev = current(&tx).map_err(fail)? + 1;
        tx.execute(
            "INSERT INTO log (rev, key, prev, value) VALUES (?1, ?2, ?3, ?4)",
            params![sql(rev), key, sql(prev), value],
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)?;
        Ok(rev)
    }

    fn changes(&self, after: Revision) -> Result<Vec<Change>> {
        let db = self.lock();
        let fail = |e: rusqlite::Error| Error::engine("reading the log", e);
        let tx = db.unchecked_transaction().map_err(fail)?;
        let compacted = meta(&tx, "compacted").map_err(fail)?;
        if after < compacted {
            return Err(Error::Compacted {
                asked: after,
                compacted,
            });
        }
        let mut q = tx
            .prepare(
                "SELECT l.rev, l.key, l.value, p.value FROM log l
                 LEFT JOIN log p ON l.prev > 0 AND p.rev = l.prev
                 WHERE l.rev > ?1 ORDER BY l.rev",
            )
            .map_err(fail)?;
        let changes = q
            .query_map([sql(after)], |r| {
                Ok(Change {
                    rev: rev_of(r.get(0)?),
                    key: r.get(1)?,
                    value: r.get(2)?,
                    previous: r.get(3)?,
                })
            })
            .map_err(fail)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(fail)?;
        Ok(changes)
    }

    fn compact(&self, upto: Revision) -> Result<()> {
        let mut db = self.lock();
        let fail = |e: rusqlite::Error| Error::engine(format!("compacting to {upto}"), e);
        let tx = db
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        let upto = upto.min(current(&tx).map_err(fail)?.saturating_sub(1));
        if upto <= meta(&tx, "compacted").map_err(fail)? {
            return Ok(());
        }
        tx.execute(
            "DELETE FROM log WHERE rev <= ?1 AND (value IS NULL OR EXISTS
                (SELECT 1 FROM log n WHERE n.key = log.key AND n.rev > log.rev AND n.rev <= ?1))",
            params![sql(upto)],
        )
        .map_err(fail)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES ('compacted', ?1)",
            params![sql(upto)],
        )
        .map_err(fail)?;
        tx.commit().map_err(fail)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("weft-store-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn conforms() {
        let dir = Dir::new("conforms");
        let n = AtomicUsize::new(0);
        crate::conformance::run(&|| {
            let path = dir
                .0
                .join(format!("{}.db", n.fetch_add(1, Ordering::Relaxed)));
            Box::new(Sqlite::open(&path).expect("open"))
        });
    }

    #[test]
    fn keeps_everything_across_a_reopen() {
        let dir = Dir::new("durable");
        let path = dir.0.join("store.db");
        crate::conformance::run_durable(&|| Box::new(Sqlite::open(&path).expect("open")));
    }

    #[test]
    fn an_import_fills_an_empty_store_at_its_revision() {
        let dir = Dir::new("import");
        let db = Sqlite::open(&dir.0.join("store.db")).expect("open");
        let records = [
            Record {
                key: "/a".into(),
                rev: 3,
                value: b"a".to_vec(),
            },
            Record {
                key: "/b".into(),
                rev: 7,
                value: b"b".to_vec(),
            },
        ];
        db.import(9, &records).expect("import");
        let s = db.snapshot().expect("snapshot");
        assert_eq!((s.rev, s.records.as_slice()), (9, &records[..]));
        assert_eq!(db.write("/a", 3, Some(b"a2")).expect("write"), 10);
        assert!(db.import(11, &records).is_err(), "only into an empty store");
    }
}
