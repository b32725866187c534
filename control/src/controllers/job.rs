//! The Job controller (`batch/v1`, NonIndexed completion): runs pods of the template until
//! `completions` of them succeed, at most `parallelism` at a time, and gives up after
//! `backoffLimit` failed pods or `activeDeadlineSeconds`; then it removes the pods still
//! running and sets the `Complete` or `Failed` condition (with `SuccessCriteriaMet` /
//! `FailureTarget` first, as Kubernetes 1.32 does), `completionTime`, and the
//! `active`/`ready`/`succeeded`/`failed` counts `kubectl get jobs` and `kubectl wait` read.
//! `suspend: true` deletes the active pods and creates none. Pods are labelled with the Job's
//! `batch.kubernetes.io/controller-uid` and `job-name` and owned by it.
//!
//! `completionMode: Indexed` gives each pod an index in `0..completions` (the
//! `batch.kubernetes.io/job-completion-index` annotation and label, `JOB_COMPLETION_INDEX` in
//! its containers' environment, hostname `<job>-<index>`): the Job is complete when every index
//! has a succeeded pod, lowest missing indexes are started first, and `status.completedIndexes`
//! lists the done ones as kube does (`0-2,4`). `ttlSecondsAfterFinished` deletes a finished Job
//! (and, through the garbage collector, its pods) that long after it finished.
//!
//! `podFailurePolicy` is judged on each failed pod, first matching rule first, as
//! kube-controller-manager does: `onExitCodes` (a container, or any, that terminated with a
//! non-zero code `In`/`NotIn` the values) or `onPodConditions` (a condition of the pod with that
//! type and status). `FailJob` fails the Job at once (reason `PodFailurePolicy`, the message
//! naming the container, its exit code and the rule's index), `Ignore` leaves the pod out of the
//! `failed` count and the backoff limit (a replacement is started), `Count` is the default.
//! `FailIndex` belongs to `backoffLimitPerIndex`, which weft does not implement: it counts.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{Controller, controller::Action, watcher},
};
use serde_json::{Value, json};

use super::{Ctx, Error, age_secs, controller_of, create_pod, drive, not_found, owner_ref, retry};
use crate::controllers::replicaset::is_ready;
use weft_events::Kind;

const COMPONENT: &str = "job-controller";
/// The label every pod of a Job carries with the Job's uid.
pub const UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
/// The label every pod of a Job carries with the Job's name.
pub const NAME_LABEL: &str = "batch.kubernetes.io/job-name";
/// The annotation (and label) carrying an Indexed Job pod's index.
pub const INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// Runs the controller until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    let c = Controller::new(Api::<Job>::all(client.clone()), watcher::Config::default())
        .owns(Api::<Pod>::all(client), watcher::Config::default())
        .run(reconcile, retry, ctx);
    drive(COMPONENT, c).await;
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn indexed(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.completion_mode.as_deref()) == Some("Indexed")
}

/// An Indexed Job pod's index.
fn index_of(p: &Pod) -> Option<i32> {
    p.annotations().get(INDEX)?.parse().ok()
}

/// Indexes as kube writes `completedIndexes`: sorted, runs of consecutive ones as `a-b`.
fn compress(indexes: &std::collections::BTreeSet<i32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(i32, i32)> = None;
    for &i in indexes {
        run = match run {
            Some((a, b)) if i == b + 1 => Some((a, i)),
            Some((a, b)) => {
                out.push(if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                });
                Some((i, i))
            }
            None => Some((i, i)),
        };
    }
    if let Some((a, b)) = run {
        out.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    out.join(",")
}

/// The pod of an Indexed Job for `index`.
fn indexed_pod(job: &Job, index: i32) -> Result<Pod, Error> {
    let mut pod = new_pod(job)?;
    let i = index.to_string();
    pod.metadata.generate_name = Some(format!("{}-{i}-", job.name_any()));
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INDEX.into(), i.clone());
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(INDEX.into(), i.clone());
    if let Some(spec) = pod.spec.as_mut() {
        spec.hostname = Some(format!("{}-{i}", job.name_any()));
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            c.env.get_or_insert_with(Vec::new).push(EnvVar {
                name: "JOB_COMPLETION_INDEX".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        api_version: None,
                        field_path: format!("metadata.annotations['{INDEX}']"),
                    }),
                    ..EnvVarSource::default()
                }),
            });
        }
    }
    Ok(pod)
}

/// A pod of the template for `job`.
fn new_pod(job: &Job) -> Result<Pod, Error> {
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .ok_or_else(|| Error::Invalid(format!("job {} has no spec", job.name_any())))?;
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", job.name_any()));
    meta.namespace = job.namespace();
    meta.owner_references = Some(vec![owner_ref(job)]);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(UID_LABEL.into(), job.uid().unwrap_or_default());
    labels.insert(NAME_LABEL.into(), job.name_any());
    labels.insert("controller-uid".into(), job.uid().unwrap_or_default());
    labels.insert("job-name".into(), job.name_any());
    Ok(Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    })
}

