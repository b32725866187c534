//! Shared helpers: run the real `weft-cni` binary inside a test-bed node, the way a runtime does.

#![allow(dead_code)]

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde_json::{Value, json};
use weft_testbed::{Host, Lab, Netlink};

/// What one plugin invocation produced.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// The CNI error code; panics unless the call failed with error JSON on stdout.
    #[track_caller]
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected failure, got success: {}", self.stdout);
        self.json()["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {}", self.stdout))
    }

    pub fn msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_owned()
    }

    #[track_caller]
    pub fn expect_ok(&self) -> &Self {
        assert!(
            self.ok,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The network config tests use.
pub fn conf(version: &str, subnet: &str, data_dir: &Path) -> Value {
    json!({
        "cniVersion": version, "name": "weftnet", "type": "weft-cni", "bridge": "weft0",
        "ipam": {"subnet": subnet, "dataDir": data_dir}
    })
}

/// Runs the plugin inside `host`'s namespace with exactly these CNI_* variables.
pub fn exec_on(host: &Host, vars: &[(&str, &str)], stdin: &[u8]) -> Out {
    let mut cmd = host.command(env!("CARGO_BIN_EXE_weft-cni")).unwrap();
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let o = child.wait_with_output().unwrap();
    Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn attach_vars<'a>(cmd: &'a str, cid: &'a str, ifname: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", cid),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
}

/// ADD through `host`.
pub fn add_on(host: &Host, cid: &str, netns: &Path, ifname: &str, conf: &Value) -> Out {
    let mut vars = attach_vars("ADD", cid, ifname);
    vars.push(("CNI_NETNS", netns.to_str().unwrap()));
    exec_on(host, &vars, conf.to_string().as_bytes())
}

/// DEL through `host`.
pub fn del_on(host: &Host, cid: &str, netns: Option<&Path>, ifname: &str, conf: &Value) -> Out {
    let mut vars = attach_vars("DEL", cid, ifname);
    if let Some(n) = netns {
        vars.push(("CNI_NETNS", n.to_str().unwrap()));
    }
    exec_on(host, &vars, conf.to_string().as_bytes())
}

/// One node with weft-cni's state in a scratch directory.
pub struct Node {
    pub lab: Lab,
    pub data_dir: PathBuf,
    pub node: usize,
}

impl Node {
    pub fn new() -> Self {
        let mut lab = Lab::new().unwrap();
        let node = lab.add_node().unwrap();
        let data_dir = lab.temp_dir("cni").unwrap();
        Self {
            lab,
            data_dir,
            node,
        }
    }

    pub fn host(&self) -> &Host {
        self.lab.node(self.node)
    }

    pub fn conf(&self) -> Value {
        conf("1.1.0", "10.244.0.0/24", &self.data_dir)
    }

    /// Creates a pod namespace and returns its path.
    pub fn pod(&mut self, label: &str) -> PathBuf {
        self.lab.add_namespace(label).unwrap().path().to_path_buf()
    }

    pub fn exec(&self, vars: &[(&str, &str)], conf: &Value) -> Out {
        exec_on(self.host(), vars, conf.to_string().as_bytes())
    }

    pub fn add(&self, cid: &str, netns: &Path, ifname: &str, conf: &Value) -> Out {
        add_on(self.host(), cid, netns, ifname, conf)
    }

    pub fn del(&self, cid: &str, netns: Option<&Path>, ifname: &str, conf: &Value) -> Out {
        del_on(self.host(), cid, netns, ifname, conf)
    }

    pub fn check(&self, cid: &str, netns: &Path, ifname: &str, conf: &Value, prev: &Value) -> Out {
        let mut c = conf.clone();
        c["prevResult"] = prev.clone();
        let mut vars = attach_vars("CHECK", cid, ifname);
        vars.push(("CNI_NETNS", netns.to_str().unwrap()));
        self.exec(&vars, &c)
    }

    /// The IPAM store's allocations: (address, containerID).
    pub fn allocations(&self) -> Vec<(String, String)> {
        weft_cni::ipam::Store::open(&self.data_dir, "weftnet")
            .unwrap()
            .allocations()
            .unwrap()
            .into_iter()
            .map(|(ip, o)| (ip.to_string(), o.container_id))
            .collect()
    }

    /// Names of the links in a namespace.
    pub fn links_in(&self, ns: &weft_testbed::NetNs) -> Vec<weft_netns::LinkInfo> {
        let ns = ns.try_clone().unwrap();
        self.lab.block_on(async move {
            let nl = Netlink::connect(&ns).await.unwrap();
            nl.links().await.unwrap()
        })
    }

    /// Names of the host-side veths weft-cni created on the node.
    pub fn host_veths(&self) -> Vec<String> {
        self.links_in(self.host().ns())
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n.starts_with("wft"))
            .collect()
    }
}
