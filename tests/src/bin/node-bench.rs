//! The node benchmark: how fast `weft node` starts and tears down real pods, with containerd
//! running weft-cni vs containerd running the reference `bridge` + `host-local` plugins, in the
//! same run on the same machine.
//!
//! For each CNI choice, a test node of its own (`weft_tests::node`: weft server, weft node, the
//! containerd it starts, weft-csi) and then:
//! 1. one pod at a time, `--rounds` times (default 10): API create → Ready, delete → gone;
//! 2. `--pods` pods (default 50) created at once: each one's create → Ready, then all deleted
//!    at once: each one's delete → gone;
//! 3. the idle RSS of `weft node` once they are gone.
//!
//! Ready is the pod's Ready condition as a watch sees it (the scheduler binds, the agent runs
//! the sandbox through CRI, containerd calls the CNI plugin, the container starts, the agent
//! reports); gone is the pod's DELETED event (the agent stopped the container, removed the
//! sandbox, containerd ran CNI DEL; the echo server exits at once on SIGTERM). Targets: p99 start under 1 s (Kubernetes' SLO is 5 s),
//! idle agent RSS under 30 MB (kubelet is about 100 MB).
//!
//! Root. Flags: `--rounds N`, `--pods N`, `--quick` (3 rounds, 10 pods), `--json PATH`
//! (default `target/bench/node.json`). Build first: `cargo build --release --workspace`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams},
};
use serde_json::json;
use weft_tests::{
    BenchArgs, kube_client,
    node::{Cni, Node},
    percentile, rss_mib,
};

/// When the watch saw each pod Ready, and each pod gone.
#[derive(Default)]
struct Seen {
    ready: HashMap<String, Instant>,
    gone: HashMap<String, Instant>,
}

/// What one CNI choice measured (milliseconds, MiB).
#[derive(Debug, Default)]
struct Figures {
    start_one: Vec<f64>,
    stop_one: Vec<f64>,
    start_burst: Vec<f64>,
    stop_burst: Vec<f64>,
    burst_all_ready: f64,
    agent_rss: f64,
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"bench": "node"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "echo",
                "image": "weft/echo:dev",
                "imagePullPolicy": "Never",
                "args": ["-listen=:8080", "-text=bench", "-shutdown-delay=0s"],
            }],
        },
    }))
    .expect("a valid pod")
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Follows the benchmark's pods, noting when each turns Ready and when each is gone.
async fn follow(api: Api<Pod>, seen: Arc<Mutex<Seen>>) {
    let params = WatchParams::default().labels("bench=node").timeout(290);
    let mut from = "0".to_owned();
    loop {
        let Ok(stream) = api.watch(&params, &from).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            let now = Instant::now();
            let mut seen = seen.lock().expect("not poisoned");
            match event {
                WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                    from = p.metadata.resource_version.clone().unwrap_or(from);
                    if is_ready(&p) {
                        let name = p.metadata.name.unwrap_or_default();
                        seen.ready.entry(name).or_insert(now);
                    }
                }
                WatchEvent::Deleted(p) => {
                    from = p.metadata.resource_version.clone().unwrap_or(from);
                    seen.gone
                        .entry(p.metadata.name.unwrap_or_default())
                        .or_insert(now);
                }
                _ => {}
            }
        }
    }
}

/// Waits until `pick` finds an instant for every name, for up to `secs`.
async fn wait_all(
    seen: &Mutex<Seen>,
    names: &[String],
    secs: u64,
    pick: impl Fn(&Seen, &str) -> Option<Instant>,
) -> Vec<Instant> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got: Option<Vec<Instant>> = {
            let seen = seen.lock().expect("not poisoned");
            names.iter().map(|n| pick(&seen, n)).collect()
        };
        if let Some(v) = got {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "pods did not get there within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

async fn measure(node: &Node, rounds: usize, burst: usize, label: &str) -> Figures {
    let client = kube_client(&node.kubeconfig())
        .await
        .expect("the node's API server");
    let api: Api<Pod> = Api::namespaced(client, "default");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = tokio::spawn(follow(api.clone(), seen.clone()));
    let mut f = Figures::default();
    let grace = DeleteParams::default();
    // Warm-up: the first sandbox pays for containerd's first image unpack.
    for i in 0..=rounds {
        let name = format!("one-{i}");
        let t0 = Instant::now();
        api.create(&PostParams::default(), &pod(&name))
            .await
            .expect("create");
        let ready = wait_all(&seen, std::slice::from_ref(&name), 60, |s, n| {
            s.ready.get(n).copied()
        })
        .await[0];
        let t1 = Instant::now();
        api.delete(&name, &grace).await.expect("delete");
        let gone = wait_all(&seen, std::slice::from_ref(&name), 60, |s, n| {
            s.gone.get(n).copied()
        })
        .await[0];
        if i > 0 {
            f.start_one.push(ms(t0, ready));
            f.stop_one.push(ms(t1, gone));
        }
    }
    eprintln!("{label}: {rounds} pods one at a time done");
    let names: Vec<String> = (0..burst).map(|i| format!("burst-{i}")).collect();
    let t0 = Instant::now();
    futures::future::join_all(names.iter().map(|n| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &pod(n))
                .await
                .expect("create")
        }
    }))
    .await;
    let ready = wait_all(&seen, &names, 180, |s, n| s.ready.get(n).copied()).await;
    f.start_burst = ready.iter().map(|r| ms(t0, *r)).collect();
    f.burst_all_ready = ready.iter().map(|r| ms(t0, *r)).fold(0.0, f64::max);
    let t1 = Instant::now();
    futures::future::join_all(names.iter().map(|n| {
        let (api, grace) = (api.clone(), grace.clone());
        async move { api.delete(n, &grace).await.expect("delete") }
    }))
    .await;
    let gone = wait_all(&seen, &names, 180, |s, n| s.gone.get(n).copied()).await;
    f.stop_burst = gone.iter().map(|g| ms(t1, *g)).collect();
    eprintln!("{label}: {burst} pods at once done");
    watcher.abort();
    let left = api
        .list(&ListParams::default().labels("bench=node"))
        .await
        .map_or(0, |l| l.items.len());
    assert_eq!(left, 0, "pods left behind");
    f
}

