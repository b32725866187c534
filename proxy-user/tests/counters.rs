//! Privileged: `weft-proxy counters` against the real kernel. Real UDP traffic through a veth pair
//! between two namespaces; the counts must match exactly what was sent.

use std::{path::Path, process::Output, time::Duration};

use weft_testbed::{Host, Lab, Netlink};

const N: usize = 20;
const PAYLOAD: usize = 100;
/// Ethernet (14) + IPv4 (20) + UDP (8) + payload: what `skb->len` is at tc on a veth.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;

fn proxy(host: &Host, pin_dir: &Path, args: &[&str]) -> Output {
    host.command(env!("CARGO_BIN_EXE_weft-proxy"))
        .unwrap()
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "weft-proxy failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// (ingress packets, ingress bytes, egress packets, egress bytes) of `iface`, from the CLI's JSON.
fn counts(host: &Host, pin: &Path, iface: &str) -> (u64, u64, u64, u64) {
    let rows: serde_json::Value =
        serde_json::from_str(&ok(proxy(host, pin, &["counters", "show", "--json"]))).unwrap();
    let mut c = (0, 0, 0, 0);
    for r in rows.as_array().unwrap() {
        if r["interface"] != iface {
            continue;
        }
        let (p, b) = (r["packets"].as_u64().unwrap(), r["bytes"].as_u64().unwrap());
        match r["direction"].as_str().unwrap() {
            "ingress" => (c.0, c.1) = (p, b),
            "egress" => (c.2, c.3) = (p, b),
            d => panic!("unexpected direction {d}"),
        }
    }
    c
}

/// Two namespaces joined by veth v0 (10.9.0.1) ↔ v1 (10.9.0.2), IPv6 off and static neighbours,
/// so the only packets on the wire are the ones the test sends.
fn quiet_pair(lab: &mut Lab) -> (String, String) {
    lab.add_namespace("a").unwrap();
    lab.add_namespace("b").unwrap();
    let a = lab.host("a").unwrap();
    let b = lab.host("b").unwrap();
    for h in [a, b] {
        h.sysctl("net/ipv6/conf/all/disable_ipv6", "1").unwrap();
        h.sysctl("net/ipv6/conf/default/disable_ipv6", "1").unwrap();
    }
    let (ans, bns) = (a.ns().try_clone().unwrap(), b.ns().try_clone().unwrap());
    let (amac, bmac) = lab.block_on(async move {
        let an = Netlink::connect(&ans).await.unwrap();
        an.add_veth("v0", "v1", Some(&bns), None).await.unwrap();
        let v0 = an.require_link("v0").await.unwrap();
        an.add_address(v0.index, "10.9.0.1/30".parse().unwrap())
            .await
            .unwrap();
        an.set_up(v0.index).await.unwrap();
        let bn = Netlink::connect(&bns).await.unwrap();
        let v1 = bn.require_link("v1").await.unwrap();
        bn.add_address(v1.index, "10.9.0.2/30".parse().unwrap())
            .await
            .unwrap();
        bn.set_up(v1.index).await.unwrap();
        (v0.mac_string().unwrap(), v1.mac_string().unwrap())
    });
    a.exec(
        "ip",
        [
            "neigh",
            "replace",
            "10.9.0.2",
            "lladdr",
            &bmac,
            "nud",
            "permanent",
            "dev",
            "v0",
        ],
    )
    .unwrap();
    b.exec(
        "ip",
        [
            "neigh",
            "replace",
            "10.9.0.1",
            "lladdr",
            &amac,
            "nud",
            "permanent",
            "dev",
            "v1",
        ],
    )
    .unwrap();
    (amac, bmac)
}

fn send_udp(a: &Host, n: usize) {
    for _ in 0..n {
        let got = a
            .udp_roundtrip(
                "10.9.0.2:7000".parse().unwrap(),
                &[7u8; PAYLOAD],
                Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(got.len(), PAYLOAD);
    }
}

#[test]
fn counters_count_real_traffic_exactly_and_survive_the_loader() {
    let mut lab = Lab::new().unwrap();
    quiet_pair(&mut lab);
    let pin = lab.bpffs_dir("counters").unwrap();
    let a = lab.host("a").unwrap();
    let b = lab.host("b").unwrap();
    let _echo = b.udp_echo_server("10.9.0.2:7000".parse().unwrap()).unwrap();

    ok(proxy(a, &pin, &["counters", "attach", "v0"]));
    assert_eq!(counts(a, &pin, "v0"), (0, 0, 0, 0), "nothing sent yet");

    // The loader has exited: the pinned links keep counting.
    send_udp(a, N);
    let n = N as u64;
    assert_eq!(counts(a, &pin, "v0"), (n, n * FRAME, n, n * FRAME));

    // Attaching again swaps the program in place and keeps the counts (the map is pinned).
    ok(proxy(a, &pin, &["counters", "attach", "v0"]));
    assert_eq!(counts(a, &pin, "v0"), (n, n * FRAME, n, n * FRAME));
    send_udp(a, N);
    assert_eq!(
        counts(a, &pin, "v0"),
        (2 * n, 2 * n * FRAME, 2 * n, 2 * n * FRAME)
    );

    // The table names the interface.
    let table = ok(proxy(a, &pin, &["counters", "show"]));
    assert!(
        table
            .lines()
            .any(|l| l.contains("v0") && l.contains("ingress")),
        "{table}"
    );

    // Detach: no more counting, entries gone, pins gone.
    ok(proxy(a, &pin, &["counters", "detach", "v0"]));
    send_udp(a, 3);
    assert_eq!(counts(a, &pin, "v0"), (0, 0, 0, 0));
    assert_eq!(std::fs::read_dir(pin.join("links")).unwrap().count(), 0);
    ok(proxy(a, &pin, &["counters", "detach", "--all"]));
    assert!(!pin.join("maps/WEFT_IFACE_COUNTERS").exists());
}

#[test]
fn bad_input_gets_clear_errors() {
    let mut lab = Lab::new().unwrap();
    lab.add_namespace("a").unwrap();
    let pin = lab.bpffs_dir("errors").unwrap();
    let a = lab.host("a").unwrap();

    let out = proxy(a, &pin, &["counters", "attach", "nosuch0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nosuch0"),
        "error should name the interface: {err}"
    );

    let tmp = lab.temp_dir("not-bpffs").unwrap();
    let a = lab.host("a").unwrap();
    let out = proxy(a, &tmp, &["counters", "attach", "lo"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not on a bpf filesystem"), "{err}");
}
