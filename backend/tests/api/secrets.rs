//! Tenant secrets: life cycle, validation, authorization, audit, encryption at rest, the key's
//! configuration, and injection into running tasks with masking (D23).

use base64::{Engine, engine::general_purpose::STANDARD};
use reqwest::{Method, Response, StatusCode};
use sea_orm::FromQueryResult;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice_backend::{
    AppState, Config, ConfigArgs,
    secrets::{Sealed, SecretsKey},
};
use uuid::Uuid;

use crate::helpers::*;

fn path(m: &Member, name: &str) -> String {
    format!("/api/v1/t/{}/secrets/{name}", m.tenant)
}

async fn put_secret(app: &TestApp, m: &Member, name: &str, value: &str) -> Response {
    app.put(&path(m, name), &m.token, json!({ "value": value })).await
}

async fn delete(app: &TestApp, m: &Member, name: &str) -> Response {
    app.call(Method::DELETE, &path(m, name), Some(&m.token), None).await
}

/// Status and body text, asserting the status.
async fn text_of(r: Response, status: StatusCode) -> String {
    let got = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    text
}

async fn expect_invalid(r: Response, field: &str) -> Value {
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let p = problem(r).await;
    assert_eq!(p["type"], "urn:sluice:problem:validation", "{p}");
    assert_eq!(p["errors"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["errors"][0]["field"], field, "{p}");
    p
}

fn value() -> String {
    format!("s3cr3t-{}", Uuid::new_v4().simple())
}

/// Texts under which a value must never appear: itself and its base64 forms.
fn forms(v: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    vec![v.to_owned(), STANDARD.encode(v), STANDARD_NO_PAD.encode(v), URL_SAFE_NO_PAD.encode(v)]
}

fn assert_no_value(text: &str, v: &str, what: &str) {
    for f in forms(v) {
        assert!(!text.contains(&f), "{what} contains the secret ({f}): {text}");
    }
}

async fn tenant_id(app: &TestApp, slug: &str) -> Uuid {
    #[derive(FromQueryResult)]
    struct T {
        id: Uuid,
    }
    let t: T = app
        .store()
        .query_one(app.store().db(), "SELECT id FROM tenants WHERE slug = $1", vec![slug.into()])
        .await
        .unwrap()
        .unwrap();
    t.id
}

#[derive(Debug, FromQueryResult)]
struct Row {
    version: i64,
    nonce: String,
    ciphertext: String,
    created_by: Uuid,
}

async fn stored(app: &TestApp, tenant: Uuid, name: &str) -> Row {
    app.store()
        .query_one(
            app.store().db(),
            "SELECT version, nonce, ciphertext, created_by FROM secrets WHERE tenant_id = $1 AND name = $2",
            vec![tenant.into(), name.into()],
        )
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no stored secret {name}"))
}

// ---- runs (as in runs.rs) ----

async fn start(app: &TestApp, m: &Member, pipeline: &str) -> String {
    let r = app.post(&format!("/api/v1/t/{}/pipelines/{pipeline}/runs", m.tenant), &m.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn logs(app: &TestApp, m: &Member, run: &str, task: &str) -> (String, Vec<String>) {
    let r = app.get(&format!("/api/v1/t/{}/runs/{run}/tasks/{task}/logs", m.tenant), &m.token).await;
    let text = text_of(r, StatusCode::OK).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    let lines =
        v["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap_or_default().to_owned()).collect();
    (text, lines)
}

/// Creates a one-task pipeline and runs it to the end.
async fn run_task(app: &TestApp, m: &Member, name: &str, task_yaml: &str) -> (String, Value) {
    let yaml = format!("stages:\n  - id: s\n    tasks:\n      - id: t\n{task_yaml}");
    let r = app.create_pipeline(m, name, &yaml).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let id = start(app, m, name).await;
    let done = wait_run(app, m, &id, 60).await;
    (id, done)
}

// ---- tests ----

#[actix_web::test]
async fn secret_life_cycle_never_shows_the_value() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    let (v1, v2) = (value(), value());

    let r = put_secret(&app, &admin, "API_TOKEN", &v1).await;
    let text = text_of(r, StatusCode::CREATED).await;
    assert_no_value(&text, &v1, "create answer");
    let created: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(created["name"], "API_TOKEN");
    assert_eq!(created["version"], 1);
    assert_eq!(created["created_by"], admin.email);
    let mut keys: Vec<&String> = created.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["created_at", "created_by", "name", "updated_at", "version"]);

    // Replacing: 200, version 2, same creation time.
    let r = put_secret(&app, &admin, "API_TOKEN", &v2).await;
    let text = text_of(r, StatusCode::OK).await;
    assert_no_value(&text, &v2, "replace answer");
    let replaced: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(replaced["version"], 2);
    assert_eq!(replaced["created_at"], created["created_at"]);
    assert_eq!(replaced["created_by"], admin.email);
    assert!(replaced["updated_at"].as_str().unwrap() >= created["updated_at"].as_str().unwrap());
    assert_eq!(put_secret(&app, &admin, "_other", "x").await.status(), StatusCode::CREATED);

    // Listed and read: metadata only.
    let text =
        text_of(app.get(&format!("/api/v1/t/{}/secrets", admin.tenant), &admin.token).await, StatusCode::OK).await;
    for v in [&v1, &v2] {
        assert_no_value(&text, v, "list");
    }
    let list: Value = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["API_TOKEN", "_other"]);
    assert_eq!(list[0], replaced);
    assert!(list.as_array().unwrap().iter().all(|s| s.get("value").is_none()));
    let text = text_of(app.get(&path(&admin, "API_TOKEN"), &admin.token).await, StatusCode::OK).await;
    for v in [&v1, &v2] {
        assert_no_value(&text, v, "get");
    }
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), replaced);
    // Names are case-sensitive.
    assert_eq!(app.get(&path(&admin, "api_token"), &admin.token).await.status(), StatusCode::NOT_FOUND);

    // Deleted: 204, then gone.
    assert_eq!(delete(&app, &admin, "API_TOKEN").await.status(), StatusCode::NO_CONTENT);
    let r = app.get(&path(&admin, "API_TOKEN"), &admin.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(problem(r).await["type"], "urn:sluice:problem:not-found");
    assert_eq!(delete(&app, &admin, "API_TOKEN").await.status(), StatusCode::NOT_FOUND);
    let list: Value = app.get(&format!("/api/v1/t/{}/secrets", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Created again: version 1.
    let r = put_secret(&app, &admin, "API_TOKEN", &v1).await;
    let again: Value = serde_json::from_str(&text_of(r, StatusCode::CREATED).await).unwrap();
    assert_eq!(again["version"], 1);

    // An API token of an admin may manage secrets too; created_by is its owner.
    let (_, token) = app.create_token(&admin, &["admins"]).await;
    let r = app.put(&path(&admin, "FROM_TOKEN"), &token, json!({ "value": value() })).await;
    let v: Value = serde_json::from_str(&text_of(r, StatusCode::CREATED).await).unwrap();
    assert_eq!(v["created_by"], admin.email);
}

#[actix_web::test]
async fn names_and_values_are_validated() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    let long = "A".repeat(65);
    for bad in ["1ABC", "a-b", "a.b", "caf%C3%A9", "has%20space", long.as_str()] {
        let p = expect_invalid(put_secret(&app, &admin, bad, "value").await, "name").await;
        assert!(p["errors"][0]["message"].as_str().unwrap().contains("A-Za-z_"), "{p}");
        // Such a name cannot exist either.
        assert_eq!(app.get(&path(&admin, bad), &admin.token).await.status(), StatusCode::NOT_FOUND);
        assert_eq!(delete(&app, &admin, bad).await.status(), StatusCode::NOT_FOUND);
    }
    for good in ["A", "_", "a1", "_9_z", "A".repeat(64).as_str()] {
        assert_eq!(put_secret(&app, &admin, good, "value").await.status(), StatusCode::CREATED, "{good}");
    }
    expect_invalid(put_secret(&app, &admin, "EMPTY", "").await, "value").await;
    let p = expect_invalid(put_secret(&app, &admin, "BIG", &"x".repeat(64 * 1024 + 1)).await, "value").await;
    assert!(p["detail"].as_str().unwrap().contains("65536"), "{p}");
    // Multi-byte characters count in bytes.
    expect_invalid(put_secret(&app, &admin, "BIG", &"é".repeat(32 * 1024 + 1)).await, "value").await;
    expect_invalid(put_secret(&app, &admin, "NUL", "a\0b").await, "value").await;
    assert_eq!(put_secret(&app, &admin, "BIG", &"x".repeat(64 * 1024)).await.status(), StatusCode::CREATED);
    assert_eq!(
        put_secret(&app, &admin, "PEM", "-----BEGIN-----\nabc\n-----END-----\n").await.status(),
        StatusCode::CREATED
    );
    // A body without a string value is a bad request naming the field.
    let r = app.put(&path(&admin, "X"), &admin.token, json!({ "value": 12 })).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(problem(r).await["errors"][0]["field"], "value");
    let r = app.put(&path(&admin, "X"), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Nothing invalid was stored.
    let list: Value = app.get(&format!("/api/v1/t/{}/secrets", admin.tenant), &admin.token).await.json().await.unwrap();
    let mut names: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    let a64 = "A".repeat(64);
    let mut expected = vec!["A", "_", "a1", "_9_z", a64.as_str(), "BIG", "PEM"];
    expected.sort_unstable();
    assert_eq!(names, expected);
}

#[actix_web::test]
async fn only_admins_manage_secrets_by_default() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    let v = value();
    assert_eq!(put_secret(&app, &admin, "DEPLOY_KEY", &v).await.status(), StatusCode::CREATED);
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let editor = app.add_member(&admin, &["editors"]).await;
    let (_, editor_token) = app.create_token(&admin, &["editors"]).await;
    let who = [("viewer", viewer.token.clone()), ("editor", editor.token.clone()), ("editors' token", editor_token)];
    for (kind, cred) in &who {
        let t = &admin.tenant;
        let calls = [
            app.get(&format!("/api/v1/t/{t}/secrets"), cred).await,
            app.get(&path(&admin, "DEPLOY_KEY"), cred).await,
            app.put(&path(&admin, "DEPLOY_KEY"), cred, json!({ "value": "stolen-value" })).await,
            app.put(&path(&admin, "NEW_ONE"), cred, json!({ "value": "planted-value" })).await,
            app.call(Method::DELETE, &path(&admin, "DEPLOY_KEY"), Some(cred), None).await,
        ];
        for r in calls {
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{kind}");
            let text = r.text().await.unwrap();
            assert_no_value(&text, &v, kind);
        }
    }
    // Nothing changed.
    let r = app.get(&path(&admin, "DEPLOY_KEY"), &admin.token).await;
    let s: Value = r.json().await.unwrap();
    assert_eq!(s["version"], 1);
    assert_eq!(app.get(&path(&admin, "NEW_ONE"), &admin.token).await.status(), StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn changes_are_audited_without_the_value() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    let (v1, v2) = (value(), value());
    assert_eq!(put_secret(&app, &admin, "API_TOKEN", &v1).await.status(), StatusCode::CREATED);
    assert_eq!(put_secret(&app, &admin, "API_TOKEN", &v2).await.status(), StatusCode::OK);
    let viewer = app.add_member(&admin, &["viewers"]).await;
    assert_eq!(app.get(&path(&admin, "API_TOKEN"), &viewer.token).await.status(), StatusCode::FORBIDDEN);
    let r = app.put(&path(&admin, "API_TOKEN"), &viewer.token, json!({ "value": "from-a-viewer" })).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(delete(&app, &admin, "API_TOKEN").await.status(), StatusCode::NO_CONTENT);

    let t = &admin.tenant;
    let page: Value = app
        .get(&format!("/api/v1/t/{t}/audit?resource_type=Secret&limit=200"), &admin.token)
        .await
        .json()
        .await
        .unwrap();
    let mut events: Vec<&Value> = page["items"].as_array().unwrap().iter().collect();
    events.reverse();
    let summary: Vec<(String, String, Option<i64>)> = events
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
                e["resource_version"].as_i64(),
            )
        })
        .collect();
    let s = |a: &str, o: &str, v: Option<i64>| (a.to_owned(), o.to_owned(), v);
    assert_eq!(
        summary,
        [
            s("secret.write", "allow", Some(1)),
            s("secret.write", "allow", Some(2)),
            s("secret.read", "deny", None),
            s("secret.write", "deny", None),
            s("secret.delete", "allow", Some(2)),
        ],
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e["resource_id"] == "API_TOKEN" && e["resource_type"] == "Secret"));
    assert_eq!(events[0]["details"], json!({ "created": true }));
    assert_eq!(events[1]["details"], json!({ "created": false }));
    assert_eq!(events[0]["actor"], admin.email);
    // The value is nowhere in the log, nor in its export.
    let all = text_of(app.get(&format!("/api/v1/t/{t}/audit?limit=200"), &admin.token).await, StatusCode::OK).await;
    let export = text_of(app.get(&format!("/api/v1/t/{t}/audit/export"), &admin.token).await, StatusCode::OK).await;
    for v in [v1.as_str(), v2.as_str(), "from-a-viewer"] {
        assert_no_value(&all, v, "audit log");
        assert_no_value(&export, v, "audit export");
    }
    let verify: Value = app.get(&format!("/api/v1/t/{t}/audit/verify"), &admin.token).await.json().await.unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
}

