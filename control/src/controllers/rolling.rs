//! The rolling-update planner, pure: given a Deployment's replicas, its surge and
//! unavailability bounds and what its ReplicaSets hold, how far to scale the new ReplicaSet up
//! and the old ones down. It is kube-controller-manager's algorithm with one change: a
//! ReplicaSet counts as `max(spec, status)` pods, so pods an old ReplicaSet has not removed
//! yet count against the surge and the bound holds for the pods that exist, not only for the
//! ones asked for.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// One ReplicaSet as the planner sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rs {
    /// `spec.replicas`.
    pub spec: i32,
    /// `status.replicas`: pods that exist and are not being deleted.
    pub existing: i32,
    /// `status.availableReplicas`.
    pub available: i32,
}

impl Rs {
    fn pods(&self) -> i32 {
        self.spec.max(self.existing)
    }
}

/// An absolute number or a percentage of `total` (rounded up or down).
pub fn resolve(
    value: Option<&IntOrString>,
    default: &str,
    total: i32,
    round_up: bool,
) -> Result<i32, String> {
    let text;
    let v = match value {
        Some(IntOrString::Int(n)) => return Ok((*n).max(0)),
        Some(IntOrString::String(s)) => s.as_str(),
        None => {
            text = default.to_owned();
            text.as_str()
        }
    };
    let pct: i64 = v
        .strip_suffix('%')
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("invalid value {v:?}: must be an integer or a percentage"))?;
    let scaled = i64::from(total) * pct;
    let n = if round_up {
        (scaled + 99) / 100
    } else {
        scaled / 100
    };
    Ok(i32::try_from(n.max(0)).unwrap_or(i32::MAX))
}

/// `(maxSurge, maxUnavailable)` for `replicas`; both zero would stall, so unavailability is
/// then one, as in Kubernetes.
pub fn bounds(
    surge: Option<&IntOrString>,
    unavailable: Option<&IntOrString>,
    replicas: i32,
) -> Result<(i32, i32), String> {
    let s = resolve(surge, "25%", replicas, true)?;
    let u = resolve(unavailable, "25%", replicas, false)?.min(replicas);
    Ok(if s == 0 && u == 0 { (0, 1) } else { (s, u) })
}

/// The new ReplicaSet's replicas: up to `replicas`, without the pods of all ReplicaSets
/// exceeding `replicas + surge`.
pub fn new_replicas(replicas: i32, surge: i32, new: Rs, old: &[Rs]) -> i32 {
    if new.spec >= replicas {
        return replicas;
    }
    let current: i32 = new.pods() + old.iter().map(Rs::pods).sum::<i32>();
    let room = (replicas + surge - current).max(0);
    new.spec + room.min(replicas - new.spec)
}

/// The old ReplicaSets' replicas (same order): first their unavailable pods go, then
/// available ones while more than `replicas - unavailable` pods stay available; oldest
/// first (the caller orders `old` by age).
pub fn old_replicas(replicas: i32, unavailable: i32, new: Rs, old: &[Rs]) -> Vec<i32> {
    let mut out: Vec<i32> = old.iter().map(|r| r.spec).collect();
    let old_pods: i32 = out.iter().sum();
    if old_pods == 0 {
        return out;
    }
    let min_available = replicas - unavailable;
    let all_pods = new.spec + old_pods;
    let new_unavailable = (new.spec - new.available).max(0);
    let mut budget = all_pods - min_available - new_unavailable;
    if budget <= 0 {
        return out;
    }
    // Unhealthy pods of old ReplicaSets cost no availability.
    for (i, r) in old.iter().enumerate() {
        if budget == 0 {
            break;
        }
        let unhealthy = (out[i] - r.available).max(0);
        let down = unhealthy.min(budget);
        out[i] -= down;
        budget -= down;
    }
    let available: i32 = new.available + old.iter().map(|r| r.available).sum::<i32>();
    let mut allowed = (available - min_available).max(0);
    for slot in out.iter_mut() {
        if allowed == 0 {
            break;
        }
        let down = (*slot).min(allowed);
        *slot -= down;
        allowed -= down;
    }
    out
}

