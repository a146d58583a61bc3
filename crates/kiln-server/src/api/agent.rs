//! What kiln's agent calls: `POST /api/v1/discovery` (discovery mode's
//! inventory report) and `GET /api/v1/jobs/{id}/plan` (deploy mode's
//! instructions). Neither takes an API token: the discovery report carries
//! the discovery token of the NIC it booted from, the plan its job's token,
//! both given to the agent on its kernel command line by HTTP boot.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use chrono::Utc;
use kiln_store::{Actor, NewMachine, StoreError, TokenUse};
use kiln_types::agent::{DeployPlan, DiscoveryReport, DiscoveryResult, ExpectedIdentity, ImageSource};
use kiln_types::catalog::StorageLayout;
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::job::ReimageSpec;
use kiln_types::machine::{Machine, MachineCreate, MachinePatch, MachineState, Nic};
use kiln_types::{JobId, MacAddr};

use super::extract::{parse_json, read_bounded};
use crate::AppState;
use crate::auth::bearer_token;
use crate::boot_http::{base_url, is_real_serial};
use crate::discovery::{
    DiscoveryClaims, Found, MAX_REPORT_BYTES, MAX_REPORT_NICS, Refusal, TokenError, Verdict, is_waiting, judge,
    may_complete_by_dmi,
};
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
    let (net, _) = state.store.get_machine_network(machine.id).await?;
    Ok(Json(DeployPlan {
        job_id: id,
        hostname: spec.hostname.clone(),
        identity: ExpectedIdentity {
            serial: dmi.and_then(|d| d.serial.clone()),
            uuid: dmi.and_then(|d| d.uuid.clone()),
            disk_serials: hw
                .map(|h| h.disks.iter().filter_map(|d| d.serial.clone()).collect())
                .unwrap_or_default(),
            macs: machine.nics.iter().filter_map(|n| n.mac).collect(),
        },
        protected: machine.protected,
        image: ImageSource {
            url,
            format: image.format,
            sha256,
            content: image.content,
        },
        layout: spec.layout.unwrap_or(StorageLayout::Flat),
        root_password_hash: spec.root_password_hash,
        ssh_keys: spec.ssh_keys,
        user_data_url: files("user-data"),
        meta_data_url: files("meta-data"),
        network_config_url: (!net.is_empty()).then(|| files("network-config")),
        stage_url: format!("{base}/api/v1/jobs/{id}/stages"),
        system_disk: machine.system_disk.clone(),
    }))
}

/// A discovery agent's report: creates the machine it booted on (its MAC
/// and DMI unknown), or completes one waiting for discovery (`new` never
/// inventoried, or `discovering`; unowned, unprotected) and makes it
/// `ready`. It never changes a machine that is ready, deployed, owned or
/// protected: such a report is refused (409) and recorded as the audit
/// event `security.discovery_refused`. The token, from the `Authorization`
/// header, is checked before the body is read; the body is at most 1 MiB.
#[utoipa::path(post, path = "/api/v1/discovery", tag = "agent", request_body = DiscoveryReport,
    responses((status = 200, body = DiscoveryResult), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody, description = "no discovery token, not one kiln issued, expired, or issued to another MAC"),
        (status = 409, body = ErrorBody, description = "the token was used already, or the report may not change the machine it names"),
        (status = 413, body = ErrorBody, description = "the report is larger than 1 MiB")),
    security(("discovery_token" = [])))]