#[actix_web::test]
async fn values_are_encrypted_at_rest_and_bound_to_tenant_and_name() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    let other = app.signup(&slug("sec")).await;
    let (a_id, b_id) = (tenant_id(&app, &admin.tenant).await, tenant_id(&app, &other.tenant).await);
    let v = value();
    assert_eq!(put_secret(&app, &admin, "API_TOKEN", &v).await.status(), StatusCode::CREATED);
    let row = stored(&app, a_id, "API_TOKEN").await;
    assert_eq!(row.version, 1);
    assert_eq!(row.created_by.to_string(), admin.user_id);
    let ct = STANDARD.decode(&row.ciphertext).unwrap();
    assert_eq!(ct.len(), v.len() + 16, "ciphertext plus GCM tag");
    assert_eq!(STANDARD.decode(&row.nonce).unwrap().len(), 12);
    assert!(!ct.windows(v.len()).any(|w| w == v.as_bytes()));
    // The value is in no column of the table, in any usual form.
    #[derive(FromQueryResult)]
    struct AllText {
        name: String,
        nonce: String,
        ciphertext: String,
    }
    let all: Vec<AllText> =
        app.store().query_all(app.store().db(), "SELECT name, nonce, ciphertext FROM secrets", vec![]).await.unwrap();
    for r in &all {
        for col in [&r.name, &r.nonce, &r.ciphertext] {
            assert_no_value(col, &v, "a column of secrets");
            assert_no_value(
                &String::from_utf8_lossy(&STANDARD.decode(col).unwrap_or_default()),
                &v,
                "a decoded column",
            );
        }
    }
    // A new write uses a new nonce, even for the same value.
    assert_eq!(put_secret(&app, &admin, "API_TOKEN", &v).await.status(), StatusCode::OK);
    let row2 = stored(&app, a_id, "API_TOKEN").await;
    assert_eq!(row2.version, 2);
    assert_ne!(row2.nonce, row.nonce);
    assert_ne!(row2.ciphertext, row.ciphertext);

    // The server's key opens it only in its place.
    let key: &SecretsKey = &app.state.secrets_key;
    let sealed = Sealed { nonce: row2.nonce.clone(), ciphertext: row2.ciphertext.clone() };
    assert_eq!(key.open(a_id, "API_TOKEN", 2, &sealed).unwrap(), v);
    assert!(key.open(a_id, "API_TOKEN", 1, &sealed).is_err(), "another version");
    assert!(key.open(a_id, "COPIED", 2, &sealed).is_err(), "another name");
    assert!(key.open(b_id, "API_TOKEN", 2, &sealed).is_err(), "another tenant");
    assert!(SecretsKey::from_bytes(&[9; 32]).open(a_id, "API_TOKEN", 2, &sealed).is_err(), "another key");

    // A row copied behind the server's back, to another name or another tenant, does not decrypt:
    // a task listing the copy fails, naming the secret, and reveals nothing.
    let copy = "INSERT INTO secrets (tenant_id, name, version, nonce, ciphertext, created_by, created_at, updated_at) \
                SELECT $3, $4, version, nonce, ciphertext, created_by, created_at, updated_at FROM secrets \
                WHERE tenant_id = $1 AND name = $2";
    assert_eq!(app.sql(copy, vec![a_id.into(), "API_TOKEN".into(), a_id.into(), "COPIED".into()]).await, 1);
    assert_eq!(app.sql(copy, vec![a_id.into(), "API_TOKEN".into(), b_id.into(), "API_TOKEN".into()]).await, 1);
    let yaml =
        |name: &str| format!("        run: [\"/bin/echo\", \"{{{{ secrets.{name} }}}}\"]\n        secrets: [{name}]\n");
    for (m, name) in [(&admin, "COPIED"), (&other, "API_TOKEN")] {
        let (id, done) =
            run_task(&app, m, &format!("copy-{}", name.to_lowercase().replace('_', "-")), &yaml(name)).await;
        assert_eq!(done["status"], "failed", "{done:#}");
        let msg = task_of(&done, "t")["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(&format!("`{name}`")) && msg.contains("decrypt"), "{msg}");
        assert_no_value(&serde_json::to_string(&done).unwrap(), &v, "the run");
        let (text, _) = logs(&app, m, &id, "t").await;
        assert_no_value(&text, &v, "the logs");
    }
    // The original still works.
    let (_, done) = run_task(&app, &admin, "original", &yaml("API_TOKEN")).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
}

