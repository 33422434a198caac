//! Memory quantities such as `512MiB` or `1GiB`.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A positive amount of memory in bytes.
///
/// Written as an integer followed by a binary unit: `B`, `KiB`, `MiB`, `GiB` (`K`, `M`, `G`
/// are accepted as aliases of the binary units). The canonical form uses the largest unit that
/// divides the value exactly (`1024MiB` is written `1GiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemorySize(u64);

/// Why a string is not a valid [`MemorySize`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid memory size `{value}`: {reason}")]
pub struct MemorySizeError {
    value: String,
    reason: &'static str,
}

const UNITS: [(&str, u64); 7] =
    [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)];

impl MemorySize {
    /// Creates a size from a byte count, `None` when zero.
    #[must_use]
    pub const fn from_bytes(bytes: u64) -> Option<Self> {
        if bytes == 0 { None } else { Some(Self(bytes)) }
    }

    /// The size in bytes.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Parses a size such as `512MiB`, `1GiB`, `64K` or `100B`.
    ///
    /// # Errors
    /// Returns [`MemorySizeError`] when the number or unit is missing or unknown, the value is
    /// zero or it overflows 64 bits.
    pub fn parse(text: &str) -> Result<Self, MemorySizeError> {
        let err = |reason| MemorySizeError { value: text.to_owned(), reason };
        let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(digits_end);
        if digits.is_empty() {
            return Err(err("expected a whole number followed by B, KiB, MiB or GiB"));
        }
        if unit.is_empty() {
            return Err(err("missing unit (use B, KiB, MiB or GiB)"));
        }
        let Some((_, size)) = UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(err("unknown unit (use B, KiB, MiB or GiB)"));
        };
        let number: u64 = digits.parse().map_err(|_| err("too large"))?;
        let bytes = number.checked_mul(*size).ok_or_else(|| err("too large"))?;
        Self::from_bytes(bytes).ok_or_else(|| err("must be greater than zero"))
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, size) in &UNITS[..4] {
            if self.0.is_multiple_of(*size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for MemorySize {
    type Err = MemorySizeError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl Serialize for MemorySize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MemorySize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a memory size string such as \"512MiB\" or \"1GiB\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MemorySize, E> {
                MemorySize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_canonicalizes() {
        assert_eq!(MemorySize::parse("1GiB").unwrap().bytes(), 1 << 30);
        assert_eq!(MemorySize::parse("1G").unwrap().bytes(), 1 << 30);
        assert_eq!(MemorySize::parse("512M").unwrap().to_string(), "512MiB");
        assert_eq!(MemorySize::parse("1024MiB").unwrap().to_string(), "1GiB");
        assert_eq!(MemorySize::parse("1536MiB").unwrap().to_string(), "1536MiB");
        assert_eq!(MemorySize::parse("100B").unwrap().to_string(), "100B");
        assert_eq!(MemorySize::parse("2K").unwrap().to_string(), "2KiB");
    }

    #[test]
    fn rejects() {
        for bad in ["", "1", "GiB", "0MiB", "1TiB", "1.5GiB", "-1G", "99999999999999GiB", "1 GiB"] {
            assert!(MemorySize::parse(bad).is_err(), "{bad}");
        }
        assert!(MemorySize::parse("0B").unwrap_err().to_string().contains("greater than zero"));
    }
}
