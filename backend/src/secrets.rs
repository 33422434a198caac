//! Encryption of tenant secrets at rest: AES-256-GCM with a random 96-bit nonce per write and the
//! tenant id, name and version as associated data, so a ciphertext moved to another name, tenant
//! or version no longer decrypts.
//!
//! The 32-byte key comes from `SLUICE_SECRETS_KEY` (base64) or, when that is unset, from
//! `<data dir>/secrets.key`. With the embedded database the file is generated (mode 0600) on first
//! start; with PostgreSQL it is never generated: several servers share the database and must share
//! the key, so a missing key is a start-up error.

use std::{
    fmt,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD};
use rand::RngCore;
use uuid::Uuid;

use crate::Config;

/// Length of the key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a nonce in bytes.
pub const NONCE_LEN: usize = 12;

/// The key that encrypts every tenant's secrets. Cheap to clone; never printed.
#[derive(Clone)]
pub struct SecretsKey {
    cipher: Arc<Aes256Gcm>,
}

impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretsKey(..)")
    }
}

/// A value as stored: base64 nonce and base64 ciphertext (with the GCM tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Base64 of the 12-byte nonce.
    pub nonce: String,
    /// Base64 of the ciphertext and tag.
    pub ciphertext: String,
}

/// Why a stored value could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The stored nonce or ciphertext is not valid base64 or has the wrong length.
    #[error("the stored value is malformed")]
    Malformed,
    /// Authentication failed: another key, or a row moved to another tenant, name or version.
    #[error("the stored value does not decrypt with this key for this tenant, name and version")]
    Decrypt,
}

/// The associated data binding a ciphertext to its place.
fn aad(tenant: Uuid, name: &str, version: i64) -> Vec<u8> {
    format!("sluice-secret/v1\0{tenant}\0{name}\0{version}").into_bytes()
}

/// The path of the key file in a data folder.
pub fn key_file(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets.key")
}

impl SecretsKey {
    /// A key from its raw bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self { cipher: Arc::new(Aes256Gcm::new(bytes.into())) }
    }

    /// A key from its base64 text (standard alphabet, padding optional).
    pub fn from_base64(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        let bytes = STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .map_err(|_| anyhow::anyhow!("not valid base64"))?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| {
            anyhow::anyhow!("must be {KEY_LEN} bytes (base64 of 32 random bytes), not {}", b.len())
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Loads the key as configured (see the module documentation).
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        if let Some(text) = &config.secrets_key {
            return Self::from_base64(text).context("SLUICE_SECRETS_KEY");
        }
        let path = key_file(&config.data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_base64(&text).with_context(|| format!("secrets key file {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                anyhow::ensure!(
                    config.is_embedded(),
                    "no key for tenant secrets: with PostgreSQL, set SLUICE_SECRETS_KEY (or secrets_key in sluice.toml) \
                     to the base64 of 32 random bytes, e.g. `openssl rand -base64 32`, the same on every server \
                     (or place it in {}); it is not generated, since every server must use the same key",
                    path.display()
                );
                Self::generate(&path)
            }
            Err(e) => Err(e).with_context(|| format!("reading secrets key file {}", path.display())),
        }
    }

    /// Writes a new random key to `path` (mode 0600, never overwriting a file) and returns it.
    fn generate(path: &Path) -> anyhow::Result<Self> {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        match options.open(path) {
            Ok(mut f) => {
                f.write_all(format!("{}\n", STANDARD.encode(bytes)).as_bytes())
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("writing {}", path.display()))?;
                tracing::info!(path = %path.display(), "generated a new key for tenant secrets");
                Ok(Self::from_bytes(&bytes))
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                Self::from_base64(&text).with_context(|| format!("secrets key file {}", path.display()))
            }
            Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }

    /// Encrypts `value` for `name` at `version` in `tenant`, with a fresh random nonce.
    pub fn seal(&self, tenant: Uuid, name: &str, version: i64, value: &str) -> anyhow::Result<Sealed> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = aad(tenant, name, version);
        let ciphertext = self
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: value.as_bytes(), aad: &aad })
            .map_err(|_| anyhow::anyhow!("encrypting a secret failed"))?;
        Ok(Sealed { nonce: STANDARD.encode(nonce), ciphertext: STANDARD.encode(ciphertext) })
    }

    /// Decrypts a stored value; fails unless it was sealed with this key for exactly this tenant,
    /// name and version.
    pub fn open(&self, tenant: Uuid, name: &str, version: i64, sealed: &Sealed) -> Result<String, OpenError> {
        let nonce: [u8; NONCE_LEN] =
            STANDARD.decode(&sealed.nonce).ok().and_then(|n| n.try_into().ok()).ok_or(OpenError::Malformed)?;
        let ciphertext = STANDARD.decode(&sealed.ciphertext).map_err(|_| OpenError::Malformed)?;
        let aad = aad(tenant, name, version);
        let plain = self
            .cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: &ciphertext, aad: &aad })
            .map_err(|_| OpenError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| OpenError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(b: u8) -> SecretsKey {
        SecretsKey::from_bytes(&[b; KEY_LEN])
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let k = key(7);
        let t = Uuid::new_v4();
        let a = k.seal(t, "API_TOKEN", 1, "hunter2-hunter2").unwrap();
        let b = k.seal(t, "API_TOKEN", 1, "hunter2-hunter2").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(k.open(t, "API_TOKEN", 1, &a).unwrap(), "hunter2-hunter2");
        assert_eq!(k.open(t, "API_TOKEN", 1, &b).unwrap(), "hunter2-hunter2");
    }

    #[test]
    fn bound_to_tenant_name_version_and_key() {
        let k = key(7);
        let t = Uuid::new_v4();
        let s = k.seal(t, "A", 3, "value").unwrap();
        assert!(matches!(k.open(Uuid::new_v4(), "A", 3, &s), Err(OpenError::Decrypt)));
        assert!(matches!(k.open(t, "B", 3, &s), Err(OpenError::Decrypt)));
        assert!(matches!(k.open(t, "A", 2, &s), Err(OpenError::Decrypt)));
        assert!(matches!(key(8).open(t, "A", 3, &s), Err(OpenError::Decrypt)));
        let mut bad = s.clone();
        bad.nonce = "short".into();
        assert!(matches!(k.open(t, "A", 3, &bad), Err(OpenError::Malformed)));
    }

    #[test]
    fn base64_keys_must_be_32_bytes() {
        assert!(SecretsKey::from_base64(&STANDARD.encode([1u8; 32])).is_ok());
        assert!(SecretsKey::from_base64(&format!(" {}\n", STANDARD.encode([1u8; 32]))).is_ok());
        assert!(SecretsKey::from_base64(&STANDARD.encode([1u8; 16])).is_err());
        assert!(SecretsKey::from_base64("not base64!").is_err());
    }
}
