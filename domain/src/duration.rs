//! Human-readable durations such as `500ms`, `2s`, `10m`, `1h30m`, `72h` or `1d`.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration with millisecond precision.
///
/// Written as one or more `<integer><unit>` parts with units `d`, `h`, `m`, `s`, `ms`, in
/// decreasing order and each at most once (`1h30m`, `2s500ms`). [`Display`](fmt::Display) and
/// serde produce the canonical form, which splits the value into the largest units
/// (`90m` is written `1h30m`; zero is `0s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(u64);

/// Why a string is not a valid [`Duration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The input was empty.
    #[error("empty duration; expected something like `30s`, `10m` or `1h30m`")]
    Empty,
    /// The input started with a minus sign.
    #[error("invalid duration `{0}`: durations cannot be negative")]
    Negative(String),
    /// A number had no unit after it.
    #[error("invalid duration `{0}`: missing unit after the number (use ms, s, m, h or d)")]
    MissingUnit(String),
    /// A unit was not one of `ms`, `s`, `m`, `h`, `d`.
    #[error("invalid duration `{0}`: unknown unit `{1}` (use ms, s, m, h or d)")]
    UnknownUnit(String, String),
    /// A unit appeared without a number in front of it, or another character was found.
    #[error("invalid duration `{0}`: expected a number at position {1}")]
    ExpectedNumber(String, usize),
    /// Units were repeated or not in decreasing order.
    #[error("invalid duration `{0}`: units must appear once each, largest first (e.g. `1h30m`)")]
    UnitOrder(String),
    /// The value does not fit in 64 bits of milliseconds.
    #[error("invalid duration `{0}`: too large")]
    Overflow(String),
}

const UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

impl Duration {
    /// The zero duration.
    pub const ZERO: Self = Self(0);

    /// Creates a duration from milliseconds.
    #[must_use]
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    /// Creates a duration from whole seconds, saturating on overflow.
    #[must_use]
    pub const fn from_secs(secs: u64) -> Self {
        Self(secs.saturating_mul(1_000))
    }

    /// The duration in milliseconds.
    #[must_use]
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// Whether this is the zero duration.
    #[must_use]
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Converts to [`core::time::Duration`].
    #[must_use]
    pub const fn to_std(self) -> core::time::Duration {
        core::time::Duration::from_millis(self.0)
    }

    /// Parses a duration such as `500ms`, `2s`, `10m`, `1h30m`, `72h` or `1d`.
    ///
    /// # Errors
    /// Returns [`DurationError`] for an empty string, a number without unit (`10`), an unknown
    /// unit (`5x`), a negative value, repeated or out-of-order units, or overflow.
    pub fn parse(text: &str) -> Result<Self, DurationError> {
        if text.is_empty() {
            return Err(DurationError::Empty);
        }
        if text.starts_with('-') {
            return Err(DurationError::Negative(text.to_owned()));
        }
        let bytes = text.as_bytes();
        let mut pos = 0;
        let mut total: u64 = 0;
        // Index into UNITS of the last unit seen; the next must have a larger index.
        let mut last_unit: Option<usize> = None;
        while pos < bytes.len() {
            let start = pos;
            while pos < bytes.len() && bytes[pos].is_ascii_digit() {
                pos += 1;
            }
            if pos == start {
                return Err(DurationError::ExpectedNumber(text.to_owned(), start));
            }
            let number: u64 = text
                .get(start..pos)
                .and_then(|digits| digits.parse().ok())
                .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
            let unit_start = pos;
            while pos < bytes.len() && bytes[pos].is_ascii_alphabetic() {
                pos += 1;
            }
            let unit = text.get(unit_start..pos).unwrap_or_default();
            if unit.is_empty() {
                if pos < bytes.len() {
                    let rest: String = text.get(pos..).unwrap_or_default().chars().take(1).collect();
                    return Err(DurationError::UnknownUnit(text.to_owned(), rest));
                }
                return Err(DurationError::MissingUnit(text.to_owned()));
            }
            let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
                return Err(DurationError::UnknownUnit(text.to_owned(), unit.to_owned()));
            };
            if last_unit.is_some_and(|last| index <= last) {
                return Err(DurationError::UnitOrder(text.to_owned()));
            }
            last_unit = Some(index);
            total = number
                .checked_mul(UNITS[index].1)
                .and_then(|part| total.checked_add(part))
                .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.0;
        for (name, size) in UNITS {
            let count = rest / size;
            if count > 0 {
                write!(f, "{count}{name}")?;
                rest %= size;
            }
        }
        Ok(())
    }
}

impl FromStr for Duration {
    type Err = DurationError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl TryFrom<&str> for Duration {
    type Error = DurationError;
    fn try_from(text: &str) -> Result<Self, Self::Error> {
        Self::parse(text)
    }
}

impl From<Duration> for core::time::Duration {
    fn from(value: Duration) -> Self {
        value.to_std()
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"30s\", \"10m\" or \"1h30m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_examples() {
        let cases = [
            ("500ms", 500),
            ("2s", 2_000),
            ("10m", 600_000),
            ("72h", 259_200_000),
            ("1h30m", 5_400_000),
            ("1d", 86_400_000),
            ("0s", 0),
            ("1d2h3m4s5ms", 93_784_005),
            ("90m", 5_400_000),
        ];
        for (text, millis) in cases {
            assert_eq!(Duration::parse(text).unwrap().as_millis(), millis, "{text}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(Duration::parse(""), Err(DurationError::Empty));
        assert!(matches!(Duration::parse("10"), Err(DurationError::MissingUnit(_))));
        assert!(matches!(Duration::parse("5x"), Err(DurationError::UnknownUnit(_, u)) if u == "x"));
        assert!(matches!(Duration::parse("-5s"), Err(DurationError::Negative(_))));
        assert!(matches!(Duration::parse("h"), Err(DurationError::ExpectedNumber(_, 0))));
        assert!(matches!(Duration::parse("30m1h"), Err(DurationError::UnitOrder(_))));
        assert!(matches!(Duration::parse("1h1h"), Err(DurationError::UnitOrder(_))));
        assert!(matches!(Duration::parse("1 h"), Err(DurationError::UnknownUnit(_, _))));
        assert!(matches!(Duration::parse("99999999999999999999d"), Err(DurationError::Overflow(_))));
        assert!(matches!(Duration::parse("213503982336d"), Err(DurationError::Overflow(_))));
        assert!(Duration::parse("5x").unwrap_err().to_string().contains("unknown unit `x`"));
    }

    #[test]
    fn canonical_display() {
        assert_eq!(Duration::parse("90m").unwrap().to_string(), "1h30m");
        assert_eq!(Duration::parse("1500ms").unwrap().to_string(), "1s500ms");
        assert_eq!(Duration::parse("36h").unwrap().to_string(), "1d12h");
        assert_eq!(Duration::ZERO.to_string(), "0s");
        assert_eq!(Duration::from_secs(2).to_std(), core::time::Duration::from_secs(2));
    }

    #[test]
    fn serde_as_string() {
        let d: Duration = serde_json::from_str("\"2s\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"2s\"");
        assert!(serde_json::from_str::<Duration>("10").is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(millis in any::<u64>()) {
            let d = Duration::from_millis(millis);
            prop_assert_eq!(Duration::parse(&d.to_string()), Ok(d));
        }
    }
}
