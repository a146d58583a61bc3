//! Switch-port identity (issue 15): the MAC kiln learns for a NIC enrolled
//! by its port, the alert it raises when the port shows another MAC, and
//! the operator's confirmation that clears it. Each decides again inside
//! its write transaction with `kiln_types::port::observe` — the DHCP
//! listener decided on its in-memory copy, which another server may have
//! changed since — and each change is an audit event naming port and MAC.

use chrono::Utc;
use kiln_types::machine::{Machine, PortAlert, port_label};
use kiln_types::port::{Sighting, confirmed_nics, lookup_keys, observe};
use kiln_types::{MacAddr, TenantId};
use sqlx::{Any, Row};

use crate::events::{Change, record, snapshot};
use crate::machines::{bump_machines_generation, load};
use crate::{Actor, Backend, Result, Store, StoreError, now, ts};

/// What [`Store::observe_port`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum PortChange {
    /// Nothing: no machine on that port, or nothing new about it.
    None,
    /// The MAC was recorded on the machine's NIC on that port.
    Learned(Box<Machine>),
    /// The port showed another MAC: the machine is flagged.
    Flagged(Box<Machine>),
}

/// The id of the machine whose NIC records this port, if any.
async fn machine_on_port(
    conn: &mut sqlx::AnyConnection,
    circuit: Option<&str>,
    remote: Option<&str>,
) -> Result<Option<String>> {
    for (c, r) in lookup_keys(circuit, remote) {
        let sql = match (&c, &r) {
            (Some(_), Some(_)) => "SELECT machine_id FROM nics WHERE circuit_id = $1 AND remote_id = $2",
            (Some(_), None) => "SELECT machine_id FROM nics WHERE circuit_id = $1 AND remote_id IS NULL",
            _ => "SELECT machine_id FROM nics WHERE remote_id = $1 AND circuit_id IS NULL",
        };
        let mut q = sqlx::query::<Any>(sql);
        for v in [c, r].into_iter().flatten() {
            q = q.bind(v);
        }
        if let Some(row) = q.fetch_optional(&mut *conn).await? {
            return Ok(Some(row.try_get("machine_id")?));
        }
    }
    Ok(None)
}

/// The machine already recording `mac` on one of its NICs, other than `id`.
async fn mac_holder(conn: &mut sqlx::AnyConnection, mac: MacAddr, id: &str) -> Result<Option<String>> {
    let row = sqlx::query::<Any>(
        "SELECT m.hostname FROM nics n JOIN machines m ON m.id = n.machine_id WHERE n.mac = $1 AND n.machine_id <> $2",
    )
    .bind(mac.to_string())
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| r.try_get("hostname")).transpose()?)
}

