//! Forged and tampered access tokens: every one is a bare 401 on protected routes, while a
//! correctly formed token signed with the server's key (built the same way) is accepted.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{Duration, Utc};
use ed25519_dalek::{
    Signer, SigningKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_backend::auth::jwt::{KeyEntry, KeyFile};
use uuid::Uuid;

use crate::helpers::*;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_json(v: &Value) -> String {
    b64(&serde_json::to_vec(v).unwrap())
}

/// A compact JWS signed with Ed25519 over exactly the given header and claims.
fn sign(header: &Value, claims: &Value, key: &SigningKey) -> String {
    let input = format!("{}.{}", b64_json(header), b64_json(claims));
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn header_of(token: &str) -> Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
}

fn read_keys(path: &std::path::Path) -> KeyFile {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn signing_key(entry: &KeyEntry) -> SigningKey {
    SigningKey::from_pkcs8_pem(&entry.private_key_pem).unwrap()
}

/// Everything needed to forge tokens against one server for one logged-in user.
struct Forge {
    admin: Member,
    key: SigningKey,
    kid: String,
    iss: String,
    sub: String,
    sid: String,
}

impl Forge {
    async fn new(app: &TestApp) -> Self {
        let admin = app.signup(&slug("jwt")).await;
        let file = read_keys(&app.data_dir.join("jwt-keys.json"));
        assert_eq!(file.keys.len(), 1);
        let entry = file.keys.last().unwrap();
        let real = claims_of(&admin.token);
        assert_eq!(header_of(&admin.token), json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": entry.kid }));
        Self {
            key: signing_key(entry),
            kid: entry.kid.clone(),
            iss: app.base.clone(),
            sub: real["sub"].as_str().unwrap().to_owned(),
            sid: real["sid"].as_str().unwrap().to_owned(),
            admin,
        }
    }

    fn header(&self) -> Value {
        json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": self.kid })
    }

    fn claims(&self) -> Value {
        let now = Utc::now().timestamp();
        json!({
            "iss": self.iss, "aud": "sluice-api", "sub": self.sub, "exp": now + 600, "nbf": now, "iat": now,
            "jti": Uuid::new_v4(), "sid": self.sid,
        })
    }

    fn with_claims(&self, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let mut c = self.claims();
        f(c.as_object_mut().unwrap());
        sign(&self.header(), &c, &self.key)
    }

    fn with_header(&self, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
        let mut h = self.header();
        f(h.as_object_mut().unwrap());
        sign(&h, &self.claims(), &self.key)
    }

    fn control(&self) -> String {
        sign(&self.header(), &self.claims(), &self.key)
    }
}

/// Both protected routes answer 200.
async fn accepted(app: &TestApp, tenant: &str, token: &str, what: &str) {
    let r = app.get("/api/v1/me", token).await;
    assert_eq!(r.status(), StatusCode::OK, "{what}: /me");
    let r = app.get(&format!("/api/v1/t/{tenant}/pipelines"), token).await;
    assert_eq!(r.status(), StatusCode::OK, "{what}: pipelines");
}

/// Both protected routes answer a bare 401 problem.
async fn rejected(app: &TestApp, tenant: &str, token: &str, what: &str) {
    for path in ["/api/v1/me".to_owned(), format!("/api/v1/t/{tenant}/pipelines")] {
        let r = app.get(&path, token).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}: {path}");
        assert_eq!(r.headers().get("www-authenticate").unwrap(), "Bearer", "{what}");
        let p = problem(r).await;
        assert_eq!(p["type"], "urn:sluice:problem:unauthorized", "{what}: {p}");
        assert_eq!(p["detail"], "authentication required", "{what}: the reason is not disclosed");
    }
}

#[actix_web::test]
async fn forged_control_tokens_are_accepted() {
    let app = spawn_app().await;
    let f = Forge::new(&app).await;
    let t = f.admin.tenant.clone();
    accepted(&app, &t, &f.admin.token, "server-issued").await;
    accepted(&app, &t, &f.control(), "hand-built control").await;
    // The same with jsonwebtoken and the PKCS#8 DER of the server's key.
    let der = f.key.to_pkcs8_der().unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(f.kid.clone());
    header.typ = Some("at+jwt".into());
    let t2 = jsonwebtoken::encode(&header, &f.claims(), &EncodingKey::from_ed_der(der.as_bytes())).unwrap();
    accepted(&app, &t, &t2, "jsonwebtoken control").await;
    // Inside the 30 s leeway on exp and nbf.
    let now = Utc::now().timestamp();
    accepted(&app, &t, &f.with_claims(|c| _ = c.insert("exp".into(), json!(now - 10))), "exp within leeway").await;
    accepted(&app, &t, &f.with_claims(|c| _ = c.insert("nbf".into(), json!(now + 10))), "nbf within leeway").await;
    // The JWKS publishes the key the test signs with.
    let r = app.call(reqwest::Method::GET, "/.well-known/jwks.json", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let jwks: Value = r.json().await.unwrap();
    assert_eq!(
        jwks,
        json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": f.kid,
            "x": b64(&f.key.verifying_key().to_bytes()) }] })
    );
    assert!(!jwks.to_string().contains("\"d\""), "no private part");
}

