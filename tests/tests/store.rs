//! End-to-end, store: `weft server --data` (the SQLite backend) killed with SIGKILL while
//! clients write. After a restart every acknowledged write is there with the resourceVersion
//! it was acknowledged with, revisions go on from where they were, and a watch given a
//! resourceVersion from before the kill resumes with exactly the changes after it. The same
//! server on a three-member etcd cluster (real `etcd` processes on loopback) keeps its objects
//! in etcd, survives its own kill -9 and keeps serving when an etcd member is lost.
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
        }
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
            .args(["server", "--listen", "127.0.0.1:0", "--controllers=false"])
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
