//! OS images, post-install tasks and storage layouts. Tenants may read the
//! catalog (their reinstall form lists it); only operators change it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_types::catalog::{
    LayoutInfo, OsImage, OsImageCreate, OsImagePatch, OsKind, StorageLayout, Task, TaskCreate, TaskPatch,
};
use kiln_types::error::ApiError as ErrorBody;

use super::extract::ApiJson;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

#[utoipa::path(post, path = "/api/v1/os-images", tag = "catalog", request_body = OsImageCreate,
    responses((status = 201, body = OsImage), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_os_image(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(new): ApiJson<OsImageCreate>,
) -> ApiResult<(StatusCode, Json<OsImage>)> {
    caller.require_operator()?;
    check_templates(&new.templates)?;
    check_installer_source(new.kind, &new.source)?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_os_image(&caller.actor(), &new).await?),
    ))
}

/// Each template must compile (a syntax error names its line), so that a
/// broken one is refused now rather than when a machine installs.
fn check_templates(templates: &std::collections::BTreeMap<String, String>) -> ApiResult<()> {
    let mut why = vec![];
    for (kind, source) in templates {
        if let Some(k) = kiln_boot::templates::TemplateKind::parse(kind)
            && let Err(e) = kiln_boot::templates::check(k, source)
        {
            why.push(e.to_string());
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request(why.join("; ")))
    }
}

/// An installer's `source` is the directory of its kernel and initrd, which
/// go into iPXE scripts: an http(s) URL or a path under the artifacts
/// directory (`kiln_boot::installer::Source`).
fn check_installer_source(kind: OsKind, source: &str) -> ApiResult<()> {
    if kind == OsKind::Installer {
        kiln_boot::installer::Source::parse(source).map_err(ApiError::bad_request)?;
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/os-images", tag = "catalog",
    responses((status = 200, body = Vec<OsImage>)), security(("bearer" = [])))]
pub async fn list_os_images(State(s): State<AppState>, _caller: Caller) -> ApiResult<Json<Vec<OsImage>>> {
    Ok(Json(s.store.list_os_images().await?))
}

#[utoipa::path(get, path = "/api/v1/os-images/{key}", tag = "catalog", params(("key" = String, Path, description = "id, NAME-VERSION or NAME")),
    responses((status = 200, body = OsImage), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_os_image(
    State(s): State<AppState>,
    _caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Json<OsImage>> {
    Ok(Json(s.store.get_os_image(&key).await?))
}

#[utoipa::path(patch, path = "/api/v1/os-images/{key}", tag = "catalog", params(("key" = String, Path)), request_body = OsImagePatch,
    responses((status = 200, body = OsImage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn update_os_image(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(patch): ApiJson<OsImagePatch>,
) -> ApiResult<Json<OsImage>> {
    caller.require_operator()?;
    if let Some(t) = &patch.templates {
        check_templates(t)?;
    }
    if patch.kind.is_some() || patch.source.is_some() {
        let after = patch.apply(&s.store.get_os_image(&key).await?);
        check_installer_source(after.kind, &after.source)?;
    }
    Ok(Json(s.store.update_os_image(&caller.actor(), &key, &patch).await?))
}

#[utoipa::path(delete, path = "/api/v1/os-images/{key}", tag = "catalog", params(("key" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_os_image(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_operator()?;
    s.store.delete_os_image(&caller.actor(), &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/tasks", tag = "catalog", request_body = TaskCreate,
    responses((status = 201, body = Task), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
pub async fn create_task(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(new): ApiJson<TaskCreate>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    caller.require_operator()?;
    Ok((
        StatusCode::CREATED,
        Json(s.store.create_task(&caller.actor(), &new).await?),
    ))
}

#[utoipa::path(get, path = "/api/v1/tasks", tag = "catalog",
    responses((status = 200, body = Vec<Task>)), security(("bearer" = [])))]
pub async fn list_tasks(State(s): State<AppState>, _caller: Caller) -> ApiResult<Json<Vec<Task>>> {
    Ok(Json(s.store.list_tasks().await?))
}

#[utoipa::path(get, path = "/api/v1/tasks/{key}", tag = "catalog", params(("key" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_task(State(s): State<AppState>, _caller: Caller, Path(key): Path<String>) -> ApiResult<Json<Task>> {
    Ok(Json(s.store.get_task(&key).await?))
}

#[utoipa::path(patch, path = "/api/v1/tasks/{key}", tag = "catalog", params(("key" = String, Path)), request_body = TaskPatch,
    responses((status = 200, body = Task), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn update_task(
    State(s): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(patch): ApiJson<TaskPatch>,
) -> ApiResult<Json<Task>> {
    caller.require_operator()?;
    Ok(Json(s.store.update_task(&caller.actor(), &key, &patch).await?))
}

#[utoipa::path(delete, path = "/api/v1/tasks/{key}", tag = "catalog", params(("key" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_task(State(s): State<AppState>, caller: Caller, Path(key): Path<String>) -> ApiResult<StatusCode> {
    caller.require_operator()?;
    s.store.delete_task(&caller.actor(), &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/layouts", tag = "catalog",
    responses((status = 200, body = Vec<LayoutInfo>)), security(("bearer" = [])))]
pub async fn list_layouts(_caller: Caller) -> Json<Vec<LayoutInfo>> {
    Json(StorageLayout::ALL.iter().map(|l| (*l).into()).collect())
}
