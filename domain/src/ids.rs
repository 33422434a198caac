//! Validated identifiers.
//!
//! Each newtype can only be constructed through [`Slug::parse`] / [`NodeId::parse`] (or the
//! equivalent `TryFrom`/`FromStr`/serde deserialization), so holding one proves it is valid.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} `{value}`: {rule}")]
pub struct IdError {
    /// What kind of identifier was expected (`slug`, `id`).
    pub kind: &'static str,
    /// The rejected input, shortened to at most 80 characters.
    pub value: String,
    /// The rule that was broken, in words.
    pub rule: &'static str,
}

impl IdError {
    fn new(kind: &'static str, value: &str, rule: &'static str) -> Self {
        let value = if value.chars().count() > 80 {
            let mut short: String = value.chars().take(77).collect();
            short.push_str("...");
            short
        } else {
            value.to_owned()
        };
        Self { kind, value, rule }
    }
}

/// Checks `^[a-z0-9][<tail>]{min_tail,62}$` where `tail` is lowercase letters, digits, `-` and
/// (when `underscore`) `_`.
fn check(value: &str, min_len: usize, underscore: bool) -> bool {
    let bytes = value.as_bytes();
    let Some((&first, tail)) = bytes.split_first() else {
        return false;
    };
    (min_len..=63).contains(&bytes.len())
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && tail.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (underscore && b == b'_'))
}

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $expecting:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Returns the identifier as a string slice.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Returns the inner string.
            #[must_use]
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl core::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }
    };
}

id_newtype!(
    /// A tenant slug or pipeline name: `^[a-z0-9][a-z0-9-]{1,62}$` (2 to 63 characters).
    Slug,
    "slug",
    "a slug string (lowercase letters, digits and `-`)"
);

id_newtype!(
    /// A stage, task or parameter id: `^[a-z0-9][a-z0-9_-]{0,62}$` (1 to 63 characters).
    NodeId,
    "id",
    "an id string (lowercase letters, digits, `_` and `-`)"
);

impl Slug {
    /// The rule, in words, used in error messages.
    pub const RULE: &'static str = "must be 2 to 63 characters of lowercase letters, digits and `-`, \
         starting with a letter or digit (^[a-z0-9][a-z0-9-]{1,62}$)";

    /// Parses a slug.
    ///
    /// # Errors
    /// Returns [`IdError`] naming the rule when `value` does not match it.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if check(value, 2, false) { Ok(Self(value.to_owned())) } else { Err(IdError::new("slug", value, Self::RULE)) }
    }
}

impl NodeId {
    /// The rule, in words, used in error messages.
    pub const RULE: &'static str = "must be 1 to 63 characters of lowercase letters, digits, `_` and \
         `-`, starting with a letter or digit (^[a-z0-9][a-z0-9_-]{0,62}$)";

    /// Parses a stage, task or parameter id.
    ///
    /// # Errors
    /// Returns [`IdError`] naming the rule when `value` does not match it.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if check(value, 1, true) { Ok(Self(value.to_owned())) } else { Err(IdError::new("id", value, Self::RULE)) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for ok in ["ab", "deploy-api", "a1", "0a", &"a".repeat(63)] {
            assert!(Slug::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "-ab", "Ab", "a_b", "a b", "é1", &"a".repeat(64)] {
            let err = Slug::parse(bad).unwrap_err();
            assert!(err.to_string().contains("^[a-z0-9][a-z0-9-]{1,62}$"), "{err}");
        }
    }

    #[test]
    fn node_ids() {
        for ok in ["a", "build_1", "x-y", "9", &"a".repeat(63)] {
            assert!(NodeId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_a", "-a", "A", "a.b", "a b", &"a".repeat(64)] {
            assert!(NodeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serde_validates() {
        let id: NodeId = serde_json::from_str("\"build\"").unwrap();
        assert_eq!(id.as_str(), "build");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"build\"");
        let err = serde_json::from_str::<Slug>("\"Bad\"").unwrap_err();
        assert!(err.to_string().contains("invalid slug `Bad`"), "{err}");
        assert!(serde_json::from_str::<NodeId>("3").is_err());
    }

    #[test]
    fn conversions() {
        let slug = Slug::try_from("team-a").unwrap();
        assert_eq!(slug.to_string(), "team-a");
        assert_eq!(AsRef::<str>::as_ref(&slug), "team-a");
        assert_eq!("x1".parse::<NodeId>().unwrap().into_string(), "x1");
        let long = "A".repeat(200);
        assert!(NodeId::parse(&long).unwrap_err().value.len() <= 80);
    }
}
