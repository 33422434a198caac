//! Run triggers: signed webhooks over real HTTP, and the cron scheduler driven with a chosen
//! clock (`Scheduler::fire_due(state, now)`), on a real engine and database.

use chrono::{DateTime, Utc};
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};
use sluice_backend::triggers::{Scheduler, webhook};

use crate::helpers::*;

const HOOKED: &str = r#"
params:
  who: { type: string, required: true }
stages:
  - id: only
    tasks:
      - id: greet
        run: ["/bin/echo", "{{ params.who }}"]
"#;

fn webhook_path(m: &Member, pipeline: &str) -> String {
    format!("/api/v1/t/{}/pipelines/{pipeline}/webhook", m.tenant)
}

/// Configures (or rotates) a pipeline's webhook; returns the answer's `url` and `secret`.
async fn configure(app: &TestApp, m: &Member, pipeline: &str, expect: StatusCode) -> (String, String) {
    let r = app.call(Method::POST, &webhook_path(m, pipeline), Some(&m.token), None).await;
    assert_eq!(r.status(), expect, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["rotated"], expect == StatusCode::OK);
    (v["url"].as_str().unwrap().to_owned(), v["secret"].as_str().unwrap().to_owned())
}

#[derive(Clone, Copy)]
struct Call<'a> {
    url: &'a str,
    body: &'a str,
    /// Key that signs; `None` sends no signature.
    secret: Option<&'a str>,
    /// Offset of the timestamp from now; `None` sends no timestamp.
    skew: Option<i64>,
    delivery: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(url: &'a str, secret: &'a str, body: &'a str) -> Self {
        Self { url, body, secret: Some(secret), skew: Some(0), delivery: None }
    }
}

async fn send(app: &TestApp, c: Call<'_>) -> Response {
    let ts = (Utc::now().timestamp() + c.skew.unwrap_or(0)).to_string();
    let mut req = app.client.post(c.url).header("content-type", "application/json").body(c.body.to_owned());
    if c.skew.is_some() {
        req = req.header("X-Sluice-Timestamp", &ts);
    }
    if let Some(s) = c.secret {
        req = req.header("X-Sluice-Signature", webhook::sign(s, &ts, c.delivery, c.body.as_bytes()));
    }
    if let Some(d) = c.delivery {
        req = req.header("X-Sluice-Delivery", d);
    }
    req.send().await.unwrap()
}

