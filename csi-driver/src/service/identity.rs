//! CSI Identity service.

use std::sync::Arc;

use bpfman_csi::v1 as csi;
use csi::plugin_capability::{
    Service, Type as CapType, VolumeExpansion, service, volume_expansion,
};
use tonic::{Request, Response, Status};

use super::{DRIVER_NAME, Driver};

/// Identity: name, version, capabilities, readiness.
#[derive(Debug, Clone)]
pub struct IdentityService(pub Arc<Driver>);

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: [("backends".to_string(), "local".to_string())].into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let mut caps = vec![
            CapType::Service(Service {
                r#type: service::Type::VolumeAccessibilityConstraints as i32,
            }),
            CapType::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            }),
        ];
        if self.0.roles.controller {
            caps.push(CapType::Service(Service {
                r#type: service::Type::ControllerService as i32,
            }));
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|c| csi::PluginCapability { r#type: Some(c) })
                .collect(),
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready when the state directory answers.
        let local = self.0.local.clone();
        let ok = tokio::task::spawn_blocking(move || local.list_snapshots().is_ok())
            .await
            .unwrap_or(false);
        if !ok {
            return Err(Status::failed_precondition(
                "the state directory cannot be read",
            ));
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
