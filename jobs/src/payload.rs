//! The agent-start job payload and its tolerant decoder.
//!
//! Producers in any language write the payload, so the worker cannot trust it to match
//! [`AgentStart`]. [`AgentStart::decode`] takes the raw bytes stored in the queue and either
//! returns a valid job or a [`PayloadError`] that says exactly what was wrong; the worker turns
//! that into a permanent failure of that one job instead of a crashed fetch loop.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{SessionId, SessionIdError};

/// Longest accepted `user_id`, in bytes. It is informational only, but it is logged and stored.
pub const MAX_USER_ID_LEN: usize = 256;

/// Start one voice agent for one session.
///
/// Wire form (the JSON object stored as the job's arguments):
/// `{"session_id":"abc-123","user_id":"test_concurrent_user"}`; `user_id` is omitted when absent
/// and unknown fields are ignored when decoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStart {
    /// The session to start an agent for; the only key used to find its configuration.
    pub session_id: SessionId,
    /// Who started the session. Logged and stored as `userId`; never used to find configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
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
}

impl AgentStart {
    /// A job for `session_id`, without a user.
    pub fn new(session_id: SessionId) -> Self {
        Self {
            session_id,
            user_id: None,
        }
    }

    /// Sets the informational user id.
    pub fn with_user(mut self, user_id: impl Into<String>) -> Self {
        self.user_id = Some(user_id.into());
        self
    }

    /// The canonical wire bytes: compact JSON, `session_id` first, `user_id` omitted when absent.
    /// The Python producer writes the same bytes for the same input.
    pub fn to_wire(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("AgentStart always serializes")
    }

    /// Decodes a payload of untrusted bytes, naming the first thing that is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
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
        Ok(Self {
            session_id,
            user_id,
        })
    }
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
        let cases: [(&[u8], &str); 8] = [
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
        ];
        for (bytes, expected) in cases {
            let err = AgentStart::decode(bytes).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }
}
