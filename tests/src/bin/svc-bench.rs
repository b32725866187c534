//! `svc-bench`: what a service hop costs, at 1, 1,000 and 10,000 services, measured side by side
//! and interleaved in one run:
//!
//! * **direct**: the client connects to the backend pod's address (the floor);
//! * **weft socket LB**: `weft-proxy`'s cgroup programs, maps programmed with the same code the
//!   agent uses;
//! * **weft TC**: socket LB off; the same maps, translated per packet by the tcx programs on the
//!   client pod's host-side interface (what `weft-proxy run --socket-lb=false` attaches);
//! * **iptables**: kube-proxy-style rules (KUBE-SERVICES → KUBE-SVC → KUBE-SEP DNAT) in the node,
//!   loaded with iptables-restore (Debian's iptables, nf_tables backend);
//! * **nftables**: kube-proxy-style nftables (a verdict map to one chain per service, DNAT), loaded
//!   with nft -f.
//!
//! Two topologies: the backend on the client's node, and on a second node routed to over the
//! underlay (`--topology same|across` for one only).
//!
//! The client always connects to the *last* service programmed (the worst case for a linear rule
//! walk). Figures: new connections per second (connect, 1-byte request, 1-byte reply, close),
//! 1-byte request/response per second on one connection, and bulk throughput on one connection,
//! each as a ratio to direct; and the time
//! to program all services and to add and remove one more. Prints a table, writes JSON and an SVG
//! plot (`--out DIR`, default `target/bench`).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_proxy::{
    bpffs::PinLayout,
    model::{BackendAddr, Desired, Frontend, FrontendState},
    services::{Limits, ServiceMaps},
};
use weft_testbed::{Host, Lab};

/// The backend pod on the client's node, and the one on the other node.
const BACKEND: &str = "10.244.0.3";
const REMOTE_BACKEND: &str = "10.244.1.3";
const BACKEND_PORT: u16 = 8080;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    Weft,
    WeftTc,
    Iptables,
    Nftables,
}

const MODES: [Mode; 5] = [
    Mode::Direct,
    Mode::Weft,
    Mode::WeftTc,
    Mode::Iptables,
    Mode::Nftables,
];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (floor)",
            Self::Weft => "weft socket LB",
            Self::WeftTc => "weft TC (socket LB off)",
            Self::Iptables => "iptables (kube-proxy)",
            Self::Nftables => "nftables (kube-proxy)",
        }
    }

    /// The i-th virtual address of this mode (each mode has its own range).
    fn vip(self, i: usize) -> Ipv4Addr {
        let base: u32 = match self {
            Self::Weft => u32::from(Ipv4Addr::new(10, 96, 0, 0)),
            Self::Iptables => u32::from(Ipv4Addr::new(10, 97, 0, 0)),
            Self::WeftTc => u32::from(Ipv4Addr::new(10, 99, 0, 0)),
            _ => u32::from(Ipv4Addr::new(10, 98, 0, 0)),
        };
        Ipv4Addr::from(base + 1 + i as u32)
    }
}

// ---------- programming each mode ----------

fn run_cmd(host: &Host, program: &str, args: &[&str], stdin: &str) -> Duration {
    let t0 = Instant::now();
    let mut cmd = host.command(program).unwrap();
    cmd.args(args);
    let out = weft_tests::output_with_stdin(cmd, stdin.as_bytes());
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed()
}

fn ipt_service(i: usize, add: bool, backend: Ipv4Addr) -> String {
    let vip = Mode::Iptables.vip(i);
    if add {
        format!(
            ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]\n\
             -A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n\
             -A KUBE-SVC-{i} -j KUBE-SEP-{i}\n\
             -A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {backend}:{BACKEND_PORT}\n"
        )
    } else {
        format!(
            "-D KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n\
             -F KUBE-SVC-{i}\n-F KUBE-SEP-{i}\n-X KUBE-SVC-{i}\n-X KUBE-SEP-{i}\n"
        )
    }
}

fn nft_chain(i: usize, backend: Ipv4Addr) -> String {
    format!("chain s{i} {{ ip protocol tcp dnat to {backend}:{BACKEND_PORT}; }}\n")
}

fn nft_element(i: usize) -> String {
    format!("{} . tcp . 80 : goto s{i}", Mode::Nftables.vip(i))
}

