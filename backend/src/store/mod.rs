//! Storage: the sea-orm connection, migrations, write transactions and portable raw SQL.
//!
//! PostgreSQL and SQLite are both first-class. SQLite allows one writer at a time, so on SQLite
//! every write transaction first takes a process-wide async lock (readers are never blocked: the
//! database runs in WAL mode), and runs on the one connection kept for writes: a SQLite
//! connection drops its whole page cache when it finds that another connection wrote, so writes
//! spread over the pool would each read back, from the file, every page they touch. On
//! PostgreSQL the lock is absent and row locks do the work.

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
    /// SQLite's one connection for write transactions (a database file only).
    writer: Option<DatabaseConnection>,
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

/// The file of a SQLite URL (`sqlite://path?options`), if it names one.
fn sqlite_file(url: &str) -> Option<&str> {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(":memory:")).then_some(path)
}

/// Makes the database file readable and writable by this process's user only, creating it so if
/// it does not exist yet. SQLite gives its `-wal` and `-shm` files the database file's
/// permissions; tasks, which may run as another user, must read none of them.
fn owner_only(path: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(false).mode(0o600);
        drop(options.open(path)?);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The SQLite URL of the embedded database inside `data_dir`.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", data_dir.join("sluice.db").display())
}

impl Store {
    /// Connects to `url` (`postgres://...` or `sqlite://...`). On PostgreSQL the connections
    /// carry `application_name` (unless the URL sets one), so `pg_stat_activity` tells which
    /// process holds which connection: a process that holds leases passes its worker name,
    /// the `lease_owner` of the tasks it runs.
    pub async fn connect(url: &str, max_connections: u32, application_name: &str) -> Result<Self, DbErr> {
        let application_name = application_name.to_owned();
        if let Some(path) = sqlite_file(url) {
            owner_only(path).map_err(|e| DbErr::Custom(format!("securing the database file {path}: {e}")))?;
        }
        let options = |max_connections: u32| {
            let application_name = application_name.clone();
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
                .map_sqlx_postgres_opts(move |o| {
                    if o.get_application_name().is_some() { o } else { o.application_name(&application_name) }
                })
                .map_sqlx_sqlite_opts(|o| {
                    o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                        .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                        .busy_timeout(Duration::from_secs(15))
                        .foreign_keys(true)
                });
            opts
        };
        let db = Database::connect(options(max_connections)).await?;
        let backend = db.get_database_backend();
        let write_lock = (backend == DbBackend::Sqlite).then(|| Arc::new(Mutex::new(())));
        // (An in-memory database is one per connection: it has no second pool.)
        let writer = if backend == DbBackend::Sqlite && sqlite_file(url).is_some() {
            Some(Database::connect(options(1)).await?)
        } else {
            None
        };
        Ok(Self { db, writer, backend, write_lock })
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

    /// Begins a write transaction. On SQLite it is `BEGIN IMMEDIATE`: it takes the database's
    /// write lock at once, waiting for it (the busy timeout) while another process (an admin
    /// command) writes, or, on an in-memory database, while a transaction dropped a moment ago is
    /// still being rolled back on another connection (a drop only queues the rollback; on a file,
    /// writes share one connection, which runs that rollback first). A deferred one would read
    /// first and then fail at its first write with "database is locked": SQLite does not wait when
    /// a reading transaction asks for the write lock.
    pub async fn write(&self) -> Result<WriteTxn, DbErr> {
        let guard = match &self.write_lock {
            Some(lock) => Some(lock.clone().lock_owned().await),
            None => None,
        };
        let txn = if self.backend == DbBackend::Sqlite {
            let options = sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            };
            self.writer.as_ref().unwrap_or(&self.db).begin_with_options(options).await?
        } else {
            self.db.begin().await?
        };
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

    /// Executes several statements (each with its own `$1..` placeholders) in as few round trips
    /// as [`Store::execute_each`] and returns how many rows they changed in all.
    pub async fn execute_together(
        &self,
        conn: &impl ConnectionTrait,
        parts: Vec<(String, Vec<Value>)>,
    ) -> Result<u64, DbErr> {
        Ok(self.execute_each(conn, parts).await?.total())
    }

    /// Executes several statements (each with its own `$1..` placeholders), up to [`COMBINE`] per
    /// round trip: on PostgreSQL as the data-modifying parts of one statement (they must not
    /// depend on one another's effects, except through foreign keys, which are checked at its
    /// end, and no two may change the same row: PostgreSQL would apply only one), each reporting
    /// how many rows it changed; on SQLite as one string of statements, whose changes are only
    /// counted together.
    pub async fn execute_each(
        &self,
        conn: &impl ConnectionTrait,
        mut parts: Vec<(String, Vec<Value>)>,
    ) -> Result<Changed, DbErr> {
        if parts.len() == 1
            && let Some((sql, values)) = parts.pop()
        {
            return Ok(Changed::Each(vec![self.execute(conn, &sql, values).await?]));
        }
        let postgres = self.backend == DbBackend::Postgres;
        let mut each: Vec<u64> = Vec::with_capacity(parts.len());
        let mut total = 0;
        let mut parts = parts.into_iter().peekable();
        while parts.peek().is_some() {
            let chunk = parts.by_ref().take(COMBINE);
            let mut sql = String::new();
            let mut values: Vec<Value> = vec![];
            if postgres {
                let mut counts = String::new();
                let mut n = 0;
                for (i, (part, part_values)) in chunk.enumerate() {
                    sql.push_str(if i == 0 { "WITH " } else { ", " });
                    sql.push_str(&format!("w{i} AS ({} RETURNING 1)", shift_placeholders(&part, values.len())));
                    values.extend(part_values);
                    if i > 0 {
                        counts.push_str(" UNION ALL ");
                    }
                    counts.push_str(&format!("SELECT {i} AS i, COUNT(*) AS n FROM w{i}"));
                    n += 1;
                }
                #[derive(FromQueryResult)]
                struct Count {
                    i: i32,
                    n: i64,
                }
                let rows: Vec<Count> = self.query_all(conn, &format!("{sql} {counts}"), values).await?;
                let start = each.len();
                each.resize(start + n, 0);
                for c in rows {
                    if let Some(slot) = usize::try_from(c.i).ok().and_then(|i| each.get_mut(start + i)) {
                        *slot = u64::try_from(c.n).unwrap_or_default();
                    }
                }
            } else {
                // Placeholders in order of appearance: the SQLite driver numbers unnamed
                // placeholders across the statements of a string (numbered ones it does not).
                for (part, part_values) in chunk {
                    sql.push_str(&positional(&part, &part_values, &mut values));
                    sql.push_str(";\n");
                }
                total += self.execute(conn, &sql, values).await?;
            }
        }
        Ok(if postgres { Changed::Each(each) } else { Changed::Total(total) })
    }

    /// Executes updates (each with its own `$1..` placeholders and the number of rows it must
    /// change) so that they are applied together or not at all, in one round trip: the first is
    /// applied first (its row locks are taken before any other's), every other applies only if
    /// the first changed a row, and unless each changed exactly the rows it must, none is
    /// applied. An insert (a part whose count is `None`, after the first) is neither conditional
    /// nor counted: it inserts every row or fails, and it is undone with the rest. Returns false
    /// when nothing was applied so, or when PostgreSQL broke a deadlock by failing the
    /// statement. At most [`COMBINE`] parts.
    ///
    /// On PostgreSQL this is one statement outside any transaction, which PostgreSQL applies
    /// whole or not at all. On a SQLite file it is one call on the writers' connection, under
    /// the process's write lock: `BEGIN IMMEDIATE`, each update followed by the check of its
    /// count (an insert into a temporary table whose `CHECK` fails on a wrong count, which
    /// stops the call), and `COMMIT`; a call stopped short is rolled back. (An in-memory SQLite
    /// database has no writers' connection: there nothing is applied, and false is returned.)
    pub async fn execute_guarded(&self, parts: Vec<(String, Vec<Value>, Option<u64>)>) -> Result<bool, DbErr> {
        debug_assert!(parts.len() <= COMBINE);
        if self.backend == DbBackend::Sqlite {
            return self.execute_guarded_sqlite(parts).await;
        }
        const MISMATCH: &str = "sluice: rows changed concurrently";
        let mut sql = String::new();
        let mut values: Vec<Value> = vec![];
        let mut checks = vec![];
        for (i, (part, part_values, expect)) in parts.into_iter().enumerate() {
            let part = shift_placeholders(&part, values.len());
            values.extend(part_values);
            // An uncorrelated condition is evaluated once, before the update scans: so the first
            // update runs (and locks) before this one.
            let after_first = if i > 0 && expect.is_some() { " AND EXISTS (SELECT 1 FROM w0)" } else { "" };
            sql.push_str(if i == 0 { "WITH " } else { ", " });
            sql.push_str(&format!("w{i} AS ({part}{after_first} RETURNING 1)"));
            if let Some(n) = expect {
                checks.push(format!("(SELECT COUNT(*) FROM w{i}) = {n}"));
            }
        }
        if checks.is_empty() {
            checks.push("TRUE".to_owned());
        }
        // A failed cast is how a plain SQL statement fails on purpose.
        sql.push_str(&format!(
            " SELECT CAST(CASE WHEN {} THEN '1' ELSE '{MISMATCH}' END AS INTEGER) AS ok",
            checks.join(" AND ")
        ));
        #[derive(FromQueryResult)]
        struct Checked {
            #[allow(dead_code)]
            ok: i32,
        }
        match self.query_one::<Checked>(&self.db, &sql, values).await {
            Ok(_) => Ok(true),
            Err(e) => {
                // 22P02: the failed cast (with its message, so nothing else is taken for it);
                // 40P01: a deadlock broken by failing this statement.
                let refused = match sqlstate(&e).as_deref() {
                    Some("22P02") => e.to_string().contains(MISMATCH),
                    Some("40P01") => true,
                    _ => false,
                };
                if refused { Ok(false) } else { Err(e) }
            }
        }
    }

    /// [`Store::execute_guarded`] on SQLite.
    async fn execute_guarded_sqlite(&self, parts: Vec<(String, Vec<Value>, Option<u64>)>) -> Result<bool, DbErr> {
        if self.writer.is_none() || self.write_lock.is_none() {
            return Ok(false);
        }
        let mut sql = String::from(
            "BEGIN IMMEDIATE;\nCREATE TEMP TABLE IF NOT EXISTS sluice_guard (ok INTEGER CONSTRAINT sluice_rows_as_expected CHECK (ok = 1));\n",
        );
        let mut values: Vec<Value> = vec![];
        for (part, part_values, expect) in parts {
            // Placeholders in order of appearance (see `execute_each`).
            sql.push_str(&positional(&part, &part_values, &mut values));
            sql.push_str(";\n");
            if let Some(n) = expect {
                sql.push_str(&format!("INSERT INTO temp.sluice_guard (ok) VALUES (changes() = {n});\n"));
            }
        }
        sql.push_str("DELETE FROM temp.sluice_guard;\nCOMMIT;");
        // The call runs to its end even when the caller stops waiting (a request whose client
        // went away): abandoned midway, it would leave its transaction open on the writers'
        // connection (SQLite's thread stops a call whose results nobody takes), and every write
        // after it would fail.
        let store = self.clone();
        tokio::spawn(async move { store.guarded_call(&sql, values).await })
            .await
            .map_err(|e| DbErr::Custom(format!("a guarded write stopped: {e}")))?
    }

    /// Runs a call of [`Store::execute_guarded_sqlite`] under the write lock, and rolls it back
    /// if it stopped short.
    async fn guarded_call(&self, sql: &str, values: Vec<Value>) -> Result<bool, DbErr> {
        let (Some(writer), Some(lock)) = (&self.writer, &self.write_lock) else { return Ok(false) };
        let _guard = lock.lock().await;
        let Err(e) = self.execute(writer, sql, values).await else { return Ok(true) };
        // The call stopped at its error, inside the transaction (unless SQLite ended it, or it
        // never began): undo what it did. Nothing else uses the connection meanwhile.
        if let Err(r) = self.execute(writer, "ROLLBACK", vec![]).await
            && !r.to_string().contains("no transaction is active")
        {
            return Err(DbErr::Custom(format!("{e}; then rolling back failed: {r}")));
        }
        // SQLITE_CONSTRAINT_CHECK (275) from the guard's table: a count was not as expected.
        let refused = sqlstate(&e).as_deref() == Some("275") && e.to_string().contains("sluice_rows_as_expected");
        if refused { Ok(false) } else { Err(e) }
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

/// `sql` with every placeholder `$n` replaced by what `f` makes of `n` (a `$` without digits
/// is left as it is).
fn map_placeholders(sql: &str, mut f: impl FnMut(usize) -> String) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            digits.push(*d);
            chars.next();
        }
        match digits.parse::<usize>() {
            Ok(n) => out.push_str(&f(n)),
            Err(_) => {
                out.push('$');
                out.push_str(&digits);
            }
        }
    }
    out
}

