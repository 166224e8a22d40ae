//! The agent-start job payload and its tolerant decoder.
//!
//! Producers in any language write the payload, so the worker cannot trust it to match
//! [`AgentStart`]. [`AgentStart::decode`] takes the raw bytes stored in the queue and either
//! returns a valid job or a [`PayloadError`] that says exactly what was wrong; the worker turns
//! that into a permanent failure of that one job instead of a crashed fetch loop.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    SessionId, SessionIdError,
    trace_context::{TraceContextError, check_traceparent, check_tracestate},
};

/// Longest accepted `user_id`, in bytes. It is informational only, but it is logged and stored.
pub const MAX_USER_ID_LEN: usize = 256;

/// Start one voice agent for one session.
///
/// Wire form (the JSON object stored as the job's arguments), fields in this order:
/// `{"session_id":"abc-123","user_id":"u1","traceparent":"00-…-01","tracestate":"k=v","start_by":1767225600000}`;
/// every field but `session_id` is omitted when absent, and unknown fields are ignored when
/// decoding. `traceparent`, `tracestate` and `start_by` are contract version 2; a version 1
/// payload (without them) means what it always did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStart {
    /// The session to start an agent for; the only key used to find its configuration.
    pub session_id: SessionId,
    /// Who started the session. Logged and stored as `userId`; never used to find configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The producer's W3C trace context (`00-<trace id>-<parent id>-<flags>`), continued by the
    /// worker and handed to the agent. A decoded job only has one of valid shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with [`Self::traceparent`] (vendors' key=value list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// The start's deadline: unix milliseconds on **Redis's** clock (`TIME`). A job claimed
    /// later starts no agent (`start_expired`). `None`: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_by: Option<i64>,
    /// A deadline relative to the enqueue, not on the wire: [`crate::Producer`] turns it into
    /// [`Self::start_by`] on Redis's clock (an explicit `start_by` wins).
    #[serde(skip)]
    pub start_within: Option<Duration>,
}

/// Something in a payload the worker ignored rather than fail the job for it (a malformed
/// trace context must not cost a caller their agent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadWarning {
    /// `traceparent` is not a string of valid shape: the start gets a root trace.
    #[error("traceparent ignored: {0}")]
    Traceparent(String),
    /// `tracestate` is not usable, or came without a valid `traceparent`.
    #[error("tracestate ignored: {0}")]
    Tracestate(String),
}

/// Why a payload is not a valid [`AgentStart`]. Every variant is permanent: retrying the same
/// bytes cannot succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The bytes are not JSON at all.
    #[error("payload is not valid JSON ({reason}); starts with {preview:?}")]
    NotJson {
        /// The JSON parser's message.
        reason: String,
        /// The first bytes of the payload, lossily decoded, for the operator.
        preview: String,
    },
    /// The JSON is not an object.
    #[error("payload must be a JSON object with a session_id, found {found}")]
    NotAnObject {
        /// The JSON type that was found instead.
        found: &'static str,
    },
    /// The object has no `session_id`.
    #[error("payload has no session_id")]
    MissingSessionId,
    /// `session_id` is present but not a string.
    #[error("session_id must be a string, found {found}")]
    SessionIdNotString {
        /// The JSON type that was found instead.
        found: &'static str,
    },
    /// `session_id` is a string but not a valid id.
    #[error(transparent)]
    InvalidSessionId(#[from] SessionIdError),
    /// `user_id` is present but neither a string nor null.
    #[error("user_id must be a string or null, found {found}")]
    UserIdNotString {
        /// The JSON type that was found instead.
        found: &'static str,
    },
    /// `user_id` is longer than [`MAX_USER_ID_LEN`] bytes.
    #[error("user_id is {len} bytes long; at most {MAX_USER_ID_LEN} are allowed")]
    UserIdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// `start_by` is present but not a whole number of milliseconds from 0 to 2^53 (what
    /// every JSON parser reads exactly).
    #[error("start_by must be unix milliseconds (a whole number from 0 to 2^53), found {found}")]
    StartByInvalid {
        /// What was found instead.
        found: String,
    },
}

/// Largest `start_by` accepted: 2^53, the largest integer every JSON parser reads exactly.
pub const MAX_START_BY: i64 = 1 << 53;

impl AgentStart {
    /// A job for `session_id`, without a user, trace context or deadline.
    pub fn new(session_id: SessionId) -> Self {
        Self {
            session_id,
            user_id: None,
            traceparent: None,
            tracestate: None,
            start_by: None,
            start_within: None,
        }
    }

