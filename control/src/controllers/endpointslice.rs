//! The EndpointSlice controller: for every Service with a selector, the pods it selects as
//! endpoints (address, `nodeName`, `targetRef`, the `ready`/`serving`/`terminating`
//! conditions) with the Service's ports resolved against each pod's container ports (named
//! target ports included), in slices of at most 100 endpoints per port mapping, labelled
//! `kubernetes.io/service-name` and owned by the Service. The legacy Endpoints object is kept
//! beside them. A pod that turns unready or starts terminating stops being `ready` at once,
//! which is what weft-proxy stops sending to.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, ObjectReference,
            Pod, Service,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};

use super::{Ctx, Error, drive, not_found, owner_ref, replicaset::is_ready, retry};
use crate::selector::LabelSelector;

const COMPONENT: &str = "endpointslice-controller";
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGER: &str = "endpointslice-controller.k8s.io";
const SERVICE_NAME: &str = "kubernetes.io/service-name";
const MAX_ENDPOINTS: usize = 100;

/// Runs the controller until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    let c = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let services = c.store();
    let c = c
        .owns(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default(),
            move |pod: Pod| {
                // Every Service of the pod's namespace: one the pod stopped matching must drop it.
                let ns = pod.namespace();
                services
                    .state()
                    .into_iter()
                    .filter(|s| {
                        s.namespace() == ns && s.spec.as_ref().is_some_and(|s| s.selector.is_some())
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, retry, ctx);
    drive(COMPONENT, c).await;
}

/// The port a Service port reaches on `pod` (a named target port looked up among its
/// containers' ports), if any.
fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<i32> {
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find_map(|p| {
                    (p.name.as_deref() == Some(name)
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then_some(p.container_port)
                })
        }
    }
}

/// The pods' endpoints grouped by their resolved ports.
/// Service ports resolved for a group of pods: (name, protocol, port).
type PortMapping = Vec<(Option<String>, String, i32)>;

fn endpoints<'a>(
    svc: &Service,
    pods: &'a [Pod],
) -> BTreeMap<PortMapping, Vec<(Endpoint, &'a Pod)>> {
    let spec = svc.spec.clone().unwrap_or_default();
    let publish_unready = spec.publish_not_ready_addresses == Some(true);
    let mut groups: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for pod in pods {
        let Some(ip) = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty())
        else {
            continue;
        };
        if matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let serving = is_ready(pod);
        let ports: Vec<_> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone(),
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    target_port(p, pod)?,
                ))
            })
            .collect();
        let endpoint = Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready: Some(publish_unready || (serving && !terminating)),
                serving: Some(publish_unready || serving),
                terminating: Some(terminating),
            }),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                namespace: pod.namespace(),
                uid: pod.uid(),
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        };
        groups.entry(ports).or_default().push((endpoint, pod));
    }
    groups
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some(selector_map) = svc.spec.as_ref().and_then(|s| s.selector.clone()) else {
        return Ok(Action::await_change());
    };
    if svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let selector = LabelSelector::from_api(Some(
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some(selector_map),
            match_expressions: None,
        },
    ))
    .map_err(|e| Error::Invalid(format!("service {name}: {e}")))?;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Vec<Pod> = if selector.is_empty() {
        Vec::new()
    } else {
        pods_api
            .list(&ListParams::default().labels(&selector.to_string()))
            .await?
            .items
    };
    let groups = endpoints(&svc, &pods);
    let mut desired: Vec<EndpointSlice> = Vec::new();
    for (ports, eps) in &groups {
        for chunk in eps.chunks(MAX_ENDPOINTS) {
            desired.push(EndpointSlice {
                metadata: ObjectMeta::default(),
                address_type: "IPv4".into(),
                endpoints: chunk.iter().map(|(e, _)| e.clone()).collect(),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, proto, port)| EndpointPort {
                            name: n.clone(),
                            protocol: Some(proto.clone()),
                            port: Some(*port),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            });
        }
    }
    let slices_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = slices_api
        .list(
            &ListParams::default().labels(&format!("{SERVICE_NAME}={name},{MANAGED_BY}={MANAGER}")),
        )
        .await?
        .items;
    let mut labels = BTreeMap::new();
    labels.insert(SERVICE_NAME.to_owned(), name.clone());
    labels.insert(MANAGED_BY.to_owned(), MANAGER.to_owned());
    let mut existing = existing.into_iter();
    for mut slice in desired {
        let meta = match existing.next() {
            Some(old) => {
                if old.endpoints == slice.endpoints
                    && old.ports == slice.ports
                    && old.address_type == slice.address_type
                {
                    continue;
                }
                old.metadata
            }
            None => ObjectMeta {
                generate_name: Some(format!("{}-", name.chars().take(57).collect::<String>())),
                namespace: Some(ns.clone()),
                labels: Some(labels.clone()),
                owner_references: Some(vec![owner_ref(&*svc)]),
                ..ObjectMeta::default()
            },
        };
        slice.metadata = meta;
        match slice.metadata.name.clone() {
            Some(n) => {
                slices_api
                    .replace(&n, &PostParams::default(), &slice)
                    .await?;
            }
            None => {
                slices_api.create(&PostParams::default(), &slice).await?;
            }
        }
    }
    for surplus in existing {
        match slices_api
            .delete(&surplus.name_any(), &DeleteParams::default())
            .await
        {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => {}
        }
    }
    write_endpoints(&ctx, &svc, &groups).await?;
    let _ = COMPONENT;
    Ok(Action::await_change())
}

/// The legacy Endpoints object of the Service (same name), from the same grouping.
async fn write_endpoints(
    ctx: &Ctx,
    svc: &Service,
    groups: &BTreeMap<PortMapping, Vec<(Endpoint, &Pod)>>,
) -> Result<(), Error> {
    let ns = svc.namespace().unwrap_or_default();
    let subsets: Vec<EndpointSubset> = groups
        .iter()
        .map(|(ports, eps)| {
            let address = |(e, pod): &(Endpoint, &Pod)| EndpointAddress {
                ip: e.addresses[0].clone(),
                node_name: e.node_name.clone(),
                target_ref: e.target_ref.clone(),
                hostname: pod.spec.as_ref().and_then(|s| s.hostname.clone()),
            };
            let ready = |(e, _): &&(Endpoint, &Pod)| {
                e.conditions.as_ref().and_then(|c| c.ready) == Some(true)
            };
            let addresses: Vec<_> = eps.iter().filter(ready).map(address).collect();
            let not_ready: Vec<_> = eps.iter().filter(|e| !ready(e)).map(address).collect();
            EndpointSubset {
                addresses: (!addresses.is_empty()).then_some(addresses),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, proto, port)| CorePort {
                            name: n.clone(),
                            protocol: Some(proto.clone()),
                            port: *port,
                            app_protocol: None,
                        })
                        .collect(),
                ),
            }
        })
        .collect();
    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    let mut object = Endpoints {
        metadata: ObjectMeta {
            name: Some(svc.name_any()),
            namespace: Some(ns.clone()),
            labels: svc.metadata.labels.clone(),
            owner_references: Some(vec![owner_ref(svc)]),
            ..ObjectMeta::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    };
    match api.get_opt(&svc.name_any()).await? {
        Some(old) if old.subsets == object.subsets => {}
        Some(old) => {
            object.metadata.resource_version = old.metadata.resource_version;
            api.replace(&svc.name_any(), &PostParams::default(), &object)
                .await?;
        }
        None => {
            api.create(&PostParams::default(), &object).await?;
        }
    }
    Ok(())
}