#[actix_web::test]
async fn d23_a_listed_secret_reaches_the_task_and_is_masked_in_its_logs() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    let v = value();
    assert_eq!(put_secret(&app, &admin, "API_TOKEN", &v).await.status(), StatusCode::CREATED);
    // Another secret the task does not list: never loaded, never masked, never seen.
    assert_eq!(put_secret(&app, &admin, "UNUSED", &value()).await.status(), StatusCode::CREATED);
    let digest = hex::encode(Sha256::digest(v.as_bytes()));
    let yaml = format!(
        r#"stages:
  - id: s
    tasks:
      - id: leak
        shell: 'echo "$TOKEN"; printf "%s" "$TOKEN" | base64; echo "tok=$TOKEN" >> "$SLUICE_OUTPUT"; [ "$(printf "%s" "$TOKEN" | sha256sum | cut -c1-64)" = "{digest}" ] && echo intact'
        env: {{ TOKEN: "{{{{ secrets.API_TOKEN }}}}" }}
        secrets: [API_TOKEN]
      - id: argv
        run: ["/bin/echo", "bearer {{{{ secrets.API_TOKEN }}}}"]
        secrets: [API_TOKEN]
"#
    );
    assert_eq!(app.create_pipeline(&admin, "d23", &yaml).await.status(), StatusCode::CREATED);
    let id = start(&app, &admin, "d23").await;
    let done = wait_run(&app, &admin, &id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let (text, lines) = logs(&app, &admin, &id, "leak").await;
    assert_no_value(&text, &v, "the task's logs");
    assert_eq!(lines, ["***", "***", "intact"], "the value arrived intact and was masked twice");
    assert_eq!(task_of(&done, "leak")["outputs"], json!({ "tok": "***" }));
    let (text, lines) = logs(&app, &admin, &id, "argv").await;
    assert_no_value(&text, &v, "the task's logs");
    assert_eq!(lines, ["bearer ***"]);
    assert_no_value(&serde_json::to_string(&done).unwrap(), &v, "the run");
    // Nothing in the database holds the value in clear, logs included.
    #[derive(FromQueryResult)]
    struct Body {
        body: String,
    }
    let bodies: Vec<Body> =
        app.store().query_all(app.store().db(), "SELECT body FROM task_logs", vec![]).await.unwrap();
    assert!(!bodies.is_empty());
    for b in bodies {
        assert_no_value(&b.body, &v, "stored logs");
    }
}

