//! Statements executed together in one round trip, and a run's state read with its row, on the
//! test's database (SQLite or PostgreSQL).

use sea_orm::ConnectionTrait;
use serde_json::{Value, json};
use sluice_backend::store::Changed;

use crate::helpers::*;

#[actix_web::test]
async fn statements_executed_together_report_what_they_changed_and_fail_as_one() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("together")).await;
    let store = &app.state.store;
    let db = store.db();
    let txn = store.write().await.unwrap();
    let rename = |name: &str, to: &str| {
        ("UPDATE tenants SET name = $2 WHERE slug = $1".to_owned(), vec![name.to_owned().into(), to.to_owned().into()])
    };
    // Two statements, one of which matches nothing.
    let parts = vec![rename(&admin.tenant, "Renamed"), rename("no-such-tenant", "Nobody")];
    let changed = store.execute_each(&*txn, parts).await.unwrap();
    match &changed {
        Changed::Each(each) => assert_eq!(each, &[1, 0]),
        Changed::Total(n) => assert_eq!(*n, 1),
    }
    assert_eq!(changed.total(), 1);
    // More statements than go in one round trip (each on a row of its own): each still counted.
    let n = sluice_backend::store::COMBINE * 2 + 3;
    let many: Vec<_> = (0..n)
        .map(|i| {
            (
                "INSERT INTO login_throttle (key, failures, last_failure_at) VALUES ($1, $2, $3)".to_owned(),
                vec![format!("together-{i}").into(), 1i64.into(), chrono::Utc::now().into()],
            )
        })
        .collect();
    match store.execute_each(&*txn, many).await.unwrap() {
        Changed::Each(each) => assert_eq!(each, vec![1; n]),
        Changed::Total(total) => assert_eq!(total, n as u64),
    }
    let last = rename(&admin.tenant, "Renamed");
    assert_eq!(store.execute_together(&*txn, vec![last]).await.unwrap(), 1);
    txn.commit().await.unwrap();
    #[derive(sea_orm::FromQueryResult)]
    struct Name {
        name: String,
    }
    let name = |slug: String| async move {
        store
            .query_one::<Name>(db, "SELECT name FROM tenants WHERE slug = $1", vec![slug.into()])
            .await
            .unwrap()
            .map(|n| n.name)
    };
    assert_eq!(name(admin.tenant.clone()).await.as_deref(), Some("Renamed"));

    // A failing statement fails the whole round trip, and its transaction changes nothing.
    let txn = store.write().await.unwrap();
    let parts =
        vec![rename(&admin.tenant, "Half-done"), ("UPDATE no_such_table SET x = $1".to_owned(), vec![1i32.into()])];
    assert!(store.execute_each(&*txn, parts).await.is_err());
    drop(txn);
    assert_eq!(name(admin.tenant.clone()).await.as_deref(), Some("Renamed"));
}

