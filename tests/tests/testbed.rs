//! Privileged: the test bed itself. Two nodes on the underlay, one pod on each wired by hand
//! (veth + routes), ping and TCP/UDP across the underlay, and nothing left afterwards.

use std::{net::SocketAddr, path::Path, time::Duration};

use ipnet::IpNet;
use weft_testbed::{Lab, Netlink};

const T: Duration = Duration::from_secs(5);

fn route_to(lab: &Lab, node: usize, cidr: &str, via: std::net::Ipv4Addr) {
    let ns = lab.node(node).ns().try_clone().unwrap();
    let cidr: IpNet = cidr.parse().unwrap();
    lab.block_on(async move {
        let n = Netlink::connect(&ns).await.unwrap();
        n.add_route_v4(cidr, Some(via), None, false).await.unwrap();
    });
}

#[test]
fn two_nodes_one_pod_each_talk_across_the_underlay() {
    let mut lab = Lab::new().expect("lab");
    let n0 = lab.add_node().unwrap();
    let n1 = lab.add_node().unwrap();
    lab.wire_pod(n0, "pod-a", "10.244.0.2".parse().unwrap())
        .unwrap();
    lab.wire_pod(n1, "pod-b", "10.244.1.2".parse().unwrap())
        .unwrap();
    let (u0, u1) = (
        lab.node(n0).underlay_addr().unwrap(),
        lab.node(n1).underlay_addr().unwrap(),
    );
    route_to(&lab, n0, "10.244.1.0/24", u1);
    route_to(&lab, n1, "10.244.0.0/24", u0);

    // The nodes see each other on the underlay.
    assert!(
        lab.node(n0).ping(u1, 2).unwrap(),
        "node0 cannot ping node1 on the underlay"
    );

    let a = lab.host("pod-a").unwrap();
    let b = lab.host("pod-b").unwrap();
    assert!(
        a.ping("10.244.1.2".parse().unwrap(), 2).unwrap(),
        "pod-a cannot ping pod-b"
    );

    // TCP with a payload larger than one window, and the server sees the pod's own address.
    let server = b.tcp_echo_server("0.0.0.0:8080".parse().unwrap()).unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let dst: SocketAddr = "10.244.1.2:8080".parse().unwrap();
    let echoed = a.tcp_roundtrip(dst, &payload, T).unwrap();
    assert_eq!(echoed, payload);
    assert_eq!(server.peers()[0].ip().to_string(), "10.244.0.2");

    let udp = b.udp_echo_server("0.0.0.0:5353".parse().unwrap()).unwrap();
    let got = a
        .udp_roundtrip("10.244.1.2:5353".parse().unwrap(), b"hello", T)
        .unwrap();
    assert_eq!(got, b"hello");
    assert_eq!(udp.peers()[0].ip().to_string(), "10.244.0.2");

    // An address nobody has is unreachable (the test can fail).
    assert!(
        a.tcp_roundtrip(
            "10.244.1.2:9".parse().unwrap(),
            b"x",
            Duration::from_secs(1)
        )
        .is_err()
    );
}

#[test]
fn dropping_the_lab_removes_every_namespace_and_directory() {
    let (names, dirs) = {
        let mut lab = Lab::new().expect("lab");
        lab.add_node().unwrap();
        lab.add_external("client").unwrap();
        lab.add_namespace("pod").unwrap();
        let cg = lab.cgroup("procs").unwrap();
        let dirs = vec![
            lab.bpffs_dir("pins").unwrap(),
            lab.temp_dir("scratch").unwrap(),
            cg.clone(),
        ];
        // A process in the lab's cgroup is killed so the cgroup can go.
        let mut in_cg = lab
            .node(0)
            .command_in_cgroup("sleep", &cg)
            .unwrap()
            .arg("300")
            .spawn()
            .unwrap();
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
        assert_eq!(
            procs.trim(),
            in_cg.id().to_string(),
            "the child joined the cgroup"
        );
        // A process left running inside a namespace must not keep it alive.
        let mut child = lab
            .node(0)
            .command("sleep")
            .unwrap()
            .arg("300")
            .spawn()
            .unwrap();
        let names: Vec<_> = [lab.underlay().path().to_path_buf()]
            .into_iter()
            .chain(lab.nodes().iter().map(|h| h.path().to_path_buf()))
            .chain(
                ["client", "pod"]
                    .iter()
                    .map(|l| lab.host(l).unwrap().path().to_path_buf()),
            )
            .collect();
        for n in &names {
            assert!(
                n.exists(),
                "{} should exist while the lab lives",
                n.display()
            );
        }
        drop(lab);
        let _ = child.wait();
        let _ = in_cg.wait();
        (names, dirs)
    };
    for p in names.iter().chain(dirs.iter()) {
        assert!(!Path::new(p).exists(), "{} left behind", p.display());
    }
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new().expect("lab");
        lab.add_node().unwrap();
        seen = Some(lab.node(0).path().to_path_buf());
        panic!("deliberate");
    }));
    assert!(result.is_err());
    assert!(!seen.unwrap().exists());
}
