//! The Job controller (`batch/v1`, NonIndexed completion): runs pods of the template until
//! `completions` of them succeed, at most `parallelism` at a time, and gives up after
//! `backoffLimit` failed pods or `activeDeadlineSeconds`; then it removes the pods still
//! running and sets the `Complete` or `Failed` condition (with `SuccessCriteriaMet` /
//! `FailureTarget` first, as Kubernetes 1.32 does), `completionTime`, and the
//! `active`/`ready`/`succeeded`/`failed` counts `kubectl get jobs` and `kubectl wait` read.
//! `suspend: true` deletes the active pods and creates none. Pods are labelled with the Job's
//! `batch.kubernetes.io/controller-uid` and `job-name` and owned by it.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{batch::v1::Job, core::v1::Pod},
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

async fn reconcile(job: Arc<Job>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = job.namespace().unwrap_or_default();
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
    let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count() as i32;
    let failed = pods.iter().filter(|p| phase(p) == "Failed").count() as i32;
    let active: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && !matches!(phase(p), "Succeeded" | "Failed")
        })
        .collect();
    let done = ended(&job);
    let verdict = if done {
        None
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
        for _ in (active.len() as i32)..want {
            create_pod(&ctx, &pods_api, &*job, COMPONENT, &new_pod(&job)?).await?;
            created += 1;
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
}
