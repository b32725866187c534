//! The network configuration weft-cni reads from stdin, validated with errors that name the field.
//!
//! ```json
//! { "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
//!   "bridge": "weft0", "mtu": 1450, "hairpinMode": true, "isDefaultGateway": true,
//!   "ipMasq": true, "clusterCIDR": "10.244.0.0/16",
//!   "ipam": { "subnet": "10.244.1.0/24" | "podCIDRFile": "/run/weft/pod-cidr",
//!             "rangeStart": "...", "rangeEnd": "...", "gateway": "...",
//!             "routes": [{"dst": "..."}], "dataDir": "/var/lib/weft/cni" },
//!   "dns": { "nameservers": [...], "search": [...] },
//!   "policyPinDir": "/sys/fs/bpf/weft" }
//! ```
//!
//! Unknown keys are ignored (the spec allows rejecting them, but runtimes add keys such as
//! `cni.dev/*`, `runtimeConfig` and `args` that a plugin must tolerate).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;

use crate::{
    env::invalid_ifname,
    error::{Error, Result},
    result::{Dns, Route},
};

/// The CNI versions whose config and result formats weft-cni implements.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];
/// The version weft-cni speaks natively.
pub const LATEST_VERSION: &str = "1.1.0";
/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "weft0";
/// Default IPAM state directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft/cni";

/// An attachment named in `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// The raw shape of the config; validated into [`NetConf`].
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: String,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    bridge: Option<String>,
    mtu: Option<u32>,
    hairpin_mode: Option<bool>,
    is_default_gateway: Option<bool>,
    ip_masq: Option<bool>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<IpNet>,
    #[serde(default)]
    ipam: RawIpam,
    dns: Option<Dns>,
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    policy_pin_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(rename = "type")]
    ipam_type: Option<String>,
    subnet: Option<IpNet>,
    #[serde(rename = "podCIDRFile")]
    pod_cidr_file: Option<PathBuf>,
    range_start: Option<IpAddr>,
    range_end: Option<IpAddr>,
    gateway: Option<IpAddr>,
    #[serde(default)]
    routes: Vec<Route>,
    data_dir: Option<PathBuf>,
}

/// Where the pod subnet comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubnetSource {
    /// Given in the config.
    Fixed(Ipv4Net),
    /// Read from a file holding the node's pod CIDR (written by the node agent).
    File(PathBuf),
}

/// Validated IPAM settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamConf {
    /// The pod subnet.
    pub subnet: SubnetSource,
    /// First allocatable address (default: the one after the gateway).
    pub range_start: Option<Ipv4Addr>,
    /// Last allocatable address (default: the one before broadcast).
    pub range_end: Option<Ipv4Addr>,
    /// Gateway (default: the subnet's first address).
    pub gateway: Option<Ipv4Addr>,
    /// Extra routes for the pod.
    pub routes: Vec<Route>,
    /// Where allocations are stored.
    pub data_dir: PathBuf,
}

/// A validated network configuration.
#[derive(Clone, Debug)]
pub struct NetConf {
    /// The request's CNI version (one of [`SUPPORTED_VERSIONS`]).
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Bridge the host ends of the veths are plugged into.
    pub bridge: String,
    /// MTU for the bridge and the veths; derived when absent.
    pub mtu: Option<u32>,
    /// Hairpin mode on the bridge ports.
    pub hairpin_mode: bool,
    /// Give the pod a default route through the bridge.
    pub is_default_gateway: bool,
    /// Masquerade pod traffic that leaves the cluster CIDR.
    pub ip_masq: bool,
    /// The cluster's pod network (masquerade exempts it); defaults to the node's pod subnet.
    pub cluster_cidr: Option<Ipv4Net>,
    /// IPAM settings.
    pub ipam: IpamConf,
    /// DNS settings passed through to the result.
    pub dns: Option<Dns>,
    /// The previous result (CHECK, DEL, chained ADD).
    pub prev_result: Option<serde_json::Value>,
    /// `cni.dev/valid-attachments` (GC).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// weft-proxy's pin directory: when set, ADD attaches weft-proxy's NetworkPolicy programs to
    /// the pod's host-side interface before the pod can send, so policy applies from its first
    /// packet.
    pub policy_pin_dir: Option<PathBuf>,
}

