//! The six CNI operations. ADD wires a pod: an address from IPAM, a veth pair whose host end is a
//! port of the node bridge (the pod's gateway) and whose other end is `CNI_IFNAME` inside the pod,
//! a default route through the bridge. Any failure after the address was allocated undoes what was
//! done (host veth, and with it the pod end; the reservation), so a failed ADD leaves nothing.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use ipnet::{IpNet, Ipv4Net};
use weft_bpf::pins::PinLayout;
use weft_netns::{LinkInfo, NetNs};

use crate::{
    config::{self, LATEST_VERSION, NetConf, SUPPORTED_VERSIONS},
    env::{Command, Env},
    error::{CniError, Error, Result},
    ipam::{Pool, Store},
    links::{Kernel, Links},
    result::{CniResult, Interface, IpConfig, Route},
};

/// Name of the VXLAN device the overlay agent creates; its MTU is the pod MTU when present.
pub const VXLAN_DEVICE: &str = "weft-vxlan";

/// Name of the host end of an attachment's veth: `wft` + 12 hex digits of a hash of
/// (container ID, ifname). Deterministic, so DEL and GC find it without any state.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("wft{:012x}", h & 0xffff_ffff_ffff)
}

const EEXIST: i32 = 17;

/// Runs one invocation, as the `weft-cni` binary does: the `CNI_*` variables from `vars` and the
/// network configuration `stdin` carried. Returns what to print on stdout on success (nothing
/// for DEL, CHECK, STATUS, GC), or the spec's error in the configuration's CNI version (the
/// newest when it names none this plugin speaks). stdin is parsed once, here; this is the one
/// place an [`Error`] becomes the wire's [`CniError`].
pub fn invoke(
    vars: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Option<String>, CniError> {
    let config = config::decode(stdin);
    let version = config
        .as_ref()
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str())
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(LATEST_VERSION)
        .to_owned();
    let answer = Env::from_vars(vars).and_then(|env| {
        if env.command == Command::Version {
            let versions = serde_json::json!({
                "cniVersion": version,
                "supportedVersions": SUPPORTED_VERSIONS,
            });
            return Ok(Some(versions.to_string()));
        }
        let config = config?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("starting runtime: {e}")))?
            .block_on(run(&env, config))
    });
    answer.map_err(|e| e.to_cni(&version))
}

/// Runs one command other than VERSION on a decoded configuration.
async fn run(env: &Env, value: serde_json::Value) -> Result<Option<String>> {
    let version = config::version_of(&value)?;
    if matches!(env.command, Command::Status | Command::Gc) && version == "1.0.0" {
        return Err(Error::Version {
            msg: format!(
                "{:?} needs cniVersion 1.1.0 or later, the config has {version}",
                env.command
            ),
            details: String::new(),
        });
    }
    let conf = NetConf::from_value(value)?;
    match env.command {
        Command::Add => {
            let result = add(env, &conf).await?;
            Ok(Some(
                serde_json::to_string(&result).map_err(|e| Error::internal(e.to_string()))?,
            ))
        }
        Command::Del => del(env, &conf).await.map(|()| None),
        Command::Check => check(env, &conf).await.map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Gc => gc(&conf).await.map(|()| None),
        Command::Version => unreachable!("answered by invoke"),
    }
}

fn open_netns(path: &Path) -> Result<NetNs> {
    NetNs::open(path)
        .map_err(|e| Error::internal(format!("failed to open netns {}: {e}", path.display())))
}

/// The two namespaces an attachment spans: the node's and the pod's (at `netns_path`).
#[derive(Clone, Copy)]
struct Sides<'a, L> {
    host: &'a L,
    pod: &'a L,
    netns_path: &'a Path,
}

/// The kernels of the plugin's own namespace and of the pod's at `CNI_NETNS` (ADD and CHECK
/// have one); the pod's must be another namespace.
async fn kernels(env: &Env) -> Result<(Kernel, Kernel)> {
    let netns_path = env
        .netns
        .as_deref()
        .expect("validated: ADD and CHECK have CNI_NETNS");
    let netns = open_netns(netns_path)?;
    if netns.same_as(&NetNs::current()?)? {
        return Err(Error::env(format!(
            "CNI_NETNS {} is the plugin's own network namespace",
            netns_path.display()
        )));
    }
    Ok((Kernel::current().await?, Kernel::of(netns).await?))
}