#[actix_web::test]
async fn a_template_naming_an_unlisted_secret_fails_the_task() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    let v = value();
    assert_eq!(put_secret(&app, &admin, "OTHER", &v).await.status(), StatusCode::CREATED);
    assert_eq!(put_secret(&app, &admin, "LISTED", &value()).await.status(), StatusCode::CREATED);
    for (name, task_yaml) in [
        (
            "env",
            "        shell: 'echo \"$X\"'\n        env: { X: \"{{ secrets.OTHER }}\" }\n        secrets: [LISTED]\n",
        ),
        ("argv", "        run: [\"/bin/echo\", \"{{ secrets.OTHER }}\"]\n"),
        (
            "http",
            "        http: { method: GET, url: \"http://127.0.0.1:9/?k={{ secrets.OTHER }}\" }\n        secrets: [LISTED]\n",
        ),
    ] {
        let (id, done) = run_task(&app, &admin, &format!("unlisted-{name}"), task_yaml).await;
        assert_eq!(done["status"], "failed", "{name}: {done:#}");
        let msg = task_of(&done, "t")["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("secrets.OTHER") && msg.contains("does not list `OTHER`"), "{name}: {msg}");
        assert_no_value(&serde_json::to_string(&done).unwrap(), &v, "the run");
        let (text, _) = logs(&app, &admin, &id, "t").await;
        assert_no_value(&text, &v, "the logs");
    }
}

