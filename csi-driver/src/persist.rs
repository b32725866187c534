//! Crash-safe small files: a record is written to a temporary name, synced, and renamed over the
//! old one, so a reader sees the old record or the new one, never a torn one.

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Writes `value` as JSON to `path` atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::io(format!("encode {}", path.display()))(e.into()))?;
    let mut f =
        std::fs::File::create(&tmp).map_err(Error::io(format!("create {}", tmp.display())))?;
    f.write_all(&body)
        .and_then(|_| f.sync_all())
        .map_err(Error::io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("rename to {}", path.display())))?;
    sync_parent(path)
}

/// Reads a JSON record; `None` if the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(body) => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| Error::io(format!("decode {}", path.display()))(e.into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", path.display()))(e)),
    }
}

/// Makes a rename or create in `path`'s directory durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(format!("sync {}", dir.display())))
}
