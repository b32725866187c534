use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::*;
use crate::manifests::parse_str;
use crate::policy::compile;

/// Desired contents with policy indices replaced by names (the two paths number them
/// differently).
type Normal = (
    BTreeMap<Ipv4Addr, u32>,
    BTreeSet<Ipv4Net>,
    BTreeSet<Ipv4Net>,
    BTreeSet<(Ipv4Addr, String, String)>,
);

fn normal(d: &Desired) -> Normal {
    let mut rules = BTreeSet::new();
    for (ip, r) in &d.rules {
        for (k, idx) in r {
            rules.insert((*ip, format!("{k:?}"), d.policies[*idx as usize].clone()));
        }
    }
    (
        d.endpoints.clone(),
        d.podnets.clone(),
        d.ipcache.clone(),
        rules,
    )
}

/// A small pseudo-random generator (xorshift), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const POLICIES: [&str; 9] = [
    "spec: {podSelector: {matchLabels: {app: A}}}",
    "spec: {podSelector: {}, policyTypes: [Ingress, Egress]}",
    "spec: {podSelector: {matchLabels: {app: A}}, ingress: [{from: [{podSelector: {matchLabels: {app: B}}}]}]}",
    "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: T}}, podSelector: {matchLabels: {app: B}}}]}]}",
    "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: T}}}, {podSelector: {matchLabels: {app: B}}}], ports: [{port: http}]}]}",
    "spec: {podSelector: {matchLabels: {app: A}}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.8/30]}}], ports: [{port: 80, endPort: 90}]}]}",
    "spec: {podSelector: {matchLabels: {app: A}}, egress: [{to: [{podSelector: {matchLabels: {app: B}}}], ports: [{port: http}]}]}",
    "spec: {podSelector: {matchLabels: {app: A}}, egress: [{ports: [{port: http, protocol: UDP}]}]}",
    "spec: {podSelector: {matchLabels: {app: A}}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/28}}]}], policyTypes: [Egress]}",
];
const APPS: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];

/// (template, namespace, app A, app B, team T).
type PolicySlot = (usize, usize, usize, usize, usize);

#[derive(Clone)]
struct World {
    /// (namespace, app label, has the named port, on this node) by pod index; None: absent.
    pods: Vec<Option<(usize, usize, bool, bool)>>,
    /// team label of each namespace.
    teams: Vec<Option<usize>>,
    /// (template, namespace, app A, app B, team T) of each policy slot.
    policies: Vec<Option<PolicySlot>>,
}

impl World {
    fn yaml(&self) -> String {
        let mut y = String::new();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            let team = self.teams[i]
                .map(|t| format!(", team: t{t}"))
                .unwrap_or_default();
            y.push_str(&format!(
                "kind: Namespace\nmetadata: {{name: {ns}, labels: {{k: v{team}}}}}\n---\n"
            ));
        }
        for (i, p) in self.pods.iter().enumerate() {
            let Some((ns, app, named, _)) = p else {
                continue;
            };
            let ports = if *named {
                "[{name: http, containerPort: 8080}, {name: http, containerPort: 53, protocol: UDP}]"
            } else {
                "[]"
            };
            y.push_str(&format!(
                "kind: Pod\nmetadata: {{name: p{i}, namespace: {}, labels: {{app: {}}}}}\n\
                 spec: {{nodeName: n, containers: [{{name: c, ports: {ports}}}]}}\n\
                 status: {{podIP: 10.0.0.{}}}\n---\n",
                NAMESPACES[*ns],
                APPS[*app],
                i + 1
            ));
        }
        for (i, p) in self.policies.iter().enumerate() {
            let Some((t, ns, a, b, team)) = p else {
                continue;
            };
            let body = POLICIES[*t]
                .replace(": A}", &format!(": {}}}", APPS[*a]))
                .replace(": B}", &format!(": {}}}", APPS[*b]))
                .replace(": T}", &format!(": t{team}}}"));
            y.push_str(&format!(
                "kind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: {}}}\n{body}\n---\n",
                NAMESPACES[*ns]
            ));
        }
        y
    }

    fn local(&self) -> BTreeSet<Ipv4Addr> {
        self.pods
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some_and(|p| p.3))
            .map(|(i, _)| Ipv4Addr::new(10, 0, 0, i as u8 + 1))
            .collect()
    }

    fn mutate(&mut self, rng: &mut Rng) {
        match rng.below(6) {
            0 => {
                let i = rng.below(self.pods.len());
                self.pods[i] = match self.pods[i] {
                    Some(_) if rng.below(2) == 0 => None,
                    _ => Some((
                        rng.below(3),
                        rng.below(3),
                        rng.below(2) == 0,
                        rng.below(3) > 0,
                    )),
                };
            }
            1 => {
                let i = rng.below(self.pods.len());
                if let Some(p) = &mut self.pods[i] {
                    p.1 = rng.below(3);
                }
            }
            2 => {
                let i = rng.below(3);
                self.teams[i] = (rng.below(3) > 0).then(|| rng.below(2));
            }
            3 | 4 => {
                let i = rng.below(self.policies.len());
                self.policies[i] = (rng.below(4) > 0).then(|| {
                    (
                        rng.below(POLICIES.len()),
                        rng.below(3),
                        rng.below(3),
                        rng.below(3),
                        rng.below(2),
                    )
                });
            }
            _ => {
                let i = rng.below(self.pods.len());
                if let Some(p) = &mut self.pods[i] {
                    p.2 = !p.2;
                }
            }
        }
    }
}

