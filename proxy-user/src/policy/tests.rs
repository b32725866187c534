//! Truth tables in the style of the upstream NetworkPolicy e2e suite: namespaces x, y, z with pods
//! a, b, c each serving TCP and UDP on ports 80 and 81; for each scenario, every pair is checked
//! against the expected reachability.

use super::*;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn ip(ns: &str, pod: &str) -> Ipv4Addr {
    let n = NAMESPACES.iter().position(|x| *x == ns).unwrap() as u8 + 1;
    let p = PODS.iter().position(|x| *x == pod).unwrap() as u8 + 1;
    Ipv4Addr::new(10, 0, n, p)
}

fn namespace(name: &str, extra: &str) -> Namespace {
    serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, labels: {{ns: {name}{extra}}}}}"
    ))
    .unwrap()
}

fn pod(ns: &str, name: &str, extra_labels: &str) -> Pod {
    serde_yaml::from_str(&format!(
        "metadata: {{namespace: {ns}, name: {name}, labels: {{pod: {name}{extra_labels}}}}}
spec:
  containers:
  - name: c
    ports:
    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}
    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}
    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}
    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}
status: {{podIP: {}}}",
        ip(ns, name)
    ))
    .unwrap()
}

struct World {
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
}

fn world() -> World {
    World {
        namespaces: NAMESPACES.iter().map(|n| namespace(n, "")).collect(),
        pods: NAMESPACES
            .iter()
            .flat_map(|n| PODS.iter().map(move |p| pod(n, p, "")))
            .collect(),
    }
}

fn policies(yaml: &str) -> Vec<NetworkPolicy> {
    yaml.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect()
}

/// Checks every pair on one protocol and port against `expect(from, to)`; reports all mismatches.
fn check(
    w: &World,
    yaml: &str,
    proto: Proto,
    port: u16,
    expect: impl Fn((&str, &str), (&str, &str)) -> bool,
) {
    let (c, problems) = compile(&policies(yaml), &w.namespaces, &w.pods);
    assert!(problems.is_empty(), "{problems:?}");
    let mut wrong = Vec::new();
    for fns in NAMESPACES {
        for fp in PODS {
            for tns in NAMESPACES {
                for tp in PODS {
                    // Loopback is always allowed, as in upstream's suite.
                    let want = (fns, fp) == (tns, tp) || expect((fns, fp), (tns, tp));
                    let got = c.allows(ip(fns, fp), ip(tns, tp), proto, port);
                    if want != got {
                        wrong.push(format!(
                            "{fns}/{fp} -> {tns}/{tp} {proto:?}/{port}: expected {}, got {}",
                            if want { "allow" } else { "deny" },
                            if got { "allow" } else { "deny" }
                        ));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

fn all(_: (&str, &str), _: (&str, &str)) -> bool {
    true
}

#[test]
fn no_policy_allows_everything() {
    check(&world(), "", Proto::Tcp, 80, all);
}

#[test]
fn default_deny_ingress_and_egress() {
    let w = world();
    let deny_in =
        "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}";
    for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 81)] {
        check(&w, deny_in, proto, port, |_, to| to.0 != "x");
    }
    let deny_out =
        "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Egress]}";
    check(&w, deny_out, Proto::Tcp, 80, |from, _| from.0 != "x");
}

#[test]
fn allow_from_a_namespace() {
    let p = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]";
    check(&world(), p, Proto::Tcp, 80, |from, to| {
        to != ("x", "a") || from.0 == "y"
    });
}

#[test]
fn pod_and_namespace_selector_in_one_peer_is_and_in_two_peers_is_or() {
    let w = world();
    let and = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}
      podSelector: {matchLabels: {pod: b}}";
    check(&w, and, Proto::Tcp, 80, |from, to| {
        to != ("x", "a") || (from.1 == "b" && from.0 != "x")
    });
    let or = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}
    - podSelector: {matchLabels: {pod: b}}";
    check(&w, or, Proto::Tcp, 80, |from, to| {
        to != ("x", "a") || from.0 != "x" || from.1 == "b"
    });
}

#[test]
fn ip_block_with_except() {
    // x is 10.0.1.0/24, y 10.0.2.0/24, z 10.0.3.0/24.
    let p = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.2.0/24]}}]}]";
    check(&world(), p, Proto::Tcp, 80, |from, to| {
        to != ("x", "a") || from.0 != "y"
    });
}

#[test]
fn named_ports_and_port_ranges() {
    let w = world();
    let named = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: serve-81-tcp}]}]";
    check(&w, named, Proto::Tcp, 81, all);
    check(&w, named, Proto::Tcp, 80, |_, to| to != ("x", "a"));
    check(&w, named, Proto::Udp, 81, |_, to| to != ("x", "a"));
    let range = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: 80, endPort: 81, protocol: TCP}]}]";
    check(&w, range, Proto::Tcp, 80, all);
    check(&w, range, Proto::Tcp, 81, all);
    check(&w, range, Proto::Tcp, 82, |_, to| to != ("x", "a"));
    check(&w, range, Proto::Udp, 80, |_, to| to != ("x", "a"));
}

