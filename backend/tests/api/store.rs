//! Statements executed together in one round trip, on the test's database (SQLite or PostgreSQL).

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
