//! The disruption controller and the budget evictions are held to, as kube-controller-manager
//! and kube-apiserver keep PodDisruptionBudgets (`policy/v1`).
//!
//! The controller fills in each budget's status from the pods it selects: `expectedPods`
//! (the pods, for an integer `minAvailable`; the scale of their controllers — a Deployment
//! through its ReplicaSets, a StatefulSet, a ReplicaSet — for a percentage or for
//! `maxUnavailable`), `desiredHealthy`, `currentHealthy` (ready pods not being deleted and not
//! just evicted), `disruptionsAllowed` and the `DisruptionAllowed` condition.
//!
//! The API server's `pods/eviction` asks [`take`] under the store's lock: an eviction is
//! refused with `429` while the budget allows no disruption (kubectl drain retries it every
//! 5 s), and otherwise spends one, recording the pod in `disruptedPods` so that the controller
//! does not count it healthy again before its deletion shows. A pod that is not ready may go
//! while the budget is met (`unhealthyPodEvictionPolicy: IfHealthyBudget`, the default), or
//! always (`AlwaysAllow`), and spends nothing.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet, StatefulSet},
        core::v1::Pod,
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector as ApiLabelSelector, Time},
        util::intstr::IntOrString,
    },
};
use kube::{
    Api, ResourceExt,
    api::ListParams,
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use serde_json::{Value, json};

use super::{
    Ctx, Error, age_secs, controller_of, drive, patch_status_if_changed,
    replicaset::{is_active, is_ready},
    retry,
    rolling::resolve,
};
use crate::{selector::LabelSelector, status::ApiError};

const COMPONENT: &str = "disruption-controller";
/// How long an evicted pod stays out of the healthy count while its deletion has not shown.
const DELETION_TIMEOUT_SECS: i64 = 120;

/// Runs the controller until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<PodDisruptionBudget>::all(client.clone()),
        watcher::Config::default(),
    );
    let budgets = controller.store();
    let c = controller
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default(),
            move |pod: Pod| {
                budgets
                    .state()
                    .iter()
                    .filter(|b| b.namespace() == pod.namespace() && selects(b, &pod))
                    .map(|b| ObjectRef::from_obj(&**b))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, retry, ctx);
    drive(COMPONENT, c).await;
}

fn selector_of(budget: &PodDisruptionBudget) -> LabelSelector {
    let selector = budget.spec.as_ref().and_then(|s| s.selector.as_ref());
    LabelSelector::from_api(selector).unwrap_or_else(|_| {
        LabelSelector::from_api(None).expect("the select-nothing selector is valid")
    })
}

fn selects(budget: &PodDisruptionBudget, pod: &Pod) -> bool {
    selector_of(budget).matches_labels(pod.metadata.labels.as_ref())
}

/// An `IntOrString` of a budget against `of`: an integer, or a percentage rounded up.
fn scaled(v: &IntOrString, of: i32) -> i32 {
    resolve(Some(v), "0%", of, true).unwrap_or(0)
}

/// `(expectedPods, desiredHealthy)` of a budget, given the selected pods and the scale of
/// their controllers.
fn desired(budget: &PodDisruptionBudget, pods: i32, scale: i32) -> (i32, i32) {
    let spec = budget.spec.clone().unwrap_or_default();
    match (&spec.min_available, &spec.max_unavailable) {
        (Some(IntOrString::Int(n)), _) => (pods, *n),
        (Some(pct), _) => (scale, scaled(pct, scale)),
        (None, Some(max)) => (scale, (scale - scaled(max, scale)).max(0)),
        // Neither: nothing is held back.
        (None, None) => (pods, 0),
    }
}