/// One ReplicaSet with pods when a Deployment is scaled in the middle of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scaled {
    /// `spec.replicas`.
    pub spec: i32,
    /// Its `deployment.kubernetes.io/max-replicas` annotation: the Deployment's replicas plus
    /// surge when it was last scaled.
    pub max_replicas: Option<i32>,
    /// Creation order (larger is newer), for ties.
    pub age: usize,
}

/// Proportional scaling, as kube-controller-manager does it: a change of a Deployment's
/// replicas while several ReplicaSets have pods is shared among them in proportion to their
/// sizes (each scaled by `replicas + surge` over the `max_replicas` it was last scaled for,
/// `fallback` when it has none), the rounding left over going to the largest; a rollout in
/// flight keeps its ratio instead of the whole change landing on one side. Returns each set's
/// new size, in the order given.
pub fn proportional(replicas: i32, surge: i32, fallback: i32, sets: &[Scaled]) -> Vec<i32> {
    let mut out: Vec<i32> = sets.iter().map(|r| r.spec).collect();
    let allowed = if replicas > 0 { replicas + surge } else { 0 };
    let to_add = allowed - out.iter().sum::<i32>();
    if to_add == 0 || sets.is_empty() {
        return out;
    }
    // Larger first; among equals the newer first when growing, the older when shrinking.
    let mut order: Vec<usize> = (0..sets.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (sets[a], sets[b]);
        y.spec.cmp(&x.spec).then(if to_add > 0 {
            y.age.cmp(&x.age)
        } else {
            x.age.cmp(&y.age)
        })
    });
    let mut added = 0;
    for &i in &order {
        let r = sets[i];
        if r.spec == 0 || added == to_add {
            continue;
        }
        let fraction = if replicas == 0 {
            -r.spec
        } else {
            let annotated = r.max_replicas.unwrap_or(fallback).max(1);
            let size = f64::from(r.spec) * f64::from(allowed) / f64::from(annotated);
            size.round() as i32 - r.spec
        };
        let left = to_add - added;
        let share = if to_add > 0 {
            fraction.min(left)
        } else {
            fraction.max(left)
        };
        out[i] += share;
        added += share;
    }
    let first = order[0];
    out[first] = (out[first] + to_add - added).max(0);
    for o in &mut out {
        *o = (*o).max(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn percentages_round_like_kubernetes() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(bounds(None, None, 4).unwrap(), (1, 1));
        assert_eq!(bounds(None, None, 3).unwrap(), (1, 0));
        assert_eq!(
            bounds(Some(&pct("0%")), Some(&pct("0%")), 3).unwrap(),
            (0, 1)
        );
        assert_eq!(
            bounds(Some(&IntOrString::Int(2)), Some(&pct("50%")), 5).unwrap(),
            (2, 2)
        );
        assert!(bounds(Some(&pct("x")), None, 3).is_err());
    }

    #[test]
    fn a_rollout_of_three_with_surge_one_and_unavailable_one() {
        let new = Rs::default();
        let old = [Rs {
            spec: 3,
            existing: 3,
            available: 3,
        }];
        assert_eq!(new_replicas(3, 1, new, &old), 1);
        let new = Rs {
            spec: 1,
            existing: 1,
            available: 0,
        };
        assert_eq!(old_replicas(3, 1, new, &old), vec![2]);
    }

    /// A cluster of ReplicaSets whose pods become ready at random, driven by the planner and
    /// by ReplicaSet controllers that act on what they are asked (deleting unready pods
    /// first), checked after every step.
    fn simulate(replicas: i32, surge: i32, unavailable: i32, old_count: i32, coins: &[bool]) {
        // (ready, not ready) pods per ReplicaSet; index 0 is the new one.
        let mut pods = vec![(0, 0), (old_count, 0)];
        let mut spec = vec![0, old_count];
        let min_available = replicas - unavailable;
        let max_pods = replicas + surge;
        let mut coins = coins.iter().cycle();
        for step in 0..400 {
            let rs = |i: usize, pods: &[(i32, i32)], spec: &[i32]| Rs {
                spec: spec[i],
                existing: pods[i].0 + pods[i].1,
                available: pods[i].0,
            };
            let old = [rs(1, &pods, &spec)];
            spec[0] = new_replicas(replicas, surge, rs(0, &pods, &spec), &old);
            let old = [rs(1, &pods, &spec)];
            spec[1] = old_replicas(replicas, unavailable, rs(0, &pods, &spec), &old)[0];
            // The ReplicaSet controllers: delete surplus (unready first), create missing.
            for i in 0..2 {
                let (ready, unready) = &mut pods[i];
                let mut surplus = *ready + *unready - spec[i];
                let drop_unready = surplus.max(0).min(*unready);
                *unready -= drop_unready;
                surplus -= drop_unready;
                if surplus > 0 {
                    *ready -= surplus;
                }
            }
            let total: i32 = pods.iter().map(|(r, u)| r + u).sum();
            let ready: i32 = pods.iter().map(|(r, _)| r).sum();
            assert!(
                ready >= min_available.min(old_count),
                "ready {ready} < {min_available}: {pods:?} {spec:?}"
            );
            let missing = (spec[0] - pods[0].0 - pods[0].1).max(0);
            // Creating happens after deleting, and is checked against the surge bound.
            pods[0].1 += missing;
            let total_after = total + missing;
            assert!(
                total_after <= max_pods.max(old_count),
                "{total_after} pods > {max_pods}: {pods:?} {spec:?}"
            );
            // Readiness arrives at random (but at least every fourth step).
            if pods[0].1 > 0 && (*coins.next().unwrap_or(&true) || step % 4 == 3) {
                pods[0].1 -= 1;
                pods[0].0 += 1;
            }
            if pods[0].0 == replicas && spec[1] == 0 && pods[1] == (0, 0) {
                return;
            }
        }
        panic!("the rollout did not finish: {pods:?} {spec:?}");
    }

    proptest! {
        #[test]
        fn rolling_updates_respect_both_bounds(
            replicas in 1i32..12,
            surge in 0i32..4,
            unavailable in 0i32..4,
            coins in proptest::collection::vec(any::<bool>(), 1..40),
        ) {
            let (surge, unavailable) = if surge == 0 && unavailable == 0 { (0, 1) } else { (surge, unavailable.min(replicas)) };
            simulate(replicas, surge, unavailable, replicas, &coins);
        }
    }

    #[test]
    fn scaling_mid_rollout_is_shared_in_proportion() {
        let rs = |spec, max, age| Scaled {
            spec,
            max_replicas: Some(max),
            age,
        };
        // 10 replicas, surge 3, mid-rollout: new 8, old 5 (13 = 10 + 3). Scaled to 20 (surge
        // 5, 25 allowed): both grow by the same factor.
        assert_eq!(
            proportional(20, 5, 0, &[rs(8, 13, 1), rs(5, 13, 0)]),
            vec![15, 10]
        );
        // Scaled down to 5 (surge 2, 7 allowed).
        assert_eq!(
            proportional(5, 2, 0, &[rs(8, 13, 1), rs(5, 13, 0)]),
            vec![4, 3]
        );
        // Rounding leftovers go to the largest; nothing when the total already fits.
        assert_eq!(
            proportional(4, 1, 0, &[rs(2, 4, 1), rs(2, 4, 0)]),
            vec![3, 2]
        );
        assert_eq!(
            proportional(10, 3, 0, &[rs(8, 13, 1), rs(5, 13, 0)]),
            vec![8, 5]
        );
        // To zero: everything goes.
        assert_eq!(
            proportional(0, 0, 0, &[rs(3, 5, 1), rs(2, 5, 0)]),
            vec![0, 0]
        );
        // Without the annotation the Deployment's current size stands in.
        let bare = |spec, age| Scaled {
            spec,
            max_replicas: None,
            age,
        };
        assert_eq!(proportional(8, 2, 5, &[bare(3, 1), bare(2, 0)]), vec![6, 4]);
    }
}
