//! Signup, login (throttling, audit), refresh rotation, cookies, logout, /me, invitations and
//! disabling a user.

use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

const SIGNUP: &str = "/api/v1/signup";
const LOGIN: &str = "/api/v1/auth/login";
const REFRESH: &str = "/api/v1/auth/refresh";
const LOGOUT: &str = "/api/v1/auth/logout";
const ME: &str = "/api/v1/me";

fn email(tag: &str) -> String {
    format!("{tag}-{}@auth.example", Uuid::new_v4().simple())
}

async fn signup_raw(app: &TestApp, body: Value) -> Response {
    app.call(Method::POST, SIGNUP, None, Some(body)).await
}

async fn login_raw(app: &TestApp, email: &str, password: &str) -> Response {
    app.call(Method::POST, LOGIN, None, Some(json!({ "email": email, "password": password }))).await
}

async fn refresh_raw(app: &TestApp, refresh: &str) -> Response {
    app.call(Method::POST, REFRESH, None, Some(json!({ "refresh_token": refresh }))).await
}

/// Asserts a problem response with the given status and type slug; returns the body.
async fn expect_problem(r: Response, status: StatusCode, slug: &str) -> Value {
    assert_eq!(r.status(), status, "expected {status} {slug}");
    let p = problem(r).await;
    assert_eq!(p["type"], format!("urn:sluice:problem:{slug}"), "{p}");
    assert_eq!(p["status"], status.as_u16(), "{p}");
    p
}

/// The `field`s of a problem's `errors`.
fn fields(p: &Value) -> Vec<String> {
    p["errors"]
        .as_array()
        .map(|a| a.iter().map(|e| e["field"].as_str().unwrap_or_default().to_owned()).collect())
        .unwrap_or_default()
}

async fn expect_401(r: Response) {
    let www = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
    expect_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    assert_eq!(www.as_deref(), Some("Bearer"));
}

async fn me(app: &TestApp, token: &str) -> Value {
    let r = app.get(ME, token).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

// ---------------------------------------------------------------- signup

#[actix_web::test]
async fn signup_creates_tenant_and_admin() {
    let app = spawn_app().await;
    let t = slug("signup");
    let e = email("Founder");
    let r = signup_raw(&app, json!({ "tenant_slug": t, "tenant_name": "  Acme Inc  ", "email": format!("  {}  ", e.to_uppercase()), "password": PASSWORD })).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["tenant"], t);
    assert_eq!(v["tenant_name"], "Acme Inc");
    assert_eq!(v["email"], e.to_lowercase());
    let user_id = v["user_id"].as_str().unwrap().to_owned();
    Uuid::parse_str(&user_id).unwrap();

    let m = app.login(&t, &e, PASSWORD).await;
    assert_eq!(m.user_id, user_id);
    let me = me(&app, &m.token).await;
    assert_eq!(me["principal"], "user");
    assert_eq!(me["email"], e.to_lowercase());
    assert_eq!(me["memberships"], json!([{ "tenant": t, "tenant_name": "Acme Inc", "groups": ["admins"] }]));
}

#[actix_web::test]
async fn signup_rejects_each_invalid_field_naming_it() {
    let app = spawn_app().await;
    let valid =
        || json!({ "tenant_slug": slug("valid"), "tenant_name": "Valid", "email": email("v"), "password": PASSWORD });
    let cases: [(&str, Value, &str); 8] = [
        ("tenant_slug", json!("Bad Slug!"), "uppercase and spaces"),
        ("tenant_slug", json!("-leading"), "leading dash"),
        ("tenant_slug", json!("a"), "too short"),
        ("tenant_name", json!(""), "empty name"),
        ("tenant_name", json!("   "), "blank name"),
        ("email", json!("not-an-email"), "no @"),
        ("password", json!("1234567"), "7 characters"),
        ("password", json!("x".repeat(129)), "129 characters"),
    ];
    for (field, value, why) in cases {
        let mut body = valid();
        body[field] = value;
        let p = expect_problem(signup_raw(&app, body).await, StatusCode::UNPROCESSABLE_ENTITY, "validation").await;
        assert_eq!(fields(&p), [field], "{why}: {p}");
    }
    // Bounds that are valid: exactly 8 and 128 characters.
    for pw in ["12345678".to_owned(), "y".repeat(128)] {
        let mut body = valid();
        body["password"] = json!(pw);
        assert_eq!(signup_raw(&app, body).await.status(), StatusCode::CREATED);
    }
    // Every invalid field is reported at once.
    let p = expect_problem(
        signup_raw(&app, json!({ "tenant_slug": "X", "tenant_name": "", "email": "nope", "password": "short" })).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    )
    .await;
    assert_eq!(fields(&p), ["tenant_slug", "tenant_name", "email", "password"]);
}

