//! `/api/v1/machines`: enroll, find, change and remove machines, and what a
//! machine can be reinstalled with.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_store::NewMachine;
use kiln_types::catalog::StorageLayout;
use kiln_types::error::{ApiError as ErrorBody, ErrorDetail};
use kiln_types::fit;
use kiln_types::machine::{
    BmcInput, Machine, MachineBulkCreate, MachineCreate, MachineFilter, MachineOffer, MachinePatch,
};
use kiln_types::page::Page;

use super::extract::{ApiJson, ApiQuery, parse_json};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, rows_error};

/// Most machines one bulk request may carry.
pub const MAX_BULK: usize = 20_000;

/// Parses the BMC's CA certificate(s), which `BmcInput::validate` checks
/// only for shape: a bad certificate is refused here, with its number,
/// rather than at the first BMC call.
fn check_ca_cert(bmc: &BmcInput) -> Result<(), String> {
    match &bmc.ca_cert {
        Some(pem) => kiln_bmc::redfish::cert::parse_ca_pem(pem)
            .map(|_| ())
            .map_err(|e| format!("bmc.ca_cert: {e}")),
        None => Ok(()),
    }
}

/// Checks a request record and seals its BMC password.
fn prepare(state: &AppState, index: Option<usize>, mut spec: MachineCreate) -> Result<NewMachine, Vec<ErrorDetail>> {
    let mut problems = spec.validate();
    if problems.is_empty()
        && let Some(bmc) = &spec.bmc
        && let Err(e) = check_ca_cert(bmc)
    {
        problems.push(e);
    }
    if !problems.is_empty() {
        return Err(problems
            .into_iter()
            .map(|message| ErrorDetail {
                index,
                field: None,
                message,
            })
            .collect());
    }
    let sealed = match spec.bmc.as_mut().and_then(|b| b.password.take()) {
        Some(pw) => Some(state.secrets.seal(&pw).map_err(|e| {
            vec![ErrorDetail {
                index,
                field: Some("bmc.password".into()),
                message: e.to_string(),
            }]
        })?),
        None => None,
    };
    Ok(NewMachine {
        spec,
        sealed_password: sealed,
    })
}

#[utoipa::path(post, path = "/api/v1/machines", tag = "machines",
    request_body = MachineCreate,
    responses((status = 201, body = Machine), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(spec): ApiJson<MachineCreate>,
) -> ApiResult<(StatusCode, Json<Machine>)> {
    caller.require_operator()?;
    let new = prepare(&state, None, spec).map_err(|d| rows_error(false, d))?;
    let mut created = state.store.create_machines(&caller.actor(), vec![new]).await?;
    Ok((StatusCode::CREATED, Json(created.remove(0))))
}

