//! The CNI_* environment variables: which command, and the attachment parameters, validated as
//! the spec requires (§2 › Parameters) with code 4 errors that name the variables.

use std::{collections::BTreeMap, path::PathBuf};

use crate::error::{Error, Result};

/// The operation requested through `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach a container.
    Del,
    /// Verify an attachment.
    Check,
    /// Is the plugin ready to serve ADD?
    Status,
    /// Which versions the plugin speaks.
    Version,
    /// Remove stale resources.
    Gc,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            _ => return None,
        })
    }
}

/// The parsed environment of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    /// The command.
    pub command: Command,
    /// `CNI_CONTAINERID` (ADD, DEL, CHECK).
    pub container_id: Option<String>,
    /// `CNI_NETNS` (required for ADD and CHECK, optional for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (ADD, DEL, CHECK).
    pub ifname: Option<String>,
    /// `CNI_ARGS`, parsed as `K=V;K2=V2`.
    pub args: BTreeMap<String, String>,
    /// `CNI_PATH`, split on `:`.
    pub path: Vec<PathBuf>,
}

/// Whether a container ID is valid: `^[A-Za-z0-9][A-Za-z0-9_.\-]*$`.
pub fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Why an interface name is unusable, if it is (Linux `dev_valid_name`).
pub fn invalid_ifname(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > 15 {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("is . or ..")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    }
}

impl Env {
    /// Reads and validates the variables for the command named by `CNI_COMMAND`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
        let raw_cmd = non_empty("CNI_COMMAND")
            .ok_or_else(|| Error::env("required env variables [CNI_COMMAND] missing"))?;
        let command = Command::parse(&raw_cmd).ok_or_else(|| Error::Env {
            msg: format!("unknown CNI_COMMAND: {raw_cmd}"),
            details: "CNI_COMMAND must be one of ADD, DEL, CHECK, STATUS, VERSION, GC".into(),
        })?;
        let required: &[&str] = match command {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Gc => &["CNI_PATH"],
            Command::Status | Command::Version => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|k| non_empty(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(Error::env(format!(
                "required env variables [{}] missing",
                missing.join(" ")
            )));
        }
        let attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = if attachment {
            non_empty("CNI_CONTAINERID")
        } else {
            None
        };
        if let Some(id) = &container_id
            && !valid_container_id(id)
        {
            return Err(Error::Env {
                msg: format!("invalid characters in CNI_CONTAINERID: {id}"),
                details: "must match ^[A-Za-z0-9][A-Za-z0-9_.\\-]*$".into(),
            });
        }
        let ifname = if attachment {
            non_empty("CNI_IFNAME")
        } else {
            None
        };
        if let Some(name) = &ifname
            && let Some(why) = invalid_ifname(name)
        {
            return Err(Error::env(format!("invalid CNI_IFNAME {name:?}: {why}")));
        }
        let args = non_empty("CNI_ARGS")
            .map(|a| parse_args(&a))
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            command,
            container_id,
            netns: if attachment {
                non_empty("CNI_NETNS").map(PathBuf::from)
            } else {
                None
            },
            ifname,
            args,
            path: non_empty("CNI_PATH")
                .map(|p| {
                    p.split(':')
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The container ID; only call for commands that require it.
    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }

    /// The interface name; only call for commands that require it.
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

fn parse_args(raw: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            Error::env(format!(
                "invalid CNI_ARGS pair {pair:?}: expected KEY=VALUE"
            ))
        })?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::code;

    fn env(pairs: &[(&str, &str)]) -> Result<Env> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Env::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn missing_variables_are_all_named() {
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]).unwrap_err();
        assert_eq!(e.code(), code::INVALID_ENV);
        assert!(
            e.to_string().contains("CNI_CONTAINERID") && e.to_string().contains("CNI_NETNS"),
            "{}",
            e.to_string()
        );
    }

    #[test]
    fn unknown_command_is_code_4() {
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]).unwrap_err().code(),
            code::INVALID_ENV
        );
        assert_eq!(env(&[]).unwrap_err().code(), code::INVALID_ENV);
    }

    #[test]
    fn del_does_not_need_netns_and_version_needs_nothing() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(e.netns, None);
        assert_eq!(
            env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        assert_eq!(
            env(&[("CNI_COMMAND", "STATUS")]).unwrap().command,
            Command::Status
        );
    }

    #[test]
    fn gc_needs_cni_path() {
        let e = env(&[("CNI_COMMAND", "GC")]).unwrap_err();
        assert!(e.to_string().contains("CNI_PATH"));
        assert_eq!(
            env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")])
                .unwrap()
                .path
                .len(),
            1
        );
    }

    #[test]
    fn container_ids_and_ifnames_are_validated() {
        let base = [("CNI_COMMAND", "ADD"), ("CNI_NETNS", "/run/netns/x")];
        let e = env(&[
            base[0],
            base[1],
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("CNI_CONTAINERID"));
        let e = env(&[
            base[0],
            base[1],
            ("CNI_CONTAINERID", "ok"),
            ("CNI_IFNAME", "abcdefghijklmnop"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("15 bytes"));
        for bad in [".", "..", "a/b", "a:b", "a b"] {
            assert!(invalid_ifname(bad).is_some(), "{bad}");
        }
        assert!(valid_container_id("a1_b.c-d"));
    }

    #[test]
    fn cni_args_are_parsed() {
        let e = env(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_ARGS", "FOO=BAR;IgnoreUnknown=1"),
        ])
        .unwrap();
        assert_eq!(e.args.get("FOO").map(String::as_str), Some("BAR"));
        assert!(env(&[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "junk")]).is_err());
    }
}