async fn add(env: &Env, conf: &NetConf) -> Result<CniResult> {
    let (host, pod) = kernels(env).await?;
    let sides = Sides {
        host: &host,
        pod: &pod,
        netns_path: env.netns.as_deref().expect("checked by kernels"),
    };
    add_with(conf, env.container_id(), env.ifname(), sides).await
}

/// ADD of `cid`'s `ifname` across `sides`.
async fn add_with<L: Links>(
    conf: &NetConf,
    cid: &str,
    ifname: &str,
    sides: Sides<'_, L>,
) -> Result<CniResult> {
    let Sides {
        host,
        pod,
        netns_path,
    } = sides;
    let pool = Pool::from_conf(&conf.ipam)?;
    let store = Store::open(&conf.ipam.data_dir, &conf.name)?;
    if pod.link_by_name(ifname).await?.is_some() {
        return Err(Error::internal(format!(
            "interface {ifname} already exists in {}",
            netns_path.display()
        )));
    }
    let ip = store.allocate(&pool, cid, ifname)?;
    let host_veth = host_veth_name(cid, ifname);
    let attachment = Attachment {
        conf,
        pool: &pool,
        ip,
        host_veth: &host_veth,
        ifname,
        host,
        pod,
        netns_path,
    };
    match wire(&attachment).await {
        Ok(result) => chain(conf, result),
        Err(e) => {
            // Undo: deleting the host end removes the pod end too.
            if let Err(u) = host.delete_link_by_name(&host_veth).await {
                tracing::warn!(interface = host_veth, error = %u, "undoing failed ADD");
            }
            if let Err(u) = store.release(cid, ifname) {
                tracing::warn!(error = %u, "releasing address after failed ADD");
            }
            Err(e)
        }
    }
}

/// When weft-cni runs after another plugin in a chain, its result extends the previous one
/// (A-3): the earlier interfaces, addresses and routes stay, ours follow with their interface
/// indices shifted.
fn chain(conf: &NetConf, mut ours: CniResult) -> Result<CniResult> {
    let Some(prev) = conf.prev_result.clone() else {
        return Ok(ours);
    };
    let mut prev: CniResult = serde_path_to_error::deserialize(prev)
        .map_err(|e| Error::config(&format!("prevResult.{}", e.path()), e.inner()))?;
    let shift = prev.interfaces.len();
    for ip in &mut ours.ips {
        ip.interface = ip.interface.map(|i| i + shift);
    }
    prev.cni_version = ours.cni_version;
    prev.interfaces.append(&mut ours.interfaces);
    prev.ips.append(&mut ours.ips);
    prev.routes.append(&mut ours.routes);
    prev.dns = ours.dns.or(prev.dns);
    Ok(prev)
}

/// The MTU for pods: configured, else the overlay device's, else the default route's interface's.
async fn pod_mtu(conf: &NetConf, hnl: &impl Links) -> Result<u32> {
    if let Some(mtu) = conf.mtu {
        return Ok(mtu);
    }
    if let Some(mtu) = hnl.link_by_name(VXLAN_DEVICE).await?.and_then(|l| l.mtu) {
        return Ok(mtu);
    }
    let default_oif = hnl
        .routes_v4()
        .await?
        .into_iter()
        .find(|r| r.dst.prefix_len() == 0)
        .and_then(|r| r.oif);
    if let Some(oif) = default_oif
        && let Some(mtu) = hnl.link_by_index(oif).await?.and_then(|l| l.mtu)
    {
        return Ok(mtu);
    }
    Ok(1500)
}

