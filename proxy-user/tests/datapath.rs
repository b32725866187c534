//! Privileged, without namespaces or traffic: the TC programs run on crafted packets through
//! `BPF_PROG_TEST_RUN`, with their maps (in a private bpffs directory) written by the agent's own
//! code, `ServiceMaps` and `PolicyMaps`. Each case is an input packet and map contents → the
//! verdict and the packet as the program leaves it, checksums included: how Katran and Cilium
//! test their datapaths. The traffic tests stay the proof end to end.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use weft_proxy::bpffs::PinLayout;
use weft_proxy::model::{BackendAddr, Desired, Frontend, FrontendState};
use weft_proxy::policymap::PolicyMaps;
use weft_proxy::services::{Limits, ServiceMaps};
use weft_proxy_common::names;
use weft_testbed::Lab;

/// `TC_ACT_UNSPEC`: the packet goes on (translated or not).
const UNSPEC: i32 = -1;
/// `TC_ACT_SHOT`: dropped.
const SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`: sent back out (a refusal's RST).
const REDIRECT: i32 = 7;

const TCP: u8 = 6;
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

/// The object loaded into a private pin directory.
struct Datapath {
    ebpf: aya::Ebpf,
    layout: PinLayout,
    _lab: Lab,
}

impl Datapath {
    fn new(label: &str) -> Self {
        let mut lab = Lab::new().expect("lab (run the tests as root)");
        let layout = PinLayout::new(lab.bpffs_dir(label).unwrap());
        let ebpf = weft_proxy::object::load(&layout, &Limits::default()).unwrap();
        Self {
            ebpf,
            layout,
            _lab: lab,
        }
    }

    /// Runs `program` on `packet`: (verdict, the packet as it left).
    fn run(&mut self, program: &'static str, packet: &[u8]) -> (i32, Vec<u8>) {
        let prog = weft_proxy::tcx::classifier(&mut self.ebpf, program).unwrap();
        let mut out = vec![0u8; packet.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value as i32, out)
    }
}

fn tcp_syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

/// What a packet is, its checksums verified.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    rst: bool,
}

fn seen(packet: &[u8]) -> Seen {
    let h = PacketHeaders::from_ethernet_slice(packet).unwrap();
    let Some(NetHeaders::Ipv4(ip, _)) = h.net.clone() else {
        panic!("not IPv4: {h:?}")
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 checksum"
    );
    let Some(TransportHeader::Tcp(tcp)) = h.transport.clone() else {
        panic!("not TCP: {h:?}")
    };
    assert_eq!(
        tcp.checksum,
        tcp.calc_checksum_ipv4(&ip, h.payload.slice()).unwrap(),
        "TCP checksum"
    );
    Seen {
        src: (Ipv4Addr::from(ip.source), tcp.source_port),
        dst: (Ipv4Addr::from(ip.destination), tcp.destination_port),
        rst: tcp.rst,
    }
}

fn addr(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn service_translation_from_a_pod() {
    let mut dp = Datapath::new("dp-svc");
    let mut maps = ServiceMaps::open(&dp.layout, Limits::default()).unwrap();
    let front = |a: &str| Frontend {
        addr: addr(a),
        port: 80,
        proto: TCP,
    };
    let state = |backends: &[&str]| FrontendState {
        service: "default/web".into(),
        backends: backends
            .iter()
            .map(|b| BackendAddr {
                addr: addr(b),
                port: 8080,
            })
            .collect(),
        local_count: backends.len(),
        affinity_timeout: None,
        maglev: false,
    };
    let desired: Desired = [
        (front("10.96.0.10"), state(&["10.244.1.5"])),
        (front("10.96.0.11"), state(&[])),
    ]
    .into();
    let (_, errors) = maps.apply(&desired);
    assert!(errors.is_empty(), "{errors:?}");
    let client = (addr("10.244.0.2"), 40000);

    // A ClusterIP with a backend: the destination becomes the backend, checksums kept right.
    let (verdict, out) = dp.run(
        names::PROG_SERVICE_FROM_POD,
        &tcp_syn(client, (addr("10.96.0.10"), 80)),
    );
    assert_eq!(verdict, UNSPEC);
    assert_eq!(
        seen(&out),
        Seen {
            src: client,
            dst: (addr("10.244.1.5"), 8080),
            rst: false
        }
    );

    // No backend: refused at once with a RST back to the client, from the service address.
    let (verdict, out) = dp.run(
        names::PROG_SERVICE_FROM_POD,
        &tcp_syn(client, (addr("10.96.0.11"), 80)),
    );
    assert_eq!(verdict, REDIRECT);
    assert_eq!(
        seen(&out),
        Seen {
            src: (addr("10.96.0.11"), 80),
            dst: client,
            rst: true
        }
    );

    // Not a service: untouched.
    let other = tcp_syn(client, (addr("10.244.1.9"), 80));
    let (verdict, out) = dp.run(names::PROG_SERVICE_FROM_POD, &other);
    assert_eq!((verdict, out), (UNSPEC, other));

    // The backend set changes: a new connection goes to the new backend.
    let desired: Desired = [(front("10.96.0.10"), state(&["10.244.1.6"]))].into();
    maps.apply(&desired);
    let (_, out) = dp.run(
        names::PROG_SERVICE_FROM_POD,
        &tcp_syn((client.0, 40001), (addr("10.96.0.10"), 80)),
    );
    assert_eq!(seen(&out).dst, (addr("10.244.1.6"), 8080));
}

#[test]
fn network_policy_admits_the_selected_peer_and_drops_the_rest() {
    let mut dp = Datapath::new("dp-pol");
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: default, labels: {app: api}}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: default, labels: {app: frontend}}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
status: {podIP: 10.244.0.12}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-frontend, namespace: default}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
    ports: [{port: 8080}]
"#;
    let (objects, problems) = weft_proxy::manifests::parse_str(yaml, "fixture");
    assert!(problems.is_empty(), "{problems:?}");
    let (compiled, problems) = weft_proxy::policy::compile(
        &objects.network_policies,
        &objects.namespaces,
        &objects.pods,
    );
    assert!(problems.is_empty(), "{problems:?}");
    let local: BTreeSet<Ipv4Addr> = ["10.244.0.10", "10.244.0.11", "10.244.0.12"]
        .iter()
        .map(|a| addr(a))
        .collect();
    let want =
        weft_proxy::policy::rules::desired(&compiled, &local, &["10.244.0.0/24".parse().unwrap()]);
    PolicyMaps::open(&dp.layout).unwrap().apply(&want).unwrap();
    let api = (addr("10.244.0.10"), 8080);
    let to_pod = names::PROG_POLICY_TO_POD;

    let cases = [
        (
            "the selected peer on the allowed port",
            (addr("10.244.0.11"), 40000),
            api,
            UNSPEC,
        ),
        ("another pod", (addr("10.244.0.12"), 40000), api, SHOT),
        (
            "the selected peer on another port",
            (addr("10.244.0.11"), 40001),
            (api.0, 9090),
            SHOT,
        ),
        (
            "from outside the cluster",
            (addr("192.0.2.1"), 40000),
            api,
            SHOT,
        ),
        (
            "to a pod no policy selects",
            (addr("10.244.0.12"), 40002),
            (addr("10.244.0.11"), 80),
            UNSPEC,
        ),
        (
            "to a pending pod (in the pod range, not yet known)",
            (addr("10.244.0.11"), 40003),
            (addr("10.244.0.99"), 80),
            SHOT,
        ),
    ];
    for (what, src, dst, want) in cases {
        let packet = tcp_syn(src, dst);
        let (verdict, out) = dp.run(to_pod, &packet);
        assert_eq!(verdict, want, "{what}");
        assert_eq!(out, packet, "{what}: policy never rewrites");
    }
}

#[test]
fn nodeport_translation_and_its_reply() {
    let mut dp = Datapath::new("dp-np");
    let mut maps = ServiceMaps::open(&dp.layout, Limits::default()).unwrap();
    let node = (addr("192.168.50.10"), 30080);
    let backend = (addr("10.244.1.5"), 8080);
    let desired: Desired = [(
        Frontend {
            addr: node.0,
            port: node.1,
            proto: TCP,
        },
        FrontendState {
            service: "default/web".into(),
            backends: vec![BackendAddr {
                addr: backend.0,
                port: backend.1,
            }],
            local_count: 1,
            affinity_timeout: None,
            maglev: false,
        },
    )]
    .into();
    let (_, errors) = maps.apply(&desired);
    assert!(errors.is_empty(), "{errors:?}");
    let client = (addr("198.51.100.7"), 50000);

    // In from outside to the node's port: to the local backend, the client's address kept.
    let (verdict, out) = dp.run(names::PROG_NODEPORT_INGRESS, &tcp_syn(client, node));
    assert_eq!(verdict, UNSPEC);
    assert_eq!(
        seen(&out),
        Seen {
            src: client,
            dst: backend,
            rst: false
        }
    );

    // The backend's answer leaves from the node's port again.
    let reply = {
        let b = PacketBuilder::ethernet2(MAC_B, MAC_A)
            .ipv4(backend.0.octets(), client.0.octets(), 64)
            .tcp(backend.1, client.1, 5000, 64240)
            .syn()
            .ack(1001);
        let mut v = Vec::new();
        b.write(&mut v, &[]).unwrap();
        v
    };
    let (verdict, out) = dp.run(names::PROG_NODEPORT_EGRESS, &reply);
    assert_eq!(verdict, UNSPEC);
    assert_eq!(
        seen(&out),
        Seen {
            src: node,
            dst: client,
            rst: false
        }
    );

    // Another node port, not a frontend: untouched.
    let other = tcp_syn(client, (node.0, 30081));
    let (verdict, out) = dp.run(names::PROG_NODEPORT_INGRESS, &other);
    assert_eq!((verdict, out), (UNSPEC, other));
}
