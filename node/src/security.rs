//! A container's effective user (its securityContext over the pod's) and kubelet's
//! `runAsNonRoot` check against it and the image's configured user.

use k8s_openapi::api::core::v1::{Container, Pod};

/// The user, group and `runAsNonRoot` a container runs with: its own securityContext's, else
/// the pod's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// `runAsUser`.
    pub user: Option<i64>,
    /// `runAsGroup`.
    pub group: Option<i64>,
    /// `runAsNonRoot`.
    pub non_root: bool,
}

/// The effective identity of container `c` of `pod`.
pub fn identity(pod: &Pod, c: &Container) -> Identity {
    let pod_sc = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.clone())
        .unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    Identity {
        user: sc.run_as_user.or(pod_sc.run_as_user),
        group: sc.run_as_group.or(pod_sc.run_as_group),
        non_root: sc.run_as_non_root.or(pod_sc.run_as_non_root) == Some(true),
    }
}

/// kubelet's refusal when `runAsNonRoot` cannot hold: the message, worded as kubelet words it,
/// or `None` when the container may start. `image_uid` and `image_user` are what the image's
/// configuration says (CRI ImageStatus: a numeric uid, or a user name).
pub fn non_root_violation(
    pod: &Pod,
    c: &Container,
    image_uid: Option<i64>,
    image_user: &str,
) -> Option<String> {
    let id = identity(pod, c);
    if !id.non_root {
        return None;
    }
    let who = format!(
        "(pod: \"{}_{}({})\", container: {})",
        pod.metadata.name.as_deref().unwrap_or(""),
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.uid.as_deref().unwrap_or(""),
        c.name
    );
    match (id.user, image_uid) {
        (Some(0), _) => Some(format!(
            "container's runAsUser breaks non-root policy {who}"
        )),
        (Some(_), _) => None,
        (None, Some(0)) => Some(format!(
            "container has runAsNonRoot and image will run as root {who}"
        )),
        (None, Some(_)) => None,
        (None, None) if image_user.is_empty() || image_user == "root" => Some(format!(
            "container has runAsNonRoot and image will run as root {who}"
        )),
        (None, None) => Some(format!(
            "container has runAsNonRoot and image has non-numeric user ({image_user}), cannot verify user is non-root {who}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_containers_context_wins_over_the_pods() {
        let p = pod(r#"
metadata: {name: p, namespace: ns, uid: u}
spec:
  securityContext: {runAsUser: 1000, runAsGroup: 2000, runAsNonRoot: true}
  containers: [{name: a, securityContext: {runAsUser: 3000}}, {name: b}]
"#);
        let cs = &p.spec.as_ref().unwrap().containers;
        assert_eq!(
            identity(&p, &cs[0]),
            Identity {
                user: Some(3000),
                group: Some(2000),
                non_root: true
            }
        );
        assert_eq!(identity(&p, &cs[1]).user, Some(1000));
    }

    #[test]
    fn run_as_non_root_is_refused_like_kubelet_does() {
        let p = pod(r#"
metadata: {name: p, namespace: ns, uid: u}
spec:
  securityContext: {runAsNonRoot: true}
  containers: [{name: a}, {name: b, securityContext: {runAsUser: 0}}, {name: c, securityContext: {runAsUser: 10001}}]
"#);
        let cs = &p.spec.as_ref().unwrap().containers;
        assert_eq!(
            non_root_violation(&p, &cs[0], None, "").as_deref(),
            Some(
                "container has runAsNonRoot and image will run as root (pod: \"p_ns(u)\", container: a)"
            )
        );
        assert!(non_root_violation(&p, &cs[0], Some(0), "").is_some());
        assert_eq!(non_root_violation(&p, &cs[0], Some(65534), ""), None);
        assert!(
            non_root_violation(&p, &cs[0], None, "nobody")
                .unwrap()
                .contains("non-numeric user (nobody)")
        );
        assert!(
            non_root_violation(&p, &cs[1], Some(1000), "")
                .unwrap()
                .starts_with("container's runAsUser breaks non-root policy")
        );
        assert_eq!(non_root_violation(&p, &cs[2], None, ""), None);
        let free = pod("metadata: {name: q}\nspec: {containers: [{name: a}]}");
        assert_eq!(
            non_root_violation(&free, &free.spec.as_ref().unwrap().containers[0], None, ""),
            None
        );
    }
}
