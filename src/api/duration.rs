//! Durations in the Kubernetes/Go form (`30s`, `15m`, `1h30m`), as the CRDs carry them.
//!
//! Parsing is delegated to kube's `metav1.Duration` port; this wrapper exists because that
//! type prints `15m` back as `900s`, rejects nothing negative, and has no schema pattern, while
//! our CRDs must reject malformed durations at `kubectl apply` time and print what users wrote.

use std::{borrow::Cow, fmt, str::FromStr, time};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The pattern the API server enforces on every duration field: one or more
/// `<number><unit>` groups, no sign, no spaces.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// A non-negative duration written in the Go form.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(time::Duration::from_secs(secs))
    }

    pub const fn as_std(self) -> time::Duration {
        self.0
    }
}

impl From<time::Duration> for Duration {
    fn from(d: time::Duration) -> Self {
        Self(d)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("invalid duration {0:?}: expected a Go duration such as 30s, 15m or 1h30m")]
    Malformed(String),
    #[error("invalid duration {0:?}: must not be negative")]
    Negative(String),
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        // kube's parser accepts an empty string (as zero) and a bare "0"; neither is a
        // meaningful timeout, and the schema pattern rejects them too, so stay consistent.
        if trimmed.is_empty() || trimmed == "0" {
            return Err(DurationError::Malformed(s.to_owned()));
        }
        if trimmed.starts_with('-') {
            return Err(DurationError::Negative(s.to_owned()));
        }
        // Same alphabet as DURATION_PATTERN, so what parses here is what the API server admits.
        if !trimmed
            .chars()
            .all(|c| c.is_ascii_digit() || ".nsumh".contains(c))
        {
            return Err(DurationError::Malformed(s.to_owned()));
        }
        let parsed = kube::core::Duration::from_str(trimmed)
            .map_err(|_| DurationError::Malformed(s.to_owned()))?;
        if parsed.is_negative() {
            return Err(DurationError::Negative(s.to_owned()));
        }
        Ok(Self(parsed.into()))
    }
}

impl fmt::Display for Duration {
    /// Compact Go form: `1h30m`, `15m`, `45s`, `1m30.5s`, `250ms`. Go itself would print
    /// `1h30m0s`; both parse identically, and the compact one is what users write.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.0;
        if total.is_zero() {
            return f.write_str("0s");
        }
        if total < time::Duration::from_secs(1) {
            let nanos = total.subsec_nanos();
            return if nanos.is_multiple_of(1_000_000) {
                write!(f, "{}ms", nanos / 1_000_000)
            } else if nanos.is_multiple_of(1_000) {
                write!(f, "{}us", nanos / 1_000)
            } else {
                write!(f, "{nanos}ns")
            };
        }
        let secs = total.as_secs();
        let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        let nanos = total.subsec_nanos();
        if nanos > 0 {
            let frac = format!("{:09}", nanos);
            write!(f, "{s}.{}s", frac.trim_end_matches('0'))?;
        } else if s > 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_in_the_go_form() {
        let cases = [
            ("30s", 30_000, "30s"),
            ("15m", 900_000, "15m"),
            ("1h30m", 5_400_000, "1h30m"),
            ("1h30m0s", 5_400_000, "1h30m"),
            ("90s", 90_000, "1m30s"),
            ("1.5h", 5_400_000, "1h30m"),
            ("250ms", 250, "250ms"),
            ("2m0.5s", 120_500, "2m0.5s"),
            ("24h", 86_400_000, "24h"),
        ];
        for (input, millis, printed) in cases {
            let d: Duration = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(d.0.as_millis(), millis, "{input}");
            assert_eq!(d.to_string(), printed, "{input}");
            let again: Duration = d.to_string().parse().unwrap();
            assert_eq!(again, d, "{input} must round-trip");
        }
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        for bad in ["", "0", "15", "5 m", "-5m", "1d", "m", "abc", "1h-5m"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} must not parse");
            assert!(
                !pattern.is_match(bad),
                "{bad:?} must not match the schema pattern"
            );
        }
        for good in ["1s", "15m", "1h30m", "1.5h", "100ms"] {
            assert!(good.parse::<Duration>().is_ok(), "{good:?} must parse");
            assert!(
                pattern.is_match(good),
                "{good:?} must match the schema pattern"
            );
        }
    }

    #[test]
    fn serde_uses_strings() {
        let d: Duration = serde_json::from_str("\"15m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"15m\"");
        assert!(serde_json::from_str::<Duration>("\"15 minutes\"").is_err());
    }
}
