//! DHCP leases: durable before acknowledged, loaded at start with bad rows
//! quarantined rather than fatal. Leases are not in the audit log (they
//! change every few minutes per client); their table is their history.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use kiln_types::MacAddr;
use kiln_types::lease::Lease;
use kiln_types::machine::Machine;
use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use crate::{Result, Store, StoreError, now, parse_col, parse_ts, ts};

fn lease_from_row(row: &AnyRow) -> Result<Lease> {
    let machine_id: Option<String> = row.try_get("machine_id")?;
    Ok(Lease {
        ip: parse_col("lease ip", &row.try_get::<String, _>("ip")?)?,
        mac: parse_col("lease mac", &row.try_get::<String, _>("mac")?)?,
        state: parse_col("lease state", &row.try_get::<String, _>("state")?)?,
        machine_id: machine_id.as_deref().map(|m| parse_col("machine id", m)).transpose()?,
        hostname: row.try_get("hostname")?,
        expires_at: parse_ts(&row.try_get::<String, _>("expires_at")?)?,
    })
}

/// Leases loaded at start-up, and how many rows were quarantined.
#[derive(Debug)]
pub struct LoadedLeases {
    pub leases: Vec<Lease>,
    pub quarantined: usize,
}

impl Store {
    /// Makes `lease` durable: the row for its address now says this client,
    /// and the client's other bound leases are gone (one address per client).
    pub async fn commit_lease(&self, lease: &Lease) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>("DELETE FROM dhcp_leases WHERE mac = $1 AND ip <> $2 AND state = 'bound'")
            .bind(lease.mac.to_string())
            .bind(lease.ip.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query::<Any>(
            "INSERT INTO dhcp_leases (ip, mac, state, machine_id, hostname, expires_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (ip) DO UPDATE SET mac = excluded.mac, state = excluded.state, \
             machine_id = excluded.machine_id, hostname = excluded.hostname, \
             expires_at = excluded.expires_at, updated_at = excluded.updated_at",
        )
        .bind(lease.ip.to_string())
        .bind(lease.mac.to_string())
        .bind(lease.state.as_str())
        .bind(lease.machine_id.map(|m| m.to_string()))
        .bind(lease.hostname.clone())
        .bind(ts(lease.expires_at))
        .bind(ts(now()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends the lease of `ip` if `mac` holds it.
    pub async fn release_lease(&self, ip: Ipv4Addr, mac: MacAddr) -> Result<bool> {
        let done = sqlx::query::<Any>("DELETE FROM dhcp_leases WHERE ip = $1 AND mac = $2 AND state = 'bound'")
            .bind(ip.to_string())
            .bind(mac.to_string())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// All lease rows; unreadable ones are moved to the quarantine table.
    pub async fn load_leases(&self) -> Result<LoadedLeases> {
        let rows = sqlx::query::<Any>("SELECT * FROM dhcp_leases ORDER BY ip")
            .fetch_all(&self.pool)
            .await?;
        let mut leases = vec![];
        let mut quarantined = 0;
        for row in &rows {
            match lease_from_row(row) {
                Ok(l) => leases.push(l),
                Err(e) => {
                    let ip: Option<String> = row.try_get("ip").ok();
                    let raw = serde_json::json!({
                        "ip": ip,
                        "mac": row.try_get::<Option<String>, _>("mac").ok().flatten(),
                        "state": row.try_get::<Option<String>, _>("state").ok().flatten(),
                        "expires_at": row.try_get::<Option<String>, _>("expires_at").ok().flatten(),
                    });
                    tracing::warn!(ip = ?ip, error = %e, "quarantining an unreadable DHCP lease");
                    let mut tx = self.write_tx().await?;
                    sqlx::query::<Any>(
                        "INSERT INTO dhcp_lease_quarantine (ip, row_json, reason, at) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(ip.clone())
                    .bind(raw.to_string())
                    .bind(e.to_string())
                    .bind(ts(now()))
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query::<Any>("DELETE FROM dhcp_leases WHERE ip = $1")
                        .bind(ip)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    quarantined += 1;
                }
            }
        }
        Ok(LoadedLeases { leases, quarantined })
    }

    /// Leases by address; `all` includes expired ones. Unreadable rows are
    /// left for the next start-up's quarantine: listing changes nothing.
    pub async fn list_leases(&self, all: bool, at: DateTime<Utc>) -> Result<Vec<Lease>> {
        let rows = sqlx::query::<Any>("SELECT * FROM dhcp_leases ORDER BY ip")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| lease_from_row(r).ok())
            .filter(|l| all || l.is_live(at))
            .collect())
    }

    /// The machine a DHCP request comes from: by the switch port a relay
    /// reported (option 82), else by MAC.
    pub async fn find_machine_by_nic(
        &self,
        mac: MacAddr,
        circuit_id: Option<&str>,
        remote_id: Option<&str>,
    ) -> Result<Option<Machine>> {
        let by_port = match (circuit_id, remote_id) {
            (Some(c), Some(r)) => {
                sqlx::query::<Any>("SELECT machine_id FROM nics WHERE circuit_id = $1 AND remote_id = $2")
                    .bind(c)
                    .bind(r)
                    .fetch_optional(&self.pool)
                    .await?
            }
            (Some(c), None) => {
                sqlx::query::<Any>("SELECT machine_id FROM nics WHERE circuit_id = $1 AND remote_id IS NULL")
                    .bind(c)
                    .fetch_optional(&self.pool)
                    .await?
            }
            _ => None,
        };
        let row = match by_port {
            Some(r) => Some(r),
            None => {
                sqlx::query::<Any>("SELECT machine_id FROM nics WHERE mac = $1")
                    .bind(mac.to_string())
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        match row {
            Some(r) => {
                let id: String = r.try_get("machine_id")?;
                match self.get_machine(&id, None).await {
                    Ok(m) => Ok(Some(m)),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            None => Ok(None),
        }
    }

    /// A number that changes whenever any machine is created, changed or
    /// deleted: one primary-key read tells a cache whether it is stale.
    pub async fn machines_generation(&self) -> Result<i64> {
        let row = sqlx::query::<Any>("SELECT value FROM generations WHERE name = 'machines'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    /// Every machine's inventory IPv4 address: never handed out from a pool
    /// to another client.
    pub async fn reserved_ipv4s(&self) -> Result<Vec<Ipv4Addr>> {
        let rows = sqlx::query::<Any>("SELECT ipv4 FROM machines WHERE ipv4 IS NOT NULL")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| parse_col("ipv4", &r.try_get::<String, _>("ipv4")?))
            .collect()
    }
}
