//! Password hashing: argon2id with m = 19 MiB, t = 2, p = 1 (OWASP's recommendation).

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version, password_hash::SaltString,
};
use std::sync::OnceLock;

/// Shortest accepted password, in characters.
pub const MIN_LEN: usize = 8;
/// Longest accepted password, in characters.
pub const MAX_LEN: usize = 128;

fn argon2() -> Argon2<'static> {
    // The parameters are constants known to be valid.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Checks the length rule (no composition rules).
pub fn validate(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < MIN_LEN {
        Err(format!("must be at least {MIN_LEN} characters"))
    } else if n > MAX_LEN {
        Err(format!("must be at most {MAX_LEN} characters"))
    } else {
        Ok(())
    }
}

/// Hashes a password into a PHC string. CPU-heavy: call from a blocking thread.
pub fn hash(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

/// Verifies a password against a PHC string; with no stored hash, spends the same time on a
/// dummy hash and answers false, so unknown users and wrong passwords look alike.
pub fn verify(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash("sluice-dummy-password").unwrap_or_default());
    let (phc, real) = match stored {
        Some(s) => (s, true),
        None => (dummy.as_str(), false),
    };
    let ok = PasswordHash::new(phc).map(|h| argon2().verify_password(password.as_bytes(), &h).is_ok()).unwrap_or(false);
    ok && real
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify("correct horse", Some(&h)));
        assert!(!verify("wrong horse", Some(&h)));
        assert!(!verify("sluice-dummy-password", None));
    }

    #[test]
    fn length_rule() {
        assert!(validate("1234567").is_err());
        assert!(validate("12345678").is_ok());
        assert!(validate(&"é".repeat(128)).is_ok());
        assert!(validate(&"x".repeat(129)).is_err());
    }
}
