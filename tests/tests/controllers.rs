//! End-to-end, control plane: `weft server` with its controllers and scheduler, driven by the
//! real kubectl, with hollow nodes (`weft_tests::hollow`) standing in for node agents. The
//! seed demo's workload steps — deploy, scale, rolling update (checked against maxSurge and
//! maxUnavailable on every watch event), rollback, self-heal — plus EndpointSlices following
//! readiness, scheduling failures explained as kube-scheduler explains them, a lost node's
//! pods recreated elsewhere, and cascading deletion in its three propagation policies.
//! Needs no root: everything runs on loopback.

use std::{
    path::PathBuf,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use weft_tests::{
    hollow::{HollowNodes, Options},
    output_with_stdin, weft_binary,
};

const SEED: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello-api, namespace: demo, labels: {app: hello-api}}
spec:
  replicas: 3
  revisionHistoryLimit: 5
  selector: {matchLabels: {app: hello-api}}
  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 1}}
  template:
    metadata: {labels: {app: hello-api}}
    spec:
      securityContext: {runAsUser: 10001, runAsNonRoot: true}
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      containers:
      - name: http-echo
        image: weft/echo:dev
        imagePullPolicy: Never
        args: ["-listen=:5678", "-text=hello from weft"]
        ports: [{name: http, containerPort: 5678}]
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 2}
        livenessProbe: {tcpSocket: {port: http}, periodSeconds: 5}
        resources:
          requests: {cpu: 100m, memory: 32Mi}
          limits: {cpu: 250m, memory: 64Mi}
---
apiVersion: v1
kind: Service
metadata: {name: hello-svc, namespace: demo}
spec:
  type: NodePort
  selector: {app: hello-api}
  ports: [{port: 80, targetPort: http, nodePort: 30080}]
"#;