    /// Sets the informational user id.
    pub fn with_user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// Sets the W3C `traceparent` the worker continues; refused unless of valid shape.
    pub fn with_traceparent(
        mut self,
        traceparent: impl Into<String>,
    ) -> Result<Self, TraceContextError> {
        let traceparent = traceparent.into();
        check_traceparent(&traceparent)?;
        self.traceparent = Some(traceparent);
        Ok(self)
    }

    /// Sets the W3C `tracestate` (meaningful with a `traceparent`); refused unless printable
    /// ASCII of at most 512 bytes.
    pub fn with_tracestate(
        mut self,
        tracestate: impl Into<String>,
    ) -> Result<Self, TraceContextError> {
        let tracestate = tracestate.into();
        check_tracestate(&tracestate)?;
        self.tracestate = Some(tracestate);
        Ok(self)
    }

    /// Sets an absolute deadline, unix milliseconds on Redis's clock (clamped to
    /// 0..=[`MAX_START_BY`]). Usually [`Self::with_start_within`] is what you want.
    pub fn with_start_by(mut self, unix_ms: i64) -> Self {
        self.start_by = Some(unix_ms.clamp(0, MAX_START_BY));
        self
    }

    /// A deadline `within` after the enqueue: [`crate::Producer`] reads Redis's `TIME` and
    /// writes `start_by` = that time + `within`, so no producer host's clock is involved.
    pub fn with_start_within(mut self, within: Duration) -> Self {
        self.start_within = Some(within);
        self
    }

    /// The canonical wire bytes: compact JSON, fields in declaration order, absent ones
    /// omitted. The Python producer writes the same bytes for the same input.
    pub fn to_wire(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("AgentStart always serializes")
    }

    /// Decodes a payload of untrusted bytes, naming the first thing that is wrong with it.
    /// What [`Self::decode_with_warnings`] would warn about is dropped silently.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        Self::decode_with_warnings(bytes).map(|(job, _)| job)
    }

    /// Decodes a payload of untrusted bytes. Bad `session_id`, `user_id` or `start_by` fail it
    /// ([`PayloadError`]); a malformed `traceparent` or `tracestate` does not: it is left out
    /// and reported in the warnings (a `tracestate` without a valid `traceparent` too, as
    /// W3C requires), and the start gets a root trace.
    pub fn decode_with_warnings(bytes: &[u8]) -> Result<(Self, Vec<PayloadWarning>), PayloadError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| PayloadError::NotJson {
            reason: e.to_string(),
            preview: preview(bytes),
        })?;
        let Value::Object(mut object) = value else {
            return Err(PayloadError::NotAnObject {
                found: json_type(&value),
            });
        };
        let session_id = match object.remove("session_id") {
            None => return Err(PayloadError::MissingSessionId),
            Some(Value::String(id)) => SessionId::parse(id)?,
            Some(other) => {
                return Err(PayloadError::SessionIdNotString {
                    found: json_type(&other),
                });
            }
        };
        let user_id = match object.remove("user_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(user)) if user.len() > MAX_USER_ID_LEN => {
                return Err(PayloadError::UserIdTooLong { len: user.len() });
            }
            Some(Value::String(user)) => Some(user),
            Some(other) => {
                return Err(PayloadError::UserIdNotString {
                    found: json_type(&other),
                });
            }
        };
        let start_by = start_by(object.remove("start_by"))?;
        let mut warnings = Vec::new();
        let (traceparent, tracestate) = trace_context(&mut object, &mut warnings);
        let job = Self {
            session_id,
            user_id,
            traceparent,
            tracestate,
            start_by,
            start_within: None,
        };
        Ok((job, warnings))
    }
}

fn start_by(value: Option<Value>) -> Result<Option<i64>, PayloadError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(ms) if (0..=MAX_START_BY).contains(&ms) => Ok(Some(ms)),
            _ => Err(PayloadError::StartByInvalid {
                found: n.to_string(),
            }),
        },
        Some(other) => Err(PayloadError::StartByInvalid {
            found: json_type(&other).to_owned(),
        }),
    }
}

