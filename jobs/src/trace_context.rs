//! The W3C Trace Context fields a job may carry (`traceparent`, `tracestate`), checked for
//! shape only.
//!
//! A producer is refused a malformed value up front ([`check_traceparent`],
//! [`check_tracestate`]), but the worker, which reads what any producer wrote, never lets one
//! poison a job: a field that fails these checks is ignored with a warning and the start gets
//! a root trace (see [`crate::AgentStart::decode_with_warnings`]). The rules are those of
//! <https://www.w3.org/TR/trace-context/>: `version-traceid-parentid-flags` in lowercase hex,
//! neither id all zeros, version `ff` invalid, and a later version parsed by its first four
//! fields.

/// Longest accepted `traceparent` of a later version (version 00 is exactly 55 characters).
pub const MAX_TRACEPARENT_LEN: usize = 512;

/// Longest accepted `tracestate`: W3C asks every vendor to propagate at least 512 characters
/// (32 list members); more than that is truncated by others anyway.
pub const MAX_TRACESTATE_LEN: usize = 512;

/// Why a `traceparent` or `tracestate` is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    /// Not `version-traceid-parentid-flags` (2, 32, 16 and 2 lowercase hex digits).
    #[error(
        "traceparent {value:?} is not version-traceid-parentid-flags in lowercase hex ({what})"
    )]
    TraceparentShape {
        /// The value (at most its first 64 characters).
        value: String,
        /// What is wrong with it.
        what: &'static str,
    },
    /// The trace id or the parent id is all zeros, which W3C declares invalid.
    #[error("traceparent {value:?} has an all-zero {which}")]
    TraceparentZero {
        /// The value.
        value: String,
        /// `trace id` or `parent id`.
        which: &'static str,
    },
    /// `tracestate` is too long or holds a character outside printable ASCII.
    #[error("tracestate is not usable: {what}")]
    Tracestate {
        /// What is wrong with it.
        what: String,
    },
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn shape(value: &str, what: &'static str) -> TraceContextError {
    TraceContextError::TraceparentShape {
        value: value.chars().take(64).collect(),
        what,
    }
}

/// Checks the shape of a W3C `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>` (lowercase), no
/// all-zero id, no version `ff`; a later version may append `-...` after the flags.
pub fn check_traceparent(value: &str) -> Result<(), TraceContextError> {
    if value.len() < 55 || value.len() > MAX_TRACEPARENT_LEN || !value.is_ascii() {
        return Err(shape(value, "wrong length"));
    }
    let (version, trace_id, parent_id, flags, rest) = (
        &value[0..2],
        &value[3..35],
        &value[36..52],
        &value[53..55],
        &value[55..],
    );
    let dashes = [2, 35, 52].iter().all(|&i| value.as_bytes()[i] == b'-');
    if !dashes {
        return Err(shape(value, "fields not separated by '-'"));
    }
    if ![version, trace_id, parent_id, flags]
        .iter()
        .all(|f| is_lower_hex(f))
    {
        return Err(shape(value, "not lowercase hex"));
    }
    if version == "ff" {
        return Err(shape(value, "version ff is invalid"));
    }
    if version == "00" && !rest.is_empty() {
        return Err(shape(value, "version 00 has exactly four fields"));
    }
    if !rest.is_empty() && !rest.starts_with('-') {
        return Err(shape(value, "flags not followed by '-' or the end"));
    }
    for (id, which) in [(trace_id, "trace id"), (parent_id, "parent id")] {
        if id.bytes().all(|b| b == b'0') {
            return Err(TraceContextError::TraceparentZero {
                value: value.to_owned(),
                which,
            });
        }
    }
    Ok(())
}

/// Checks a W3C `tracestate` loosely: at most [`MAX_TRACESTATE_LEN`] characters of printable
/// ASCII (its list members are the vendors' business, passed on untouched).
pub fn check_tracestate(value: &str) -> Result<(), TraceContextError> {
    if value.len() > MAX_TRACESTATE_LEN {
        return Err(TraceContextError::Tracestate {
            what: format!(
                "{} bytes long; at most {MAX_TRACESTATE_LEN} are allowed",
                value.len()
            ),
        });
    }
    if let Some(bad) = value.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(TraceContextError::Tracestate {
            what: format!("{bad:?} is not printable ASCII"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_passes_and_later_versions_by_their_first_fields() {
        check_traceparent(GOOD).unwrap();
        check_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        check_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").unwrap();
    }

    #[test]
    fn malformed_traceparents_say_what_is_wrong() {
        let zeros_trace = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let zeros_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01";
        let cases: [(&str, &str); 10] = [
            ("", "wrong length"),
            (&GOOD[..54], "wrong length"),
            (&GOOD.to_uppercase(), "lowercase hex"),
            (&GOOD.replace('-', "_"), "'-'"),
            (&format!("ff{}", &GOOD[2..]), "version ff"),
            (&format!("{GOOD}-x"), "exactly four fields"),
            (&format!("01{}x", &GOOD[2..]), "followed by"),
            (zeros_trace, "all-zero trace id"),
            (zeros_parent, "all-zero parent id"),
            (&GOOD.replace('4', "é")[..], "wrong length"),
        ];
        for (value, expected) in cases {
            let err = check_traceparent(value).unwrap_err().to_string();
            assert!(err.contains(expected), "{value:?}: {err}");
        }
    }

    #[test]
    fn tracestate_is_printable_ascii_of_bounded_length() {
        check_tracestate("").unwrap();
        check_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").unwrap();
        assert!(check_tracestate("a=\n").is_err());
        assert!(check_tracestate(&"a".repeat(513)).is_err());
    }
}
