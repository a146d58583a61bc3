//! Jobs: `POST /api/v1/machines/{key}/reimage` starts one; `/api/v1/jobs…`
//! lists, shows, streams and steers them; `POST /api/v1/jobs/{id}/stages/{n}`
//! is how agents and installers report install stages.
//!
//! Roles: admins and operators on any machine; a tenant reimages, follows
//! and cancels jobs of *its own* machines (another tenant's job is "not
//! found"). Stage reports carry no API token but the job's own token (see
//! `crate::jobs`), refused once the job ended.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use kiln_store::{JobControl, NewJob};
use kiln_types::JobId;
use kiln_types::catalog::{OsImage, OsKind, StorageLayout};
use kiln_types::error::ApiError as ErrorBody;
use kiln_types::fit::{layout_fits, os_image_fits};
use kiln_types::install::CryptHash;
use kiln_types::job::{
    Job, JobDetail, JobFilter, JobKind, JobLogEntry, ReimageRequest, ReimageSpec, RetryRequest, Stage, StageReport,
};
use kiln_types::machine::Machine;
use kiln_workflow::{job_view, steps};

use super::extract::{ApiJson, ApiQuery, parse_json, read_bounded};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

fn job_id(s: &str) -> ApiResult<JobId> {
    s.parse()
        .map_err(|_| ApiError::not_found(format!("job `{s}` not found: job ids are UUIDs (see `kiln job list`)")))
}

/// The job, if `caller` may see it (a tenant sees its machines' jobs only).
async fn visible_job(state: &AppState, caller: &Caller, id: JobId) -> ApiResult<kiln_store::JobRecord> {
    let job = state.store.get_job(id).await?;
    if let Some(scope) = caller.scope() {
        let owned = match job.machine_id {
            Some(m) => state.store.get_machine(&m.to_string(), Some(scope)).await.is_ok(),
            None => false,
        };
        if !owned {
            return Err(ApiError::not_found(format!("job `{id}` not found")));
        }
    }
    Ok(job)
}

/// What is wrong with a reimage request whatever the machine; and the
/// root password's hash (kiln keeps only that). The callback URL must pass
/// the outbound rules: the new OS calls it, but from the same networks as
/// kiln, and it must not name kiln's own or internal addresses.
pub(super) async fn request_problems(state: &AppState, req: &ReimageRequest) -> (Option<CryptHash>, Vec<String>) {
    let mut why = vec![];
    if let Some(url) = &req.callback_url {
        if let Err(e) = kiln_boot::templates::check_callback_url(url) {
            why.push(format!("callback_url: {e}"));
        } else if let Err(e) = state.outbound.check_url(url).await {
            why.push(format!("callback_url: {e}"));
        }
    }
    let hash = match (&req.root_password, &req.root_password_hash) {
        (Some(_), Some(_)) => {
            why.push("give root_password or root_password_hash, not both".into());
            None
        }
        (Some(p), None) => match kiln_boot::password::hash_root_password(p) {
            Ok(h) => Some(h),
            Err(e) => {
                why.push(e);
                None
            }
        },
        (None, h) => h.clone(),
    };
    (hash, why)
}

