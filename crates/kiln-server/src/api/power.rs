//! `/api/v1/machines/{key}/power`, `…/bootdev` and `…/bmc/check`: a
//! machine's BMC through the BMC service (deadline, one call per BMC,
//! maintenance after repeated authentication failures, audit).
//!
//! Roles: admins and operators on any machine. A tenant may read and
//! change the power of *its own* machines (another tenant's machine is
//! "not found") and set their next boot device *once*: a persistent boot
//! device, the BMC check and BMC discovery are operator tools (a
//! persistent device outlives the tenant's session with the machine, the
//! check shows the BMC's configuration). A net boot a tenant asks for
//! still gets only what the boot decision gives: without an armed job,
//! the machine is sent to its disk.

use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::machine::{Machine, MachinePatch, MachineState};
use kiln_types::power::{
    BmcCheck, BootDevice, BootDeviceRequest, BootDeviceResult, PowerAction, PowerRequest, PowerResult, PowerStatus,
};

use super::extract::ApiJson;
use crate::AppState;
use crate::auth::Caller;
use crate::bmc::{BmcCallError, Op, OpOutput, failed_check};
use crate::error::{ApiError, ApiResult};

#[utoipa::path(get, path = "/api/v1/machines/{key}/power", tag = "bmc",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, body = PowerStatus), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "no BMC, or in maintenance after BMC authentication failures"),
        (status = 502, body = ErrorBody, description = "the BMC failed or refused kiln's credentials"),
        (status = 504, body = ErrorBody, description = "the BMC did not answer within the deadline")),
    security(("bearer" = [])))]
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<PowerStatus>> {
    let machine = state.store.get_machine(&key, caller.scope()).await?;
    match state.bmc.call(&caller.actor(), machine.id, Op::Status).await? {
        OpOutput::Status(s) => Ok(Json(PowerStatus {
            hostname: machine.hostname.to_string(),
            state: s,
        })),
        other => Err(unexpected(other)),
    }
}

/// Carries out a power action. `on` and `off` may be repeated safely;
/// `cycle`, `reset` and `soft_off` are sent once: when their answer is lost
/// the error is `bmc_outcome_unknown`, and the caller reads the power state
/// before acting again.
#[utoipa::path(post, path = "/api/v1/machines/{key}/power", tag = "bmc",
    params(("key" = String, Path, description = "machine id or hostname")),
    request_body = PowerRequest,
    responses((status = 200, body = PowerResult), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "no BMC, or in maintenance after BMC authentication failures"),
        (status = 501, body = ErrorBody, description = "the driver cannot do this action"),
        (status = 502, body = ErrorBody, description = "the BMC failed or refused kiln's credentials"),
        (status = 504, body = ErrorBody, description = "no answer within the deadline (for cycle/reset/soft_off: outcome unknown)")),
    security(("bearer" = [])))]
pub async fn power(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<PowerRequest>,
) -> ApiResult<Json<PowerResult>> {
    let machine = state.store.get_machine(&key, caller.scope()).await?;
    let start = Instant::now();
    state
        .bmc
        .call(&caller.actor(), machine.id, Op::Power(req.action))
        .await?;
    Ok(Json(PowerResult {
        hostname: machine.hostname.to_string(),
        action: req.action,
        elapsed_ms: start.elapsed().as_millis() as u64,
    }))
}

/// Sets the next boot device (until changed, or `once`). `uefi_http` needs
/// `uefi: true`; a driver that cannot name a device answers 501.
#[utoipa::path(put, path = "/api/v1/machines/{key}/bootdev", tag = "bmc",
    params(("key" = String, Path, description = "machine id or hostname")),
    request_body = BootDeviceRequest,
    responses((status = 200, body = BootDeviceResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 501, body = ErrorBody, description = "the driver cannot set this device (uefi_http on ipmi)"),
        (status = 502, body = ErrorBody), (status = 504, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn bootdev(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<BootDeviceRequest>,
) -> ApiResult<Json<BootDeviceResult>> {
    let machine = state.store.get_machine(&key, caller.scope()).await?;
    if caller.scope().is_some() && !req.once {
        return Err(ApiError::forbidden(
            "`once`: a tenant token sets the boot device for the next boot only; send `once: true` \
             (a persistent boot device is for operators)",
        ));
    }
    req.validate().map_err(ApiError::bad_request)?;
    let start = Instant::now();
    let op = Op::BootDevice {
        device: req.device,
        once: req.once,
        uefi: req.uefi,
    };
    state.bmc.call(&caller.actor(), machine.id, op).await?;
    Ok(Json(BootDeviceResult {
        hostname: machine.hostname.to_string(),
        device: req.device,
        once: req.once,
        uefi: req.uefi,
        elapsed_ms: start.elapsed().as_millis() as u64,
    }))
}

/// Logs in to the BMC and reads what it can: reachability, whether kiln's
/// credentials work, the cipher suite (IPMI), power state and identity. A
/// BMC that fails is a report with `ok: false` and the error, not an HTTP
/// error; a failed login counts toward maintenance like any other.
#[utoipa::path(post, path = "/api/v1/machines/{key}/bmc/check", tag = "bmc",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, body = BmcCheck), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "no BMC, or in maintenance after BMC authentication failures")),
    security(("bearer" = [])))]
