//! Bearer-token authentication and role checks.
//!
//! Tokens are `kiln_` + 43 base64url characters (256 random bits). Only the
//! SHA-256 of a token is stored: a token is already high-entropy, so a slow
//! password hash would add CPU to every request and no safety.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kiln_store::{Actor, Store};
use kiln_types::TenantId;
use kiln_types::auth::{Role, TokenInfo};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::{ApiError, ApiResult};

pub const TOKEN_PREFIX: &str = "kiln_";

/// A fresh token and the hash to store for it.
pub fn new_token() -> (String, String) {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).expect("the system random number generator failed");
    let token = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
    let hash = hash_token(&token);
    (token, hash)
}

/// The token of an `Authorization: Bearer TOKEN` header: an API token, or
/// the job or discovery token an agent sends.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: TokenInfo,
    pub tenant_id: Option<TenantId>,
}

impl Caller {
    /// How the audit log names this caller.
    pub fn actor(&self) -> Actor {
        Actor::new(format!("{} ({})", self.token.name, self.token.role))
    }

    /// The tenant whose machines alone this caller may see, if any.
    pub fn scope(&self) -> Option<TenantId> {
        match self.token.role {
            Role::Tenant => self.tenant_id,
            _ => None,
        }
    }

    /// Admins and operators may change the inventory and catalog.
    pub fn require_operator(&self) -> ApiResult<()> {
        match self.token.role {
            Role::Admin | Role::Operator => Ok(()),
            Role::Tenant => Err(ApiError::forbidden(
                "a tenant token cannot change the inventory or the catalog",
            )),
        }
    }

    /// Only admins manage tenants and tokens.
    pub fn require_admin(&self) -> ApiResult<()> {
        match self.token.role {
            Role::Admin => Ok(()),
            role => Err(ApiError::forbidden(format!(
                "only an admin token may do this; this token's role is {role}"
            ))),
        }
    }
}

pub async fn authenticate(store: &Store, parts: &Parts) -> ApiResult<Caller> {
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        return Err(ApiError::unauthorized(
            "missing bearer token: send `Authorization: Bearer TOKEN` (kiln token create makes one; the CLI reads KILN_TOKEN)",
        ));
    }
    let token = bearer_token(&parts.headers)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header is not `Bearer TOKEN`"))?;
    let record = store
        .token_by_hash(&hash_token(token))
        .await?
        .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid: unknown or revoked"))?;
    Ok(Caller {
        token: record.info,
        tenant_id: record.tenant_id,
    })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate(&state.store, parts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let (a, ha) = new_token();
        let (b, hb) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 43, "256 bits in base64url");
        assert_eq!(ha, hash_token(&a));
        assert_ne!(ha, hb);
        assert!(!ha.contains(&a[5..]));
    }
}
