//! End-to-end, store: `weft server --data` (the SQLite backend) killed with SIGKILL while
//! clients write. After a restart every acknowledged write is there with the resourceVersion
//! it was acknowledged with, revisions go on from where they were, and a watch given a
//! resourceVersion from before the kill resumes with exactly the changes after it. The same
//! server on a three-member etcd cluster (real `etcd` processes on loopback) keeps its objects
//! in etcd, survives its own kill -9 and keeps serving when an etcd member is lost; two servers
//! on one etcd serve one cluster (each sees the other's writes, in its reads and its watches,
//! concurrent writers through both lose nothing) and take turns running the controllers by
//! leader election, a killed leader's successor taking over; Services created through both at
//! once never share a cluster IP or node port.
//! Needs no root: everything runs on loopback.

use std::{
    path::PathBuf,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams},
};
use weft_store::{Backend, conformance::EtcdCluster};
use weft_tests::{kube_client, weft_binary};

struct Server {
    dir: PathBuf,
    child: Option<Child>,
    /// The store flags (`--data <dir>/store.db` unless set).
    store: Vec<String>,
    /// Other flags (`--controllers=false` unless set).
    flags: Vec<String>,
}

impl Server {
    fn new(label: &str) -> Server {
        let dir =
            std::env::temp_dir().join(format!("weft-store-e2e-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = vec!["--data".into(), dir.join("store.db").display().to_string()];
        Server {
            dir,
            child: None,
            store,
            flags: vec!["--controllers=false".into()],
        }
    }

    /// Runs the controllers, taking turns with other servers by leader election (short
    /// durations, so that a test sees a successor within seconds).
    fn electing(mut self) -> Server {
        self.flags = [
            "--leader-elect",
            "--leader-elect-lease-duration=3",
            "--leader-elect-renew-deadline=2",
            "--leader-elect-retry-period=1",
        ]
        .map(String::from)
        .to_vec();
        self
    }

    fn on_etcd(mut self, endpoints: &[String]) -> Server {
        self.store = vec!["--etcd-servers".into(), endpoints.join(",")];
        self
    }

    /// Starts `weft server` on the store and returns a client once it serves.
    async fn start(&mut self) -> Client {
        let kubeconfig = self.dir.join("kubeconfig");
        let _ = std::fs::remove_file(&kubeconfig);
        let child = Command::new(weft_binary("weft"))
            .args(["server", "--listen", "127.0.0.1:0"])
            .args(&self.flags)
            .args(&self.store)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !kubeconfig.exists() {
            assert!(Instant::now() < deadline, "weft server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        kube_client(&kubeconfig).await.unwrap()
    }

    /// Stops the server as a supervisor does (SIGTERM) and waits for it.
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            c.wait().unwrap();
        }
    }

    fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn config_map(name: &str, round: usize) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "data": {"round": round.to_string(), "payload": "x".repeat(512)},
    }))
    .unwrap()
}

fn rv(o: &impl ResourceExt) -> u64 {
    o.resource_version().unwrap().parse().unwrap()
}

