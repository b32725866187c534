//! A bounded fuzz run of the API server's request handling: request decoding (JSON, YAML,
//! Kubernetes protobuf, garbage), every patch type (merge, strategic merge, JSON patch, apply)
//! and the subresources, through the real router over a real (in-memory) store, as an admin.
//! Whatever comes in, the answer is a well-formed response — never a panic, never a 5xx — an
//! error is a Kubernetes `Status` with its code, and the server goes on serving.
//!
//! It runs on the stable toolchain with proptest (libFuzzer needs nightly), so CI runs it for a
//! bounded number of cases: `WEFT_FUZZ_CASES` (default 3000, about two seconds).

use std::sync::Arc;

use axum::body::Body;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use weft_control::{auth, resources, server, store};

const TOKEN: &str = "fuzz-admin";

fn api() -> axum::Router {
    let store = store::Store::open(store::Options::default()).expect("a memory store");
    let find = |g: &str, v: &str, p: &str| resources::find(g, v, p).expect("served");
    for (r, ns, o) in [
        (
            find("", "v1", "configmaps"),
            "default",
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}}),
        ),
        (
            find("", "v1", "pods"),
            "default",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
                   "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80}]}]}}),
        ),
        (
            find("apps", "v1", "deployments"),
            "default",
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                   "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                            "template": {"metadata": {"labels": {"a": "b"}},
                                         "spec": {"containers": [{"name": "c", "image": "i"}]}}}}),
        ),
        (
            find("", "v1", "nodes"),
            "",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"}}),
        ),
    ] {
        store.create(r, ns, o).expect("seed");
    }
    let mut a = auth::Authenticator::new();
    a.add(TOKEN, auth::Identity::new("fuzz", &[auth::MASTERS]));
    server::router(
        Arc::new(store),
        Arc::new(a),
        None,
        server::Limits::default(),
    )
}

const PATHS: &[&str] = &[
    "/api/v1/namespaces/default/configmaps",
    "/api/v1/namespaces/default/configmaps/c",
    "/api/v1/namespaces/default/pods",
    "/api/v1/namespaces/default/pods/p",
    "/api/v1/namespaces/default/pods/p/status",
    "/api/v1/namespaces/default/pods/p/binding",
    "/api/v1/namespaces/default/pods/p/eviction",
    "/apis/apps/v1/namespaces/default/deployments/d",
    "/apis/apps/v1/namespaces/default/deployments/d/scale",
    "/apis/apps/v1/namespaces/default/deployments/d/status",
    "/api/v1/nodes/n",
    "/api/v1/namespaces/default/services",
    "/api/v1/namespaces",
    "/apis/batch/v1/namespaces/default/jobs",
];

const TYPES: &[&str] = &[
    "application/json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
    "application/vnd.kubernetes.protobuf",
    "application/yaml",
    "text/plain",
];

const QUERIES: &[&str] = &[
    "",
    "?fieldManager=fuzz",
    "?fieldManager=fuzz&force=true",
    "?fieldValidation=Strict",
    "?labelSelector=a%3Db",
    "?fieldSelector=metadata.name%3Dp",
    "?labelSelector=%21%21",
    "?propagationPolicy=Foreground",
    "?gracePeriodSeconds=0",
    "?resourceVersion=abc",
];

/// Keys that mean something somewhere in an object or a patch.
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "resourceVersion",
    "finalizers",
    "ownerReferences",
    "spec",
    "status",
    "replicas",
    "containers",
    "ports",
    "containerPort",
    "image",
    "selector",
    "matchLabels",
    "template",
    "data",
    "op",
    "path",
    "value",
    "from",
    "$patch",
    "$retainKeys",
    "$setElementOrder/containers",
    "$deleteFromPrimitiveList/finalizers",
    "target",
    "deleteOptions",
    "propagationPolicy",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop::sample::select(KEYS).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        prop::sample::select(
            &[
                "replace",
                "add",
                "remove",
                "move",
                "copy",
                "test",
                "/metadata/labels/x",
                "/spec/containers/0",
                "/spec/replicas",
                "/-",
                "~1",
                "delete",
                "merge",
                "v1",
                "Pod",
            ][..]
        )
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        // Protobuf's envelope ("k8s\0") with random content.
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|mut b| {
            let mut v = b"k8s\0".to_vec();
            v.append(&mut b);
            v
        }),
    ]
}

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    content_type: &'static str,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(&["GET", "POST", "PUT", "PATCH", "DELETE"][..]),
        prop::sample::select(PATHS),
        prop::sample::select(QUERIES),
        prop::sample::select(TYPES),
        body(),
    )
        .prop_map(|(method, path, query, content_type, body)| Req {
            method,
            path: format!("{path}{query}"),
            content_type,
            body,
        })
}

async fn send(api: &axum::Router, r: &Req) -> (u16, Vec<u8>) {
    let req = axum::http::Request::builder()
        .method(r.method)
        .uri(&r.path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", r.content_type)
        .body(Body::from(r.body.clone()))
        .expect("a request");
    let answer = api.clone().oneshot(req).await.expect("infallible");
    let code = answer.status().as_u16();
    let bytes = axum::body::to_bytes(answer.into_body(), 16 << 20)
        .await
        .expect("a body");
    (code, bytes.to_vec())
}

#[test]
fn any_request_gets_a_well_formed_answer_and_the_server_goes_on() {
    let cases: u32 = std::env::var("WEFT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let api = api();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let outcome = runner.run(&request(), |r| {
        let (code, body) = rt.block_on(send(&api, &r));
        prop_assert!(
            code < 500,
            "{r:?} got {code}: {}",
            String::from_utf8_lossy(&body)
        );
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            TestCaseError::fail(format!(
                "{r:?}: the answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            ))
        })?;
        if code >= 400 {
            prop_assert_eq!(&v["kind"], "Status", "{:?}", r);
            prop_assert_eq!(v["code"].as_u64(), Some(u64::from(code)), "{:?}", r);
        }
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    // Still serving: the seeded ConfigMap (or its successor) answers or is cleanly gone.
    let (code, _) = rt.block_on(send(
        &api,
        &Req {
            method: "GET",
            path: "/api/v1/namespaces/default/configmaps".into(),
            content_type: "application/json",
            body: Vec::new(),
        },
    ));
    assert_eq!(code, 200);
}
