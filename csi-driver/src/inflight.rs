//! At most one operation per volume or snapshot at a time: a second concurrent call for the same ID
//! gets `ABORTED`, as the CSI spec asks, while calls for different IDs run in parallel.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The set of IDs with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Mutex<HashSet<String>>>);

/// Held while an operation runs; releases the ID when dropped.
#[derive(Debug)]
pub struct Guard {
    set: InFlight,
    key: String,
}

impl InFlight {
    /// Claims `key`, or fails with `ABORTED` if it is taken.
    pub fn begin(&self, key: &str) -> Result<Guard> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(key.to_string()) {
            return Err(Error::Aborted(format!(
                "an operation on {key} is already in progress"
            )));
        }
        Ok(Guard {
            set: self.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_released() {
        let f = InFlight::default();
        let g = f.begin("a").unwrap();
        assert!(matches!(f.begin("a"), Err(Error::Aborted(_))));
        let _b = f.begin("b").unwrap();
        drop(g);
        f.begin("a").unwrap();
    }
}