#[test]
fn acknowledged_writes_survive_kill_9_at_any_point() {
    const WRITERS: usize = 8;
    let rt = runtime();
    let mut server = Server::new("kill9");
    // (name, resourceVersion) of every create the server acknowledged, over all rounds.
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    for round in 0..4 {
        let client = rt.block_on(server.start());
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        // Everything acknowledged before this start is still there, unchanged.
        let listed = rt.block_on(api.list(&ListParams::default())).unwrap();
        let stored: std::collections::HashMap<String, u64> =
            listed.items.iter().map(|c| (c.name_any(), rv(c))).collect();
        let before = acked.lock().unwrap().clone();
        for (name, version) in &before {
            assert_eq!(
                stored.get(name),
                Some(version),
                "round {round}: acknowledged {name}@{version} is not in the store after kill -9"
            );
        }
        let newest = listed
            .metadata
            .resource_version
            .unwrap()
            .parse::<u64>()
            .unwrap();
        assert!(before.iter().all(|(_, v)| *v <= newest));
        // Writers create objects as fast as they can; the server is killed under them.
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let api = api.clone();
                let acked = acked.clone();
                rt.spawn(async move {
                    for i in 0.. {
                        let name = format!("r{round}-w{w}-{i}");
                        match api
                            .create(&PostParams::default(), &config_map(&name, round))
                            .await
                        {
                            Ok(cm) => acked.lock().unwrap().push((name, rv(&cm))),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + 170 * round as u64));
        server.kill_9();
        for w in writers {
            rt.block_on(w).unwrap();
        }
        let now = acked.lock().unwrap().len();
        assert!(
            now > before.len() + WRITERS,
            "round {round}: only {} writes were acknowledged before the kill",
            now - before.len()
        );
        // The first write after the restart gets a newer revision than any acknowledged one.
        let client = rt.block_on(server.start());
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        let next = rt
            .block_on(api.create(
                &PostParams::default(),
                &config_map(&format!("after-{round}"), round),
            ))
            .unwrap();
        let max = acked.lock().unwrap().iter().map(|(_, v)| *v).max().unwrap();
        assert!(
            rv(&next) > max,
            "revision {} reused after a restart",
            rv(&next)
        );
        acked.lock().unwrap().push((next.name_any(), rv(&next)));
        server.kill_9();
    }
}

#[test]
fn a_watch_resumes_from_a_version_given_before_a_kill_9() {
    let rt = runtime();
    let mut server = Server::new("watch");
    let client = rt.block_on(server.start());
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let (from, after) = rt.block_on(async {
        let a = api
            .create(&PostParams::default(), &config_map("a", 0))
            .await
            .unwrap();
        api.create(&PostParams::default(), &config_map("b", 0))
            .await
            .unwrap();
        let mut changed = config_map("a", 1);
        changed.metadata.resource_version = a.metadata.resource_version.clone();
        api.replace("a", &PostParams::default(), &changed)
            .await
            .unwrap();
        api.delete("b", &DeleteParams::default()).await.unwrap();
        let after = api.list(&ListParams::default()).await.unwrap();
        (rv(&a), after.metadata.resource_version.unwrap())
    });
    server.kill_9();
    let client = rt.block_on(server.start());
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let seen = rt.block_on(async {
        let stream = api
            .watch(&WatchParams::default().timeout(2), &from.to_string())
            .await
            .unwrap();
        let events: Vec<WatchEvent<ConfigMap>> = stream.take(3).try_collect().await.unwrap();
        events
            .into_iter()
            .map(|e| match e {
                WatchEvent::Added(c) => ("ADDED", c.name_any(), rv(&c)),
                WatchEvent::Modified(c) => ("MODIFIED", c.name_any(), rv(&c)),
                WatchEvent::Deleted(c) => ("DELETED", c.name_any(), rv(&c)),
                other => panic!("unexpected watch event {other:?}"),
            })
            .collect::<Vec<_>>()
    });
    let names: Vec<(&str, &str)> = seen.iter().map(|(k, n, _)| (*k, n.as_str())).collect();
    assert_eq!(names, [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]);
    assert!(seen.windows(2).all(|w| w[0].2 < w[1].2), "{seen:?}");
    assert_eq!(seen[2].2.to_string(), after);
}

#[test]
fn on_a_three_member_etcd_the_objects_live_in_etcd_through_a_kill_9_and_a_lost_member() {
    let rt = runtime();
    let mut etcd = EtcdCluster::start("server", 3);
    let mut server = Server::new("etcd").on_etcd(&etcd.endpoints());
    let client = rt.block_on(server.start());
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let a = rt
        .block_on(api.create(&PostParams::default(), &config_map("a", 1)))
        .unwrap();
    // The object is in etcd, under kube-apiserver's key layout, at the revision it was given.
    let direct = weft_store::Etcd::connect(&etcd.endpoints(), "/registry/").unwrap();
    let snapshot = direct.snapshot().unwrap();
    let record = snapshot
        .records
        .iter()
        .find(|r| r.key == "configmaps/default/a")
        .expect("configmaps/default/a in etcd");
    assert_eq!(record.rev, rv(&a));
    let stored: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
    assert_eq!(stored["data"]["round"], "1");
    // kill -9 of the server: everything is still there, and revisions are etcd's.
    server.kill_9();
    let client = rt.block_on(server.start());
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let got = rt.block_on(api.get("a")).unwrap();
    assert_eq!(rv(&got), rv(&a));
    // A member lost: the other two are a quorum, and the server goes on writing once they have
    // a leader.
    etcd.stop(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        match rt.block_on(api.create(&PostParams::default(), &config_map("b", 2))) {
            Ok(b) => break b,
            Err(kube::Error::Api(s)) if s.code == 409 => break rt.block_on(api.get("b")).unwrap(),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no write after losing a member: {e}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    };
    assert!(rv(&b) > rv(&a));
    let listed = rt.block_on(api.list(&ListParams::default())).unwrap();
    let names: Vec<String> = listed.items.iter().map(|c| c.name_any()).collect();
    assert_eq!(names, ["a", "b"]);
}

/// Waits for `f` to give `Some`, for up to `secs` seconds.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The holder of the controllers' leader Lease, if one holds it.
fn leader(rt: &tokio::runtime::Runtime, client: &Client) -> Option<String> {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    rt.block_on(leases.get_opt("weft-controllers"))
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// How many pods the ReplicaSet controller made for the Deployment `web`.
fn web_pods(rt: &tokio::runtime::Runtime, client: &Client) -> usize {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    rt.block_on(pods.list(&ListParams::default().labels("app=web")))
        .map_or(0, |l| l.items.len())
}

#[test]
fn two_servers_on_one_etcd_serve_one_cluster_and_elect_one_controller_leader() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};
    let rt = runtime();
    let etcd = EtcdCluster::start("ha", 3);
    let mut a = Server::new("ha-a").on_etcd(&etcd.endpoints()).electing();
    let mut b = Server::new("ha-b").on_etcd(&etcd.endpoints()).electing();
    let ca = rt.block_on(a.start());
    let cb = rt.block_on(b.start());
    let on_a: Api<ConfigMap> = Api::namespaced(ca.clone(), "default");
    let on_b: Api<ConfigMap> = Api::namespaced(cb.clone(), "default");

    // A watch on B sees what is written through A; B updates at once with the version A gave.
    let mut watch = rt
        .block_on(on_b.watch(&WatchParams::default(), "0"))
        .unwrap()
        .boxed();
    let created = rt
        .block_on(on_a.create(&PostParams::default(), &config_map("shared", 1)))
        .unwrap();
    let mut next = config_map("shared", 2);
    next.metadata.resource_version = created.metadata.resource_version.clone();
    let updated = rt
        .block_on(on_b.replace("shared", &PostParams::default(), &next))
        .expect("B updates what A created, with A's version");
    assert!(rv(&updated) > rv(&created));
    let seen: Vec<(String, String)> = rt.block_on(async {
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(10), watch.try_next())
                .await
                .expect("B's watch is silent")
                .unwrap()
                .unwrap();
            match event {
                WatchEvent::Added(c) | WatchEvent::Modified(c) if c.name_any() == "shared" => {
                    let version = c.resource_version().unwrap();
                    seen.push((c.data.unwrap()["round"].clone(), version));
                }
                _ => {}
            }
        }
        seen
    });
    assert_eq!(
        seen,
        [
            ("1".to_owned(), created.resource_version().unwrap()),
            ("2".to_owned(), updated.resource_version().unwrap()),
        ]
    );
    let got = eventually(10, "A never saw B's update", || {
        let c = rt.block_on(on_a.get("shared")).ok()?;
        (rv(&c) == rv(&updated)).then_some(c)
    });
    assert_eq!(got.data.unwrap()["round"], "2");

    // Writers through both servers patch one object as fast as they can: no change is lost.
    const PATCHES: usize = 40;
    let writers: Vec<_> = [("a", on_a.clone()), ("b", on_b.clone())]
        .into_iter()
        .map(|(who, api)| {
            rt.spawn(async move {
                for i in 0..PATCHES {
                    let patch = serde_json::json!({"data": {format!("{who}{i}"): "x"}});
                    api.patch("shared", &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .unwrap_or_else(|e| panic!("patch {who}{i}: {e}"));
                }
            })
        })
        .collect();
    for w in writers {
        rt.block_on(w).unwrap();
    }
    for api in [&on_a, &on_b] {
        let data = eventually(10, "the servers disagree", || {
            let data = rt.block_on(api.get("shared")).ok()?.data?;
            (data.len() == 2 + 2 * PATCHES).then_some(data)
        });
        for who in ["a", "b"] {
            assert!((0..PATCHES).all(|i| data.contains_key(&format!("{who}{i}"))));
        }
    }

    // Services created through both at once get cluster IPs and node ports no other has.
    use k8s_openapi::api::core::v1::Service;
    const SERVICES: usize = 12;
    let creators: Vec<_> = [("a", ca.clone()), ("b", cb.clone())]
        .into_iter()
        .map(|(who, client)| {
            let api: Api<Service> = Api::namespaced(client, "default");
            rt.spawn(async move {
                for i in 0..SERVICES {
                    let svc: Service = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("svc-{who}{i}")},
                        "spec": {"type": "NodePort", "selector": {"app": "x"},
                                 "ports": [{"port": 80}]},
                    }))
                    .unwrap();
                    api.create(&PostParams::default(), &svc)
                        .await
                        .unwrap_or_else(|e| panic!("service {who}{i}: {e}"));
                }
            })
        })
        .collect();
    for c in creators {
        rt.block_on(c).unwrap();
    }
    let services: Api<Service> = Api::namespaced(ca.clone(), "default");
    let listed = eventually(10, "not every Service is listed", || {
        let l = rt.block_on(services.list(&ListParams::default())).ok()?;
        let ours: Vec<Service> = l
            .items
            .into_iter()
            .filter(|s| s.name_any().starts_with("svc-"))
            .collect();
        (ours.len() == 2 * SERVICES).then_some(ours)
    });
    let ips: std::collections::BTreeSet<String> = listed
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.clone())
        .collect();
    let ports: std::collections::BTreeSet<i32> = listed
        .iter()
        .filter_map(|s| s.spec.as_ref()?.ports.as_ref()?.first()?.node_port)
        .collect();
    assert_eq!(
        (ips.len(), ports.len()),
        (2 * SERVICES, 2 * SERVICES),
        "addresses handed out twice: {ips:?} {ports:?}"
    );

    // One leader runs the controllers: a Deployment made through B gets its pods.
    let first = eventually(20, "nobody leads", || leader(&rt, &ca));
    let deployments: Api<Deployment> = Api::namespaced(cb.clone(), "default");
    let web: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "weft/echo:dev"}]},
            },
        },
    }))
    .unwrap();
    rt.block_on(deployments.create(&PostParams::default(), &web))
        .unwrap();
    eventually(30, "the leader made no pods", || {
        (web_pods(&rt, &cb) == 2).then_some(())
    });
    // The leader is killed: the other server takes the Lease and runs the controllers.
    let (mut gone, survivor) = if leader_is(&rt, &ca, &a) {
        (a, (b, cb))
    } else {
        (b, (a, ca))
    };
    let (mut kept, client) = survivor;
    gone.kill_9();
    let second = eventually(30, "no successor took the Lease", || {
        leader(&rt, &client).filter(|h| *h != first)
    });
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let scale = serde_json::json!({"spec": {"replicas": 3}});
    rt.block_on(deployments.patch("web", &PatchParams::default(), &Patch::Merge(&scale)))
        .unwrap();
    eventually(30, "the successor's controllers did not scale", || {
        (web_pods(&rt, &client) == 3).then_some(())
    });
    // A leader stopped with SIGTERM gives the Lease up: the restarted server takes it.
    let restarted = rt.block_on(gone.start());
    kept.terminate();
    eventually(30, "the Lease was not handed on", || {
        leader(&rt, &restarted).filter(|h| *h != second)
    });
}

/// Whether `server` holds the leader Lease (the holder's identity names its process).
fn leader_is(rt: &tokio::runtime::Runtime, client: &Client, server: &Server) -> bool {
    let pid = server.child.as_ref().expect("running").id();
    leader(rt, client).is_some_and(|h| h.contains(&format!("_{pid}_")))
}
