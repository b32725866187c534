//! A small async netlink API bound to one network namespace, over `rtnetlink`.
//!
//! Every method is one or two netlink requests; "already exists" and "already gone" are reported
//! to the caller as errors with an errno (see [`crate::Error::errno`]) so callers decide what is
//! idempotent for them.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan,
    RouteMessageBuilder,
};

use crate::{Error, NetNs, Result};

/// What weft needs to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, when the link has one.
    pub mac: Option<Vec<u8>>,
    /// MTU.
    pub mtu: Option<u32>,
    /// Administratively up.
    pub up: bool,
    /// Link kind ("veth", "bridge", "vxlan", ...), when reported.
    pub kind: Option<String>,
    /// Index of the bridge (controller) the link is a port of.
    pub controller: Option<u32>,
}

impl LinkInfo {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut info = Self {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
            controller: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => info.name.clone_from(n),
                LinkAttribute::Address(a) => info.mac = Some(a.clone()),
                LinkAttribute::Mtu(m) => info.mtu = Some(*m),
                LinkAttribute::Controller(c) => info.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let NlLinkInfo::Kind(k) = i {
                            info.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }

    /// The MAC formatted as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> Option<String> {
        self.mac.as_ref().map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
    }
}

/// An IPv4 route as weft reads it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// Destination prefix (`0.0.0.0/0` for the default route).
    pub dst: IpNet,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
}

/// A netlink connection whose socket lives in one network namespace.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

fn nl_err(op: &'static str, object: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let object = object.into();
    move |source| Error::Netlink { op, object, source }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| -c.get()) == Some(errno))
}

const ENODEV: i32 = 19;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;

impl Netlink {
    /// Opens a netlink socket inside `ns`. Must be called within a tokio runtime; the connection
    /// task is spawned on it.
    pub async fn connect(ns: &NetNs) -> Result<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns.run(move || {
            let _guard = rt.enter();
            rtnetlink::new_connection()
        })??;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Opens a netlink socket in the calling thread's namespace.
    pub async fn connect_current() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Looks a link up by name; `None` if there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>> {
        let mut req = std::pin::pin!(
            self.handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
        );
        match req.try_next().await {
            Ok(Some(msg)) => Ok(Some(LinkInfo::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, ENODEV) => Ok(None),
            Err(e) => Err(nl_err("get link", name)(e)),
        }
    }

    /// Looks a link up by index; `None` if there is none.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>> {
        let mut req = std::pin::pin!(self.handle.link().get().match_index(index).execute());
        match req.try_next().await {
            Ok(Some(msg)) => Ok(Some(LinkInfo::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&e, ENODEV) => Ok(None),
            Err(e) => Err(nl_err("get link", index.to_string())(e)),
        }
    }

    /// All links in the namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("dump", "links"))?;
        Ok(msgs.iter().map(LinkInfo::from_message).collect())
    }