#[actix_web::test]
async fn signup_duplicate_slug_is_409() {
    let app = spawn_app().await;
    let t = slug("dup");
    app.signup(&t).await;
    let e = email("other");
    let p = expect_problem(
        signup_raw(&app, json!({ "tenant_slug": t, "tenant_name": "Other", "email": e, "password": PASSWORD })).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    assert_eq!(fields(&p), ["tenant_slug"]);
    // The transaction was rolled back: the new user was not created.
    let r = login_raw(&app, &e, PASSWORD).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn signup_with_existing_email_needs_its_password() {
    let app = spawn_app().await;
    let t1 = slug("first");
    let admin = app.signup(&t1).await;
    let t2 = slug("second");

    let p = expect_problem(
        signup_raw(&app, json!({ "tenant_slug": t2, "tenant_name": "Second", "email": admin.email, "password": "a-different-password" })).await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    assert_eq!(fields(&p), ["email"]);
    // The slug was not taken by the failed attempt.
    let r = signup_raw(&app, json!({ "tenant_slug": t2, "tenant_name": "Second", "email": admin.email.to_uppercase(), "password": PASSWORD })).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user_id"], admin.user_id, "same user");
    // The password did not change and both tenants are the user's.
    let again = app.login(&t2, &admin.email, PASSWORD).await;
    let me = me(&app, &again.token).await;
    let mut expected = vec![
        json!({ "tenant": t1, "tenant_name": t1.to_uppercase(), "groups": ["admins"] }),
        json!({ "tenant": t2, "tenant_name": "Second", "groups": ["admins"] }),
    ];
    expected.sort_by_key(|m| m["tenant"].as_str().unwrap().to_owned());
    assert_eq!(me["memberships"], Value::Array(expected));
    assert_eq!(app.get(&format!("/api/v1/t/{t2}"), &again.token).await.status(), StatusCode::OK);
}

#[actix_web::test]
async fn signup_disabled_by_configuration_is_403() {
    let app = spawn_app_with(|c| c.signup_enabled = false).await;
    let e = email("nope");
    let r = signup_raw(
        &app,
        json!({ "tenant_slug": slug("closed"), "tenant_name": "Closed", "email": e, "password": PASSWORD }),
    )
    .await;
    expect_problem(r, StatusCode::FORBIDDEN, "forbidden").await;
    assert_eq!(login_raw(&app, &e, PASSWORD).await.status(), StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------- login

#[actix_web::test]
async fn login_unknown_user_and_wrong_password_look_alike() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("alike")).await;
    let a = login_raw(&app, &email("ghost"), "whatever-password").await;
    let b = login_raw(&app, &admin.email, "whatever-password").await;
    assert_eq!(a.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(a.status(), b.status());
    let header = |r: &Response, h: &str| r.headers().get(h).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header(&a, "content-type"), header(&b, "content-type"));
    assert_eq!(header(&a, "www-authenticate"), header(&b, "www-authenticate"));
    assert!(header(&a, "set-cookie").is_none() && header(&b, "set-cookie").is_none());
    let (a, b) = (a.text().await.unwrap(), b.text().await.unwrap());
    assert_eq!(a, b, "identical bodies");
    let p: Value = serde_json::from_str(&a).unwrap();
    assert_eq!(p["type"], "urn:sluice:problem:invalid-login");
    assert_eq!(p["status"], 401);
    // The email is matched case-insensitively and trimmed.
    let r = login_raw(&app, &format!(" {} ", admin.email.to_uppercase()), PASSWORD).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["user_id"], admin.user_id);
    let exp = v["expires_in"].as_i64().unwrap();
    assert!((890..=900).contains(&exp), "expires_in {exp}");
    assert!(v["refresh_token"].as_str().unwrap().len() >= 40);
}

/// Fails logins until a 429 comes; returns the number of 401s before it and the 429 response.
async fn fail_until_blocked(app: &TestApp, emails: impl Fn(usize) -> String, limit: usize) -> (usize, Response) {
    for i in 0..=limit {
        let r = login_raw(app, &emails(i), "wrong-password-123").await;
        match r.status() {
            StatusCode::UNAUTHORIZED => continue,
            StatusCode::TOO_MANY_REQUESTS => return (i, r),
            s => panic!("unexpected {s}"),
        }
    }
    panic!("no block after {limit} failures");
}

async fn expect_429(r: Response) -> u64 {
    let retry: u64 = r.headers().get("retry-after").expect("Retry-After").to_str().unwrap().parse().unwrap();
    assert!((1..=15 * 60).contains(&retry), "Retry-After {retry}");
    let p = expect_problem(r, StatusCode::TOO_MANY_REQUESTS, "too-many-requests").await;
    assert!(p["detail"].as_str().unwrap().contains(&retry.to_string()), "{p}");
    retry
}

#[actix_web::test]
async fn login_is_throttled_per_account() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("throttle")).await;
    let (failures, r) = fail_until_blocked(&app, |_| admin.email.clone(), 10).await;
    assert!((1..=10).contains(&failures), "blocked after {failures} failures");
    expect_429(r).await;
    // The right password does not get through a block.
    expect_429(login_raw(&app, &admin.email, PASSWORD).await).await;
    // Nor does the same account spelled differently.
    expect_429(login_raw(&app, &admin.email.to_uppercase(), PASSWORD).await).await;
    // Another account from the same address is not blocked yet (the address threshold is higher).
    let other = app.add_member(&admin, &["viewers"]).await;
    assert!(!other.token.is_empty());
    // The existing session still works: a block concerns logins only.
    assert_eq!(app.get(ME, &admin.token).await.status(), StatusCode::OK);
}

