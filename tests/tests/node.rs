//! Privileged, end-to-end: real pods. A test node (a network namespace) runs `weft server`,
//! `weft node`, and the containerd `weft node` starts with weft-cni as its CNI plugin; images
//! are built from the workspace's `weft-pause` and `weft-echo` with `weft image build` and
//! loaded with `weft image load`. kubectl creates a Deployment; the pods run under runc, get
//! addresses from weft-cni, answer HTTP on them, run as the asked user with the asked CPU and
//! memory limits in their cgroups; a missing image with `imagePullPolicy: Never` gives
//! `ErrImageNeverPull`; an agent restart adopts the running pods without restarting them; and
//! deleting everything leaves no sandbox, container, veth, address, cgroup or shim behind.

use std::{path::PathBuf, time::Duration};

use weft_tests::node::{Cni, Node, pod_cgroups, processes_under, stop, wait_for};

const HELLO: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello, tier: web}}
    spec:
      securityContext: {runAsUser: 10001, runAsGroup: 10001}
      containers:
      - name: echo
        image: weft/echo:dev
        imagePullPolicy: Never
        args: ["-listen=:5678", "-text=hello from a real pod"]
        ports: [{name: http, containerPort: 5678}]
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
        livenessProbe: {exec: {command: ["/weft-echo", "-version"]}, periodSeconds: 2}
        resources:
          requests: {cpu: 100m, memory: 32Mi}
          limits: {cpu: 250m, memory: 64Mi}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {tier: web}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: unready, namespace: default, labels: {tier: web, app: unready}}
spec:
  containers:
  - name: echo
    image: weft/echo:dev
    imagePullPolicy: Never
    args: ["-listen=:5678", "-status-code=500"]
    ports: [{name: http, containerPort: 5678}]
    readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: dies, namespace: default, labels: {app: dies}}
spec:
  containers:
  - name: echo
    image: weft/echo:dev
    imagePullPolicy: Never
    args: ["-listen=:5678"]
    livenessProbe: {tcpSocket: {port: 5679}, periodSeconds: 1, failureThreshold: 2}
"#;

const VOLUMES: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: app-config, namespace: default}
data: {greeting: "hello from a configmap", other: "second"}
---
apiVersion: v1
kind: Secret
metadata: {name: app-secret, namespace: default}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: vols, namespace: default, labels: {app: vols}}
spec:
  containers:
  - name: echo
    image: weft/echo:dev
    imagePullPolicy: Never
    args: ["-listen=:5678"]
    env:
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: app-config, key: greeting}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: app-secret, key: password}}}
    - {name: MY_POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    envFrom: [{prefix: CFG_, configMapRef: {name: app-config}}]
    volumeMounts:
    - {name: config, mountPath: /etc/app}
    - {name: secret, mountPath: /etc/secret, readOnly: true}
    - {name: podinfo, mountPath: /etc/podinfo}
    - {name: scratch, mountPath: /scratch}
  volumes:
  - name: config
    configMap:
      name: app-config
      items: [{key: greeting, path: greeting}, {key: other, path: renamed.txt}]
  - {name: secret, secret: {secretName: app-secret}}
  - name: podinfo
    downwardAPI:
      items: [{path: name, fieldRef: {fieldPath: metadata.name}}, {path: labels, fieldRef: {fieldPath: metadata.labels}}]
  - {name: scratch, emptyDir: {}}
---
apiVersion: v1
kind: Pod
metadata: {name: badenv, namespace: default}
spec:
  containers:
  - name: echo
    image: weft/echo:dev
    imagePullPolicy: Never
    env: [{name: X, valueFrom: {configMapKeyRef: {name: no-such-config, key: k}}}]
"#;

/// A busy loop held to 200m by its CPU limit.
const BURNER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: burner, namespace: default, labels: {app: burner}}
spec:
  containers:
  - name: spin
    image: weft/echo:dev
    imagePullPolicy: Never
    command: [sh, -c, "while :; do :; done"]
    resources: {limits: {cpu: 200m, memory: 32Mi}}
"#;

/// A quantity kubectl top prints (`198m`, `3Mi`) as millicores or MiB.
fn top_number(field: &str, unit: &str) -> u64 {
    field
        .strip_suffix(unit)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{field:?} is not a number of {unit}"))
}