/// `sql` with every placeholder `$n` written `$` (unnumbered), and the values in the order the
/// placeholders appear appended to `out` (a value used twice is appended twice).
pub fn positional(sql: &str, values: &[Value], out: &mut Vec<Value>) -> String {
    map_placeholders(sql, |n| {
        if let Some(v) = n.checked_sub(1).and_then(|i| values.get(i)) {
            out.push(v.clone());
        }
        "$".to_owned()
    })
}

/// `sql` with every placeholder `$n` renumbered `$(n + by)`.
pub fn shift_placeholders(sql: &str, by: usize) -> String {
    map_placeholders(sql, |n| format!("${}", n + by))
}

/// Most statements sent in one round trip by [`Store::execute_each`].
pub const COMBINE: usize = 32;

/// How many rows statements executed together changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Each statement's count, in order.
    Each(Vec<u64>),
    /// Only the total is known.
    Total(u64),
}

impl Changed {
    /// The rows changed in all.
    pub fn total(&self) -> u64 {
        match self {
            Self::Each(each) => each.iter().sum(),
            Self::Total(n) => *n,
        }
    }
}

/// The SQLSTATE code of a database error, if the database gave one.
pub fn sqlstate(err: &DbErr) -> Option<String> {
    use sea_orm::RuntimeErr;
    match err {
        DbErr::Query(RuntimeErr::SqlxError(e)) | DbErr::Exec(RuntimeErr::SqlxError(e)) => match &**e {
            sea_orm::sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a database error is a unique-key violation.
pub fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_and_nothing_else_changes() {
        assert_eq!(
            shift_placeholders("UPDATE t SET a = $1, b = $12 WHERE c IN ($3, $4)", 10),
            "UPDATE t SET a = $11, b = $22 WHERE c IN ($13, $14)"
        );
        assert_eq!(shift_placeholders("SELECT '$' || x, $", 5), "SELECT '$' || x, $");
        assert_eq!(shift_placeholders("$1", 0), "$1");
    }

    #[test]
    fn placeholders_become_positional_with_their_values_in_order() {
        let values: Vec<sea_orm::Value> = vec![1i32.into(), "a".into(), 3i32.into()];
        let mut out = vec![sea_orm::Value::from(0i32)];
        let sql = positional("UPDATE t SET a = $2 WHERE id = $1 AND b IN ($3, $1)", &values, &mut out);
        assert_eq!(sql, "UPDATE t SET a = $ WHERE id = $ AND b IN ($, $)");
        let expected: Vec<sea_orm::Value> = vec![0i32.into(), "a".into(), 1i32.into(), 3i32.into(), 1i32.into()];
        assert_eq!(out, expected);
    }
}