/// What a Job's `podFailurePolicy` does with a failed pod.
#[derive(Debug, PartialEq, Eq)]
enum OnFailure {
    /// Counts towards `backoffLimit` (no rule matched, or `Count`, or `FailIndex`).
    Count,
    /// Neither counted nor retried against the limit: a replacement is made.
    Ignore,
    /// Fails the Job with this message.
    FailJob(String),
}

/// The first rule of `job`'s pod failure policy that the failed pod `pod` matches.
fn on_failure(job: &Job, pod: &Pod) -> OnFailure {
    let Some(policy) = job
        .spec
        .as_ref()
        .and_then(|s| s.pod_failure_policy.as_ref())
    else {
        return OnFailure::Count;
    };
    let (ns, name) = (
        pod.namespace().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    );
    let status = pod.status.clone().unwrap_or_default();
    for (i, rule) in policy.rules.iter().enumerate() {
        let matched = if let Some(codes) = &rule.on_exit_codes {
            status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .filter(|c| codes.container_name.as_ref().is_none_or(|n| *n == c.name))
                .find_map(|c| {
                    let code = c.state.as_ref()?.terminated.as_ref()?.exit_code;
                    let listed = codes.values.contains(&code);
                    let hit = code != 0
                        && match codes.operator.as_str() {
                            "In" => listed,
                            "NotIn" => !listed,
                            _ => false,
                        };
                    hit.then(|| {
                        format!(
                            "Container {} for pod {ns}/{name} failed with exit code {code} matching {} rule at index {i}",
                            c.name, rule.action
                        )
                    })
                })
        } else if let Some(patterns) = &rule.on_pod_conditions {
            patterns.iter().find_map(|want| {
                status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == want.type_ && c.status == want.status)
                    .then(|| {
                        format!(
                            "Pod {ns}/{name} has condition {} matching {} rule at index {i}",
                            want.type_, rule.action
                        )
                    })
            })
        } else {
            None
        };
        let Some(message) = matched else { continue };
        match rule.action.as_str() {
            "FailJob" => return OnFailure::FailJob(message),
            "Ignore" => return OnFailure::Ignore,
            "Count" | "FailIndex" => return OnFailure::Count,
            // Clients skip a rule whose action they do not know (the API's own advice).
            _ => {}
        }
    }
    OnFailure::Count
}

/// How a Job ended, if it did: (condition type, reason, message).
fn verdict(job: &Job, succeeded: i32, failed: i32) -> Option<(&'static str, &'static str, String)> {
    let spec = job.spec.clone().unwrap_or_default();
    let completions = spec.completions.unwrap_or(1);
    if succeeded >= completions {
        return Some((
            "Complete",
            "CompletionsReached",
            "Reached expected number of succeeded pods".into(),
        ));
    }
    if failed > spec.backoff_limit.unwrap_or(6) {
        return Some((
            "Failed",
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit".into(),
        ));
    }
    let started = job.status.as_ref().and_then(|s| s.start_time.as_ref());
    if let (Some(deadline), Some(_)) = (spec.active_deadline_seconds, started)
        && age_secs(started) >= deadline
    {
        return Some((
            "Failed",
            "DeadlineExceeded",
            "Job was active longer than specified deadline".into(),
        ));
    }
    None
}