/// `kubectl top` through metrics.k8s.io, which the API server makes from the node's
/// `/stats/summary` (CRI ListContainerStats and the node's cgroup): the busy loop shows about
/// its 200m limit, the idle echo servers far less, and the node at least what its pods use.
fn kubectl_top(node: &Node) {
    node.kubectl(&["apply", "-f", "-"], Some(BURNER));
    wait_for("the burner running", Duration::from_secs(60), || {
        node.running("app=burner").len() == 1
    });
    let top = |args: &[&str]| {
        let out = weft_tests::kubectl_output(node.host(), &node.kubeconfig(), args, None);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let mut line = String::new();
    wait_for("kubectl top pod burner", Duration::from_secs(60), || {
        line = top(&["top", "pod", "burner", "--no-headers"]).unwrap_or_default();
        !line.is_empty()
    });
    // A second sample a few seconds on: the rate is over at least that long.
    std::thread::sleep(Duration::from_secs(3));
    let line = top(&["top", "pod", "burner", "--no-headers"])
        .unwrap_or_else(|e| panic!("kubectl top pod: {e}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"burner"), "{line}");
    let cpu = top_number(f[1], "m");
    assert!(
        (50..=300).contains(&cpu),
        "a spinning 200m container: {line}"
    );
    assert!(top_number(f[2], "Mi") < 32, "{line}");

    let hello = top(&[
        "top",
        "pod",
        "-l",
        "app=hello",
        "--containers",
        "--no-headers",
    ])
    .unwrap_or_else(|e| {
        let raw = top(&[
            "get",
            "--raw",
            "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods",
        ]);
        panic!("kubectl top pod -l: {e}\n{raw:?}")
    });
    let rows: Vec<Vec<&str>> = hello
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{hello}");
    for r in &rows {
        assert_eq!(r[1], "echo", "{hello}");
        assert!(top_number(r[2], "m") < 50, "idle echo servers: {hello}");
    }

    let nodes =
        top(&["top", "node", "--no-headers"]).unwrap_or_else(|e| panic!("kubectl top node: {e}"));
    let f: Vec<&str> = nodes.split_whitespace().collect();
    assert!(f.len() >= 5 && f[2].ends_with('%'), "{nodes}");
    assert!(
        top_number(f[1], "m") >= 50,
        "the node's pods include the burner: {nodes}"
    );
    assert!(top_number(f[3], "Mi") > 0, "{nodes}");

    node.kubectl(
        &["delete", "pod", "burner", "--grace-period=0", "--force"],
        None,
    );
}

/// The pid of the weft-echo process of the pod `uid`.
fn echo_pid(node: &Node, uid: &str) -> Option<String> {
    let base = PathBuf::from("/sys/fs/cgroup/memory")
        .join(node.cgroup.trim_start_matches('/'))
        .join(format!("pod{uid}"));
    std::fs::read_dir(base)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .find_map(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs"))
                .ok()?
                .lines()
                .find(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "weft-echo")
                })
                .map(str::to_owned)
        })
}

fn cgroup_value(node: &Node, controller: &str, uid: &str, file: &str) -> Option<String> {
    let base = PathBuf::from("/sys/fs/cgroup")
        .join(controller)
        .join(node.cgroup.trim_start_matches('/'))
        .join(format!("pod{uid}"));
    std::fs::read_dir(&base)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .find_map(|e| {
            let v = std::fs::read_to_string(e.path().join(file)).ok()?;
            let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            // The container's cgroup (the sandbox's pause has no limits).
            (!procs.trim().is_empty() && v.trim() != "-1" && !v.trim().starts_with("9223372036854"))
                .then(|| v.trim().to_owned())
        })
}

