//! Bearer-token authentication and role checks.
//!
//! Tokens are `kiln_` + 43 base64url characters (256 random bits). Only the
//! SHA-256 of a token is stored: a token is already high-entropy, so a slow
//! password hash would add CPU to every request and no safety.
//!
//! Every request reads its token's row (one lookup on a unique index);
//! nothing is cached, so a revocation or an expiry counts from the very
//! next request, on every server sharing the database. A failed
//! authentication counts against the client's address
//! ([`crate::failure_limit`]); an address over its limit is answered 429
//! before its token is looked up. When a token was last used, and from
//! where, is written at most once a minute per token ([`LAST_USE_INTERVAL`]).

use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use kiln_store::{Actor, Store};
use kiln_types::TenantId;
use kiln_types::auth::{Role, TokenInfo, TokenState};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::failure_limit::{Counted, FailureLimiter, retry_after_secs};

/// How often a token's last use is written at most. Every request writing
/// it would turn every read of the API into a write: on SQLite writes take
/// turns with the real changes (jobs, leases), and on PostgreSQL callers
/// sharing a token would queue on its row. "Last used" answers "is this
/// token still in use?", a question of days: a minute is precise enough.
pub const LAST_USE_INTERVAL: Duration = Duration::from_secs(60);

/// `[auth]`: API token lifetimes and the failed-authentication limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Failed authentications one client address (an IPv6 client: its
    /// /64) may make in a minute; its further calls are answered 429 until
    /// the minute is over. 0: no limit.
    #[serde(default = "default_failures_per_minute")]
    pub failures_per_minute: u32,
    /// Longest lifetime of a token made by `POST /api/v1/tokens` or
    /// `kiln token create`, in days, and the expiry of one that asks for
    /// none. 0: no maximum, and tokens that ask for no expiry never expire.
    #[serde(default = "default_max_token_lifetime_days")]
    pub max_token_lifetime_days: u32,
}

fn default_failures_per_minute() -> u32 {
    30
}

fn default_max_token_lifetime_days() -> u32 {
    365
}

/// The longest `max_token_lifetime_days` may be: a century is "for ever"
/// for a token, and far enough from the calendar's end for any arithmetic.
pub const MAX_LIFETIME_DAYS: u32 = 36_500;

impl AuthSettings {
    /// Why these settings cannot be used, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_token_lifetime_days > MAX_LIFETIME_DAYS {
            return Err(format!(
                "max_token_lifetime_days = {} is more than a century: write at most {MAX_LIFETIME_DAYS}, \
                 or 0 for tokens that may never expire",
                self.max_token_lifetime_days
            ));
        }
        Ok(())
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            failures_per_minute: default_failures_per_minute(),
            max_token_lifetime_days: default_max_token_lifetime_days(),
        }
    }
}

/// What authentication keeps between requests: its settings and the
/// failure windows of client addresses.
#[derive(Debug)]
pub struct AuthGuard {
    pub settings: AuthSettings,
    pub failures: FailureLimiter,
}

impl AuthGuard {
    pub fn new(settings: AuthSettings) -> AuthGuard {
        AuthGuard {
            failures: FailureLimiter::new(settings.failures_per_minute, Duration::from_secs(60)),
            settings,
        }
    }
}

/// Asking for up to this much past the maximum lifetime is taken as the
/// maximum: `--expires 365d` is computed on the client's clock.
const CLOCK_SLACK: chrono::Duration = chrono::Duration::hours(1);