pub async fn discovery(State(state): State<AppState>, request: Request) -> ApiResult<Json<DiscoveryResult>> {
    let (parts, body) = request.into_parts();
    let client = crate::peer::client_ip(&parts);
    let token = bearer_token(&parts.headers).ok_or_else(|| {
        ApiError::unauthorized("a discovery report needs the discovery token from the kernel command line")
    })?;
    let claims = match state.secrets.check_discovery_token(token, Utc::now()) {
        Ok(c) => c,
        Err(e @ TokenError::Invalid) => {
            // Not audited: anyone can send garbage, and the audit log is
            // not theirs to fill. Only tokens kiln issued are.
            tracing::warn!(%client, "discovery report with a token kiln did not issue");
            return Err(ApiError::unauthorized(e.to_string()));
        }
        Err(e @ TokenError::Expired(_)) => {
            let TokenError::Expired(c) = &e else { unreachable!() };
            let refusal = Refusal {
                public: e.to_string(),
                why: "expired token".into(),
                machine: None,
            };
            audit(&state, client, c, None, &refusal).await;
            return Err(ApiError::unauthorized(refusal.public));
        }
    };
    let bytes = read_bounded(&parts.headers, body, MAX_REPORT_BYTES, "a discovery report").await?;
    let report: DiscoveryReport =
        parse_json(&bytes).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    let refused = |why: &str, public: String| Refusal {
        public,
        why: why.into(),
        machine: None,
    };
    if report.boot_mac != claims.mac {
        let r = refused(
            "token issued to another MAC",
            format!(
                "this discovery token was issued to {}, not to the report's boot MAC {}",
                claims.mac, report.boot_mac
            ),
        );
        audit(&state, client, &claims, Some(&report), &r).await;
        return Err(ApiError::unauthorized(r.public));
    }
    if report.hardware.nics.len() > MAX_REPORT_NICS {
        return Err(ApiError::bad_request(format!(
            "the report lists {} NICs: a discovery report lists at most {MAX_REPORT_NICS}",
            report.hardware.nics.len()
        )));
    }
    if let TokenUse::Replay { used_at } = state
        .store
        .use_discovery_token(&claims.nonce, claims.mac, claims.expires_at)
        .await?
    {
        let r = refused(
            "token replayed",
            format!(
                "this discovery token already carried a report, at {}: a token is good for one report (if that \
                 report's answer was lost, it was still recorded); net-boot the machine again for a fresh token",
                used_at.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        );
        audit(&state, client, &claims, Some(&report), &r).await;
        return Err(ApiError::refused(r.public));
    }
    match apply(&state, &claims, &report).await {
        Ok(Applied::Done(machine, created)) => {
            tracing::info!(machine = %machine.hostname, mac = %report.boot_mac, created, "discovered");
            Ok(Json(DiscoveryResult {
                machine_id: machine.id,
                hostname: machine.hostname.clone(),
                state: machine.state,
                created,
            }))
        }
        Ok(Applied::Refused(r)) => {
            audit(&state, client, &claims, Some(&report), &r).await;
            Err(ApiError::refused(r.public))
        }
        Err(e) => {
            // The server's own failure: the agent retries on 5xx, with the
            // same token, which must not then read as a replay.
            if e.status().is_server_error()
                && let Err(release) = state.store.release_discovery_token(&claims.nonce).await
            {
                tracing::error!(error = %release, "cannot release a discovery token after a failed report");
            }
            Err(e)
        }
    }
}

/// A security audit event for a refused report whose token kiln issued.
/// Failing to write it is logged, and the refusal stands.
async fn audit(
    state: &AppState,
    client: std::net::IpAddr,
    claims: &DiscoveryClaims,
    report: Option<&DiscoveryReport>,
    refusal: &Refusal,
) {
    let dmi = report.and_then(|r| r.hardware.dmi.as_ref());
    let detail = serde_json::json!({
        "mac": report.map(|r| r.boot_mac).unwrap_or(claims.mac).to_string(),
        "token_mac": claims.mac.to_string(),
        "token_port": claims.port,
        "claimed_serial": dmi.and_then(|d| d.serial.as_deref()),
        "claimed_uuid": dmi.and_then(|d| d.uuid.as_deref()),
        "client": client.to_string(),
        "reason": refusal.why,
    });
    let machine = match refusal.machine {
        Some(id) => state.store.get_machine(&id.to_string(), None).await.ok(),
        None => None,
    };
    let (kind, id, name) = match &machine {
        Some(m) => ("machine", m.id.to_string(), m.hostname.to_string()),
        None => ("discovery", claims.mac.to_string(), claims.mac.to_string()),
    };
    tracing::warn!(mac = %claims.mac, %client, reason = %refusal.why, target = %name, "discovery report refused");
    let actor = Actor::new(format!("discovery ({} from {client})", claims.mac));
    if let Err(e) = state
        .store
        .record_event(&actor, "security.discovery_refused", kind, id, name, detail)
        .await
    {
        tracing::error!(error = %e, "cannot record a refused discovery report");
    }
}

enum Applied {
    Done(Box<Machine>, bool),
    Refused(Refusal),
}

/// Looks up what the report claims, judges it, and writes what the rules
/// allow: the rules are checked again on the machine's row inside the
/// write, so a change made meanwhile (an operator making it ready, a
/// tenant taking it) wins.
async fn apply(state: &AppState, claims: &DiscoveryClaims, report: &DiscoveryReport) -> ApiResult<Applied> {
    let actor = Actor::new(format!("discovery ({})", report.boot_mac));
    let dmi = report.hardware.dmi.as_ref();
    let by_mac = state.store.find_machine_by_nic(report.boot_mac, None, None).await?;
    let by_dmi = state
        .store
        // Placeholders ("To be filled by O.E.M.", a nil UUID) name no one
        // machine: matching by them would refuse (or, before issue 14,
        // merge) every other machine of the same product line.
        .find_machine_by_dmi(
            dmi.and_then(|d| d.uuid.as_deref())
                .filter(|u| u.parse::<uuid::Uuid>().is_ok_and(|u| !u.is_nil() && !u.is_max())),
            dmi.and_then(|d| d.serial.as_deref()).filter(|s| is_real_serial(s)),
        )
        .await?;
    let mut nic_holders = vec![];
    for n in &report.hardware.nics {
        if n.mac == report.boot_mac {
            continue;
        }
        if let Some(m) = state.store.find_machine_by_nic(n.mac, None, None).await? {
            nic_holders.push((n.mac, m.id));
        }
    }
    let found = Found {
        by_mac: by_mac.as_ref(),
        by_dmi: by_dmi.as_ref(),
        nic_holders,
    };
    let result = match judge(report, claims, &found) {
        Verdict::Refuse(r) => return Ok(Applied::Refused(r)),
        Verdict::Create => create(state, &actor, report).await.map(|m| (m, true)),
        Verdict::Update(id) => {
            let m = [by_mac.as_ref(), by_dmi.as_ref()]
                .into_iter()
                .flatten()
                .find(|m| m.id == id)
                .expect("judge names a machine it was given");
            // Found by its boot MAC, or completed by DMI alone: the rule
            // that let it through is the one checked again in the write.
            let rule: fn(&Machine) -> bool = if by_mac.is_some() {
                is_waiting
            } else {
                may_complete_by_dmi
            };
            update(state, &actor, m, report, rule).await.map(|m| (m, false))
        }
    };
    match result {
        Ok((m, created)) => Ok(Applied::Done(Box::new(m), created)),
        // The guard, on the row as it is now.
        Err(StoreError::Refused(why)) => Ok(Applied::Refused(Refusal {
            public: "the machine this report names is no longer waiting for discovery: nothing was changed".into(),
            why,
            machine: by_mac.as_ref().or(by_dmi.as_ref()).map(|m| m.id),
        })),
        // A uniqueness clash (a NIC or address another machine holds): its
        // message names that machine, which the caller may not see.
        Err(StoreError::Rows { details, .. }) => Ok(Applied::Refused(Refusal {
            public: "the report clashes with the inventory (a NIC, address or name another machine holds): \
                     nothing was changed"
                .into(),
            why: details.into_iter().map(|d| d.message).collect::<Vec<_>>().join("; "),
            machine: by_mac.as_ref().or(by_dmi.as_ref()).map(|m| m.id),
        })),
        Err(StoreError::Conflict(why)) => Ok(Applied::Refused(Refusal {
            public: "the report clashes with the inventory: nothing was changed".into(),
            why,
            machine: by_mac.as_ref().or(by_dmi.as_ref()).map(|m| m.id),
        })),
        Err(other) => Err(other.into()),
    }
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
        if !out.iter().any(|n| n.mac == Some(mac)) {
            let name = report
                .hardware
                .nics
                .iter()
                .find(|n| n.mac == mac)
                .map(|n| n.name.clone());
            out.push(Nic {
                name,
                ..Nic::with_mac(mac)
            });
        }
    }
    for n in &report.lldp {
        if let Some(nic) = out.iter_mut().find(|x| x.mac == Some(n.mac)) {
            nic.switch = Some(n.switch.clone());
            nic.port = Some(n.port.clone());
        }
    }
    out
}