#[actix_web::test]
async fn algorithm_attacks_are_rejected() {
    let app = spawn_app().await;
    let f = Forge::new(&app).await;
    let t = f.admin.tenant.clone();

    // alg: none, with an empty signature (and variants of the spelling).
    for alg in ["none", "None", "NONE"] {
        let h = json!({ "alg": alg, "typ": "at+jwt", "kid": f.kid });
        let token = format!("{}.{}.", b64_json(&h), b64_json(&f.claims()));
        rejected(&app, &t, &token, &format!("alg {alg}")).await;
        // ... and with the signature of the real key kept.
        let signed = f.control();
        let sig = signed.rsplit('.').next().unwrap();
        rejected(&app, &t, &format!("{}.{}.{sig}", b64_json(&h), b64_json(&f.claims())), &format!("alg {alg} + sig"))
            .await;
    }
    // Without a header alg at all.
    let h = json!({ "typ": "at+jwt", "kid": f.kid });
    rejected(&app, &t, &sign(&h, &f.claims(), &f.key), "no alg").await;

    // HS256 keyed with the server's public key (raw bytes, and the JWKS text).
    let x = b64(&f.key.verifying_key().to_bytes());
    let secrets: [Vec<u8>; 2] = [f.key.verifying_key().to_bytes().to_vec(), x.clone().into_bytes()];
    for (i, secret) in secrets.iter().enumerate() {
        for alg in [Algorithm::HS256, Algorithm::HS512] {
            let mut header = Header::new(alg);
            header.kid = Some(f.kid.clone());
            header.typ = Some("at+jwt".into());
            let token = jsonwebtoken::encode(&header, &f.claims(), &EncodingKey::from_secret(secret)).unwrap();
            rejected(&app, &t, &token, &format!("{alg:?} with public key #{i}")).await;
        }
    }

    // RSA / ECDSA / PSS names on an otherwise valid Ed25519 signature.
    for alg in ["RS256", "ES256", "PS256", "ES384", "RS512", "Ed25519", "eddsa"] {
        rejected(&app, &t, &f.with_header(|h| _ = h.insert("alg".into(), json!(alg))), alg).await;
    }
}

#[actix_web::test]
async fn bad_claims_are_rejected() {
    let app = spawn_app().await;
    let f = Forge::new(&app).await;
    let t = f.admin.tenant.clone();
    let now = Utc::now().timestamp();
    type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
    let set = |k: &'static str, v: Value| -> Edit { Box::new(move |c| _ = c.insert(k.into(), v.clone())) };
    let del = |k: &'static str| -> Edit { Box::new(move |c| _ = c.remove(k)) };
    let other_user = app.signup(&slug("other")).await;
    let cases: Vec<(&str, Edit)> = vec![
        ("wrong aud", set("aud", json!("some-other-api"))),
        ("aud list without ours", set("aud", json!(["some-other-api"]))),
        ("missing aud", del("aud")),
        ("wrong iss", set("iss", json!("https://evil.example"))),
        ("iss with trailing slash", set("iss", json!(format!("{}/", f.iss)))),
        ("missing iss", del("iss")),
        ("missing exp", del("exp")),
        ("exp past the leeway", set("exp", json!(now - 90))),
        ("exp as a string", set("exp", json!((now + 600).to_string()))),
        ("future nbf", set("nbf", json!(now + 300))),
        ("missing nbf", del("nbf")),
        ("missing iat", del("iat")),
        ("missing jti", del("jti")),
        ("missing sub", del("sub")),
        ("unknown sub", set("sub", json!(Uuid::new_v4()))),
        ("sub of another user with this session", set("sub", json!(other_user.user_id))),
        ("missing sid", del("sid")),
        ("unknown sid", set("sid", json!(Uuid::now_v7()))),
    ];
    for (what, edit) in cases {
        rejected(&app, &t, &f.with_claims(|c| edit(c)), what).await;
    }
    // The other user's own session does not open this tenant to them: 404, not 200.
    let r = app.get(&format!("/api/v1/t/{t}/pipelines"), &other_user.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn bad_headers_are_rejected() {
    let app = spawn_app().await;
    let f = Forge::new(&app).await;
    let t = f.admin.tenant.clone();
    rejected(&app, &t, &f.with_header(|h| _ = h.insert("typ".into(), json!("JWT"))), "typ JWT").await;
    rejected(&app, &t, &f.with_header(|h| _ = h.remove("typ")), "no typ").await;
    rejected(&app, &t, &f.with_header(|h| _ = h.remove("kid")), "no kid").await;
    rejected(&app, &t, &f.with_header(|h| _ = h.insert("kid".into(), json!("0123456789abcdef"))), "unknown kid").await;
    rejected(&app, &t, &f.with_header(|h| _ = h.insert("kid".into(), json!(""))), "empty kid").await;
    // A key of the attacker's own, announced in the header, under the server's kid.
    let evil = SigningKey::generate(&mut rand::rngs::OsRng);
    let h = json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": f.kid,
        "jwk": { "kty": "OKP", "crv": "Ed25519", "x": b64(&evil.verifying_key().to_bytes()), "kid": f.kid } });
    rejected(&app, &t, &sign(&h, &f.claims(), &evil), "embedded jwk").await;
}