/// Creates every machine or none. Each bad row is reported with its index;
/// rows are parsed one by one so that one bad row hides no other.
#[utoipa::path(post, path = "/api/v1/machines/bulk", tag = "machines",
    request_body = MachineBulkCreate,
    responses((status = 201, body = Vec<Machine>), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn bulk_create(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Vec<Machine>>)> {
    caller.require_operator()?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        machines: Vec<serde_json::Value>,
    }
    let raw: Raw = parse_json(&body).map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))?;
    if raw.machines.is_empty() {
        return Err(ApiError::bad_request("`machines` is empty"));
    }
    if raw.machines.len() > MAX_BULK {
        return Err(ApiError::bad_request(format!(
            "{} machines in one request; the most is {MAX_BULK}: split the file",
            raw.machines.len()
        )));
    }
    let mut problems = vec![];
    let mut news = Vec::with_capacity(raw.machines.len());
    for (i, value) in raw.machines.into_iter().enumerate() {
        let spec: MachineCreate = match serde_path_to_error::deserialize(value) {
            Ok(s) => s,
            Err(e) => {
                let path = e.path().to_string();
                problems.push(ErrorDetail {
                    index: Some(i),
                    field: (path != ".").then_some(path),
                    message: e.into_inner().to_string(),
                });
                continue;
            }
        };
        match prepare(&state, Some(i), spec) {
            Ok(n) => news.push(n),
            Err(d) => problems.extend(d),
        }
    }
    if !problems.is_empty() {
        return Err(rows_error(false, problems));
    }
    let created = state.store.create_machines(&caller.actor(), news).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[utoipa::path(get, path = "/api/v1/machines", tag = "machines",
    params(MachineFilter),
    responses((status = 200, body = Page<Machine>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<MachineFilter>,
) -> ApiResult<Json<Page<Machine>>> {
    Ok(Json(state.store.list_machines(&filter, caller.scope()).await?))
}

#[utoipa::path(get, path = "/api/v1/machines/{key}", tag = "machines",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(State(state): State<AppState>, caller: Caller, Path(key): Path<String>) -> ApiResult<Json<Machine>> {
    Ok(Json(state.store.get_machine(&key, caller.scope()).await?))
}

#[utoipa::path(patch, path = "/api/v1/machines/{key}", tag = "machines",
    params(("key" = String, Path, description = "machine id or hostname")),
    request_body = MachinePatch,
    responses((status = 200, body = Machine), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(mut patch): ApiJson<MachinePatch>,
) -> ApiResult<Json<Machine>> {
    // Another tenant's machine is "not found" before it is "forbidden".
    state.store.get_machine(&key, caller.scope()).await?;
    caller.require_operator()?;
    if let Some(Some(bmc)) = &patch.bmc
        && let Err(e) = bmc.validate().and_then(|()| check_ca_cert(bmc))
    {
        return Err(ApiError::bad_request(e));
    }
    let sealed = match patch
        .bmc
        .as_mut()
        .and_then(|b| b.as_mut())
        .and_then(|b| b.password.take())
    {
        Some(pw) => Some(state.secrets.seal(&pw).map_err(|e| ApiError::internal(&e))?),
        None => None,
    };
    Ok(Json(
        state
            .store
            .update_machine(&caller.actor(), &key, patch, sealed, None)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/machines/{key}", tag = "machines",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "protected, or an active job")),
    security(("bearer" = [])))]
pub async fn delete(State(state): State<AppState>, caller: Caller, Path(key): Path<String>) -> ApiResult<StatusCode> {
    state.store.get_machine(&key, caller.scope()).await?;
    caller.require_operator()?;
    state.store.delete_machine(&caller.actor(), &key, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Accepts the MAC a flagged switch port showed (issue 15: the server
/// behind the port was swapped on purpose): the NIC on that port takes the
/// new MAC, the alert is cleared, and the machine may be installed again.
/// Audited as `machine.port_confirmed`.
#[utoipa::path(post, path = "/api/v1/machines/{key}/confirm-port", tag = "machines",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, body = Machine), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "no port alert to confirm, or another machine records the new MAC")),
    security(("bearer" = [])))]
pub async fn confirm_port(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<Machine>> {
    state.store.get_machine(&key, caller.scope()).await?;
    caller.require_operator()?;
    Ok(Json(state.store.confirm_port(&caller.actor(), &key, None).await?))
}

/// The OS images, tasks and layouts that fit this machine: what its
/// reinstall form offers.
#[utoipa::path(get, path = "/api/v1/machines/{key}/offer", tag = "machines",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, body = MachineOffer), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn offer(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<MachineOffer>> {
    let machine = state.store.get_machine(&key, caller.scope()).await?;
    let os_images = state
        .store
        .list_os_images()
        .await?
        .into_iter()
        .filter(|i| fit::os_image_fits(&machine, i).is_ok())
        .collect();
    let tasks = state
        .store
        .list_tasks()
        .await?
        .into_iter()
        .filter(|t| fit::task_fits(&machine, t).is_ok())
        .collect();
    let layouts = StorageLayout::ALL
        .iter()
        .filter(|l| fit::layout_fits(&machine, **l).is_ok())
        .map(|l| (*l).into())
        .collect();
    Ok(Json(MachineOffer {
        os_images,
        tasks,
        layouts,
    }))
}