/// The usable trace context of a payload; whatever is not usable becomes a warning.
fn trace_context(
    object: &mut Map<String, Value>,
    warnings: &mut Vec<PayloadWarning>,
) -> (Option<String>, Option<String>) {
    let traceparent = match object.remove("traceparent") {
        None | Some(Value::Null) => None,
        Some(Value::String(tp)) => match check_traceparent(&tp) {
            Ok(()) => Some(tp),
            Err(e) => {
                warnings.push(PayloadWarning::Traceparent(e.to_string()));
                None
            }
        },
        Some(other) => {
            let found = json_type(&other);
            warnings.push(PayloadWarning::Traceparent(format!(
                "a string was expected, found {found}"
            )));
            None
        }
    };
    let tracestate = match object.remove("tracestate") {
        None | Some(Value::Null) => None,
        Some(_) if traceparent.is_none() => {
            warnings.push(PayloadWarning::Tracestate("no valid traceparent".into()));
            None
        }
        Some(Value::String(ts)) => match check_tracestate(&ts) {
            Ok(()) => Some(ts),
            Err(e) => {
                warnings.push(PayloadWarning::Tracestate(e.to_string()));
                None
            }
        },
        Some(other) => {
            let found = json_type(&other);
            warnings.push(PayloadWarning::Tracestate(format!(
                "a string was expected, found {found}"
            )));
            None
        }
    };
    (traceparent, tracestate)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn preview(bytes: &[u8]) -> String {
    const PREVIEW: usize = 40;
    String::from_utf8_lossy(&bytes[..bytes.len().min(PREVIEW)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_compact_and_ordered() {
        let job = AgentStart::new(SessionId::parse("abc-123").unwrap()).with_user("u1");
        assert_eq!(job.to_wire(), br#"{"session_id":"abc-123","user_id":"u1"}"#);
        let bare = AgentStart::new(SessionId::parse("abc").unwrap());
        assert_eq!(bare.to_wire(), br#"{"session_id":"abc"}"#);
    }

    #[test]
    fn decode_accepts_unknown_fields_and_null_user() {
        let job = AgentStart::decode(br#"{"user_id":null,"session_id":"s1","extra":[1]}"#).unwrap();
        assert_eq!(job.session_id.as_str(), "s1");
        assert_eq!(job.user_id, None);
    }

    #[test]
    fn decode_names_what_is_wrong() {
        let cases: [(&[u8], &str); 11] = [
            (b"\xff\xfenot json", "not valid JSON"),
            (b"{}", "no session_id"),
            (br#"{"session_id":""}"#, "empty"),
            (br#"{"session_id":"*"}"#, "'*'"),
            (br#"{"session_id":42}"#, "must be a string, found a number"),
            (br#"[1,2]"#, "found an array"),
            (
                br#"{"session_id":"a","user_id":7}"#,
                "user_id must be a string",
            ),
            (br#"{"session_id":"a b"}"#, "' '"),
            (br#"{"session_id":"a","start_by":"1"}"#, "found a string"),
            (br#"{"session_id":"a","start_by":1.5}"#, "found 1.5"),
            (br#"{"session_id":"a","start_by":-1}"#, "found -1"),
        ];
        for (bytes, expected) in cases {
            let err = AgentStart::decode(bytes).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn version_2_fields_go_on_the_wire_in_order_and_decode_back() {
        let job = AgentStart::new(SessionId::parse("abc").unwrap())
            .with_user("u")
            .with_traceparent(TP)
            .unwrap()
            .with_tracestate("k=v")
            .unwrap()
            .with_start_by(1_767_225_600_000);
        let wire = format!(
            r#"{{"session_id":"abc","user_id":"u","traceparent":"{TP}","tracestate":"k=v","start_by":1767225600000}}"#
        );
        assert_eq!(String::from_utf8(job.to_wire()).unwrap(), wire);
        assert_eq!(AgentStart::decode(wire.as_bytes()).unwrap(), job);
        // Relative deadlines are the producer's to resolve: never on the wire.
        let within = AgentStart::new(SessionId::parse("abc").unwrap())
            .with_start_within(Duration::from_secs(30));
        assert_eq!(within.to_wire(), br#"{"session_id":"abc"}"#);
    }

    #[test]
    fn a_malformed_trace_context_is_ignored_with_a_warning_not_a_failure() {
        let payloads = [
            r#"{"session_id":"s","traceparent":"00-abc","tracestate":"k=v"}"#,
            r#"{"session_id":"s","traceparent":7}"#,
            r#"{"session_id":"s","tracestate":"k=v"}"#,
        ];
        for payload in payloads {
            let (job, warnings) = AgentStart::decode_with_warnings(payload.as_bytes()).unwrap();
            assert_eq!(
                job,
                AgentStart::new(SessionId::parse("s").unwrap()),
                "{payload}"
            );
            assert!(!warnings.is_empty(), "{payload}");
        }
        let bad_state = format!(r#"{{"session_id":"s","traceparent":"{TP}","tracestate":"\n"}}"#);
        let (job, warnings) = AgentStart::decode_with_warnings(bad_state.as_bytes()).unwrap();
        assert_eq!(job.traceparent.as_deref(), Some(TP));
        assert_eq!(job.tracestate, None);
        assert!(
            warnings[0].to_string().contains("printable ASCII"),
            "{warnings:?}"
        );
        assert!(
            AgentStart::new(SessionId::parse("s").unwrap())
                .with_traceparent("x")
                .is_err()
        );
    }
}
