//! Volume and snapshot identifiers.
//!
//! An ID is a fixed prefix plus 32 lowercase hex digits of SHA-256 over the request name, so the same
//! name always maps to the same ID (which makes CreateVolume and CreateSnapshot idempotent across
//! crashes) and an ID can never name a path outside the driver's directories: anything that does not
//! match the pattern exactly is treated as unknown before it gets near the file system.

use sha2::{Digest, Sha256};

/// What an ID refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A volume of the `local` backend.
    LocalVolume,
    /// A volume of the `nfs` backend.
    NfsVolume,
    /// A snapshot of a local volume.
    Snapshot,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::LocalVolume => "local-",
            Kind::NfsVolume => "nfs-",
            Kind::Snapshot => "snap-",
        }
    }
}

const HEX_LEN: usize = 32;

/// The ID for a request name.
pub fn for_name(kind: Kind, name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let mut id = String::with_capacity(kind.prefix().len() + HEX_LEN);
    id.push_str(kind.prefix());
    for b in digest.iter().take(HEX_LEN / 2) {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// What kind of ID `id` is, or `None` if it is not one this driver could have made.
pub fn parse(id: &str) -> Option<Kind> {
    [Kind::LocalVolume, Kind::NfsVolume, Kind::Snapshot]
        .into_iter()
        .find(|k| {
            id.strip_prefix(k.prefix()).is_some_and(|hex| {
                hex.len() == HEX_LEN
                    && hex
                        .bytes()
                        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_parse_back() {
        let a = for_name(Kind::LocalVolume, "pvc-1");
        assert_eq!(a, for_name(Kind::LocalVolume, "pvc-1"));
        assert_ne!(a, for_name(Kind::LocalVolume, "pvc-2"));
        assert_eq!(parse(&a), Some(Kind::LocalVolume));
        assert_eq!(parse(&for_name(Kind::Snapshot, "s")), Some(Kind::Snapshot));
        assert_eq!(
            parse(&for_name(Kind::NfsVolume, "n")),
            Some(Kind::NfsVolume)
        );
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let good = for_name(Kind::LocalVolume, "x");
        for bad in [
            "",
            "local-",
            "../../etc",
            "local-../../../../../../etc/passwd",
            &format!("{good}/.."),
            &good.to_uppercase(),
            &good[..good.len() - 1],
            "local-0123456789abcdef0123456789abcdeg",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
