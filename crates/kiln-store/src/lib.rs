//! kiln's store: the inventory on SQLite (embedded default) or PostgreSQL,
//! behind one API and one set of SQL statements.
//!
//! Why one code path: both backends are reached through sqlx's `Any` driver
//! with runtime-checked queries written in the SQL both dialects share
//! (`$N` parameters, TEXT for ids/timestamps/JSON, BIGINT, BOOLEAN). Each
//! backend has its own migration directory, kept column-for-column alike.
//! The conformance tests run every store test body on both backends, which is
//! what catches a dialect difference; compile-time checked queries would need
//! two copies of every statement instead.
//!
//! The store holds no business rules beyond integrity: uniqueness is enforced
//! by the database (hostname, MAC, switch port, BMC address, IPs) and checked
//! ahead of time only to produce a message that names the other machine.
//! Every change writes its audit event in the same transaction.

mod catalog;
mod discovery;
mod events;
mod jobs;
mod leases;
mod machines;
mod network;
mod org;
mod ports;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use kiln_types::error::ErrorDetail;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyConnection, AnyPool, Executor};
use tokio::sync::{Mutex, OwnedMutexGuard};

pub use discovery::TokenUse;
pub use jobs::{ArmRecord, JobControl, JobRecord, JobSave, LogLine, NewJob};
pub use leases::{LeaseWrite, LoadedLeases};
pub use machines::{NewMachine, SealedPassword};
pub use network::Assignment;
pub use org::TokenRecord;
pub use ports::PortChange;

/// The database behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} `{key}` not found")]
    NotFound { kind: &'static str, key: String },
    /// A uniqueness rule was hit; the message names the holder.
    #[error("{0}")]
    Conflict(String),
    /// The input refers to something that does not exist, or breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// The change is not allowed in the record's current state.
    #[error("{0}")]
    Refused(String),
    /// Rows of a (multi-row) write are bad; nothing was written.
    /// `conflict` is true when every problem is a uniqueness clash.
    #[error("{} of the rows are invalid; nothing was written", details.len())]
    Rows { conflict: bool, details: Vec<ErrorDetail> },
    #[error("unsupported database URL `{0}`: use sqlite://PATH or postgres://…")]
    BadUrl(String),
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("migrating the database schema failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return StoreError::Conflict(unique_violation_message(db.as_ref()));
        }
        StoreError::Database(e)
    }
}

/// Turns a unique-index violation into words. The index names are the same
/// on both backends; SQLite reports `table.column`, PostgreSQL the index.
fn unique_violation_message(db: &dyn sqlx::error::DatabaseError) -> String {
    let what = db.constraint().unwrap_or_default().to_string() + " " + db.message();
    let field = [
        ("hostname", "hostname"),
        ("fqdn", "FQDN"),
        ("bmc_address", "BMC address"),
        ("ipv4", "IPv4 address"),
        ("ipv6", "IPv6 address"),
        ("nics.mac", "MAC address"),
        ("nics_pkey", "MAC address"),
        ("switch", "switch port"),
        ("circuit_id", "option 82 circuit-id/remote-id"),
        ("option82", "option 82 circuit-id/remote-id"),
        ("name", "name"),
        ("hash", "token"),
    ]
    .iter()
    .find(|(needle, _)| what.contains(needle))
    .map(|(_, field)| *field)
    .unwrap_or("value");
    format!("that {field} is already in use")
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Who makes a change, as written into the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

impl Actor {
    pub fn new(name: impl Into<String>) -> Self {
        Actor(name.into())
    }
}

/// The inventory store. Cheap to clone (a pool handle).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Machine changes committed through this handle (and its clones):
    /// an in-process cache compares it for free on every use, and reads the
    /// database generation only now and then for other servers' changes.
    machine_changes_here: Arc<AtomicU64>,
    /// SQLite only: whose turn it is to write (see [`Store::write_turn`]).
    write_gate: Option<Arc<Mutex<()>>>,
}

/// How long a SQLite writer waits for its turn in this process: the
/// `busy_timeout` the connections are given below.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A write transaction and, on SQLite, this process's turn to write, given
/// back once the transaction is over (committed, or dropped: rolled back).
/// Derefs to the connection, like a `sqlx::Transaction`.
pub(crate) struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    /// Dropped after `tx` (fields drop in order).
    _turn: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub(crate) async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

