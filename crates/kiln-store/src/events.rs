//! The append-only audit log: written inside the transaction of each change,
//! read newest first with filters.

use kiln_types::event::{Event, EventFilter};
use kiln_types::page::Page;
use serde::Serialize;
use sqlx::{Any, AnyConnection, Row};

use crate::{
    Actor, Params, Result, Store, StoreError, built, decode_cursor, encode_cursor, now, page_limit, parse_ts, ts,
};

/// One audit record about to be written.
pub(crate) struct Change<'a> {
    pub action: &'a str,
    pub target_kind: &'a str,
    pub target_id: String,
    pub target_name: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

pub(crate) fn snapshot<T: Serialize>(value: &T) -> Option<serde_json::Value> {
    serde_json::to_value(value).ok()
}

/// Appends `change` on `conn`, which is inside the change's transaction.
pub(crate) async fn record(conn: &mut AnyConnection, actor: &Actor, change: Change<'_>) -> Result<()> {
    record_many(conn, actor, vec![change]).await
}

/// Appends many records in multi-row statements (bulk imports).
pub(crate) async fn record_many(conn: &mut AnyConnection, actor: &Actor, changes: Vec<Change<'_>>) -> Result<()> {
    let at = ts(now());
    for chunk in changes.chunks(1000) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|r| format!("({})", crate::placeholders(r * 8 + 1, 8)))
            .collect();
        let sql = format!(
            "INSERT INTO events (at, actor, action, target_kind, target_id, target_name, before_json, after_json) VALUES {}",
            rows.join(", ")
        );
        let mut q = sqlx::query::<Any>(built(sql));
        for c in chunk {
            q = q
                .bind(at.clone())
                .bind(actor.0.clone())
                .bind(c.action)
                .bind(c.target_kind)
                .bind(c.target_id.clone())
                .bind(c.target_name.clone())
                .bind(c.before.as_ref().map(|v| v.to_string()))
                .bind(c.after.as_ref().map(|v| v.to_string()));
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

impl Store {
    /// Audit events, newest first.
    pub async fn list_events(&self, filter: &EventFilter) -> Result<Page<Event>> {
        let limit = page_limit(filter.limit)?;
        let mut sql = String::from(
            "SELECT id, at, actor, action, target_kind, target_id, target_name, before_json, after_json \
             FROM events WHERE 1 = 1",
        );
        let mut params = Params::default();
        if let Some(k) = &filter.target_kind {
            sql.push_str(&format!(" AND target_kind = {}", params.add(k.clone())));
        }
        if let Some(t) = &filter.target {
            let p = params.add(t.clone());
            sql.push_str(&format!(" AND (target_id = {p} OR target_name = {p})"));
        }
        if let Some(a) = &filter.action {
            let p = params.add(format!("{}%", escape_like(a)));
            sql.push_str(&format!(" AND action LIKE {p} ESCAPE '\\'"));
        }
        if let Some(a) = &filter.actor {
            let p = params.add(format!("%{}%", escape_like(a)));
            sql.push_str(&format!(" AND actor LIKE {p} ESCAPE '\\'"));
        }
        if let Some(since) = filter.since {
            sql.push_str(&format!(" AND at >= {}", params.add(ts(since))));
        }
        if let Some(c) = &filter.cursor {
            let id: i64 = decode_cursor(c)?
                .parse()
                .map_err(|_| StoreError::Invalid(format!("cursor `{c}` is not one kiln gave out")))?;
            // Ids are compared as numbers; bound as text they would not be.
            sql.push_str(&format!(" AND id < {id}"));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
        let q = params.bind_all(sqlx::query::<Any>(built(sql)));
        let rows = q.fetch_all(&self.pool).await?;
        let mut items = Vec::with_capacity(rows.len());
        for row in &rows {
            let json = |col: &str| -> Result<Option<serde_json::Value>> {
                let s: Option<String> = row.try_get(col)?;
                s.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("event {col}: {e}"))))
                    .transpose()
            };
            items.push(Event {
                id: row.try_get("id")?,
                at: parse_ts(&row.try_get::<String, _>("at")?)?,
                actor: row.try_get("actor")?,
                action: row.try_get("action")?,
                target_kind: row.try_get("target_kind")?,
                target_id: row.try_get("target_id")?,
                target_name: row.try_get("target_name")?,
                before: json("before_json")?,
                after: json("after_json")?,
            });
        }
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|e| encode_cursor(&e.id.to_string()))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }
}

/// Escapes `%`, `_` and `\` for a LIKE pattern with `ESCAPE '\'`.
pub(crate) fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

impl Store {
    /// Appends one audit event that is not a change of a stored record: a
    /// BMC action (`bmc.power`, `bmc.bootdev`, `bmc.check`) or an
    /// observation (`bmc.power.drift`). `detail` is what happened and its
    /// result; it must hold no secret (the BMC service builds it from
    /// values that hold none).
    pub async fn record_event(
        &self,
        actor: &Actor,
        action: &str,
        target_kind: &str,
        target_id: String,
        target_name: String,
        detail: serde_json::Value,
    ) -> Result<()> {
        let _turn = self.write_turn().await?;
        let mut conn = self.pool.acquire().await?;
        record(
            &mut conn,
            actor,
            Change {
                action,
                target_kind,
                target_id,
                target_name,
                before: None,
                after: Some(detail),
            },
        )
        .await
    }
}