#[actix_web::test]
async fn login_is_throttled_per_address_across_emails() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("ipthrottle")).await;
    let (failures, r) =
        fail_until_blocked(&app, |i| format!("nobody-{i}-{}@else.example", Uuid::new_v4().simple()), 10).await;
    assert!((1..=10).contains(&failures), "blocked after {failures} failures");
    expect_429(r).await;
    // Every account from this address is blocked now, even with its right password.
    expect_429(login_raw(&app, &admin.email, PASSWORD).await).await;
}

#[actix_web::test]
async fn login_successes_and_failures_are_audited_in_the_tenant() {
    let app = spawn_app().await;
    let t = slug("audit");
    let admin = app.signup(&t).await;
    assert_eq!(login_raw(&app, &admin.email, "wrong-password-1").await.status(), StatusCode::UNAUTHORIZED);
    let again = app.login(&t, &admin.email, PASSWORD).await;

    let r = app.get(&format!("/api/v1/t/{t}/audit?action=auth.login"), &again.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let items = v["items"].as_array().unwrap();
    let summary: Vec<(&str, &str, &str)> = items
        .iter()
        .map(|e| {
            (e["outcome"].as_str().unwrap(), e["details"]["reason"].as_str().unwrap(), e["action"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("allow", "password", "auth.login"),
            ("deny", "invalid credentials", "auth.login"),
            ("allow", "password", "auth.login")
        ]
    );
    for e in items {
        assert_eq!(e["actor_type"], "user");
        assert_eq!(e["actor"], admin.email);
        assert_eq!(e["actor_id"], admin.user_id);
        assert_eq!(e["resource_type"], "User");
        assert_eq!(e["source_ip"], "127.0.0.1");
    }
    let r = app.get(&format!("/api/v1/t/{t}/audit/verify"), &again.token).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ok"], true, "{v}");
}

// ---------------------------------------------------------------- refresh and logout

#[actix_web::test]
async fn refresh_rotates_and_reuse_revokes_the_session() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("rotate")).await;
    let r0 = admin.refresh.clone();

    let r = refresh_raw(&app, &r0).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["user_id"], admin.user_id);
    assert_eq!(v["token_type"], "Bearer");
    let (a1, r1) = (v["access_token"].as_str().unwrap().to_owned(), v["refresh_token"].as_str().unwrap().to_owned());
    assert_ne!(r1, r0);
    assert_ne!(a1, admin.token);
    assert_eq!(me(&app, &a1).await["user_id"], admin.user_id);

    // The new refresh token works once more.
    let r = refresh_raw(&app, &r1).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let (a2, r2) = (v["access_token"].as_str().unwrap().to_owned(), v["refresh_token"].as_str().unwrap().to_owned());
    assert_eq!(app.get(ME, &a2).await.status(), StatusCode::OK);

    // The first one is spent: its reuse is refused and ends the whole session.
    expect_401(refresh_raw(&app, &r0).await).await;
    expect_401(refresh_raw(&app, &r2).await).await;
    for access in [&admin.token, &a1, &a2] {
        expect_401(app.get(ME, access).await).await;
    }
    // Other sessions of the same user are not affected.
    let other = app.login(&admin.tenant, &admin.email, PASSWORD).await;
    assert_eq!(app.get(ME, &other.token).await.status(), StatusCode::OK);
    assert_eq!(refresh_raw(&app, &other.refresh).await.status(), StatusCode::OK);
    // Garbage and unknown tokens.
    expect_401(refresh_raw(&app, "slr_not-a-real-token").await).await;
    let r = app.call(Method::POST, REFRESH, None, Some(json!({ "refresh_token": 42 }))).await;
    expect_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
}