#[actix_web::test]
async fn a_listed_but_undefined_secret_fails_the_task() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sec")).await;
    assert_eq!(put_secret(&app, &admin, "DEFINED", &value()).await.status(), StatusCode::CREATED);
    let (_, done) =
        run_task(&app, &admin, "undefined", "        shell: 'echo ran'\n        secrets: [DEFINED, MISSING]\n").await;
    assert_eq!(done["status"], "failed", "{done:#}");
    let msg = task_of(&done, "t")["message"].as_str().unwrap();
    assert!(msg.contains("`MISSING`") && msg.contains("not defined"), "{msg}");
    // A secret of another tenant of that name does not count.
    let other = app.signup(&slug("sec")).await;
    assert_eq!(put_secret(&app, &other, "ELSEWHERE", &value()).await.status(), StatusCode::CREATED);
    let (_, done) = run_task(&app, &admin, "elsewhere", "        noop: true\n        secrets: [ELSEWHERE]\n").await;
    assert_eq!(done["status"], "failed", "{done:#}");
    assert!(task_of(&done, "t")["message"].as_str().unwrap().contains("`ELSEWHERE`"));
    // Deleting a secret makes the tasks that list it fail from then on.
    let (_, done) = run_task(&app, &admin, "defined", "        noop: true\n        secrets: [DEFINED]\n").await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(delete(&app, &admin, "DEFINED").await.status(), StatusCode::NO_CONTENT);
    let id = start(&app, &admin, "defined").await;
    let done = wait_run(&app, &admin, &id, 60).await;
    assert_eq!(done["status"], "failed", "{done:#}");
}

