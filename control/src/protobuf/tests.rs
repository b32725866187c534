//! The decoder against bodies encoded here field by field, as Kubernetes' Go marshaller writes
//! them (every non-pointer field present, empty strings included).

use serde_json::json;

use super::*;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A length-delimited field.
fn ld(n: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(n << 3 | 2, &mut out);
    varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

fn int(n: u64, v: i64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(n << 3, &mut out);
    varint(v as u64, &mut out);
    out
}

fn s(n: u64, v: &str) -> Vec<u8> {
    ld(n, v.as_bytes())
}

fn entry(n: u64, k: &str, v: &[u8]) -> Vec<u8> {
    ld(n, &[s(1, k), ld(2, v)].concat())
}

fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let type_meta = [s(1, api_version), s(2, kind)].concat();
    [
        b"k8s\0".to_vec(),
        ld(1, &type_meta),
        ld(2, raw),
        s(3, ""),
        s(4, ""),
    ]
    .concat()
}

#[test]
fn a_deployment_as_kubectl_create_sends_it_reads_as_its_json() {
    let meta = [
        s(1, "hello"),
        s(2, ""),
        s(3, ""),
        ld(8, &[]), // creationTimestamp: the zero Time
        entry(11, "app", b"hello"),
    ]
    .concat();
    let container = [
        s(1, "echo"),
        s(2, "weft/echo:dev"),
        s(4, "-text=hi"),
        s(4, "-listen=:5678"),
        ld(6, &[int(3, 5678), s(4, "TCP")].concat()),
        // resources.limits: {cpu: 250m}
        ld(8, &entry(1, "cpu", &s(1, "250m"))),
        s(14, ""),
    ]
    .concat();
    let pod_spec = [
        // volumes: [{name, emptyDir: {}}], the VolumeSource embedded as field 2.
        ld(1, &[s(1, "scratch"), ld(2, &ld(2, &[]))].concat()),
        ld(2, &container),
    ]
    .concat();
    let template = [ld(1, &entry(11, "app", b"hello")), ld(2, &pod_spec)].concat();
    let strategy = [
        s(1, "RollingUpdate"),
        // maxUnavailable: 1 (int), maxSurge: "25%" (string)
        ld(
            2,
            &[
                ld(1, &[int(1, 0), int(2, 1)].concat()),
                ld(2, &[int(1, 1), s(3, "25%")].concat()),
            ]
            .concat(),
        ),
    ]
    .concat();
    let spec = [
        int(1, 0), // replicas: 0 is kept
        ld(2, &entry(1, "app", b"hello")),
        ld(3, &template),
        ld(4, &strategy),
    ]
    .concat();
    let body = envelope(
        "apps/v1",
        "Deployment",
        &[ld(1, &meta), ld(2, &spec), ld(3, &[])].concat(),
    );
    let got = decode(&body).unwrap();
    assert_eq!(
        got,
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "hello", "labels": {"app": "hello"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "hello"}},
                "template": {
                    "metadata": {"labels": {"app": "hello"}},
                    "spec": {
                        "volumes": [{"name": "scratch", "emptyDir": {}}],
                        "containers": [{
                            "name": "echo", "image": "weft/echo:dev",
                            "args": ["-text=hi", "-listen=:5678"],
                            "ports": [{"containerPort": 5678, "protocol": "TCP"}],
                            "resources": {"limits": {"cpu": "250m"}},
                        }],
                    },
                },
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxUnavailable": 1, "maxSurge": "25%"}},
            },
            "status": {},
        })
    );
}

#[test]
fn secrets_times_and_negative_numbers_read_as_go_writes_them_in_json() {
    let meta = [
        s(1, "token"),
        ld(8, &[int(1, 1_700_000_000), int(2, 0)].concat()),
    ]
    .concat();
    let body = envelope(
        "v1",
        "Secret",
        &[
            ld(1, &meta),
            entry(2, "password", b"s3cret!"),
            s(3, "Opaque"),
        ]
        .concat(),
    );
    let got = decode(&body).unwrap();
    assert_eq!(got["data"]["password"], "czNjcmV0IQ==");
    assert_eq!(got["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
    assert_eq!(got["type"], "Opaque");
    // A negative int32 is a ten-byte varint.
    let body = envelope(
        "v1",
        "Namespace",
        &ld(1, &[s(1, "n"), int(10, -5)].concat()),
    );
    assert_eq!(
        decode(&body).unwrap()["metadata"]["deletionGracePeriodSeconds"],
        -5
    );
}

#[test]
fn bad_bodies_are_refused_with_a_reason() {
    assert_eq!(decode(b"{\"kind\": \"Pod\"}"), Err(ProtoError::Magic));
    assert!(matches!(
        decode(&envelope("example.com/v1", "Widget", &[])),
        Err(ProtoError::UnknownKind { .. })
    ));
    let mut truncated = envelope("v1", "Pod", &ld(1, &s(1, "p")));
    truncated.truncate(truncated.len() - 3);
    assert!(matches!(decode(&truncated), Err(ProtoError::Malformed(_))));
}

#[test]
fn go_durations_and_base64_match_go() {
    assert_eq!(go_duration(0), "0s");
    assert_eq!(go_duration(1_500_000_000), "1.5s");
    assert_eq!(go_duration(3_600_000_000_000 + 120_000_000_000), "1h2m0s");
    assert_eq!(go_duration(2_500_000), "2.5ms");
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"a"), "YQ==");
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b"abc"), "YWJj");
}

#[test]
fn every_served_kind_has_a_message_in_the_schema() {
    for r in crate::resources::RESOURCES {
        let api_version = if r.group.is_empty() {
            r.version.to_owned()
        } else {
            format!("{}/{}", r.group, r.version)
        };
        let m = message_for(&api_version, r.kind);
        assert!(SCHEMA.contains_key(m.as_str()), "{} → {m}", r.kind);
    }
}
