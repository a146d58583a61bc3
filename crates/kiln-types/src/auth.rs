//! Tenants, roles and API tokens (records only; secrets are shown once).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{TenantId, TokenId, string_enum};

string_enum!(
    /// What a token may do. `admin`: everything. `operator`: the inventory and
    /// catalog, not tokens or tenants. `tenant`: its own tenant's machines and
    /// the catalog, read-mostly.
    Role { Admin = "admin", Operator = "operator", Tenant = "tenant" }
);

/// A hosting customer or team that owns machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantCreate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A token's record. The token itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: TokenId,
    pub name: String,
    pub role: Role,
    /// For `tenant` tokens: the tenant's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub role: Role,
    /// Required for, and only for, `tenant` tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// A label for humans and the audit log (default: role and a short id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The answer to token creation: the only time the token is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub info: TokenInfo,
    /// The bearer token. Store it now: kiln keeps only its hash.
    pub token: String,
}

/// Who the current token is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub token: TokenInfo,
    /// The address the server sees this call come from: the TCP peer, or
    /// the client a trusted proxy (`[api] trusted_proxies`) forwarded.
    /// What rate limits and the audit log use.
    pub client_address: String,
}
