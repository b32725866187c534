//! `cni-bench`: weft-cni against the reference CNI plugins (bridge + host-local, from Debian's
//! containernetworking-plugins) and the kernel floor (`ip -batch` doing the same netlink work),
//! measured side by side and interleaved in one run; then pod-to-pod throughput and
//! request/response rate on one node and across nodes, with a direct veth pair as the floor.
//!
//! Prints a table and writes JSON (`--json PATH`, default `target/bench/cni.json`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_testbed::{Host, Lab, Netlink};

const REF_DIR: &str = "/usr/lib/cni";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Impl {
    Weft,
    Reference,
    Floor,
}

impl Impl {
    fn label(self) -> &'static str {
        match self {
            Self::Weft => "weft-cni",
            Self::Reference => "reference bridge+host-local",
            Self::Floor => "kernel floor (ip -batch)",
        }
    }
}

struct Bench {
    lab: Lab,
    weft: PathBuf,
    dir: PathBuf,
    seq: usize,
}

/// Wall and CPU (user+sys of the children) of one operation.
#[derive(Clone, Copy)]
struct Cost {
    wall: Duration,
    cpu: Duration,
}

fn child_cpu() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

fn run(cmd: &mut Command, stdin: &[u8]) -> (bool, String) {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn timed(f: impl FnOnce() -> (bool, String)) -> Cost {
    let (c0, t0) = (child_cpu(), Instant::now());
    let (ok, text) = f();
    assert!(ok, "benchmark operation failed: {text}");
    Cost {
        wall: t0.elapsed(),
        cpu: child_cpu() - c0,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Bench {
    fn node_of(which: Impl) -> usize {
        match which {
            Impl::Weft => 0,
            Impl::Reference => 1,
            Impl::Floor => 2,
        }
    }

    fn conf(&self, which: Impl) -> Value {
        match which {
            Impl::Weft => {
                json!({"cniVersion": "1.1.0", "name": "bench", "type": "weft-cni", "bridge": "weft0",
                "ipam": {"subnet": "10.50.0.0/16", "dataDir": self.dir.join("weft")}})
            }
            Impl::Reference => {
                json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "cni0",
                "isGateway": true, "ipMasq": false, "hairpinMode": true,
                "ipam": {"type": "host-local", "subnet": "10.50.0.0/16", "dataDir": self.dir.join("ref")}})
            }
            Impl::Floor => Value::Null,
        }
    }

    fn cni(
        &self,
        which: Impl,
        cmd: &str,
        id: &str,
        ns: &Path,
        prev: Option<&Value>,
    ) -> (bool, String) {
        let host = self.lab.node(Self::node_of(which));
        let bin = match which {
            Impl::Weft => self.weft.clone(),
            _ => Path::new(REF_DIR).join("bridge"),
        };
        let mut conf = self.conf(which);
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let mut c = host.command(bin).unwrap();
        c.env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", ns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", REF_DIR);
        run(&mut c, conf.to_string().as_bytes())
    }

    /// The same netlink work as an ADD, done by `ip -batch` (two invocations: node and pod side).
    fn floor_add(&self, id: usize, ns_name: &str) -> (bool, String) {
        let host = self.lab.node(2);
        let hv = format!("fl{id}");
        let k = id % 60_000;
        let ip = format!("10.50.{}.{}/16", k / 250, k % 250 + 2);
        let node_side = format!(
            "link add {hv} type veth peer name eth0 netns {ns_name}\nlink set {hv} master br-floor\nlink set {hv} up\n"
        );
        let a = run(
            host.command("ip").unwrap().args(["-batch", "-"]),
            node_side.as_bytes(),
        );
        if !a.0 {
            return a;
        }
        let pod_side = format!(
            "addr add {ip} dev eth0\nlink set eth0 up\nroute add default via 10.50.255.254\n"
        );
        run(
            Command::new("ip").args(["-n", ns_name, "-batch", "-"]),
            pod_side.as_bytes(),
        )
    }

    fn floor_del(&self, id: usize) -> (bool, String) {
        run(
            self.lab
                .node(2)
                .command("ip")
                .unwrap()
                .args(["link", "del", &format!("fl{id}")]),
            b"",
        )
    }

    fn new_pod(&mut self) -> (String, PathBuf, String) {
        self.seq += 1;
        let label = format!("b{}", self.seq);
        let h = self.lab.add_namespace(&label).unwrap();
        (label.clone(), h.path().to_path_buf(), h.name().to_owned())
    }

    fn add(&self, which: Impl, i: usize, path: &Path, ns_name: &str) -> (Cost, Option<Value>) {
        let mut result = None;
        let cost = timed(|| match which {
            Impl::Floor => self.floor_add(i, ns_name),
            _ => {
                let (ok, out) = self.cni(which, "ADD", &format!("c{i}"), path, None);
                if ok {
                    result = serde_json::from_str(&out).ok();
                }
                (ok, out)
            }
        });
        (cost, result)
    }

    fn del(&self, which: Impl, i: usize, path: &Path) -> Cost {
        timed(|| match which {
            Impl::Floor => self.floor_del(i),
            _ => self.cni(which, "DEL", &format!("c{i}"), path, None),
        })
    }
}

