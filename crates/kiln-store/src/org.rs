//! Sites, racks, tenants and API tokens.

use chrono::{DateTime, Utc};
use kiln_types::auth::{Role, Tenant, TenantCreate, TokenInfo};
use kiln_types::site::{Rack, RackCreate, Site, SiteCreate};
use kiln_types::{RackId, SiteId, TenantId, TokenId};
use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use crate::events::{Change, record, snapshot};
use crate::{Actor, Result, Store, StoreError, built, now, parse_col, parse_ts, ts};

/// A token as authentication needs it.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub info: TokenInfo,
    pub tenant_id: Option<TenantId>,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    kiln_types::catalog::check_catalog_name(&format!("{what} name"), name).map_err(StoreError::Invalid)
}

fn site_from_row(row: &AnyRow) -> Result<Site> {
    Ok(Site {
        id: parse_col("site id", &row.try_get::<String, _>("id")?)?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        created_at: parse_ts(&row.try_get::<String, _>("created_at")?)?,
    })
}

fn rack_from_row(row: &AnyRow) -> Result<Rack> {
    Ok(Rack {
        id: parse_col("rack id", &row.try_get::<String, _>("id")?)?,
        name: row.try_get("name")?,
        site: row.try_get("site_name")?,
        row: row.try_get("row_name")?,
        node_group: row.try_get("node_group")?,
        created_at: parse_ts(&row.try_get::<String, _>("created_at")?)?,
    })
}

fn tenant_from_row(row: &AnyRow) -> Result<Tenant> {
    Ok(Tenant {
        id: parse_col("tenant id", &row.try_get::<String, _>("id")?)?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        created_at: parse_ts(&row.try_get::<String, _>("created_at")?)?,
    })
}

fn token_from_row(row: &AnyRow) -> Result<TokenRecord> {
    let tenant_id: Option<String> = row.try_get("tenant_id")?;
    let revoked: Option<String> = row.try_get("revoked_at")?;
    let expires: Option<String> = row.try_get("expires_at")?;
    let last_used: Option<String> = row.try_get("last_used_at")?;
    Ok(TokenRecord {
        info: TokenInfo {
            id: parse_col("token id", &row.try_get::<String, _>("id")?)?,
            name: row.try_get("name")?,
            role: parse_col("role", &row.try_get::<String, _>("role")?)?,
            tenant: row.try_get("tenant_name")?,
            created_at: parse_ts(&row.try_get::<String, _>("created_at")?)?,
            revoked_at: revoked.as_deref().map(parse_ts).transpose()?,
            expires_at: expires.as_deref().map(parse_ts).transpose()?,
            last_used_at: last_used.as_deref().map(parse_ts).transpose()?,
            last_used_from: row.try_get("last_used_from")?,
        },
        tenant_id: tenant_id.as_deref().map(|s| parse_col("tenant id", s)).transpose()?,
    })
}

const RACK_SELECT: &str = "SELECT r.id, r.name, r.row_name, r.node_group, r.created_at, s.name AS site_name \
                           FROM racks r JOIN sites s ON s.id = r.site_id";
const TOKEN_SELECT: &str = "SELECT k.id, k.name, k.role, k.tenant_id, k.created_at, k.revoked_at, k.expires_at, \
                            k.last_used_at, k.last_used_from, t.name AS tenant_name \
                            FROM tokens k LEFT JOIN tenants t ON t.id = k.tenant_id";

impl Store {
    // ---- sites ----