struct Cluster {
    dir: PathBuf,
    server: Child,
    nodes: Option<HollowNodes>,
    rt: tokio::runtime::Runtime,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.take();
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    fn start(label: &str, nodes: &[&str]) -> Cluster {
        let dir = std::env::temp_dir().join(format!("weft-ctl-{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        let server = Command::new(weft_binary("weft"))
            .args([
                "server",
                "--listen",
                "127.0.0.1:0",
                "--node-monitor-grace-period",
                "2",
                "--node-monitor-period",
                "1",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .spawn()
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut c = Cluster {
            dir,
            server,
            nodes: None,
            rt,
        };
        wait_for("the API server", Duration::from_secs(10), || {
            kubeconfig.exists()
        });
        c.nodes = Some(HollowNodes::start(&kubeconfig, nodes, Options::default()).unwrap());
        c
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// `kubectl rollout status` of the seed's Deployment reports success within a minute.
    fn rolled_out(&self) {
        let status = self.kubectl(&[
            "-n",
            "demo",
            "rollout",
            "status",
            "deployment/hello-api",
            "--timeout=60s",
        ]);
        assert!(status.contains("successfully rolled out"), "{status}");
    }

    fn try_kubectl(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", self.kubeconfig()).args(args);
        match stdin {
            Some(text) => output_with_stdin(cmd, text.as_bytes()),
            None => cmd.output().unwrap(),
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_in(args, None)
    }

    fn kubectl_in(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.try_kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).unwrap()
    }

    fn client(&self) -> kube::Client {
        self.rt.block_on(async {
            let k = kube::config::Kubeconfig::read_from(self.kubeconfig()).unwrap();
            let config = kube::Config::from_custom_kubeconfig(k, &Default::default())
                .await
                .unwrap();
            kube::Client::try_from(config).unwrap()
        })
    }

    /// The pods of the seed's Deployment that are not being deleted: (all, ready).
    fn hello_pods(&self) -> (Vec<serde_json::Value>, usize) {
        let list = self.json(&["-n", "demo", "get", "pods", "-l", "app=hello-api"]);
        let live: Vec<serde_json::Value> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .cloned()
            .collect();
        let ready = live.iter().filter(|p| ready(p)).count();
        (live, ready)
    }

    fn wait_ready(&self, n: usize) {
        wait_for(
            &format!("{n} ready hello-api pods"),
            Duration::from_secs(30),
            || {
                let (live, ready) = self.hello_pods();
                live.len() == n && ready == n
            },
        );
    }
}

fn ready(p: &serde_json::Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Counts, on every pod event of the seed Deployment, the pods not being deleted and the ready
/// ones among them, and keeps the extremes.
struct Bounds {
    seen: Arc<Mutex<(usize, usize, usize)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Bounds {
    fn watch(c: &Cluster) -> Bounds {
        let api: Api<Pod> = Api::namespaced(c.client(), "demo");
        // (max live, min ready, events)
        let seen = Arc::new(Mutex::new((0, usize::MAX, 0)));
        let s = seen.clone();
        let task = c.rt.spawn(async move {
            let mut pods = std::collections::HashMap::new();
            let mut events = watcher(api, watcher::Config::default().labels("app=hello-api"))
                .default_backoff()
                .boxed();
            let mut synced = false;
            while let Some(Ok(e)) = events.next().await {
                match e {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        pods.insert(p.uid().unwrap_or_default(), p);
                    }
                    watcher::Event::Delete(p) => {
                        pods.remove(&p.uid().unwrap_or_default());
                    }
                    watcher::Event::InitDone => synced = true,
                    watcher::Event::Init => {}
                }
                if !synced {
                    continue;
                }
                let live: Vec<&Pod> = pods
                    .values()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let ready = live
                    .iter()
                    .filter(|p| {
                        p.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                let mut g = s.lock().unwrap();
                g.0 = g.0.max(live.len());
                g.1 = g.1.min(ready);
                g.2 += 1;
            }
        });
        Bounds { seen, task }
    }

    fn stop(self) -> (usize, usize, usize) {
        self.task.abort();
        *self.seen.lock().unwrap()
    }
}

#[test]
fn the_seed_demo_deploys_scales_rolls_back_and_heals() {
    let c = Cluster::start("seed", &["node-a", "node-b", "node-c"]);
    c.kubectl_in(&["apply", "-f", "-"], Some(SEED));
    c.wait_ready(3);
    let wide = c.kubectl(&["-n", "demo", "get", "deploy,rs,pods,svc", "-o", "wide"]);
    assert!(
        wide.contains("deployment.apps/hello-api   3/3     3            3"),
        "{wide}"
    );
    assert!(wide.contains("30080"), "{wide}");
    // The default spreading puts the three replicas on three nodes.
    let (pods, _) = c.hello_pods();
    let nodes: std::collections::BTreeSet<&str> = pods
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    // The Service's EndpointSlice holds the three pods, ready, on the named target port.
    wait_for("three ready endpoints", Duration::from_secs(10), || {
        let slices = c.json(&[
            "-n",
            "demo",
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=hello-svc",
        ]);
        let items = slices["items"].as_array().cloned().unwrap_or_default();
        items.len() == 1
            && items[0]["ports"][0]["port"] == 5678
            && items[0]["endpoints"].as_array().is_some_and(|e| {
                e.len() == 3
                    && e.iter()
                        .all(|e| e["conditions"]["ready"] == true && e["nodeName"].is_string())
            })
    });

    c.kubectl(&[
        "-n",
        "demo",
        "scale",
        "deployment/hello-api",
        "--replicas=5",
    ]);
    c.wait_ready(5);
    c.kubectl(&[
        "-n",
        "demo",
        "scale",
        "deployment/hello-api",
        "--replicas=3",
    ]);
    c.wait_ready(3);

    // A rolling update of the args: never more than 3 + 1 pods, never fewer than 3 - 1 ready.
    let bounds = Bounds::watch(&c);
    std::thread::sleep(Duration::from_millis(300));
    c.kubectl(&[
        "-n", "demo", "patch", "deployment/hello-api", "--type=json",
        "-p", r#"[{"op":"replace","path":"/spec/template/spec/containers/0/args/1","value":"-text=hello again"}]"#,
    ]);
    c.rolled_out();
    c.wait_ready(3);
    let (max_live, min_ready, events) = bounds.stop();
    eprintln!("rollout: at most {max_live} pods, at least {min_ready} ready, {events} events");
    assert!(events > 5, "the watch saw the rollout ({events} events)");
    assert!(
        max_live <= 4,
        "{max_live} pods at once, above replicas + maxSurge"
    );
    assert!(
        min_ready >= 2,
        "{min_ready} ready pods at one point, below replicas - maxUnavailable"
    );
    let (pods, _) = c.hello_pods();
    assert!(
        pods.iter()
            .all(|p| p["spec"]["containers"][0]["args"][1] == "-text=hello again")
    );

    let history = c.kubectl(&["-n", "demo", "rollout", "history", "deployment/hello-api"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    c.kubectl(&["-n", "demo", "rollout", "undo", "deployment/hello-api"]);
    c.rolled_out();
    c.wait_ready(3);
    let (pods, _) = c.hello_pods();
    assert!(
        pods.iter()
            .all(|p| p["spec"]["containers"][0]["args"][1] == "-text=hello from weft")
    );
    let d = c.json(&["-n", "demo", "get", "deployment", "hello-api"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    assert_eq!(
        d["status"]["observedGeneration"],
        d["metadata"]["generation"]
    );

    // Paused, a template change makes no new ReplicaSet; resumed, it rolls out. `rollout
    // restart` rolls out the same template again.
    let replicasets = |c: &Cluster| {
        c.json(&["-n", "demo", "get", "rs", "-l", "app=hello-api"])["items"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let before_pause = replicasets(&c);
    c.kubectl(&["-n", "demo", "rollout", "pause", "deployment/hello-api"]);
    c.kubectl(&[
        "-n",
        "demo",
        "set",
        "env",
        "deployment/hello-api",
        "PAUSED=yes",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(replicasets(&c), before_pause, "no rollout while paused");
    let d = c.json(&["-n", "demo", "get", "deployment", "hello-api"]);
    let progressing = d["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .cloned()
        .unwrap();
    assert_eq!(progressing["reason"], "DeploymentPaused", "{progressing}");
    c.kubectl(&["-n", "demo", "rollout", "resume", "deployment/hello-api"]);
    c.rolled_out();
    assert_eq!(replicasets(&c), before_pause + 1);
    c.kubectl(&["-n", "demo", "rollout", "restart", "deployment/hello-api"]);
    c.rolled_out();
    assert_eq!(replicasets(&c), before_pause + 2);
    c.wait_ready(3);
    let (pods, _) = c.hello_pods();

    // Self-heal: every pod force-deleted at once comes back under new names.
    let before: Vec<String> = pods
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    c.kubectl(&[
        "-n",
        "demo",
        "delete",
        "pod",
        "-l",
        "app=hello-api",
        "--force",
        "--grace-period=0",
    ]);
    c.wait_ready(3);
    let (pods, _) = c.hello_pods();
    assert!(
        pods.iter()
            .all(|p| !before.contains(&p["metadata"]["name"].as_str().unwrap().to_owned()))
    );

    let describe = c.kubectl(&["-n", "demo", "describe", "deployment/hello-api"]);
    eprintln!("{describe}");
    for want in [
        "Replicas:",
        "3 desired | 3 updated | 3 total | 3 available",
        "RollingUpdateStrategy:  1 max unavailable, 1 max surge",
        "NewReplicaSet:",
        "ScalingReplicaSet",
    ] {
        assert!(
            describe.contains(want),
            "describe lacks {want:?}:\n{describe}"
        );
    }
    let pod = pods[0]["metadata"]["name"].as_str().unwrap();
    let describe = c.kubectl(&["-n", "demo", "describe", "pod", pod]);
    assert!(
        describe.contains("Successfully assigned demo/"),
        "{describe}"
    );
}

#[test]
fn scheduling_failures_read_like_kube_scheduler_and_resolve_when_room_appears() {
    let c = Cluster::start("sched", &["small-1", "small-2"]);
    c.kubectl(&["taint", "node", "small-2", "dedicated=db:NoSchedule"]);
    c.kubectl_in(
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: v1
kind: Pod
metadata: {name: big, namespace: default}
spec:
  containers: [{name: c, image: weft/echo:dev, resources: {requests: {cpu: "6"}}}]
"#,
        ),
    );
    wait_for("a FailedScheduling event", Duration::from_secs(10), || {
        c.kubectl(&["describe", "pod", "big"]).contains(
            "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: db}.",
        )
    });
    let pod = c.json(&["get", "pod", "big"]);
    let sched = pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap();
    assert_eq!(
        (sched["status"].as_str(), sched["reason"].as_str()),
        (Some("False"), Some("Unschedulable"))
    );
    // A node with room arrives: the pod is bound to it.
    let _more = HollowNodes::start(
        &c.kubeconfig(),
        &["large-1"],
        Options {
            cpu: "16".into(),
            ..Options::default()
        },
    )
    .unwrap();
    wait_for("the pod on large-1", Duration::from_secs(15), || {
        c.json(&["get", "pod", "big"])["spec"]["nodeName"] == "large-1"
    });
    // Binding an already bound pod is a conflict, as in Kubernetes.
    let out = c.try_kubectl(&["create", "--raw", "/api/v1/namespaces/default/pods/big/binding", "-f", "-"],
        Some(r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"big"},"target":{"kind":"Node","name":"small-1"}}"#));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already assigned"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_lost_node_turns_not_ready_and_its_pods_come_back_elsewhere() {
    let c = Cluster::start("lost", &["node-a", "node-b"]);
    c.kubectl_in(&["apply", "-f", "-"], Some(SEED));
    c.wait_ready(3);
    let (pods, _) = c.hello_pods();
    let on_b: Vec<String> = pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "node-b")
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!on_b.is_empty(), "spreading put a pod on node-b");
    c.nodes.as_ref().unwrap().kill("node-b");
    wait_for(
        "node-b NotReady with the unreachable taint",
        Duration::from_secs(15),
        || {
            let n = c.json(&["get", "node", "node-b"]);
            let taints = n["spec"]["taints"].as_array().cloned().unwrap_or_default();
            taints
                .iter()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")
                && c.kubectl(&["get", "node", "node-b"]).contains("NotReady")
        },
    );
    wait_for(
        "three ready pods on node-a",
        Duration::from_secs(30),
        || {
            let (live, ready) = c.hello_pods();
            ready == 3 && live.iter().filter(|p| ready_pod_on(p, "node-a")).count() == 3
        },
    );
    // The taint manager marked what it evicted (the lost node never finishes the deletions).
    let disruption = |name: &str| {
        let p = c.json(&["-n", "demo", "get", "pod", name]);
        p["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "DisruptionTarget"))
            .map(|c| (c["status"].clone(), c["reason"].clone()))
    };
    for name in &on_b {
        assert_eq!(
            disruption(name),
            Some((
                serde_json::json!("True"),
                serde_json::json!("DeletionByTaintManager")
            )),
            "{name}"
        );
    }
    // So does the Eviction API: a pod that tolerates the lost node, evicted by hand.
    c.kubectl_in(&["apply", "-f", "-"], Some(STAYS));
    let api: Api<Pod> = Api::namespaced(c.client(), "demo");
    c.rt.block_on(api.evict("stays", &kube::api::EvictParams::default()))
        .expect("eviction");
    assert_eq!(
        disruption("stays"),
        Some((
            serde_json::json!("True"),
            serde_json::json!("EvictionByEvictionAPI")
        ))
    );
    let stays = c.json(&["-n", "demo", "get", "pod", "stays"]);
    assert!(!stays["metadata"]["deletionTimestamp"].is_null(), "{stays}");
}

/// A pod on the lost node-b that tolerates its taints.
const STAYS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: stays, namespace: demo}
spec:
  nodeName: node-b
  tolerations: [{operator: Exists}]
  containers: [{name: c, image: weft/echo:dev}]
"#;

fn ready_pod_on(p: &serde_json::Value, node: &str) -> bool {
    p["spec"]["nodeName"] == node && ready(p)
}

#[test]
fn cascading_deletion_in_background_foreground_and_orphan() {
    let c = Cluster::start("gc", &["node-a"]);
    let deploy = |name: &str| {
        let yaml = SEED
            .split("---")
            .nth(1)
            .unwrap()
            .replace("hello-api", name)
            .replace("namespace: demo", "namespace: default");
        c.kubectl_in(&["apply", "-f", "-"], Some(&yaml));
        wait_for(
            &format!("{name} available"),
            Duration::from_secs(30),
            || c.json(&["get", "deployment", name])["status"]["availableReplicas"] == 3,
        );
    };
    let count = |what: &str, label: &str| {
        c.json(&["get", what, "-l", label])["items"]
            .as_array()
            .map_or(0, Vec::len)
    };

    deploy("bg");
    c.kubectl(&["delete", "deployment", "bg"]);
    wait_for(
        "bg's ReplicaSet and pods collected",
        Duration::from_secs(20),
        || count("rs", "app=bg") == 0 && count("pods", "app=bg") == 0,
    );

    deploy("fg");
    // A finalizer of the test's own holds one pod, so the chain Deployment -> ReplicaSet ->
    // pods stays in foreground deletion until the test lets it go.
    let held = c.json(&["get", "pods", "-l", "app=fg"])["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    c.kubectl(&[
        "patch",
        "pod",
        &held,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["weft.test/hold"]}}"#,
    ]);
    c.kubectl(&[
        "delete",
        "deployment",
        "fg",
        "--cascade=foreground",
        "--wait=false",
    ]);
    // The Deployment waits for its dependents, then goes.
    wait_for("the held pod alone left", Duration::from_secs(20), || {
        count("pods", "app=fg") == 1
    });
    let d = c.json(&["get", "deployment", "fg"]);
    assert!(
        d["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "foregroundDeletion")
            && d["metadata"]["deletionTimestamp"].is_string(),
        "{d}"
    );
    c.kubectl(&[
        "patch",
        "pod",
        &held,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    wait_for(
        "fg and everything under it gone",
        Duration::from_secs(20),
        || {
            !c.try_kubectl(&["get", "deployment", "fg"], None)
                .status
                .success()
                && count("rs", "app=fg") == 0
                && count("pods", "app=fg") == 0
        },
    );

    deploy("orphan");
    c.kubectl(&["delete", "deployment", "orphan", "--cascade=orphan"]);
    wait_for("orphan's Deployment gone", Duration::from_secs(20), || {
        !c.try_kubectl(&["get", "deployment", "orphan"], None)
            .status
            .success()
    });
    let rs = c.json(&["get", "rs", "-l", "app=orphan"]);
    let items = rs["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert!(
        items[0]["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{}",
        items[0]
    );
    assert_eq!(
        count("pods", "app=orphan"),
        3,
        "the pods stay with their ReplicaSet"
    );

    // A namespace being deleted is Terminating until its content is gone (its pods, and here a
    // ConfigMap held by a finalizer, so that the check below cannot race the pods' removal),
    // and refuses new content.
    c.kubectl_in(&["apply", "-f", "-"], Some(SEED));
    c.wait_ready(3);
    c.kubectl_in(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, namespace: demo, finalizers: [example.com/hold]}\n"),
    );
    c.kubectl(&["delete", "namespace", "demo", "--wait=false"]);
    let out = c.try_kubectl(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: late, namespace: demo}\n"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("because it is being terminated"),
        "{err}"
    );
    wait_for("the pods of demo gone", Duration::from_secs(20), || {
        c.hello_pods().0.is_empty()
    });
    assert_eq!(
        c.json(&["get", "namespace", "demo"])["status"]["phase"],
        "Terminating"
    );
    c.kubectl(&[
        "-n",
        "demo",
        "patch",
        "configmap",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    wait_for("namespace demo gone", Duration::from_secs(20), || {
        !c.try_kubectl(&["get", "namespace", "demo"], None)
            .status
            .success()
    });
}

#[test]
fn kubectl_create_run_and_drain_send_protobuf_and_work() {
    // kubectl 1.32 sends these built-in objects as application/vnd.kubernetes.protobuf.
    let c = Cluster::start("protobuf", &["n1", "n2"]);
    // kubectl explain reads the kinds' schemas from /openapi/v3.
    let explained = c.kubectl(&["explain", "deployment.spec.strategy.rollingUpdate.maxSurge"]);
    assert!(
        explained.contains("FIELD: maxSurge") && explained.contains("maximum number of pods"),
        "{explained}"
    );
    let explained = c.kubectl(&["explain", "pvc.spec"]);
    assert!(explained.contains("storageClassName"), "{explained}");
    c.kubectl(&["create", "namespace", "pb"]);
    c.kubectl(&[
        "-n",
        "pb",
        "create",
        "deployment",
        "web",
        "--image=weft/echo:dev",
        "--replicas=3",
        "--port=5678",
        "--",
        "/weft-echo",
        "-text=hi",
    ]);
    c.kubectl(&[
        "-n",
        "pb",
        "create",
        "configmap",
        "cfg",
        "--from-literal=greeting=hello",
    ]);
    c.kubectl(&[
        "-n",
        "pb",
        "create",
        "secret",
        "generic",
        "s",
        "--from-literal=password=s3cret",
    ]);
    c.kubectl(&[
        "-n",
        "pb",
        "create",
        "service",
        "clusterip",
        "web",
        "--tcp=80:5678",
    ]);
    c.kubectl(&[
        "-n",
        "pb",
        "run",
        "one",
        "--image=weft/echo:dev",
        "--labels=app=one",
        "--env=X=1",
        "--",
        "-text=run",
    ]);
    let d = c.json(&["-n", "pb", "get", "deployment", "web"]);
    assert_eq!(d["spec"]["replicas"], 3, "{d}");
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "weft/echo:dev");
    assert_eq!(
        container["command"],
        serde_json::json!(["/weft-echo", "-text=hi"])
    );
    assert_eq!(container["ports"][0]["containerPort"], 5678);
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
    let cm = c.json(&["-n", "pb", "get", "configmap", "cfg"]);
    assert_eq!(cm["data"]["greeting"], "hello");
    let s = c.json(&["-n", "pb", "get", "secret", "s"]);
    assert_eq!(s["data"]["password"], "czNjcmV0");
    let svc = c.json(&["-n", "pb", "get", "service", "web"]);
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 5678);
    assert!(
        svc["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.starts_with("10.96."))
    );
    let pod = c.json(&["-n", "pb", "get", "pod", "one"]);
    assert_eq!(
        pod["spec"]["containers"][0]["env"][0],
        serde_json::json!({"name": "X", "value": "1"})
    );
    assert_eq!(
        pod["spec"]["containers"][0]["args"],
        serde_json::json!(["-text=run"])
    );
    // The Deployment runs (on the hollow nodes), then drain evicts (protobuf Evictions) what
    // runs on n1 and the ReplicaSet puts it back on n2.
    wait_for("three ready web pods", Duration::from_secs(30), || {
        let pods = c.json(&["-n", "pb", "get", "pods", "-l", "app=web"]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| ready(p))
            .count()
            == 3
    });
    // A budget of one unavailable pod: drain evicts one at a time, waiting for each
    // replacement to be ready (kubectl retries the refused evictions every 5 s).
    c.kubectl(&[
        "-n",
        "pb",
        "create",
        "poddisruptionbudget",
        "web",
        "--selector=app=web",
        "--max-unavailable=1",
    ]);
    let budget = |b: &serde_json::Value| {
        let s = &b["status"];
        (
            s["expectedPods"].as_i64(),
            s["desiredHealthy"].as_i64(),
            s["currentHealthy"].as_i64(),
            s["disruptionsAllowed"].as_i64(),
        )
    };
    wait_for(
        "the budget allows one disruption",
        Duration::from_secs(20),
        || {
            budget(&c.json(&["-n", "pb", "get", "pdb", "web"]))
                == (Some(3), Some(2), Some(3), Some(1))
        },
    );
    let table = c.kubectl(&["-n", "pb", "get", "pdb"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        table.contains("ALLOWED DISRUPTIONS")
            && rows
                .get(1)
                .is_some_and(|r| r[..4] == ["web", "N/A", "1", "1"]),
        "{table}"
    );
    let out = c.try_kubectl(
        &[
            "drain",
            "n1",
            "--ignore-daemonsets",
            "--force",
            "--delete-emptydir-data",
            "--timeout=60s",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "kubectl drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("every web pod back, on n2", Duration::from_secs(30), || {
        let pods = c.json(&["-n", "pb", "get", "pods", "-l", "app=web"]);
        let items = pods["items"].as_array().unwrap();
        items.iter().filter(|p| ready(p)).count() == 3
            && items.iter().all(|p| p["spec"]["nodeName"] == "n2")
    });
    // Every pod required: evictions are refused with the budget's reason, and nothing goes.
    c.kubectl(&[
        "-n",
        "pb",
        "patch",
        "pdb",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"maxUnavailable":null,"minAvailable":3}}"#,
    ]);
    wait_for("the budget allows none", Duration::from_secs(20), || {
        let b = c.json(&["-n", "pb", "get", "pdb", "web"]);
        b["status"]["observedGeneration"] == b["metadata"]["generation"]
            && budget(&b) == (Some(3), Some(3), Some(3), Some(0))
    });
    let out = c.try_kubectl(
        &[
            "drain",
            "n2",
            "--ignore-daemonsets",
            "--force",
            "--timeout=7s",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("Cannot evict pod as it would violate the pod's disruption budget"),
        "kubectl drain n2: {stderr}"
    );
    let pods = c.json(&["-n", "pb", "get", "pods", "-l", "app=web"]);
    let items = pods["items"].as_array().unwrap();
    assert!(
        items.len() == 3
            && items
                .iter()
                .all(|p| p["metadata"]["deletionTimestamp"].is_null()),
        "{pods}"
    );
}

const DAEMON: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: default}
spec:
  selector: {matchLabels: {app: agent}}
  updateStrategy: {type: RollingUpdate, rollingUpdate: {maxUnavailable: 1}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: weft/echo:dev, args: ["-text=v1"]}]
"#;

#[test]
fn a_daemonset_runs_one_pod_per_eligible_node_and_rolls_node_by_node() {
    let c = Cluster::start("daemonset", &["n1", "n2", "n3"]);
    c.kubectl(&["taint", "nodes", "n3", "dedicated=db:NoSchedule"]);
    c.kubectl_in(&["apply", "-f", "-"], Some(DAEMON));
    let placed = || -> Vec<(String, String, bool)> {
        let pods = c.json(&["get", "pods", "-l", "app=agent"]);
        let mut v: Vec<(String, String, bool)> = pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                (
                    p["spec"]["nodeName"].as_str().unwrap_or("").to_owned(),
                    p["metadata"]["labels"]["controller-revision-hash"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    ready(p),
                )
            })
            .collect();
        v.sort();
        v
    };
    wait_for(
        "a ready pod on n1 and n2, none on the tainted n3",
        Duration::from_secs(30),
        || {
            let p = placed();
            p.len() == 2 && p[0].0 == "n1" && p[1].0 == "n2" && p.iter().all(|x| x.2)
        },
    );
    let status = c.kubectl(&["rollout", "status", "daemonset/agent", "--timeout=30s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    let table = c.kubectl(&["get", "daemonset", "agent"]);
    assert!(
        table.lines().nth(1).is_some_and(|l| l
            .split_whitespace()
            .take(6)
            .eq(["agent", "2", "2", "2", "2", "2"])),
        "{table}"
    );
    // A cordoned node keeps its daemon; the taint going away brings one to n3.
    c.kubectl(&["cordon", "n1"]);
    c.kubectl(&["taint", "nodes", "n3", "dedicated-"]);
    wait_for("a pod on every node", Duration::from_secs(30), || {
        let p = placed();
        p.len() == 3
            && p.iter().map(|x| x.0.as_str()).eq(["n1", "n2", "n3"])
            && p.iter().all(|x| x.2)
    });
    // A template change rolls out: never more than one node without a ready pod.
    let before = placed()[0].1.clone();
    c.kubectl(&["set", "env", "daemonset/agent", "VERSION=2"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = placed();
        let ready_nodes: std::collections::BTreeSet<&str> =
            p.iter().filter(|x| x.2).map(|x| x.0.as_str()).collect();
        assert!(
            ready_nodes.len() >= 2,
            "more than maxUnavailable nodes down: {p:?}"
        );
        if p.len() == 3 && p.iter().all(|x| x.1 != before && x.2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not finish: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = c.kubectl(&["rollout", "status", "daemonset/agent", "--timeout=30s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    // Each template is a ControllerRevision: history lists both, undo goes back to the first.
    let history = c.kubectl(&["rollout", "history", "daemonset/agent"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    c.kubectl(&["rollout", "undo", "daemonset/agent"]);
    wait_for(
        "the first template back on every node",
        Duration::from_secs(60),
        || {
            let p = placed();
            p.len() == 3 && p.iter().all(|x| x.1 == before && x.2)
        },
    );
    // Deleting the DaemonSet takes its pods with it.
    c.kubectl(&["delete", "daemonset", "agent"]);
    wait_for("the daemon pods gone", Duration::from_secs(30), || {
        placed().is_empty()
    });
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  serviceName: web
  replicas: 3
  selector: {matchLabels: {app: web}}
  persistentVolumeClaimRetentionPolicy: {whenScaled: Delete}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - {name: c, image: weft/echo:dev, env: [{name: VERSION, value: "1"}]}
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 16Mi}}}
"#;

/// (name, ready) of the pods not being deleted, at one watch event.
type PodStates = Vec<(String, bool)>;

#[test]
fn a_statefulset_keeps_ordered_stable_pods_with_their_claims_and_rolls_back() {
    let c = Cluster::start("statefulset", &["n1", "n2"]);
    // Every pod event, in order: (name, ready) of the pods not being deleted.
    let seen: Arc<Mutex<Vec<PodStates>>> = Arc::default();
    let api: Api<Pod> = Api::namespaced(c.client(), "default");
    let log = seen.clone();
    let task = c.rt.spawn(async move {
        let mut pods = std::collections::BTreeMap::new();
        let mut events = watcher(api, watcher::Config::default().labels("app=web"))
            .default_backoff()
            .boxed();
        while let Some(Ok(e)) = events.next().await {
            match e {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    pods.insert(p.name_any(), p);
                }
                watcher::Event::Delete(p) => {
                    pods.remove(&p.name_any());
                }
                _ => continue,
            }
            let live: Vec<(String, bool)> = pods
                .values()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(|p| {
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    (p.name_any(), ready)
                })
                .collect();
            log.lock().unwrap().push(live);
        }
    });
    c.kubectl_in(&["apply", "-f", "-"], Some(WEB));
    let status = c.kubectl(&["rollout", "status", "statefulset/web", "--timeout=60s"]);
    assert!(status.contains("roll out complete"), "{status}");
    // OrderedReady: web-n appeared only once web-0..n-1 were all ready.
    for state in seen.lock().unwrap().iter() {
        for (name, _) in state {
            let n: usize = name.trim_start_matches("web-").parse().unwrap();
            for m in 0..n {
                assert!(
                    state.iter().any(|(o, r)| *o == format!("web-{m}") && *r),
                    "{name} existed before web-{m} was ready: {state:?}"
                );
            }
        }
    }
    let pods = c.json(&["get", "pods", "-l", "app=web"]);
    let mut names: Vec<(String, String, String)> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["spec"]["hostname"].as_str().unwrap_or("").to_owned(),
                p["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        (0..3)
            .map(|i| (
                format!("web-{i}"),
                format!("web-{i}"),
                format!("data-web-{i}")
            ))
            .collect::<Vec<_>>()
    );
    let claims = c.kubectl(&["get", "pvc", "-o", "name"]);
    for i in 0..3 {
        assert!(claims.contains(&format!("data-web-{i}")), "{claims}");
    }
    let table = c.kubectl(&["get", "sts", "web"]);
    assert!(table.contains("3/3"), "{table}");

    // A deleted pod comes back under its name, with its claim.
    let uid = c.json(&["get", "pod", "web-1"])["metadata"]["uid"].clone();
    c.kubectl(&["delete", "pod", "web-1", "--wait=false"]);
    wait_for("web-1 back", Duration::from_secs(30), || {
        let p = c.json(&["get", "pods", "-l", "app=web"]);
        p["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["metadata"]["name"] == "web-1" && p["metadata"]["uid"] != uid && ready(p))
    });

    // A template change rolls from the highest ordinal down, one pod at a time.
    seen.lock().unwrap().clear();
    c.kubectl(&["set", "env", "statefulset/web", "VERSION=2"]);
    let status = c.kubectl(&["rollout", "status", "statefulset/web", "--timeout=60s"]);
    assert!(status.contains("roll out complete"), "{status}");
    wait_for(
        "the update revision current",
        Duration::from_secs(30),
        || {
            let s = c.json(&["get", "sts", "web"]);
            s["status"]["currentRevision"] == s["status"]["updateRevision"]
                && s["status"]["updatedReplicas"] == 3
        },
    );
    let mut order = Vec::new();
    for state in seen.lock().unwrap().iter() {
        assert!(
            state.len() >= 2,
            "more than one pod down at once: {state:?}"
        );
        for i in 0..3 {
            let name = format!("web-{i}");
            if !state.iter().any(|(n, _)| *n == name) && order.last() != Some(&name) {
                order.push(name);
            }
        }
    }
    assert_eq!(order, ["web-2", "web-1", "web-0"], "replacement order");
    let history = c.kubectl(&["rollout", "history", "statefulset/web"]);
    assert!(
        history.contains('1') && history.contains('2'),
        "two revisions: {history}"
    );
    let revisions = c.kubectl(&["get", "controllerrevisions"]);
    assert!(revisions.contains("statefulset.apps/web"), "{revisions}");

    // Undo returns to the first template.
    c.kubectl(&["rollout", "undo", "statefulset/web"]);
    wait_for(
        "VERSION=1 again on every pod",
        Duration::from_secs(60),
        || {
            let p = c.json(&["get", "pods", "-l", "app=web"]);
            let items = p["items"].as_array().unwrap();
            items.len() == 3
                && items
                    .iter()
                    .all(|p| ready(p) && p["spec"]["containers"][0]["env"][0]["value"] == "1")
        },
    );

    // Scaling down removes the highest ordinals and, by policy, their claims.
    c.kubectl(&["scale", "statefulset/web", "--replicas=1"]);
    wait_for(
        "one pod and one claim left",
        Duration::from_secs(60),
        || {
            let p = c.json(&["get", "pods", "-l", "app=web"]);
            let claims = c.kubectl(&["get", "pvc", "-o", "name"]);
            p["items"].as_array().unwrap().len() == 1
                && p["items"][0]["metadata"]["name"] == "web-0"
                && claims.trim() == "persistentvolumeclaim/data-web-0"
        },
    );
    task.abort();
    // Deleting the set takes its pods; the claim stays (whenDeleted: Retain).
    c.kubectl(&["delete", "statefulset", "web"]);
    wait_for("web's pods gone", Duration::from_secs(30), || {
        c.json(&["get", "pods", "-l", "app=web"])["items"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    assert!(
        c.kubectl(&["get", "pvc", "-o", "name"])
            .contains("data-web-0")
    );
}

#[test]
fn server_side_apply_owns_fields_reports_conflicts_and_removes_what_it_stops_applying() {
    let c = Cluster::start("apply", &[]);
    let cm = |data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings, namespace: default}}\ndata: {{{data}}}\n"
        )
    };
    let out = c.kubectl_in(
        &["apply", "--server-side", "-f", "-"],
        Some(&cm("a: '1', b: '2'")),
    );
    assert!(out.contains("serverside-applied"), "{out}");
    let got = c.json(&["get", "cm", "settings", "--show-managed-fields"]);
    let managers: Vec<(&str, &str)> = got["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["manager"].as_str().unwrap(),
                e["operation"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(managers, [("kubectl", "Apply")]);
    assert!(got["metadata"]["managedFields"][0]["fieldsV1"]["f:data"]["f:a"].is_object());

    // Another manager changing an owned field conflicts, as kube-apiserver words it...
    let other = [
        "apply",
        "--server-side",
        "--field-manager=deployer",
        "-f",
        "-",
    ];
    let refused = c.try_kubectl(&other, Some(&cm("a: '9'")));
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("conflict with \"kubectl\"") && err.contains(".data.a"),
        "{err}"
    );
    assert_eq!(c.json(&["get", "cm", "settings"])["data"]["a"], "1");
    // ...and takes it over when forced.
    let mut forced = other.to_vec();
    forced.insert(2, "--force-conflicts");
    c.kubectl_in(&forced, Some(&cm("a: '9'")));
    assert_eq!(c.json(&["get", "cm", "settings"])["data"]["a"], "9");

    // A field another client set by an ordinary patch is its own; the applier dropping fields
    // removes only those nobody else owns.
    c.kubectl(&[
        "patch",
        "cm",
        "settings",
        "--type=merge",
        "-p",
        r#"{"data":{"c":"3"}}"#,
    ]);
    c.kubectl_in(&["apply", "--server-side", "-f", "-"], Some(&cm("d: '4'")));
    let data = c.json(&["get", "cm", "settings"])["data"].clone();
    assert_eq!(
        data,
        serde_json::json!({"a": "9", "c": "3", "d": "4"}),
        "b went with kubectl's apply, a stays with deployer, c with the patch"
    );
}

#[test]
fn a_parallel_statefulset_updates_only_from_its_partition_up() {
    let c = Cluster::start("partition", &["n1"]);
    c.kubectl_in(
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: shard}
spec:
  serviceName: shard
  replicas: 3
  podManagementPolicy: Parallel
  updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 2}}
  selector: {matchLabels: {app: shard}}
  template:
    metadata: {labels: {app: shard}}
    spec:
      containers: [{name: c, image: weft/echo:dev, env: [{name: VERSION, value: "1"}]}]
"#,
        ),
    );
    // (name, revision, VERSION, ready) of every pod.
    let pods = || -> Vec<(String, String, String, bool)> {
        let p = c.json(&["get", "pods", "-l", "app=shard"]);
        let mut v: Vec<_> = p["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["metadata"]["labels"]["controller-revision-hash"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    p["spec"]["containers"][0]["env"][0]["value"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    ready(p),
                )
            })
            .collect();
        v.sort();
        v
    };
    wait_for("three ready pods", Duration::from_secs(30), || {
        let p = pods();
        p.len() == 3 && p.iter().all(|x| x.3)
    });
    let first = pods()[0].1.clone();
    c.kubectl(&["set", "env", "statefulset/shard", "VERSION=2"]);
    // Only the ordinal at or above the partition moves to the new revision.
    wait_for("shard-2 updated", Duration::from_secs(30), || {
        let p = pods();
        p.len() == 3 && p[2].2 == "2" && p[2].3
    });
    std::thread::sleep(Duration::from_secs(2));
    let p = pods();
    assert!(
        p[0].1 == first && p[1].1 == first && p[0].2 == "1" && p[1].2 == "1",
        "below the partition nothing changes: {p:?}"
    );
    let status = c.kubectl(&["rollout", "status", "statefulset/shard", "--timeout=30s"]);
    assert!(status.contains("partitioned roll out complete"), "{status}");
    // A pod below the partition that is deleted comes back at the current revision.
    c.kubectl(&["delete", "pod", "shard-0", "--wait=false"]);
    wait_for("shard-0 back", Duration::from_secs(30), || {
        let p = pods();
        p.len() == 3 && p[0].3
    });
    assert_eq!(
        pods()[0].2,
        "1",
        "shard-0 came back at the current revision"
    );
    // The partition lowered to 0: everything rolls.
    c.kubectl(&[
        "patch",
        "statefulset",
        "shard",
        "--type=merge",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
    ]);
    wait_for("every pod at VERSION=2", Duration::from_secs(30), || {
        let p = pods();
        p.len() == 3 && p.iter().all(|x| x.2 == "2" && x.3)
    });
}

/// A scale in the middle of a rollout is shared between the ReplicaSets in proportion to their
/// sizes, as kube-controller-manager does (proportional scaling), rather than landing on the
/// new one only. The rollout is held halfway by a minReadySeconds no pod reaches.
#[test]
fn a_scale_mid_rollout_is_shared_in_proportion() {
    let c = Cluster::start("prop", &["n1", "n2"]);
    let deploy = |image: &str, min_ready: u32| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: prop, namespace: default}}\n\
             spec:\n  replicas: 10\n  minReadySeconds: {min_ready}\n  selector: {{matchLabels: {{app: prop}}}}\n\
             \x20 strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 3, maxUnavailable: 0}}}}\n\
             \x20 template:\n    metadata: {{labels: {{app: prop}}}}\n\
             \x20   spec: {{containers: [{{name: c, image: {image}}}]}}\n"
        )
    };
    c.kubectl_in(&["apply", "-f", "-"], Some(&deploy("echo:1", 0)));
    let status = c.kubectl(&["rollout", "status", "deployment/prop", "--timeout=60s"]);
    assert!(status.contains("successfully rolled out"), "{status}");
    // No pod is available for an hour from now on: the rollout surges 3 and holds there.
    c.kubectl_in(&["apply", "-f", "-"], Some(&deploy("echo:2", 3600)));
    let sizes = || {
        let list = c.json(&["get", "rs", "-l", "app=prop"]);
        let mut by_image: Vec<(String, i64)> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rs| {
                (
                    rs["spec"]["template"]["spec"]["containers"][0]["image"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    rs["spec"]["replicas"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        by_image.sort();
        by_image
    };
    let pair = |old: i64, new: i64| vec![("echo:1".to_owned(), old), ("echo:2".to_owned(), new)];
    wait_for(
        "the rollout held at 10 old + 3 new",
        Duration::from_secs(30),
        || sizes() == pair(10, 3),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sizes(), pair(10, 3), "held");

    // 10 → 20 replicas (23 allowed with the surge): 10·23/13 ≈ 18 old, 3·23/13 ≈ 5 new.
    c.kubectl(&["scale", "deployment/prop", "--replicas=20"]);
    wait_for("a proportional scale up", Duration::from_secs(30), || {
        sizes() == pair(18, 5)
    });
    // 20 → 4 (7 allowed): 18·7/23 ≈ 5 old, 5·7/23 ≈ 2 new, as the Deployment's events say.
    // The old pods are available (their ReplicaSet predates the minReadySeconds), so the
    // rollout then goes on within its bounds: one more old pod for one new.
    c.kubectl(&["scale", "deployment/prop", "--replicas=4"]);
    let scaled = || {
        let events = c.json(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=prop",
        ]);
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "ScalingReplicaSet")
            .filter_map(|e| e["message"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    wait_for("a proportional scale down", Duration::from_secs(30), || {
        let said = scaled();
        ["from 18 to 5", "from 5 to 2"].iter().all(|m| {
            said.iter()
                .any(|s| s.contains("Scaled down") && s.ends_with(m))
        })
    });
    wait_for("the rollout held again", Duration::from_secs(30), || {
        sizes() == pair(4, 3)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sizes(), pair(4, 3), "held: no new pod is available");
    let said = scaled();
    assert!(
        said.iter().any(|s| s.ends_with("from 10 to 18"))
            && said.iter().any(|s| s.ends_with("from 3 to 5")),
        "the scale up was shared too: {said:?}"
    );
}