fn p(v: &[f64], q: f64) -> f64 {
    percentile(&mut v.to_vec(), q)
}

fn main() {
    let args = BenchArgs::from_env();
    let quick = args.has("--quick");
    let rounds = args.parsed("--rounds", if quick { 3 } else { 10 });
    let burst = args.parsed("--pods", if quick { 10 } else { 50 });
    let json_path = std::path::PathBuf::from(
        args.value("--json")
            .unwrap_or_else(|| "target/bench/node.json".into()),
    );
    let choices = [
        (Cni::Weft, "containerd + weft-cni"),
        (Cni::Reference, "containerd + bridge/host-local"),
    ];
    let mut results = Vec::new();
    for (cni, label) in choices {
        eprintln!("{label}: starting a test node");
        let node = Node::start(cni);
        let figures = node
            .host()
            .run(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime")
                    .block_on(measure(&node, rounds, burst, label))
            })
            .expect("running in the node's namespace");
        std::thread::sleep(Duration::from_secs(5));
        let agent = node.agent.as_ref().map_or(0, std::process::Child::id);
        let figures = Figures {
            agent_rss: rss_mib(agent),
            ..figures
        };
        results.push((label, figures));
        drop(node);
    }

    println!(
        "\nnode: pod start and teardown through containerd 1.6 and CRI (ms; {rounds} pods one at a time, {burst} at once)"
    );
    print!("{:<44}", "");
    for (label, _) in &results {
        print!(" {label:>32}");
    }
    println!();
    let row = |name: &str, cell: &dyn Fn(&Figures) -> String| {
        print!("{name:<44}");
        for (_, f) in &results {
            print!(" {:>32}", cell(f));
        }
        println!();
    };
    let pair = |v: &[f64]| format!("{:.0} / {:.0}", p(v, 0.5), p(v, 0.99));
    row("start 1 pod (create -> Ready) p50 / p99", &|f| {
        pair(&f.start_one)
    });
    row("teardown 1 pod (delete -> gone) p50 / p99", &|f| {
        pair(&f.stop_one)
    });
    row(&format!("start {burst} at once p50 / p99"), &|f| {
        pair(&f.start_burst)
    });
    row(&format!("all {burst} Ready after"), &|f| {
        format!("{:.0}", f.burst_all_ready)
    });
    row(&format!("teardown {burst} at once p50 / p99"), &|f| {
        pair(&f.stop_burst)
    });
    row("weft node idle RSS (MiB)", &|f| {
        format!("{:.1}", f.agent_rss)
    });
    println!("targets: p99 start < 1000 ms; idle agent RSS < 30 MiB (kubelet ~100 MB)");

    let out: Vec<serde_json::Value> = results
        .iter()
        .map(|(label, f)| {
            json!({
                "cni": label,
                "start_one_ms": {"p50": p(&f.start_one, 0.5), "p99": p(&f.start_one, 0.99)},
                "teardown_one_ms": {"p50": p(&f.stop_one, 0.5), "p99": p(&f.stop_one, 0.99)},
                "start_burst_ms": {"p50": p(&f.start_burst, 0.5), "p99": p(&f.start_burst, 0.99)},
                "burst_all_ready_ms": f.burst_all_ready,
                "teardown_burst_ms": {"p50": p(&f.stop_burst, 0.5), "p99": p(&f.stop_burst, 0.99)},
                "agent_rss_mib": f.agent_rss,
            })
        })
        .collect();
    if let Some(dir) = json_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"rounds": rounds, "pods": burst, "results": out}))
            .expect("json"),
    )
    .expect("writing the JSON");
    println!("wrote {}", json_path.display());
}
