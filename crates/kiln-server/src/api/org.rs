//! Sites, racks, tenants and tokens.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_types::auth::{Tenant, TenantCreate, TokenCreate, TokenCreated, TokenInfo, WhoAmI};
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::site::{Rack, RackCreate, Site, SiteCreate};
use serde::Deserialize;
use utoipa::IntoParams;

use super::extract::{ApiJson, ApiQuery};
use crate::AppState;
use crate::auth::{Caller, new_token, resolve_expiry};
use crate::error::{ApiError, ApiResult};

#[utoipa::path(get, path = "/api/v1/whoami", tag = "auth",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn whoami(caller: Caller, crate::peer::ClientIp(ip): crate::peer::ClientIp) -> Json<WhoAmI> {
    Json(WhoAmI {
        token: caller.token,
        client_address: ip.to_string(),
    })
}

#[utoipa::path(post, path = "/api/v1/sites", tag = "sites", request_body = SiteCreate,
    responses((status = 201, body = Site), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_site(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(new): ApiJson<SiteCreate>,
) -> ApiResult<(StatusCode, Json<Site>)> {
    caller.require_operator()?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_site(&caller.actor(), &new).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/sites", tag = "sites",
    responses((status = 200, body = Vec<Site>)), security(("bearer" = [])))]
pub async fn list_sites(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<Site>>> {
    caller.require_operator()?;
    Ok(Json(s.store.list_sites().await?))
}

#[utoipa::path(delete, path = "/api/v1/sites/{name}", tag = "sites",
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_site(State(s): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<StatusCode> {
    caller.require_operator()?;
    s.store.delete_site(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Narrows racks to one site.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SiteParam {
    /// Site name.
    pub site: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/racks", tag = "racks", request_body = RackCreate,
    responses((status = 201, body = Rack), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_rack(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(new): ApiJson<RackCreate>,
) -> ApiResult<(StatusCode, Json<Rack>)> {
    caller.require_operator()?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_rack(&caller.actor(), &new).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/racks", tag = "racks", params(SiteParam),
    responses((status = 200, body = Vec<Rack>)), security(("bearer" = [])))]
pub async fn list_racks(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<SiteParam>,
) -> ApiResult<Json<Vec<Rack>>> {
    caller.require_operator()?;
    Ok(Json(s.store.list_racks(q.site.as_deref()).await?))
}

#[utoipa::path(delete, path = "/api/v1/racks/{name}", tag = "racks", params(("name" = String, Path), SiteParam),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_rack(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<SiteParam>,
) -> ApiResult<StatusCode> {
    caller.require_operator()?;
    s.store.delete_rack(&caller.actor(), q.site.as_deref(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/tenants", tag = "tenants", request_body = TenantCreate,
    responses((status = 201, body = Tenant), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_tenant(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(new): ApiJson<TenantCreate>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    caller.require_admin()?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_tenant(&caller.actor(), &new).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/tenants", tag = "tenants",
    responses((status = 200, body = Vec<Tenant>)), security(("bearer" = [])))]
pub async fn list_tenants(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<Tenant>>> {
    caller.require_operator()?;
    Ok(Json(s.store.list_tenants().await?))
}

#[utoipa::path(delete, path = "/api/v1/tenants/{name}", tag = "tenants", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_tenant(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    s.store.delete_tenant(&caller.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates a token; the answer is the only time it is shown. It expires at
/// `expires_at`, which may be at most `[auth] max_token_lifetime_days`
/// away (also the default).
#[utoipa::path(post, path = "/api/v1/tokens", tag = "auth", request_body = TokenCreate,
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_token(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<TokenCreate>,
) -> ApiResult<(StatusCode, Json<TokenCreated>)> {
    caller.require_admin()?;
    let expires_at = resolve_expiry(
        req.expires_at,
        chrono::Utc::now(),
        s.auth.settings.max_token_lifetime_days,
    )
    .map_err(ApiError::bad_request)?;
    let (token, hash) = new_token();
    let info = s
        .store
        .create_token(
            &caller.actor(),
            req.name.as_deref(),
            req.role,
            req.tenant.as_deref(),
            &hash,
            expires_at,
        )
        .await?;
    Ok((StatusCode::CREATED, Json(TokenCreated { info, token })))
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "auth",
    responses((status = 200, body = Vec<TokenInfo>)), security(("bearer" = [])))]
pub async fn list_tokens(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<TokenInfo>>> {
    caller.require_admin()?;
    Ok(Json(s.store.list_tokens().await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{key}", tag = "auth", params(("key" = String, Path, description = "token id or name")),
    responses((status = 200, body = TokenInfo), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke_token(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<TokenInfo>> {
    caller.require_admin()?;
    Ok(Json(s.store.revoke_token(&caller.actor(), &key).await?))
}