async fn accepted(r: Response) -> String {
    assert_eq!(r.status(), StatusCode::ACCEPTED, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["run_id"].as_str().unwrap().to_owned()
}

async fn runs_of(app: &TestApp, m: &Member, pipeline: &str) -> Vec<Value> {
    let r = app.get(&format!("/api/v1/t/{}/runs?pipeline={pipeline}&limit=200", m.tenant), &m.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<Value>().await.unwrap()["items"].as_array().unwrap().clone()
}

async fn audit(app: &TestApp, m: &Member, action: &str) -> Vec<Value> {
    let r = app.get(&format!("/api/v1/t/{}/audit?action={action}&limit=200", m.tenant), &m.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<Value>().await.unwrap()["items"].as_array().unwrap().clone()
}

async fn audit_ok(app: &TestApp, m: &Member) {
    let r = app.get(&format!("/api/v1/t/{}/audit/verify", m.tenant), &m.token).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

#[actix_web::test]
async fn a_signed_call_starts_a_run_and_a_repeated_delivery_returns_it() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("hooks")).await;
    assert_eq!(app.create_pipeline(&admin, "deploy", HOOKED).await.status(), StatusCode::CREATED);
    let (url, secret) = configure(&app, &admin, "deploy", StatusCode::CREATED).await;
    assert_eq!(url, app.url(&format!("/api/v1/hooks/{}/deploy", admin.tenant)));
    assert!(secret.starts_with("whsec_"), "{secret}");

    let body = r#"{"params":{"who":"hook; rm -rf /"},"ref":"refs/heads/main"}"#;
    let id = accepted(send(&app, Call { delivery: Some("d-1"), ..Call::new(&url, &secret, body) }).await).await;
    let run = wait_run(&app, &admin, &id, 60).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"], "webhook");
    assert_eq!(run["initiator"], "webhook");
    assert_eq!(run["params"], json!({ "who": "hook; rm -rf /" }));

    // The same delivery again (signed anew, even with another body) is the same run.
    let again = Call { delivery: Some("d-1"), ..Call::new(&url, &secret, r#"{"params":{"who":"x"}}"#) };
    assert_eq!(accepted(send(&app, again).await).await, id);
    // Another delivery is another run; a body without params uses none (and is refused as
    // the run's params are required: the caller is authenticated, so it is told why).
    let other = accepted(send(&app, Call { delivery: Some("d-2"), ..Call::new(&url, &secret, body) }).await).await;
    assert_ne!(other, id);
    let r = send(&app, Call { delivery: Some("d-3"), ..Call::new(&url, &secret, "") }).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = send(&app, Call { delivery: Some("d-4"), ..Call::new(&url, &secret, "[1]") }).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = send(&app, Call { delivery: Some("d\u{e9}"), ..Call::new(&url, &secret, body) }).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(runs_of(&app, &admin, "deploy").await.len(), 2);

    // Without a delivery id, the very same signed call replayed is the same run.
    let ts = Utc::now().timestamp().to_string();
    let sig = webhook::sign(&secret, &ts, None, body.as_bytes());
    let mut ids = vec![];
    for _ in 0..2 {
        let r = app
            .client
            .post(&url)
            .header("X-Sluice-Timestamp", &ts)
            .header("X-Sluice-Signature", &sig)
            .body(body)
            .send()
            .await
            .unwrap();
        ids.push(accepted(r).await);
    }
    assert_eq!(ids[0], ids[1]);
    // Nor does the captured call replayed under a delivery id of the attacker's choosing: the id
    // is signed with the call.
    for delivery in ["replay-1", "replay-2"] {
        let r = app
            .client
            .post(&url)
            .header("X-Sluice-Timestamp", &ts)
            .header("X-Sluice-Signature", &sig)
            .header("X-Sluice-Delivery", delivery)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(runs_of(&app, &admin, "deploy").await.len(), 3);

    // The secret appears in no audit event; the configuration and the runs are recorded.
    let r = app.get(&format!("/api/v1/t/{}/audit/export", admin.tenant), &admin.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!r.text().await.unwrap().contains(&secret[6..]), "the secret leaked into the audit log");
    let created = audit(&app, &admin, "webhook.create").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["resource_id"], "deploy");
    let starts = audit(&app, &admin, "run.create").await;
    assert_eq!(starts.len(), 3);
    assert!(starts.iter().all(|e| e["details"]["trigger"] == "webhook" && e["actor"] == "webhook"));
    audit_ok(&app, &admin).await;
}

/// Anyone may call a webhook URL: a flood of refused calls adds a bounded number of events to
/// the tenant's audit log, and signed calls still go through meanwhile.
#[actix_web::test]
async fn a_flood_of_refused_calls_records_a_bounded_number_of_events() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("hookflood")).await;
    assert_eq!(app.create_pipeline(&admin, "deploy", HOOKED).await.status(), StatusCode::CREATED);
    let (url, secret) = configure(&app, &admin, "deploy", StatusCode::CREATED).await;
    let body = r#"{"params":{"who":"x"}}"#;
    let limit = webhook::REFUSALS_RECORDED_PER_MINUTE as usize;
    for i in 0..limit + 15 {
        let r = send(&app, Call { secret: Some("whsec_guess"), ..Call::new(&url, &secret, body) }).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "call {i}");
    }
    accepted(send(&app, Call::new(&url, &secret, body)).await).await;
    let events = audit(&app, &admin, "webhook.refused").await;
    assert_eq!(events.len(), limit, "{events:#?}");
    assert!(events.iter().all(|e| e["details"].get("unrecorded_before").is_none()));
    // Once the minute is over, the calls only counted are recorded as one event.
    let later = std::time::Instant::now() + std::time::Duration::from_secs(61);
    webhook::record_unrecorded_refusals(&app.state, later).await;
    let events = audit(&app, &admin, "webhook.refused").await;
    assert_eq!(events.len(), limit + 1, "{events:#?}");
    let count = events.iter().find(|e| e["details"]["reason"] == "over the recorded rate").expect("the count");
    assert_eq!(count["details"]["count"], 15, "{count:#}");
    audit_ok(&app, &admin).await;
}

#[actix_web::test]
async fn refused_calls_answer_401_alike_and_are_audited() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("hookno")).await;
    for p in ["deploy", "unhooked"] {
        assert_eq!(app.create_pipeline(&admin, p, HOOKED).await.status(), StatusCode::CREATED);
    }
    let (url, secret) = configure(&app, &admin, "deploy", StatusCode::CREATED).await;
    let body = r#"{"params":{"who":"x"}}"#;
    let unhooked = app.url(&format!("/api/v1/hooks/{}/unhooked", admin.tenant));
    let missing = app.url(&format!("/api/v1/hooks/{}/no-such-pipeline", admin.tenant));
    let base = || Call::new(&url, &secret, body);
    let cases: Vec<(&str, Call<'_>, &str)> = vec![
        ("wrong key", Call { secret: Some("whsec_guess"), ..base() }, "signature mismatch"),
        ("no signature", Call { secret: None, ..base() }, "missing signature"),
        ("no timestamp", Call { skew: None, ..base() }, "missing timestamp"),
        ("old timestamp", Call { skew: Some(-301), ..base() }, "timestamp too old"),
        ("future timestamp", Call { skew: Some(301), ..base() }, "timestamp in the future"),
        ("unconfigured pipeline", Call { url: &unhooked, ..base() }, "no webhook configured"),
        ("unknown pipeline", Call { url: &missing, ..base() }, "unknown pipeline"),
    ];
    let mut problems = vec![];
    for (what, call, _) in &cases {
        let r = send(&app, *call).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        let mut p = problem(r).await;
        p.as_object_mut().unwrap().remove("instance");
        problems.push(p);
    }
    // A tampered body with a signature of another body.
    let ts = Utc::now().timestamp().to_string();
    let r = app
        .client
        .post(&url)
        .header("X-Sluice-Timestamp", &ts)
        .header("X-Sluice-Signature", webhook::sign(&secret, &ts, None, br#"{"params":{"who":"y"}}"#))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // An unknown tenant: the same answer, and nowhere to record it.
    let r = send(&app, Call { url: &app.url("/api/v1/hooks/no-such-tenant-zz/deploy"), ..base() }).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let mut p = problem(r).await;
    p.as_object_mut().unwrap().remove("instance");
    problems.push(p);
    assert!(problems.windows(2).all(|w| w[0] == w[1]), "refusals differ: {problems:#?}");

    let events = audit(&app, &admin, "webhook.refused").await;
    assert_eq!(events.len(), cases.len() + 1, "{events:#?}");
    let mut reasons: Vec<&str> = events.iter().map(|e| e["details"]["reason"].as_str().unwrap()).collect();
    let mut expected: Vec<&str> = cases.iter().map(|c| c.2).chain(["signature mismatch"]).collect();
    reasons.sort_unstable();
    expected.sort_unstable();
    assert_eq!(reasons, expected);
    for e in &events {
        assert_eq!(e["outcome"], "deny");
        assert_eq!(e["actor_type"], "anonymous");
        assert_eq!(e["source_ip"], "127.0.0.1");
    }
    assert!(runs_of(&app, &admin, "deploy").await.is_empty());
    assert!(runs_of(&app, &admin, "unhooked").await.is_empty());
    audit_ok(&app, &admin).await;
}

#[actix_web::test]
async fn rotating_replaces_the_secret_and_deleting_stops_calls() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("hookrot")).await;
    assert_eq!(app.create_pipeline(&admin, "deploy", HOOKED).await.status(), StatusCode::CREATED);
    let body = r#"{"params":{"who":"x"}}"#;
    let (url, old) = configure(&app, &admin, "deploy", StatusCode::CREATED).await;
    accepted(send(&app, Call { delivery: Some("1"), ..Call::new(&url, &old, body) }).await).await;
    let (url2, new) = configure(&app, &admin, "deploy", StatusCode::OK).await;
    assert_eq!(url, url2);
    assert_ne!(old, new);
    let r = send(&app, Call { delivery: Some("2"), ..Call::new(&url, &old, body) }).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    accepted(send(&app, Call { delivery: Some("3"), ..Call::new(&url, &new, body) }).await).await;
    assert_eq!(audit(&app, &admin, "webhook.rotate").await.len(), 1);

    let r = app.call(Method::DELETE, &webhook_path(&admin, "deploy"), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = send(&app, Call { delivery: Some("4"), ..Call::new(&url, &new, body) }).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app.call(Method::DELETE, &webhook_path(&admin, "deploy"), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(audit(&app, &admin, "webhook.delete").await.len(), 1);
    assert_eq!(runs_of(&app, &admin, "deploy").await.len(), 2);
    // An archived pipeline gets no new webhook.
    let r = app.post(&format!("/api/v1/t/{}/pipelines/deploy/archive", admin.tenant), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.call(Method::POST, &webhook_path(&admin, "deploy"), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
}

#[actix_web::test]
async fn only_pipeline_editors_configure_webhooks() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("hookrole")).await;
    assert_eq!(app.create_pipeline(&admin, "deploy", HOOKED).await.status(), StatusCode::CREATED);
    let viewer = app.add_member(&admin, &["viewers"]).await;
    for method in [Method::POST, Method::DELETE] {
        let r = app.call(method.clone(), &webhook_path(&viewer, "deploy"), Some(&viewer.token), None).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{method}");
    }
    let (_, token) = app.create_token(&admin, &["viewers"]).await;
    let r = app.call(Method::POST, &webhook_path(&admin, "deploy"), Some(&token), None).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let denied = audit(&app, &admin, "pipeline.update").await;
    assert_eq!(denied.iter().filter(|e| e["outcome"] == "deny").count(), 3);
    assert!(audit(&app, &admin, "webhook.create").await.is_empty());
    // An editor may.
    let editor = app.add_member(&admin, &["editors"]).await;
    configure(&app, &editor, "deploy", StatusCode::CREATED).await;
    // No webhook on a pipeline that does not exist.
    let r = app.call(Method::POST, &webhook_path(&admin, "nope"), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn another_tenants_secret_cannot_trigger_a_pipeline() {
    let app = spawn_app().await;
    let a = app.signup(&slug("alpha")).await;
    let b = app.signup(&slug("bravo")).await;
    for m in [&a, &b] {
        assert_eq!(app.create_pipeline(m, "deploy", HOOKED).await.status(), StatusCode::CREATED);
    }
    let (a_url, _) = configure(&app, &a, "deploy", StatusCode::CREATED).await;
    let (b_url, b_secret) = configure(&app, &b, "deploy", StatusCode::CREATED).await;
    let body = r#"{"params":{"who":"b"}}"#;
    // B's valid signature, sent to A's pipeline of the same name.
    let r = send(&app, Call { delivery: Some("x"), ..Call::new(&a_url, &b_secret, body) }).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(runs_of(&app, &a, "deploy").await.is_empty());
    let refused = audit(&app, &a, "webhook.refused").await;
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["details"]["reason"], "signature mismatch");
    // The same call to B's own URL works, and lands in B only.
    let id = accepted(send(&app, Call { delivery: Some("x"), ..Call::new(&b_url, &b_secret, body) }).await).await;
    assert_eq!(runs_of(&app, &b, "deploy").await.len(), 1);
    let r = app.get(&format!("/api/v1/t/{}/runs/{id}", a.tenant), &a.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(audit(&app, &b, "webhook.refused").await.is_empty());
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A schedule that real time will not reach while tests run: 04:30 in Tokyo on February 29th
/// (19:30 UTC on the 28th), in leap years only.
const LEAP_DAY: &str = r#"
params:
  who: { type: string, required: true }
triggers:
  - cron: "30 4 29 2 *"
    timezone: Asia/Tokyo
    params: { who: leap }
stages:
  - id: only
    tasks:
      - id: greet
        run: ["/bin/echo", "{{ params.who }}"]
"#;

async fn keys(app: &TestApp) -> Vec<String> {
    #[derive(sea_orm::FromQueryResult)]
    struct K {
        idempotency_key: Option<String>,
    }
    let rows: Vec<K> = app
        .store()
        .query_all(app.store().db(), "SELECT idempotency_key FROM runs WHERE trigger = 'cron' ORDER BY id", vec![])
        .await
        .unwrap();
    rows.into_iter().filter_map(|k| k.idempotency_key).collect()
}

#[actix_web::test]
async fn cron_fires_each_time_once_and_never_replays_missed_times() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("cron")).await;
    let r = app.create_pipeline(&admin, "leap", LEAP_DAY).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let pid = {
        #[derive(sea_orm::FromQueryResult)]
        struct P {
            id: uuid::Uuid,
        }
        let p: P = app
            .store()
            .query_one(app.store().db(), "SELECT id FROM pipelines WHERE name = 'leap'", vec![])
            .await
            .unwrap()
            .unwrap();
        p.id
    };
    let state = &app.state;
    // Two servers' schedulers, started before the first leap day.
    let (s1, s2) = (Scheduler::new(), Scheduler::new());
    for s in [&s1, &s2] {
        assert!(s.fire_due(state, at("2028-01-01T00:00:00Z")).await.unwrap().is_empty());
    }
    // Not yet due a second before.
    assert!(s1.fire_due(state, at("2028-02-28T19:29:59Z")).await.unwrap().is_empty());
    // Both fire the time at once: one run.
    let now = at("2028-02-28T19:30:01Z");
    let (f1, f2) = tokio::join!(s1.fire_due(state, now), s2.fire_due(state, now));
    let fired: Vec<_> = f1.unwrap().into_iter().chain(f2.unwrap()).collect();
    assert_eq!(fired.len(), 2, "{fired:?}");
    assert_eq!(fired[0].run, fired[1].run);
    assert_eq!(fired.iter().filter(|f| f.created).count(), 1);
    assert_eq!(fired[0].scheduled, at("2028-02-28T19:30:00Z"));
    assert_eq!(keys(&app).await, [format!("cron:{pid}:0:2028-02-28T19:30:00Z")]);
    // Called again for the same moment: nothing new.
    assert!(s1.fire_due(state, now).await.unwrap().is_empty());
    let run = wait_run(&app, &admin, &fired[0].run.to_string(), 60).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"], "cron");
    assert_eq!(run["initiator"], "cron");
    assert_eq!(run["params"], json!({ "who": "leap" }));

    // A gap over the next time (2032): noticed years late, it is skipped, not replayed.
    assert!(s1.fire_due(state, at("2033-06-01T00:00:00Z")).await.unwrap().is_empty());
    // A restarted server starts from its present: the missed 2036 time is not replayed either.
    let s3 = Scheduler::new();
    assert!(s3.fire_due(state, at("2036-03-01T00:00:00Z")).await.unwrap().is_empty());
    assert!(s3.fire_due(state, at("2036-03-01T00:00:30Z")).await.unwrap().is_empty());
    // ...and fires the next one (2040) when it comes.
    let f = s3.fire_due(state, at("2040-02-28T19:30:10Z")).await.unwrap();
    assert_eq!(f.len(), 1);
    assert!(f[0].created);
    assert_eq!(keys(&app).await.len(), 2);

    // A new version (hourly on leap days, UTC) restarts its schedules from now: the old
    // schedule's pending time is dropped.
    let every_hour = LEAP_DAY.replace("30 4 29 2 *", "0 * 29 2 *").replace("    timezone: Asia/Tokyo\n", "");
    let r = app
        .put(
            &format!("/api/v1/t/{}/pipelines/leap", admin.tenant),
            &admin.token,
            json!({ "definition": every_hour, "base_version": 1 }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert!(s3.fire_due(state, at("2044-02-29T10:20:00Z")).await.unwrap().is_empty());
    let f = s3.fire_due(state, at("2044-02-29T11:00:00Z")).await.unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].scheduled, at("2044-02-29T11:00:00Z"));
    assert_eq!(keys(&app).await.len(), 3);

    // An archived pipeline is not fired.
    let r = app.post(&format!("/api/v1/t/{}/pipelines/leap/archive", admin.tenant), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(s3.fire_due(state, at("2044-02-29T12:00:00Z")).await.unwrap().is_empty());
    assert_eq!(keys(&app).await.len(), 3);
    audit_ok(&app, &admin).await;
}

#[actix_web::test]
async fn bad_schedules_are_refused_when_saved() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("cronbad")).await;
    let cases = [
        ("61 * * * *", None, "definition.triggers[0].cron", "invalid cron expression"),
        ("* * * * * *", None, "definition.triggers[0].cron", "found 6"),
        ("0 0 31 2 *", None, "definition.triggers[0].cron", "never matches"),
        ("0 9 * * *", Some("Mars/Olympus"), "definition.triggers[0].timezone", "unknown time zone"),
    ];
    for (cron, tz, field, message) in cases {
        let tz = tz.map(|t| format!("\n    timezone: {t}")).unwrap_or_default();
        let yaml = format!("triggers:\n  - cron: \"{cron}\"{tz}\n{PIPELINE}");
        let r = app.create_pipeline(&admin, "sched", &yaml).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{cron} {tz}");
        let p = problem(r).await;
        let e = p["errors"].as_array().unwrap().iter().find(|e| e["field"] == field);
        let e = e.unwrap_or_else(|| panic!("{cron} {tz}: no error on {field}: {p:#}"));
        assert!(e["message"].as_str().unwrap().contains(message), "{p:#}");
    }
    // A good schedule saves; a bad one is refused on update too.
    let good = format!("triggers:\n  - cron: \"0 9 * * MON-FRI\"\n    timezone: Europe/Paris\n{PIPELINE}");
    assert_eq!(app.create_pipeline(&admin, "sched", &good).await.status(), StatusCode::CREATED);
    let r = app
        .put(
            &format!("/api/v1/t/{}/pipelines/sched", admin.tenant),
            &admin.token,
            json!({ "definition": good.replace("Europe/Paris", "Europe/Pariss"), "base_version": 1 }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let p = problem(r).await;
    assert_eq!(p["errors"][0]["field"], "definition.triggers[0].timezone", "{p:#}");
}

/// A database that refuses the scheduled run's start for a moment does not cost the firing: the
/// next pass, within the grace period, starts it for the time it was due.
#[actix_web::test]
async fn a_scheduled_run_the_database_refuses_for_a_moment_fires_on_the_next_pass() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("cronblip")).await;
    let r = app.create_pipeline(&admin, "leap", LEAP_DAY).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    app.refuse_writes("INSERT ON runs", None).await;
    let state = &app.state;
    let s = Scheduler::new();
    assert!(s.fire_due(state, at("2028-01-01T00:00:00Z")).await.unwrap().is_empty());
    app.refusing(true).await;
    assert!(s.fire_due(state, at("2028-02-28T19:30:01Z")).await.unwrap().is_empty());
    app.refusing(false).await;
    let fired = s.fire_due(state, at("2028-02-28T19:30:06Z")).await.unwrap();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert!(fired[0].created);
    assert_eq!(fired[0].scheduled, at("2028-02-28T19:30:00Z"));
    // Once started, the time is done.
    assert!(s.fire_due(state, at("2028-02-28T19:30:11Z")).await.unwrap().is_empty());
    assert_eq!(keys(&app).await.len(), 1);
}
