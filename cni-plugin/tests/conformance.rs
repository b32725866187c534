//! Privileged: weft-cni against the CNI 1.1 checklist (`shared/specs/cni-1.1-checklist.md`), with
//! the real binary run inside a test-bed node and pods as real namespaces. IDs in comments refer to
//! the checklist.

mod common;

use std::{path::Path, time::Duration};

use common::{Node, conf};
use serde_json::{Value, json};
use weft_testbed::NetNs;

const T: Duration = Duration::from_secs(5);

fn pod_ip(result: &Value) -> String {
    weft_cni::result::first_ipv4(result).unwrap().to_string()
}

#[test]
fn add_check_del_lifecycle_and_result_shape() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("p1");
    let out = n.add("ctr1", &p, "eth0", &c);
    out.expect_ok();
    let r = out.json();

    // R-1..R-3: version echoed, every interface (host side too), ips pointing at the pod's.
    assert_eq!(r["cniVersion"], "1.1.0");
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 3, "bridge, host veth, pod interface: {r}");
    assert_eq!(ifs[0]["name"], "weft0");
    assert!(ifs[0].get("sandbox").is_none() && ifs[1].get("sandbox").is_none());
    assert_eq!(ifs[2]["name"], "eth0");
    assert_eq!(ifs[2]["sandbox"], p.to_str().unwrap());
    assert_eq!(r["ips"][0]["interface"], 2);
    assert_eq!(r["ips"][0]["address"], "10.244.0.2/24");
    assert_eq!(r["ips"][0]["gateway"], "10.244.0.1");
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");

    // Every MAC and MTU in the result matches the kernel.
    let pod_ns = NetNs::open(&p).unwrap();
    let pod_links = n.links_in(&pod_ns);
    let eth0 = pod_links
        .iter()
        .find(|l| l.name == "eth0")
        .expect("eth0 in the pod");
    assert_eq!(
        Some(ifs[2]["mac"].as_str().unwrap().to_owned()),
        eth0.mac_string()
    );
    assert_eq!(ifs[2]["mtu"].as_u64(), eth0.mtu.map(u64::from));
    assert!(eth0.up);
    let host_links = n.links_in(n.host().ns());
    let hv = host_links
        .iter()
        .find(|l| l.name == ifs[1]["name"])
        .expect("host veth");
    let br = host_links
        .iter()
        .find(|l| l.name == "weft0")
        .expect("bridge");
    assert_eq!(hv.controller, Some(br.index));
    assert_eq!(
        Some(ifs[0]["mac"].as_str().unwrap().to_owned()),
        br.mac_string()
    );

    // The pod reaches its gateway.
    let pod = n.lab.host("p1").unwrap();
    assert!(pod.ping("10.244.0.1".parse().unwrap(), 1).unwrap());

    // K-1, K-5: CHECK right after ADD succeeds with no output.
    let chk = n.check("ctr1", &p, "eth0", &c, &r);
    chk.expect_ok();
    assert!(chk.stdout.is_empty());

    // D-1, D-3: DEL removes everything, and repeating it (with and without netns) succeeds.
    n.del("ctr1", Some(&p), "eth0", &c).expect_ok();
    assert!(n.host_veths().is_empty());
    assert!(!n.links_in(&pod_ns).iter().any(|l| l.name == "eth0"));
    assert!(n.allocations().is_empty());
    n.del("ctr1", Some(&p), "eth0", &c).expect_ok();
    n.del("ctr1", None, "eth0", &c).expect_ok();
}

#[test]
fn pods_on_one_node_talk_tcp_and_udp() {
    let mut n = Node::new();
    let c = n.conf();
    let (pa, pb) = (n.pod("a"), n.pod("b"));
    let ra = n.add("a", &pa, "eth0", &c).expect_ok().json();
    let rb = n.add("b", &pb, "eth0", &c).expect_ok().json();
    let (ipa, ipb) = (pod_ip(&ra), pod_ip(&rb));
    assert_ne!(ipa, ipb);
    let a = n.lab.host("a").unwrap();
    let b = n.lab.host("b").unwrap();
    let srv = b.tcp_echo_server("0.0.0.0:8080".parse().unwrap()).unwrap();
    let payload = vec![42u8; 1 << 20];
    let got = a
        .tcp_roundtrip(format!("{ipb}:8080").parse().unwrap(), &payload, T)
        .unwrap();
    assert_eq!(got, payload);
    assert_eq!(srv.peers()[0].ip().to_string(), ipa);
    let udp = b.udp_echo_server("0.0.0.0:5353".parse().unwrap()).unwrap();
    let got = a
        .udp_roundtrip(format!("{ipb}:5353").parse().unwrap(), b"dns?", T)
        .unwrap();
    assert_eq!(got, b"dns?");
    drop((srv, udp));
    // Hairpin is on: the bridge may send a pod's frame back out of the port it came from.
    let hv = weft_cni::plugin::host_veth_name("a", "eth0");
    let detail = n.host().exec("ip", ["-d", "link", "show", &hv]).unwrap();
    assert!(detail.contains("hairpin on"), "{detail}");
}

