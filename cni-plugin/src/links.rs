//! The seam between the CNI operations ([`crate::plugin`]) and the kernel: [`Links`], the
//! requests ADD, DEL, CHECK and GC make in one network namespace (links, addresses, routes, the
//! forwarding switch). [`Kernel`] is the real one, netlink through `weft-netns` in a namespace
//! it holds; the tests' in-memory fake ([`fake`]) keeps two namespaces' links, addresses and
//! routes, so what the operations create, in what order, and what they undo after a failure
//! is unit-tested without root. The privileged tests remain the proof that the kernel does it.

use std::path::Path;

use ipnet::IpNet;
use std::net::Ipv4Addr;
use weft_netns::{LinkInfo, NetNs, Netlink, Result, RouteInfo};

/// What the plugin asks of one network namespace's kernel.
pub(crate) trait Links {
    /// The link named `name`, if any.
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>>;
    /// The link with index `index`, if any.
    async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>>;
    /// The link named `name`, which must exist.
    async fn require_link(&self, name: &str) -> Result<LinkInfo>;
    /// The main table's IPv4 routes.
    async fn routes_v4(&self) -> Result<Vec<RouteInfo>>;
    /// Creates a bridge.
    async fn add_bridge(&self, name: &str, mtu: Option<u32>) -> Result<()>;
    /// Sets a link's hardware address.
    async fn set_mac(&self, index: u32, mac: Vec<u8>) -> Result<()>;
    /// Adds an address to a link.
    async fn add_address(&self, index: u32, addr: IpNet) -> Result<()>;
    /// A link's addresses.
    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>>;
    /// Sets a link up.
    async fn set_up(&self, index: u32) -> Result<()>;
    /// Creates a veth pair `name` (here) ↔ `peer`, the peer directly inside `peer_in`'s
    /// namespace; both ends get `mtu`.
    async fn add_veth_to(&self, name: &str, peer: &str, peer_in: &Self, mtu: u32) -> Result<()>;
    /// Makes a link a port of a bridge.
    async fn set_controller(&self, index: u32, bridge_index: u32) -> Result<()>;
    /// Sets a bridge port's hairpin mode.
    async fn set_hairpin(&self, index: u32, on: bool) -> Result<()>;
    /// Deletes the link named `name` (a veth's peer goes with it); false when there was none.
    async fn delete_link_by_name(&self, name: &str) -> Result<bool>;
    /// Adds an IPv4 route.
    async fn add_route_v4(
        &self,
        dst: IpNet,
        gateway: Option<Ipv4Addr>,
        oif: Option<u32>,
    ) -> Result<()>;
    /// Turns IPv4 forwarding on in the namespace, if it is off.
    fn enable_forwarding(&self) -> std::io::Result<()>;
}

/// The kernel's links in one network namespace, through netlink.
#[derive(Debug)]
pub(crate) struct Kernel {
    nl: Netlink,
    ns: NetNs,
}

impl Kernel {
    /// The plugin's own namespace (the node's).
    pub(crate) async fn current() -> Result<Self> {
        Ok(Self {
            nl: Netlink::connect_current().await?,
            ns: NetNs::current()?,
        })
    }

    /// The namespace `ns` (a pod's).
    pub(crate) async fn of(ns: NetNs) -> Result<Self> {
        Ok(Self {
            nl: Netlink::connect(&ns).await?,
            ns,
        })
    }
}

impl Links for Kernel {
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>> {
        self.nl.link_by_name(name).await
    }
    async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>> {
        self.nl.link_by_index(index).await
    }
    async fn require_link(&self, name: &str) -> Result<LinkInfo> {
        self.nl.require_link(name).await
    }
    async fn routes_v4(&self) -> Result<Vec<RouteInfo>> {
        self.nl.routes_v4().await
    }
    async fn add_bridge(&self, name: &str, mtu: Option<u32>) -> Result<()> {
        self.nl.add_bridge(name, mtu).await
    }
    async fn set_mac(&self, index: u32, mac: Vec<u8>) -> Result<()> {
        self.nl.set_mac(index, mac).await
    }
    async fn add_address(&self, index: u32, addr: IpNet) -> Result<()> {
        self.nl.add_address(index, addr).await
    }
    async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        self.nl.addresses(index).await
    }
    async fn set_up(&self, index: u32) -> Result<()> {
        self.nl.set_up(index).await
    }
    async fn add_veth_to(&self, name: &str, peer: &str, peer_in: &Self, mtu: u32) -> Result<()> {
        self.nl
            .add_veth(name, peer, Some(&peer_in.ns), Some(mtu))
            .await
    }
    async fn set_controller(&self, index: u32, bridge_index: u32) -> Result<()> {
        self.nl.set_controller(index, bridge_index).await
    }
    async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        self.nl.set_hairpin(index, on).await
    }
    async fn delete_link_by_name(&self, name: &str) -> Result<bool> {
        self.nl.delete_link_by_name(name).await
    }
    async fn add_route_v4(
        &self,
        dst: IpNet,
        gateway: Option<Ipv4Addr>,
        oif: Option<u32>,
    ) -> Result<()> {
        self.nl.add_route_v4(dst, gateway, oif, false).await
    }
    fn enable_forwarding(&self) -> std::io::Result<()> {
        // /proc/sys/net is the namespace of the process reading it: the plugin's own, which is
        // the only namespace this is called for.
        const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
        let on = std::fs::read_to_string(Path::new(PATH)).map(|s| s.trim() == "1")?;
        if !on {
            std::fs::write(PATH, "1")?;
        }
        Ok(())
    }
}