fn check(engine: &mut Engine, world: &World, step: usize) -> Work {
    let (objects, problems) = parse_str(&world.yaml(), "world");
    assert!(problems.is_empty(), "{problems:?}");
    let local = world.local();
    let podnets: Vec<Ipv4Net> = vec!["10.0.0.0/24".parse().unwrap()];
    let before = engine.desired().clone();
    let (touched, work, _) = engine.update(
        &objects.network_policies,
        &objects.namespaces,
        &objects.pods,
        &local,
        &podnets,
    );
    // Everything that changed is named in `touched`, so comparing only there is enough.
    let after = engine.desired();
    for ip in before.endpoints.keys().chain(after.endpoints.keys()) {
        let differs = before.endpoints.get(ip) != after.endpoints.get(ip)
            || before.rules.get(ip) != after.rules.get(ip);
        assert!(
            !differs || touched.endpoints.contains(ip),
            "step {step}: {ip} untouched"
        );
    }
    for net in before.ipcache.symmetric_difference(&after.ipcache) {
        assert!(
            touched.ipcache.contains(net),
            "step {step}: {net} untouched"
        );
    }
    for i in 0..before.policies.len().max(after.policies.len()) {
        let name = |d: &Desired| d.policies.get(i).filter(|n| !n.is_empty()).cloned();
        let differs = name(&before) != name(after);
        assert!(
            !differs || touched.names.contains(&(i as u32)),
            "step {step}: name {i}"
        );
    }
    let (compiled, _) = compile(
        &objects.network_policies,
        &objects.namespaces,
        &objects.pods,
    );
    let reference = crate::policy::rules::desired(&compiled, &local, &podnets);
    let (got, want) = (normal(engine.desired()), normal(&reference));
    let missing: Vec<_> = want.3.difference(&got.3).collect();
    let extra: Vec<_> = got.3.difference(&want.3).collect();
    assert!(
        got == want,
        "step {step}: endpoints {:?} vs {:?}\nipcache {:?} vs {:?}\nmissing rules {missing:?}\nextra rules {extra:?}\n{}",
        got.0,
        want.0,
        got.2,
        want.2,
        world.yaml()
    );
    assert_eq!(
        engine.endpoints().keys().collect::<Vec<_>>(),
        compiled.endpoints.keys().collect::<Vec<_>>(),
        "step {step}"
    );
    work
}

#[test]
fn incremental_updates_agree_with_a_full_computation() {
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut world = World {
            pods: (0..14)
                .map(|_| {
                    Some((
                        rng.below(3),
                        rng.below(3),
                        rng.below(2) == 0,
                        rng.below(3) > 0,
                    ))
                })
                .collect(),
            teams: vec![Some(0), Some(1), None],
            policies: vec![None; 8],
        };
        let mut engine = Engine::new();
        check(&mut engine, &world, 0);
        for step in 1..=150 {
            world.mutate(&mut rng);
            check(&mut engine, &world, step);
        }
    }
}

#[test]
fn a_change_recomputes_only_what_it_affects() {
    // 200 policies, each isolating its own pod and allowing one peer by label.
    let mut y = String::from("kind: Namespace\nmetadata: {name: x}\n---\n");
    for i in 0..200 {
        y.push_str(&format!(
            "kind: Pod\nmetadata: {{name: p{i}, namespace: x, labels: {{app: a{i}}}}}\n\
             spec: {{nodeName: n}}\nstatus: {{podIP: 10.1.{}.{}}}\n---\n\
             kind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: x}}\n\
             spec: {{podSelector: {{matchLabels: {{app: a{i}}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{peer: a{i}}}}}}}]}}]}}\n---\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let (objects, _) = parse_str(&y, "big");
    let local: BTreeSet<Ipv4Addr> = objects
        .pods
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .collect();
    let mut engine = Engine::new();
    let update = |engine: &mut Engine, objects: &crate::model::Objects| {
        engine.update(
            &objects.network_policies,
            &objects.namespaces,
            &objects.pods,
            &local,
            &[],
        )
    };
    let (_, first, _) = update(&mut engine, &objects);
    assert_eq!(
        first,
        Work {
            policies: 200,
            endpoints: 200
        }
    );
    // Nothing changed: nothing is recomputed and nothing is touched.
    let (touched, work, _) = update(&mut engine, &objects);
    assert_eq!(work, Work::default());
    assert_eq!(touched, Touched::default());
    // Pod 7 gets the label policy 3 allows: policy 3 (its peer) and policy 7 (its target)
    // are compiled again; pods 3 and 7 get new rules.
    let mut changed = objects.clone();
    changed.pods[7]
        .metadata
        .labels
        .get_or_insert_default()
        .insert("peer".into(), "a3".into());
    let (touched, work, _) = update(&mut engine, &changed);
    assert_eq!(
        work,
        Work {
            policies: 2,
            endpoints: 2
        },
        "{touched:?}"
    );
    assert_eq!(touched.endpoints.len(), 2);
    // One policy removed: only it and its pod.
    changed.network_policies.remove(100);
    let (_, work, _) = update(&mut engine, &changed);
    assert_eq!(
        work,
        Work {
            policies: 0,
            endpoints: 1
        }
    );
}