/// Single-pod ADD/CHECK/DEL, `reps` times, interleaved across implementations.
fn single(b: &mut Bench, impls: &[Impl], reps: usize) -> Value {
    let mut rows = Vec::new();
    let mut costs: Vec<[Vec<Cost>; 3]> = impls.iter().map(|_| [vec![], vec![], vec![]]).collect();
    for r in 0..reps {
        for (k, &which) in impls.iter().enumerate() {
            let (_, path, name) = b.new_pod();
            let id = 100_000 + r;
            let (add, result) = b.add(which, id, &path, &name);
            costs[k][0].push(add);
            if which != Impl::Floor {
                let prev = result.expect("ADD result");
                costs[k][1].push(timed(|| {
                    b.cni(which, "CHECK", &format!("c{id}"), &path, Some(&prev))
                }));
            }
            costs[k][2].push(b.del(which, id, &path));
        }
    }
    // What starting the plugin costs before it does any work: weft-cni VERSION.
    let start: Vec<Cost> = (0..reps)
        .map(|_| {
            let mut c = b.lab.node(0).command(&b.weft).unwrap();
            c.env("CNI_COMMAND", "VERSION");
            timed(|| run(&mut c, b""))
        })
        .collect();
    rows.push(json!({
        "impl": "process start only (VERSION)",
        "add_wall_ms": ms(median(start.iter().map(|c| c.wall).collect())),
        "add_cpu_ms": ms(median(start.iter().map(|c| c.cpu).collect())),
    }));
    for (k, &which) in impls.iter().enumerate() {
        let m = |v: &Vec<Cost>, f: fn(&Cost) -> Duration| {
            if v.is_empty() {
                None
            } else {
                Some(ms(median(v.iter().map(f).collect())))
            }
        };
        rows.push(json!({
            "impl": which.label(),
            "add_wall_ms": m(&costs[k][0], |c| c.wall), "add_cpu_ms": m(&costs[k][0], |c| c.cpu),
            "check_wall_ms": m(&costs[k][1], |c| c.wall), "check_cpu_ms": m(&costs[k][1], |c| c.cpu),
            "del_wall_ms": m(&costs[k][2], |c| c.wall), "del_cpu_ms": m(&costs[k][2], |c| c.cpu),
        }));
    }
    Value::Array(rows)
}

/// `pods` pods added and deleted sequentially and `parallel`-way concurrently.
fn many(b: &mut Bench, which: Impl, pods: usize, parallel: usize) -> Value {
    let set: Vec<(String, PathBuf, String)> = (0..pods).map(|_| b.new_pod()).collect();
    // Sequential.
    let t0 = Instant::now();
    let adds: Vec<Duration> = set
        .iter()
        .enumerate()
        .map(|(i, (_, p, n))| b.add(which, i, p, n).0.wall)
        .collect();
    let seq_add = t0.elapsed();
    let first = median(adds[..10.min(pods)].to_vec());
    let last = median(adds[pods.saturating_sub(10)..].to_vec());
    let t0 = Instant::now();
    for (i, (_, p, _)) in set.iter().enumerate() {
        b.del(which, i, p);
    }
    let seq_del = t0.elapsed();
    // Parallel.
    let bench = &*b;
    let par = |f: &(dyn Fn(usize) + Sync)| {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for w in 0..parallel {
                s.spawn(move || {
                    for i in (w..pods).step_by(parallel) {
                        f(i);
                    }
                });
            }
        });
        t0.elapsed()
    };
    let par_add = par(&|i| {
        let (_, p, n) = &set[i];
        bench.add(which, i, p, n);
    });
    let par_del = par(&|i| {
        bench.del(which, i, &set[i].1);
    });
    json!({
        "impl": which.label(), "pods": pods, "parallel": parallel,
        "seq_add_total_s": seq_add.as_secs_f64(), "seq_del_total_s": seq_del.as_secs_f64(),
        "add_first10_median_ms": ms(first), "add_last10_median_ms": ms(last),
        "par_add_total_s": par_add.as_secs_f64(), "par_del_total_s": par_del.as_secs_f64(),
    })
}