/// An in-memory kernel of several namespaces, for unit tests of the operations.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;

    /// One link of the fake kernel.
    #[derive(Clone, Debug)]
    pub(crate) struct Link {
        /// Which namespace it is in.
        pub ns: usize,
        /// What netlink would report.
        pub info: LinkInfo,
        /// Its addresses.
        pub addrs: Vec<IpNet>,
        /// A veth's other end (its index).
        pub peer: Option<u32>,
        /// A bridge port's hairpin mode.
        pub hairpin: bool,
    }

    /// Every namespace's state.
    #[derive(Debug, Default)]
    pub(crate) struct State {
        next_index: u32,
        /// Every link of every namespace.
        pub links: Vec<Link>,
        /// Routes, with their namespace.
        pub routes: Vec<(usize, RouteInfo)>,
        /// Namespaces whose forwarding was turned on.
        pub forwarding: Vec<usize>,
        /// An operation that fails (errno EIO) the next time it is asked for.
        pub fail: Option<&'static str>,
    }

    /// One namespace's view of a shared fake kernel.
    #[derive(Clone, Debug)]
    pub(crate) struct Fake {
        /// The shared state.
        pub state: Rc<RefCell<State>>,
        ns: usize,
    }

    fn errno(op: &'static str, e: nix::errno::Errno) -> weft_netns::Error {
        weft_netns::Error::Sys {
            op,
            path: Default::default(),
            source: e,
        }
    }

    impl Fake {
        /// A fresh kernel's namespace 0 (the node).
        pub(crate) fn new() -> Self {
            Self {
                state: Rc::new(RefCell::new(State {
                    next_index: 1,
                    ..State::default()
                })),
                ns: 0,
            }
        }

        /// Another namespace of the same kernel.
        pub(crate) fn namespace(&self, ns: usize) -> Self {
            Self {
                state: self.state.clone(),
                ns,
            }
        }

        /// Makes `op` fail once.
        pub(crate) fn fail_next(&self, op: &'static str) {
            self.state.borrow_mut().fail = Some(op);
        }

        fn check(&self, op: &'static str) -> Result<()> {
            let mut s = self.state.borrow_mut();
            if s.fail == Some(op) {
                s.fail = None;
                return Err(errno(op, nix::errno::Errno::EIO));
            }
            Ok(())
        }

        /// The links of this namespace.
        pub(crate) fn links(&self) -> Vec<Link> {
            let s = self.state.borrow();
            s.links
                .iter()
                .filter(|l| l.ns == self.ns)
                .cloned()
                .collect()
        }

        /// This namespace's routes.
        pub(crate) fn routes(&self) -> Vec<RouteInfo> {
            let s = self.state.borrow();
            s.routes
                .iter()
                .filter(|(ns, _)| *ns == self.ns)
                .map(|(_, r)| r.clone())
                .collect()
        }

        fn create(&self, ns: usize, name: &str, kind: &str, mtu: Option<u32>) -> Result<u32> {
            let mut s = self.state.borrow_mut();
            if s.links.iter().any(|l| l.ns == ns && l.info.name == name) {
                return Err(errno("add link", nix::errno::Errno::EEXIST));
            }
            let index = s.next_index;
            s.next_index += 1;
            s.links.push(Link {
                ns,
                info: LinkInfo {
                    index,
                    name: name.to_owned(),
                    mac: Some(vec![0x02, 0, 0, 0, 0, index as u8]),
                    mtu,
                    up: false,
                    kind: Some(kind.to_owned()),
                    controller: None,
                },
                addrs: Vec::new(),
                peer: None,
                hairpin: false,
            });
            Ok(index)
        }

        fn with_link<T>(
            &self,
            op: &'static str,
            index: u32,
            f: impl FnOnce(&mut Link) -> T,
        ) -> Result<T> {
            self.check(op)?;
            let mut s = self.state.borrow_mut();
            let ns = self.ns;
            s.links
                .iter_mut()
                .find(|l| l.ns == ns && l.info.index == index)
                .map(f)
                .ok_or_else(|| errno(op, nix::errno::Errno::ENODEV))
        }

        fn find(&self, f: impl Fn(&Link) -> bool) -> Option<LinkInfo> {
            self.links().into_iter().find(|l| f(l)).map(|l| l.info)
        }
    }

    impl Links for Fake {
        async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>> {
            self.check("get link")?;
            Ok(self.find(|l| l.info.name == name))
        }
        async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>> {
            self.check("get link")?;
            Ok(self.find(|l| l.info.index == index))
        }
        async fn require_link(&self, name: &str) -> Result<LinkInfo> {
            self.link_by_name(name)
                .await?
                .ok_or_else(|| weft_netns::Error::NotFound {
                    kind: "interface",
                    name: name.to_owned(),
                })
        }
        async fn routes_v4(&self) -> Result<Vec<RouteInfo>> {
            self.check("get routes")?;
            Ok(self.routes())
        }
        async fn add_bridge(&self, name: &str, mtu: Option<u32>) -> Result<()> {
            self.check("add bridge")?;
            self.create(self.ns, name, "bridge", mtu).map(|_| ())
        }
        async fn set_mac(&self, index: u32, mac: Vec<u8>) -> Result<()> {
            self.with_link("set mac", index, |l| l.info.mac = Some(mac))
        }
        async fn add_address(&self, index: u32, addr: IpNet) -> Result<()> {
            self.with_link("add address", index, |l| {
                if l.addrs.contains(&addr) {
                    Err(errno("add address", nix::errno::Errno::EEXIST))
                } else {
                    l.addrs.push(addr);
                    Ok(())
                }
            })?
        }
        async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
            self.with_link("get addresses", index, |l| l.addrs.clone())
        }
        async fn set_up(&self, index: u32) -> Result<()> {
            self.with_link("set up", index, |l| l.info.up = true)
        }
        async fn add_veth_to(
            &self,
            name: &str,
            peer: &str,
            peer_in: &Self,
            mtu: u32,
        ) -> Result<()> {
            self.check("add veth")?;
            if peer_in.find(|l| l.info.name == peer).is_some() {
                return Err(errno("add veth", nix::errno::Errno::EEXIST));
            }
            let a = self.create(self.ns, name, "veth", Some(mtu))?;
            let b = self.create(peer_in.ns, peer, "veth", Some(mtu))?;
            let mut s = self.state.borrow_mut();
            for l in &mut s.links {
                if l.info.index == a {
                    l.peer = Some(b);
                } else if l.info.index == b {
                    l.peer = Some(a);
                }
            }
            Ok(())
        }
        async fn set_controller(&self, index: u32, bridge_index: u32) -> Result<()> {
            self.with_link("set controller", index, |l| {
                l.info.controller = Some(bridge_index)
            })
        }
        async fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
            self.with_link("set hairpin", index, |l| l.hairpin = on)
        }
        async fn delete_link_by_name(&self, name: &str) -> Result<bool> {
            self.check("delete link")?;
            let Some(link) = self.links().into_iter().find(|l| l.info.name == name) else {
                return Ok(false);
            };
            let gone: Vec<u32> = [Some(link.info.index), link.peer]
                .into_iter()
                .flatten()
                .collect();
            let mut s = self.state.borrow_mut();
            s.links.retain(|l| !gone.contains(&l.info.index));
            s.routes
                .retain(|(_, r)| r.oif.is_none_or(|o| !gone.contains(&o)));
            Ok(true)
        }
        async fn add_route_v4(
            &self,
            dst: IpNet,
            gateway: Option<Ipv4Addr>,
            oif: Option<u32>,
        ) -> Result<()> {
            self.check("add route")?;
            let mut s = self.state.borrow_mut();
            let ns = self.ns;
            if s.routes.iter().any(|(n, r)| *n == ns && r.dst == dst) {
                return Err(errno("add route", nix::errno::Errno::EEXIST));
            }
            s.routes.push((
                ns,
                RouteInfo {
                    dst,
                    gateway: gateway.map(std::net::IpAddr::V4),
                    oif,
                },
            ));
            Ok(())
        }
        fn enable_forwarding(&self) -> std::io::Result<()> {
            let mut s = self.state.borrow_mut();
            if !s.forwarding.contains(&self.ns) {
                s.forwarding.push(self.ns);
            }
            Ok(())
        }
    }
}
