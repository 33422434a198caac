//! Spawning a server per test and talking to it.

use std::{net::TcpListener, path::PathBuf};

use actix_web::web;
use reqwest::{Client, Method, Response, StatusCode};
use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};
use sluice_backend::{AppState, Application, Config, ConfigArgs, store::Store};
use uuid::Uuid;

/// Which database the suite runs on.
pub fn use_postgres() -> bool {
    std::env::var("SLUICE_TEST_DATABASE").is_ok_and(|v| v == "postgres")
}

/// Another connection to a SQLite test server's database, holding SQLite's write lock (in a
/// `BEGIN IMMEDIATE` transaction) until it runs `COMMIT`.
pub async fn hold_sqlite_write_lock(app: &TestApp) -> sea_orm::DatabaseConnection {
    let mut opts = sea_orm::ConnectOptions::new(sluice_backend::store::sqlite_url(&app.state.config.data_dir));
    opts.max_connections(1).sqlx_logging(false);
    let other = Database::connect(opts).await.unwrap();
    other.execute_unprepared("BEGIN IMMEDIATE").await.unwrap();
    other
}

fn postgres_base() -> String {
    std::env::var("SLUICE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A random key for tenant secrets (base64 of 32 bytes).
pub fn test_secrets_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([*Uuid::new_v4().as_bytes(), *Uuid::new_v4().as_bytes()].concat())
}

/// A running server and what a test needs to poke it.
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub state: web::Data<AppState>,
    pub data_dir: PathBuf,
    pub database_url: String,
}

/// A logged-in member of a tenant.
#[derive(Clone, Debug)]
pub struct Member {
    pub tenant: String,
    pub email: String,
    pub password: String,
    pub user_id: String,
    pub token: String,
    pub refresh: String,
}

pub const PASSWORD: &str = "correct-horse-battery";

/// Starts a server on a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a server on a fresh database, after adjusting its configuration.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let data_dir = std::env::temp_dir().join(format!("sluice-test-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let database_url = if use_postgres() {
        let name = format!("sluice_test_{}", Uuid::new_v4().simple());
        let admin = Database::connect(format!("{}/postgres", postgres_base())).await.expect("PostgreSQL is reachable");
        admin
            .execute_raw(Statement::from_string(admin.get_database_backend(), format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        admin.close().await.ok();
        format!("{}/{name}", postgres_base())
    } else {
        sluice_backend::store::sqlite_url(&data_dir)
    };
    let args = ConfigArgs {
        bind: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.clone()),
        database_url: Some(database_url.clone()),
        db_max_connections: Some(8),
        // PostgreSQL never generates a secrets key; the embedded database does (in data_dir).
        secrets_key: use_postgres().then(test_secrets_key),
        ..Default::default()
    };
    let mut config = Config::load(&args).unwrap();
    adjust(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    config.public_url = format!("http://127.0.0.1:{port}");
    let state = web::Data::new(AppState::init(config).await.unwrap());
    let app = Application::with_listener(state.clone(), listener).unwrap();
    actix_web::rt::spawn(app.run_until_stopped());
    TestApp {
        base: format!("http://127.0.0.1:{port}"),
        client: Client::builder().cookie_store(true).build().unwrap(),
        state,
        data_dir,
        database_url,
    }
}

/// The test's data folder goes with it (kept when the test failed, for its logs and database).
impl Drop for TestApp {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// A request with an optional bearer credential and JSON body.
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> Response {
        self.call(Method::PUT, path, Some(token), Some(body)).await
    }