/// Why `image` (with the request's layout, hostname and tasks) does not fit
/// `machine`, if it does not.
pub(super) async fn machine_problems(
    state: &AppState,
    caller: &Caller,
    machine: &Machine,
    image: &OsImage,
    req: &ReimageRequest,
) -> Vec<String> {
    // A new machine without an inventory yet cannot be checked against
    // the image and layout; its agent's inventory comes with the install.
    let unchecked = req.new && machine.hardware.is_none();
    let mut why = if unchecked {
        vec![]
    } else {
        os_image_fits(machine, image).err().unwrap_or_default()
    };
    if let Some(layout) = req.layout
        && !unchecked
        && let Err(w) = layout_fits(machine, layout)
    {
        why.push(format!("layout {layout}: {w}"));
    }
    // Whatever the machine: a whole-disk image brings its own partitions.
    if image.kind == OsKind::DiskImage
        && let Err(w) = image.content.check_layout(req.layout.unwrap_or(StorageLayout::Flat))
    {
        why.push(format!("OS image {}-{}: {w}", image.name, image.version));
    }
    if let Some(h) = &req.hostname
        && *h != machine.hostname
        && let Ok(other) = state.store.get_machine(h.as_str(), None).await
        && other.id != machine.id
    {
        // A tenant learns that the name is taken, never which machine
        // (of another tenant, perhaps) holds it.
        why.push(match caller.scope() {
            Some(_) => format!("hostname {h} is taken by another machine: pick another"),
            None => format!("hostname {h} belongs to another machine ({})", other.id),
        });
    }
    for name in &req.tasks {
        match state.store.get_task(name).await {
            Ok(task) => {
                if let Err(w) = kiln_types::fit::task_fits(machine, &task) {
                    why.push(format!("task {name}: {w}"));
                }
            }
            Err(e) => why.push(e.to_string()),
        }
    }
    why
}

/// The stored form of a checked request for `machine`.
pub(super) fn reimage_spec(
    image: &OsImage,
    machine: &Machine,
    req: &ReimageRequest,
    root_password_hash: Option<CryptHash>,
) -> ReimageSpec {
    ReimageSpec {
        os_image: image.id.to_string(),
        os_label: format!("{}-{}", image.name, image.version),
        layout: req.layout,
        hostname: req.hostname.clone().unwrap_or_else(|| machine.hostname.clone()),
        ssh_keys: req.ssh_keys.clone(),
        root_password_hash,
        tasks: req.tasks.clone(),
        post_install_script: req.post_install_script.clone(),
        no_pxe: req.no_pxe,
        no_hooks: req.no_hooks,
        new: req.new,
    }
}

/// Starts a reimage. The checks that can fail at once (the OS fits the
/// hardware, the layout fits the disks, no other job runs) fail here, with
/// every reason; the job's validate step checks again when it runs.
#[utoipa::path(post, path = "/api/v1/machines/{key}/reimage", tag = "jobs",
    params(("key" = String, Path, description = "machine id or hostname")),
    request_body = ReimageRequest,
    responses((status = 201, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the machine has an active job, or is protected, in maintenance or its switch port is flagged")),
    security(("bearer" = [])))]
pub async fn reimage(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    ApiJson(req): ApiJson<ReimageRequest>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let machine = state.store.get_machine(&key, caller.scope()).await?;
    crate::policy::operator_fields(
        &caller,
        &[("no_hooks", req.no_hooks), ("new", req.new), ("no_pxe", req.no_pxe)],
    )?;
    if machine.protected {
        return Err(ApiError::refused(format!(
            "{} is protected: it is never reinstalled until the flag is cleared",
            machine.hostname
        )));
    }
    if machine.maintenance {
        return Err(ApiError::refused(format!(
            "{} is in maintenance ({}): clear it first",
            machine.hostname,
            machine.maintenance_reason.as_deref().unwrap_or("no reason given")
        )));
    }
    if let Some(alert) = &machine.port_alert {
        return Err(ApiError::refused(format!("{}: {}", machine.hostname, alert.reason())));
    }
    let image = state.store.get_os_image(&req.os).await?;
    let (root_password_hash, mut why) = request_problems(&state, &req).await;
    why.extend(machine_problems(&state, &caller, &machine, &image, &req).await);
    if !why.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} cannot be reimaged with {}-{}: {}",
            machine.hostname,
            image.name,
            image.version,
            why.join("; ")
        )));
    }
    let spec = reimage_spec(&image, &machine, &req, root_password_hash);
    let os_label = spec.os_label.clone();
    let job = state
        .store
        .create_job(
            &caller.actor(),
            NewJob {
                kind: JobKind::Reimage,
                machine_id: Some(machine.id),
                parent_id: None,
                hostname: machine.hostname.to_string(),
                os_label,
                spec: serde_json::to_value(&spec).map_err(|e| ApiError::internal(&e))?,
                ticket: req.ticket,
                callback_url: req.callback_url,
                first_step: 0,
            },
        )
        .await?;
    state.engine.wake();
    Ok((StatusCode::CREATED, Json(job_view(&job))))
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(JobFilter),
    responses((status = 200, body = Vec<Job>), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<JobFilter>,
) -> ApiResult<Json<Vec<Job>>> {
    let jobs = state.store.list_jobs(&filter).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        if caller.scope().is_some() && visible_job(&state, &caller, j.id).await.is_err() {
            continue;
        }
        out.push(job_view(&j));
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobDetail), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<JobDetail>> {
    let job = visible_job(&state, &caller, job_id(&id)?).await?;
    let log = state.store.job_log(job.id, 0).await?;
    Ok(Json(JobDetail {
        job: job_view(&job),
        log,
    }))
}

