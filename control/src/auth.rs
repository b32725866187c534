//! Who is asking, and whether they may: the API server's authentication and authorization.
//!
//! Authentication, in kube-apiserver's order: a bearer token (`Authorization: Bearer ...`,
//! looked up in the static tokens of `--token-auth-file` and the server's own), else a client
//! certificate the TLS handshake verified against `--client-ca-file` (common name = user,
//! organizations = groups), else anonymous. A token that names nobody is refused (401), never
//! taken as anonymous.
//!
//! Authorization, three kinds of user:
//! * **admins**: members of `system:masters` may do everything (kubeadm's admin.conf).
//! * **nodes**: `system:node:<name>` in `system:nodes`, with the rights of Kubernetes' Node
//!   authorizer and NodeRestriction admission: read what pods need (and only the Secrets and
//!   ConfigMaps that a pod bound to the node references), write its own Node, Node status,
//!   Lease and CSINode, the status of its own pods and their deletion, and Events. weft node
//!   also runs weft-csi's provisioner for its node, so a node may write PersistentVolumes and
//!   PersistentVolumeClaims (Kubernetes gives these to csi-provisioner's ServiceAccount).
//! * **everyone else**, anonymous included: the health and version endpoints; authenticated
//!   users also discovery. Anything else is `403 Forbidden` (anonymous: `401 Unauthorized`),
//!   with kube-apiserver's message.
//!
//! Every authenticated user may also ask who they are and what they may do
//! ([`self_review`]: `SelfSubjectReview` for `kubectl auth whoami`, `SelfSubjectAccessReview`
//! for `kubectl auth can-i`), answered by the same authorizer.

use std::{collections::HashMap, io::Read as _, path::Path};

use axum::http::{HeaderMap, header};
use serde_json::Value;

use crate::{resources::Resource, status::ApiError, store::Store};

/// The admins' group.
pub const MASTERS: &str = "system:masters";
/// The nodes' group.
pub const NODES: &str = "system:nodes";
/// The prefix of a node's user name.
pub const NODE_PREFIX: &str = "system:node:";
/// Every authenticated user's group.
pub const AUTHENTICATED: &str = "system:authenticated";
/// The group of requests without credentials.
pub const UNAUTHENTICATED: &str = "system:unauthenticated";

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user name.
    pub user: String,
    /// The groups (`system:authenticated` included).
    pub groups: Vec<String>,
}

impl Identity {
    /// A user in `groups` (and in `system:authenticated`).
    pub fn new(user: &str, groups: &[&str]) -> Self {
        let mut groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        if !groups.iter().any(|g| g == AUTHENTICATED) {
            groups.push(AUTHENTICATED.to_owned());
        }
        Self {
            user: user.to_owned(),
            groups,
        }
    }

    /// The user of requests without credentials.
    pub fn anonymous() -> Self {
        Self {
            user: "system:anonymous".to_owned(),
            groups: vec![UNAUTHENTICATED.to_owned()],
        }
    }

    fn in_group(&self, g: &str) -> bool {
        self.groups.iter().any(|x| x == g)
    }

    /// The node this user is, if it is one.
    pub fn node(&self) -> Option<&str> {
        self.user
            .strip_prefix(NODE_PREFIX)
            .filter(|n| !n.is_empty() && self.in_group(NODES))
    }
}

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TokenFileError {
    path: String,
    message: String,
}

/// Tokens and the users they name.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: HashMap<String, Identity>,
}

impl Authenticator {
    /// No tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads kube-apiserver's static token file: one `token,user,uid[,"group1,group2"]` line
    /// per user (blank lines and `#` comments skipped).
    pub fn load_token_file(&mut self, path: &Path) -> Result<(), TokenFileError> {
        let fail = |message: String| TokenFileError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (token, rest) = line
                .split_once(',')
                .ok_or_else(|| fail(format!("line {}: want token,user,uid[,groups]", n + 1)))?;
            let mut fields = rest.splitn(3, ',');
            let user = fields.next().unwrap_or("").trim();
            let _uid = fields.next();
            let groups = fields.next().unwrap_or("").trim().trim_matches('"');
            if token.trim().is_empty() || user.is_empty() {
                return Err(fail(format!("line {}: empty token or user", n + 1)));
            }
            let groups: Vec<&str> = groups
                .split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .collect();
            self.add(token.trim(), Identity::new(user, &groups));
        }
        Ok(())
    }

    /// Accepts `token` as `who`.
    pub fn add(&mut self, token: &str, who: Identity) {
        self.tokens.insert(token.to_owned(), who);
    }

    /// Who a request is: its bearer token's user, else its client certificate's, else nobody
    /// (`None`: anonymous). An unknown or malformed token is refused.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&weft_pki::serve::PeerSubject>,
    ) -> Result<Option<Identity>, ApiError> {
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or(ApiError::Unauthorized)?;
            return self
                .tokens
                .get(token)
                .cloned()
                .map(Some)
                .ok_or(ApiError::Unauthorized);
        }
        Ok(peer.map(|p| {
            let groups: Vec<&str> = p.0.organizations.iter().map(String::as_str).collect();
            Identity::new(&p.0.common_name, &groups)
        }))
    }
}

