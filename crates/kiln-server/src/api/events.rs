//! `/api/v1/events`: the audit log, newest first.

use axum::Json;
use axum::extract::State;
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::event::{Event, EventFilter};
use kiln_types::page::Page;

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