#[test]
fn pods_run_under_containerd_networked_by_weft_cni_and_leave_nothing_behind() {
    let mut node = Node::start(Cni::Weft);
    node.kubectl(&["apply", "-f", "-"], Some(HELLO));
    wait_for("two running pods", Duration::from_secs(60), || {
        node.running("app=hello").len() == 2
    });
    // Readiness comes from the probes: the pods answering 200 are ready, the one answering
    // 500 is not, and the Service's EndpointSlice says so; a failing liveness probe restarts.
    wait_for(
        "the Service's endpoints follow readiness",
        Duration::from_secs(30),
        || {
            let slices = node.json(&[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web",
            ]);
            let eps = slices["items"][0]["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let ready = eps
                .iter()
                .filter(|e| e["conditions"]["ready"] == true)
                .count();
            eps.len() == 3 && ready == 2
        },
    );
    let unready = node.json(&["get", "pod", "unready"]);
    assert_eq!(
        unready["status"]["containerStatuses"][0]["ready"], false,
        "{unready}"
    );
    wait_for("a liveness restart", Duration::from_secs(40), || {
        node.json(&["get", "pod", "dies"])["status"]["containerStatuses"][0]["restartCount"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    let pods = node.running("app=hello");
    for p in &pods {
        let ip = p["status"]["podIP"].as_str().unwrap();
        assert!(ip.starts_with("10.244.1."), "{ip}");
        let reply = node.get(&format!("{ip}:5678")).unwrap_or_default();
        assert!(reply.contains("hello from a real pod"), "{reply}");
        let c = &p["status"]["containerStatuses"][0];
        assert_eq!(c["ready"], true);
        assert!(
            c["containerID"]
                .as_str()
                .unwrap()
                .starts_with("containerd://")
        );
        let uid = p["metadata"]["uid"].as_str().unwrap();
        assert_eq!(
            cgroup_value(&node, "cpu", uid, "cpu.cfs_quota_us").as_deref(),
            Some("25000"),
            "250m of CPU"
        );
        assert_eq!(
            cgroup_value(&node, "memory", uid, "memory.limit_in_bytes").as_deref(),
            Some("67108864"),
            "64Mi"
        );
        // The container's process runs as the asked user.
        let procs = std::fs::read_dir(
            PathBuf::from("/sys/fs/cgroup/memory")
                .join(node.cgroup.trim_start_matches('/'))
                .join(format!("pod{uid}")),
        )
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
        let uids: Vec<String> = procs
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter(|s| s.contains("weft-echo"))
            .filter_map(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
            .collect();
        assert!(
            !uids.is_empty()
                && uids
                    .iter()
                    .all(|u| u.split_whitespace().nth(1) == Some("10001")),
            "{uids:?}"
        );
    }

    // kubectl logs reaches the containers' output through the API server and the node.
    let first = pods[0]["metadata"]["name"].as_str().unwrap();
    let logs = node.kubectl(&["logs", first], None);
    assert!(
        logs.contains("server is listening on 0.0.0.0:5678")
            && logs.contains("\"GET / HTTP/1.1\" 200"),
        "{logs}"
    );
    let tail = node.kubectl(
        &["logs", "-l", "app=hello", "--tail=1", "--timestamps"],
        None,
    );
    assert_eq!(tail.lines().count(), 2, "one line per pod: {tail}");
    assert!(tail.lines().all(|l| l.starts_with("20")), "{tail}");
    let previous = node.kubectl(&["logs", "dies", "--previous"], None);
    assert!(previous.contains("server is listening"), "{previous}");

    // kubectl exec, exec with stdin, cp and port-forward: through the API server and the node
    // to containerd's streaming server.
    let said = node.kubectl(
        &[
            "exec",
            first,
            "--",
            "sh",
            "-c",
            "echo in $HOSTNAME as $(id -u)",
        ],
        None,
    );
    assert_eq!(said.trim(), format!("in {first} as 10001"));
    node.kubectl(
        &["exec", "-i", first, "--", "sh", "-c", "cat > /tmp/note"],
        Some("written through stdin\n"),
    );
    let copied = node.dir.join("note");
    node.kubectl(
        &[
            "cp",
            &format!("{first}:/tmp/note"),
            &copied.display().to_string(),
        ],
        None,
    );
    assert_eq!(
        std::fs::read_to_string(&copied).unwrap_or_default(),
        "written through stdin\n"
    );
    let failed = node
        .host()
        .command("kubectl")
        .unwrap()
        .env("KUBECONFIG", node.kubeconfig())
        .args(["exec", first, "--", "sh", "-c", "exit 3"])
        .output()
        .unwrap();
    assert_eq!(
        failed.status.code(),
        Some(3),
        "the command's exit code comes back"
    );
    for (target, port) in [
        (format!("pod/{first}"), "5678"),
        ("svc/web".to_owned(), "80"),
    ] {
        let reply = port_forward(&node, &target, port);
        assert!(reply.contains("hello from a real pod"), "{target}: {reply}");
    }

    kubectl_top(&node);

    // The node's Events read like kubelet's in kubectl describe.
    let describe = node.kubectl(&["describe", "pod", first], None);
    for want in [
        "Scheduled",
        "Successfully assigned default/",
        "already present on machine",
        "Created container echo",
        "Started container echo",
    ] {
        assert!(
            describe.contains(want),
            "describe lacks {want:?}:\n{describe}"
        );
    }
    let describe = node.kubectl(&["describe", "pod", "unready"], None);
    assert!(
        describe.contains("Readiness probe failed: HTTP probe failed with statuscode: 500"),
        "{describe}"
    );

    // Volumes: a ConfigMap, a Secret, the downward API and an emptyDir, seen from inside the
    // container (through its process's root).
    node.kubectl(&["apply", "-f", "-"], Some(VOLUMES));
    wait_for("the volumes pod running", Duration::from_secs(60), || {
        node.running("app=vols").len() == 1
    });
    let vols = node.running("app=vols").remove(0);
    let pid = echo_pid(&node, vols["metadata"]["uid"].as_str().unwrap())
        .expect("the container's process");
    let inside = |p: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/root{p}"))
            .unwrap_or_else(|e| format!("<{p}: {e}>"))
    };
    assert_eq!(inside("/etc/app/greeting"), "hello from a configmap");
    assert_eq!(inside("/etc/app/renamed.txt"), "second");
    assert_eq!(inside("/etc/secret/password"), "s3cret");
    assert_eq!(inside("/etc/podinfo/name"), "vols");
    assert!(inside("/etc/podinfo/labels").contains("app=\"vols\""));
    assert!(std::path::Path::new(&format!("/proc/{pid}/root/scratch")).is_dir());
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    for want in [
        "GREETING=hello from a configmap",
        "PASSWORD=s3cret",
        "MY_POD=vols",
        "CFG_other=second",
    ] {
        assert!(
            environ.iter().any(|e| e == want),
            "{want} not in {environ:?}"
        );
    }
    wait_for(
        "CreateContainerConfigError",
        Duration::from_secs(30),
        || {
            node.json(&["get", "pod", "badenv"])["status"]["containerStatuses"][0]["state"]["waiting"]
                ["reason"]
                == "CreateContainerConfigError"
        },
    );
    let vol_dir = node
        .dir
        .join("node/state")
        .join(vols["metadata"]["uid"].as_str().unwrap());
    assert!(vol_dir.exists());

    // A PersistentVolumeClaim: provisioned by weft-csi on this node when its first pod comes,
    // bound, mounted with the pod's fsGroup; the data outlives the pod and its successor reads
    // it; deleting the claim deletes the volume.
    node.kubectl(
        &["apply", "-f", "-"],
        Some(&claim_pod(
            "writer",
            "echo -n persisted > /data/note; exec /weft-echo -listen=:5678 -text=writer",
        )),
    );
    wait_for("the writer running", Duration::from_secs(60), || {
        node.running("app=writer").len() == 1
    });
    let pvc = node.json(&["get", "pvc", "data"]);
    assert_eq!(pvc["status"]["phase"], "Bound", "{pvc}");
    let pv_name = pvc["spec"]["volumeName"].as_str().unwrap().to_owned();
    let pv = node.json(&["get", "pv", &pv_name]);
    assert_eq!(pv["spec"]["csi"]["driver"], "csi.weft.io", "{pv}");
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
            [0],
        "node0"
    );
    // The driver is registered on the node as kubelet registers CSI plugins.
    let n = node.json(&["get", "node", "node0"]);
    assert_eq!(
        n["metadata"]["labels"]["topology.weft.io/node"], "node0",
        "{n}"
    );
    let csinode = node.json(&["get", "csinode", "node0"]);
    assert_eq!(
        csinode["spec"]["drivers"][0]["name"], "csi.weft.io",
        "{csinode}"
    );
    node.kubectl(&["delete", "pod", "writer"], None);
    node.wait_gone("writer");
    let reader_manifest = claim_pod(
        "reader",
        r#"exec /weft-echo -listen=:5678 -text="read $(cat /data/note)""#,
    );
    node.kubectl(&["apply", "-f", "-"], Some(&reader_manifest));
    wait_for("the reader running", Duration::from_secs(60), || {
        node.running("app=reader").len() == 1
    });
    let reader = node.running("app=reader").remove(0);
    let ip = reader["status"]["podIP"].as_str().unwrap();
    let reply = node.get(&format!("{ip}:5678")).unwrap_or_default();
    assert!(reply.contains("read persisted"), "{reply}");
    // A bigger request expands the volume. Unused, ext4 grows offline (growing a mounted ext4
    // needs CAP_SYS_RESOURCE, which root lacks on this machine kind); the next pod sees the new
    // size and the same data.
    let fs_bytes = || {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let staged = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .find(|m| m.ends_with(&format!("/{pv_name}")))
            .map(str::to_owned)?;
        let st = nix::sys::statvfs::statvfs(staged.as_str()).ok()?;
        Some(st.blocks() * st.fragment_size())
    };
    let before = fs_bytes().expect("the staged volume");
    node.kubectl(&["delete", "pod", "reader"], None);
    node.wait_gone("reader");
    node.kubectl(
        &[
            "patch",
            "pvc",
            "data",
            "--type=merge",
            "-p",
            r#"{"spec": {"resources": {"requests": {"storage": "128Mi"}}}}"#,
        ],
        None,
    );
    wait_for("the claim resized", Duration::from_secs(60), || {
        node.json(&["get", "pvc", "data"])["status"]["capacity"]["storage"] == "128Mi"
    });
    let pv = node.json(&["get", "pv", &pv_name]);
    assert_eq!(pv["spec"]["capacity"]["storage"], "128Mi", "{pv}");
    // The pod alone: applying the claim's manifest again would ask for 64Mi again, a shrink
    // the API server refuses, as kube-apiserver does.
    let pod_only = reader_manifest.rsplit("---").next().unwrap().to_owned();
    node.kubectl(&["apply", "-f", "-"], Some(&pod_only));
    let shrink = node.try_kubectl(&["apply", "-f", "-"], Some(&reader_manifest));
    assert!(
        shrink.contains("less than status.capacity"),
        "a shrink was not refused: {shrink}"
    );
    wait_for("the reader running again", Duration::from_secs(60), || {
        node.running("app=reader").len() == 1
    });
    let after = fs_bytes().expect("the staged volume");
    assert!(
        after > before + 48 * 1024 * 1024,
        "the filesystem did not grow: {before} -> {after} bytes"
    );
    let reader = node.running("app=reader").remove(0);
    let ip = reader["status"]["podIP"].as_str().unwrap();
    let reply = node.get(&format!("{ip}:5678")).unwrap_or_default();
    assert!(
        reply.contains("read persisted"),
        "after the resize: {reply}"
    );
    node.kubectl(&["delete", "pod", "reader"], None);
    node.kubectl(&["delete", "pvc", "data"], None);
    wait_for("the volume reclaimed", Duration::from_secs(60), || {
        node.json(&["get", "pv"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    assert!(
        std::fs::read_dir(node.dir.join("csi/local/volumes")).map_or(true, |d| d.count() == 0),
        "weft-csi still has the volume"
    );

    // Log rotation (the agent runs with --container-log-max-size 64Ki, --container-log-max-files
    // 2): a log past the size is renamed and containerd reopens it (ReopenContainerLog); of
    // the rotated files only the newest is kept; `kubectl logs` reads the current one.
    node.kubectl(
        &[
            "run",
            "chatty",
            "--image=weft/echo:dev",
            "--image-pull-policy=Never",
            "--command",
            "--",
            "/weft-echo",
            "-listen=:5678",
            "-text=chatty",
        ],
        None,
    );
    wait_for("the chatty pod running", Duration::from_secs(60), || {
        node.running("run=chatty").len() == 1
    });
    let uid = node.json(&["get", "pod", "chatty"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let log_dir = node
        .dir
        .join(format!("node/pods/default_chatty_{uid}/chatty"));
    let rotated = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&log_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("0.log."))
            .collect();
        names.sort();
        names
    };
    // About 100 KiB of output from the container's own stdout, as if its process wrote it.
    let burst = |tag: &str| {
        let script = format!(
            "i=0; while [ $i -lt 1000 ]; do echo \"{tag} $i ........................................................................................\"; i=$((i+1)); done > /proc/1/fd/1"
        );
        node.kubectl(&["exec", "chatty", "--", "sh", "-c", &script], None);
    };
    burst("first");
    wait_for("a first rotation", Duration::from_secs(40), || {
        rotated().len() == 1
    });
    let first = rotated();
    burst("second");
    wait_for(
        "a second rotation, the first one pruned",
        Duration::from_secs(40),
        || {
            let now = rotated();
            now.len() == 1 && now != first
        },
    );
    burst("third");
    let last = node.kubectl(&["logs", "chatty", "--tail=1"], None);
    assert!(last.trim_end().starts_with("third 999"), "{last}");
    node.kubectl(&["delete", "pod", "chatty", "--grace-period=1"], None);

    // Jobs: pods that exit 0 are Succeeded and count towards completions; a Job whose pods fail
    // stops at its backoff limit.
    node.kubectl(&["apply", "-f", "-"], Some(JOBS));
    let out = node.kubectl(
        &[
            "wait",
            "--for=condition=complete",
            "job/twice",
            "--timeout=90s",
        ],
        None,
    );
    assert!(out.contains("condition met"), "{out}");
    let job = node.json(&["get", "job", "twice"]);
    assert_eq!(job["status"]["succeeded"], 2, "{job}");
    let table = node.kubectl(&["get", "job", "twice"], None);
    assert!(
        table.contains("Complete") && table.contains("2/2"),
        "{table}"
    );
    let job_pods = node.json(&["get", "pods", "-l", "job-name=twice"]);
    assert!(
        job_pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"]["phase"] == "Succeeded"),
        "{job_pods}"
    );
    let out = node.kubectl(
        &[
            "wait",
            "--for=condition=failed",
            "job/fails",
            "--timeout=90s",
        ],
        None,
    );
    assert!(out.contains("condition met"), "{out}");
    let job = node.json(&["get", "job", "fails"]);
    assert_eq!(
        job["status"]["failed"], 2,
        "backoffLimit 1: two failed pods, then no more: {job}"
    );
    // podFailurePolicy: exit code 42 is a bug no retry fixes, so the first such pod fails
    // the Job, well inside its backoffLimit of 6.
    let out = node.kubectl(
        &["wait", "--for=condition=failed", "job/bug", "--timeout=90s"],
        None,
    );
    assert!(out.contains("condition met"), "{out}");
    let job = node.json(&["get", "job", "bug"]);
    assert_eq!(job["status"]["failed"], 1, "{job}");
    let failed = job["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Failed"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(failed["reason"], "PodFailurePolicy", "{job}");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("Container work for pod default/bug-")
                && m.ends_with("failed with exit code 42 matching FailJob rule at index 1")),
        "{job}"
    );
    node.kubectl(&["delete", "job", "twice", "fails", "bug"], None);
    // An Indexed Job: each pod knows its index (env and hostname), every index completes once,
    // and the finished Job goes by itself after ttlSecondsAfterFinished.
    let out = node.kubectl(
        &[
            "wait",
            "--for=condition=complete",
            "job/shards",
            "--timeout=90s",
        ],
        None,
    );
    assert!(out.contains("condition met"), "{out}");
    let job = node.json(&["get", "job", "shards"]);
    assert_eq!(job["status"]["completedIndexes"], "0-2", "{job}");
    let mut said: Vec<String> = (0..3)
        .map(|i| {
            let pods = node.json(&[
                "get",
                "pods",
                "-l",
                &format!("batch.kubernetes.io/job-completion-index={i},job-name=shards"),
            ]);
            let name = pods["items"][0]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_owned();
            node.kubectl(&["logs", &name], None).trim().to_owned()
        })
        .collect();
    said.sort();
    assert_eq!(
        said,
        [
            "shard 0 of shards-0",
            "shard 1 of shards-1",
            "shard 2 of shards-2"
        ]
    );
    wait_for(
        "the finished Job and its pods gone after its TTL",
        Duration::from_secs(30),
        || {
            !node.json(&["get", "jobs"])["items"]
                .as_array()
                .is_some_and(|j| j.iter().any(|j| j["metadata"]["name"] == "shards"))
                && node.json(&["get", "pods", "-l", "job-name=shards"])["items"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
        },
    );

    // A missing image with pullPolicy Never is reported, not retried forever in silence.
    node.kubectl(&["apply", "-f", "-"], Some("apiVersion: v1\nkind: Pod\nmetadata: {name: missing}\nspec:\n  containers: [{name: c, image: weft/nothing:1, imagePullPolicy: Never}]\n"));
    wait_for("ErrImageNeverPull", Duration::from_secs(30), || {
        node.json(&["get", "pod", "missing"])["status"]["containerStatuses"][0]["state"]["waiting"]
            ["reason"]
            == "ErrImageNeverPull"
    });
    assert!(
        node.kubectl(&["get", "pod", "missing"], None)
            .contains("ErrImageNeverPull")
    );

    // Init containers run in order to completion before the app container, sharing its
    // volumes; a failing one with restartPolicy Never fails the pod; runAsNonRoot refuses an
    // image that would run as root, as kubelet does.
    node.kubectl(&["apply", "-f", "-"], Some(INIT));
    wait_for(
        "the initialized pod running",
        Duration::from_secs(60),
        || node.running("app=inited").len() == 1,
    );
    let inited = node.running("app=inited").remove(0);
    let inits = inited["status"]["initContainerStatuses"]
        .as_array()
        .unwrap();
    assert_eq!(inits.len(), 2, "{inited}");
    for i in inits {
        assert_eq!(i["state"]["terminated"]["exitCode"], 0, "{i}");
        assert_eq!(i["state"]["terminated"]["reason"], "Completed", "{i}");
    }
    let ip = inited["status"]["podIP"].as_str().unwrap();
    let reply = node.get(&format!("{ip}:5678")).unwrap_or_default();
    assert!(reply.contains("first then second"), "{reply}");
    wait_for("the failed init container", Duration::from_secs(30), || {
        node.json(&["get", "pod", "badinit"])["status"]["phase"] == "Failed"
    });
    let table = node.kubectl(&["get", "pod", "badinit"], None);
    assert!(table.contains("Init:Error"), "{table}");
    wait_for("runAsNonRoot refused", Duration::from_secs(30), || {
        node.json(&["get", "pod", "rootless"])["status"]["containerStatuses"][0]["state"]["waiting"]
            ["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("container has runAsNonRoot and image will run as root"))
    });

    // The agent restarts (and with it its containerd): the pods keep running, are adopted,
    // and are not restarted.
    let before: Vec<(String, String)> = pods
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["status"]["containerStatuses"][0]["containerID"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    stop(&mut node.agent);
    let ip = pods[0]["status"]["podIP"].as_str().unwrap().to_owned();
    assert!(
        node.get(&format!("{ip}:5678"))
            .is_some_and(|r| r.contains("hello")),
        "serving while the agent is down"
    );
    node.start_agent();
    std::thread::sleep(Duration::from_secs(5));
    let after = node.running("app=hello");
    assert_eq!(after.len(), 2);
    for (name, id) in before {
        let p = after
            .iter()
            .find(|p| p["metadata"]["name"] == name.as_str())
            .expect("same pods");
        assert_eq!(
            p["status"]["containerStatuses"][0]["containerID"],
            id.as_str(),
            "not restarted"
        );
        assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0);
    }

    // Deleting everything leaves nothing: no pod, veth, address, cgroup or shim.
    node.kubectl(&["delete", "deployment", "hello"], None);
    node.kubectl(
        &[
            "delete", "pod", "missing", "unready", "dies", "vols", "badenv", "inited", "badinit",
            "rootless",
        ],
        None,
    );
    wait_for("every pod gone", Duration::from_secs(60), || {
        node.json(&["get", "pods"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    wait_for("the pods' links gone", Duration::from_secs(10), || {
        node.links().iter().all(|l| !l.starts_with("wft"))
    });
    assert!(
        pod_cgroups(&node.cgroup).is_empty(),
        "{:?}",
        pod_cgroups(&node.cgroup)
    );
    assert!(!vol_dir.exists(), "the pod's volumes are removed with it");
    let ipam = std::fs::read_dir(node.dir.join("ipam/weft"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap_or_default())
        .collect::<Vec<_>>();
    assert!(
        ipam.iter()
            .any(|s| String::from_utf8_lossy(s).contains(r#""allocations":{}"#)),
        "every address released"
    );
    let shims = processes_under(&node.dir).into_iter().filter(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("shim"))
    });
    assert_eq!(shims.count(), 0, "no shim left");
}

/// A StorageClass of weft-csi, the claim `data`, and a pod `name` running `script` with the
/// claim at /data (as user 10001 with fsGroup 10001).
fn claim_pod(name: &str, script: &str) -> String {
    format!(
        r#"
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: weft-local, annotations: {{storageclass.kubernetes.io/is-default-class: "true"}}}}
provisioner: csi.weft.io
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data, namespace: default}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 64Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}
spec:
  securityContext: {{runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001}}
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: data}}}}]
  containers:
  - name: echo
    image: weft/echo:dev
    command: [sh, -c, {script:?}]
    volumeMounts: [{{name: data, mountPath: /data}}]
"#
    )
}

const JOBS: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: twice, namespace: default}
spec:
  completions: 2
  parallelism: 1
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: weft/echo:dev, command: [sh, -c, "echo working; exit 0"]}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: fails, namespace: default}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: weft/echo:dev, command: [sh, -c, "exit 3"]}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: bug, namespace: default}
spec:
  backoffLimit: 6
  podFailurePolicy:
    rules:
    - {action: Ignore, onPodConditions: [{type: DisruptionTarget, status: "True"}]}
    - {action: FailJob, onExitCodes: {containerName: work, operator: In, values: [42]}}
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: weft/echo:dev, command: [sh, -c, "exit 42"]}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: shards, namespace: default}
spec:
  completionMode: Indexed
  completions: 3
  parallelism: 3
  ttlSecondsAfterFinished: 15
  template:
    spec:
      restartPolicy: Never
      containers: [{name: work, image: weft/echo:dev, command: [sh, -c, 'echo "shard $JOB_COMPLETION_INDEX of $(cat /etc/hostname)"']}]