/// The scale of the controllers of `pods` (a Deployment counted once through its
/// ReplicaSets); a pod without a scalable controller counts as one.
async fn scale_of(ctx: &Ctx, ns: &str, pods: &[&Pod]) -> Result<i32, Error> {
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), ns);
    let mut owners: BTreeMap<(String, String), i32> = BTreeMap::new();
    for pod in pods {
        let Some(owner) = controller_of(&pod.metadata) else {
            owners.insert(("Pod".into(), pod.name_any()), 1);
            continue;
        };
        let key = (owner.kind.clone(), owner.name.clone());
        if owners.contains_key(&key) {
            continue;
        }
        let replicas = match owner.kind.as_str() {
            "ReplicaSet" => {
                let rs = rs_api.get_opt(&owner.name).await?;
                match rs.as_ref().and_then(|rs| controller_of(&rs.metadata)) {
                    Some(d) if d.kind == "Deployment" => {
                        let dk = ("Deployment".to_owned(), d.name.clone());
                        if let std::collections::btree_map::Entry::Vacant(slot) = owners.entry(dk) {
                            let n = Api::<Deployment>::namespaced(ctx.client.clone(), ns)
                                .get_opt(&d.name)
                                .await?
                                .and_then(|d| d.spec.and_then(|s| s.replicas))
                                .unwrap_or(1);
                            slot.insert(n);
                        }
                        // The ReplicaSet is the Deployment's: looked up once, counted there.
                        0
                    }
                    _ => rs
                        .and_then(|rs| rs.spec.and_then(|s| s.replicas))
                        .unwrap_or(1),
                }
            }
            "StatefulSet" => Api::<StatefulSet>::namespaced(ctx.client.clone(), ns)
                .get_opt(&owner.name)
                .await?
                .and_then(|s| s.spec.and_then(|s| s.replicas))
                .unwrap_or(1),
            _ => {
                owners.insert(("Pod".into(), pod.name_any()), 1);
                continue;
            }
        };
        owners.insert(key, replicas);
    }
    Ok(owners.values().sum())
}

async fn reconcile(budget: Arc<PodDisruptionBudget>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if budget.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = budget.namespace().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let selector = selector_of(&budget);
    // The selected pods that count: not ended, not being deleted.
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| selector.matches_labels(p.metadata.labels.as_ref()) && is_active(p))
        .collect();
    let status = serde_json::to_value(&budget.status).unwrap_or_default();
    // Evictions the server granted whose deletion has not shown yet, for a while.
    let mut disrupted = serde_json::Map::new();
    let mut recheck = None;
    for (name, at) in status["disruptedPods"].as_object().into_iter().flatten() {
        if !live.iter().any(|p| p.name_any() == *name) {
            continue;
        }
        let age = at
            .as_str()
            .and_then(|t| t.parse().ok())
            .map_or(i64::MAX, |t| age_secs(Some(&Time(t))));
        if age < DELETION_TIMEOUT_SECS {
            disrupted.insert(name.clone(), at.clone());
            recheck = Some(DELETION_TIMEOUT_SECS - age);
        }
    }
    let healthy = live
        .iter()
        .filter(|p| !disrupted.contains_key(&p.name_any()) && is_ready(p))
        .count() as i32;
    let scale = scale_of(&ctx, &ns, &live).await?;
    let (expected, desired) = desired(&budget, live.len() as i32, scale);
    let allowed = (healthy - desired).max(0);
    let generation = budget.metadata.generation.unwrap_or(1);
    let (cond, reason) = if allowed > 0 {
        ("True", "SufficientPods")
    } else {
        ("False", "InsufficientPods")
    };
    let mut conditions: Vec<Value> = status["conditions"].as_array().cloned().unwrap_or_default();
    let now = json!(k8s_openapi::jiff::Timestamp::now().to_string());
    let fresh = json!({"type": "DisruptionAllowed", "status": cond, "reason": reason, "message": "",
                       "lastTransitionTime": now, "observedGeneration": generation});
    match conditions
        .iter_mut()
        .find(|c| c["type"] == "DisruptionAllowed")
    {
        Some(c) if c["status"] == cond && c["reason"] == reason => {}
        Some(c) => *c = fresh,
        None => conditions.push(fresh),
    }
    patch_status_if_changed(
        &ctx.client,
        &*budget,
        json!({
            "observedGeneration": generation,
            "expectedPods": expected,
            "desiredHealthy": desired,
            "currentHealthy": healthy,
            "disruptionsAllowed": allowed,
            "disruptedPods": disrupted,
            "conditions": conditions,
        }),
    )
    .await?;
    Ok(match recheck {
        Some(secs) => Action::requeue(Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(1))),
        None => Action::await_change(),
    })
}

/// Whether a budget (as stored) selects a pod (as stored).
pub fn budget_selects(budget: &Value, pod: &Value) -> bool {
    let selector = budget
        .pointer("/spec/selector")
        .filter(|s| !s.is_null())
        .and_then(|s| serde_json::from_value::<ApiLabelSelector>(s.clone()).ok());
    LabelSelector::from_api(selector.as_ref()).is_ok_and(|s| s.matches(pod))
}

