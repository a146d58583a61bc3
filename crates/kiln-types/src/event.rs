//! The audit log: one append-only record per change, with who made it and
//! the record before and after.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Increases with every event; also the pagination cursor.
    pub id: i64,
    pub at: DateTime<Utc>,
    /// Who: the token's name and role (`alice (admin)`), or `bootstrap`.
    pub actor: String,
    /// What: `machine.create`, `machine.update`, `token.revoke`, …
    pub action: String,
    /// Kind of the changed record: `machine`, `tenant`, …
    pub target_kind: String,
    pub target_id: String,
    /// Human name of the target (hostname, tenant name) at the time.
    pub target_name: String,
    /// The API view before the change (absent for creations). Secrets never
    /// appear here: the API view holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    /// The API view after the change (absent for deletions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

/// Filters for the audit log; newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventFilter {
    /// Target kind (`machine`, `tenant`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_kind: Option<String>,
    /// Target id or name (hostname for machines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Action prefix: `machine.` or `machine.delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Actor substring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Only events at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}