/// 1-byte request/response over one TCP connection for `dur`; returns transactions per second.
fn rr_rate(server: &Host, client: &Host, dst: SocketAddr, dur: Duration) -> f64 {
    let listener = server
        .run(|| TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], dst.port()))))
        .unwrap()
        .unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    });
    let n = client
        .run(|| {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
            s.set_nodelay(true).unwrap();
            let (mut b, mut n, t0) = ([1u8; 1], 0u64, Instant::now());
            while t0.elapsed() < dur {
                s.write_all(&b).unwrap();
                s.read_exact(&mut b).unwrap();
                n += 1;
            }
            n as f64 / t0.elapsed().as_secs_f64()
        })
        .unwrap();
    srv.join().unwrap();
    n
}

/// iperf3 throughput in Gbit/s.
fn throughput(server: &Host, client: &Host, dst: std::net::Ipv4Addr, secs: u32) -> f64 {
    let mut srv = server
        .command("iperf3")
        .unwrap()
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .exec(
            "iperf3",
            [
                "-c",
                &dst.to_string(),
                "-p",
                "5201",
                "-t",
                &secs.to_string(),
                "-J",
            ],
        )
        .unwrap();
    let _ = srv.wait();
    let v: Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn datapath(b: &mut Bench, secs: u32) -> Value {
    // Overlay between node0 and node3 for the cross-node path.
    let nodes_file = b.dir.join("nodes.json");
    let list = json!([
        {"name": "n0", "address": b.lab.node(0).underlay_addr().unwrap().to_string(), "podCIDR": "10.50.0.0/16"},
        {"name": "n3", "address": b.lab.node(3).underlay_addr().unwrap().to_string(), "podCIDR": "10.60.0.0/16"},
    ]);
    std::fs::write(&nodes_file, list.to_string()).unwrap();
    let overlay = b.weft.with_file_name("weft-overlay");
    for (i, name) in [(0, "n0"), (3, "n3")] {
        let ok = b
            .lab
            .node(i)
            .command(&overlay)
            .unwrap()
            .args([
                "--nodes",
                nodes_file.to_str().unwrap(),
                "--node-name",
                name,
                "--once",
            ])
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "weft-overlay failed");
    }
    let mut pods = Vec::new();
    for (node, subnet) in [
        (0, "10.50.0.0/16"),
        (0, "10.50.0.0/16"),
        (3, "10.60.0.0/16"),
    ] {
        let (label, path, _) = b.new_pod();
        let conf = json!({"cniVersion": "1.1.0", "name": "dp", "type": "weft-cni",
            "ipam": {"subnet": subnet, "dataDir": b.dir.join(format!("dp{node}"))}});
        let mut c = b.lab.node(node).command(&b.weft).unwrap();
        c.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &label)
            .env("CNI_NETNS", &path)
            .env("CNI_IFNAME", "eth0");
        let (ok, out) = run(&mut c, conf.to_string().as_bytes());
        assert!(ok, "{out}");
        let r: Value = serde_json::from_str(&out).unwrap();
        let ip = weft_cni::result::first_ipv4(&r).expect("an IPv4 address in the result");
        pods.push((label, ip));
    }
    // The floor: two namespaces joined by a bare veth pair.
    b.lab.add_namespace("direct-a").unwrap();
    b.lab.add_namespace("direct-b").unwrap();
    let (na, nb) = (
        b.lab.host("direct-a").unwrap().ns().try_clone().unwrap(),
        b.lab.host("direct-b").unwrap().ns().try_clone().unwrap(),
    );
    b.lab.block_on(async move {
        let a = Netlink::connect(&na).await.unwrap();
        a.add_veth("eth0", "eth0", Some(&nb), None).await.unwrap();
        let l = a.require_link("eth0").await.unwrap();
        a.add_address(l.index, "10.70.0.1/24".parse().unwrap())
            .await
            .unwrap();
        a.set_up(l.index).await.unwrap();
        let bn = Netlink::connect(&nb).await.unwrap();
        let l = bn.require_link("eth0").await.unwrap();
        bn.add_address(l.index, "10.70.0.2/24".parse().unwrap())
            .await
            .unwrap();
        bn.set_up(l.index).await.unwrap();
    });
    let host = |l: &str| b.lab.host(l).unwrap();
    let cases: Vec<(&str, &Host, &Host, std::net::Ipv4Addr)> = vec![
        (
            "direct veth pair (floor)",
            host("direct-a"),
            host("direct-b"),
            "10.70.0.2".parse().unwrap(),
        ),
        (
            "weft-cni, same node (bridge)",
            host(&pods[0].0),
            host(&pods[1].0),
            pods[1].1,
        ),
        (
            "weft-cni, across nodes (vxlan)",
            host(&pods[0].0),
            host(&pods[2].0),
            pods[2].1,
        ),
    ];
    let mut rows = Vec::new();
    for (i, (name, client, server, dst)) in cases.into_iter().enumerate() {
        let gbps = throughput(server, client, dst, secs);
        let rr = rr_rate(
            server,
            client,
            SocketAddr::from((dst, 6000 + i as u16)),
            Duration::from_secs(u64::from(secs)),
        );
        rows.push(json!({"path": name, "throughput_gbps": gbps, "rr_per_s": rr}));
    }
    Value::Array(rows)
}