#[test]
fn bad_input_gets_the_spec_error_codes() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("p");
    let ns = p.to_str().unwrap();
    let host = n.host();
    // X-8: not JSON → 6.
    let out = common::exec_on(
        host,
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_NETNS", ns),
            ("CNI_IFNAME", "eth0"),
        ],
        b"{not json",
    );
    assert_eq!(out.code(), 6);
    // P-11, X-6: missing variables → 4, naming them.
    let out = n.exec(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")], &c);
    assert_eq!(out.code(), 4);
    assert!(
        out.msg().contains("CNI_CONTAINERID") && out.msg().contains("CNI_NETNS"),
        "{}",
        out.msg()
    );
    // P-5: unknown command → 4.
    assert_eq!(n.exec(&[("CNI_COMMAND", "FROB")], &c).code(), 4);
    // P-6, P-8: bad container ID, over-long ifname → 4.
    assert_eq!(n.add("-bad", &p, "eth0", &c).code(), 4);
    assert_eq!(n.add("ok", &p, "abcdefghijklmnop", &c).code(), 4);
    // X-3, VN-2: unsupported version → 1, details list ours.
    let mut v = c.clone();
    v["cniVersion"] = json!("2.0.0");
    let out = n.add("x", &p, "eth0", &v);
    assert_eq!(out.code(), 1);
    assert!(out.json()["details"].as_str().unwrap().contains("1.1.0"));
    // X-9, C-2: invalid config → 7 naming the field.
    let mut v = c.clone();
    v.as_object_mut().unwrap().remove("name");
    let out = n.add("x", &p, "eth0", &v);
    assert_eq!(out.code(), 7);
    assert!(out.msg().contains("name"));
    let mut v = c.clone();
    v["ipam"]["subnet"] = json!("10.0.0.0/31");
    assert_eq!(n.add("x", &p, "eth0", &v).code(), 7);
    // A-8: a netns that does not exist.
    let out = n.add("x", Path::new("/run/netns/weft-no-such-ns"), "eth0", &c);
    assert!(!out.ok && out.msg().contains("netns"), "{}", out.stdout);
    // X-12: the plugin's own namespace is not a container's.
    let own = n.host().path().to_path_buf();
    assert_eq!(n.add("x", &own, "eth0", &c).code(), 4);
    // K-7/G-7 analogue: STATUS and GC need 1.1.0.
    let v0 = conf("1.0.0", "10.244.0.0/24", &n.data_dir);
    assert_eq!(n.exec(&[("CNI_COMMAND", "STATUS")], &v0).code(), 1);
    // Nothing of the failed calls was left behind (A-6).
    assert!(n.allocations().is_empty(), "{:?}", n.allocations());
    assert!(n.host_veths().is_empty());
    // Errors never panic: stderr has no backtrace.
    assert!(!out.stderr.contains("panicked"));
}

#[test]
fn version_works_with_nothing_but_the_command() {
    let n = Node::new();
    // V-2: empty stdin, no other variables.
    let out = common::exec_on(n.host(), &[("CNI_COMMAND", "VERSION")], b"");
    out.expect_ok();
    assert_eq!(out.json()["supportedVersions"], json!(["1.0.0", "1.1.0"]));
    // V-1: echoes a supported request version.
    let out = common::exec_on(
        n.host(),
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"1.0.0"}"#,
    );
    assert_eq!(out.json()["cniVersion"], "1.0.0");
}

#[test]
fn version_1_0_0_configs_get_1_0_0_results() {
    let mut n = Node::new();
    let c = conf("1.0.0", "10.244.0.0/24", &n.data_dir);
    let p = n.pod("p");
    let r = n.add("c", &p, "eth0", &c).expect_ok().json();
    assert_eq!(r["cniVersion"], "1.0.0");
    n.check("c", &p, "eth0", &c, &r).expect_ok();
    n.del("c", Some(&p), "eth0", &c).expect_ok();
}

#[test]
fn an_existing_ifname_is_refused_and_leaves_nothing() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("shared");
    n.add("first", &p, "eth0", &c).expect_ok();
    // A-4: a second attachment with the same ifname in the same netns.
    let out = n.add("second", &p, "eth0", &c);
    assert!(!out.ok);
    assert!(
        out.msg().contains("eth0") && out.msg().contains("already exists"),
        "{}",
        out.msg()
    );
    assert_eq!(
        n.allocations().len(),
        1,
        "no reservation for the failed ADD"
    );
    assert_eq!(n.host_veths().len(), 1);
    // D-7: the runtime DELs the failed attachment; the first one's eth0 must survive.
    n.del("second", Some(&p), "eth0", &c).expect_ok();
    let pod_ns = NetNs::open(&p).unwrap();
    assert!(n.links_in(&pod_ns).iter().any(|l| l.name == "eth0"));
    assert_eq!(n.allocations().len(), 1);
}