/// Pool settings per backend.
fn pool_options(backend: Backend, max_connections: u32) -> AnyPoolOptions {
    let options = AnyPoolOptions::new()
        .acquire_timeout(Duration::from_secs(10))
        .max_connections(max_connections);
    match backend {
        // One writer at a time is SQLite's model; WAL lets readers go on
        // beside it, busy_timeout makes writers queue instead of failing.
        Backend::Sqlite => options.after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                )
                .await?;
                Ok(())
            })
        }),
        Backend::Postgres => options,
    }
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Store {
    /// The embedded default: `kiln.db` in `data_dir`, created if missing.
    pub async fn open_data_dir(data_dir: &Path) -> Result<Store> {
        let path = data_dir.join("kiln.db");
        Store::connect(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Connects to `url` (`sqlite://…` or `postgres://…`) and brings the
    /// schema up to date.
    pub async fn connect(url: &str) -> Result<Store> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::BadUrl(url.to_string()));
        };
        let pool = pool_options(backend, if backend == Backend::Sqlite { 8 } else { 16 })
            .connect(url)
            .await?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&pool).await.map_err(StoreError::Migrate)?;
        Ok(Store {
            pool,
            backend,
            machine_changes_here: Arc::new(AtomicU64::new(0)),
            write_gate: (backend == Backend::Sqlite).then(Arc::default),
        })
    }

    /// The same database through a pool of its own with at most
    /// `max_connections`, for a service that runs on a runtime of its own
    /// (a connection belongs to the runtime that opened it). Changes made
    /// through either handle count in `machine_changes_here` of both, and
    /// their writers take turns with each other.
    pub async fn with_own_pool(&self, max_connections: u32) -> Result<Store> {
        let options = (*self.pool.connect_options()).clone();
        let pool = pool_options(self.backend, max_connections)
            .connect_with(options)
            .await?;
        Ok(Store {
            pool,
            backend: self.backend,
            machine_changes_here: self.machine_changes_here.clone(),
            write_gate: self.write_gate.clone(),
        })
    }

    /// A transaction for a change. On SQLite it takes the write lock at
    /// once (`BEGIN IMMEDIATE`): a read-then-write transaction that upgrades
    /// later fails with "database is locked" when another writer got there
    /// first, whatever the busy timeout. It waits for its turn first
    /// ([`Store::write_turn`]), holding no connection meanwhile.
    pub(crate) async fn write_tx(&self) -> Result<WriteTx> {
        let turn = self.write_turn().await?;
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _turn: turn })
    }

    /// On SQLite, this process's turn to write, held until the write is
    /// over; `None` on PostgreSQL (row locks). SQLite has one writer at a
    /// time, and a connection that finds the write lock taken sleeps in its
    /// busy handler (1, 2, 5 … 100 ms between tries): under load the lock
    /// sat free while the next writers slept (bench/reimage.sh measured
    /// 190 s of such sleeps in a 28 s run). Waiting here instead hands the
    /// lock over at once, in order. Other processes (the CLI's offline
    /// verbs) still meet the busy handler. Gives up like the busy timeout.
    pub(crate) async fn write_turn(&self) -> Result<Option<OwnedMutexGuard<()>>> {
        let Some(gate) = &self.write_gate else {
            return Ok(None);
        };
        match tokio::time::timeout(SQLITE_BUSY_TIMEOUT, gate.clone().lock_owned()).await {
            Ok(turn) => Ok(Some(turn)),
            Err(_) => Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
        }
    }

    /// The pool itself, for tests and maintenance tools that must reach
    /// under the store's API (e.g. to prove the database enforces a rule).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// How many machine changes this process has committed: when it moves,
    /// an in-process copy of the machines is stale. Changes made by other
    /// servers on a shared PostgreSQL show only in `machines_generation`.
    pub fn machine_changes_here(&self) -> u64 {
        self.machine_changes_here.load(Ordering::Acquire)
    }

    pub(crate) fn note_machine_change(&self) {
        self.machine_changes_here.fetch_add(1, Ordering::AcqRel);
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers (for `/healthz`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Now, as stored.
pub(crate) fn now() -> DateTime<Utc> {
    // Truncate to what the text form keeps, so a returned record equals a
    // re-read one.
    let t = Utc::now();
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("timestamp `{s}`: {e}")))
}

pub(crate) fn parse_col<T: std::str::FromStr>(what: &str, s: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| StoreError::Corrupt(format!("{what} `{s}`: {e}")))
}

/// `$1, $2, …, $n` starting after `first - 1` parameters.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `($1, …, $cols), (…)` for `rows` rows.
pub(crate) fn values(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| format!("({})", placeholders(r * cols + 1, cols)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Cursor values are opaque to clients: hex of the sort key.
pub(crate) fn encode_cursor(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<String> {
    let bad = || {
        StoreError::Invalid(format!(
            "cursor `{cursor}` is not one kiln gave out: pass `next_cursor` from the previous page unchanged"
        ))
    };
    if !cursor.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16))
        .collect();
    String::from_utf8(bytes.map_err(|_| bad())?).map_err(|_| bad())
}

pub(crate) fn page_limit(limit: Option<u32>) -> Result<usize> {
    use kiln_types::page::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};
    match limit {
        None => Ok(DEFAULT_PAGE_LIMIT as usize),
        Some(n) if (1..=MAX_PAGE_LIMIT).contains(&n) => Ok(n as usize),
        Some(n) => Err(StoreError::Invalid(format!("limit {n} is outside 1-{MAX_PAGE_LIMIT}"))),
    }
}

/// Marks SQL assembled in this crate from constant fragments and `$N`
/// placeholders. No value is ever formatted into SQL: every value is bound.
pub(crate) fn built(sql: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql)
}

/// Bound text parameters of a query assembled at run time.
#[derive(Debug, Default)]
pub(crate) struct Params(Vec<String>);

impl Params {
    /// Adds `value` and returns its placeholder (`$N`).
    pub(crate) fn add(&mut self, value: String) -> String {
        self.0.push(value);
        format!("${}", self.0.len())
    }

    pub(crate) fn bind_all<'q>(
        self,
        mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
        for v in self.0 {
            q = q.bind(v);
        }
        q
    }
}