/// An eviction of `pod` against `budget` (as stored), as kube-apiserver decides it: spends
/// one of the disruptions the budget allows and records the pod in `disruptedPods` (`now`, an
/// RFC 3339 time), lets a not-ready pod go for free while the budget is met, or refuses.
pub fn take(budget: &mut Value, pod: &Value, now: &str) -> Result<(), ApiError> {
    let name = budget["metadata"]["name"].as_str().unwrap_or("").to_owned();
    let generation = budget["metadata"]["generation"].as_i64().unwrap_or(1);
    let status = &budget["status"];
    if status["observedGeneration"].as_i64().unwrap_or(0) < generation {
        return Err(ApiError::DisruptionBudget(format!(
            "The disruption budget {name} is still being processed by the server."
        )));
    }
    let healthy = status["currentHealthy"].as_i64().unwrap_or(0);
    let desired = status["desiredHealthy"].as_i64().unwrap_or(0);
    let always = budget.pointer("/spec/unhealthyPodEvictionPolicy") == Some(&json!("AlwaysAllow"));
    let status = &mut budget["status"];
    let ready = serde_json::from_value::<Pod>(pod.clone()).is_ok_and(|p| is_ready(&p));
    if !ready && (always || healthy >= desired) {
        return Ok(());
    }
    let allowed = status["disruptionsAllowed"].as_i64().unwrap_or(0);
    if allowed <= 0 {
        return Err(ApiError::DisruptionBudget(format!(
            "The disruption budget {name} needs {desired} healthy pods and has {healthy} currently"
        )));
    }
    status["disruptionsAllowed"] = json!(allowed - 1);
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
    if !status["disruptedPods"].is_object() {
        status["disruptedPods"] = json!({});
    }
    status["disruptedPods"][pod_name] = json!(now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(spec: Value) -> PodDisruptionBudget {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "d"}, "spec": spec}))
            .unwrap()
    }

    #[test]
    fn budgets_scale_integers_and_percentages_as_kube_does() {
        let b = budget(json!({"minAvailable": 2}));
        assert_eq!(
            desired(&b, 3, 5),
            (3, 2),
            "an integer minAvailable counts pods"
        );
        let b = budget(json!({"minAvailable": "50%"}));
        assert_eq!(desired(&b, 3, 5), (5, 3), "50 % of 5, rounded up");
        let b = budget(json!({"maxUnavailable": 1}));
        assert_eq!(desired(&b, 3, 3), (3, 2));
        let b = budget(json!({"maxUnavailable": "30%"}));
        assert_eq!(desired(&b, 10, 10), (10, 7), "30 % of 10 is 3 unavailable");
        let b = budget(json!({"maxUnavailable": 5}));
        assert_eq!(desired(&b, 3, 3), (3, 0));
    }

    #[test]
    fn evictions_spend_the_budget_and_are_refused_past_it() {
        let mut b = json!({"metadata": {"name": "web", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app": "web"}}},
            "status": {"observedGeneration": 1, "currentHealthy": 3, "desiredHealthy": 2, "disruptionsAllowed": 1}});
        let pod = |name: &str, ready: bool| {
            json!({"metadata": {"name": name, "labels": {"app": "web"}},
                "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
        };
        assert!(budget_selects(&b, &pod("a", true)));
        assert!(!budget_selects(
            &b,
            &json!({"metadata": {"name": "x", "labels": {"app": "db"}}})
        ));
        take(&mut b, &pod("a", true), "2026-12-04T00:00:00Z").unwrap();
        assert_eq!(b["status"]["disruptionsAllowed"], 0);
        assert_eq!(b["status"]["disruptedPods"]["a"], "2026-12-04T00:00:00Z");
        let refused = take(&mut b, &pod("b", true), "t").unwrap_err();
        assert_eq!(refused.code(), 429);
        assert_eq!(
            refused.status()["details"]["causes"][0]["message"],
            "The disruption budget web needs 2 healthy pods and has 3 currently"
        );
        // A pod that is not ready goes while the budget is met, spending nothing.
        take(&mut b, &pod("c", false), "t").unwrap();
        assert_eq!(b["status"]["disruptionsAllowed"], 0);
        // Below its budget, a not-ready pod is held too, unless the policy always allows it.
        b["status"]["currentHealthy"] = json!(1);
        assert_eq!(take(&mut b, &pod("c", false), "t").unwrap_err().code(), 429);
        b["spec"]["unhealthyPodEvictionPolicy"] = json!("AlwaysAllow");
        take(&mut b, &pod("c", false), "t").unwrap();
        assert_eq!(take(&mut b, &pod("a", true), "t").unwrap_err().code(), 429);
        // A budget the controller has not seen since its change refuses.
        b["metadata"]["generation"] = json!(2);
        let refused = take(&mut b, &pod("a", true), "t").unwrap_err();
        assert!(
            refused.status()["details"]["causes"][0]["message"]
                .as_str()
                .unwrap()
                .contains("still being processed")
        );
        // A budget without a selector selects nothing.
        assert!(!budget_selects(&json!({"spec": {}}), &pod("a", true)));
    }
}
