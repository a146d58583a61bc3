//! What kiln's agent calls: `POST /api/v1/discovery` (discovery mode's
//! inventory report) and `GET /api/v1/jobs/{id}/plan` (deploy mode's
//! instructions). Neither takes an API token: the discovery report carries
//! the discovery token of the NIC it booted from, the plan its job's token,
//! both given to the agent on its kernel command line by HTTP boot.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use kiln_store::{Actor, NewMachine, StoreError};
use kiln_types::agent::{DeployPlan, DiscoveryReport, DiscoveryResult, ExpectedIdentity, ImageFormat, ImageSource};
use kiln_types::catalog::StorageLayout;
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::job::ReimageSpec;
use kiln_types::machine::{Machine, MachineCreate, MachinePatch, MachineState, Nic};
use kiln_types::{JobId, MacAddr};

use super::extract::ApiJson;
use crate::AppState;
use crate::auth::bearer_token;
use crate::boot_http::base_url;
use crate::error::{ApiError, ApiResult};

/// The deploy plan of reimage job `id`, for its agent.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/plan", tag = "agent",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = DeployPlan), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job has ended, or is past its install")),
    security(("job_token" = [])))]
pub async fn plan(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<DeployPlan>> {
    let id: JobId = id
        .parse()
        .map_err(|_| ApiError::not_found(format!("job `{id}` not found")))?;
    let token = bearer_token(&headers)
        .ok_or_else(|| ApiError::unauthorized("the plan needs the job's token: `Authorization: Bearer TOKEN`"))?;
    if !state.secrets.check_job_token(id, token) {
        return Err(ApiError::unauthorized(format!("that is not the token of job {id}")));
    }
    let job = state.store.get_job(id).await?;
    if job.state.is_final() {
        return Err(ApiError::refused(format!(
            "job {id} has ended ({}): there is nothing to write",
            job.state
        )));
    }
    let spec: ReimageSpec = serde_json::from_value(job.spec.clone())
        .map_err(|_| ApiError::not_found(format!("job {id} is not a reimage")))?;
    let machine_id = job
        .machine_id
        .ok_or_else(|| ApiError::refused("the job's machine was deleted"))?;
    let machine = state.store.get_machine(&machine_id.to_string(), None).await?;
    let image = state.store.get_os_image(&spec.os_image).await?;
    let sha256 = image.sha256.clone().ok_or_else(|| {
        ApiError::refused(format!(
            "OS image {} has no sha256: kiln writes no image it cannot verify",
            spec.os_label
        ))
    })?;
    let base = base_url(&state.boot, &headers);
    let url = if image.source.starts_with("http://") || image.source.starts_with("https://") {
        image.source.clone()
    } else {
        format!("{base}/boot/file/{}", image.source.trim_start_matches('/'))
    };
    let hw = machine.hardware.as_ref();
    let dmi = hw.and_then(|h| h.dmi.as_ref());
    let files = |kind: &str| format!("{base}/boot/job/{id}/{kind}?token={token}");
    Ok(Json(DeployPlan {
        job_id: id,
        hostname: spec.hostname.clone(),
        identity: ExpectedIdentity {
            serial: dmi.and_then(|d| d.serial.clone()),
            uuid: dmi.and_then(|d| d.uuid.clone()),
            disk_serials: hw
                .map(|h| h.disks.iter().filter_map(|d| d.serial.clone()).collect())
                .unwrap_or_default(),
        },
        protected: machine.protected,
        image: ImageSource {
            url,
            format: ImageFormat::from_source(&image.source),
            sha256,
        },
        layout: spec.layout.unwrap_or(StorageLayout::Flat),
        root_password_hash: spec.root_password_hash,
        ssh_keys: spec.ssh_keys,
        user_data_url: files("user-data"),
        meta_data_url: files("meta-data"),
        stage_url: format!("{base}/api/v1/jobs/{id}/stages"),
    }))
}

/// A discovery agent's report: the machine it booted on is created (its
/// MAC and DMI unknown) or updated (hardware inventory, switch ports from
/// LLDP), and a `new` or `discovering` machine becomes `ready`.
#[utoipa::path(post, path = "/api/v1/discovery", tag = "agent", request_body = DiscoveryReport,
    responses((status = 200, body = DiscoveryResult), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("discovery_token" = [])))]
