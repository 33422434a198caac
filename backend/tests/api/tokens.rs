//! API tokens: life cycle, validation, scoping, expiry, revocation, and that only hashes of
//! secrets are stored.

use chrono::{DateTime, Duration, Utc};
use reqwest::{Method, Response, StatusCode};
use sea_orm::FromQueryResult;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::helpers::*;

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// An expiry `days` ahead, on a whole second (so it survives every database's precision).
fn in_days(days: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp() + days * 86_400, 0).unwrap()
}

async fn create(app: &TestApp, m: &Member, body: Value) -> Response {
    app.post(&format!("/api/v1/t/{}/tokens", m.tenant), &m.token, body).await
}

async fn list(app: &TestApp, m: &Member) -> Vec<Value> {
    let r = app.get(&format!("/api/v1/t/{}/tokens", m.tenant), &m.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn revoke(app: &TestApp, m: &Member, id: &str) -> Response {
    app.call(Method::DELETE, &format!("/api/v1/t/{}/tokens/{id}", m.tenant), Some(&m.token), None).await
}

async fn expect_problem(r: Response, status: StatusCode, slug: &str) -> Value {
    assert_eq!(r.status(), status, "expected {status} {slug}");
    let p = problem(r).await;
    assert_eq!(p["type"], format!("urn:sluice:problem:{slug}"), "{p}");
    p
}

async fn expect_invalid(r: Response, field: &str) -> Value {
    let p = expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation").await;
    assert_eq!(p["errors"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["errors"][0]["field"], field, "{p}");
    p
}

async fn expect_401(r: Response) {
    expect_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

fn is_token_shape(t: &str) -> bool {
    t.len() == 42 && t.starts_with("slc_") && t[4..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[actix_web::test]
async fn token_life_cycle() {
    let app = spawn_app().await;
    let t = slug("tok");
    let admin = app.signup(&t).await;
    let expires = in_days(30);
    let r = create(
        &app,
        &admin,
        json!({ "name": "  deploy bot  ", "expires_at": expires, "groups": ["viewers", "editors", "viewers"] }),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(is_token_shape(&token), "{token}");
    let id = created["id"].as_str().unwrap().to_owned();
    Uuid::parse_str(&id).unwrap();
    assert_eq!(created["prefix"], token[..10]);
    assert_eq!(created["name"], "deploy bot");
    assert_eq!(created["created_by"], admin.email);
    assert_eq!(created["groups"], json!(["editors", "viewers"]));
    assert_eq!(created["expires_at"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(), expires);
    assert_eq!(created["last_used_at"], Value::Null);
    assert_eq!(created["revoked_at"], Value::Null);
    assert!(created.get("token_hash").is_none());
    let (_, second) = app.create_token(&admin, &["viewers"]).await;
    assert_ne!(second, token);

    // Listed without the secret or its hash, newest first.
    let items = list(&app, &admin).await;
    assert_eq!(items.len(), 2);
    let item = items.iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!(items[1]["id"], id.as_str(), "newest first");
    for k in ["prefix", "name", "created_by", "groups", "last_used_at", "revoked_at"] {
        assert_eq!(item[k], created[k], "{k}");
    }
    let time = |v: &Value, k: &str| v[k].as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
    assert_eq!(time(item, "expires_at"), expires);
    assert!((time(item, "created_at") - time(&created, "created_at")).abs() < Duration::milliseconds(1));
    let mut keys: Vec<&String> = item.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["created_at", "created_by", "expires_at", "groups", "id", "last_used_at", "name", "prefix", "revoked_at"]
    );
    let listed = serde_json::to_string(&items).unwrap();
    for secret in [&token, &second] {
        assert!(
            !listed.contains(&secret[..]) && !listed.contains(&sha256_hex(secret)) && !listed.contains(&secret[4..36])
        );
    }
    assert!(items.iter().all(|i| i.get("token").is_none() && i.get("token_hash").is_none()));

    // Used as a Bearer credential in its tenant, with its own groups.
    let r = app.get(&format!("/api/v1/t/{t}/pipelines"), &token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = app.get("/api/v1/me", &token).await;
    let me: Value = r.json().await.unwrap();
    assert_eq!(me["principal"], "token");
    assert_eq!(me["memberships"][0]["groups"], json!(["editors", "viewers"]));
    // last_used_at is recorded (in the background).
    let mut last_used = Value::Null;
    for _ in 0..50 {
        let items = list(&app, &admin).await;
        last_used = items.iter().find(|i| i["id"] == id.as_str()).unwrap()["last_used_at"].clone();
        if !last_used.is_null() {
            break;
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let last_used: DateTime<Utc> = last_used.as_str().expect("last_used_at set after use").parse().unwrap();
    let created_at: DateTime<Utc> = created["created_at"].as_str().unwrap().parse().unwrap();
    assert!(last_used >= created_at && last_used <= Utc::now(), "{last_used} vs {created_at}");

    // Revoked: refused from the next request on; revoking again is fine; others unaffected.
    assert_eq!(revoke(&app, &admin, &id).await.status(), StatusCode::NO_CONTENT);
    expect_401(app.get(&format!("/api/v1/t/{t}/pipelines"), &token).await).await;
    expect_401(app.get("/api/v1/me", &token).await).await;
    assert_eq!(revoke(&app, &admin, &id).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.get(&format!("/api/v1/t/{t}/pipelines"), &second).await.status(), StatusCode::OK);
    let items = list(&app, &admin).await;
    let item = items.iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert!(item["revoked_at"].as_str().unwrap().parse::<DateTime<Utc>>().is_ok());
    expect_problem(revoke(&app, &admin, &Uuid::new_v4().to_string()).await, StatusCode::NOT_FOUND, "not-found").await;
    expect_problem(revoke(&app, &admin, "not-a-uuid").await, StatusCode::NOT_FOUND, "not-found").await;

    // Audited, naming the token by prefix only.
    let r = app.get(&format!("/api/v1/t/{t}/audit?resource_id={id}"), &admin.token).await;
    let audit: Value = r.json().await.unwrap();
    let actions: Vec<&str> = audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["token.revoke", "token.create"], "{audit}");
    assert_eq!(audit["items"][1]["details"]["prefix"], token[..10]);
    assert!(!audit.to_string().contains(&token[4..36]));
}

#[actix_web::test]
async fn token_expiry_and_fields_are_validated() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("tokval")).await;

    // Expiry is mandatory: a malformed request.
    let r = create(&app, &admin, json!({ "name": "x", "groups": ["viewers"] })).await;
    let p = expect_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
    assert!(p["detail"].as_str().unwrap().contains("expires_at"), "{p}");
    let r = create(&app, &admin, json!({ "name": "x", "expires_at": null, "groups": [] })).await;
    expect_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
    let r = create(&app, &admin, json!({ "name": "x", "expires_at": "next tuesday", "groups": [] })).await;
    expect_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;

    expect_invalid(
        create(&app, &admin, json!({ "name": "x", "expires_at": Utc::now() - Duration::minutes(1), "groups": [] }))
            .await,
        "expires_at",
    )
    .await;
    expect_invalid(
        create(&app, &admin, json!({ "name": "x", "expires_at": in_days(366), "groups": [] })).await,
        "expires_at",
    )
    .await;
    assert_eq!(
        create(&app, &admin, json!({ "name": "x", "expires_at": in_days(364), "groups": [] })).await.status(),
        StatusCode::CREATED
    );

    expect_invalid(
        create(&app, &admin, json!({ "name": "   ", "expires_at": in_days(1), "groups": [] })).await,
        "name",
    )
    .await;
    expect_invalid(
        create(&app, &admin, json!({ "name": "n".repeat(101), "expires_at": in_days(1), "groups": [] })).await,
        "name",
    )
    .await;
    let p = expect_invalid(
        create(&app, &admin, json!({ "name": "x", "expires_at": in_days(1), "groups": ["nope"] })).await,
        "groups[0]",
    )
    .await;
    assert!(p["errors"][0]["message"].as_str().unwrap().contains("nope"));
    expect_invalid(
        create(&app, &admin, json!({ "name": "x", "expires_at": in_days(1), "groups": ["viewers", "Admins"] })).await,
        "groups[1]",
    )
    .await;
    // None of the refused requests created a token.
    assert_eq!(list(&app, &admin).await.len(), 1);

    // The maximum lifetime is configurable.
    let app = spawn_app_with(|c| c.token_max_days = 7).await;
    let admin = app.signup(&slug("tokmax")).await;
    let p = expect_invalid(
        create(&app, &admin, json!({ "name": "x", "expires_at": in_days(8), "groups": [] })).await,
        "expires_at",
    )
    .await;
    assert!(p["errors"][0]["message"].as_str().unwrap().contains("7 days"), "{p}");
    assert_eq!(
        create(&app, &admin, json!({ "name": "x", "expires_at": in_days(6), "groups": [] })).await.status(),
        StatusCode::CREATED
    );
}

#[actix_web::test]
async fn a_token_never_has_more_groups_than_its_creator() {
    let app = spawn_app().await;
    let t = slug("tokgrp");
    let admin = app.signup(&t).await;
    let editor = app.add_member(&admin, &["editors"]).await;
    let body = |groups: Value| json!({ "name": "mine", "expires_at": in_days(3), "groups": groups });
    // The default policies let only admins create tokens.
    expect_problem(create(&app, &editor, body(json!(["editors"]))).await, StatusCode::FORBIDDEN, "forbidden").await;
    // A tenant may let editors create tokens; they still cannot hand out groups they lack.
    let policies: Value = app.get(&format!("/api/v1/t/{t}/policies"), &admin.token).await.json().await.unwrap();
    let text = format!(
        "{}\n@id(\"editors-create-tokens\")\npermit (principal in Group::\"editors\", action == Action::\"token.create\", resource);\n",
        policies["text"].as_str().unwrap()
    );
    let r = app
        .put(
            &format!("/api/v1/t/{t}/policies"),
            &admin.token,
            json!({ "text": text, "message": "editors make CI tokens" }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());

    let p = expect_invalid(create(&app, &editor, body(json!(["admins"]))).await, "groups[0]").await;
    assert!(p["detail"].as_str().unwrap().contains("admins"), "{p}");
    expect_invalid(create(&app, &editor, body(json!(["viewers"]))).await, "groups[0]").await;
    // The index points into the request as sent.
    expect_invalid(create(&app, &editor, body(json!(["editors", "admins"]))).await, "groups[1]").await;
    expect_invalid(create(&app, &editor, body(json!(["viewers", "editors"]))).await, "groups[0]").await;
    expect_invalid(create(&app, &editor, body(json!(["editors", "nope"]))).await, "groups[1]").await;

    // Their own group is fine.
    let r = create(&app, &editor, body(json!(["editors"]))).await;
    assert_eq!(r.status(), StatusCode::CREATED, "an editor may create a token with their own group");
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let me: Value = app.get("/api/v1/me", &token).await.json().await.unwrap();
    assert_eq!(me["memberships"][0]["groups"], json!(["editors"]));
    // An admin may hand out any group.
    let r = create(&app, &admin, body(json!(["approvers", "viewers"]))).await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // When the owner leaves the group, the token loses it at once.
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/v1/t/{t}/members/{}", editor.user_id),
            Some(&admin.token),
            Some(json!({ "groups": ["viewers"] })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let me: Value = app.get("/api/v1/me", &token).await.json().await.unwrap();
    assert_eq!(me["memberships"][0]["groups"], json!([]));
}

#[actix_web::test]
async fn expired_token_is_refused() {
    let app = spawn_app().await;
    let t = slug("tokexp");
    let admin = app.signup(&t).await;
    let (id, token) = app.create_token(&admin, &["viewers"]).await;
    let (other_id, other) = app.create_token(&admin, &["viewers"]).await;
    assert_eq!(app.get(&format!("/api/v1/t/{t}/pipelines"), &token).await.status(), StatusCode::OK);
    let past = Utc::now() - Duration::seconds(1);
    let n = app
        .sql(
            "UPDATE api_tokens SET expires_at = $1 WHERE id = $2",
            vec![past.into(), Uuid::parse_str(&id).unwrap().into()],
        )
        .await;
    assert_eq!(n, 1);
    expect_401(app.get(&format!("/api/v1/t/{t}/pipelines"), &token).await).await;
    expect_401(app.get("/api/v1/me", &token).await).await;
    assert_eq!(
        app.get(&format!("/api/v1/t/{t}/pipelines"), &other).await.status(),
        StatusCode::OK,
        "{other_id} unaffected"
    );
}

#[actix_web::test]
async fn a_token_only_works_in_its_tenant() {
    let app = spawn_app().await;
    let (ta, tb) = (slug("toka"), slug("tokb"));
    let admin_a = app.signup(&ta).await;
    let admin_b = app.signup(&tb).await;
    // The owner is a member of both tenants; the token is still bound to A.
    let r = app
        .post(
            &format!("/api/v1/t/{tb}/members"),
            &admin_b.token,
            json!({ "email": admin_a.email, "groups": ["admins"] }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let (_, token) = app.create_token(&admin_a, &["admins"]).await;
    assert_eq!(app.get(&format!("/api/v1/t/{ta}/pipelines"), &token).await.status(), StatusCode::OK);
    for path in [
        format!("/api/v1/t/{tb}/pipelines"),
        format!("/api/v1/t/{tb}"),
        format!("/api/v1/t/{tb}/tokens"),
        "/api/v1/t/no-such-tenant/pipelines".into(),
    ] {
        expect_problem(app.get(&path, &token).await, StatusCode::NOT_FOUND, "not-found").await;
    }
    let r = app
        .post(&format!("/api/v1/t/{tb}/tokens"), &token, json!({ "name": "x", "expires_at": in_days(1), "groups": [] }))
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "not-found").await;
    // A's token ids are unknown in B.
    let (id_a, _) = app.create_token(&admin_a, &["viewers"]).await;
    expect_problem(revoke(&app, &admin_b, &id_a).await, StatusCode::NOT_FOUND, "not-found").await;
}

#[actix_web::test]
async fn a_bad_checksum_is_refused_before_any_lookup() {
    let app = spawn_app().await;
    let t = slug("tokcrc");
    let admin = app.signup(&t).await;
    let (id, token) = app.create_token(&admin, &["viewers"]).await;
    let path = format!("/api/v1/t/{t}/pipelines");
    // One character of the checksum changed.
    let last = token.chars().last().unwrap();
    let corrupted = format!("{}{}", &token[..41], if last == 'a' { 'b' } else { 'a' });
    assert!(is_token_shape(&corrupted));
    // Store the hash of the corrupted token in place of the real one: a server that looked the
    // corrupted token up would now accept it.
    let n = app
        .sql(
            "UPDATE api_tokens SET token_hash = $1 WHERE id = $2",
            vec![sha256_hex(&corrupted).into(), Uuid::parse_str(&id).unwrap().into()],
        )
        .await;
    assert_eq!(n, 1);
    expect_401(app.get(&path, &corrupted).await).await;
    expect_401(app.get(&path, &token).await).await;
    // Swap back: the real token works again, so the refusal above was the checksum's.
    app.sql(
        "UPDATE api_tokens SET token_hash = $1 WHERE id = $2",
        vec![sha256_hex(&token).into(), Uuid::parse_str(&id).unwrap().into()],
    )
    .await;
    assert_eq!(app.get(&path, &token).await.status(), StatusCode::OK);
    // A changed random part with the old checksum, a truncated and an extended token.
    let flipped = format!("{}{}{}", &token[..8], if &token[8..9] == "Z" { "Y" } else { "Z" }, &token[9..]);
    for bad in [
        flipped,
        token[..41].to_owned(),
        format!("{token}0"),
        token.replace("slc_", "SLC_"),
        format!("slc_{}", "A".repeat(38)),
    ] {
        expect_401(app.get(&path, &bad).await).await;
    }
}

#[actix_web::test]
async fn removing_the_owner_stops_their_tokens() {
    let app = spawn_app().await;
    let t = slug("tokrm");
    let admin = app.signup(&t).await;
    let owner = app.add_member(&admin, &["admins"]).await;
    let (id, token) = app.create_token(&owner, &["viewers"]).await;
    let (_, admins_token) = app.create_token(&admin, &["viewers"]).await;
    let path = format!("/api/v1/t/{t}/pipelines");
    assert_eq!(app.get(&path, &token).await.status(), StatusCode::OK);

    let r =
        app.call(Method::DELETE, &format!("/api/v1/t/{t}/members/{}", owner.user_id), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    expect_401(app.get(&path, &token).await).await;
    assert_eq!(app.get(&path, &admins_token).await.status(), StatusCode::OK);
    let items = list(&app, &admin).await;
    assert!(items.iter().find(|i| i["id"] == id.as_str()).unwrap()["revoked_at"].is_string(), "{items:?}");
    // Coming back does not revive the token.
    let r = app
        .post(&format!("/api/v1/t/{t}/members"), &admin.token, json!({ "email": owner.email, "groups": ["admins"] }))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    expect_401(app.get(&path, &token).await).await;
    assert_eq!(app.get(&path, &owner.token).await.status(), StatusCode::OK, "their login works again");
}

#[derive(FromQueryResult)]
struct Name {
    name: String,
}

async fn names(app: &TestApp, sql: &str, values: Vec<sea_orm::Value>) -> Vec<String> {
    let rows: Vec<Name> = app.store().query_all(app.store().db(), sql, values).await.unwrap();
    let mut v: Vec<String> = rows.into_iter().map(|r| r.name).collect();
    v.sort();
    v
}

/// Every row of every table, as JSON, checked to hold every column.
async fn dump_database(app: &TestApp) -> String {
    let tables = if app.database_url.starts_with("postgres") {
        names(app, "SELECT table_name::text AS name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'", vec![]).await
    } else {
        names(app, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'", vec![]).await
    };
    for expected in [
        "tenants",
        "users",
        "memberships",
        "groups",
        "invitations",
        "sessions",
        "refresh_tokens",
        "api_tokens",
        "policy_versions",
        "pipelines",
        "pipeline_versions",
        "audit_heads",
        "audit_events",
        "login_throttle",
    ] {
        assert!(tables.iter().any(|t| t == expected), "table {expected} missing from {tables:?}");
    }
    let mut out = String::new();
    for table in &tables {
        let columns = if app.database_url.starts_with("postgres") {
            names(app, "SELECT column_name::text AS name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1", vec![table.clone().into()]).await
        } else {
            names(app, "SELECT name FROM pragma_table_info($1)", vec![table.clone().into()]).await
        };
        assert!(!columns.is_empty(), "{table}");
        let rows: Vec<Value> =
            app.store().query_all(app.store().db(), &format!("SELECT * FROM {table}"), vec![]).await.unwrap();
        for row in rows {
            let obj = row.as_object().unwrap();
            for c in &columns {
                assert!(obj.contains_key(c), "column {table}.{c} was not dumped: {row}");
            }
            out.push_str(&format!("{table}: {row}\n"));
        }
    }
    out
}

#[actix_web::test]
async fn only_hashes_of_secrets_are_stored() {
    let app = spawn_app().await;
    let t = slug("tokdb");
    let admin = app.signup(&t).await;
    let (_, token) = app.create_token(&admin, &["viewers"]).await;
    let (revoked_id, revoked) = app.create_token(&admin, &["editors"]).await;
    assert_eq!(app.get(&format!("/api/v1/t/{t}/pipelines"), &token).await.status(), StatusCode::OK);
    assert_eq!(app.get(&format!("/api/v1/t/{t}/pipelines"), &revoked).await.status(), StatusCode::OK);
    assert_eq!(revoke(&app, &admin, &revoked_id).await.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.create_pipeline(&admin, "deploy", PIPELINE).await.status(), StatusCode::CREATED);
    // A rotated and a current refresh token, an invitation, a failed login.
    let r = app.call(Method::POST, "/api/v1/auth/refresh", None, Some(json!({ "refresh_token": admin.refresh }))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let refreshed: Value = r.json().await.unwrap();
    let refresh2 = refreshed["refresh_token"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/v1/t/{t}/members"),
            &admin.token,
            json!({ "email": "invitee@tokdb.example", "groups": [] }),
        )
        .await;
    let invite = r.json::<Value>().await.unwrap()["invitation_token"].as_str().unwrap().to_owned();
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": admin.email, "password": "wrong-password-1" })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Wait for the background last_used_at update, so the dump sees a settled database.
    for _ in 0..50 {
        if list(&app, &admin).await.iter().all(|i| !i["last_used_at"].is_null()) {
            break;
        }
        actix_web::rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let dump = dump_database(&app).await;
    let secrets = [
        ("api token", &token),
        ("revoked api token", &revoked),
        ("refresh token", &admin.refresh),
        ("rotated refresh token", &refresh2),
        ("invitation", &invite),
    ];
    for (what, secret) in secrets {
        assert!(!dump.contains(secret.as_str()), "{what} stored in plaintext");
        assert!(dump.contains(&sha256_hex(secret)), "{what}: its SHA-256 is stored");
        assert!(!dump.to_lowercase().contains(&secret.to_lowercase()), "{what} stored in another case");
    }
    for secret in [&token, &revoked] {
        // The random part beyond the displayed prefix is nowhere.
        assert!(!dump.contains(&secret[10..]), "token body stored");
    }
    assert!(!dump.contains(&admin.token), "access token stored");
    assert!(!dump.contains(PASSWORD) && !dump.contains("wrong-password-1"), "a password stored");
    assert!(dump.contains("$argon2id$"), "password hashes are dumped too");
}

/// The README's example: a viewers token asking for another token is refused, whatever the body.
#[actix_web::test]
async fn a_viewers_token_cannot_create_tokens() {
    let app = spawn_app().await;
    let t = slug("tokview");
    let admin = app.signup(&t).await;
    let (id, token) = app.create_token(&admin, &["viewers"]).await;
    let path = format!("/api/v1/t/{t}/tokens");
    for body in [json!({}), json!({ "name": "more", "expires_at": in_days(1), "groups": ["viewers"] })] {
        expect_problem(app.post(&path, &token, body).await, StatusCode::FORBIDDEN, "forbidden").await;
    }
    // An admin sending the empty body gets the malformed-request answer.
    expect_problem(app.post(&path, &admin.token, json!({})).await, StatusCode::BAD_REQUEST, "bad-request").await;
    assert_eq!(list(&app, &admin).await.len(), 1);
    // The refusals are audited, naming the token.
    let r = app.get(&format!("/api/v1/t/{t}/audit?action=token.create&outcome=deny"), &admin.token).await;
    let v: Value = r.json().await.unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    assert!(items.iter().all(|e| e["actor_type"] == "token" && e["actor_id"] == id.as_str()), "{v}");
}