/// A new random token (256 bits, hex).
pub fn generate_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What a request asks to do to which object, as authorization sees it.
#[derive(Debug)]
pub struct Attributes<'a> {
    /// get, list, watch, create, update, patch, delete or deletecollection.
    pub verb: &'a str,
    /// The resource.
    pub resource: &'a Resource,
    /// The subresource (`status`, `log`, `exec`, ...), if any.
    pub subresource: Option<&'a str>,
    /// The namespace ("" for cluster-scoped objects and requests across namespaces).
    pub namespace: &'a str,
    /// The object's name ("" for collections; for a create, the name in the body).
    pub name: &'a str,
}

impl Attributes<'_> {
    fn forbidden(&self, who: &Identity, why: &str) -> ApiError {
        let resource = match self.subresource {
            Some(s) => format!("{}/{s}", self.resource.plural),
            None => self.resource.plural.to_owned(),
        };
        let subject = if self.name.is_empty() {
            self.resource.plural.to_owned()
        } else {
            format!("{} {:?}", self.resource.plural, self.name)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace {:?}", self.namespace)
        };
        let mut message = format!(
            "{subject} is forbidden: User {:?} cannot {} resource {resource:?} in API group {:?} {scope}",
            who.user, self.verb, self.resource.group
        );
        if !why.is_empty() {
            message.push_str(": ");
            message.push_str(why);
        }
        ApiError::Forbidden(message)
    }
}

/// Whether an unauthenticated request may reach `parts` (a path outside the resources).
pub fn public_path(parts: &[&str]) -> bool {
    matches!(
        parts,
        ["healthz"] | ["readyz"] | ["livez"] | ["version"] | ["healthz" | "readyz" | "livez", _]
    )
}

/// Whether `who` may do what `a` describes; `body` is a create's object, for the name and the
/// fields a node's creates are held to.
pub fn authorize(
    store: &Store,
    who: &Identity,
    a: &Attributes<'_>,
    body: Option<&Value>,
) -> Result<(), ApiError> {
    if who.in_group(MASTERS) {
        return Ok(());
    }
    let Some(node) = who.node() else {
        return Err(a.forbidden(who, ""));
    };
    match node_may(store, node, a, body) {
        Ok(()) => Ok(()),
        Err(why) => Err(a.forbidden(who, &why)),
    }
}

const WHO_AM_I: [&str; 4] = ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"];
const CAN_I: [&str; 4] = [
    "apis",
    "authorization.k8s.io",
    "v1",
    "selfsubjectaccessreviews",
];

/// Whether `parts` is where self-reviews are POSTed.
pub fn is_self_review(parts: &[&str]) -> bool {
    parts == WHO_AM_I || parts == CAN_I
}

/// Answers a self-review POSTed to `parts`: who `who` is (`authentication.k8s.io/v1`
/// SelfSubjectReview) or whether they may do what the review's `spec.resourceAttributes`
/// describe (`authorization.k8s.io/v1` SelfSubjectAccessReview).
pub fn self_review(
    store: &Store,
    who: &Identity,
    parts: &[&str],
    review: &Value,
) -> Result<Value, ApiError> {
    if parts == WHO_AM_I {
        return Ok(serde_json::json!({
            "kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "status": {"userInfo": {"username": who.user, "groups": who.groups}},
        }));
    }
    if parts == CAN_I {
        return access_review(store, who, review);
    }
    Err(ApiError::NoSuchResource)
}