struct Programmer {
    maps: ServiceMaps,
    desired: Desired,
    /// The backend every service leads to in the current topology.
    backend: Ipv4Addr,
}

fn weft_frontend(mode: Mode, i: usize) -> Frontend {
    Frontend {
        addr: mode.vip(i),
        port: 80,
        proto: 6,
    }
}

fn weft_state(backend: Ipv4Addr) -> FrontendState {
    FrontendState {
        service: "bench".into(),
        backends: vec![BackendAddr {
            addr: backend,
            port: BACKEND_PORT,
        }],
        local_count: 1,
        affinity_timeout: None,
        maglev: false,
    }
}

/// Programs `s` services in `mode`; returns (all, add one, remove one).
fn program(
    node: &Host,
    p: &mut Programmer,
    mode: Mode,
    s: usize,
) -> Option<(Duration, Duration, Duration)> {
    match mode {
        Mode::Direct => None,
        Mode::Weft | Mode::WeftTc => {
            p.desired = (0..s)
                .map(|i| (weft_frontend(mode, i), weft_state(p.backend)))
                .collect();
            let t0 = Instant::now();
            let (_, errs) = p.maps.apply(&p.desired);
            let all = t0.elapsed();
            assert!(errs.is_empty(), "{errs:?}");
            let mut plus = p.desired.clone();
            plus.insert(weft_frontend(mode, s), weft_state(p.backend));
            let t0 = Instant::now();
            p.maps.apply(&plus);
            let add = t0.elapsed();
            let t0 = Instant::now();
            p.maps.apply(&p.desired);
            Some((all, add, t0.elapsed()))
        }
        Mode::Iptables => {
            let mut f = String::from(
                "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n",
            );
            f.push_str("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n");
            for i in 0..s {
                f.push_str(&ipt_service(i, true, p.backend));
            }
            f.push_str("COMMIT\n");
            let all = run_cmd(node, "iptables-restore", &[], &f);
            let add = run_cmd(
                node,
                "iptables-restore",
                &["--noflush"],
                &format!("*nat\n{}COMMIT\n", ipt_service(s, true, p.backend)),
            );
            let del = run_cmd(
                node,
                "iptables-restore",
                &["--noflush"],
                &format!("*nat\n{}COMMIT\n", ipt_service(s, false, p.backend)),
            );
            Some((all, add, del))
        }
        Mode::Nftables => {
            let mut f = String::from("table ip kp\ndelete table ip kp\ntable ip kp {\n");
            for i in 0..s {
                f.push_str(&nft_chain(i, p.backend));
            }
            let elems: Vec<String> = (0..s).map(nft_element).collect();
            f.push_str("map svc { type ipv4_addr . inet_proto . inet_service : verdict\n");
            if !elems.is_empty() {
                f.push_str(&format!("elements = {{ {} }}\n", elems.join(",\n")));
            }
            f.push_str("}\nchain pre { type nat hook prerouting priority dstnat; ip daddr . meta l4proto . th dport vmap @svc; }\n}\n");
            let all = run_cmd(node, "nft", &["-f", "-"], &f);
            let add = run_cmd(
                node,
                "nft",
                &["-f", "-"],
                &format!(
                    "add {}add element ip kp svc {{ {} }}\n",
                    nft_chain(s, p.backend).replacen("chain", "chain ip kp", 1),
                    nft_element(s)
                ),
            );
            let del = run_cmd(
                node,
                "nft",
                &["-f", "-"],
                &format!(
                    "delete element ip kp svc {{ {} . tcp . 80 }}\ndelete chain ip kp s{s}\n",
                    Mode::Nftables.vip(s)
                ),
            );
            Some((all, add, del))
        }
    }
}

/// Removes a mode's services.
fn clear(node: &Host, p: &mut Programmer, mode: Mode) {
    match mode {
        Mode::Direct => {}
        Mode::Weft | Mode::WeftTc => {
            let (_, errs) = p.maps.apply(&Desired::new());
            assert!(errs.is_empty(), "{errs:?}");
        }
        Mode::Iptables => {
            run_cmd(node, "iptables-restore", &[], "*nat\nCOMMIT\n");
        }
        Mode::Nftables => {
            run_cmd(
                node,
                "nft",
                &["-f", "-"],
                "table ip kp\ndelete table ip kp\n",
            );
        }
    }
}

