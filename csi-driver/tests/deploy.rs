//! The sample manifests in `deploy/` stay valid Kubernetes objects, and their StorageClass
//! parameters are ones the driver accepts.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use weft_csi::service::{DRIVER_NAME, validate_parameters};

#[test]
fn sample_manifests_parse_and_their_parameters_are_accepted() {
    let text = include_str!("../deploy/weft-csi.yaml");
    let mut kinds = Vec::new();
    for doc in text.split("\n---\n") {
        let value: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        let kind = value["kind"].as_str().unwrap().to_string();
        match kind.as_str() {
            "CSIDriver" => {
                let d: CSIDriver = serde_yaml::from_value(value).unwrap();
                assert_eq!(d.metadata.name.as_deref(), Some(DRIVER_NAME));
                assert_eq!(d.spec.attach_required, Some(false));
            }
            "StorageClass" => {
                let sc: StorageClass = serde_yaml::from_value(value).unwrap();
                assert_eq!(sc.provisioner, DRIVER_NAME);
                let mut params = sc.parameters.unwrap_or_default().into_iter().collect();
                // What the external-provisioner adds with --extra-create-metadata.
                for (k, v) in [
                    ("csi.storage.k8s.io/pvc/name", "data"),
                    ("csi.storage.k8s.io/pvc/namespace", "default"),
                    ("csi.storage.k8s.io/pv/name", "pvc-1234"),
                ] {
                    params_insert(&mut params, k, v);
                }
                validate_parameters(&params).unwrap();
            }
            "DaemonSet" => {
                let ds: DaemonSet = serde_yaml::from_value(value).unwrap();
                let spec = ds.spec.unwrap().template.spec.unwrap();
                assert!(spec.containers.iter().any(|c| c.name == "weft-csi"));
            }
            _ => {}
        }
        kinds.push(kind);
    }
    assert_eq!(
        kinds,
        [
            "CSIDriver",
            "StorageClass",
            "StorageClass",
            "VolumeSnapshotClass",
            "DaemonSet"
        ]
    );
}

fn params_insert(p: &mut std::collections::HashMap<String, String>, k: &str, v: &str) {
    p.insert(k.to_string(), v.to_string());
}