#[actix_web::test]
async fn reusing_a_spent_refresh_token_without_a_newer_one_still_revokes() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("replay")).await;
    let r = refresh_raw(&app, &admin.refresh).await;
    let v: Value = r.json().await.unwrap();
    let (a1, r1) = (v["access_token"].as_str().unwrap().to_owned(), v["refresh_token"].as_str().unwrap().to_owned());
    // The attacker replays the spent token before the legitimate client uses r1.
    expect_401(refresh_raw(&app, &admin.refresh).await).await;
    expect_401(refresh_raw(&app, &r1).await).await;
    expect_401(app.get(ME, &a1).await).await;
}

#[actix_web::test]
async fn an_expired_session_ends_its_tokens() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("sessexp")).await;
    let other = app.login(&admin.tenant, &admin.email, PASSWORD).await;
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    let session = claims_sid(&admin.token);
    assert_eq!(
        app.sql("UPDATE sessions SET expires_at = $1 WHERE id = $2", vec![past.into(), session.into()]).await,
        1
    );
    expect_401(app.get(ME, &admin.token).await).await;
    expect_401(refresh_raw(&app, &admin.refresh).await).await;
    assert_eq!(app.get(ME, &other.token).await.status(), StatusCode::OK);
}

/// The session id inside an access token.
fn claims_sid(token: &str) -> Uuid {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    Uuid::parse_str(claims["sid"].as_str().unwrap()).unwrap()
}

fn set_cookie(r: &Response) -> String {
    let cookies: Vec<&str> = r.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    cookies[0].to_owned()
}

fn cookie_attrs(c: &str) -> (String, Vec<String>) {
    let mut parts = c.split(';').map(|p| p.trim().to_owned());
    let first = parts.next().unwrap();
    (first, parts.map(|p| p.to_lowercase()).collect())
}

