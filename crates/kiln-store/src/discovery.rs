//! Discovery tokens that have been used: a discovery token carries one
//! report, and the record of its use lives here (not in a server's memory)
//! so a replay is refused after a restart and by every server on the same
//! PostgreSQL. Rows whose token has expired are pruned as new ones are
//! written: an expired token is refused for its age, its row proves nothing.

use chrono::{DateTime, Utc};
use kiln_types::MacAddr;
use sqlx::{Any, Row};

use crate::{Result, Store, now, parse_ts, ts};

/// What recording a token's use found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// The first use: recorded now.
    First,
    /// Used before, at this time: nothing was recorded.
    Replay { used_at: DateTime<Utc> },
}

impl Store {
    /// Records the use of the discovery token `nonce` (issued to `mac`,
    /// void after `expires_at`), atomically: of two concurrent uses, one is
    /// `First` and the other `Replay`.
    pub async fn use_discovery_token(&self, nonce: &str, mac: MacAddr, expires_at: DateTime<Utc>) -> Result<TokenUse> {
        let at = now();
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>("DELETE FROM discovery_tokens_used WHERE expires_at < $1")
            .bind(ts(at))
            .execute(&mut *tx)
            .await?;
        let inserted = sqlx::query::<Any>(
            "INSERT INTO discovery_tokens_used (nonce, mac, used_at, expires_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (nonce) DO NOTHING",
        )
        .bind(nonce)
        .bind(mac.to_string())
        .bind(ts(at))
        .bind(ts(expires_at))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let found = if inserted == 1 {
            TokenUse::First
        } else {
            let row = sqlx::query::<Any>("SELECT used_at FROM discovery_tokens_used WHERE nonce = $1")
                .bind(nonce)
                .fetch_one(&mut *tx)
                .await?;
            TokenUse::Replay {
                used_at: parse_ts(&row.try_get::<String, _>(0)?)?,
            }
        };
        tx.commit().await?;
        Ok(found)
    }

    /// Forgets the use of token `nonce`: for a report the server failed to
    /// handle (its own fault, a 5xx), so the agent's retry with the same
    /// token is not taken for a replay.
    pub async fn release_discovery_token(&self, nonce: &str) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query::<Any>("DELETE FROM discovery_tokens_used WHERE nonce = $1")
            .bind(nonce)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// How many used-token records are kept (for tests of the pruning).
    pub async fn discovery_tokens_kept(&self) -> Result<i64> {
        let row = sqlx::query::<Any>("SELECT COUNT(*) FROM discovery_tokens_used")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }
}