async fn control(state: &AppState, caller: &Caller, id: &str, control: JobControl) -> ApiResult<Json<Job>> {
    let job = visible_job(state, caller, job_id(id)?).await?;
    let job = state.store.control_job(&caller.actor(), job.id, control).await?;
    state.engine.wake();
    Ok(Json(job_view(&job)))
}

/// Cancels a job at its next step boundary: what it armed is undone (the
/// machine boots its disk), the machine's state says what happened.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cancel(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    control(&state, &caller, &id, JobControl::Cancel).await
}

/// Pauses a job at its next step boundary (a running step finishes).
#[utoipa::path(post, path = "/api/v1/jobs/{id}/pause", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn pause(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    visible_job(&state, &caller, job_id(&id)?).await?;
    caller.require_operator()?;
    control(&state, &caller, &id, JobControl::Pause).await
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/resume", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = Job), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    visible_job(&state, &caller, job_id(&id)?).await?;
    caller.require_operator()?;
    control(&state, &caller, &id, JobControl::Resume).await
}

/// Runs a failed or cancelled job again, from the step named or the one
/// the job's kind picks (a reimage that ended during its net boot or
/// install starts again at `arm`). A retry that runs the installer again
/// forgets the stages reported before. A tenant may retry its own
/// machines' jobs, but only from the step the job's kind picks:
/// `from_step` is an operator tool (403 for a tenant).
#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    request_body = RetryRequest,
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RetryRequest>,
) -> ApiResult<Json<Job>> {
    let job = visible_job(&state, &caller, job_id(&id)?).await?;
    crate::policy::operator_fields(&caller, &[("from_step", req.from_step.is_some())])?;
    let names = steps(job.kind);
    let from = match &req.from_step {
        None => None,
        Some(name) => Some(names.iter().position(|s| s == name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "no step `{name}` in a {} job; steps: {}",
                job.kind,
                names.join(", ")
            ))
        })? as u32),
    };
    let (step_index, stage) = kiln_workflow::retry_plan(job.kind, job.step_index, from, job.stage);
    let step = names[step_index as usize];
    control(
        &state,
        &caller,
        &id,
        JobControl::Retry {
            step_index,
            step,
            stage,
        },
    )
    .await
}

/// An install stage from the job's agent or installer. Authenticated by
/// the job's token (`Authorization: Bearer …`, given on the kernel command
/// line as `kiln.token`). The body is optional: a plain-text message, or
/// JSON `{"message": …}` with `Content-Type: application/json`. A stage
/// lower than one already reported is logged and changes nothing; a retry
/// after the job ended is answered 204 too, any other report then 409.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/stages/{n}", tag = "jobs",
    params(("id" = String, Path, description = "job id"), ("n" = u8, Path, description = "stage, 0 to 5")),
    request_body(content(
        (String = "text/plain"),
        (StageReport = "application/json"),
    ), description = "optional: a short message"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job has ended")),
    security(("job_token" = [])))]
