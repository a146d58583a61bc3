//! `/api/v1/events` (the audit log, newest first) and `/api/v1/leases`.

use axum::Json;
use axum::extract::State;
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::event::{Event, EventFilter};
use kiln_types::lease::Lease;
use kiln_types::page::Page;
use serde::Deserialize;
use utoipa::IntoParams;

use super::extract::ApiQuery;
use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiResult;

#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventFilter),
    responses((status = 200, body = Page<Event>), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<EventFilter>,
) -> ApiResult<Json<Page<Event>>> {
    caller.require_operator()?;
    Ok(Json(s.store.list_events(&filter).await?))
}

/// Which leases to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LeaseQuery {
    /// Include expired leases.
    #[serde(default)]
    pub all: bool,
}

#[utoipa::path(get, path = "/api/v1/leases", tag = "boot", params(LeaseQuery),
    responses((status = 200, body = Vec<Lease>)), security(("bearer" = [])))]
pub async fn leases(
    State(s): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<LeaseQuery>,
) -> ApiResult<Json<Vec<Lease>>> {
    caller.require_operator()?;
    Ok(Json(s.store.list_leases(q.all, chrono::Utc::now()).await?))
}
