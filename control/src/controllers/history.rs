//! ControllerRevisions: the template history of StatefulSets and DaemonSets, as
//! kube-controller-manager keeps it, so that `kubectl rollout history sts|ds` lists revisions
//! and `kubectl rollout undo` restores one. A revision is named `<owner>-<hash>`, carries the
//! `controller-revision-hash` label, is controlled by its owner, and holds the patch kubectl
//! applies to go back to it (`{"spec":{"template":{..., "$patch":"replace"}}}`). Going back to
//! an old template renumbers its revision as the newest, and only `revisionHistoryLimit`
//! revisions beyond the live ones are kept.

use std::collections::BTreeMap;

use k8s_openapi::api::{apps::v1::ControllerRevision, core::v1::PodTemplateSpec};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use super::{Error, controller_of, not_found, owner_ref};
use crate::controllers::daemonset::HASH_LABEL;

/// The revision the owner's current template is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    /// The ControllerRevision's name (`<owner>-<hash>`), what StatefulSet status reports.
    pub name: String,
    /// The template's hash: pods of it carry it in `controller-revision-hash`.
    pub hash: String,
    /// The revision number.
    pub number: i64,
}

/// Makes sure the owner's `template` has a ControllerRevision, as the newest revision, and
/// prunes revisions beyond `limit` that are not `keep`ing a live pod. `selector_labels` finds
/// the owner's revisions (its selector's matchLabels, as kubectl looks them up).
pub async fn sync<K>(
    client: &kube::Client,
    owner: &K,
    template: &PodTemplateSpec,
    selector_labels: &BTreeMap<String, String>,
    limit: usize,
    keep: &[String],
) -> Result<Revision, Error>
where
    K: Resource<DynamicType = ()>,
{
    let ns = owner.namespace().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &ns);
    let uid = owner.uid().unwrap_or_default();
    let selector = selector_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut mine: Vec<ControllerRevision> = api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|r| controller_of(&r.metadata).is_some_and(|o| o.uid == uid))
        .collect();
    mine.sort_by_key(|r| r.revision);
    let newest = mine.last().map_or(0, |r| r.revision);
    let hash = crate::controllers::deployment::template_hash(template, 0);
    let name = format!("{}-{hash}", owner.name_any());
    let number = match mine.iter().find(|r| r.name_any() == name) {
        Some(r) if r.revision == newest => r.revision,
        Some(_) => {
            // An old template again (a rollback): it becomes the newest revision.
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"revision": newest + 1})),
            )
            .await?;
            newest + 1
        }
        None => {
            let mut labels = template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            labels.insert(HASH_LABEL.into(), hash.clone());
            let mut data = serde_json::to_value(template).unwrap_or_default();
            data["$patch"] = json!("replace");
            let revision: ControllerRevision = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns, "labels": labels,
                             "ownerReferences": [owner_ref(owner)]},
                "data": {"spec": {"template": data}},
                "revision": newest + 1,
            }))
            .map_err(|e| Error::Invalid(format!("revision {name}: {e}")))?;
            match api.create(&PostParams::default(), &revision).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            newest + 1
        }
    };
    // Old revisions beyond the limit go, unless live pods still run them.
    let old: Vec<&ControllerRevision> = mine
        .iter()
        .filter(|r| r.name_any() != name && !keep.contains(&r.name_any()))
        .collect();
    for r in old.iter().take(old.len().saturating_sub(limit)) {
        match api.delete(&r.name_any(), &DeleteParams::default()).await {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => {}
        }
    }
    Ok(Revision { name, hash, number })
}