pub async fn discovery(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(report): ApiJson<DiscoveryReport>,
) -> ApiResult<Json<DiscoveryResult>> {
    let token = bearer_token(&headers).ok_or_else(|| {
        ApiError::unauthorized("a discovery report needs the discovery token from the kernel command line")
    })?;
    if !state.secrets.check_discovery_token(report.boot_mac, token) {
        return Err(ApiError::unauthorized(format!(
            "that is not the discovery token of {}",
            report.boot_mac
        )));
    }
    let actor = Actor::new(format!("discovery ({})", report.boot_mac));
    let dmi = report.hardware.dmi.as_ref();
    let known = match state.store.find_machine_by_nic(report.boot_mac, None, None).await? {
        Some(m) => Some(m),
        None => {
            state
                .store
                .find_machine_by_dmi(
                    dmi.and_then(|d| d.uuid.as_deref()),
                    dmi.and_then(|d| d.serial.as_deref()),
                )
                .await?
        }
    };
    let (machine, created) = match known {
        Some(m) => (update(&state, &actor, m, &report).await?, false),
        None => (create(&state, &actor, &report).await?, true),
    };
    tracing::info!(machine = %machine.hostname, mac = %report.boot_mac, created, "discovered");
    Ok(Json(DiscoveryResult {
        machine_id: machine.id,
        hostname: machine.hostname,
        state: machine.state,
        created,
    }))
}

/// The NICs of `report` (those with a MAC, plus the boot NIC), with the
/// switch ports LLDP saw, merged over `existing`.
fn nics(existing: &[Nic], report: &DiscoveryReport) -> Vec<Nic> {
    let mut out: Vec<Nic> = existing.to_vec();
    let mut macs: Vec<MacAddr> = report.hardware.nics.iter().map(|n| n.mac).collect();
    if !macs.contains(&report.boot_mac) {
        macs.insert(0, report.boot_mac);
    }
    for mac in macs {
        if !out.iter().any(|n| n.mac == mac) {
            let name = report
                .hardware
                .nics
                .iter()
                .find(|n| n.mac == mac)
                .map(|n| n.name.clone());
            out.push(Nic {
                mac,
                name,
                switch: None,
                port: None,
                vlan: None,
                circuit_id: None,
                remote_id: None,
            });
        }
    }
    for n in &report.lldp {
        if let Some(nic) = out.iter_mut().find(|x| x.mac == n.mac) {
            nic.switch = Some(n.switch.clone());
            nic.port = Some(n.port.clone());
        }
    }
    out
}

async fn update(state: &AppState, actor: &Actor, m: Machine, report: &DiscoveryReport) -> ApiResult<Machine> {
    let patch = MachinePatch {
        hardware: Some(Some(report.hardware.clone())),
        nics: Some(nics(&m.nics, report)),
        state: matches!(m.state, MachineState::New | MachineState::Discovering).then_some(MachineState::Ready),
        ..Default::default()
    };
    Ok(state
        .store
        .update_machine(actor, &m.id.to_string(), patch, None, None)
        .await?)
}

async fn create(state: &AppState, actor: &Actor, report: &DiscoveryReport) -> ApiResult<Machine> {
    let hex: String = report.boot_mac.to_string().chars().filter(|c| *c != ':').collect();
    let mut spec = MachineCreate::new(
        format!("node-{hex}")
            .parse()
            .map_err(|e| ApiError::bad_request(format!("{e}")))?,
    );
    spec.state = MachineState::Ready;
    spec.hardware = Some(report.hardware.clone());
    spec.nics = nics(&[], report);
    let mut made = state
        .store
        .create_machines(
            actor,
            vec![NewMachine {
                spec,
                sealed_password: None,
            }],
        )
        .await
        .map_err(|e| match e {
            StoreError::Rows { details, .. } => {
                ApiError::conflict(details.into_iter().map(|d| d.message).collect::<Vec<_>>().join("; "))
            }
            other => other.into(),
        })?;
    Ok(made.remove(0))
}