fn main() {
    let args = weft_tests::BenchArgs::from_env();
    let quick = args.has("--quick");
    let reps: usize = args.parsed("--reps", if quick { 5 } else { 30 });
    let pods: usize = args.parsed("--pods", if quick { 20 } else { 100 });
    let secs: u32 = if quick { 1 } else { 3 };
    let json_path: PathBuf = args.parsed("--json", PathBuf::from("target/bench/cni.json"));

    let mut lab = Lab::new().expect("the benchmark needs root");
    for _ in 0..4 {
        lab.add_node().unwrap();
    }
    let dir = lab.temp_dir("cni-bench").unwrap();
    let weft = weft_tests::weft_binary("weft-cni");
    let mut b = Bench {
        lab,
        weft,
        dir,
        seq: 0,
    };
    // The floor's bridge and gateway, as the plugins would set them up.
    b.lab
        .node(2)
        .exec("ip", ["link", "add", "br-floor", "type", "bridge"])
        .unwrap();
    b.lab
        .node(2)
        .exec("ip", ["addr", "add", "10.50.255.254/16", "dev", "br-floor"])
        .unwrap();
    b.lab
        .node(2)
        .exec("ip", ["link", "set", "br-floor", "up"])
        .unwrap();
    let have_ref = Path::new(REF_DIR).join("bridge").exists();
    let impls: Vec<Impl> = [Impl::Weft, Impl::Reference, Impl::Floor]
        .into_iter()
        .filter(|i| *i != Impl::Reference || have_ref)
        .collect();

    // The datapath goes first: the ADD/DEL churn below leaves the kernel tearing down veths in
    // the background for a while, which would depress the rates.
    eprintln!("cni-bench: datapath, {secs} s per measurement");
    let dp = datapath(&mut b, secs);
    eprintln!("cni-bench: single-pod ADD/CHECK/DEL x{reps}, interleaved");
    let single = single(&mut b, &impls, reps);
    eprintln!("cni-bench: {pods} pods sequential and 4-way parallel");
    let many: Vec<Value> = impls.iter().map(|&w| many(&mut b, w, pods, 4)).collect();

    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    println!("\n1 pod, median of {reps} (ms)");
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "ADD wall", "ADD cpu", "CHECK", "CHECK cpu", "DEL wall", "DEL cpu"
    );
    for r in single.as_array().unwrap() {
        println!(
            "{:<30} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r["impl"].as_str().unwrap(),
            f(&r["add_wall_ms"]),
            f(&r["add_cpu_ms"]),
            f(&r["check_wall_ms"]),
            f(&r["check_cpu_ms"]),
            f(&r["del_wall_ms"]),
            f(&r["del_cpu_ms"])
        );
    }
    println!("\n{pods} pods (s total; ms per ADD for the first and last 10)");
    println!(
        "{:<30} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9}",
        "", "seq ADD", "seq DEL", "ADD 1st10", "ADD last10", "4x ADD", "4x DEL"
    );
    for r in &many {
        println!(
            "{:<30} {:>9} {:>9} {:>11} {:>11} {:>9} {:>9}",
            r["impl"].as_str().unwrap(),
            f(&r["seq_add_total_s"]),
            f(&r["seq_del_total_s"]),
            f(&r["add_first10_median_ms"]),
            f(&r["add_last10_median_ms"]),
            f(&r["par_add_total_s"]),
            f(&r["par_del_total_s"])
        );
    }
    println!("\npod-to-pod datapath ({secs} s each)");
    println!("{:<32} {:>14} {:>16}", "", "TCP Gbit/s", "1-byte RR /s");
    for r in dp.as_array().unwrap() {
        println!(
            "{:<32} {:>14} {:>16.0}",
            r["path"].as_str().unwrap(),
            f(&r["throughput_gbps"]),
            r["rr_per_s"].as_f64().unwrap()
        );
    }
    let report = json!({"single_pod": single, "many_pods": many, "datapath": dp});
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nJSON: {}", json_path.display());
}