#[actix_web::test]
async fn refresh_via_http_only_same_site_strict_cookie() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("cookie")).await;
    let client = Client::builder().cookie_store(true).build().unwrap();

    let r =
        client.post(app.url(LOGIN)).json(&json!({ "email": admin.email, "password": PASSWORD })).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (first, attrs) = cookie_attrs(&set_cookie(&r));
    let v: Value = r.json().await.unwrap();
    let refresh = v["refresh_token"].as_str().unwrap();
    assert_eq!(first, format!("sluice_refresh={refresh}"));
    for a in ["httponly", "samesite=strict", "path=/api/v1/auth", "max-age=2592000"] {
        assert!(attrs.iter().any(|x| x == a), "{a} missing from {attrs:?}");
    }
    assert!(!attrs.iter().any(|x| x == "secure"), "http public URL: no Secure ({attrs:?})");

    // No body: the cookie is used, and it rotates.
    let r = client.post(app.url(REFRESH)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (first, attrs) = cookie_attrs(&set_cookie(&r));
    let v: Value = r.json().await.unwrap();
    let r1 = v["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, refresh);
    assert_eq!(first, format!("sluice_refresh={r1}"));
    assert!(attrs.iter().any(|x| x == "httponly") && attrs.iter().any(|x| x == "samesite=strict"));
    let r = client.post(app.url(REFRESH)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the rotated cookie was stored and works");
    let a2 = r.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(app.get(ME, &a2).await.status(), StatusCode::OK);

    // The cookie is only sent to /api/v1/auth: it is not a credential elsewhere.
    let r = client.get(app.url(ME)).send().await.unwrap();
    expect_401(r).await;
    // Without cookie or body: 401.
    let r = Client::new().post(app.url(REFRESH)).send().await.unwrap();
    expect_401(r).await;
    // A spent cookie value is refused (and ends the session).
    let r = Client::new()
        .post(app.url(REFRESH))
        .header("cookie", format!("sluice_refresh={refresh}"))
        .send()
        .await
        .unwrap();
    expect_401(r).await;
    expect_401(client.post(app.url(REFRESH)).send().await.unwrap()).await;
}

#[actix_web::test]
async fn logout_ends_access_and_refresh_tokens() {
    let app = spawn_app().await;
    let t = slug("logout");
    let admin = app.signup(&t).await;
    let second = app.login(&t, &admin.email, PASSWORD).await;

    let r = app.call(Method::POST, LOGOUT, Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (first, attrs) = cookie_attrs(&set_cookie(&r));
    assert_eq!(first, "sluice_refresh=");
    assert!(attrs.iter().any(|x| x == "max-age=0"), "{attrs:?}");

    expect_401(app.get(ME, &admin.token).await).await;
    expect_401(app.get(&format!("/api/v1/t/{t}/pipelines"), &admin.token).await).await;
    expect_401(refresh_raw(&app, &admin.refresh).await).await;
    expect_401(app.call(Method::POST, LOGOUT, Some(&admin.token), None).await).await;
    // Only that session ended.
    assert_eq!(app.get(ME, &second.token).await.status(), StatusCode::OK);
    assert_eq!(refresh_raw(&app, &second.refresh).await.status(), StatusCode::OK);
    // Logging out needs a credential; an API token has no session to end.
    expect_401(app.call(Method::POST, LOGOUT, None, None).await).await;
    let (_, token) = app.create_token(&second, &["viewers"]).await;
    let p = expect_problem(
        app.call(Method::POST, LOGOUT, Some(&token), None).await,
        StatusCode::BAD_REQUEST,
        "bad-request",
    )
    .await;
    assert_eq!(fields(&p), ["authorization"]);
    assert_eq!(app.get(&format!("/api/v1/t/{t}/pipelines"), &token).await.status(), StatusCode::OK);
}

// ---------------------------------------------------------------- /me

#[actix_web::test]
async fn me_lists_memberships_and_a_tokens_own_scope() {
    let app = spawn_app().await;
    let (ta, tb) = (slug("me-a"), slug("me-b"));
    let admin_a = app.signup(&ta).await;
    let admin_b = app.signup(&tb).await;
    let editor = app.add_member(&admin_a, &["editors", "approvers"]).await;
    let r = app
        .post(
            &format!("/api/v1/t/{tb}/members"),
            &admin_b.token,
            json!({ "email": editor.email, "groups": ["viewers"] }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);

    let v = me(&app, &editor.token).await;
    assert_eq!(v["principal"], "user");
    assert_eq!(v["user_id"], editor.user_id);
    assert_eq!(v["email"], editor.email);
    assert_eq!(v["token_id"], Value::Null);
    let mut expected = vec![
        json!({ "tenant": ta, "tenant_name": ta.to_uppercase(), "groups": ["approvers", "editors"] }),
        json!({ "tenant": tb, "tenant_name": tb.to_uppercase(), "groups": ["viewers"] }),
    ];
    expected.sort_by_key(|m| m["tenant"].as_str().unwrap().to_owned());
    assert_eq!(v["memberships"], Value::Array(expected));

    // A token of tenant A with fewer groups than its owner: only A, only the token's groups.
    let (id, token) = app.create_token(&admin_a, &["viewers"]).await;
    let r = app
        .post(
            &format!("/api/v1/t/{tb}/members"),
            &admin_b.token,
            json!({ "email": admin_a.email, "groups": ["editors"] }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v = me(&app, &token).await;
    assert_eq!(v["principal"], "token");
    assert_eq!(v["token_id"], id);
    assert_eq!(v["user_id"], admin_a.user_id);
    assert_eq!(v["email"], admin_a.email);
    assert_eq!(v["memberships"], json!([{ "tenant": ta, "tenant_name": ta.to_uppercase(), "groups": ["viewers"] }]));
    // Its owner sees both tenants.
    assert_eq!(me(&app, &admin_a.token).await["memberships"].as_array().unwrap().len(), 2);
    // No credential, a malformed header: 401.
    expect_401(app.call(Method::GET, ME, None, None).await).await;
    let r =
        app.client.get(app.url(ME)).header("authorization", format!("Basic {}", admin_a.token)).send().await.unwrap();
    expect_401(r).await;
}

// ---------------------------------------------------------------- invitations

#[actix_web::test]
async fn invitation_accept_sets_the_password_once() {
    let app = spawn_app().await;
    let t = slug("invite");
    let admin = app.signup(&t).await;
    let e = email("invitee");
    let r =
        app.post(&format!("/api/v1/t/{t}/members"), &admin.token, json!({ "email": e, "groups": ["viewers"] })).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["invitation_pending"], true);
    assert_eq!(v["groups"], json!(["viewers"]));
    let invite = v["invitation_token"].as_str().unwrap().to_owned();
    assert!(invite.len() >= 40);
    assert_eq!(v["invitation_url"], format!("{}/invite#{invite}", app.base));

    // No password yet: no login, whatever is tried, and it looks like any failure.
    for pw in [PASSWORD, "", "anything-at-all"] {
        let p = expect_problem(login_raw(&app, &e, pw).await, StatusCode::UNAUTHORIZED, "invalid-login").await;
        assert_eq!(p["detail"], "invalid email or password");
    }

    // Password rules apply, and a refused attempt does not spend the invitation.
    for bad in ["1234567".to_owned(), "z".repeat(129)] {
        let r = app
            .call(Method::POST, "/api/v1/invitations/accept", None, Some(json!({ "token": invite, "password": bad })))
            .await;
        let p = expect_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation").await;
        assert_eq!(fields(&p), ["password"]);
    }
    let r = app
        .call(
            Method::POST,
            "/api/v1/invitations/accept",
            None,
            Some(json!({ "token": "not-the-token", "password": "new-password-1" })),
        )
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "not-found").await;

    let r = app
        .call(
            Method::POST,
            "/api/v1/invitations/accept",
            None,
            Some(json!({ "token": invite, "password": "new-password-1" })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "email": e }));
    let m = app.login(&t, &e, "new-password-1").await;
    assert_eq!(me(&app, &m.token).await["memberships"][0]["groups"], json!(["viewers"]));

    // Used: 404, and the password stays.
    let r = app
        .call(
            Method::POST,
            "/api/v1/invitations/accept",
            None,
            Some(json!({ "token": invite, "password": "attacker-password" })),
        )
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "not-found").await;
    assert_eq!(login_raw(&app, &e, "attacker-password").await.status(), StatusCode::UNAUTHORIZED);
    app.login(&t, &e, "new-password-1").await;

    let r = app.get(&format!("/api/v1/t/{t}/members"), &admin.token).await;
    let members: Value = r.json().await.unwrap();
    let row = members.as_array().unwrap().iter().find(|m| m["email"] == e.as_str()).unwrap();
    assert_eq!(row["invitation_pending"], false);
}

#[actix_web::test]
async fn expired_invitation_is_404() {
    let app = spawn_app().await;
    let t = slug("invexp");
    let admin = app.signup(&t).await;
    let e = email("late");
    let r = app.post(&format!("/api/v1/t/{t}/members"), &admin.token, json!({ "email": e, "groups": [] })).await;
    let invite = r.json::<Value>().await.unwrap()["invitation_token"].as_str().unwrap().to_owned();
    let past = chrono::Utc::now() - chrono::Duration::minutes(1);
    assert_eq!(app.sql("UPDATE invitations SET expires_at = $1", vec![past.into()]).await, 1);
    let r = app
        .call(
            Method::POST,
            "/api/v1/invitations/accept",
            None,
            Some(json!({ "token": invite, "password": "new-password-1" })),
        )
        .await;
    expect_problem(r, StatusCode::NOT_FOUND, "not-found").await;
    assert_eq!(login_raw(&app, &e, "new-password-1").await.status(), StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------- disabling a user

#[actix_web::test]
async fn disabling_a_user_ends_sessions_and_api_tokens() {
    let app = spawn_app().await;
    let t = slug("disable");
    let admin = app.signup(&t).await;
    let victim = app.add_member(&admin, &["admins"]).await;
    let second = app.login(&t, &victim.email, &victim.password).await;
    let (_, token) = app.create_token(&victim, &["viewers"]).await;
    let pipelines = format!("/api/v1/t/{t}/pipelines");
    assert_eq!(app.get(&pipelines, &token).await.status(), StatusCode::OK);
    assert_eq!(app.get(ME, &second.token).await.status(), StatusCode::OK);

    sluice_backend::admin::disable_user(&app.state.config, &victim.email.to_uppercase()).await.unwrap();

    for access in [&victim.token, &second.token] {
        expect_401(app.get(ME, access).await).await;
        expect_401(app.get(&pipelines, access).await).await;
    }
    expect_401(app.get(&pipelines, &token).await).await;
    expect_401(app.get(ME, &token).await).await;
    for refresh in [&victim.refresh, &second.refresh] {
        expect_401(refresh_raw(&app, refresh).await).await;
    }
    // Logging in again fails like any wrong password.
    expect_problem(login_raw(&app, &victim.email, &victim.password).await, StatusCode::UNAUTHORIZED, "invalid-login")
        .await;
    // Others are unaffected; the event is in the tenant's audit log.
    assert_eq!(app.get(&pipelines, &admin.token).await.status(), StatusCode::OK);
    let r = app.get(&format!("/api/v1/t/{t}/audit?action=user.disable"), &admin.token).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["items"][0]["resource_id"], victim.user_id, "{v}");
    assert_eq!(v["items"][0]["actor_type"], "system");
}

/// D13 under concurrency: a burst of 100 simultaneous guesses must not all be checked before
/// the first failure is recorded.
#[actix_web::test]
async fn concurrent_failures_are_bounded_by_the_block() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("burst")).await;
    let app = &app;
    for (what, same_account) in [("one account", true), ("one address, many emails", false)] {
        let attempts = (0..100).map(|i| {
            let email = if same_account { admin.email.clone() } else { format!("burst-{i}@nowhere.example") };
            async move { login_raw(app, &email, "wrong-password-123").await.status() }
        });
        let results = futures_util::future::join_all(attempts).await;
        let failures = results.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
        let blocked = results.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
        assert_eq!(failures + blocked, 100, "{what}: {results:?}");
        assert!((1..=10).contains(&failures), "{what}: {failures} guesses checked in one burst, {blocked} blocked");
        // Let the blocks lapse before the next round.
        let past = chrono::Utc::now() - chrono::Duration::seconds(1);
        app.sql("UPDATE login_throttle SET blocked_until = $1, failures = 0", vec![past.into()]).await;
    }
}

async fn login_from(app: &TestApp, ip: &str, email: &str, password: &str) -> Response {
    app.client
        .post(app.url(LOGIN))
        .header("x-forwarded-for", ip)
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
}

#[actix_web::test]
async fn successes_do_not_count_and_blocks_lapse() {
    let app = spawn_app_with(|c| c.trust_proxy = true).await;
    let admin = app.signup(&slug("lapse")).await;
    let e = admin.email.as_str();
    // Successful logins never add up to a block; typos followed by success are fine.
    for _ in 0..12 {
        assert_eq!(login_from(&app, "10.0.0.1", e, PASSWORD).await.status(), StatusCode::OK);
    }
    for _ in 0..2 {
        for _ in 0..4 {
            assert_eq!(login_from(&app, "10.0.0.1", e, "typo-password").await.status(), StatusCode::UNAUTHORIZED);
        }
        assert_eq!(login_from(&app, "10.0.0.1", e, PASSWORD).await.status(), StatusCode::OK);
    }
    // The address has 8 failures (its 14 successes did not count): 2 more block it.
    for i in 0..2 {
        let r = login_from(&app, "10.0.0.1", &format!("nobody{i}@x.example"), "typo-password").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    expect_429(login_from(&app, "10.0.0.1", &email("fresh"), "typo-password").await).await;

    // The account: blocked after 5 failures from anywhere, for every address.
    for _ in 0..5 {
        assert_eq!(login_from(&app, "10.0.0.2", e, "typo-password").await.status(), StatusCode::UNAUTHORIZED);
    }
    assert!(expect_429(login_from(&app, "10.0.0.3", e, PASSWORD).await).await <= 30);
    // Once the block has lapsed the right password works again.
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    app.sql("UPDATE login_throttle SET blocked_until = $1", vec![past.into()]).await;
    assert_eq!(login_from(&app, "10.0.0.3", e, PASSWORD).await.status(), StatusCode::OK);
    // Blocked again; after it lapses one more failure blocks at once, for twice as long.
    for _ in 0..5 {
        assert_eq!(login_from(&app, "10.0.0.4", e, "typo-password").await.status(), StatusCode::UNAUTHORIZED);
    }
    expect_429(login_from(&app, "10.0.0.4", e, "typo-password").await).await;
    app.sql("UPDATE login_throttle SET blocked_until = $1", vec![past.into()]).await;
    assert_eq!(login_from(&app, "10.0.0.5", e, "typo-password").await.status(), StatusCode::UNAUTHORIZED);
    let retry = expect_429(login_from(&app, "10.0.0.6", e, PASSWORD).await).await;
    assert!((31..=60).contains(&retry), "doubled block: {retry}");
}

#[actix_web::test]
async fn logout_and_refresh_token_reuse_are_audited() {
    let app = spawn_app().await;
    let t = slug("authaudit");
    let admin = app.signup(&t).await;
    let second = app.login(&t, &admin.email, PASSWORD).await;
    // Rotate once, then present the spent token again: the session ends and the reuse is recorded.
    assert_eq!(refresh_raw(&app, &second.refresh).await.status(), StatusCode::OK);
    expect_401(refresh_raw(&app, &second.refresh).await).await;
    let r = app.call(Method::POST, "/api/v1/auth/logout", Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // The admin's session is over; read the log with a fresh one.
    let reader = app.login(&t, &admin.email, PASSWORD).await;
    let r = app.get(&format!("/api/v1/t/{t}/audit?resource_type=User"), &reader.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let items: Value = r.json().await.unwrap();
    let events: Vec<(String, String, String)> = items["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] != "auth.login")
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["outcome"].as_str().unwrap().into(),
                e["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        events,
        vec![
            ("auth.logout".to_owned(), "allow".to_owned(), admin.email.clone()),
            ("auth.refresh_reuse".to_owned(), "deny".to_owned(), admin.email.clone()),
        ]
    );
}