#[test]
fn one_container_two_interfaces() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("multi");
    // A-5: same container ID, different ifnames.
    let r0 = n.add("ctr", &p, "eth0", &c).expect_ok().json();
    let r1 = n.add("ctr", &p, "eth1", &c).expect_ok().json();
    assert_ne!(pod_ip(&r0), pod_ip(&r1));
    n.del("ctr", Some(&p), "eth0", &c).expect_ok();
    let pod_ns = NetNs::open(&p).unwrap();
    let names: Vec<_> = n.links_in(&pod_ns).into_iter().map(|l| l.name).collect();
    assert!(
        !names.contains(&"eth0".to_owned()) && names.contains(&"eth1".to_owned()),
        "{names:?}"
    );
    // L-5: state is keyed by (container, ifname).
    n.check("ctr", &p, "eth1", &c, &r1).expect_ok();
}

#[test]
fn exhaustion_is_reported_by_add_and_status() {
    let mut n = Node::new();
    let c = conf("1.1.0", "10.250.0.0/30", &n.data_dir); // one usable address
    let (p1, p2) = (n.pod("p1"), n.pod("p2"));
    // S-3: ADD without a prior STATUS works; S-1: STATUS ok while there is room.
    n.add("c1", &p1, "eth0", &c).expect_ok();
    let out = n.add("c2", &p2, "eth0", &c);
    assert_eq!(out.code(), 100);
    assert!(out.msg().contains("10.250.0.0/30"), "{}", out.msg());
    // S-1, S-2: STATUS reports 50 when the pool is full, with only CNI_PATH set (S-5).
    let st = n.exec(
        &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")],
        &c,
    );
    assert_eq!(st.code(), 50);
    n.del("c1", Some(&p1), "eth0", &c).expect_ok();
    n.exec(&[("CNI_COMMAND", "STATUS")], &c).expect_ok();
    // The failed ADD left no host veth.
    assert!(n.host_veths().is_empty());
}

#[test]
fn del_after_the_netns_is_gone_frees_everything() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("gone");
    n.add("c", &p, "eth0", &c).expect_ok();
    // D-2: the runtime removed the namespace before DEL.
    NetNs::remove_named(&p).unwrap();
    n.del("c", Some(&p), "eth0", &c).expect_ok();
    assert!(n.allocations().is_empty());
    assert!(n.host_veths().is_empty());
}

#[test]
fn check_detects_what_was_removed() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("p");
    let r = n.add("c", &p, "eth0", &c).expect_ok().json();
    // K-2: an extra route added by someone else is tolerated.
    let pod = n.lab.host("p").unwrap();
    pod.exec("ip", ["route", "add", "192.0.2.0/24", "via", "10.244.0.1"])
        .unwrap();
    n.check("c", &p, "eth0", &c, &r).expect_ok();
    // K-3: the address is gone.
    pod.exec(
        "ip",
        [
            "addr",
            "del",
            r["ips"][0]["address"].as_str().unwrap(),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    let out = n.check("c", &p, "eth0", &c, &r);
    assert!(!out.ok);
    assert!(out.msg().contains("addr"), "{}", out.msg());
    // CHECK without prevResult is an invalid config.
    let ns = p.to_str().unwrap();
    let out = n.exec(
        &[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", ns),
            ("CNI_IFNAME", "eth0"),
        ],
        &c,
    );
    assert_eq!(out.code(), 7);
}

#[test]
fn check_detects_a_lost_reservation() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("p");
    let r = n.add("c", &p, "eth0", &c).expect_ok().json();
    // K-4: the IPAM reservation disappeared.
    weft_cni::ipam::Store::open(&n.data_dir, "weftnet")
        .unwrap()
        .release("c", "eth0")
        .unwrap();
    let out = n.check("c", &p, "eth0", &c, &r);
    assert!(!out.ok && out.msg().contains("IPAM"), "{}", out.stdout);
}

#[test]
fn gc_frees_forgotten_attachments() {
    let mut n = Node::new();
    let c = n.conf();
    let (pa, pb) = (n.pod("a"), n.pod("b"));
    n.add("keep", &pa, "eth0", &c).expect_ok();
    n.add("forgotten", &pb, "eth0", &c).expect_ok();
    // G-1, G-2, G-5: GC with only CNI_COMMAND and CNI_PATH; B is not in the valid list.
    let mut g = c.clone();
    g["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let out = n.exec(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")], &g);
    out.expect_ok();
    assert!(out.stdout.is_empty());
    let owners: Vec<_> = n.allocations().into_iter().map(|(_, c)| c).collect();
    assert_eq!(owners, vec!["keep".to_owned()]);
    assert_eq!(
        n.host_veths(),
        vec![weft_cni::plugin::host_veth_name("keep", "eth0")]
    );
}

