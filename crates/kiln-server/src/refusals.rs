//! The audit of refused calls: every call by a valid API token that is
//! refused (403: its role or a field it may not set; 404 to a tenant: an
//! object outside its scope, which it must not learn exists) becomes a
//! `security.refused` audit event.
//!
//! One layer around every route does it, so a route added later is covered
//! without doing anything: the layer leaves an empty [`CallerSlot`] in the
//! request, the [`Caller`](crate::auth::Caller) extractor fills it when it
//! authenticates, and the layer reads it and the answer's status once the
//! handler is done. A route that authenticates no API token (boot files,
//! an agent's reports) leaves the slot empty and is not audited here.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use kiln_types::auth::Role;

use crate::AppState;
use crate::auth::CallerSlot;
use crate::error::ErrorSent;

/// Whether an answer of `status` to a caller of `role` is a refusal to
/// audit. A 404 to an admin or operator is a plain "no such object": they
/// see everything. To a tenant, it is also what "not yours" looks like, so
/// every 404 a tenant gets is recorded; which of the two it was, the
/// reader can tell from the target.
pub fn is_refusal(status: StatusCode, role: Role) -> bool {
    match status {
        StatusCode::FORBIDDEN => true,
        StatusCode::NOT_FOUND => role == Role::Tenant,
        _ => false,
    }
}

/// The layer: see the module doc.
pub async fn audit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let slot = CallerSlot::default();
    req.extensions_mut().insert(slot.clone());
    let method = req.method().clone();
    // The path only: a query may carry a token (`/boot/job/…?token=`).
    let path = req.uri().path().to_string();
    let (parts, body) = req.into_parts();
    let client = crate::peer::client_ip(&parts);
    let resp = next.run(Request::from_parts(parts, body)).await;
    let Some(caller) = slot.0.get() else {
        return resp;
    };
    let status = resp.status();
    if !is_refusal(status, caller.token.role) {
        return resp;
    }
    let error = resp.extensions().get::<ErrorSent>().map(|e| &e.0);
    let detail = serde_json::json!({
        "method": method.as_str(),
        "path": path,
        "status": status.as_u16(),
        "code": error.map(|e| e.code.as_str()),
        "message": error.map(|e| e.message.as_str()),
        "client": client.to_string(),
        "token": caller.token.id.to_string(),
    });
    tracing::info!(
        actor = %caller.actor().0, %method, path, status = status.as_u16(), %client,
        "refused a call by a valid token"
    );
    // An audit write that fails must not change the answer: log it whole.
    if let Err(e) = state
        .store
        .record_event(
            &caller.actor(),
            "security.refused",
            "request",
            path.clone(),
            format!("{method} {path}"),
            detail,
        )
        .await
    {
        tracing::error!(error = %e, %method, path, "cannot audit a refused call");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_counts_as_a_refusal() {
        for role in [Role::Admin, Role::Operator, Role::Tenant] {
            assert!(is_refusal(StatusCode::FORBIDDEN, role), "{role}");
            for ok in [StatusCode::OK, StatusCode::CREATED, StatusCode::NO_CONTENT] {
                assert!(!is_refusal(ok, role), "{role} {ok}");
            }
            // Bad input and conflicts are the caller's mistakes, not refusals.
            for other in [StatusCode::BAD_REQUEST, StatusCode::CONFLICT, StatusCode::UNAUTHORIZED] {
                assert!(!is_refusal(other, role), "{role} {other}");
            }
        }
        assert!(is_refusal(StatusCode::NOT_FOUND, Role::Tenant));
        assert!(!is_refusal(StatusCode::NOT_FOUND, Role::Admin));
        assert!(!is_refusal(StatusCode::NOT_FOUND, Role::Operator));
    }
}