/// The expiry a new token gets at `now`, when `requested` (none: the
/// default) and tokens live at most `max_days` (0: no maximum); or why not.
pub fn resolve_expiry(
    requested: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    max_days: u32,
) -> Result<Option<DateTime<Utc>>, String> {
    if let Some(at) = requested
        && at <= now
    {
        return Err(format!(
            "expires_at {} is not in the future: give a later time, or a duration to the CLI (--expires 30d)",
            at.to_rfc3339()
        ));
    }
    // No maximum still means at most a century: beyond year 9999 the
    // stored text would no longer be RFC 3339.
    let cap = if max_days == 0 { MAX_LIFETIME_DAYS } else { max_days };
    let latest = now + chrono::Duration::days(i64::from(cap));
    match requested {
        None if max_days == 0 => Ok(None),
        None => Ok(Some(latest)),
        Some(at) if at <= latest => Ok(Some(at)),
        Some(at) if at <= latest + CLOCK_SLACK => Ok(Some(latest)),
        Some(at) => Err(format!(
            "expires_at {} is more than {cap} days away, the longest a token may live on this server: \
             ask for an earlier expiry (at most {}){}",
            at.to_rfc3339(),
            latest.to_rfc3339(),
            if cap < MAX_LIFETIME_DAYS {
                ", or raise [auth] max_token_lifetime_days"
            } else {
                ""
            }
        )),
    }
}

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
                "this is for operators and admins: a tenant token cannot do it",
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

/// Why a request's token was refused.
#[derive(Debug)]
enum Refusal {
    /// No usable token: missing, malformed, unknown.
    NoToken(ApiError),
    /// A real token that no longer works: worth an audit event.
    Dead(Box<TokenInfo>, ApiError),
    /// The database failed: not the client's fault, not counted.
    Internal(ApiError),
}

/// The caller of `parts` at `now`, or why not. Reads the token's row.
async fn lookup(store: &Store, parts: &Parts, now: DateTime<Utc>) -> Result<Caller, Refusal> {
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        return Err(Refusal::NoToken(ApiError::unauthorized(
            "missing bearer token: send `Authorization: Bearer TOKEN` (kiln token create makes one; the CLI reads KILN_TOKEN)",
        )));
    }
    let Some(token) = bearer_token(&parts.headers) else {
        return Err(Refusal::NoToken(ApiError::unauthorized(
            "the Authorization header is not `Bearer TOKEN`",
        )));
    };
    let Some(record) = store
        .token_by_hash(&hash_token(token))
        .await
        .map_err(|e| Refusal::Internal(e.into()))?
    else {
        return Err(Refusal::NoToken(ApiError::unauthorized(
            "the bearer token is not valid: kiln knows no such token",
        )));
    };
    let message = match record.info.state_at(now) {
        TokenState::Live => {
            return Ok(Caller {
                token: record.info,
                tenant_id: record.tenant_id,
            });
        }
        TokenState::Revoked(at) => format!(
            "the bearer token `{}` was revoked at {}: ask an admin for a new one",
            record.info.name,
            at.to_rfc3339()
        ),
        TokenState::Expired(at) => format!(
            "the bearer token `{}` expired at {}: ask an admin for a new one (kiln token create --expires …)",
            record.info.name,
            at.to_rfc3339()
        ),
    };
    Err(Refusal::Dead(Box::new(record.info), ApiError::unauthorized(message)))
}