#[test]
fn a_hundred_concurrent_adds_get_unique_addresses() {
    let mut n = Node::new();
    let c = n.conf();
    let pods: Vec<_> = (0..100).map(|i| n.pod(&format!("p{i}"))).collect();
    // A-7: concurrent ADDs for different containers.
    let results: Vec<common::Out> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (n, c) = (&n, &c);
                s.spawn(move || n.add(&format!("c{i}"), p, "eth0", c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips: Vec<String> = results
        .iter()
        .map(|o| pod_ip(&o.expect_ok().json()))
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 100);
    assert_eq!(n.allocations().len(), 100);
    assert_eq!(n.host_veths().len(), 100);
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let (n, c) = (&n, &c);
            s.spawn(move || n.del(&format!("c{i}"), Some(p), "eth0", c).expect_ok().ok);
        }
    });
    assert!(n.allocations().is_empty());
    assert!(n.host_veths().is_empty());
}

#[test]
fn dns_and_cni_args_are_handled() {
    let mut n = Node::new();
    let mut c = n.conf();
    c["dns"] = json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]});
    let p = n.pod("p");
    let ns = p.to_str().unwrap();
    // P-9: CNI_ARGS with keys the plugin does not know are tolerated.
    let out = n.exec(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", ns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ],
        &c,
    );
    // R-5: DNS from the config is in the result.
    assert_eq!(
        out.expect_ok().json()["dns"]["nameservers"],
        json!(["10.96.0.10"])
    );
}

#[test]
fn a_failure_in_the_middle_of_add_undoes_everything() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("p");
    // Something that is not a bridge holds the bridge's name: ADD fails after allocating.
    n.host()
        .exec(
            "ip",
            [
                "link", "add", "weft0", "type", "veth", "peer", "name", "weft0p",
            ],
        )
        .unwrap();
    let out = n.add("c", &p, "eth0", &c);
    assert_eq!(out.code(), 7, "{}", out.stdout);
    assert!(out.msg().contains("weft0"), "{}", out.msg());
    assert!(n.allocations().is_empty(), "the reservation was released");
    assert!(n.host_veths().is_empty());
    let pod_ns = NetNs::open(&p).unwrap();
    assert!(!n.links_in(&pod_ns).iter().any(|l| l.name == "eth0"));
    // D-7: the runtime's DEL after the failed ADD succeeds.
    n.del("c", Some(&p), "eth0", &c).expect_ok();
}

#[test]
fn a_previous_result_is_passed_through() {
    let mut n = Node::new();
    let p = n.pod("chained");
    // A-3: an earlier plugin in the chain produced an interface and an address.
    let mut c = n.conf();
    c["prevResult"] = json!({
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "net1", "sandbox": p.to_str().unwrap()}],
        "ips": [{"address": "192.0.2.5/24", "interface": 0}],
        "routes": [{"dst": "198.51.100.0/24"}]
    });
    let r = n.add("c", &p, "eth0", &c).expect_ok().json();
    let names: Vec<&str> = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "net1",
            "weft0",
            weft_cni::plugin::host_veth_name("c", "eth0").as_str(),
            "eth0"
        ]
    );
    assert_eq!(r["ips"][0]["address"], "192.0.2.5/24");
    assert_eq!(
        r["ips"][1]["interface"], 3,
        "our address points at our pod interface"
    );
    assert_eq!(r["routes"][0]["dst"], "198.51.100.0/24");
}

#[test]
fn each_missing_variable_is_named() {
    let mut n = Node::new();
    let c = n.conf();
    let p = n.pod("p");
    let ns = p.to_str().unwrap();
    // P-11: leave out each required variable of ADD, CHECK and DEL in turn.
    for cmd in ["ADD", "CHECK", "DEL"] {
        let all = [
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", ns),
            ("CNI_IFNAME", "eth0"),
        ];
        for skip in 0..all.len() {
            if cmd == "DEL" && all[skip].0 == "CNI_NETNS" {
                continue; // optional for DEL (D-4)
            }
            let mut vars = vec![("CNI_COMMAND", cmd)];
            vars.extend(
                all.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != skip)
                    .map(|(_, v)| *v),
            );
            let out = n.exec(&vars, &c);
            assert_eq!(out.code(), 4, "{cmd} without {}", all[skip].0);
            assert!(out.msg().contains(all[skip].0), "{cmd}: {}", out.msg());
        }
    }
}
