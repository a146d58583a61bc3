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
    /// When the token stops working; none: it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When the token last authenticated a call, to within a minute (kiln
    /// records it at most once a minute per token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<DateTime<Utc>>,
    /// The client address of that call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_from: Option<String>,
}

/// Whether a token may authenticate a call at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Live,
    Revoked(DateTime<Utc>),
    Expired(DateTime<Utc>),
}

impl TokenInfo {
    /// The token's state at `now`. Revocation wins over expiry: it is the
    /// more telling reason.
    pub fn state_at(&self, now: DateTime<Utc>) -> TokenState {
        match (self.revoked_at, self.expires_at) {
            (Some(at), _) => TokenState::Revoked(at),
            (None, Some(at)) if at <= now => TokenState::Expired(at),
            _ => TokenState::Live,
        }
    }
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
    /// When the token stops working (RFC 3339). Default, and upper bound:
    /// the server's `[auth] max_token_lifetime_days` from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_state() {
        let t0: DateTime<Utc> = "2027-01-01T00:00:00Z".parse().unwrap();
        let hour = chrono::Duration::hours(1);
        let mut t = TokenInfo {
            id: crate::TokenId::new(),
            name: "ci".into(),
            role: Role::Operator,
            tenant: None,
            created_at: t0,
            revoked_at: None,
            expires_at: None,
            last_used_at: None,
            last_used_from: None,
        };
        assert_eq!(
            t.state_at(t0 + hour * 24 * 365 * 100),
            TokenState::Live,
            "no expiry: never"
        );
        t.expires_at = Some(t0 + hour);
        assert_eq!(t.state_at(t0), TokenState::Live);
        assert_eq!(
            t.state_at(t0 + hour),
            TokenState::Expired(t0 + hour),
            "expired at the instant"
        );
        t.revoked_at = Some(t0 + hour * 2);
        assert_eq!(
            t.state_at(t0),
            TokenState::Revoked(t0 + hour * 2),
            "revoked, even before expiry"
        );
    }
}