async fn update(
    state: &AppState,
    actor: &Actor,
    m: &Machine,
    report: &DiscoveryReport,
    rule: fn(&Machine) -> bool,
) -> Result<Machine, StoreError> {
    let patch = MachinePatch {
        hardware: Some(Some(report.hardware.clone())),
        nics: Some(nics(&m.nics, report)),
        state: Some(MachineState::Ready),
        // What the machine says it booted with wins over what an operator
        // guessed; an older agent that does not say keeps the record.
        firmware: report.firmware.map(Some),
        ..Default::default()
    };
    let guard = |now: &Machine| {
        if rule(now) {
            Ok(())
        } else {
            Err(format!(
                "changed while the report was judged: {} is {}",
                now.hostname, now.state
            ))
        }
    };
    state
        .store
        .update_machine_if(actor, &m.id.to_string(), patch, None, None, &guard)
        .await
}

async fn create(state: &AppState, actor: &Actor, report: &DiscoveryReport) -> Result<Machine, StoreError> {
    let hex: String = report.boot_mac.to_string().chars().filter(|c| *c != ':').collect();
    let mut spec = MachineCreate::new(
        format!("node-{hex}")
            .parse()
            .map_err(|e| StoreError::Invalid(format!("{e}")))?,
    );
    spec.state = MachineState::Ready;
    spec.hardware = Some(report.hardware.clone());
    spec.firmware = report.firmware;
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
        .await?;
    Ok(made.remove(0))
}
