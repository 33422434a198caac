//! Storage: the sea-orm connection, migrations, write transactions and portable raw SQL.
//!
//! PostgreSQL and SQLite are both first-class. SQLite allows one writer at a time, so on SQLite
//! every write transaction first takes a process-wide async lock (readers are never blocked: the
//! database runs in WAL mode). On PostgreSQL the lock is absent and row locks do the work.

pub mod entities;

use std::{path::Path, sync::Arc, time::Duration};

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    FromQueryResult, QueryResult, Statement, TransactionTrait, Value,
};
use sluice_migrations::MigratorTrait;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// The database handle shared by every request.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: DbBackend,
    write_lock: Option<Arc<Mutex<()>>>,
}

/// A write transaction; on SQLite it also holds the single-writer lock until it ends.
pub struct WriteTxn {
    txn: DatabaseTransaction,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl std::ops::Deref for WriteTxn {
    type Target = DatabaseTransaction;
    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl WriteTxn {
    /// Commits the transaction.
    pub async fn commit(self) -> Result<(), DbErr> {
        self.txn.commit().await
    }
}

/// The SQLite URL of the embedded database inside `data_dir`.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("sluice.db").display())
}

impl Store {
    /// Connects to `url` (`postgres://...` or `sqlite://...`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbErr> {
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.max_connections(max_connections)
            .min_connections(1)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10))
            // A connection used a moment ago is handed out as it is; only one idle for a while
            // (which a server, proxy or firewall may have dropped) is pinged first. Pinging on
            // every checkout would add a round trip to every query and transaction.
            .test_before_acquire_if_idle_for(Duration::from_secs(30))
            .sqlx_logging(false)
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(15))
                    .foreign_keys(true)
            });
        let db = Database::connect(opts).await?;
        let backend = db.get_database_backend();
        let write_lock = (backend == DbBackend::Sqlite).then(|| Arc::new(Mutex::new(())));
        Ok(Self { db, backend, write_lock })
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<(), DbErr> {
        sluice_migrations::Migrator::up(&self.db, None).await
    }

    /// The connection, for reads.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Which database this is.
    pub fn backend(&self) -> DbBackend {
        self.backend
    }

    /// Begins a write transaction.
    pub async fn write(&self) -> Result<WriteTxn, DbErr> {
        let guard = match &self.write_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let txn = self.db.begin().await?;
        Ok(WriteTxn { txn, _guard: guard })
    }

    /// A statement written with PostgreSQL placeholders (`$1`, `$2`, ...), translated for SQLite.
    pub fn stmt(&self, sql: &str, values: Vec<Value>) -> Statement {
        stmt(self.backend, sql, values)
    }

    /// Runs a query and maps every row.
    pub async fn query_all<T: FromQueryResult>(
        &self,
        conn: &impl ConnectionTrait,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Vec<T>, DbErr> {
        let rows = conn.query_all_raw(self.stmt(sql, values)).await?;
        rows.iter().map(|r| T::from_query_result(r, "")).collect()
    }

    /// Runs a query and maps the first row, if any.
    pub async fn query_one<T: FromQueryResult>(
        &self,
        conn: &impl ConnectionTrait,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Option<T>, DbErr> {
        let row: Option<QueryResult> = conn.query_one_raw(self.stmt(sql, values)).await?;
        row.map(|r| T::from_query_result(&r, "")).transpose()
    }

    /// Executes a statement and returns the number of rows affected.
    pub async fn execute(&self, conn: &impl ConnectionTrait, sql: &str, values: Vec<Value>) -> Result<u64, DbErr> {
        Ok(conn.execute_raw(self.stmt(sql, values)).await?.rows_affected())
    }

    /// `FOR UPDATE` on PostgreSQL; nothing on SQLite, where the write lock serializes writers.
    pub fn for_update(&self) -> &'static str {
        if self.backend == DbBackend::Postgres { " FOR UPDATE" } else { "" }
    }

    /// The database's clock: PostgreSQL's `now()` (the transaction's start when `conn` is a
    /// transaction); SQLite runs in this process, so its clock is ours. Leases and alarms are
    /// measured on it, never on a worker's clock.
    pub async fn now(&self, conn: &impl ConnectionTrait) -> Result<chrono::DateTime<chrono::Utc>, DbErr> {
        #[derive(FromQueryResult)]
        struct Now {
            now: chrono::DateTime<chrono::Utc>,
        }
        if self.backend == DbBackend::Postgres {
            let row: Option<Now> = self.query_one(conn, "SELECT now() AS now", vec![]).await?;
            Ok(row.map_or_else(chrono::Utc::now, |r| r.now))
        } else {
            Ok(chrono::Utc::now())
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), DbErr> {
        self.db.ping().await
    }
}

/// Translates `$n` placeholders to SQLite's `?n`.
pub fn stmt(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    if backend == DbBackend::Sqlite {
        Statement::from_sql_and_values(backend, sql.replace('$', "?"), values)
    } else {
        Statement::from_sql_and_values(backend, sql, values)
    }
}

/// Whether a database error is a unique-key violation.
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
}