fn access_review(store: &Store, who: &Identity, review: &Value) -> Result<Value, ApiError> {
    let spec = &review["spec"];
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let (allowed, reason) = if let Some(a) = spec.get("resourceAttributes") {
        let (group, plural) = (text(&a["group"]), text(&a["resource"]));
        match crate::resources::RESOURCES
            .iter()
            .find(|r| r.group == group && r.plural == plural)
        {
            None => (
                false,
                format!("the server does not serve {plural:?} in {group:?}"),
            ),
            Some(resource) => {
                let (verb, sub, namespace, name) = (
                    text(&a["verb"]),
                    text(&a["subresource"]),
                    text(&a["namespace"]),
                    text(&a["name"]),
                );
                let attributes = Attributes {
                    verb: &verb,
                    resource,
                    subresource: (!sub.is_empty()).then_some(sub.as_str()),
                    namespace: &namespace,
                    name: &name,
                };
                let body = serde_json::json!({"metadata": {"name": name}});
                match authorize(store, who, &attributes, Some(&body)) {
                    Ok(()) => (true, String::new()),
                    Err(e) => (false, e.to_string()),
                }
            }
        }
    } else if let Some(a) = spec.get("nonResourceAttributes") {
        let path = text(&a["path"]);
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let discovery = matches!(parts.first(), Some(&"api" | &"apis" | &"openapi"));
        let allowed = who.in_group(MASTERS) || public_path(&parts) || discovery;
        (allowed, String::new())
    } else {
        return Err(ApiError::BadRequest(
            "spec.resourceAttributes or spec.nonResourceAttributes is required".into(),
        ));
    };
    let mut status = serde_json::json!({"allowed": allowed});
    if !reason.is_empty() {
        status["reason"] = Value::from(reason);
    }
    Ok(serde_json::json!({
        "kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec, "status": status,
    }))
}

const READ: [&str; 3] = ["get", "list", "watch"];
const WRITE: [&str; 3] = ["create", "update", "patch"];

/// The Node authorizer's rules for `node`: `Err` says why not.
fn node_may(
    store: &Store,
    node: &str,
    a: &Attributes<'_>,
    body: Option<&Value>,
) -> Result<(), String> {
    let verb = a.verb;
    let name = if verb == "create" {
        body.and_then(|b| b.pointer("/metadata/name"))
            .and_then(Value::as_str)
            .unwrap_or(a.name)
    } else {
        a.name
    };
    let own = |what: &str| {
        if name == node {
            Ok(())
        } else {
            Err(format!("node {node:?} cannot modify {what} {name:?}"))
        }
    };
    match (a.resource.group, a.resource.plural, a.subresource) {
        ("", "secrets" | "configmaps", None) => {
            if verb != "get" {
                return Err(format!(
                    "a node may only get the {} its pods reference",
                    a.resource.plural
                ));
            }
            if referenced(store, node, a.resource.plural, a.namespace, name) {
                Ok(())
            } else {
                Err(format!(
                    "no relationship found between node {node:?} and this object"
                ))
            }
        }
        ("", "nodes", None | Some("status")) if WRITE.contains(&verb) => own("node"),
        ("coordination.k8s.io", "leases", None)
            if READ.contains(&verb) || WRITE.contains(&verb) =>
        {
            if a.namespace != "kube-node-lease" {
                return Err("a node may only use leases in kube-node-lease".to_owned());
            }
            if READ.contains(&verb) && name.is_empty() {
                return Ok(());
            }
            own("lease")
        }
        ("storage.k8s.io", "csinodes", None) if WRITE.contains(&verb) => own("csinode"),
        ("", "pods", Some("status")) if matches!(verb, "update" | "patch") => {
            bound_here(store, node, a)
        }
        ("", "pods", None) if verb == "delete" => bound_here(store, node, a),
        ("", "events", None) | ("events.k8s.io", "events", None) if WRITE.contains(&verb) => Ok(()),
        ("", "persistentvolumes", None | Some("status"))
            if WRITE.contains(&verb) || verb == "delete" =>
        {
            Ok(())
        }
        ("", "persistentvolumeclaims", None | Some("status"))
            if matches!(verb, "update" | "patch") =>
        {
            Ok(())
        }
        (_, _, None | Some("status")) if READ.contains(&verb) => Ok(()),
        _ => Err(String::new()),
    }
}