"#;

const INIT: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: inited, namespace: default, labels: {app: inited}}
spec:
  securityContext: {runAsUser: 10001, runAsNonRoot: true}
  volumes: [{name: work, emptyDir: {}}]
  initContainers:
  - {name: first, image: weft/echo:dev, command: [sh, -c, "echo -n first > /work/text"], volumeMounts: [{name: work, mountPath: /work}]}
  - {name: second, image: weft/echo:dev, command: [sh, -c, "echo -n ' then second' >> /work/text"], volumeMounts: [{name: work, mountPath: /work}]}
  containers:
  - name: echo
    image: weft/echo:dev
    command: [sh, -c, 'exec /weft-echo -listen=:5678 -text="$(cat /work/text)"']
    volumeMounts: [{name: work, mountPath: /work}]
---
apiVersion: v1
kind: Pod
metadata: {name: badinit, namespace: default}
spec:
  restartPolicy: Never
  initContainers: [{name: fails, image: weft/echo:dev, command: [sh, -c, "exit 1"]}]
  containers: [{name: echo, image: weft/echo:dev}]
---
apiVersion: v1
kind: Pod
metadata: {name: rootless, namespace: default}
spec:
  securityContext: {runAsNonRoot: true}
  containers: [{name: echo, image: weft/echo:dev}]
"#;

/// `kubectl port-forward TARGET :PORT` in the node's namespace, and one HTTP GET through the
/// local end it opens.
fn port_forward(node: &Node, target: &str, port: &str) -> String {
    let mut child = node
        .host()
        .command("kubectl")
        .unwrap()
        .env("KUBECONFIG", node.kubeconfig())
        .args(["port-forward", target, &format!(":{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    // "Forwarding from 127.0.0.1:41234 -> 5678"
    let local = line
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let reply = node
        .get(&local)
        .unwrap_or_else(|| format!("no answer on {local:?} ({line:?})"));
    let _ = child.kill();
    let _ = child.wait();
    reply
}
