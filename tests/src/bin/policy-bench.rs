//! `policy-bench`: what NetworkPolicy costs on the wire, with 0, 10, 1,000 and 10,000 rules
//! selecting the destination pod, measured interleaved round by round in one run.
//!
//! Two test-bed pods on one node; `weft-proxy run` enforces policy on their host-side interfaces.
//! Each mode writes a policy for the server with N ingress rules (N-1 ipBlock /32 peers on
//! distinct ports, plus the rule that lets the client in) and waits until the kernel holds them.
//! Figures: new connections per second (every one is a policy decision) and 1-byte
//! request/response per second on one connection, each also as a ratio to "no policy" (programs
//! attached, pod not isolated). "no weft" (before the agent starts) is shown for reference.
//! A second table, in user space only: the time to recompute after one pod label change among
//! N policies, the full computation against the incremental engine the agent uses.
//! Prints the tables and writes JSON (`--json PATH`, default `target/bench/policy.json`).
//! Flags: `--quick` (0, 10, 1000 rules; 2 rounds), `--rules 0,10,1000,10000`, `--rounds N`,
//! `--secs S`. Build first: `cargo build --release -p weft-proxy -p weft-tests`.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::json;
use weft_testbed::Lab;
use weft_tests::{
    BenchArgs,
    load::{measure, median, serve},
    weft_binary,
};

const CLIENT: &str = "10.244.0.2";
const SERVER: &str = "10.244.0.3";
const PORT: u16 = 8080;