/// Decodes stdin: code 6 if it is not JSON, code 1 for an unsupported version.
pub fn decode(stdin: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(stdin).map_err(Error::Decode)
}

/// The `cniVersion` of a decoded config, checked against [`SUPPORTED_VERSIONS`].
pub fn version_of(value: &serde_json::Value) -> Result<String> {
    let v = value
        .get("cniVersion")
        .ok_or_else(|| Error::config("cniVersion", "missing"))?
        .as_str()
        .ok_or_else(|| Error::config("cniVersion", "not a string"))?;
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(v.to_owned())
    } else {
        Err(Error::Version {
            msg: format!("incompatible CNI version {v}"),
            details: format!("weft-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
        })
    }
}

fn valid_name(name: &str) -> bool {
    crate::env::valid_container_id(name)
}

fn to_v4(field: &str, ip: Option<IpAddr>) -> Result<Option<Ipv4Addr>> {
    match ip {
        None => Ok(None),
        Some(IpAddr::V4(a)) => Ok(Some(a)),
        Some(IpAddr::V6(a)) => Err(Error::config(field, format!("{a}: only IPv4 is supported"))),
    }
}

impl NetConf {
    /// Validates a decoded config (its version must already have been checked).
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let raw: RawConf = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            Error::config(if path == "." { "config" } else { &path }, e.inner())
        })?;
        let name = raw
            .name
            .ok_or_else(|| Error::config("name", "missing network name"))?;
        if !valid_name(&name) {
            return Err(Error::config(
                "name",
                format!("{name:?} must match ^[A-Za-z0-9][A-Za-z0-9_.\\-]*$"),
            ));
        }
        if let Some(t) = &raw.plugin_type
            && (t.contains('/') || t.contains('\\'))
        {
            return Err(Error::config(
                "type",
                format!("{t:?} must not contain a path separator"),
            ));
        }
        let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_owned());
        if let Some(why) = invalid_ifname(&bridge) {
            return Err(Error::config("bridge", format!("{bridge:?} {why}")));
        }
        if let Some(mtu) = raw.mtu
            && !(576..=65535).contains(&mtu)
        {
            return Err(Error::config(
                "mtu",
                format!("{mtu} is outside 576..=65535"),
            ));
        }
        let cluster_cidr = match raw.cluster_cidr {
            None => None,
            Some(IpNet::V4(n)) => Some(n.trunc()),
            Some(IpNet::V6(n)) => {
                return Err(Error::config(
                    "clusterCIDR",
                    format!("{n}: only IPv4 is supported"),
                ));
            }
        };
        let ipam = Self::ipam(raw.ipam)?;
        Ok(Self {
            cni_version: raw.cni_version,
            name,
            bridge,
            mtu: raw.mtu,
            hairpin_mode: raw.hairpin_mode.unwrap_or(true),
            is_default_gateway: raw.is_default_gateway.unwrap_or(true),
            ip_masq: raw.ip_masq.unwrap_or(false),
            cluster_cidr,
            ipam,
            dns: raw.dns.filter(|d| !d.is_empty()),
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
            policy_pin_dir: raw.policy_pin_dir,
        })
    }

    fn ipam(raw: RawIpam) -> Result<IpamConf> {
        if let Some(t) = &raw.ipam_type
            && !matches!(t.as_str(), "weft-cni" | "weft")
        {
            return Err(Error::config(
                "ipam.type",
                format!(
                    "{t:?}: weft-cni has built-in IPAM; leave ipam.type out or set it to \"weft-cni\""
                ),
            ));
        }
        let subnet = match (raw.subnet, raw.pod_cidr_file) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "ipam",
                    "give either subnet or podCIDRFile, not both",
                ));
            }
            (None, None) => {
                return Err(Error::config(
                    "ipam",
                    "one of subnet or podCIDRFile is required",
                ));
            }
            (Some(IpNet::V4(n)), None) => SubnetSource::Fixed(check_subnet("ipam.subnet", n)?),
            (Some(IpNet::V6(n)), None) => {
                return Err(Error::config(
                    "ipam.subnet",
                    format!("{n}: only IPv4 is supported"),
                ));
            }
            (None, Some(file)) => SubnetSource::File(file),
        };
        Ok(IpamConf {
            subnet,
            range_start: to_v4("ipam.rangeStart", raw.range_start)?,
            range_end: to_v4("ipam.rangeEnd", raw.range_end)?,
            gateway: to_v4("ipam.gateway", raw.gateway)?,
            routes: raw.routes,
            data_dir: raw.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        })
    }
}

