//! `weft-events`: Events (`core/v1`) as weft's controllers and node agent record them, which
//! is what `kubectl describe` lists: one per object, reason and message, repeated ones counted
//! on the first (`count`, `lastTimestamp`) instead of written again. Owns nothing else.

use std::{collections::HashMap, sync::Mutex};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};

/// What makes an Event a repeat of an earlier one: (object uid, reason, message).
type Repeat = (String, String, String);

/// Writes Events; cheap to share.
pub struct Recorder {
    client: Client,
    host: Option<String>,
    /// (object uid, reason, message) → the Event's name and count.
    seen: Mutex<HashMap<Repeat, (String, i32)>>,
}

/// Whether an Event is routine or worth a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `Normal`.
    Normal,
    /// `Warning`.
    Warning,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder writing through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            host: None,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// A recorder for a node's agent: its Events name the node as their source host.
    pub fn for_node(client: Client, node: &str) -> Self {
        Self {
            host: Some(node.to_owned()),
            ..Self::new(client)
        }
    }

    /// Records that `reason` happened to `object`, as `component`. Failures are logged, not
    /// returned: an Event is never worth failing a reconcile for.
    pub async fn record<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        component: &str,
        kind: Kind,
        reason: &str,
        message: &str,
    ) {
        let reference = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: Some(object.name_any()),
            namespace: object.namespace(),
            uid: object.uid(),
            resource_version: object.resource_version(),
            field_path: None,
        };
        self.record_for(reference, component, kind, reason, message)
            .await;
    }

    /// [`Recorder::record`] for an object known by reference only.
    pub async fn record_for(
        &self,
        object: ObjectReference,
        component: &str,
        kind: Kind,
        reason: &str,
        message: &str,
    ) {
        let ns = object
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let now = Time(Timestamp::now());
        let key = (
            object.uid.clone().unwrap_or_default(),
            reason.to_owned(),
            message.to_owned(),
        );
        let existing = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if let Some((name, count)) = existing {
            let patch = serde_json::json!({"count": count + 1, "lastTimestamp": now});
            if api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                self.remember(key, name, count + 1);
                return;
            }
        }
        let name = format!(
            "{}.{:x}",
            object.name.clone().unwrap_or_default(),
            Timestamp::now().as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: object,
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()),
            type_: Some(
                match kind {
                    Kind::Normal => "Normal",
                    Kind::Warning => "Warning",
                }
                .to_owned(),
            ),
            source: Some(EventSource {
                component: Some(component.to_owned()),
                host: self.host.clone(),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            reporting_component: Some(component.to_owned()),
            reporting_instance: Some(component.to_owned()),
            ..Event::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => self.remember(key, name, 1),
            Err(e) => tracing::debug!(error = %e, reason, "recording an event"),
        }
    }

    fn remember(&self, key: Repeat, name: String, count: i32) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 10_000 {
            seen.clear();
        }
        seen.insert(key, (name, count));
    }
}