pub async fn check(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<BmcCheck>> {
    let machine = state.store.get_machine(&key, caller.scope()).await?;
    caller.require_operator()?;
    let start = Instant::now();
    match state.bmc.call(&caller.actor(), machine.id, Op::Check).await {
        Ok(OpOutput::Check(c)) => Ok(Json(c)),
        Ok(other) => Err(unexpected(other)),
        Err(BmcCallError::Bmc(f)) => Ok(Json(failed_check(&machine, &f, start.elapsed()))),
        Err(e) => Err(e.into()),
    }
}

/// Inventories a machine by net-booting kiln's discovery agent on it:
/// reads the identity its BMC knows (so the agent's report, which names
/// the machine by DMI, lands on this record even when kiln knows none of
/// its MACs), marks it `discovering`, sets "next boot: network, once" and
/// powers it off and on. The agent's report makes it `ready`, with its
/// hardware and NICs. Needs `[boot] discovery = true`.
///
/// Only for `new`, `discovering`, `ready` and `failed` machines that no
/// tenant owns and that are not protected: a deployed
/// machine runs an OS the agent's boot would interrupt (set its state to
/// `ready` first if that is meant), and a reimaging one belongs to its job.
#[utoipa::path(post, path = "/api/v1/machines/{key}/discover", tag = "bmc",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, body = Machine), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "no BMC, in maintenance, deployed or reimaging, owned or protected, discovery off, or no identity to match the report by"),
        (status = 502, body = ErrorBody), (status = 504, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn discover(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Machine>> {
    let machine = state.store.get_machine(&key, caller.scope()).await?;
    caller.require_operator()?;
    let name = machine.hostname.to_string();
    if !state.boot.settings.discovery {
        return Err(ApiError::refused(
            "discovery is off: set `discovery = true` in the server's [boot] section",
        ));
    }
    if !matches!(
        machine.state,
        MachineState::New | MachineState::Discovering | MachineState::Ready | MachineState::Failed
    ) {
        return Err(ApiError::refused(format!(
            "{name} is {}: discovery reboots it into the agent; for a deployed machine set its state \
             to ready first (`kiln machine edit {name} --state ready`) if that is meant",
            machine.state
        )));
    }
    // Discovery never changes a machine a tenant owns or that is protected
    // (issue 14): its agent's report would be refused, so do not reboot it.
    if let Some(owner) = &machine.owner {
        return Err(ApiError::refused(format!(
            "{name} is owned by {owner}: discovery never changes a tenant's machine; release it first \
             (`kiln machine edit {name} --owner -`) if its inventory must be taken again"
        )));
    }
    if machine.protected {
        return Err(ApiError::refused(format!(
            "{name} is protected: discovery never changes a protected machine; clear the flag first \
             (`kiln machine edit {name} --protected false`) if that is meant"
        )));
    }
    let actor = caller.actor();
    let identity = match state.bmc.call(&actor, machine.id, Op::Check).await? {
        OpOutput::Check(c) => c,
        other => return Err(unexpected(other)),
    };
    let mut hardware = machine.hardware.clone().unwrap_or_default();
    let mut dmi = hardware.dmi.clone().unwrap_or_default();
    dmi.serial = identity.serial.clone().or(dmi.serial);
    dmi.uuid = identity.uuid.clone().or(dmi.uuid);
    if dmi.serial.is_none() && dmi.uuid.is_none() && machine.nics.is_empty() {
        return Err(ApiError::refused(format!(
            "{name}'s BMC gives no serial or UUID and kiln knows none of its MACs: the agent's report \
             could not be matched to it; add its boot NIC (`kiln machine edit {name} --mac MAC`)"
        )));
    }
    hardware.dmi = Some(dmi);
    let patch = MachinePatch {
        hardware: Some(Some(hardware)),
        state: Some(MachineState::Discovering),
        ..Default::default()
    };
    let machine = state
        .store
        .update_machine(&actor, &machine.id.to_string(), patch, None, None)
        .await?;
    let boot = Op::BootDevice {
        device: BootDevice::Network,
        once: true,
        uefi: false,
    };
    for op in [boot, Op::Power(PowerAction::Off), Op::Power(PowerAction::On)] {
        state.bmc.call(&actor, machine.id, op).await?;
    }
    Ok(Json(machine))
}

fn unexpected(out: OpOutput) -> ApiError {
    let e = std::io::Error::other(format!("the BMC service answered {out:?}"));
    ApiError::internal(&e)
}
