//! API tokens: `slc_` + 32 random base62 characters + a 6-character base62 CRC32 of the random
//! part, so secret scanners can recognise them and typos are rejected without a database look-up.
//! Only the SHA-256 of the whole token is stored.

use rand::Rng;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// The fixed prefix of every Sluice API token.
pub const PREFIX: &str = "slc_";
const RANDOM_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// Length of a whole token.
pub const TOKEN_LEN: usize = PREFIX.len() + RANDOM_LEN + CHECK_LEN;
/// How much of a token is shown in listings and audit events.
pub const DISPLAY_PREFIX_LEN: usize = PREFIX.len() + 6;

fn base62_fixed(mut n: u64, len: usize) -> String {
    let mut out = vec![b'0'; len];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn checksum(random: &str) -> String {
    base62_fixed(u64::from(crc32fast::hash(random.as_bytes())), CHECK_LEN)
}

/// A new token (plaintext; shown to its creator once).
pub fn generate() -> String {
    let mut rng = rand::rngs::OsRng;
    let random: String = (0..RANDOM_LEN).map(|_| ALPHABET[rng.gen_range(0..62)] as char).collect();
    let check = checksum(&random);
    format!("{PREFIX}{random}{check}")
}

/// Whether a string has the shape and a valid checksum of a Sluice token.
pub fn is_well_formed(token: &str) -> bool {
    if token.len() != TOKEN_LEN || !token.starts_with(PREFIX) || !token.is_ascii() {
        return false;
    }
    let body = &token[PREFIX.len()..];
    if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (random, check) = body.split_at(RANDOM_LEN);
    checksum(random) == check
}

/// Lowercase hex SHA-256, the stored form of a token or other secret.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(a.starts_with("slc_"));
        assert!(is_well_formed(&a));
    }

    #[test]
    fn a_changed_character_breaks_the_checksum() {
        let t = generate();
        let mut bytes = t.into_bytes();
        bytes[10] = if bytes[10] == b'a' { b'b' } else { b'a' };
        let changed = String::from_utf8(bytes).expect("ascii");
        assert!(!is_well_formed(&changed));
        assert!(!is_well_formed("slc_short"));
    }
}