    /// Looks a link up by name and fails if it does not exist.
    pub async fn require_link(&self, name: &str) -> Result<LinkInfo> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "interface",
                name: name.to_owned(),
            })
    }

    /// Creates a veth pair `name` (here) ↔ `peer`; the peer is created directly inside `peer_ns`
    /// when given. Both ends get `mtu` when given.
    pub async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_ns: Option<&NetNs>,
        mtu: Option<u32>,
    ) -> Result<()> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new().name(peer.to_owned());
        if let Some(ns) = peer_ns {
            peer_msg = peer_msg.setns_by_fd(ns.fd().as_raw_fd());
        }
        if let Some(mtu) = mtu {
            peer_msg = peer_msg.mtu(mtu);
        }
        let mut builder = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())));
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.add_link("add veth", name, builder.build()).await
    }

    async fn add_link(&self, op: &'static str, name: &str, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(op, name))
    }

    /// Creates a bridge.
    pub async fn add_bridge(&self, name: &str, mtu: Option<u32>) -> Result<()> {
        let mut builder = LinkBridge::new(name);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        self.add_link("add bridge", name, builder.build()).await
    }

    /// Sets a link administratively up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.set_link("set up", index, msg).await
    }

    async fn set_link(&self, op: &'static str, index: u32, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl_err(op, index.to_string()))
    }

    /// Makes `index` a port of the bridge `bridge_index`.
    pub async fn set_controller(&self, index: u32, bridge_index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(bridge_index)
            .build();
        self.set_link("set controller of", index, msg).await
    }

    /// Turns hairpin mode on or off for a bridge port (lets a pod reach itself through the
    /// bridge, e.g. via a service address that resolves back to it).
    pub async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(nl_err("set hairpin on", index.to_string()))
    }

    /// Sets a link's hardware address. Setting a bridge's MAC explicitly pins it, so it no longer
    /// changes as ports come and go.
    pub async fn set_mac(&self, index: u32, mac: Vec<u8>) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).address(mac).build();
        self.set_link("set mac of", index, msg).await
    }

    /// Sets a link's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.set_link("set mtu of", index, msg).await
    }

    /// Deletes a link by index.
    pub async fn delete_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl_err("delete link", index.to_string()))
    }

    /// Deletes a link by name; succeeds if it does not exist. Returns whether one was deleted.
    pub async fn delete_link_by_name(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, ENODEV) => Ok(false),
            Err(e) => Err(nl_err("delete link", name)(e)),
        }
    }

    /// Adds an address (with its prefix) to a link.
    pub async fn add_address(&self, index: u32, addr: IpNet) -> Result<()> {
        self.handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
            .map_err(nl_err("add address", format!("{addr} on ifindex {index}")))
    }

    /// Removes an address from a link; succeeds if it is not there.
    pub async fn del_address(&self, index: u32, addr: IpNet) -> Result<()> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.addr())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("get address", addr.to_string()))?;
        for msg in msgs {
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, EADDRNOTAVAIL) => {}
                Err(e) => return Err(nl_err("delete address", addr.to_string())(e)),
            }
        }
        Ok(())
    }

    /// The addresses on a link, with prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("get addresses of", index.to_string()))?;
        let mut out = Vec::new();
        for msg in msgs {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr
                    && let Ok(net) = IpNet::new(*ip, msg.header.prefix_len)
                {
                    out.push(net);
                }
            }
        }
        Ok(out)
    }

    fn route_v4(dst: IpNet, gateway: Option<Ipv4Addr>, oif: Option<u32>) -> Result<RouteMessage> {
        let IpNet::V4(dst4) = dst else {
            return Err(Error::NotFound {
                kind: "ipv4 route destination",
                name: dst.to_string(),
            });
        };
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst4.addr(), dst4.prefix_len());
        match gateway {
            Some(gw) => b = b.gateway(gw),
            None => b = b.scope(RouteScope::Link),
        }
        if let Some(oif) = oif {
            b = b.output_interface(oif);
        }
        Ok(b.build())
    }

    /// Adds (or, with `replace`, replaces) an IPv4 route in the main table.
    pub async fn add_route_v4(
        &self,
        dst: IpNet,
        gateway: Option<Ipv4Addr>,
        oif: Option<u32>,
        replace: bool,
    ) -> Result<()> {
        let msg = Self::route_v4(dst, gateway, oif)?;
        let req = self.handle.route().add(msg);
        let req = if replace { req.replace() } else { req };
        req.execute()
            .await
            .map_err(nl_err("add route", dst.to_string()))
    }

    /// Adds or replaces an IPv4 route through `gateway` on `oif` with the `onlink` flag, for a
    /// next hop that is not in any subnet of the link (a VXLAN peer's VTEP address).
    pub async fn replace_route_v4_onlink(
        &self,
        dst: IpNet,
        gateway: Ipv4Addr,
        oif: u32,
    ) -> Result<()> {
        let IpNet::V4(d) = dst else {
            return Err(Error::NotFound {
                kind: "ipv4 route destination",
                name: dst.to_string(),
            });
        };
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d.addr(), d.prefix_len())
            .gateway(gateway)
            .output_interface(oif)
            .onlink()
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err("replace route", dst.to_string()))
    }

    /// Deletes an IPv4 route; succeeds if it does not exist.
    pub async fn del_route_v4(
        &self,
        dst: IpNet,
        gateway: Option<Ipv4Addr>,
        oif: Option<u32>,
    ) -> Result<()> {
        let msg = Self::route_v4(dst, gateway, oif)?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, ESRCH) || is_errno(&e, ENOENT) => Ok(()),
            Err(e) => Err(nl_err("delete route", dst.to_string())(e)),
        }
    }

    /// The IPv4 routes of the main table.
    pub async fn routes_v4(&self) -> Result<Vec<RouteInfo>> {
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("dump", "ipv4 routes"))?;
        let mut out = Vec::new();
        for msg in msgs.iter().filter(|m| m.header.table == 254) {
            let mut dst = None;
            let mut gateway = None;
            let mut oif = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                        gateway = Some(IpAddr::V4(*a))
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(Ipv4Addr::UNSPECIFIED);
            if let Ok(net) = IpNet::new(IpAddr::V4(dst), msg.header.destination_prefix_length) {
                out.push(RouteInfo {
                    dst: net,
                    gateway,
                    oif,
                });
            }
        }
        Ok(out)
    }

    /// Creates a VXLAN device bound to `dev_index`, sourcing packets from `local`, with address
    /// learning off (weft programs FDB and neighbour entries itself).
    #[allow(clippy::too_many_arguments)]
    pub async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        dev_index: u32,
        port: u16,
        mtu: u32,
        mac: Vec<u8>,
    ) -> Result<()> {
        let msg = LinkVxlan::new(name, vni)
            .local(local)
            .dev(dev_index)
            .port(port)
            .learning(false)
            .mtu(mtu)
            .address(mac)
            .build();
        self.add_link("add vxlan", name, msg).await
    }

    /// Every IPv4 address in the namespace, with the index of its link.
    pub async fn all_addresses(&self) -> Result<Vec<(u32, IpNet)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("dump", "addresses"))?;
        let mut out = Vec::new();
        for msg in msgs {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr
                    && let Ok(net) = IpNet::new(*ip, msg.header.prefix_len)
                {
                    out.push((msg.header.index, net));
                }
            }
        }
        Ok(out)
    }

    /// Adds or replaces a permanent IPv4 neighbour (ARP) entry on a link.
    pub async fn replace_neighbour(&self, index: u32, ip: Ipv4Addr, mac: &[u8]) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(mac)
            .replace()
            .execute()
            .await
            .map_err(nl_err("replace neighbour", ip.to_string()))
    }

    /// Adds or replaces a permanent FDB entry on a VXLAN device: frames for `mac` are sent to
    /// the underlay address `dst`.
    pub async fn replace_fdb(&self, index: u32, mac: &[u8], dst: Ipv4Addr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, mac)
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .replace()
            .execute()
            .await
            .map_err(nl_err("replace fdb entry", format!("{mac:02x?} -> {dst}")))
    }

    /// Dumps the neighbour table of one family: (ifindex, state, IPv4 destination, MAC).
    async fn neighbour_dump(
        &self,
        family: AddressFamily,
    ) -> Result<Vec<(u32, NeighbourState, Option<Ipv4Addr>, Option<Vec<u8>>)>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("dump", "neighbours"))?;
        Ok(msgs
            .iter()
            .map(|m| {
                let (mut dst, mut mac) = (None, None);
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => {
                            dst = Some(*i)
                        }
                        // AF_BRIDGE entries carry the IPv4 destination as raw bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                            dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
                        }
                        NeighbourAttribute::LinkLayerAddress(l) => mac = Some(l.clone()),
                        _ => {}
                    }
                }
                (m.header.ifindex, m.header.state, dst, mac)
            })
            .collect())
    }

    /// The permanent IPv4 neighbour entries of a link: (address, MAC).
    pub async fn neighbours(&self, index: u32) -> Result<Vec<(Ipv4Addr, Vec<u8>)>> {
        Ok(self
            .neighbour_dump(AddressFamily::Inet)
            .await?
            .into_iter()
            .filter(|(i, state, _, _)| *i == index && *state == NeighbourState::Permanent)
            .filter_map(|(_, _, ip, mac)| Some((ip?, mac?)))
            .collect())
    }

    /// The FDB entries of a device that point at a remote address: (MAC, destination).
    pub async fn fdb(&self, index: u32) -> Result<Vec<(Vec<u8>, Ipv4Addr)>> {
        Ok(self
            .neighbour_dump(AddressFamily::Bridge)
            .await?
            .into_iter()
            .filter(|(i, _, _, _)| *i == index)
            .filter_map(|(_, _, dst, mac)| Some((mac?, dst?)))
            .collect())
    }

    /// Deletes a neighbour entry (IPv4 or FDB, as given by `bridge`); succeeds if it is gone.
    pub async fn del_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: &[u8],
        bridge: bool,
    ) -> Result<()> {
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = index;
        if bridge {
            msg.header.family = AddressFamily::Bridge;
            msg.header.flags = NeighbourFlags::Own;
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        } else {
            msg.header.family = AddressFamily::Inet;
        }
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, ENOENT) => Ok(()),
            Err(e) => Err(nl_err("delete neighbour", ip.to_string())(e)),
        }
    }

    /// The underlying rtnetlink handle, for requests this API does not wrap.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}