fn pods() -> String {
    let mut y = String::from("kind: Namespace\nmetadata: {name: bench}\n");
    for (name, ip) in [("client", CLIENT), ("server", SERVER)] {
        y.push_str(&format!(
            "---\nkind: Pod\nmetadata: {{namespace: bench, name: {name}, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: node0}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        ));
    }
    y
}

/// A policy on the server with `n` rules, the last of which lets the client in.
fn policy(n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let mut y = String::from(
        "kind: NetworkPolicy\nmetadata: {name: server-in, namespace: bench}\nspec:\n  \
         podSelector: {matchLabels: {app: server}}\n  ingress:\n",
    );
    for i in 0..n - 1 {
        y.push_str(&format!(
            "  - from: [{{ipBlock: {{cidr: 172.{}.{}.{}/32}}}}]\n    ports: [{{port: {}}}]\n",
            16 + i / 65536,
            (i / 256) % 256,
            i % 256,
            9000 + i % 1000
        ));
    }
    y.push_str(&format!(
        "  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: {PORT}}}]\n"
    ));
    y
}

/// The number of rule entries the agent will write for `n` rules (computed with its own code).
fn expected_entries(n: usize) -> usize {
    let (objects, _) =
        weft_proxy::manifests::parse_str(&format!("{}\n---\n{}", pods(), policy(n)), "bench");
    let (compiled, _) = weft_proxy::policy::compile(
        &objects.network_policies,
        &objects.namespaces,
        &objects.pods,
    );
    let local = [CLIENT.parse().unwrap(), SERVER.parse().unwrap()].into();
    weft_proxy::policy::rules::desired(&compiled, &local, &[]).rule_count()
}

/// `n` pods in one namespace, each isolated by its own policy that lets in pods labelled
/// `peer: <its name>`.
fn many(n: usize) -> weft_proxy::model::Objects {
    let mut y = String::from("kind: Namespace\nmetadata: {name: m}\n");
    for i in 0..n {
        y.push_str(&format!(
            "---\nkind: Pod\nmetadata: {{name: p{i}, namespace: m, labels: {{app: a{i}}}}}\n\
             spec: {{nodeName: node0}}\nstatus: {{podIP: 10.{}.{}.{}}}\n---\n\
             kind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: m}}\n\
             spec: {{podSelector: {{matchLabels: {{app: a{i}}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{peer: a{i}}}}}}}]}}]}}\n",
            100 + i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    weft_proxy::manifests::parse_str(&y, "many").0
}

/// User-space cost of one pod label change among `n` policies: the full computation against
/// the incremental engine, on the same objects. Returns (full ms, incremental ms, work).
fn recompute(n: usize, rounds: usize) -> (f64, f64, weft_proxy::policy::engine::Work) {
    use weft_proxy::policy::{self, rules};
    let base = many(n);
    let local: std::collections::BTreeSet<std::net::Ipv4Addr> = base
        .pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .collect();
    let mut engine = policy::engine::Engine::new();
    let update = |e: &mut policy::engine::Engine, o: &weft_proxy::model::Objects| {
        e.update(&o.network_policies, &o.namespaces, &o.pods, &local, &[])
    };
    update(&mut engine, &base);
    let (mut full, mut incremental, mut work) = (Vec::new(), Vec::new(), Default::default());
    for round in 0..rounds {
        // Pod 0 becomes (or stops being) a peer of the last pod's policy.
        let mut changed = base.clone();
        if round % 2 == 0 {
            changed.pods[0]
                .metadata
                .labels
                .get_or_insert_default()
                .insert("peer".into(), format!("a{}", n - 1));
        }
        let t0 = Instant::now();
        let (compiled, _) = policy::compile(
            &changed.network_policies,
            &changed.namespaces,
            &changed.pods,
        );
        std::hint::black_box(rules::desired(&compiled, &local, &[]));
        full.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        let (_, w, _) = update(&mut engine, &changed);
        incremental.push(t0.elapsed().as_secs_f64() * 1000.0);
        work = w;
    }
    (median(full), median(incremental), work)
}

fn main() {
    let args = BenchArgs::from_env();
    if args.all().get(1).map(String::as_str) == Some("client") {
        return weft_tests::load::client_main(args.all());
    }
    let quick = args.has("--quick");
    let rules: Vec<usize> = args
        .value("--rules")
        .unwrap_or_else(|| {
            if quick {
                "0,10,1000"
            } else {
                "0,10,1000,10000"
            }
            .into()
        })
        .split(',')
        .map(|s| s.parse().expect("--rules 0,10,1000"))
        .collect();
    let rounds: usize = args.parsed("--rounds", if quick { 2 } else { 5 });
    let secs: f64 = args.parsed("--secs", if quick { 0.5 } else { 1.0 });
    let json_path = args
        .value("--json")
        .unwrap_or_else(|| "target/bench/policy.json".into());
    let proxy = weft_binary("weft-proxy");

    let mut lab = Lab::new().expect("test bed (run as root)");
    let node = lab.add_node().unwrap();
    lab.wire_pod(node, "client", CLIENT.parse().unwrap())
        .unwrap();
    lab.wire_pod(node, "server", SERVER.parse().unwrap())
        .unwrap();
    serve(lab.host("server").unwrap(), PORT);
    let pin = lab.bpffs_dir("policy-bench").unwrap();
    let cgroup = lab.cgroup("bench").unwrap();
    let manifests = lab.temp_dir("manifests").unwrap();
    std::fs::write(manifests.join("pods.yaml"), pods()).unwrap();
    let client = lab.host("client").unwrap();
    let dst = SocketAddr::new(SERVER.parse().unwrap(), PORT);

    let no_weft = (
        measure(client, &cgroup, "conn", dst, secs).0,
        measure(client, &cgroup, "rr", dst, secs).0,
    );
    let mut agent = weft_tests::proxy_agent(lab.node(0), &proxy, &pin, &manifests, &cgroup, 50)
        .args(["--metrics-addr", "off", "--policy-iface-prefix", "tbv"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = |lab: &Lab| -> serde_json::Value {
        let out = lab
            .node(0)
            .command(&proxy)
            .unwrap()
            .arg("--pin-dir")
            .arg(&pin)
            .args(["policy", "status"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    let mut conn = vec![Vec::new(); rules.len()];
    let mut rr = vec![Vec::new(); rules.len()];
    let mut program_ms = vec![Vec::new(); rules.len()];
    for _ in 0..rounds {
        for (k, n) in rules.iter().enumerate() {
            let want = expected_entries(*n);
            let t0 = Instant::now();
            std::fs::write(manifests.join("policy.yaml"), policy(*n)).unwrap();
            loop {
                let s = status(&lab);
                if s["rules"].as_u64() == Some(want as u64)
                    && s["isolated"].as_u64() == Some(u64::from(*n > 0))
                {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "never programmed {n} rules: {s}"
                );
                assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
                std::thread::sleep(Duration::from_millis(20));
            }
            program_ms[k].push(t0.elapsed().as_secs_f64() * 1000.0);
            let (c, errors) = measure(client, &cgroup, "conn", dst, secs);
            assert_eq!(errors, 0, "{n} rules: connections failed");
            conn[k].push(c);
            rr[k].push(measure(client, &cgroup, "rr", dst, secs).0);
        }
    }
    let _ = agent.kill();
    let _ = agent.wait();

    println!(
        "NetworkPolicy cost, server selected by a policy with N rules ({rounds} rounds, interleaved)\n"
    );
    println!(
        "{:<16} {:>12} {:>8} {:>12} {:>8} {:>18}",
        "rules", "new conn/s", "ratio", "req-resp/s", "ratio", "apply (ms, wall)"
    );
    println!(
        "{:<16} {:>12.0} {:>8} {:>12.0} {:>8} {:>18}",
        "no weft", no_weft.0, "", no_weft.1, "", ""
    );
    let base = (median(conn[0].clone()), median(rr[0].clone()));
    let mut rows = Vec::new();
    for (k, n) in rules.iter().enumerate() {
        let (c, r) = (median(conn[k].clone()), median(rr[k].clone()));
        let p = median(program_ms[k].clone());
        let label = if *n == 0 {
            "no policy".to_string()
        } else {
            n.to_string()
        };
        println!(
            "{label:<16} {c:>12.0} {:>8.2} {r:>12.0} {:>8.2} {p:>18.0}",
            c / base.0,
            r / base.1
        );
        rows.push(
            json!({"rules": n, "new_conn_per_s": c, "conn_ratio": c / base.0,
            "rr_per_s": r, "rr_ratio": r / base.1, "apply_ms": p}),
        );
    }
    println!(
        "\nRecomputing after one pod label change, N pods each isolated by its own policy \
         (user space, median of {} changes)\n",
        rounds * 4
    );
    println!(
        "{:<16} {:>14} {:>18} {:>18} {:>16}",
        "policies", "full (ms)", "incremental (ms)", "policies compiled", "pods recomputed"
    );
    let mut recomputed = Vec::new();
    for n in rules.iter().copied().filter(|n| *n > 0) {
        let (full, inc, work) = recompute(n, rounds * 4);
        println!(
            "{n:<16} {full:>14.3} {inc:>18.3} {:>18} {:>16}",
            work.policies, work.endpoints
        );
        recomputed.push(
            json!({"policies": n, "full_ms": full, "incremental_ms": inc,
            "policies_compiled": work.policies, "pods_recomputed": work.endpoints}),
        );
    }
    let report = json!({"no_weft": {"new_conn_per_s": no_weft.0, "rr_per_s": no_weft.1},
                        "rounds": rounds, "secs": secs, "results": rows,
                        "recompute": recomputed});
    if let Some(dir) = Path::new(&json_path).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nJSON: {json_path}");
}