/// The host-side interface of the first pod wired to the node (the client).
fn client_interface(node: &Host) -> String {
    node.run(|| {
        nix::net::if_::if_nameindex()
            .unwrap()
            .iter()
            .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
            .filter(|n| n.starts_with("tbv"))
            .min_by_key(|n| n[3..].parse::<u32>().unwrap_or(u32::MAX))
            .expect("the client's interface")
    })
    .unwrap()
}

/// Attaches (or detaches) per-packet service translation on the client's interface, as the
/// agent does with socket LB off.
fn tc(node: &Host, ebpf: &mut aya::Ebpf, layout: &PinLayout, ifname: &str, on: bool) {
    use aya::programs::TcAttachType;
    use weft_proxy_common::names;
    let hooks = [
        (
            TcAttachType::Ingress,
            names::PROG_SERVICE_FROM_POD,
            "bench-from-pod",
        ),
        (
            TcAttachType::Egress,
            names::PROG_NODEPORT_EGRESS,
            "bench-to-pod",
        ),
    ];
    node.run(|| {
        for (attach_type, prog, pin) in hooks {
            let pin = layout.link(pin);
            if on {
                weft_proxy::tcx::attach_pinned(ebpf, prog, ifname, attach_type, &pin).unwrap();
            } else {
                weft_proxy::bpffs::unpin_and_detach(&pin).unwrap();
            }
        }
    })
    .unwrap();
}

// ---------- measurement ----------

