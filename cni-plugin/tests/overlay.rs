//! Privileged: pods on different nodes talk over the VXLAN overlay programmed by `weft-overlay`,
//! and the overlay follows the node list incrementally.

mod common;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::add_on;
use serde_json::{Value, json};
use weft_testbed::{Host, Lab, NetNs, Netlink};

const T: Duration = Duration::from_secs(10);

fn overlay_once(host: &Host, nodes: &Path, name: &str, pod_cidr_file: &Path) -> Value {
    let out = host
        .command(env!("CARGO_BIN_EXE_weft-overlay"))
        .unwrap()
        .args([
            "--nodes",
            nodes.to_str().unwrap(),
            "--node-name",
            name,
            "--once",
        ])
        .args(["--pod-cidr-file", pod_cidr_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weft-overlay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn node_list(lab: &Lab, count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            json!({"name": format!("node{i}"), "address": lab.node(i).underlay_addr().unwrap().to_string(),
                   "podCIDR": format!("10.244.{i}.0/24")})
        })
        .collect()
}

struct Cluster {
    lab: Lab,
    dir: PathBuf,
    nodes_file: PathBuf,
}

impl Cluster {
    fn new(count: usize) -> Self {
        let mut lab = Lab::new().unwrap();
        for _ in 0..count {
            lab.add_node().unwrap();
        }
        let dir = lab.temp_dir("overlay").unwrap();
        let nodes_file = dir.join("nodes.json");
        std::fs::write(
            &nodes_file,
            Value::Array(node_list(&lab, count)).to_string(),
        )
        .unwrap();
        Self {
            lab,
            dir,
            nodes_file,
        }
    }

    fn pod_cidr_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}/pod-cidr"))
    }

    fn conf(&self, i: usize) -> Value {
        json!({"cniVersion": "1.1.0", "name": "weftnet", "type": "weft-cni",
               "ipam": {"podCIDRFile": self.pod_cidr_file(i), "dataDir": self.dir.join(format!("node{i}/ipam"))}})
    }

    fn overlay(&self, i: usize) -> Value {
        overlay_once(
            self.lab.node(i),
            &self.nodes_file,
            &format!("node{i}"),
            &self.pod_cidr_file(i),
        )
    }

    /// Adds a pod on node `i`; returns its address.
    fn pod(&mut self, i: usize, label: &str) -> Ipv4Addr {
        let path = self.lab.add_namespace(label).unwrap().path().to_path_buf();
        let out = add_on(self.lab.node(i), label, &path, "eth0", &self.conf(i));
        let r = out.expect_ok().json();
        weft_cni::result::first_ipv4(&r).unwrap()
    }

    fn link_mtu(&self, label: &str, name: &str) -> u32 {
        let ns = self.lab.host(label).unwrap().ns().try_clone().unwrap();
        let name = name.to_owned();
        self.lab.block_on(async move {
            let nl = Netlink::connect(&ns).await.unwrap();
            nl.require_link(&name).await.unwrap().mtu.unwrap()
        })
    }

    fn vxlan_routes(&self, i: usize) -> Vec<String> {
        let ns: NetNs = self.lab.node(i).ns().try_clone().unwrap();
        self.lab.block_on(async move {
            let nl = Netlink::connect(&ns).await.unwrap();
            let Some(dev) = nl.link_by_name("weft-vxlan").await.unwrap() else {
                return vec![];
            };
            let mut r: Vec<String> = nl
                .routes_v4()
                .await
                .unwrap()
                .into_iter()
                .filter(|r| r.oif == Some(dev.index))
                .map(|r| r.dst.to_string())
                .collect();
            r.sort();
            r
        })
    }
}

