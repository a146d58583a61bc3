//! The API's one error type and its conversion to HTTP, in one place.
//! Internal failures are logged whole and answered with a short message that
//! leaks nothing (no SQL, no paths, no secrets).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_store::StoreError;
use kiln_types::error::{ApiError as Body, ErrorDetail};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Body,
    /// Seconds for a `Retry-After` header (429 answers).
    retry_after: Option<u64>,
}

/// A copy of the error an answer carries, in the response's extensions, for
/// layers that look at answers (the audit of refused calls) without
/// reading the body.
#[derive(Debug, Clone)]
pub struct ErrorSent(pub Body);

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: Body {
                code: code.into(),
                message: message.into(),
                details: vec![],
            },
            retry_after: None,
        }
    }

    /// 429 with `Retry-After: retry_after_secs`.
    pub fn too_many_requests(message: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after_secs),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn refused(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "refused", message)
    }

    /// Logs `err` with its whole source chain; the client gets no detail.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> ApiError {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error: see the server log",
        )
    }

    pub fn with_details(mut self, details: Vec<ErrorDetail>) -> ApiError {
        self.body.details = details;
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What the client is told.
    pub fn message(&self) -> &str {
        &self.body.message
    }
}

/// "N rows are invalid" when several, the one message when one.
pub fn rows_error(conflict: bool, details: Vec<ErrorDetail>) -> ApiError {
    let message = match details.as_slice() {
        [one] => match (&one.index, &one.field) {
            (Some(i), Some(f)) => format!("row {i}, {f}: {}", one.message),
            (Some(i), None) => format!("row {i}: {}", one.message),
            (None, _) => one.message.clone(),
        },
        many => {
            let rows: std::collections::BTreeSet<_> = many.iter().filter_map(|d| d.index).collect();
            format!(
                "{} problems in {} rows; nothing was written (see details)",
                many.len(),
                rows.len().max(1)
            )
        }
    };
    let e = if conflict {
        ApiError::conflict(message)
    } else {
        ApiError::bad_request(message)
    };
    e.with_details(details)
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound { kind, key } => ApiError::not_found(format!("{kind} `{key}` not found")),
            StoreError::Conflict(m) => ApiError::conflict(m),
            StoreError::Invalid(m) => ApiError::bad_request(m),
            StoreError::Refused(m) => ApiError::refused(m),
            StoreError::Rows { conflict, details } => rows_error(conflict, details),
            e @ (StoreError::BadUrl(_) | StoreError::Database(_) | StoreError::Migrate(_) | StoreError::Corrupt(_)) => {
                ApiError::internal(&e)
            }
        }
    }
}

impl From<crate::bmc::BmcCallError> for ApiError {
    fn from(e: crate::bmc::BmcCallError) -> ApiError {
        use crate::bmc::BmcCallError as E;
        use kiln_bmc::BmcErrorKind as K;
        match e {
            e @ E::NoBmc(_) => ApiError::new(StatusCode::CONFLICT, "no_bmc", e.to_string()),
            e @ E::Maintenance { .. } => ApiError::new(StatusCode::CONFLICT, "maintenance", e.to_string()),
            e @ E::Busy { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "bmc_busy", e.to_string()),
            E::Bmc(f) => {
                let (status, code) = match f.kind {
                    K::Unreachable => (StatusCode::BAD_GATEWAY, "bmc_unreachable"),
                    K::Timeout => (StatusCode::GATEWAY_TIMEOUT, "bmc_timeout"),
                    K::OutcomeUnknown => (StatusCode::GATEWAY_TIMEOUT, "bmc_outcome_unknown"),
                    K::AuthFailed => (StatusCode::BAD_GATEWAY, "bmc_auth_failed"),
                    K::Unsupported => (StatusCode::NOT_IMPLEMENTED, "bmc_unsupported"),
                    K::Protocol => (StatusCode::BAD_GATEWAY, "bmc_protocol"),
                    K::Config => (StatusCode::CONFLICT, "bmc_config"),
                };
                let message = if f.entered_maintenance {
                    format!(
                        "{}; the machine is now in maintenance and kiln stops calling its BMC",
                        f.message
                    )
                } else {
                    f.message
                };
                ApiError::new(status, code, message)
            }
            E::Store(e) => e.into(),
            e @ E::Secret { .. } => ApiError::internal(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let sent = ErrorSent(self.body.clone());
        let mut resp = (self.status, Json(self.body)).into_response();
        resp.extensions_mut().insert(sent);
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"kiln\""),
            );
        }
        resp
    }
}
