//! Access tokens: EdDSA (Ed25519) JWTs with a `kid`, 15 minutes long, verified with an algorithm
//! allow-list, required `iss`/`aud`/`sub`/`exp`/`nbf`/`iat`/`jti`, `typ: at+jwt` and 30 s leeway.
//!
//! The signing keys live in a JSON file (generated into the data folder on first start in
//! embedded mode, or provided by configuration). The last key signs; older keys still verify
//! until their `retire_after` time, so a rotation never logs anybody out early.

use std::{collections::HashMap, path::Path, sync::Mutex};

use anyhow::Context;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, Utc};
use ed25519_dalek::{
    SigningKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding},
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Lifetime of an access token.
pub const ACCESS_TTL_SECS: i64 = 15 * 60;
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// The `aud` of Sluice access tokens.
pub const AUDIENCE: &str = "sluice-api";
/// The `typ` header of Sluice access tokens (RFC 9068).
pub const TYP: &str = "at+jwt";

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: the public URL of this Sluice.
    pub iss: String,
    /// Audience: [`AUDIENCE`].
    pub aud: String,
    /// The user id.
    pub sub: Uuid,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Not before.
    pub nbf: i64,
    /// Issued at.
    pub iat: i64,
    /// Unique token id.
    pub jti: Uuid,
    /// The login session this token belongs to.
    pub sid: Uuid,
}

/// One key in the keys file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Key id, carried in the JWT header.
    pub kid: String,
    /// PKCS#8 PEM of the Ed25519 private key.
    pub private_key_pem: String,
    /// When the key was made.
    pub created_at: DateTime<Utc>,
    /// After this time tokens signed with the key are no longer accepted.
    #[serde(default)]
    pub retire_after: Option<DateTime<Utc>>,
}

/// The keys file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeyFile {
    /// Oldest first; the last one signs.
    pub keys: Vec<KeyEntry>,
}

struct VerifyKey {
    key: DecodingKey,
    retire_after: Option<DateTime<Utc>>,
}

/// Signing and verification keys, ready to use.
pub struct JwtKeys {
    issuer: String,
    signing_kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, VerifyKey>,
    jwks: serde_json::Value,
    validation: Validation,
    verified: Mutex<HashMap<String, Verified>>,
}

/// A token whose signature and claims were checked: reused until it expires or its key retires,
/// so the signature (the costly part) is verified once per token, not once per request.
#[derive(Clone)]
struct Verified {
    claims: Claims,
    retire_after: Option<DateTime<Utc>>,
}

/// Most verified tokens remembered at once; the memo is emptied when full.
const VERIFIED_CAPACITY: usize = 10_000;

fn new_entry() -> anyhow::Result<KeyEntry> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = key.to_pkcs8_pem(LineEnding::LF).context("encoding signing key")?;
    Ok(KeyEntry {
        kid: Uuid::new_v4().simple().to_string()[..16].to_owned(),
        private_key_pem: pem.to_string(),
        created_at: Utc::now(),
        retire_after: None,
    })
}

fn write_key_file(path: &Path, file: &KeyFile) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(file)?).with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads the keys file, generating it with one key when it does not exist and `generate` is set.
pub fn load_or_generate(path: &Path, generate: bool) -> anyhow::Result<KeyFile> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
            let file = KeyFile { keys: vec![new_entry()?] };
            write_key_file(path, &file)?;
            tracing::info!(path = %path.display(), "generated a new JWT signing key");
            Ok(file)
        }
        Err(e) => Err(e).with_context(|| format!("reading JWT keys file {}", path.display())),
    }
}

/// Adds a new signing key; the previous keys keep verifying for `grace` (at least the access
/// token lifetime plus leeway). Returns the new key id.
pub fn rotate(path: &Path, grace: Duration) -> anyhow::Result<String> {
    let mut file = load_or_generate(path, true)?;
    let retire = Utc::now() + grace.max(Duration::seconds(ACCESS_TTL_SECS + LEEWAY_SECS as i64));
    for k in &mut file.keys {
        if k.retire_after.is_none_or(|r| r > retire) {
            k.retire_after = Some(retire);
        }
    }
    let entry = new_entry()?;
    let kid = entry.kid.clone();
    file.keys.push(entry);
    file.keys.retain(|k| k.retire_after.is_none_or(|r| r > Utc::now()));
    write_key_file(path, &file)?;
    Ok(kid)
}