fn ended(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

/// When a finished Job finished.
fn finished_at(job: &Job) -> Option<&Time> {
    let status = job.status.as_ref()?;
    status.completion_time.as_ref().or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?
            .last_transition_time
            .as_ref()
    })
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
    // ttlSecondsAfterFinished: a finished Job goes that long after it finished.
    if let (true, Some(ttl)) = (
        ended(&job),
        job.spec.as_ref().and_then(|s| s.ttl_seconds_after_finished),
    ) {
        let left = i64::from(ttl) - age_secs(finished_at(&job));
        if left > 0 {
            return Ok(Action::requeue(Duration::from_secs(left as u64)));
        }
        match Api::<Job>::namespaced(ctx.client.clone(), &ns)
            .delete(&job.name_any(), &DeleteParams::background())
            .await
        {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => return Ok(Action::await_change()),
        }
    }
    let uid = job.uid().unwrap_or_default();
    let spec = job.spec.clone().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Vec<Pod> = pods_api
        .list(&ListParams::default().labels(&format!("{UID_LABEL}={uid}")))
        .await?
        .items
        .into_iter()
        .filter(|p| controller_of(&p.metadata).is_some_and(|o| o.uid == uid))
        .collect();
    let done_indexes: std::collections::BTreeSet<i32> = pods
        .iter()
        .filter(|p| phase(p) == "Succeeded")
        .filter_map(index_of)
        .collect();
    let succeeded = if indexed(&job) {
        done_indexes.len() as i32
    } else {
        pods.iter().filter(|p| phase(p) == "Succeeded").count() as i32
    };
    // The failed pods the pod failure policy counts, and the first that fails the Job.
    let mut failed = 0;
    let mut fail_job = None;
    for p in pods.iter().filter(|p| phase(p) == "Failed") {
        match on_failure(&job, p) {
            OnFailure::Count => failed += 1,
            OnFailure::Ignore => {}
            OnFailure::FailJob(message) => {
                failed += 1;
                fail_job.get_or_insert(message);
            }
        }
    }
    let active: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && !matches!(phase(p), "Succeeded" | "Failed")
        })
        .collect();
    let done = ended(&job);
    let verdict = if done {
        None
    } else if let Some(message) = fail_job {
        Some(("Failed", "PodFailurePolicy", message))
    } else {
        verdict(&job, succeeded, failed)
    };
    let suspended = spec.suspend == Some(true);
    // A finished or suspended Job keeps no pod running.
    if done || verdict.is_some() || suspended {
        for p in &active {
            match pods_api
                .delete(&p.name_any(), &DeleteParams::background())
                .await
            {
                Err(e) if !not_found(&e) => return Err(e.into()),
                _ => {}
            }
        }
    }
    let mut created = 0;
    if !done && verdict.is_none() && !suspended {
        let completions = spec.completions.unwrap_or(1);
        let parallelism = spec.parallelism.unwrap_or(1);
        let remaining = (completions - succeeded).max(0);
        let want = parallelism.min(remaining);
        if indexed(&job) {
            // The lowest indexes that neither succeeded nor run.
            let running: std::collections::BTreeSet<i32> =
                active.iter().filter_map(|p| index_of(p)).collect();
            let missing = (0..completions)
                .filter(|i| !done_indexes.contains(i) && !running.contains(i))
                .take(usize::try_from(want - active.len() as i32).unwrap_or(0));
            for i in missing.collect::<Vec<_>>() {
                create_pod(&ctx, &pods_api, &*job, COMPONENT, &indexed_pod(&job, i)?).await?;
                created += 1;
            }
        } else {
            for _ in (active.len() as i32)..want {
                create_pod(&ctx, &pods_api, &*job, COMPONENT, &new_pod(&job)?).await?;
                created += 1;
            }
        }
    }
    let now = Time(Timestamp::now());
    let mut status = json!({
        "active": if done || verdict.is_some() || suspended { 0 } else { active.len() as i32 + created },
        "ready": active.iter().filter(|p| is_ready(p)).count(),
        "succeeded": succeeded,
        "failed": failed,
        "startTime": job.status.as_ref().and_then(|s| s.start_time.clone()).unwrap_or_else(|| now.clone()),
    });
    if indexed(&job) {
        status["completedIndexes"] = json!(compress(&done_indexes));
    }
    if let Some((kind, reason, message)) = &verdict {
        let interim = if *kind == "Complete" {
            "SuccessCriteriaMet"
        } else {
            "FailureTarget"
        };
        let mut conditions: Vec<Value> = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .map(|c| c.iter().map(|c| json!(c)).collect())
            .unwrap_or_default();
        for t in [interim, kind] {
            conditions.push(
                json!({"type": t, "status": "True", "reason": reason, "message": message,
                                   "lastProbeTime": now, "lastTransitionTime": now}),
            );
        }
        status["conditions"] = json!(conditions);
        if *kind == "Complete" {
            status["completionTime"] = json!(now);
        }
        let event = if *kind == "Complete" {
            Kind::Normal
        } else {
            Kind::Warning
        };
        ctx.events
            .record(
                &*job,
                COMPONENT,
                event,
                if *kind == "Complete" {
                    "Completed"
                } else {
                    reason
                },
                message,
            )
            .await;
    }
    let current = serde_json::to_value(&job.status).unwrap_or_default();
    let changed = verdict.is_some()
        || ["active", "ready", "succeeded", "failed"]
            .iter()
            .any(|k| current.get(k).cloned().unwrap_or(json!(0)) != status[k])
        || (indexed(&job)
            && current
                .get("completedIndexes")
                .cloned()
                .unwrap_or(json!(""))
                != status["completedIndexes"])
        || current.get("startTime").is_none_or(Value::is_null);
    if changed {
        Api::<Job>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &job.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    // A Job that just finished with a TTL: look again when it expires.
    if let (Some(ttl), true) = (spec.ttl_seconds_after_finished, verdict.is_some() && !done) {
        return Ok(Action::requeue(Duration::from_secs(
            u64::try_from(ttl).unwrap_or(0).max(1),
        )));
    }
    // The deadline passes without any event: look again then.
    if let (Some(deadline), false) = (spec.active_deadline_seconds, done || verdict.is_some()) {
        let started = job.status.as_ref().and_then(|s| s.start_time.as_ref());
        let left = (deadline - age_secs(started)).max(1);
        return Ok(Action::requeue(Duration::from_secs(left as u64)));
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "pi", "namespace": "default", "uid": "u"},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}}}))
        .map(|mut j: Job| {
            let extra: Job = serde_json::from_value(json!({"spec": spec})).unwrap_or_default();
            if let (Some(s), Some(e)) = (j.spec.as_mut(), extra.spec) {
                s.completions = e.completions;
                s.backoff_limit = e.backoff_limit;
                s.pod_failure_policy = e.pod_failure_policy;
            }
            j
        })
        .unwrap()
    }

    #[test]
    fn jobs_end_on_completions_or_on_the_backoff_limit() {
        let j = job(json!({"template": {}, "completions": 3, "backoffLimit": 1}));
        assert_eq!(verdict(&j, 2, 1), None);
        assert_eq!(verdict(&j, 3, 0).map(|v| v.0), Some("Complete"));
        assert_eq!(verdict(&j, 0, 2).map(|v| v.1), Some("BackoffLimitExceeded"));
        let p = new_pod(&j).unwrap();
        assert_eq!(p.labels().get(UID_LABEL).map(String::as_str), Some("u"));
        assert_eq!(p.labels().get("job-name").map(String::as_str), Some("pi"));
    }

    fn failed_pod(exit: &[(&str, i32)], conditions: Value) -> Pod {
        let statuses: Vec<Value> = exit
            .iter()
            .map(|(name, code)| {
                json!({"name": name, "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": code}}})
            })
            .collect();
        serde_json::from_value(json!({"metadata": {"name": "pi-abcde", "namespace": "default"},
            "status": {"phase": "Failed", "containerStatuses": statuses, "conditions": conditions}}))
        .unwrap()
    }

    #[test]
    fn the_pod_failure_policy_takes_the_first_matching_rule() {
        let j = job(json!({"template": {}, "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [7, 8]}},
            {"action": "Launch", "onExitCodes": {"operator": "NotIn", "values": [1]}},
            {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [1, 2]}},
            {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1]}}]}}));
        let none = json!([]);
        assert_eq!(
            on_failure(&j, &failed_pod(&[("main", 42)], none.clone())),
            OnFailure::FailJob(
                "Container main for pod default/pi-abcde failed with exit code 42 matching FailJob rule at index 1".into()
            )
        );
        // containerName: another container's 42 is not the rule's.
        assert_eq!(
            on_failure(&j, &failed_pod(&[("side", 42)], none.clone())),
            OnFailure::Count,
            "NotIn [1, 2] at index 4 counts it"
        );
        assert_eq!(
            on_failure(&j, &failed_pod(&[("main", 0), ("side", 8)], none.clone())),
            OnFailure::Ignore
        );
        // An unknown action is skipped; exit code 0 never matches.
        assert_eq!(
            on_failure(&j, &failed_pod(&[("main", 2)], none.clone())),
            OnFailure::FailJob(
                "Container main for pod default/pi-abcde failed with exit code 2 matching FailJob rule at index 5".into()
            )
        );
        assert_eq!(
            on_failure(&j, &failed_pod(&[("main", 1)], none.clone())),
            OnFailure::Count
        );
        let evicted = json!([{"type": "DisruptionTarget", "status": "True"}]);
        assert_eq!(
            on_failure(&j, &failed_pod(&[("main", 42)], evicted)),
            OnFailure::Ignore
        );
        let plain = job(json!({"template": {}}));
        assert_eq!(
            on_failure(&plain, &failed_pod(&[("main", 42)], none)),
            OnFailure::Count
        );
    }

    #[test]
    fn indexed_pods_know_their_index_and_done_indexes_compress() {
        let j = job(json!({"template": {}, "completions": 3}));
        let p = indexed_pod(&j, 2).unwrap();
        assert_eq!(index_of(&p), Some(2));
        assert_eq!(p.metadata.generate_name.as_deref(), Some("pi-2-"));
        let spec = p.spec.unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("pi-2"));
        let env = &spec.containers[0].env.as_ref().unwrap()[0];
        assert_eq!(env.name, "JOB_COMPLETION_INDEX");
        let set = |v: &[i32]| v.iter().copied().collect();
        assert_eq!(compress(&set(&[0, 1, 2, 4, 6, 7])), "0-2,4,6-7");
        assert_eq!(compress(&set(&[])), "");
        assert_eq!(compress(&set(&[3])), "3");
    }
}