#[test]
fn egress_to_a_cidr_and_to_named_ports() {
    let w = world();
    let cidr = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.3.0/24}}]}]";
    check(&w, cidr, Proto::Udp, 80, |from, to| {
        from != ("x", "a") || to.0 == "z"
    });
    // A named port in an egress rule resolves against the destination pod.
    let named = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress: [{ports: [{port: serve-80-udp, protocol: UDP}]}]";
    check(&w, named, Proto::Udp, 80, |_, to| to != ("x", "a"));
    check(&w, named, Proto::Tcp, 80, |from, to| {
        from != ("x", "a") && to != ("x", "a")
    });
    let (c, _) = compile(&policies(named), &w.namespaces, &w.pods);
    assert!(
        !c.allows(ip("x", "a"), Ipv4Addr::new(192, 0, 2, 1), Proto::Udp, 80),
        "a named port never matches a destination that is not a pod"
    );
}

#[test]
fn policies_add_up() {
    let p = "metadata: {name: from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
---
metadata: {name: from-b, namespace: x}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]";
    check(&world(), p, Proto::Tcp, 80, |from, to| {
        to.0 != "x" || from == ("x", "b") || (to.1 == "a" && from.0 == "y")
    });
}

#[test]
fn label_changes_move_pods_in_and_out() {
    let p = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchLabels: {role: client}}}]}]";
    let mut w = world();
    check(&w, p, Proto::Tcp, 80, |_, to| to != ("x", "a"));
    // Namespace y joins team blue: still no pod with role=client.
    w.namespaces[1] = namespace("y", ", team: blue");
    check(&w, p, Proto::Tcp, 80, |_, to| to != ("x", "a"));
    // Pod y/c gets role=client: now it (and only it) may connect.
    w.pods[5] = pod("y", "c", ", role: client");
    check(&w, p, Proto::Tcp, 80, |from, to| {
        to != ("x", "a") || from == ("y", "c")
    });
    // The namespace leaves the team again.
    w.namespaces[1] = namespace("y", "");
    check(&w, p, Proto::Tcp, 80, |_, to| to != ("x", "a"));
}

#[test]
fn policy_types_default_from_the_rules() {
    // No policyTypes and egress rules: isolated both ways.
    let p = "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress: [{to: [{podSelector: {matchLabels: {pod: b}}}]}]";
    check(&world(), p, Proto::Tcp, 80, |from, to| {
        to != ("x", "a") && (from != ("x", "a") || to == ("x", "b"))
    });
}

#[test]
fn verdicts_name_the_deciding_policy() {
    let w = world();
    let (c, _) = compile(
        &policies(
            "metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
        ),
        &w.namespaces,
        &w.pods,
    );
    assert_eq!(
        c.ingress(ip("x", "b"), ip("x", "a"), Proto::Tcp, 80),
        Verdict::Allow(Some("x/web".into()))
    );
    assert_eq!(
        c.ingress(ip("x", "c"), ip("x", "a"), Proto::Tcp, 80),
        Verdict::DefaultDeny
    );
    assert_eq!(
        c.ingress(ip("x", "c"), ip("x", "b"), Proto::Tcp, 80),
        Verdict::Allow(None)
    );
}

#[test]
fn invalid_policies_are_reported_and_fail_closed() {
    let w = world();
    for (yaml, needle, isolated_ns_wide) in [
        (
            "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]",
            "ipBlock.cidr",
            false,
        ),
        (
            "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: 81, endPort: 80}]}]",
            "endPort 80 is below port 81",
            false,
        ),
        (
            "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{ports: [{port: 80, protocol: ICMP}]}]",
            "protocol \"ICMP\"",
            false,
        ),
        (
            "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{ipBlock: {cidr: 10.0.1.0/24, except: [10.0.2.0/24]}}]}]",
            "not inside",
            false,
        ),
        (
            "metadata: {name: p, namespace: x}
spec:
  podSelector: {matchExpressions: [{key: pod, operator: Like, values: [a]}]}
  ingress: [{}]",
            "unknown operator",
            true,
        ),
    ] {
        let (c, problems) = compile(&policies(yaml), &w.namespaces, &w.pods);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].reason.contains(needle), "{:?}", problems[0]);
        assert!(problems[0].object.contains("x/p"));
        for src in [ip("x", "b"), ip("y", "a")] {
            assert!(
                !c.allows(src, ip("x", "a"), Proto::Tcp, 80),
                "fails closed: {yaml}"
            );
        }
        assert_eq!(
            !c.allows(ip("y", "a"), ip("x", "b"), Proto::Tcp, 80),
            isolated_ns_wide,
            "{yaml}"
        );
        assert!(
            c.allows(ip("x", "a"), ip("y", "b"), Proto::Tcp, 80),
            "egress untouched"
        );
    }
}
