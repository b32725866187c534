//! `weft node`, weft's node agent, the part kubelet plays: it registers its Node, renews its
//! Lease and runs the pods bound to it through containerd's CRI ([`agent`]), containerd being
//! configured and started by weft ([`containerd`]) with weft-cni as its CNI plugin; images are
//! built and loaded without a registry ([`image`]).
//!
//! Probes ([`probe`]) drive each container's readiness and restarts; the node's HTTP endpoint
//! ([`server`]) serves container logs ([`logs`]) to the API server's `pods/log` and the
//! runtime's exec/attach/port-forward streams ([`stream`]) and the Summary API's resource usage
//! ([`stats`]); pods' volumes are made on the node
//! ([`volumes`]); a container's user and kubelet's runAsNonRoot check are in [`security`]. Claims are
//! provisioned and mounted through weft-csi ([`csi`]).

pub mod agent;
pub mod containerd;
pub mod csi;
pub mod env;
pub mod image;
pub mod logs;
pub mod probe;
pub mod security;
pub mod server;
pub mod stats;
pub mod stream;
pub mod volumes;

/// A Kubernetes quantity (`500m`, `1.5`, `128Mi`, `1G`, `2e3`) as a number of base units.
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let (num, exp) = match num.find(['e', 'E']) {
        Some(i) if suffix.is_empty() => (&num[..i], num[i + 1..].parse::<i32>().ok()?),
        _ => (num, 0),
    };
    let n: f64 = num.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    Some(n * scale * 10f64.powi(exp))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantities_parse() {
        use super::quantity;
        assert_eq!(quantity("500m"), Some(0.5));
        assert_eq!(quantity("2"), Some(2.0));
        assert_eq!(quantity("128Mi"), Some(134_217_728.0));
        assert_eq!(quantity("1G"), Some(1e9));
        assert_eq!(quantity("2e3"), Some(2000.0));
        assert_eq!(quantity("1.5Gi"), Some(1.5 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("x"), None);
    }
}