/// Authenticates the request of `parts`: refuses an address over its
/// failure limit before anything else, counts a failure against it, and
/// records the token's last use.
pub async fn authenticate(state: &AppState, parts: &Parts) -> ApiResult<Caller> {
    let client = crate::peer::client_ip(parts);
    let guard = &state.auth;
    if let Err(wait) = guard.failures.check(client, Instant::now()) {
        let secs = retry_after_secs(wait);
        tracing::debug!(%client, retry_after = secs, "authentication refused: too many failures");
        return Err(ApiError::too_many_requests(
            format!(
                "too many failed authentications from {client}: try again in {secs} s with a valid token \
                 (the limit is [auth] failures_per_minute = {})",
                guard.settings.failures_per_minute
            ),
            secs,
        ));
    }
    let now = Utc::now();
    let (token, error) = match lookup(&state.store, parts, now).await {
        Ok(caller) => {
            record_last_use(&state.store, &caller.token, client, now).await;
            return Ok(caller);
        }
        Err(Refusal::Internal(e)) => return Err(e),
        Err(Refusal::NoToken(e)) => (None, e),
        Err(Refusal::Dead(t, e)) => (Some(t), e),
    };
    // The reason, never the token; the address is what the limit counts.
    let reason = error.message().to_string();
    match guard.failures.fail(client, Instant::now()) {
        Counted::NowBlocked(wait) => tracing::warn!(
            %client, reason, blocked_secs = retry_after_secs(wait),
            "authentication failed; this address reached its failure limit and is refused until its window ends"
        ),
        Counted::Counted | Counted::Untracked => tracing::info!(%client, reason, "authentication failed"),
    }
    // A revoked or expired token being used is worth an audit event (a
    // leaked token, a forgotten script). Unknown tokens are not: anyone can
    // send those, and they name no actor. Either way the failure limit
    // bounds how many one address can cause.
    if let Some(t) = token {
        let detail = serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "client": client.to_string(),
            "reason": reason,
        });
        let actor = Actor::new(format!("{} ({})", t.name, t.role));
        if let Err(e) = state
            .store
            .record_event(
                &actor,
                "security.token_refused",
                "token",
                t.id.to_string(),
                t.name.clone(),
                detail,
            )
            .await
        {
            tracing::warn!(error = %e, "cannot audit the use of a dead token");
        }
    }
    Err(error)
}

/// Writes the token's last use when the stored one is older than
/// [`LAST_USE_INTERVAL`]; the read row says so without a write. A failure
/// is logged and the request goes on: it is bookkeeping, not a check.
async fn record_last_use(store: &Store, token: &TokenInfo, client: std::net::IpAddr, now: DateTime<Utc>) {
    let stale = token
        .last_used_at
        .is_none_or(|at| (now - at).to_std().unwrap_or(Duration::ZERO) >= LAST_USE_INTERVAL);
    if !stale {
        return;
    }
    if let Err(e) = store
        .touch_token(token.id, now, &client.to_string(), LAST_USE_INTERVAL)
        .await
    {
        tracing::warn!(token = %token.name, error = %e, "cannot record the token's last use");
    }
}

/// Where the [`Caller`] extractor leaves the caller it authenticated, for
/// the layer that audits refused calls ([`crate::refusals`]).
#[derive(Debug, Clone, Default)]
pub struct CallerSlot(pub std::sync::Arc<std::sync::OnceLock<Caller>>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = authenticate(state, parts).await?;
        if let Some(slot) = parts.extensions.get::<CallerSlot>() {
            let _ = slot.0.set(caller.clone());
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_policy() {
        let now: DateTime<Utc> = "2027-01-01T00:00:00Z".parse().unwrap();
        let day = chrono::Duration::days(1);
        // Default: the maximum; none when there is no maximum.
        assert_eq!(resolve_expiry(None, now, 365), Ok(Some(now + day * 365)));
        assert_eq!(resolve_expiry(None, now, 0), Ok(None));
        assert_eq!(resolve_expiry(Some(now + day), now, 365), Ok(Some(now + day)));
        assert_eq!(
            resolve_expiry(Some(now + day * 5000), now, 0),
            Ok(Some(now + day * 5000))
        );
        // Past or now: refused, saying how to fix it.
        for at in [now, now - day] {
            let e = resolve_expiry(Some(at), now, 365).unwrap_err();
            assert!(e.contains("not in the future") && e.contains("--expires"), "{e}");
        }
        // Beyond the maximum: refused, naming it and the key.
        let e = resolve_expiry(Some(now + day * 366), now, 365).unwrap_err();
        assert!(e.contains("365 days") && e.contains("max_token_lifetime_days"), "{e}");
        // A client clock a little ahead is forgiven.
        assert_eq!(
            resolve_expiry(Some(now + day * 365 + chrono::Duration::minutes(5)), now, 365),
            Ok(Some(now + day * 365))
        );
    }

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
