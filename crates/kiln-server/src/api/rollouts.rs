//! `/api/v1/rollouts`: reimage every machine a selector picks, a few at a
//! time, with a failure budget and a stop button (pause, resume, abort).
//! Operators and admins only.
//!
//! The machines are picked when the rollout starts (the member list does
//! not change under it). Protected machines and machines in maintenance
//! are left out, and said so in the rollout's log; a machine the OS, layout
//! or tasks do not fit refuses the whole request, with every reason.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln_store::{JobControl, JobRecord, LogLine, NewJob};
use kiln_types::JobId;
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::job::{JobFilter, JobKind, JobLogKind, Rollout, RolloutRequest, RolloutSpec};
use kiln_types::machine::{Machine, MachineFilter};
use kiln_workflow::job_view;

use super::extract::ApiJson;
use super::jobs::{machine_problems, reimage_spec, request_problems};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

/// Most machines one rollout takes.
const MAX_MEMBERS: usize = 10_000;

fn selector_label(f: &MachineFilter) -> String {
    let parts: Vec<String> = [
        f.tag.as_ref().map(|v| format!("tag={v}")),
        f.rack.as_ref().map(|v| format!("rack={v}")),
        f.site.as_ref().map(|v| format!("site={v}")),
        f.state.map(|v| format!("state={v}")),
        f.owner.as_ref().map(|v| format!("owner={v}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "all machines".into()
    } else {
        parts.join(" ")
    }
}

async fn view(state: &AppState, job: &JobRecord) -> ApiResult<Rollout> {
    let spec: RolloutSpec = serde_json::from_value(job.spec.clone()).map_err(|e| ApiError::internal(&e))?;
    Ok(Rollout {
        job: job_view(job),
        concurrency: spec.concurrency,
        max_failures: spec.max_failures,
        members: state.store.rollout_members(job.id).await?,
    })
}

async fn rollout_job(state: &AppState, id: &str) -> ApiResult<JobRecord> {
    let not_found = || ApiError::not_found(format!("rollout `{id}` not found (see `kiln rollout list`)"));
    let id: JobId = id.parse().map_err(|_| not_found())?;
    let job = state.store.get_job(id).await?;
    if job.kind != JobKind::Rollout {
        return Err(not_found());
    }
    Ok(job)
}

/// Every machine `filter` picks, all pages.
async fn select(state: &AppState, filter: &MachineFilter) -> ApiResult<Vec<Machine>> {
    let mut filter = filter.clone();
    filter.limit = Some(kiln_types::page::MAX_PAGE_LIMIT);
    let mut all = vec![];
    loop {
        let page = state.store.list_machines(&filter, None).await?;
        all.extend(page.items);
        if all.len() > MAX_MEMBERS {
            return Err(ApiError::bad_request(format!(
                "the selector picks more than {MAX_MEMBERS} machines: narrow it"
            )));
        }
        match page.next_cursor {
            Some(c) => filter.cursor = Some(c),
            None => return Ok(all),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", request_body = RolloutRequest,
    responses((status = 201, body = Rollout), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<RolloutRequest>,
) -> ApiResult<(StatusCode, Json<Rollout>)> {
    caller.require_operator()?;
    let mut why = vec![];
    if req.concurrency == 0 {
        why.push("concurrency must be at least 1".to_string());
    }
    if req.reimage.hostname.is_some() {
        why.push("`reimage.hostname` must be absent: every member keeps its own".into());
    }
    if req.health_check.as_ref().is_some_and(|c| c.is_empty()) {
        why.push("`health_check` is an argv list and must not be empty".into());
    }
    let image = state.store.get_os_image(&req.reimage.os).await?;
    let (root_password_hash, problems) = request_problems(&state, &req.reimage).await;
    why.extend(problems);
    let machines = select(&state, &req.selector).await?;
    let mut members = vec![];
    let mut left_out = vec![];
    for m in &machines {
        if m.protected || m.maintenance {
            left_out.push(format!(
                "{} ({})",
                m.hostname,
                if m.protected { "protected" } else { "in maintenance" }
            ));
            continue;
        }
        for w in machine_problems(&state, &caller, m, &image, &req.reimage).await {
            why.push(format!("{}: {w}", m.hostname));
        }
        members.push((m.id, m.hostname.to_string()));
    }
    if members.is_empty() && why.is_empty() {
        why.push(format!(
            "the selector ({}) picks no machine that may be reimaged",
            selector_label(&req.selector)
        ));
    }
    if !why.is_empty() {
        return Err(ApiError::bad_request(format!(
            "the rollout cannot start: {}",
            why.join("; ")
        )));
    }
    let template = reimage_spec(&image, &machines[0], &req.reimage, root_password_hash);
    let selector = selector_label(&req.selector);
    let spec = RolloutSpec {
        selector: selector.clone(),
        template: template.clone(),
        callback_url: req.reimage.callback_url.clone(),
        ticket: req.reimage.ticket.clone(),
        concurrency: req.concurrency,
        max_failures: req.max_failures,
        health_check: req.health_check.clone(),
    };
    let job = state
        .store
        .create_rollout(
            &caller.actor(),
            NewJob {
                kind: JobKind::Rollout,
                machine_id: None,
                parent_id: None,
                hostname: format!("rollout {selector}"),
                os_label: template.os_label,
                spec: serde_json::to_value(&spec).map_err(|e| ApiError::internal(&e))?,
                ticket: req.reimage.ticket,
                callback_url: req.reimage.callback_url,
                first_step: 0,
            },
            &members,
        )
        .await?;
    if !left_out.is_empty() {
        let note = LogLine::new(JobLogKind::Note, None, format!("left out: {}", left_out.join(", ")));
        state.store.append_job_log(job.id, &[note]).await?;
    }
    state.engine.wake();
    Ok((StatusCode::CREATED, Json(view(&state, &job).await?)))
}

#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts",
    responses((status = 200, body = Vec<Rollout>)), security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<Rollout>>> {
    caller.require_operator()?;
    let jobs = state.store.list_jobs(&JobFilter::default()).await?;
    let mut out = vec![];
    for j in jobs.iter().filter(|j| j.kind == JobKind::Rollout) {
        out.push(view(&state, j).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts",
    params(("id" = String, Path, description = "rollout id")),
    responses((status = 200, body = Rollout), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Rollout>> {
    caller.require_operator()?;
    let job = rollout_job(&state, &id).await?;
    Ok(Json(view(&state, &job).await?))
}

async fn control(state: &AppState, caller: &Caller, id: &str, control: JobControl) -> ApiResult<Json<Rollout>> {
    caller.require_operator()?;
    let job = rollout_job(state, id).await?;
    let job = state.store.control_job(&caller.actor(), job.id, control).await?;
    state.engine.wake();
    Ok(Json(view(state, &job).await?))
}

/// No new member starts; running members finish.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/pause", tag = "rollouts",
    params(("id" = String, Path, description = "rollout id")),
    responses((status = 200, body = Rollout), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pause(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Rollout>> {
    control(&state, &caller, &id, JobControl::Pause).await
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/resume", tag = "rollouts",
    params(("id" = String, Path, description = "rollout id")),
    responses((status = 200, body = Rollout), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Rollout>> {
    control(&state, &caller, &id, JobControl::Resume).await
}

/// The stop button: running members are cancelled (their net boot undone,
/// their machines back on disk), pending ones skipped.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/abort", tag = "rollouts",
    params(("id" = String, Path, description = "rollout id")),
    responses((status = 200, body = Rollout), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn abort(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Rollout>> {
    control(&state, &caller, &id, JobControl::Cancel).await
}