/// Whether the pod `a` names is bound to `node`.
fn bound_here(store: &Store, node: &str, a: &Attributes<'_>) -> Result<(), String> {
    let on = store
        .get(a.resource, a.namespace, a.name)
        .ok()
        .and_then(|p| {
            p.pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
    match on {
        Some(n) if n == node => Ok(()),
        _ => Err(format!(
            "node {node:?} can only change pods with spec.nodeName set to itself"
        )),
    }
}

/// Whether a pod bound to `node` in `namespace` references the Secret or ConfigMap `name`.
fn referenced(store: &Store, node: &str, plural: &str, namespace: &str, name: &str) -> bool {
    let Some(pods) = crate::resources::find("", "v1", "pods") else {
        return false;
    };
    let (_, pods) = store.list(pods, Some(namespace), |p| {
        p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node)
    });
    pods.iter()
        .any(|p| references(&p["spec"], plural).iter().any(|r| r == name))
}

/// The names of the Secrets (`plural` = "secrets") or ConfigMaps a pod spec references.
fn references(spec: &Value, plural: &str) -> Vec<String> {
    let secrets = plural == "secrets";
    let mut out = Vec::new();
    let mut push = |v: &Value| {
        if let Some(n) = v.as_str() {
            out.push(n.to_owned());
        }
    };
    let each = |v: &Value| v.as_array().cloned().unwrap_or_default();
    for v in each(&spec["volumes"]) {
        if secrets {
            push(&v["secret"]["secretName"]);
        } else {
            push(&v["configMap"]["name"]);
        }
        for s in each(&v["projected"]["sources"]) {
            push(&s[if secrets { "secret" } else { "configMap" }]["name"]);
        }
    }
    if secrets {
        for s in each(&spec["imagePullSecrets"]) {
            push(&s["name"]);
        }
    }
    let (key_ref, from_ref) = if secrets {
        ("secretKeyRef", "secretRef")
    } else {
        ("configMapKeyRef", "configMapRef")
    };
    for c in each(&spec["containers"])
        .into_iter()
        .chain(each(&spec["initContainers"]))
    {
        for e in each(&c["env"]) {
            push(&e["valueFrom"][key_ref]["name"]);
        }
        for e in each(&c["envFrom"]) {
            push(&e[from_ref]["name"]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn a_token_file_names_users_and_groups_and_unknown_tokens_are_refused() {
        let dir = std::env::temp_dir().join(format!("weft-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens.csv");
        std::fs::write(
            &file,
            "# comment\nt1,alice,1,\"system:masters,dev\"\n\nt2,system:node:n1,2,system:nodes\n",
        )
        .unwrap();
        let mut a = Authenticator::new();
        a.load_token_file(&file).unwrap();
        let alice = a
            .authenticate(&headers("Bearer t1"), None)
            .unwrap()
            .unwrap();
        assert_eq!(alice.user, "alice");
        assert!(alice.in_group(MASTERS) && alice.in_group("dev") && alice.in_group(AUTHENTICATED));
        let n1 = a
            .authenticate(&headers("Bearer t2"), None)
            .unwrap()
            .unwrap();
        assert_eq!(n1.node(), Some("n1"));
        assert!(matches!(
            a.authenticate(&headers("Bearer nope"), None),
            Err(ApiError::Unauthorized)
        ));
        assert!(matches!(
            a.authenticate(&headers("Basic dXNlcg=="), None),
            Err(ApiError::Unauthorized)
        ));
        let peer = weft_pki::serve::PeerSubject(weft_pki::Subject::new("bob", &[]));
        assert_eq!(
            a.authenticate(&HeaderMap::new(), Some(&peer))
                .unwrap()
                .unwrap()
                .user,
            "bob"
        );
        assert_eq!(a.authenticate(&HeaderMap::new(), None).unwrap(), None);
        std::fs::write(&file, "only-a-token\n").unwrap();
        assert!(Authenticator::new().load_token_file(&file).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_user_needs_the_nodes_group() {
        assert_eq!(Identity::new("system:node:a", &[NODES]).node(), Some("a"));
        assert_eq!(Identity::new("system:node:a", &[]).node(), None);
        assert_eq!(Identity::new("system:node:", &[NODES]).node(), None);
    }

    #[test]
    fn references_cover_volumes_env_and_pull_secrets() {
        let spec = json!({
            "volumes": [{"secret": {"secretName": "s1"}}, {"configMap": {"name": "c1"}},
                        {"projected": {"sources": [{"secret": {"name": "s2"}}, {"configMap": {"name": "c2"}}]}}],
            "imagePullSecrets": [{"name": "s3"}],
            "initContainers": [{"envFrom": [{"secretRef": {"name": "s4"}}]}],
            "containers": [{"env": [{"valueFrom": {"configMapKeyRef": {"name": "c3", "key": "k"}}},
                                    {"valueFrom": {"secretKeyRef": {"name": "s5", "key": "k"}}}],
                            "envFrom": [{"configMapRef": {"name": "c4"}}]}],
        });
        let mut s = references(&spec, "secrets");
        s.sort();
        assert_eq!(s, ["s1", "s2", "s3", "s4", "s5"]);
        let mut c = references(&spec, "configmaps");
        c.sort();
        assert_eq!(c, ["c1", "c2", "c3", "c4"]);
    }

    fn attrs<'a>(
        verb: &'a str,
        plural: &str,
        sub: Option<&'a str>,
        namespace: &'a str,
        name: &'a str,
    ) -> Attributes<'a> {
        let resource = crate::resources::RESOURCES
            .iter()
            .find(|r| r.plural == plural)
            .expect("a served resource");
        Attributes {
            verb,
            resource,
            subresource: sub,
            namespace,
            name,
        }
    }

    #[test]
    fn a_node_may_do_what_its_pods_need_and_nothing_to_other_nodes() {
        let store = Store::open(crate::store::Options::default()).unwrap();
        let pods = crate::resources::find("", "v1", "pods").unwrap();
        for (name, node, secret) in [("a", "n1", "s1"), ("b", "n2", "s2")] {
            store
                .create(pods, "default", json!({
                    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                    "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i",
                             "env": [{"name": "E", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}]}]},
                }))
                .unwrap();
        }
        let n1 = Identity::new("system:node:n1", &[NODES]);
        let may =
            |a: Attributes<'_>, body: Option<Value>| authorize(&store, &n1, &a, body.as_ref());
        // Reads.
        assert!(may(attrs("list", "pods", None, "", ""), None).is_ok());
        assert!(may(attrs("watch", "services", None, "", ""), None).is_ok());
        assert!(may(attrs("get", "secrets", None, "default", "s1"), None).is_ok());
        let e = may(attrs("get", "secrets", None, "default", "s2"), None).unwrap_err();
        assert!(e.to_string().contains("no relationship"), "{e}");
        assert!(may(attrs("list", "secrets", None, "default", ""), None).is_err());
        // Its own Node, Lease and pods; not another node's.
        assert!(may(attrs("patch", "nodes", Some("status"), "", "n1"), None).is_ok());
        let e = may(attrs("patch", "nodes", Some("status"), "", "n2"), None).unwrap_err();
        assert_eq!(e.code(), 403);
        assert!(
            e.to_string().starts_with(
                "nodes \"n2\" is forbidden: User \"system:node:n1\" cannot patch resource \"nodes/status\" in API group \"\" at the cluster scope"
            ),
            "{e}"
        );
        let node = |name: &str| Some(json!({"metadata": {"name": name}}));
        assert!(may(attrs("create", "nodes", None, "", ""), node("n1")).is_ok());
        assert!(may(attrs("create", "nodes", None, "", ""), node("n2")).is_err());
        assert!(may(attrs("delete", "nodes", None, "", "n1"), None).is_err());
        assert!(
            may(
                attrs("update", "leases", None, "kube-node-lease", "n1"),
                None
            )
            .is_ok()
        );
        assert!(
            may(
                attrs("update", "leases", None, "kube-node-lease", "n2"),
                None
            )
            .is_err()
        );
        assert!(may(attrs("create", "leases", None, "default", ""), node("n1")).is_err());
        assert!(may(attrs("patch", "pods", Some("status"), "default", "a"), None).is_ok());
        assert!(may(attrs("patch", "pods", Some("status"), "default", "b"), None).is_err());
        assert!(may(attrs("delete", "pods", None, "default", "a"), None).is_ok());
        assert!(may(attrs("delete", "pods", None, "default", "b"), None).is_err());
        assert!(may(attrs("patch", "pods", None, "default", "a"), None).is_err());
        assert!(may(attrs("create", "pods", None, "default", ""), node("x")).is_err());
        assert!(may(attrs("create", "events", None, "default", ""), None).is_ok());
        assert!(may(attrs("create", "deployments", None, "default", ""), None).is_err());
        assert!(may(attrs("create", "pods", Some("exec"), "default", "a"), None).is_err());
        // Admins may do anything; other users nothing.
        let admin = Identity::new("weft:admin", &[MASTERS]);
        assert!(
            authorize(
                &store,
                &admin,
                &attrs("delete", "nodes", None, "", "n2"),
                None
            )
            .is_ok()
        );
        let bob = Identity::new("bob", &[]);
        let e = authorize(
            &store,
            &bob,
            &attrs("list", "pods", None, "default", ""),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pods is forbidden: User \"bob\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
    }
}
