//! Subnets (operators only: they describe the whole network) and each
//! machine's interfaces, bonds, VLANs and addresses (operators set them; a
//! tenant reads its own machine's, and the network-config its new OS gets).
//! Every change is checked against kiln's own DHCP pools
//! ([`AppState::dhcp_pools`]) as well as the subnet's ranges.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::network::{MachineNetwork, Subnet, SubnetAssignment, SubnetCreate, SubnetDetail, SubnetPatch};

use super::extract::ApiJson;
use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;

#[utoipa::path(post, path = "/api/v1/subnets", tag = "network", request_body = SubnetCreate,
    responses((status = 201, body = Subnet), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_subnet(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(new): ApiJson<SubnetCreate>,
) -> ApiResult<(StatusCode, Json<Subnet>)> {
    caller.require_operator()?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_subnet(&caller.actor(), &new, &s.dhcp_pools).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/subnets", tag = "network",
    responses((status = 200, body = Vec<Subnet>)), security(("bearer" = [])))]
pub async fn list_subnets(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<Subnet>>> {
    caller.require_operator()?;
    Ok(Json(s.store.list_subnets().await?))
}

#[utoipa::path(get, path = "/api/v1/subnets/{key}", tag = "network",
    params(("key" = String, Path, description = "subnet name or id")),
    responses((status = 200, body = SubnetDetail), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_subnet(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<SubnetDetail>> {
    caller.require_operator()?;
    let subnet = s.store.get_subnet(&key).await?;
    let assignments = s
        .store
        .subnet_assignments(&key)
        .await?
        .into_iter()
        .map(|a| SubnetAssignment {
            address: a.address,
            machine: a.hostname,
        })
        .collect();
    Ok(Json(SubnetDetail { subnet, assignments }))
}

#[utoipa::path(patch, path = "/api/v1/subnets/{key}", tag = "network",
    params(("key" = String, Path, description = "subnet name or id")), request_body = SubnetPatch,
    responses((status = 200, body = Subnet), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_subnet(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(patch): ApiJson<SubnetPatch>,
) -> ApiResult<Json<Subnet>> {
    caller.require_operator()?;
    Ok(Json(
        s.store
            .update_subnet(&caller.actor(), &key, &patch, &s.dhcp_pools)
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/subnets/{key}", tag = "network",
    params(("key" = String, Path, description = "subnet name or id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "addresses are assigned in it")),
    security(("bearer" = [])))]
pub async fn delete_subnet(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_operator()?;
    s.store.delete_subnet(&caller.actor(), &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/machines/{key}/network", tag = "network",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, body = MachineNetwork), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_network(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<MachineNetwork>> {
    let machine = s.store.get_machine(&key, caller.scope()).await?;
    Ok(Json(s.store.get_machine_network(machine.id).await?.0))
}

/// Replaces the machine's network. A static address without `address`
/// gets its subnet's next free one, in the same transaction that records
/// it as this machine's.
#[utoipa::path(put, path = "/api/v1/machines/{key}/network", tag = "network",
    params(("key" = String, Path, description = "machine id or hostname")), request_body = MachineNetwork,
    responses((status = 200, body = MachineNetwork), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn set_network(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(net): ApiJson<MachineNetwork>,
) -> ApiResult<Json<MachineNetwork>> {
    // Another tenant's machine is "not found" before it is "forbidden".
    s.store.get_machine(&key, caller.scope()).await?;
    caller.require_operator()?;
    Ok(Json(
        s.store
            .set_machine_network(&caller.actor(), &key, caller.scope(), &net, &s.dhcp_pools)
            .await?,
    ))
}

/// The cloud-init network-config (v2, YAML) the machine's next install
/// gives its new OS; 404 when the machine has no network in the inventory
/// (the OS then keeps its own default).
#[utoipa::path(get, path = "/api/v1/machines/{key}/network-config", tag = "network",
    params(("key" = String, Path, description = "machine id or hostname")),
    responses((status = 200, content_type = "application/yaml", body = String), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn network_config(State(s): State<AppState>, caller: Caller, Path(key): Path<String>) -> ApiResult<Response> {
    let machine = s.store.get_machine(&key, caller.scope()).await?;
    let (net, subnets) = s.store.get_machine_network(machine.id).await?;
    match kiln_boot::network::network_config(&net, &subnets) {
        Some(text) => Ok(([(header::CONTENT_TYPE, "application/yaml")], text).into_response()),
        None => Err(crate::error::ApiError::not_found(format!(
            "machine {} has no network in the inventory: set one with `kiln network set`",
            machine.hostname
        ))),
    }
}