fn config(database_url: Option<&str>, key: Option<String>) -> (Config, std::path::PathBuf) {
    let data_dir = std::env::temp_dir().join(format!("sluice-test-{}", Uuid::new_v4()));
    let args = ConfigArgs {
        data_dir: Some(data_dir.clone()),
        database_url: database_url.map(str::to_owned),
        secrets_key: key,
        ..Default::default()
    };
    (Config::load(&args).unwrap(), data_dir)
}

#[actix_web::test]
async fn the_key_is_configured_or_generated_only_for_the_embedded_database() {
    // PostgreSQL without a key: a clear start-up error (before connecting), no key file written.
    let (c, dir) = config(Some("postgres://sluice@127.0.0.1:1/none"), None);
    let err = format!("{:#}", AppState::init(c).await.err().expect("must not start"));
    assert!(err.contains("SLUICE_SECRETS_KEY") && err.contains("PostgreSQL"), "{err}");
    assert!(!dir.join("secrets.key").exists());
    // A wrong key is refused, naming the setting and never echoing it.
    let short = STANDARD.encode([7u8; 16]);
    let (c, _) = config(None, Some(short.clone()));
    let err = format!("{:#}", SecretsKey::load(&c).unwrap_err());
    assert!(err.contains("SLUICE_SECRETS_KEY") && err.contains("32 bytes") && !err.contains(&short), "{err}");
    // A configured key is used as is, on either database.
    let k = test_secrets_key();
    let (c, dir) = config(Some("postgres://sluice@127.0.0.1:1/none"), Some(k.clone()));
    let a = SecretsKey::load(&c).unwrap();
    assert!(!dir.join("secrets.key").exists());
    let t = Uuid::new_v4();
    let sealed = SecretsKey::from_base64(&k).unwrap().seal(t, "N", 1, "hello").unwrap();
    assert_eq!(a.open(t, "N", 1, &sealed).unwrap(), "hello");
    // Embedded: generated once (mode 0600), then reused.
    let (c, dir) = config(None, None);
    std::fs::create_dir_all(&dir).unwrap();
    let first = SecretsKey::load(&c).unwrap();
    let file = dir.join("secrets.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert_eq!(STANDARD.decode(std::fs::read_to_string(&file).unwrap().trim()).unwrap().len(), 32);
    let sealed = first.seal(t, "N", 1, "hello").unwrap();
    assert_eq!(SecretsKey::load(&c).unwrap().open(t, "N", 1, &sealed).unwrap(), "hello");
    // The test servers: embedded ones generated their key file; PostgreSQL ones did not.
    let app = spawn_app().await;
    assert_eq!(app.data_dir.join("secrets.key").exists(), !use_postgres());
}

#[actix_web::test]
async fn another_tenant_gets_404_and_learns_nothing() {
    let app = spawn_app().await;
    let a = app.signup(&slug("sec")).await;
    let b = app.signup(&slug("sec")).await;
    let v = value();
    assert_eq!(put_secret(&app, &a, "A_ONLY", &v).await.status(), StatusCode::CREATED);
    let (_, b_token) = app.create_token(&b, &["admins"]).await;
    let t = &a.tenant;
    for cred in [b.token.as_str(), b_token.as_str()] {
        for (method, p, body) in [
            (Method::GET, format!("/api/v1/t/{t}/secrets"), None),
            (Method::GET, format!("/api/v1/t/{t}/secrets/A_ONLY"), None),
            (Method::PUT, format!("/api/v1/t/{t}/secrets/A_ONLY"), Some(json!({ "value": "from-b" }))),
            (Method::PUT, format!("/api/v1/t/{t}/secrets/B_PLANTED"), Some(json!({ "value": "from-b" }))),
            (Method::DELETE, format!("/api/v1/t/{t}/secrets/A_ONLY"), None),
        ] {
            let r = app.call(method.clone(), &p, Some(cred), body).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {p}");
            let text = r.text().await.unwrap();
            assert!(!text.contains("A_ONLY") && !text.contains(t.as_str()), "{method} {p}: {text}");
            assert_no_value(&text, &v, "a 404");
        }
    }
    // B's own namespace is separate: the same name is free there.
    let list: Value = app.get(&format!("/api/v1/t/{}/secrets", b.tenant), &b.token).await.json().await.unwrap();
    assert_eq!(list, json!([]));
    assert_eq!(app.get(&path(&b, "A_ONLY"), &b.token).await.status(), StatusCode::NOT_FOUND);
    let s: Value = app.get(&path(&a, "A_ONLY"), &a.token).await.json().await.unwrap();
    assert_eq!(s["version"], 1);
    assert_eq!(app.get(&path(&a, "B_PLANTED"), &a.token).await.status(), StatusCode::NOT_FOUND);
}
