//! [`ByteSize`]: a human size setting (`512MiB`, `2GiB`, `1.5G`), as memory limits take it.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A number of bytes, written the way people and Kubernetes write them: `512MiB`, `2GiB`,
/// `512Mi`, `500MB`, `1G`, or plain bytes. Binary units (`Ki`, `KiB`, ... `TiB`) are powers of
/// 1024, decimal ones (`K`, `KB`, ... `TB`) powers of 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `text` (see the type's docs).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size such as 512MiB or 2GiB"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "ki" | "kib" => 1 << 10,
            "m" | "mb" => 1000_u64.pow(2),
            "mi" | "mib" => 1 << 20,
            "g" | "gb" => 1000_u64.pow(3),
            "gi" | "gib" => 1 << 30,
            "t" | "tb" => 1000_u64.pow(4),
            "ti" | "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use MiB, GiB, MB, GB...)"
                ));
            }
        };
        let bytes = number * scale as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{text:?} is out of range"));
        }
        Ok(Self(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that shows it exactly, or with one decimal: `256 MiB`, `1.5 GiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        if value.fract() == 0.0 {
            write!(f, "{value:.0} {}", UNITS[unit])
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

/// An optional size: empty (or absent) is `None`; a string or a number of bytes otherwise.
pub(super) fn optional_size<'de, D>(deserializer: D) -> Result<Option<ByteSize>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Bytes(u64),
    }
    match Option::<Raw>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Raw::Bytes(bytes)) => Ok(Some(ByteSize(bytes))),
        Some(Raw::Text(text)) if text.trim().is_empty() => Ok(None),
        Some(Raw::Text(text)) => ByteSize::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_in_binary_and_decimal_units() {
        let cases = [
            ("512MiB", 512 << 20),
            ("512Mi", 512 << 20),
            ("2GiB", 2 << 30),
            ("1.5GiB", 3 << 29),
            ("500MB", 500_000_000),
            ("1G", 1_000_000_000),
            ("4096", 4096),
            (" 64 kib ", 64 << 10),
        ];
        for (text, bytes) in cases {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "MiB", "12 parsecs", "-1GiB", "1..2GiB"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ByteSize(256 << 20).to_string(), "256 MiB");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000 B");
    }
}