fn svg(results: &[Value], path: &Path) {
    let results: Vec<Value> = results
        .iter()
        .filter(|r| r["topology"].as_str().is_none_or(|t| t == "same node"))
        .cloned()
        .collect();
    let results = &results[..];
    let (w, h, l, b) = (640.0, 360.0, 60.0, 40.0);
    let counts: Vec<f64> = results
        .iter()
        .map(|r| r["services"].as_f64().unwrap())
        .collect();
    let xmax = counts.iter().cloned().fold(1.0, f64::max).log10().max(1.0);
    let x = |s: f64| l + (s.max(1.0).log10() / xmax) * (w - l - 60.0);
    let y = |r: f64| h - b - (r.min(1.2) / 1.2) * (h - b - 20.0);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    out.push_str(&format!(r#"<text x="{l}" y="14">new connections/s through a service, ratio to direct (higher is better)</text>"#));
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        out.push_str(&format!(r##"<line x1="{l}" x2="{}" y1="{y0}" y2="{y0}" stroke="#ddd"/><text x="8" y="{y0}">{t:.2}</text>"##, w - 20.0, y0 = y(t)));
    }
    for s in &counts {
        out.push_str(&format!(
            r#"<text x="{}" y="{}">{s}</text>"#,
            x(*s) - 10.0,
            h - 15.0
        ));
    }
    for (k, (mode, color)) in [
        ("weft socket LB", "#1b9e77"),
        ("weft TC (socket LB off)", "#66a61e"),
        ("iptables (kube-proxy)", "#d95f02"),
        ("nftables (kube-proxy)", "#7570b3"),
    ]
    .iter()
    .enumerate()
    {
        let pts: Vec<String> = results
            .iter()
            .filter_map(|r| {
                let row = r["modes"].as_array()?.iter().find(|m| m["mode"] == *mode)?;
                Some(format!(
                    "{:.1},{:.1}",
                    x(r["services"].as_f64()?),
                    y(row["conn_ratio"].as_f64()?)
                ))
            })
            .collect();
        out.push_str(&format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        ));
        out.push_str(&format!(
            r#"<text x="{}" y="{}" fill="{color}">{mode}</text>"#,
            l + 10.0,
            h - b - 60.0 + 16.0 * k as f64
        ));
    }
    out.push_str("</svg>\n");
    std::fs::write(path, out).unwrap();
}

fn main() {
    let args = weft_tests::BenchArgs::from_env();
    if args.all().get(1).map(String::as_str) == Some("client") {
        return weft_tests::load::client_main(args.all());
    }
    if let Some(json_path) = args.value("--replot") {
        // Redraw the plot from an earlier run's JSON without measuring again.
        let report: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
        let svg_path = Path::new(&json_path).with_extension("svg");
        svg(report["results"].as_array().unwrap(), &svg_path);
        println!("plot: {}", svg_path.display());
        return;
    }
    let quick = args.has("--quick");
    let counts: Vec<usize> = args
        .value("--services")
        .unwrap_or_else(|| {
            if quick {
                "1,1000".into()
            } else {
                "1,1000,10000".into()
            }
        })
        .split(',')
        .map(|s| s.parse().expect("--services 1,1000,10000"))
        .collect();
    let rounds: usize = args.parsed("--rounds", if quick { 1 } else { 3 });
    let secs: f64 = args.parsed("--secs", if quick { 0.5 } else { 1.0 });
    let out_dir: PathBuf = args.parsed("--out", PathBuf::from("target/bench"));

    let mut lab = Lab::new().expect("the benchmark needs root");
    let node = lab.add_node().unwrap();
    lab.wire_pod(node, "client", "10.244.0.2".parse().unwrap())
        .unwrap();
    lab.wire_pod(node, "backend", BACKEND.parse().unwrap())
        .unwrap();
    // Keep this namespace's conntrack footprint small (entries count against the host's limit).
    lab.node(node)
        .sysctl("net/netfilter/nf_conntrack_tcp_timeout_close", "1")
        .unwrap();
    weft_tests::load::serve(lab.host("backend").unwrap(), BACKEND_PORT);
    // A second node with a backend of its own, routed to over the underlay both ways.
    let other = lab.add_node().unwrap();
    lab.wire_pod(other, "remote-backend", REMOTE_BACKEND.parse().unwrap())
        .unwrap();
    weft_tests::load::serve(lab.host("remote-backend").unwrap(), BACKEND_PORT);
    let (ip0, ip1) = (
        lab.node(node).underlay_addr().unwrap().to_string(),
        lab.node(other).underlay_addr().unwrap().to_string(),
    );
    lab.node(node)
        .exec("ip", ["route", "add", "10.244.1.0/24", "via", &ip1])
        .unwrap();
    lab.node(other)
        .exec("ip", ["route", "add", "10.244.0.0/24", "via", &ip0])
        .unwrap();
    let cgroup = lab.cgroup("bench").unwrap();
    let layout = PinLayout::new(lab.bpffs_dir("svc-bench").unwrap());
    let limits = Limits {
        max_services: 65_536,
        max_backends: 65_536,
    };
    let mut ebpf = weft_proxy::object::load(&layout, &limits).unwrap();
    weft_proxy::socklb::attach(&mut ebpf, &layout, &cgroup).unwrap();
    // The TC mode's client runs in a cgroup without the socket programs.
    let plain_cgroup = lab.cgroup("bench-tc").unwrap();
    let client_if = client_interface(lab.node(node));
    let mut p = Programmer {
        maps: ServiceMaps::open(&layout, limits).unwrap(),
        desired: Desired::new(),
        backend: BACKEND.parse().unwrap(),
    };
    let node_host = lab.node(node);
    let topologies: Vec<(&str, Ipv4Addr)> =
        [("same node", BACKEND), ("across nodes", REMOTE_BACKEND)]
            .into_iter()
            .filter(|(t, _)| {
                args.value("--topology")
                    .is_none_or(|want| want.split(',').any(|w| t.starts_with(w)))
            })
            .map(|(t, b)| (t, b.parse().unwrap()))
            .collect();
    let client = lab.host("client").unwrap();

    let mut results = Vec::new();
    for &(topology, backend) in &topologies {
        p.backend = backend;
        for &s in &counts {
            // Each mode is measured with only its own rules loaded: iptables' KUBE-SERVICES chain is
            // walked by every new connection through the node, service or not, so loading all modes
            // at once would tax the others. Rounds interleave the modes; each round reprograms.
            eprintln!(
                "svc-bench: {topology}, {s} services: {rounds} round(s) of {secs} s per mode and figure"
            );
            let mut prog: Vec<Option<(Duration, Duration, Duration)>> = vec![None; MODES.len()];
            let mut conn: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
            let mut rr: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
            let mut gbit: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
            let mut errors = vec![0u64; MODES.len()];
            for round in 0..rounds {
                for (k, &mode) in MODES.iter().enumerate() {
                    let took = program(node_host, &mut p, mode, s);
                    if round == 0 {
                        prog[k] = took;
                    }
                    let dst = match mode {
                        Mode::Direct => SocketAddr::from((backend, BACKEND_PORT)),
                        m => SocketAddr::from((m.vip(s - 1), 80)),
                    };
                    let cg = if mode == Mode::WeftTc {
                        tc(node_host, &mut ebpf, &layout, &client_if, true);
                        &plain_cgroup
                    } else {
                        &cgroup
                    };
                    let (c, e) = weft_tests::load::measure(client, cg, "conn", dst, secs);
                    conn[k].push(c);
                    errors[k] += e;
                    rr[k].push(weft_tests::load::measure(client, cg, "rr", dst, secs).0);
                    gbit[k].push(
                        weft_tests::load::measure(client, cg, "stream", dst, secs).0 * 8.0 / 1e9,
                    );
                    if mode == Mode::WeftTc {
                        tc(node_host, &mut ebpf, &layout, &client_if, false);
                    }
                    clear(node_host, &mut p, mode);
                }
            }
            let (dc, dr, dg) = (
                weft_tests::load::median(conn[0].clone()),
                weft_tests::load::median(rr[0].clone()),
                weft_tests::load::median(gbit[0].clone()),
            );
            let modes: Vec<Value> = MODES
            .iter()
            .enumerate()
            .map(|(k, mode)| {
                let (c, r) = (weft_tests::load::median(conn[k].clone()), weft_tests::load::median(rr[k].clone()));
                let g = weft_tests::load::median(gbit[k].clone());
                let pr = prog[k];
                json!({
                    "mode": mode.label(), "conn_per_s": c, "conn_ratio": c / dc, "rr_per_s": r, "rr_ratio": r / dr,
                    "gbit_per_s": g, "gbit_ratio": g / dg,
                    "errors": errors[k],
                    "program_all_ms": pr.map(|p| p.0.as_secs_f64() * 1e3),
                    "add_one_ms": pr.map(|p| p.1.as_secs_f64() * 1e3),
                    "remove_one_ms": pr.map(|p| p.2.as_secs_f64() * 1e3),
                })
            })
            .collect();
            results.push(json!({"topology": topology, "services": s, "modes": modes}));
        }
    }

    let f = |v: &Value, d: usize| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.d$}"));
    println!(
        "\nservice routing, client -> last of S services -> one backend pod ({rounds} x {secs} s, medians)"
    );
    println!(
        "{:<13} {:>6}  {:<24} {:>10} {:>7} {:>9} {:>7} {:>7} {:>7} {:>11} {:>9} {:>9}",
        "topology",
        "S",
        "mode",
        "new conn/s",
        "ratio",
        "RR/s",
        "ratio",
        "Gbit/s",
        "ratio",
        "program ms",
        "add 1 ms",
        "del 1 ms"
    );
    for r in &results {
        for m in r["modes"].as_array().unwrap() {
            println!(
                "{:<13} {:>6}  {:<24} {:>10} {:>7} {:>9} {:>7} {:>7} {:>7} {:>11} {:>9} {:>9}",
                r["topology"].as_str().unwrap_or(""),
                r["services"].as_u64().unwrap_or(0),
                m["mode"].as_str().unwrap(),
                f(&m["conn_per_s"], 0),
                f(&m["conn_ratio"], 2),
                f(&m["rr_per_s"], 0),
                f(&m["rr_ratio"], 2),
                f(&m["gbit_per_s"], 2),
                f(&m["gbit_ratio"], 2),
                f(&m["program_all_ms"], 1),
                f(&m["add_one_ms"], 2),
                f(&m["remove_one_ms"], 2)
            );
        }
    }
    std::fs::create_dir_all(&out_dir).unwrap();
    let report = json!({"rounds": rounds, "secs": secs, "results": results});
    std::fs::write(
        out_dir.join("svc.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    svg(
        report["results"].as_array().unwrap(),
        &out_dir.join("svc.svg"),
    );
    println!("(the plot shows the same-node topology)");
    println!(
        "\nJSON: {}\nplot: {}",
        out_dir.join("svc.json").display(),
        out_dir.join("svc.svg").display()
    );
}
