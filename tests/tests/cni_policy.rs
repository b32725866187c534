//! Cross-component (root): weft-cni attaches weft-proxy's NetworkPolicy programs at ADD, so a new
//! pod meets policy from its first packet, before the agent has even seen its interface.
//!
//! The agent runs with a very long poll interval, so after its first sync it never looks at the
//! node again: whatever isolates a pod added later comes from weft-cni. The node's pod range is
//! known (Node spec.podCIDR), so a pod the agent has not processed is isolated (pending).

use serde_json::json;
use weft_testbed::{Host, Lab};
use weft_tests::weft_binary;

fn cni(
    node: &Host,
    cmd: &str,
    id: &str,
    netns: &str,
    conf: &serde_json::Value,
) -> serde_json::Value {
    let mut c = node.command(weft_binary("weft-cni")).unwrap();
    c.envs([
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/nonexistent"),
    ]);
    let out = weft_tests::output_with_stdin(c, conf.to_string().as_bytes());
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn a_new_pod_meets_policy_from_its_first_packet() {
    let mut lab = Lab::new().unwrap();
    let node = lab.add_node().unwrap();
    let pin = lab.bpffs_dir("cni-policy").unwrap();
    let cgroup = lab.cgroup("pods").unwrap();
    let manifests = lab.temp_dir("manifests").unwrap();
    let data = lab.temp_dir("ipam").unwrap();
    std::fs::write(
        manifests.join("node.yaml"),
        "kind: Node\nmetadata: {name: node0}\nspec: {podCIDR: 10.244.7.0/24}\n",
    )
    .unwrap();
    let mut agent = weft_tests::proxy_agent(
        lab.node(node),
        &weft_binary("weft-proxy"),
        &pin,
        &manifests,
        &cgroup,
        3_600_000,
    )
    .args(["--metrics-addr", "off"])
    .spawn()
    .unwrap();
    // The agent pins its programs at start.
    let prog = pin.join("progs").join("weft_policy_to_pod");
    let start = std::time::Instant::now();
    while !prog.exists() {
        assert!(
            start.elapsed().as_secs() < 20,
            "the agent never pinned its programs"
        );
        assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let conf = |policy: bool| {
        let mut c = json!({
            "cniVersion": "1.1.0", "name": "weftnet", "type": "weft-cni", "bridge": "weft0",
            "ipam": {"subnet": "10.244.7.0/24", "dataDir": data}
        });
        if policy {
            c["policyPinDir"] = json!(pin);
        }
        c
    };
    let guarded = lab.add_namespace("guarded").unwrap().path().to_path_buf();
    let plain = lab.add_namespace("plain").unwrap().path().to_path_buf();
    let node_host = lab.node(node);
    let ip_of = |r: &serde_json::Value| weft_cni::result::first_ipv4(r).unwrap();
    let r1 = cni(
        node_host,
        "ADD",
        "guarded",
        guarded.to_str().unwrap(),
        &conf(true),
    );
    let r2 = cni(
        node_host,
        "ADD",
        "plain",
        plain.to_str().unwrap(),
        &conf(false),
    );
    let (ip1, ip2) = (ip_of(&r1), ip_of(&r2));
    let links: Vec<String> = std::fs::read_dir(pin.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("policy-"))
        .collect();
    assert_eq!(links.len(), 2, "weft-cni pinned both directions: {links:?}");

    // Right after ADD, with the agent asleep: the guarded pod is isolated (pending) from its
    // first packet; the pod added without the option is not (the agent has not looked).
    assert!(
        !node_host.ping(ip1, 1).unwrap(),
        "the guarded pod answered before policy was known"
    );
    assert!(
        node_host.ping(ip2, 1).unwrap(),
        "the plain pod should answer"
    );

    cni(
        node_host,
        "DEL",
        "guarded",
        guarded.to_str().unwrap(),
        &conf(true),
    );
    cni(
        node_host,
        "DEL",
        "plain",
        plain.to_str().unwrap(),
        &conf(false),
    );
    let left: Vec<_> = std::fs::read_dir(pin.join("links"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("policy-"))
        .collect();
    assert!(
        left.is_empty(),
        "DEL removes the policy link pins: {left:?}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
}