/// A run's state rows are read with its row (on PostgreSQL, in the one statement that locks the
/// row) as that statement began, before it waited for the lock. When another transaction changed
/// the run meanwhile, what is loaded is still the state it committed, read again under the lock.
#[actix_web::test]
async fn a_run_loaded_while_another_transaction_changes_it_has_the_committed_state() {
    use sluice_backend::engine::state::{Memo, RunRef, load};
    use sluice_domain::plan::TaskStatus;

    let app = spawn_app().await;
    let admin = app.signup(&slug("locked")).await;
    // A task no worker takes: it stays queued.
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: t\n        runs_on: [nowhere]\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "held", yaml).await.status(), reqwest::StatusCode::CREATED);
    let r = app.post(&format!("/api/v1/t/{}/pipelines/held/runs", admin.tenant), &admin.token, json!({})).await;
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tasks"][0]["status"], "queued", "{v:#}");
    let run = uuid::Uuid::parse_str(v["id"].as_str().unwrap()).unwrap();

    // Another process's transaction changes the task and the run's revision, and holds the lock.
    let store = app.state.store.clone();
    let changer = store.write().await.unwrap();
    let rev = 7_000_000_000_i64;
    store.execute(&*changer, "UPDATE runs SET rev = $2 WHERE id = $1", vec![run.into(), rev.into()]).await.unwrap();
    store
        .execute(&*changer, "UPDATE task_runs SET status = 'cancelled' WHERE run_id = $1", vec![run.into()])
        .await
        .unwrap();

    // A process that knows nothing of the run loads it meanwhile.
    let loader = {
        let store = store.clone();
        tokio::spawn(async move {
            let txn = store.write().await.unwrap();
            let loaded = load(&store, &*txn, RunRef::Id(run), &Memo::new(8), &Memo::new(8)).await.unwrap().unwrap();
            (loaded.row.rev, loaded.state.tasks[0].status)
        })
    };
    if use_postgres() {
        // Its statement has begun and waits for the lock.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            #[derive(sea_orm::FromQueryResult)]
            struct N {
                n: i64,
            }
            let waiting: Option<N> = store
                .query_one(
                    store.db(),
                    "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
                     AND wait_event_type = 'Lock' AND query LIKE 'WITH locked%'",
                    vec![],
                )
                .await
                .unwrap();
            if waiting.is_some_and(|w| w.n > 0) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the load never waited for the run's lock");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    changer.commit().await.unwrap();
    let (loaded_rev, status) = loader.await.unwrap();
    assert_eq!(loaded_rev, rev);
    assert_eq!(status, TaskStatus::Cancelled, "the state loaded is the one committed before the lock was given");
}

/// Updates guarded together (one statement on PostgreSQL, one call on SQLite) are applied
/// together or not at all: not when the first changes no row, nor when any changes other rows
/// than it must, though the first did; an insert among them goes with them.
#[actix_web::test]
async fn guarded_updates_apply_together_or_not_at_all() {
    let app = spawn_app().await;
    let a = app.signup(&slug("guard-a")).await;
    let b = app.signup(&slug("guard-b")).await;
    let store = &app.state.store;
    let rename = |slug: &str, from: &str, to: &str, expect: u64| {
        (
            "UPDATE tenants SET name = $3 WHERE slug = $1 AND name = $2".to_owned(),
            vec![slug.to_owned().into(), from.to_owned().into(), to.to_owned().into()],
            Some(expect),
        )
    };
    #[derive(sea_orm::FromQueryResult)]
    struct Name {
        name: String,
    }
    let name = |slug: String| async move {
        store
            .query_one::<Name>(store.db(), "SELECT name FROM tenants WHERE slug = $1", vec![slug.into()])
            .await
            .unwrap()
            .unwrap()
            .name
    };
    let (name_a, name_b) = (name(a.tenant.clone()).await, name(b.tenant.clone()).await);

    // The first changes nothing: the second is not applied either.
    let parts = vec![rename(&a.tenant, "not its name", "A2", 1), rename(&b.tenant, &name_b, "B2", 1)];
    assert!(!store.execute_guarded(parts).await.unwrap());
    assert_eq!(name(b.tenant.clone()).await, name_b);

    // The second changes a row it must not (it expects none): the first is undone.
    let parts = vec![rename(&a.tenant, &name_a, "A2", 1), rename(&b.tenant, &name_b, "B2", 0)];
    assert!(!store.execute_guarded(parts).await.unwrap());
    assert_eq!(name(a.tenant.clone()).await, name_a);
    assert_eq!(name(b.tenant.clone()).await, name_b);

    // As expected: both applied.
    let parts = vec![rename(&a.tenant, &name_a, "A2", 1), rename(&b.tenant, &name_b, "B2", 1)];
    assert!(store.execute_guarded(parts).await.unwrap());
    assert_eq!(name(a.tenant.clone()).await, "A2");
    assert_eq!(name(b.tenant.clone()).await, "B2");

    // An insert goes with them: undone when the first changes nothing, kept when all apply.
    app.sql("CREATE TABLE guarded_log (x INTEGER)", vec![]).await;
    let log = |x: i32| ("INSERT INTO guarded_log (x) VALUES ($1)".to_owned(), vec![x.into()], None);
    let parts = vec![rename(&a.tenant, "not its name", "A3", 1), log(1)];
    assert!(!store.execute_guarded(parts).await.unwrap());
    let parts = vec![rename(&b.tenant, "B2", "B3", 1), log(2)];
    assert!(store.execute_guarded(parts).await.unwrap());
    assert_eq!(app.sql("UPDATE guarded_log SET x = x", vec![]).await, 1, "the first insert was kept");
    assert_eq!(app.sql("DELETE FROM guarded_log WHERE x = 2", vec![]).await, 1);

    // Any other failure is an error.
    let parts = vec![
        rename(&a.tenant, "A2", "A3", 1),
        ("UPDATE no_such_table SET x = $1".to_owned(), vec![1i32.into()], Some(1)),
    ];
    assert!(store.execute_guarded(parts).await.is_err());
    assert_eq!(name(a.tenant.clone()).await, "A2");
}

/// A guarded write whose caller stops waiting for it (a request whose client went away) runs to
/// its end: it is applied, and the writes after it go through (SQLite, where the call takes
/// the one connection kept for writes, and a call left midway would leave its transaction
/// open there).
#[actix_web::test]
async fn a_guarded_write_abandoned_midway_runs_to_its_end() {
    if use_postgres() {
        return;
    }
    let app = spawn_app().await;
    let a = app.signup(&slug("abandoned")).await;
    let store = app.store();
    // Another connection holds SQLite's write lock: the call waits in `BEGIN IMMEDIATE`.
    let other = hold_sqlite_write_lock(&app).await;
    let parts = vec![(
        "UPDATE tenants SET name = $2 WHERE slug = $1".to_owned(),
        vec![a.tenant.clone().into(), "Renamed".into()],
        Some(1),
    )];
    let abandoned = tokio::time::timeout(std::time::Duration::from_millis(300), store.execute_guarded(parts)).await;
    assert!(abandoned.is_err(), "the write did not wait for the other connection");
    other.execute_unprepared("COMMIT").await.unwrap();
    let txn = store.write().await.expect("a write transaction could not begin after the abandoned write");
    store
        .execute(&*txn, "UPDATE tenants SET name = name WHERE slug = $1", vec![a.tenant.clone().into()])
        .await
        .unwrap();
    txn.commit().await.unwrap();
    #[derive(sea_orm::FromQueryResult)]
    struct Name {
        name: String,
    }
    let name: Name = store
        .query_one(store.db(), "SELECT name FROM tenants WHERE slug = $1", vec![a.tenant.clone().into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(name.name, "Renamed", "the abandoned write was not applied");
}