impl JwtKeys {
    /// Builds the keys from a keys file.
    pub fn new(file: &KeyFile, issuer: &str) -> anyhow::Result<Self> {
        let last = file.keys.last().context("the JWT keys file holds no key")?;
        let mut verifying = HashMap::new();
        let mut jwks = Vec::new();
        let mut signing = None;
        for entry in &file.keys {
            let key = SigningKey::from_pkcs8_pem(&entry.private_key_pem)
                .with_context(|| format!("JWT key {} is not an Ed25519 PKCS#8 PEM", entry.kid))?;
            let public = key.verifying_key().to_bytes();
            verifying.insert(
                entry.kid.clone(),
                VerifyKey { key: DecodingKey::from_ed_der(&public), retire_after: entry.retire_after },
            );
            jwks.push(serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                "kid": entry.kid, "x": URL_SAFE_NO_PAD.encode(public),
            }));
            if entry.kid == last.kid {
                let der = key.to_pkcs8_der().context("encoding signing key")?;
                signing = Some(EncodingKey::from_ed_der(der.as_bytes()));
            }
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        Ok(Self {
            issuer: issuer.to_owned(),
            signing_kid: last.kid.clone(),
            signing: signing.context("no signing key")?,
            verifying,
            jwks: serde_json::json!({ "keys": jwks }),
            validation,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The JWKS document of the public keys.
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Issues an access token for a user's session. Returns the token and its expiry.
    pub fn issue(&self, user: Uuid, session: Uuid) -> anyhow::Result<(String, i64)> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: AUDIENCE.to_owned(),
            sub: user,
            exp: now + ACCESS_TTL_SECS,
            nbf: now,
            iat: now,
            jti: Uuid::new_v4(),
            sid: session,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.signing_kid.clone());
        header.typ = Some(TYP.to_owned());
        let token = jsonwebtoken::encode(&header, &claims, &self.signing).context("signing JWT")?;
        Ok((token, claims.exp))
    }

    /// Verifies an access token. Every failure is the same `None` (the reason is logged at debug).
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let now = Utc::now();
        if let Some(v) = self.verified.lock().ok().and_then(|m| m.get(token).cloned()) {
            let still_valid =
                v.claims.exp + LEEWAY_SECS as i64 > now.timestamp() && v.retire_after.is_none_or(|r| r > now);
            return still_valid.then_some(v.claims);
        }
        let fail = |why: &str| tracing::debug!(reason = why, "access token rejected");
        let header = jsonwebtoken::decode_header(token).map_err(|e| fail(&e.to_string())).ok()?;
        if header.alg != Algorithm::EdDSA {
            fail("algorithm not allowed");
            return None;
        }
        if header.typ.as_deref() != Some(TYP) {
            fail("wrong typ");
            return None;
        }
        let Some(key) = header.kid.as_deref().and_then(|kid| self.verifying.get(kid)) else {
            fail("missing or unknown kid");
            return None;
        };
        if key.retire_after.is_some_and(|r| r <= now) {
            fail("retired key");
            return None;
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| fail(&e.to_string()))
            .ok()?;
        if let Ok(mut memo) = self.verified.lock() {
            if memo.len() >= VERIFIED_CAPACITY {
                memo.clear();
            }
            memo.insert(token.to_owned(), Verified { claims: claims.clone(), retire_after: key.retire_after });
        }
        Some(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        let file = KeyFile { keys: vec![new_entry().expect("key")] };
        JwtKeys::new(&file, "http://sluice.test").expect("keys")
    }

    #[test]
    fn issued_tokens_verify() {
        let k = keys();
        let (user, sid) = (Uuid::new_v4(), Uuid::new_v4());
        let (t, _) = k.issue(user, sid).expect("issue");
        let c = k.verify(&t).expect("verify");
        assert_eq!(c.sub, user);
        assert_eq!(c.sid, sid);
    }

    #[test]
    fn another_keys_tokens_fail() {
        let (t, _) = keys().issue(Uuid::new_v4(), Uuid::new_v4()).expect("issue");
        assert!(keys().verify(&t).is_none());
    }

    #[test]
    fn rotation_keeps_old_keys_until_retired() {
        let dir = std::env::temp_dir().join(format!("sluice-jwt-{}", Uuid::new_v4()));
        let path = dir.join("keys.json");
        let old = JwtKeys::new(&load_or_generate(&path, true).expect("gen"), "i").expect("k");
        let (t, _) = old.issue(Uuid::new_v4(), Uuid::new_v4()).expect("issue");
        rotate(&path, Duration::hours(1)).expect("rotate");
        let new = JwtKeys::new(&load_or_generate(&path, false).expect("load"), "i").expect("k");
        assert!(new.verify(&t).is_some(), "old token valid during grace");
        let (t2, _) = new.issue(Uuid::new_v4(), Uuid::new_v4()).expect("issue");
        assert!(old.verify(&t2).is_none(), "new key unknown to old set");
        let mut file = load_or_generate(&path, false).expect("load");
        file.keys[0].retire_after = Some(Utc::now() - Duration::seconds(1));
        let retired = JwtKeys::new(&file, "i").expect("k");
        assert!(retired.verify(&t).is_none(), "retired key rejected");
        let _ = std::fs::remove_dir_all(dir);
    }
}