async fn set_nic_mac(conn: &mut sqlx::AnyConnection, machine: &str, position: usize, mac: MacAddr) -> Result<()> {
    sqlx::query::<Any>("UPDATE nics SET mac = $1 WHERE machine_id = $2 AND position = $3")
        .bind(mac.to_string())
        .bind(machine)
        .bind(position as i64)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sets (or clears) the machine's port alert and stamps it changed at `at`.
async fn set_alert(
    conn: &mut sqlx::AnyConnection,
    machine: &str,
    alert: Option<&PortAlert>,
    at: chrono::DateTime<Utc>,
) -> Result<()> {
    let json = alert
        .map(|a| serde_json::to_string(a).map_err(|e| StoreError::Invalid(format!("port alert: {e}"))))
        .transpose()?;
    sqlx::query::<Any>("UPDATE machines SET port_alert = $1, port_alert_mac = $2, updated_at = $3 WHERE id = $4")
        .bind(json)
        .bind(alert.map(|a| a.seen_mac.to_string()))
        .bind(ts(at))
        .bind(machine)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn touch(conn: &mut sqlx::AnyConnection, machine: &str, at: chrono::DateTime<Utc>) -> Result<()> {
    sqlx::query::<Any>("UPDATE machines SET updated_at = $1 WHERE id = $2")
        .bind(ts(at))
        .bind(machine)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Store {
    /// A relayed DHCP request showed `mac` on the port (`circuit`,
    /// `remote`): learn the MAC for the NIC enrolled on that port without
    /// one, or flag the machine when the port shows another MAC than the
    /// one on record. Audited as `machine.port_learned` /
    /// `machine.port_flagged`. A MAC another machine already records is not
    /// learned (`Refused`): the inventory must say which machine it is.
    pub async fn observe_port(&self, mac: MacAddr, circuit: Option<&str>, remote: Option<&str>) -> Result<PortChange> {
        let mut tx = self.write_tx().await?;
        let Some(id) = machine_on_port(&mut tx, circuit, remote).await? else {
            return Ok(PortChange::None);
        };
        if self.backend == Backend::Postgres {
            sqlx::query::<Any>("SELECT id FROM machines WHERE id = $1 FOR UPDATE")
                .bind(&id)
                .fetch_all(&mut *tx)
                .await?;
        }
        let (before, _, _) = load(&mut tx, self.backend, &id, None).await?;
        let port = port_label(circuit, remote);
        let actor = Actor::new(format!("dhcp (relayed from {port})"));
        let at = now();
        let (action, mut after) = match observe(&before, mac, circuit, remote, at) {
            Sighting::NotByPort | Sighting::Known | Sighting::AlreadyFlagged => return Ok(PortChange::None),
            Sighting::Learn { nic, mac } => {
                if let Some(holder) = mac_holder(&mut tx, mac, &id).await? {
                    return Err(StoreError::Refused(format!(
                        "{port} of machine {} showed MAC {mac}, which machine {holder} records: not learned; \
                         correct the inventory (kiln machine edit)",
                        before.hostname
                    )));
                }
                set_nic_mac(&mut tx, &id, nic, mac).await?;
                touch(&mut tx, &id, at).await?;
                let mut after = before.clone();
                after.nics[nic].mac = Some(mac);
                ("machine.port_learned", after)
            }
            Sighting::Swapped { alert, .. } => {
                set_alert(&mut tx, &id, Some(&alert), at).await?;
                let mut after = before.clone();
                after.port_alert = Some(alert);
                ("machine.port_flagged", after)
            }
        };
        after.updated_at = at;
        record(
            &mut tx,
            &actor,
            Change {
                action,
                target_kind: "machine",
                target_id: id.clone(),
                target_name: before.hostname.to_string(),
                before: snapshot(&before),
                after: snapshot(&after),
            },
        )
        .await?;
        bump_machines_generation(&mut tx).await?;
        tx.commit().await?;
        self.note_machine_change();
        let after = Box::new(after);
        Ok(if action == "machine.port_learned" {
            PortChange::Learned(after)
        } else {
            PortChange::Flagged(after)
        })
    }

    /// The operator confirms the MAC a flagged port showed: the NIC on that
    /// port takes it, and the alert is cleared (`machine.port_confirmed`).
    pub async fn confirm_port(&self, actor: &Actor, key: &str, scope: Option<TenantId>) -> Result<Machine> {
        let mut tx = self.write_tx().await?;
        if self.backend == Backend::Postgres {
            sqlx::query::<Any>("SELECT id FROM machines WHERE id = $1 OR hostname = $1 FOR UPDATE")
                .bind(key)
                .fetch_all(&mut *tx)
                .await?;
        }
        let (before, _, _) = load(&mut tx, self.backend, key, scope).await?;
        let Some(alert) = before.port_alert.clone() else {
            return Err(StoreError::Refused(format!(
                "machine {} has no port alert: there is nothing to confirm",
                before.hostname
            )));
        };
        let id = before.id.to_string();
        let mut after = before.clone();
        if let Some(nics) = confirmed_nics(&before, &alert) {
            if let Some(holder) = mac_holder(&mut tx, alert.seen_mac, &id).await? {
                return Err(StoreError::Refused(format!(
                    "MAC {} is recorded on machine {holder}: remove it there first (kiln machine edit {holder})",
                    alert.seen_mac
                )));
            }
            let position = nics
                .iter()
                .position(|n| n.mac == Some(alert.seen_mac))
                .expect("confirmed_nics sets the MAC");
            set_nic_mac(&mut tx, &id, position, alert.seen_mac).await?;
            after.nics = nics;
        }
        let at = now();
        set_alert(&mut tx, &id, None, at).await?;
        after.port_alert = None;
        after.updated_at = at;
        record(
            &mut tx,
            actor,
            Change {
                action: "machine.port_confirmed",
                target_kind: "machine",
                target_id: id,
                target_name: before.hostname.to_string(),
                before: snapshot(&before),
                after: snapshot(&after),
            },
        )
        .await?;
        bump_machines_generation(&mut tx).await?;
        tx.commit().await?;
        self.note_machine_change();
        Ok(after)
    }

    /// The flagged machine whose port last showed `mac`: HTTP boot answers
    /// that MAC as this machine (with its disk), not as an unknown one.
    pub async fn find_machine_by_alert_mac(&self, mac: MacAddr) -> Result<Option<Machine>> {
        let row = sqlx::query::<Any>("SELECT id FROM machines WHERE port_alert_mac = $1")
            .bind(mac.to_string())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => {
                let id: String = r.try_get("id")?;
                match self.get_machine(&id, None).await {
                    Ok(m) => Ok(Some(m)),
                    Err(StoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            None => Ok(None),
        }
    }
}