#[test]
fn pods_on_three_nodes_talk_over_the_overlay() {
    let mut c = Cluster::new(3);
    for i in 0..3 {
        let report = c.overlay(i);
        assert_eq!(report["created_device"], true);
        assert_eq!(
            report["changed"], 6,
            "2 peers x (route, neighbour, fdb): {report}"
        );
    }
    let ips: Vec<Ipv4Addr> = (0..3).map(|i| c.pod(i, &format!("pod{i}"))).collect();
    for (i, ip) in ips.iter().enumerate() {
        assert_eq!(
            ip.octets()[2] as usize,
            i,
            "pod on node{i} got {ip} from the node's pod CIDR"
        );
    }

    // MTU: the underlay is 1500, VXLAN takes 50, and pods get the difference.
    assert_eq!(c.link_mtu("pod0", "eth0"), 1450);

    let p0 = c.lab.host("pod0").unwrap();
    let p2 = c.lab.host("pod2").unwrap();
    assert!(p0.ping(ips[1], 2).unwrap(), "pod0 -> pod1 across nodes");
    assert!(
        c.lab.host("pod1").unwrap().ping(ips[2], 2).unwrap(),
        "pod1 -> pod2 across nodes"
    );

    // Several MB each way over TCP: a wrong MTU would stall here.
    let srv = p2.tcp_echo_server("0.0.0.0:9000".parse().unwrap()).unwrap();
    let payload: Vec<u8> = (0..6_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let echoed = p0
        .tcp_roundtrip(format!("{}:9000", ips[2]).parse().unwrap(), &payload, T)
        .unwrap();
    assert!(
        echoed == payload,
        "echo differs ({} bytes back)",
        echoed.len()
    );
    assert_eq!(
        srv.peers()[0].ip(),
        std::net::IpAddr::V4(ips[0]),
        "no NAT between pods"
    );
    // A large UDP datagram is fragmented and reassembled correctly.
    let udp = p2.udp_echo_server("0.0.0.0:9001".parse().unwrap()).unwrap();
    let big = vec![9u8; 4000];
    assert_eq!(
        p0.udp_roundtrip(format!("{}:9001", ips[2]).parse().unwrap(), &big, T)
            .unwrap(),
        big
    );
    drop((srv, udp));

    // Reconciling again changes nothing.
    let again = c.overlay(0);
    assert_eq!(
        (again["changed"].as_u64(), again["removed"].as_u64()),
        (Some(0), Some(0)),
        "{again}"
    );

    // node2 leaves: node0 drops exactly its route, neighbour and FDB entry, and keeps node1's.
    std::fs::write(
        &c.nodes_file,
        Value::Array(node_list(&c.lab, 2)).to_string(),
    )
    .unwrap();
    let r = c.overlay(0);
    assert_eq!(
        (r["removed"].as_u64(), r["changed"].as_u64()),
        (Some(3), Some(0)),
        "{r}"
    );
    assert_eq!(c.vxlan_routes(0), vec!["10.244.1.0/24".to_owned()]);
    assert!(p0.ping(ips[1], 1).unwrap());
    assert!(!p0.ping(ips[2], 1).unwrap());
}

#[test]
fn the_agent_follows_the_node_list() {
    let c = Cluster::new(2);
    // Start with node0 alone.
    std::fs::write(
        &c.nodes_file,
        Value::Array(node_list(&c.lab, 1)).to_string(),
    )
    .unwrap();
    let mut agent = c
        .lab
        .node(0)
        .command(env!("CARGO_BIN_EXE_weft-overlay"))
        .unwrap()
        .args([
            "--nodes",
            c.nodes_file.to_str().unwrap(),
            "--node-name",
            "node0",
            "--poll-ms",
            "50",
        ])
        .spawn()
        .unwrap();
    let wait_for = |want: Vec<String>| {
        let start = Instant::now();
        while c.vxlan_routes(0) != want {
            assert!(
                start.elapsed() < T,
                "routes {:?}, want {want:?}",
                c.vxlan_routes(0)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(vec![]);
    std::fs::write(
        &c.nodes_file,
        Value::Array(node_list(&c.lab, 2)).to_string(),
    )
    .unwrap();
    wait_for(vec!["10.244.1.0/24".to_owned()]);
    // A broken file is reported and ignored: what is programmed stays.
    std::fs::write(&c.nodes_file, "{broken").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.vxlan_routes(0), vec!["10.244.1.0/24".to_owned()]);
    std::fs::write(
        &c.nodes_file,
        Value::Array(node_list(&c.lab, 1)).to_string(),
    )
    .unwrap();
    wait_for(vec![]);
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[test]
fn traffic_leaving_the_cluster_is_masqueraded() {
    let mut c = Cluster::new(2);
    c.lab.add_external("client").unwrap();
    let ext_ip = c.lab.host("client").unwrap().underlay_addr().unwrap();
    for i in 0..2 {
        c.overlay(i);
    }
    // node0 masquerades; node1 does not (to show what happens without it).
    let mut conf0 = c.conf(0);
    conf0["ipMasq"] = json!(true);
    conf0["clusterCIDR"] = json!("10.244.0.0/16");
    let p0 = c
        .lab
        .add_namespace("masq-pod")
        .unwrap()
        .path()
        .to_path_buf();
    let r0 = add_on(c.lab.node(0), "masq-pod", &p0, "eth0", &conf0)
        .expect_ok()
        .json();
    let ip1 = c.pod(1, "plain-pod");

    let ext = c.lab.host("client").unwrap();
    let srv = ext
        .tcp_echo_server("0.0.0.0:7777".parse().unwrap())
        .unwrap();
    let dst = std::net::SocketAddr::from((ext_ip, 7777));
    let pod0 = c.lab.host("masq-pod").unwrap();
    assert_eq!(pod0.tcp_roundtrip(dst, b"out", T).unwrap(), b"out");
    let node0_addr = c.lab.node(0).underlay_addr().unwrap();
    assert_eq!(
        srv.peers()[0].ip(),
        std::net::IpAddr::V4(node0_addr),
        "the external host sees the node"
    );

    // Without masquerade the reply has no way back to a pod address.
    let pod1 = c.lab.host("plain-pod").unwrap();
    assert!(
        pod1.tcp_roundtrip(dst, b"out", Duration::from_secs(1))
            .is_err()
    );

    // Pod-to-pod across nodes keeps the pod's own address, masquerade or not.
    let inner = pod1
        .tcp_echo_server("0.0.0.0:7778".parse().unwrap())
        .unwrap();
    pod0.tcp_roundtrip(format!("{ip1}:7778").parse().unwrap(), b"in", T)
        .unwrap();
    let ip0 = weft_cni::result::first_ipv4(&r0).unwrap().to_string();
    assert_eq!(inner.peers()[0].ip().to_string(), ip0);

    // CHECK sees the masquerade table; without it, CHECK fails.
    let ns = p0.to_str().unwrap();
    let mut chk = conf0.clone();
    chk["prevResult"] = r0.clone();
    let vars = [
        ("CNI_COMMAND", "CHECK"),
        ("CNI_CONTAINERID", "masq-pod"),
        ("CNI_NETNS", ns),
        ("CNI_IFNAME", "eth0"),
    ];
    common::exec_on(c.lab.node(0), &vars, chk.to_string().as_bytes()).expect_ok();
    let tables = c.lab.node(0).exec("nft", ["list", "tables"]).unwrap();
    let table = tables
        .lines()
        .find(|l| l.contains("weft-weftnet-"))
        .expect("masquerade table")
        .to_owned();
    let name = table.split_whitespace().last().unwrap().to_owned();
    c.lab
        .node(0)
        .exec("nft", ["delete", "table", "ip", &name])
        .unwrap();
    let out = common::exec_on(c.lab.node(0), &vars, chk.to_string().as_bytes());
    assert!(
        !out.ok && out.msg().contains("masquerade"),
        "{}",
        out.stdout
    );
    // The next ADD puts it back.
    let p2 = c
        .lab
        .add_namespace("masq-pod2")
        .unwrap()
        .path()
        .to_path_buf();
    add_on(c.lab.node(0), "masq-pod2", &p2, "eth0", &conf0).expect_ok();
    common::exec_on(c.lab.node(0), &vars, chk.to_string().as_bytes()).expect_ok();
}