#[actix_web::test]
async fn tampered_tokens_are_rejected() {
    let app = spawn_app().await;
    let f = Forge::new(&app).await;
    let t = f.admin.tenant.clone();
    let other = app.signup(&slug("victim")).await;

    for (what, token) in [("server-issued", f.admin.token.clone()), ("forged", f.control())] {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        // Payload changed (sub of another real user), signature kept.
        let mut c = claims_of(&token);
        c["sub"] = json!(other.user_id);
        rejected(&app, &t, &format!("{}.{}.{}", parts[0], b64_json(&c), parts[2]), &format!("{what}: sub changed"))
            .await;
        // Payload changed (longer expiry), signature kept.
        let mut c = claims_of(&token);
        c["exp"] = json!(c["exp"].as_i64().unwrap() + 86_400);
        rejected(&app, &t, &format!("{}.{}.{}", parts[0], b64_json(&c), parts[2]), &format!("{what}: exp changed"))
            .await;
        // Signature changed by one bit, or dropped, or truncated.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[10] ^= 1;
        rejected(&app, &t, &format!("{}.{}.{}", parts[0], parts[1], b64(&sig)), &format!("{what}: bit flip")).await;
        rejected(&app, &t, &format!("{}.{}.", parts[0], parts[1]), &format!("{what}: no signature")).await;
        rejected(
            &app,
            &t,
            &format!("{}.{}.{}", parts[0], parts[1], &parts[2][..20]),
            &format!("{what}: short signature"),
        )
        .await;
        rejected(&app, &t, &format!("{}.{}", parts[0], parts[1]), &format!("{what}: two parts")).await;
        rejected(&app, &t, &format!("{token}.{}", parts[2]), &format!("{what}: four parts")).await;
        // Still fine untouched.
        accepted(&app, &t, &token, what).await;
    }
    // Signed by a different Ed25519 key under the server's kid.
    let evil = SigningKey::generate(&mut rand::rngs::OsRng);
    rejected(&app, &t, &sign(&f.header(), &f.claims(), &evil), "different key, same kid").await;
    // Garbage.
    for junk in ["", "a.b.c", "not a token", "eyJhbGciOiJFZERTQSJ9..", "Bearer"] {
        rejected(&app, &t, junk, junk).await;
    }
}

fn entry(key: &SigningKey, kid: &str, retire_after: Option<chrono::DateTime<Utc>>) -> KeyEntry {
    KeyEntry {
        kid: kid.into(),
        private_key_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        created_at: Utc::now() - Duration::days(1),
        retire_after,
    }
}

#[actix_web::test]
async fn keys_retired_after_rotation_stop_verifying() {
    let dir = std::env::temp_dir().join(format!("sluice-keys-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.json");
    let keys: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rand::rngs::OsRng)).collect();
    let file = KeyFile {
        keys: vec![
            entry(&keys[0], "retired-key", Some(Utc::now() - Duration::minutes(1))),
            entry(&keys[1], "grace-key", Some(Utc::now() + Duration::hours(1))),
            entry(&keys[2], "current-key", None),
        ],
    };
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    let app = spawn_app_with(|c| c.jwt_keys_file = path.clone()).await;
    let admin = app.signup(&slug("rotated")).await;
    assert_eq!(header_of(&admin.token)["kid"], "current-key", "the last key signs");
    let t = admin.tenant.clone();
    accepted(&app, &t, &admin.token, "issued").await;

    let real = claims_of(&admin.token);
    let now = Utc::now().timestamp();
    let claims = json!({ "iss": app.base, "aud": "sluice-api", "sub": real["sub"], "exp": now + 600, "nbf": now,
        "iat": now, "jti": Uuid::new_v4(), "sid": real["sid"] });
    let header = |kid: &str| json!({ "alg": "EdDSA", "typ": "at+jwt", "kid": kid });
    accepted(&app, &t, &sign(&header("current-key"), &claims, &keys[2]), "current key").await;
    accepted(&app, &t, &sign(&header("grace-key"), &claims, &keys[1]), "previous key in its grace period").await;
    rejected(&app, &t, &sign(&header("retired-key"), &claims, &keys[0]), "key past retire_after").await;
    // A retired key's kid with the current key's signature is no way around it either.
    rejected(&app, &t, &sign(&header("retired-key"), &claims, &keys[2]), "retired kid, current key").await;
    let _ = std::fs::remove_dir_all(dir);
}