pub async fn report_stage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, n)): Path<(String, String)>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    let id = job_id(&id)?;
    check_job_token(&state, &headers, id, "a stage report")?;
    let body = read_bounded(&headers, body, MAX_REPORT_BYTES, "a report (a short message)").await?;
    let stage = n
        .parse::<u8>()
        .map_err(|_| ApiError::bad_request(format!("stage `{n}` is not a number from 0 to 5")))
        .and_then(|n| Stage::new(n).map_err(ApiError::bad_request))?;
    let message = report_message(&headers, &body)?.unwrap_or_else(|| stage.meaning().to_string());
    state.store.report_stage(id, stage, &message).await?;
    state.engine.wake();
    Ok(StatusCode::NO_CONTENT)
}

/// The job's agent or installer gave up: the job fails with this message
/// as its reason, and its undo runs (nothing stays armed; the machine is
/// set to boot its disk). Authenticated and shaped like a stage report;
/// the first report counts, and one after the job ended is answered 204.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/failure", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    request_body(content(
        (String = "text/plain"),
        (StageReport = "application/json"),
    ), description = "why the install cannot go on, in words an operator can act on"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("job_token" = [])))]
pub async fn report_failure(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    let id = job_id(&id)?;
    check_job_token(&state, &headers, id, "a failure report")?;
    let body = read_bounded(&headers, body, MAX_REPORT_BYTES, "a report (a short message)").await?;
    let message = report_message(&headers, &body)?
        .ok_or_else(|| ApiError::bad_request("a failure report needs a message saying what went wrong"))?;
    state.store.report_failure(id, &message).await?;
    state.engine.wake();
    Ok(StatusCode::NO_CONTENT)
}

/// The most of a report's body that is read: a message is cut to 2,000
/// characters anyway, and these routes are open to the whole boot network.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Refuses a report (`what`) without job `id`'s token.
fn check_job_token(state: &AppState, headers: &HeaderMap, id: JobId, what: &str) -> ApiResult<()> {
    let token = crate::auth::bearer_token(headers).ok_or_else(|| {
        ApiError::unauthorized(format!("{what} needs the job's token: `Authorization: Bearer TOKEN`"))
    })?;
    if !state.secrets.check_job_token(id, token) {
        return Err(ApiError::unauthorized(format!("that is not the token of job {id}")));
    }
    Ok(())
}

/// A report's message: installers send a plain-text line (or nothing),
/// agents may send JSON `{"message": …}`. `None` when it is empty; cut
/// to 2,000 characters.
fn report_message(headers: &HeaderMap, body: &[u8]) -> ApiResult<Option<String>> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let report: StageReport = if is_json {
        parse_json(body).map_err(ApiError::bad_request)?
    } else {
        StageReport {
            message: String::from_utf8_lossy(body).trim().to_string(),
        }
    };
    let message = report.message.trim();
    Ok((!message.is_empty()).then(|| message.chars().take(2000).collect()))
}

/// The job's log as Server-Sent Events (`event: log`, data: a JobLogEntry),
/// from the line after `Last-Event-ID` (or the start); an `event: end` with
/// the final job follows once the job has ended.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, content_type = "text/event-stream", description = "log lines as they happen"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let job = visible_job(&state, &caller, job_id(&id)?).await?;
    let after: i64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = futures::stream::unfold(
        (state, job.id, after, Vec::<JobLogEntry>::new(), false),
        |(state, id, mut after, mut pending, done)| async move {
            if done {
                return None;
            }
            let mut changes = state.engine.changes();
            loop {
                if let Some(line) = (!pending.is_empty()).then(|| pending.remove(0)) {
                    after = line.seq;
                    let event = Event::default()
                        .event("log")
                        .id(line.seq.to_string())
                        .json_data(&line)
                        .unwrap_or_default();
                    return Some((Ok(event), (state, id, after, pending, false)));
                }
                let job = state.store.get_job(id).await.ok()?;
                pending = state.store.job_log(id, after).await.ok()?;
                if !pending.is_empty() {
                    continue;
                }
                if job.state.is_final() {
                    let event = Event::default()
                        .event("end")
                        .json_data(job_view(&job))
                        .unwrap_or_default();
                    return Some((Ok(event), (state, id, after, pending, true)));
                }
                // Changes this server makes wake the stream at once; other
                // servers' within a second.
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