    pub async fn create_site(&self, actor: &Actor, new: &SiteCreate) -> Result<Site> {
        check_name("site", &new.name)?;
        let site = Site {
            id: SiteId::new(),
            name: new.name.clone(),
            description: new.description.clone(),
            created_at: now(),
        };
        let mut tx = self.write_tx().await?;
        if sqlx::query::<Any>("SELECT 1 FROM sites WHERE name = $1")
            .bind(&site.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!("site `{}` already exists", site.name)));
        }
        sqlx::query::<Any>("INSERT INTO sites (id, name, description, created_at) VALUES ($1, $2, $3, $4)")
            .bind(site.id.to_string())
            .bind(&site.name)
            .bind(&site.description)
            .bind(ts(site.created_at))
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "site.create",
                target_kind: "site",
                target_id: site.id.to_string(),
                target_name: site.name.clone(),
                before: None,
                after: snapshot(&site),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(site)
    }

    pub async fn list_sites(&self) -> Result<Vec<Site>> {
        let rows = sqlx::query::<Any>("SELECT * FROM sites ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(site_from_row).collect()
    }

    pub async fn get_site(&self, name: &str) -> Result<Site> {
        let row = sqlx::query::<Any>("SELECT * FROM sites WHERE name = $1 OR id = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "site",
                key: name.to_string(),
            })?;
        site_from_row(&row)
    }

    pub async fn delete_site(&self, actor: &Actor, name: &str) -> Result<()> {
        let site = self.get_site(name).await?;
        let mut tx = self.write_tx().await?;
        let racks: i64 = sqlx::query::<Any>("SELECT COUNT(*) AS n FROM racks WHERE site_id = $1")
            .bind(site.id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        if racks > 0 {
            return Err(StoreError::Refused(format!(
                "site `{}` still has {racks} racks: delete or move them first",
                site.name
            )));
        }
        sqlx::query::<Any>("DELETE FROM sites WHERE id = $1")
            .bind(site.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "site.delete",
                target_kind: "site",
                target_id: site.id.to_string(),
                target_name: site.name.clone(),
                before: snapshot(&site),
                after: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- racks ----

    pub async fn create_rack(&self, actor: &Actor, new: &RackCreate) -> Result<Rack> {
        check_name("rack", &new.name)?;
        let site = self.get_site(&new.site).await.map_err(|e| match e {
            StoreError::NotFound { .. } => StoreError::Invalid(format!(
                "site `{}` does not exist: create it first (kiln site add {})",
                new.site, new.site
            )),
            e => e,
        })?;
        let rack = Rack {
            id: RackId::new(),
            name: new.name.clone(),
            site: site.name.clone(),
            row: new.row.clone(),
            node_group: new.node_group.clone(),
            created_at: now(),
        };
        let mut tx = self.write_tx().await?;
        if sqlx::query::<Any>("SELECT 1 FROM racks WHERE site_id = $1 AND name = $2")
            .bind(site.id.to_string())
            .bind(&rack.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!(
                "rack `{}` already exists in site `{}`",
                rack.name, site.name
            )));
        }
        sqlx::query::<Any>(
            "INSERT INTO racks (id, site_id, name, row_name, node_group, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(rack.id.to_string())
        .bind(site.id.to_string())
        .bind(&rack.name)
        .bind(&rack.row)
        .bind(&rack.node_group)
        .bind(ts(rack.created_at))
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "rack.create",
                target_kind: "rack",
                target_id: rack.id.to_string(),
                target_name: rack.name.clone(),
                before: None,
                after: snapshot(&rack),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(rack)
    }

    /// Racks, optionally of one site, by site then name.
    pub async fn list_racks(&self, site: Option<&str>) -> Result<Vec<Rack>> {
        let rows = match site {
            Some(site) => {
                sqlx::query::<Any>(built(format!(
                    "{RACK_SELECT} WHERE s.name = $1 ORDER BY s.name, r.name"
                )))
                .bind(site)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query::<Any>(built(format!("{RACK_SELECT} ORDER BY s.name, r.name")))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(rack_from_row).collect()
    }

    /// The one rack called `name` (in `site`, if given).
    pub async fn find_rack(&self, site: Option<&str>, name: &str) -> Result<Rack> {
        let racks: Vec<Rack> = self
            .list_racks(site)
            .await?
            .into_iter()
            .filter(|r| r.name == name || r.id.to_string() == name)
            .collect();
        resolve_rack(racks, site, name)
    }

    pub async fn delete_rack(&self, actor: &Actor, site: Option<&str>, name: &str) -> Result<()> {
        let rack = self.find_rack(site, name).await?;
        let mut tx = self.write_tx().await?;
        let machines: i64 = sqlx::query::<Any>("SELECT COUNT(*) AS n FROM machines WHERE rack_id = $1")
            .bind(rack.id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        if machines > 0 {
            return Err(StoreError::Refused(format!(
                "rack `{}` still holds {machines} machines: move or delete them first",
                rack.name
            )));
        }
        sqlx::query::<Any>("DELETE FROM racks WHERE id = $1")
            .bind(rack.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "rack.delete",
                target_kind: "rack",
                target_id: rack.id.to_string(),
                target_name: rack.name.clone(),
                before: snapshot(&rack),
                after: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- tenants ----

    pub async fn create_tenant(&self, actor: &Actor, new: &TenantCreate) -> Result<Tenant> {
        check_name("tenant", &new.name)?;
        let tenant = Tenant {
            id: TenantId::new(),
            name: new.name.clone(),
            description: new.description.clone(),
            created_at: now(),
        };
        let mut tx = self.write_tx().await?;
        if sqlx::query::<Any>("SELECT 1 FROM tenants WHERE name = $1")
            .bind(&tenant.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!("tenant `{}` already exists", tenant.name)));
        }
        sqlx::query::<Any>("INSERT INTO tenants (id, name, description, created_at) VALUES ($1, $2, $3, $4)")
            .bind(tenant.id.to_string())
            .bind(&tenant.name)
            .bind(&tenant.description)
            .bind(ts(tenant.created_at))
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "tenant.create",
                target_kind: "tenant",
                target_id: tenant.id.to_string(),
                target_name: tenant.name.clone(),
                before: None,
                after: snapshot(&tenant),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(tenant)
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query::<Any>("SELECT * FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(tenant_from_row).collect()
    }

    pub async fn get_tenant(&self, name: &str) -> Result<Tenant> {
        let row = sqlx::query::<Any>("SELECT * FROM tenants WHERE name = $1 OR id = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "tenant",
                key: name.to_string(),
            })?;
        tenant_from_row(&row)
    }

    pub async fn delete_tenant(&self, actor: &Actor, name: &str) -> Result<()> {
        let tenant = self.get_tenant(name).await?;
        let mut tx = self.write_tx().await?;
        let machines: i64 = sqlx::query::<Any>("SELECT COUNT(*) AS n FROM machines WHERE owner_id = $1")
            .bind(tenant.id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        let tokens: i64 = sqlx::query::<Any>(
            "SELECT COUNT(*) AS n FROM tokens WHERE tenant_id = $1 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(tenant.id.to_string())
        .bind(ts(now()))
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if machines > 0 || tokens > 0 {
            return Err(StoreError::Refused(format!(
                "tenant `{}` still owns {machines} machines and {tokens} live tokens: \
                 reassign the machines and revoke the tokens first",
                tenant.name
            )));
        }
        // Revoked tokens keep pointing at the tenant; they go with it.
        sqlx::query::<Any>("DELETE FROM tokens WHERE tenant_id = $1")
            .bind(tenant.id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query::<Any>("DELETE FROM tenants WHERE id = $1")
            .bind(tenant.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "tenant.delete",
                target_kind: "tenant",
                target_id: tenant.id.to_string(),
                target_name: tenant.name.clone(),
                before: snapshot(&tenant),
                after: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- tokens ----

    /// Stores a token by the SHA-256 `hash` of its secret; it stops working
    /// at `expires_at` (none: never). How long a token may live is the
    /// server's policy, not the store's.
    pub async fn create_token(
        &self,
        actor: &Actor,
        name: Option<&str>,
        role: Role,
        tenant: Option<&str>,
        hash: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<TokenInfo> {
        let tenant = match (role, tenant) {
            (Role::Tenant, Some(t)) => Some(self.get_tenant(t).await.map_err(|e| match e {
                StoreError::NotFound { .. } => StoreError::Invalid(format!(
                    "tenant `{t}` does not exist: create it first (kiln tenant add {t})"
                )),
                e => e,
            })?),
            (Role::Tenant, None) => {
                return Err(StoreError::Invalid("a tenant token needs --tenant NAME".into()));
            }
            (_, Some(_)) => {
                return Err(StoreError::Invalid(format!(
                    "only tenant tokens belong to a tenant; drop --tenant or use --role tenant (not {role})"
                )));
            }
            (_, None) => None,
        };
        let id = TokenId::new();
        let name = match name {
            Some(n) => {
                check_name("token", n)?;
                n.to_string()
            }
            None => format!("{role}-{}", &id.to_string()[24..]),
        };
        let info = TokenInfo {
            id,
            name,
            role,
            tenant: tenant.as_ref().map(|t| t.name.clone()),
            created_at: now(),
            revoked_at: None,
            // Stored as text to the microsecond: what is returned equals what is re-read.
            expires_at: expires_at.map(|t| DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)),
            last_used_at: None,
            last_used_from: None,
        };
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>(
            "INSERT INTO tokens (id, name, role, tenant_id, hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(info.id.to_string())
        .bind(&info.name)
        .bind(info.role.as_str())
        .bind(tenant.as_ref().map(|t| t.id.to_string()))
        .bind(hash)
        .bind(ts(info.created_at))
        .bind(info.expires_at.map(ts))
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "token.create",
                target_kind: "token",
                target_id: info.id.to_string(),
                target_name: info.name.clone(),
                before: None,
                after: snapshot(&info),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(info)
    }

    /// The token whose secret hashes to `hash`, **revoked and expired ones
    /// included**, so that a refusal can say which and since when: the
    /// caller must check [`TokenInfo::state_at`](kiln_types::auth::TokenInfo::state_at).
    /// Read from the database on every call, never cached, so a revocation
    /// or an expiry counts from the very next request.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query::<Any>(built(format!("{TOKEN_SELECT} WHERE k.hash = $1")))
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    /// Records that token `id` authenticated a call at `at` from `from`,
    /// unless it was already recorded as used after `at - min_interval`:
    /// the condition is in the UPDATE itself, so servers sharing one
    /// database write it at most once per interval between them. Returns
    /// whether a row was written. Not audited: nobody changed anything.
    pub async fn touch_token(
        &self,
        id: TokenId,
        at: DateTime<Utc>,
        from: &str,
        min_interval: std::time::Duration,
    ) -> Result<bool> {
        let since = chrono::Duration::from_std(min_interval)
            .ok()
            .and_then(|d| at.checked_sub_signed(d))
            .unwrap_or(DateTime::UNIX_EPOCH);
        let _turn = self.write_turn().await?;
        let done = sqlx::query::<Any>(
            "UPDATE tokens SET last_used_at = $1, last_used_from = $2 \
             WHERE id = $3 AND (last_used_at IS NULL OR last_used_at <= $4)",
        )
        .bind(ts(at))
        .bind(from)
        .bind(id.to_string())
        .bind(ts(since))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query::<Any>(built(format!("{TOKEN_SELECT} ORDER BY k.created_at, k.id")))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| token_from_row(r).map(|t| t.info)).collect()
    }

    /// Revokes a token by id or name; revoking twice is not an error.
    pub async fn revoke_token(&self, actor: &Actor, key: &str) -> Result<TokenInfo> {
        let rows = sqlx::query::<Any>(built(format!("{TOKEN_SELECT} WHERE k.id = $1 OR k.name = $1")))
            .bind(key)
            .fetch_all(&self.pool)
            .await?;
        let tokens: Vec<TokenRecord> = rows.iter().map(token_from_row).collect::<Result<_>>()?;
        let before = match tokens.as_slice() {
            [] => {
                return Err(StoreError::NotFound {
                    kind: "token",
                    key: key.to_string(),
                });
            }
            [one] => one.info.clone(),
            _ => {
                return Err(StoreError::Invalid(format!(
                    "{} tokens are named `{key}`: revoke by id",
                    tokens.len()
                )));
            }
        };
        if before.revoked_at.is_some() {
            return Ok(before);
        }
        let mut after = before.clone();
        after.revoked_at = Some(now());
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>("UPDATE tokens SET revoked_at = $1 WHERE id = $2")
            .bind(after.revoked_at.map(ts))
            .bind(after.id.to_string())
            .execute(&mut *tx)
            .await?;
        record(
            &mut tx,
            actor,
            Change {
                action: "token.revoke",
                target_kind: "token",
                target_id: after.id.to_string(),
                target_name: after.name.clone(),
                before: snapshot(&before),
                after: snapshot(&after),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }
}

/// Picks the one rack among `racks` (all named `name`), or says why not.
pub(crate) fn resolve_rack(mut racks: Vec<Rack>, site: Option<&str>, name: &str) -> Result<Rack> {
    match racks.len() {
        0 => Err(StoreError::NotFound {
            kind: "rack",
            key: match site {
                Some(s) => format!("{s}/{name}"),
                None => name.to_string(),
            },
        }),
        1 => Ok(racks.remove(0)),
        _ => Err(StoreError::Invalid(format!(
            "rack name `{name}` exists in sites {}: say which with `site`",
            racks.iter().map(|r| r.site.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}
