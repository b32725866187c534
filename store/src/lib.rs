//! weft-store owns the durable half of weft's API server: a revisioned key-value log, the
//! [`Backend`] trait every storage engine implements, and two engines: [`Sqlite`] (the embedded
//! default, a single SQLite database in WAL mode, as k3s's kine keeps Kubernetes on SQLite),
//! [`Etcd`] (etcd v3, for clusters that outgrow one machine) and [`Memory`] (a server that keeps
//! nothing on disk). One conformance suite ([`conformance`], with the `conformance` feature)
//! runs against all three.
//!
//! The model is etcd v3's, so that an etcd backend fits the same trait:
//!
//! * one revision counter for the whole store; every write (put or delete) makes the next one;
//! * every key remembers the revision that last wrote it (its *mod revision*), and a write names
//!   the mod revision it expects (`0`: the key must not exist), so concurrent writers cannot
//!   lose each other's changes (optimistic concurrency);
//! * the log of changes is kept until it is compacted: [`Backend::changes`] replays it from any
//!   revision after the compaction point, which is how a watch resumes, also after a restart;
//!   an older revision is [`Error::Compacted`] (kube-apiserver's `410 Gone`).
//!
//! What a key and a value mean (Kubernetes objects as JSON) is the API server's business, not
//! this crate's.

mod etcd;
mod memory;
mod sqlite;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use etcd::Etcd;
pub use memory::Memory;
pub use sqlite::Sqlite;

/// A store revision: `0` is "nothing written yet"; the first write is revision 1.
pub type Revision = u64;

/// A live key: its value and the revision that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key.
    pub key: String,
    /// The revision of the write that gave the key this value.
    pub rev: Revision,
    /// The value.
    pub value: Vec<u8>,
}

/// One write, as the log keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The revision the write made.
    pub rev: Revision,
    /// The key written.
    pub key: String,
    /// The new value; `None` for a deletion.
    pub value: Option<Vec<u8>>,
    /// The value the key had before (`None` if it did not exist, or if that write has been
    /// compacted away).
    pub previous: Option<Vec<u8>>,
}

/// Everything live in the store at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The newest revision.
    pub rev: Revision,
    /// Changes at or before this revision are no longer kept.
    pub compacted: Revision,
    /// Every live key, in key order.
    pub records: Vec<Record>,
}

/// What can go wrong in a backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key's mod revision is not the one the write expected.
    #[error("{key}: expected revision {expected}, the store has {actual}")]
    Conflict {
        /// The key written.
        key: String,
        /// The mod revision the write named (`0`: absent).
        expected: Revision,
        /// The key's mod revision (`0`: absent).
        actual: Revision,
    },
    /// The changes asked for have been compacted.
    #[error("revision {asked} has been compacted; the oldest change kept is after {compacted}")]
    Compacted {
        /// The revision asked for.
        asked: Revision,
        /// The compaction point.
        compacted: Revision,
    },
    /// The storage engine failed (I/O, corruption, a full disk).
    #[error("{context}: {message}")]
    Engine {
        /// What the backend was doing.
        context: String,
        /// The engine's error.
        message: String,
    },
}

impl Error {
    fn engine(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Engine {
            context: context.into(),
            message: e.to_string(),
        }
    }
}

/// A store result.
pub type Result<T> = std::result::Result<T, Error>;

/// A revisioned key-value log (see the crate doc). Every method is durable when it returns:
/// a write acknowledged with `Ok` survives the process being killed at any point after.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// The engine's name, for logs and `weft status`.
    fn name(&self) -> &'static str;

    /// Every live key and the revision they are consistent with.
    fn snapshot(&self) -> Result<Snapshot>;

    /// Writes `value` at `key` (deletes it when `value` is `None`) if the key's mod revision is
    /// `expected` (`0`: the key does not exist; a deletion needs an existing key). Returns the
    /// revision the write made.
    fn write(&self, key: &str, expected: Revision, value: Option<&[u8]>) -> Result<Revision>;

    /// The changes after revision `after`, oldest first; [`Error::Compacted`] when `after` is
    /// older than the compaction point.
    fn changes(&self, after: Revision) -> Result<Vec<Change>>;

    /// Forgets the changes at or before `upto` that no live key needs (superseded values and
    /// deletions). Later reads of changes at or before `upto` are [`Error::Compacted`]. `upto`
    /// is capped below the newest revision (the newest write always stays, as etcd requires);
    /// an older point than the current one changes nothing.
    fn compact(&self, upto: Revision) -> Result<()>;

    /// Whether other processes write this log too (several API servers on one etcd), so that
    /// a cache of it has to [`follow`](Backend::follow) their changes. An embedded engine has
    /// one writer: the default is `false`.
    fn shared(&self) -> bool {
        false
    }

    /// Calls `sink` with every change after `after`, oldest first, as the changes are made,
    /// until `sink` returns `false` (then `Ok`) or the log cannot be read ([`Error::Compacted`]
    /// when `after` has been compacted meanwhile). The default, for engines that are not
    /// [`shared`](Backend::shared), has nothing to follow and returns at once.
    fn follow(&self, after: Revision, sink: &mut dyn FnMut(Change) -> bool) -> Result<()> {
        let _ = (after, sink);
        Ok(())
    }
}
