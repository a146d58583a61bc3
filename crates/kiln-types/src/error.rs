//! The one error shape every API failure is sent as.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What went wrong, for humans (`message`) and for scripts (`code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable machine-readable code: `bad_request`, `unauthorized`,
    /// `forbidden`, `not_found`, `conflict`, `refused`, `internal`.
    pub code: String,
    /// What was wrong and how to fix it.
    pub message: String,
    /// One entry per bad input row or field (bulk create, import).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
}

/// One problem in a multi-row request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// 0-based index of the row in the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}