/// Creates the bridge with the gateway address if missing; returns it, up.
async fn ensure_bridge(hnl: &impl Links, name: &str, gateway: IpNet, mtu: u32) -> Result<LinkInfo> {
    let bridge = match hnl.link_by_name(name).await? {
        Some(b) => b,
        None => {
            match hnl.add_bridge(name, Some(mtu)).await {
                Ok(()) => {
                    let b = hnl.require_link(name).await?;
                    // Pin the MAC so it does not change as ports come and go (pods cache it).
                    if let Some(mac) = b.mac.clone() {
                        hnl.set_mac(b.index, mac).await?;
                    }
                    b
                }
                // A concurrent ADD created it first.
                Err(e) if e.errno() == Some(EEXIST) => hnl.require_link(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    if bridge.kind.as_deref().is_some_and(|k| k != "bridge") {
        return Err(Error::config(
            "bridge",
            format!("{name} exists and is a {:?}, not a bridge", bridge.kind),
        ));
    }
    match hnl.add_address(bridge.index, gateway).await {
        Ok(()) => {}
        Err(e) if e.errno() == Some(EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    if !bridge.up {
        hnl.set_up(bridge.index).await?;
    }
    Ok(bridge)
}

/// One pod interface being wired by ADD: what it is made from and where.
struct Attachment<'a, L> {
    conf: &'a NetConf,
    pool: &'a Pool,
    /// The pod's address, allocated from `pool`.
    ip: Ipv4Addr,
    /// The host end's name.
    host_veth: &'a str,
    /// The pod end's name (`CNI_IFNAME`).
    ifname: &'a str,
    /// The host's namespace.
    host: &'a L,
    /// The pod's namespace.
    pod: &'a L,
    netns_path: &'a Path,
}

async fn wire<L: Links>(a: &Attachment<'_, L>) -> Result<CniResult> {
    let Attachment {
        conf,
        pool,
        ip,
        host_veth,
        ifname,
        host: hnl,
        pod: cnl,
        netns_path,
    } = *a;
    let prefix = pool.subnet.prefix_len();
    let mtu = pod_mtu(conf, hnl).await?;
    let gw_net = IpNet::V4(Ipv4Net::new(pool.gateway, prefix).expect("prefix from a valid subnet"));
    let bridge = ensure_bridge(hnl, &conf.bridge, gw_net, mtu).await?;

    hnl.add_veth_to(host_veth, ifname, cnl, mtu)
        .await
        .map_err(|e| {
            if e.errno() == Some(EEXIST) {
                Error::internal(format!(
                    "host interface {host_veth} already exists: was this attachment added twice?"
                ))
            } else {
                e.into()
            }
        })?;
    let host = hnl.require_link(host_veth).await?;
    if let Some(dir) = &conf.policy_pin_dir {
        attach_policy(dir, host.index)?;
    }
    hnl.set_controller(host.index, bridge.index).await?;
    if conf.hairpin_mode {
        hnl.set_hairpin(host.index, true).await?;
    }
    hnl.set_up(host.index).await?;

    let pod = cnl.require_link(ifname).await?;
    let addr = IpNet::V4(Ipv4Net::new(ip, prefix).expect("valid prefix"));
    cnl.add_address(pod.index, addr).await?;
    cnl.set_up(pod.index).await?;
    let mut routes = Vec::new();
    if conf.is_default_gateway {
        let default = Route {
            dst: "0.0.0.0/0".parse().expect("valid"),
            gw: Some(IpAddr::V4(pool.gateway)),
        };
        // A pod attached twice keeps its first interface's default route; this attachment then
        // adds none and does not report one.
        match cnl
            .add_route_v4(default.dst, Some(pool.gateway), Some(pod.index))
            .await
        {
            Ok(()) => routes.push(default),
            Err(e) if e.errno() == Some(EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for r in &conf.ipam.routes {
        let gw = match r.gw.unwrap_or(IpAddr::V4(pool.gateway)) {
            IpAddr::V4(g) => g,
            IpAddr::V6(g) => {
                return Err(Error::config(
                    "ipam.routes",
                    format!("gateway {g}: only IPv4 is supported"),
                ));
            }
        };
        cnl.add_route_v4(r.dst, Some(gw), Some(pod.index)).await?;
        routes.push(r.clone());
    }
    // Routing between pods and beyond the node needs IPv4 forwarding in the node's namespace.
    hnl.enable_forwarding()
        .map_err(|e| Error::io("enabling", Path::new("/proc/sys/net/ipv4/ip_forward"), e))?;
    if conf.ip_masq {
        let cluster = conf.cluster_cidr.unwrap_or(pool.subnet);
        if crate::masq::ensure(&conf.name, pool.subnet, cluster)? {
            tracing::info!(subnet = %pool.subnet, %cluster, "masquerade table written");
        }
    }

    Ok(CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: bridge.name.clone(),
                mac: bridge.mac_string(),
                mtu: bridge.mtu,
                sandbox: None,
            },
            Interface {
                name: host.name.clone(),
                mac: host.mac_string(),
                mtu: Some(mtu),
                sandbox: None,
            },
            Interface {
                name: ifname.to_owned(),
                mac: pod.mac_string(),
                mtu: Some(mtu),
                sandbox: Some(netns_path.display().to_string()),
            },
        ],
        ips: vec![IpConfig {
            address: addr,
            gateway: Some(IpAddr::V4(pool.gateway)),
            interface: Some(2),
        }],
        routes,
        dns: conf.dns.clone(),
    })
}

async fn del(env: &Env, conf: &NetConf) -> Result<()> {
    del_with(
        conf,
        env.container_id(),
        env.ifname(),
        &Kernel::current().await?,
    )
    .await
}

/// DEL, in the node's namespace `host`.
async fn del_with(conf: &NetConf, cid: &str, ifname: &str, host: &impl Links) -> Result<()> {
    // The reservation goes whatever state the rest is in (D-2).
    let store = Store::open(&conf.ipam.data_dir, &conf.name)?;
    store.release(cid, ifname)?;
    // Deleting the host end removes the pod end with it; the pod side is never touched directly,
    // so a DEL after an ADD that failed on a taken ifname cannot remove someone else's interface.
    let veth = host_veth_name(cid, ifname);
    if let Some(dir) = &conf.policy_pin_dir
        && let Some(link) = host.link_by_name(&veth).await?
    {
        for ingress in [true, false] {
            let _ = std::fs::remove_file(PinLayout::new(dir).policy_link(link.index, ingress));
        }
    }
    host.delete_link_by_name(&veth).await?;
    Ok(())
}

/// Attaches weft-proxy's pinned NetworkPolicy programs (tcx) to the pod's host-side interface
/// and pins the links, before the interface is up: the pod's first packet already meets policy
/// (a pod the agent has not processed yet is isolated until it has). When no agent has pinned
/// the programs yet there is nothing to attach; the agent attaches when it starts.
fn attach_policy(dir: &std::path::Path, ifindex: u32) -> Result<()> {
    use std::os::fd::AsFd as _;
    use weft_bpf::sys;
    use weft_proxy_common::names;
    let layout = PinLayout::new(dir);
    for (prog, ingress) in [
        (names::PROG_POLICY_FROM_POD, true),
        (names::PROG_POLICY_TO_POD, false),
    ] {
        let path = layout.prog(prog);
        let fd = match sys::obj_get(&path) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(Error::Bpf {
                    what: format!("opening policy program {}", path.display()),
                    source,
                });
            }
        };
        let link = sys::tcx_attach(fd.as_fd(), ifindex, ingress).map_err(|source| Error::Bpf {
            what: format!("attaching {prog} to interface {ifindex}"),
            source,
        })?;
        let pin = layout.policy_link(ifindex, ingress);
        // A pin left by an earlier interface with the same index.
        let _ = std::fs::remove_file(&pin);
        sys::obj_pin(link.as_fd(), &pin).map_err(|source| Error::Bpf {
            what: format!("pinning {}", pin.display()),
            source,
        })?;
    }
    Ok(())
}

async fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let (host, pod) = kernels(env).await?;
    let sides = Sides {
        host: &host,
        pod: &pod,
        netns_path: env.netns.as_deref().expect("checked by kernels"),
    };
    check_with(conf, env.container_id(), env.ifname(), sides).await
}

/// CHECK of `cid`'s `ifname` across `sides`.
async fn check_with<L: Links>(
    conf: &NetConf,
    cid: &str,
    ifname: &str,
    sides: Sides<'_, L>,
) -> Result<()> {
    let Sides {
        host: hnl,
        pod: cnl,
        netns_path,
    } = sides;
    let prev = conf
        .prev_result
        .clone()
        .ok_or_else(|| Error::config("prevResult", "CHECK needs the ADD result as prevResult"))?;
    let prev: CniResult = serde_path_to_error::deserialize(prev)
        .map_err(|e| Error::config(&format!("prevResult.{}", e.path()), e.inner()))?;
    let sandbox = netns_path.display().to_string();
    let idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.as_deref() == Some(sandbox.as_str()))
        .ok_or_else(|| {
            Error::internal(format!(
                "prevResult has no interface {ifname} in sandbox {sandbox}"
            ))
        })?;
    let pod = cnl
        .link_by_name(ifname)
        .await?
        .ok_or_else(|| Error::internal(format!("interface {ifname} not found in {sandbox}")))?;
    if let Some(mac) = &prev.interfaces[idx].mac
        && pod.mac_string().as_deref() != Some(mac.as_str())
    {
        return Err(Error::internal(format!(
            "interface {ifname} has MAC {:?}, prevResult says {mac}",
            pod.mac_string()
        )));
    }
    if !pod.up {
        return Err(Error::internal(format!(
            "interface {ifname} in {sandbox} is down"
        )));
    }
    let addrs = cnl.addresses(pod.index).await?;
    let mut pod_ip = None;
    for ipc in prev.ips.iter().filter(|i| i.interface == Some(idx)) {
        if !addrs.contains(&ipc.address) {
            return Err(Error::internal(format!(
                "failed to match addr {} on interface {ifname}",
                ipc.address
            )));
        }
        if let IpAddr::V4(a) = ipc.address.addr() {
            pod_ip = Some(a);
        }
    }
    let routes = cnl.routes_v4().await?;
    for r in &prev.routes {
        let gw = r.gw.or_else(|| prev.ips.first().and_then(|i| i.gateway));
        if !routes
            .iter()
            .any(|have| have.dst == r.dst && (gw.is_none() || have.gateway == gw))
        {
            return Err(Error::internal(format!(
                "route to {} via {gw:?} is missing in {sandbox}",
                r.dst
            )));
        }
    }
    let host_veth = host_veth_name(cid, ifname);
    let host = hnl
        .link_by_name(&host_veth)
        .await?
        .ok_or_else(|| Error::internal(format!("host interface {host_veth} not found")))?;
    let bridge = hnl
        .link_by_name(&conf.bridge)
        .await?
        .ok_or_else(|| Error::internal(format!("bridge {} not found", conf.bridge)))?;
    if host.controller != Some(bridge.index) {
        return Err(Error::internal(format!(
            "{host_veth} is not a port of bridge {}",
            conf.bridge
        )));
    }
    if conf.ip_masq {
        let pool = Pool::from_conf(&conf.ipam)?;
        let cluster = conf.cluster_cidr.unwrap_or(pool.subnet);
        if !crate::masq::present(&conf.name, pool.subnet, cluster)? {
            return Err(Error::internal(format!(
                "masquerade table {} is missing",
                crate::masq::table_name(&conf.name, pool.subnet, cluster)
            )));
        }
    }
    let store = Store::open(&conf.ipam.data_dir, &conf.name)?;
    let reserved = store.lookup(cid, ifname)?;
    if reserved.is_none() || (pod_ip.is_some() && reserved != pod_ip) {
        return Err(Error::internal(format!(
            "IPAM reservation for {cid}/{ifname} is {reserved:?}, the pod has {pod_ip:?}"
        )));
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<()> {
    let not_ready = |msg: String, details: String| Error::NotAvailable { msg, details };
    let pool = Pool::from_conf(&conf.ipam)
        .map_err(|e| not_ready(format!("not ready: {e}"), String::new()))?;
    let store = Store::open(&conf.ipam.data_dir, &conf.name)
        .map_err(|e| not_ready(e.to_string(), String::new()))?;
    if store.free(&pool)? == 0 {
        return Err(not_ready(
            format!("no free address in {}", pool.subnet),
            format!("all {} addresses are allocated", pool.size()),
        ));
    }
    Ok(())
}

async fn gc(conf: &NetConf) -> Result<()> {
    gc_with(conf, &Kernel::current().await?).await
}

/// GC, in the node's namespace `hnl`.
async fn gc_with(conf: &NetConf, hnl: &impl Links) -> Result<()> {
    // Without the list the runtime has not said what is valid; removing everything would be wrong.
    let Some(valid) = &conf.valid_attachments else {
        return Ok(());
    };
    let store = Store::open(&conf.ipam.data_dir, &conf.name)?;
    let released = store.gc(valid)?;
    let mut errors = Vec::new();
    for (ip, owner) in &released {
        tracing::info!(%ip, container = owner.container_id, ifname = owner.ifname, "gc: released");
        if let Err(e) = hnl
            .delete_link_by_name(&host_veth_name(&owner.container_id, &owner.ifname))
            .await
        {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::Internal {
            msg: "gc could not remove every stale interface".into(),
            details: errors.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_and_differ() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("wft"));
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("ab", "ceth0"));
    }

    #[test]
    fn version_echoes_a_supported_request_version() {
        let version = |stdin: &[u8]| {
            let vars = |k: &str| (k == "CNI_COMMAND").then(|| "VERSION".to_owned());
            let out = invoke(vars, stdin).unwrap().unwrap();
            serde_json::from_str::<serde_json::Value>(&out).unwrap()
        };
        let v = version(br#"{"cniVersion":"1.0.0"}"#);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["1.0.0", "1.1.0"])
        );
        assert_eq!(version(b"")["cniVersion"], "1.1.0");
    }

    #[test]
    fn errors_are_answered_once_in_the_configs_version_with_the_causes_code() {
        let add = |k: &str| (k == "CNI_COMMAND").then(|| "ADD".to_owned());
        // No CNI_CONTAINERID etc.: code 4, in the version the config asked for.
        let e = invoke(add, br#"{"cniVersion":"1.0.0","name":"n"}"#).unwrap_err();
        assert_eq!((e.code, e.cni_version.as_deref()), (4, Some("1.0.0")));
        // Not JSON: the newest version answers.
        let status = |k: &str| (k == "CNI_COMMAND").then(|| "STATUS".to_owned());
        let e = invoke(status, b"{").unwrap_err();
        assert_eq!((e.code, e.cni_version.as_deref()), (6, Some("1.1.0")));
        // A version this plugin does not speak: code 1, with what it does speak.
        let e = invoke(status, br#"{"cniVersion":"9.9.9","name":"n"}"#).unwrap_err();
        assert_eq!((e.code, e.cni_version.as_deref()), (1, Some("1.1.0")));
        assert!(e.details.contains("1.0.0, 1.1.0"), "{}", e.details);
        // A pool without addresses, a pod CIDR not written yet: the causes' own codes.
        assert_eq!(
            Error::PoolExhausted {
                pool: "10.0.0.0/30".into(),
                used: 2,
                size: 2
            }
            .to_cni("1.1.0")
            .details,
            "2 of 2 addresses are allocated"
        );
        assert_eq!(
            Error::NoPodCidr("/x".into()).to_cni("1.1.0").code,
            crate::error::code::TRY_AGAIN
        );
    }

    /// ADD, DEL, CHECK and GC against the in-memory kernel: the plugin's logic without root.
    mod with_a_fake_kernel {
        use super::*;
        use crate::links::fake::Fake;

        fn block<T>(f: impl std::future::Future<Output = T>) -> T {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(f)
        }

        /// A configuration whose IPAM state is in a fresh directory (removed on drop).
        struct Setup {
            conf: NetConf,
            dir: PathBuf,
            host: Fake,
            pod: Fake,
        }

        impl Drop for Setup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }

        use std::path::PathBuf;

        fn setup(name: &str, extra: serde_json::Value) -> Setup {
            let dir =
                std::env::temp_dir().join(format!("weft-cni-unit-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let mut v = serde_json::json!({
                "cniVersion": "1.1.0", "name": "weftnet", "type": "weft-cni", "bridge": "weft0",
                "isDefaultGateway": true,
                "ipam": {"subnet": "10.244.0.0/29", "dataDir": dir},
            });
            for (k, x) in extra.as_object().into_iter().flatten() {
                v[k] = x.clone();
            }
            let host = Fake::new();
            let pod = host.namespace(1);
            Setup {
                conf: NetConf::from_value(v).unwrap(),
                dir,
                host,
                pod,
            }
        }

        const NETNS: &str = "/run/netns/pod";

        fn sides<'a>(host: &'a Fake, pod: &'a Fake) -> Sides<'a, Fake> {
            Sides {
                host,
                pod,
                netns_path: Path::new(NETNS),
            }
        }

        impl Setup {
            fn add(&self, cid: &str) -> Result<CniResult> {
                self.add_in(cid, &self.pod)
            }
            fn add_in(&self, cid: &str, pod: &Fake) -> Result<CniResult> {
                block(add_with(&self.conf, cid, "eth0", sides(&self.host, pod)))
            }
            fn free(&self) -> usize {
                let pool = Pool::from_conf(&self.conf.ipam).unwrap();
                Store::open(&self.conf.ipam.data_dir, &self.conf.name)
                    .unwrap()
                    .free(&pool)
                    .unwrap() as usize
            }
            fn reserved(&self, cid: &str) -> Option<Ipv4Addr> {
                Store::open(&self.conf.ipam.data_dir, &self.conf.name)
                    .unwrap()
                    .lookup(cid, "eth0")
                    .unwrap()
            }
        }

        #[test]
        fn add_wires_a_bridge_port_the_pod_end_its_address_and_default_route() {
            let s = setup("add", serde_json::json!({"mtu": 1400, "hairpinMode": true}));
            let r = s.add("c1").unwrap();
            let host = s.host.links();
            let bridge = host.iter().find(|l| l.info.name == "weft0").unwrap();
            assert_eq!(bridge.info.kind.as_deref(), Some("bridge"));
            assert!(bridge.info.up);
            assert_eq!(
                bridge.addrs,
                vec!["10.244.0.1/29".parse::<IpNet>().unwrap()]
            );
            let veth = host
                .iter()
                .find(|l| l.info.name == host_veth_name("c1", "eth0"))
                .unwrap();
            assert_eq!(veth.info.controller, Some(bridge.info.index));
            assert!(veth.info.up && veth.hairpin);
            assert_eq!(veth.info.mtu, Some(1400));
            let pod = s.pod.links();
            assert_eq!(pod.len(), 1);
            assert_eq!(pod[0].info.name, "eth0");
            assert_eq!(pod[0].peer, Some(veth.info.index));
            assert_eq!(
                pod[0].addrs,
                vec!["10.244.0.2/29".parse::<IpNet>().unwrap()]
            );
            let routes = s.pod.routes();
            assert_eq!(routes.len(), 1);
            assert_eq!(routes[0].dst.prefix_len(), 0);
            assert_eq!(routes[0].gateway, Some("10.244.0.1".parse().unwrap()));
            assert_eq!(s.host.state.borrow().forwarding, vec![0]);
            // The result names the three interfaces, the pod's address on the third.
            let names: Vec<&str> = r.interfaces.iter().map(|i| i.name.as_str()).collect();
            assert_eq!(names, ["weft0", veth.info.name.as_str(), "eth0"]);
            assert_eq!(r.interfaces[2].sandbox.as_deref(), Some(NETNS));
            assert_eq!(r.ips[0].interface, Some(2));
            assert_eq!(r.ips[0].address.to_string(), "10.244.0.2/29");
            assert_eq!(s.reserved("c1"), Some("10.244.0.2".parse().unwrap()));
            // CHECK agrees with what ADD made.
            let mut conf = s.conf.clone();
            conf.prev_result = Some(serde_json::to_value(&r).unwrap());
            block(check_with(&conf, "c1", "eth0", sides(&s.host, &s.pod))).unwrap();
        }

        #[test]
        fn a_failed_add_leaves_no_interface_and_no_reservation() {
            for op in ["add route", "set up", "add address", "set controller"] {
                let s = setup(
                    &format!("fail-{}", op.replace(' ', "-")),
                    serde_json::json!({}),
                );
                let free = s.free();
                // The first such request fails, in whichever namespace it is made.
                s.host.fail_next(op);
                let e = s.add("c1").unwrap_err();
                assert!(e.to_string().contains(op), "{op}: {e}");
                let veths: Vec<_> = s
                    .host
                    .links()
                    .into_iter()
                    .filter(|l| l.info.kind.as_deref() == Some("veth"))
                    .collect();
                assert!(veths.is_empty(), "{op}: host veth left: {veths:?}");
                assert!(s.pod.links().is_empty(), "{op}: pod end left");
                assert!(s.pod.routes().is_empty(), "{op}: route left");
                assert_eq!(s.reserved("c1"), None, "{op}: address kept");
                assert_eq!(s.free(), free, "{op}");
                s.add("c2").unwrap();
            }
        }

        #[test]
        fn add_refuses_a_taken_ifname_without_allocating_or_touching_it() {
            let s = setup("taken", serde_json::json!({}));
            block(s.pod.add_bridge("eth0", None)).unwrap();
            let e = s.add("c1").unwrap_err();
            assert!(e.to_string().contains("already exists"), "{e}");
            assert_eq!(s.reserved("c1"), None);
            assert_eq!(s.pod.links().len(), 1, "the pod's own eth0 stays");
            // DEL of the failed attachment does not remove the pod's interface either.
            block(del_with(&s.conf, "c1", "eth0", &s.host)).unwrap();
            assert_eq!(s.pod.links().len(), 1);
        }

        #[test]
        fn del_removes_both_ends_and_the_reservation_and_is_idempotent() {
            let s = setup("del", serde_json::json!({}));
            s.add("c1").unwrap();
            let pod2 = s.host.namespace(2);
            s.add_in("c2", &pod2).unwrap();
            block(del_with(&s.conf, "c1", "eth0", &s.host)).unwrap();
            block(del_with(&s.conf, "c1", "eth0", &s.host)).unwrap();
            assert_eq!(s.reserved("c1"), None);
            assert!(s.reserved("c2").is_some());
            let names: Vec<String> = s.host.links().into_iter().map(|l| l.info.name).collect();
            assert!(!names.contains(&host_veth_name("c1", "eth0")), "{names:?}");
            assert!(names.contains(&host_veth_name("c2", "eth0")), "{names:?}");
            assert!(
                s.pod.links().is_empty(),
                "c1's pod end went with its host end"
            );
            assert_eq!(pod2.links().len(), 1, "c2's stays");
        }

        #[test]
        fn gc_releases_and_unwires_what_the_runtime_no_longer_lists() {
            let s = setup("gc", serde_json::json!({}));
            let pods: Vec<Fake> = (1..=3).map(|i| s.host.namespace(i)).collect();
            for (i, p) in pods.iter().enumerate() {
                let cid = format!("c{i}");
                s.add_in(&cid, p).unwrap();
            }
            // Without validAttachments GC removes nothing.
            block(gc_with(&s.conf, &s.host)).unwrap();
            assert!(s.reserved("c0").is_some());
            let mut conf = s.conf.clone();
            conf.valid_attachments = Some(vec![crate::config::Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            }]);
            block(gc_with(&conf, &s.host)).unwrap();
            assert_eq!(
                (s.reserved("c0"), s.reserved("c2")),
                (None, None),
                "stale reservations released"
            );
            assert!(s.reserved("c1").is_some());
            assert!(pods[0].links().is_empty() && pods[2].links().is_empty());
            assert_eq!(pods[1].links().len(), 1);
        }

        #[test]
        fn an_existing_bridge_is_reused_and_a_non_bridge_of_its_name_refused() {
            let s = setup("bridge", serde_json::json!({}));
            s.add("c1").unwrap();
            let pod2 = s.host.namespace(2);
            s.add_in("c2", &pod2).unwrap();
            let bridges = s
                .host
                .links()
                .into_iter()
                .filter(|l| l.info.name == "weft0")
                .count();
            assert_eq!(bridges, 1);

            let s = setup("notbridge", serde_json::json!({}));
            let p = s.pod.clone();
            block(s.host.add_veth_to("weft0", "x", &p, 1500)).unwrap();
            let e = s.add("c1").unwrap_err();
            assert!(e.to_string().contains("not a bridge"), "{e}");
            assert_eq!(s.reserved("c1"), None);
        }
    }
}