    /// Signs up a tenant and logs its admin in.
    pub async fn signup(&self, tenant: &str) -> Member {
        let email = format!("admin-{}@{tenant}.example", Uuid::new_v4().simple());
        let r = self
            .call(Method::POST, "/api/v1/signup", None,
                Some(json!({ "tenant_slug": tenant, "tenant_name": tenant.to_uppercase(), "email": email, "password": PASSWORD })))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "signup: {}", r.text().await.unwrap());
        self.login(tenant, &email, PASSWORD).await
    }

    /// Logs in.
    pub async fn login(&self, tenant: &str, email: &str, password: &str) -> Member {
        let r = self
            .call(Method::POST, "/api/v1/auth/login", None, Some(json!({ "email": email, "password": password })))
            .await;
        assert_eq!(r.status(), StatusCode::OK, "login {email}");
        let v: Value = r.json().await.unwrap();
        Member {
            tenant: tenant.into(),
            email: email.into(),
            password: password.into(),
            user_id: v["user_id"].as_str().unwrap().into(),
            token: v["access_token"].as_str().unwrap().into(),
            refresh: v["refresh_token"].as_str().unwrap().into(),
        }
    }

    /// Adds a member with a password to `admin`'s tenant and logs them in.
    pub async fn add_member(&self, admin: &Member, groups: &[&str]) -> Member {
        let email =
            format!("{}-{}@{}.example", groups.first().unwrap_or(&"member"), Uuid::new_v4().simple(), admin.tenant);
        let r = self
            .post(
                &format!("/api/v1/t/{}/members", admin.tenant),
                &admin.token,
                json!({ "email": email, "groups": groups, "password": PASSWORD }),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "add member: {}", r.text().await.unwrap());
        self.login(&admin.tenant, &email, PASSWORD).await
    }

    /// Creates an API token in `member`'s tenant with the given groups.
    pub async fn create_token(&self, member: &Member, groups: &[&str]) -> (String, String) {
        let expires = (chrono::Utc::now() + chrono::Duration::days(7)).to_rfc3339();
        let r = self
            .post(
                &format!("/api/v1/t/{}/tokens", member.tenant),
                &member.token,
                json!({ "name": "ci", "expires_at": expires, "groups": groups }),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "create token: {}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        (v["id"].as_str().unwrap().into(), v["token"].as_str().unwrap().into())
    }

    /// Creates a pipeline from YAML.
    pub async fn create_pipeline(&self, member: &Member, name: &str, yaml: &str) -> Response {
        self.post(
            &format!("/api/v1/t/{}/pipelines", member.tenant),
            &member.token,
            json!({ "name": name, "definition": yaml, "message": "test" }),
        )
        .await
    }

    /// Runs raw SQL against the test database (written with `$n` placeholders).
    pub async fn sql(&self, sql: &str, values: Vec<sea_orm::Value>) -> u64 {
        self.store().execute(self.store().db(), sql, values).await.unwrap()
    }

    /// Prepares a database that fails for a moment: while [`Self::refusing`] is on, the writes
    /// `event` names (`INSERT ON runs`, say), those matching `when` (a condition on `NEW`) if
    /// given, fail with an error.
    pub async fn refuse_writes(&self, event: &str, when: Option<&str>) {
        self.sql("CREATE TABLE refusing (x INTEGER)", vec![]).await;
        if self.store().backend() == sea_orm::DbBackend::Postgres {
            self.sql(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN \
                 IF EXISTS (SELECT 1 FROM refusing) THEN RAISE EXCEPTION 'the database refuses writes'; END IF; \
                 RETURN NEW; END $$ LANGUAGE plpgsql",
                vec![],
            )
            .await;
            let when = when.map(|w| format!(" WHEN ({w})")).unwrap_or_default();
            let sql = format!("CREATE TRIGGER refuse BEFORE {event} FOR EACH ROW{when} EXECUTE FUNCTION refuse()");
            self.sql(&sql, vec![]).await;
        } else {
            let when = when.map(|w| format!("{w} AND ")).unwrap_or_default();
            let sql = format!(
                "CREATE TRIGGER refuse BEFORE {event} WHEN {when}EXISTS (SELECT 1 FROM refusing) \
                 BEGIN SELECT RAISE(ABORT, 'the database refuses writes'); END"
            );
            self.sql(&sql, vec![]).await;
        }
    }

    /// Turns the refusal prepared by [`Self::refuse_writes`] on or off.
    pub async fn refusing(&self, on: bool) {
        let sql = if on { "INSERT INTO refusing (x) VALUES (1)" } else { "DELETE FROM refusing" };
        self.sql(sql, vec![]).await;
    }
}

/// A small valid pipeline.
pub const PIPELINE: &str = "stages:\n  - id: build\n    tasks:\n      - id: compile\n        run: [\"cargo\", \"build\"]\n      - id: test\n        needs: [compile]\n        shell: \"cargo test\"\n";

/// A unique tenant slug.
pub fn slug(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// The body of a problem response, asserting its content type.
pub async fn problem(r: Response) -> Value {
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert!(ct.starts_with("application/problem+json"), "content type {ct}");
    r.json().await.unwrap()
}

/// Polls a run until it is in a terminal state; fails the test after `secs`.
pub async fn wait_run(app: &TestApp, m: &Member, id: &str, secs: u64) -> Value {
    let ended = |v: &Value| ["succeeded", "failed", "cancelled", "timed_out"].contains(&v["status"].as_str().unwrap());
    wait_until(app, m, id, secs, &format!("run did not finish in {secs} s"), ended).await
}

/// The view of run `id` once `done` holds for it; fails with `what` after `secs` seconds.
pub async fn wait_until(
    app: &TestApp,
    m: &Member,
    id: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let r = app.get(&format!("/api/v1/t/{}/runs/{id}", m.tenant), &m.token).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        if done(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v:#}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The task of a run view with this key.
pub fn task_of<'a>(run: &'a Value, key: &str) -> &'a Value {
    run["tasks"].as_array().unwrap().iter().find(|t| t["key"] == key).unwrap_or_else(|| panic!("no task {key}"))
}