/// A pod subnet must leave room for a gateway and at least one pod: /30 or larger.
pub fn check_subnet(field: &str, net: Ipv4Net) -> Result<Ipv4Net> {
    if net.prefix_len() > 30 {
        return Err(Error::config(
            field,
            format!("{net} is too small (need /30 or larger)"),
        ));
    }
    Ok(net.trunc())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::error::code;

    fn conf(v: serde_json::Value) -> Result<NetConf> {
        version_of(&v)?;
        NetConf::from_value(v)
    }

    fn base() -> serde_json::Value {
        json!({"cniVersion": "1.1.0", "name": "net1", "type": "weft-cni",
               "ipam": {"subnet": "10.244.1.0/24"}})
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c = conf(base()).unwrap();
        assert_eq!(c.bridge, "weft0");
        assert!(c.hairpin_mode && c.is_default_gateway && !c.ip_masq);
        assert_eq!(
            c.ipam.subnet,
            SubnetSource::Fixed("10.244.1.0/24".parse().unwrap())
        );
        assert_eq!(c.ipam.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn versions_are_negotiated() {
        let mut v = base();
        v["cniVersion"] = json!("2.0.0");
        let e = conf(v).unwrap_err().to_cni("1.1.0");
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.details.contains("1.0.0") && e.details.contains("1.1.0"));
        let mut v = base();
        v["cniVersion"] = json!("1.0.0");
        assert_eq!(conf(v).unwrap().cni_version, "1.0.0");
    }

    #[test]
    fn bad_fields_are_code_7_and_named() {
        for (patch, field) in [
            (json!({"name": null}), "name"),
            (json!({"name": "-x"}), "name"),
            (json!({"mtu": 100}), "mtu"),
            (json!({"mtu": "big"}), "mtu"),
            (json!({"bridge": "this-name-is-too-long"}), "bridge"),
            (json!({"ipam": {"subnet": "10.0.0.0/31"}}), "ipam.subnet"),
            (json!({"ipam": {"subnet": "nonsense"}}), "ipam.subnet"),
            (json!({"ipam": {}}), "ipam"),
            (
                json!({"ipam": {"type": "host-local", "subnet": "10.0.0.0/24"}}),
                "ipam.type",
            ),
            (json!({"type": "../evil"}), "type"),
        ] {
            let mut v = base();
            for (k, val) in patch.as_object().unwrap() {
                if val.is_null() {
                    v.as_object_mut().unwrap().remove(k);
                } else {
                    v[k] = val.clone();
                }
            }
            let e = conf(v).unwrap_err().to_cni("1.1.0");
            assert_eq!(e.code, code::INVALID_CONFIG, "{field}: {e}");
            assert!(
                e.msg.contains(field),
                "message should name {field}: {}",
                e.msg
            );
        }
    }

    #[test]
    fn runtime_keys_are_tolerated() {
        let mut v = base();
        v["runtimeConfig"] = json!({"portMappings": []});
        v["args"] = json!({"cni": {"x": 1}});
        v["cni.dev/attachment"] = json!("whatever");
        v["cni.dev/valid-attachments"] = json!([{"containerID": "a", "ifname": "eth0"}]);
        let c = conf(v).unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
    }

    #[test]
    fn the_shipped_example_conflist_is_valid() {
        let text = include_str!("../examples/weft.conflist");
        let list: serde_json::Value = serde_json::from_str(text).unwrap();
        for plugin in list["plugins"].as_array().unwrap() {
            // What a runtime sends: the plugin's config plus the list's version and name.
            let mut v = plugin.clone();
            v["cniVersion"] = list["cniVersion"].clone();
            v["name"] = list["name"].clone();
            let c = conf(v).unwrap();
            assert!(c.ip_masq);
            assert_eq!(
                c.ipam.subnet,
                SubnetSource::File("/run/weft/pod-cidr".into())
            );
        }
    }

    #[test]
    fn non_json_is_code_6() {
        assert_eq!(decode(b"not json").unwrap_err().code(), code::DECODE);
    }
}
