//! [`SessionId`]: the one piece of producer input that becomes part of Redis key names.
//!
//! Every key the worker touches for a session (`session:<id>`, `agent:<id>:pid`, ...) is built
//! from a session id, so an id is only accepted when it cannot change the shape of a key:
//! 1–128 characters of `[A-Za-z0-9._-]`. That rules out `*` and `?` (glob patterns in
//! `SCAN MATCH`), `:` (key separators), `{`/`}` (cluster hash tags), spaces and control bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted session id, in bytes (all accepted characters are ASCII).
pub const MAX_SESSION_ID_LEN: usize = 128;

/// A validated session id: safe to splice into a Redis key name or an agent's argv.
///
/// ```
/// use agent_jobs::SessionId;
/// assert_eq!(SessionId::parse("abc-123").unwrap().as_str(), "abc-123");
/// assert!(SessionId::parse("session:*").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

/// Why a string is not a valid [`SessionId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionIdError {
    /// The id is the empty string.
    #[error("session_id is empty")]
    Empty,
    /// The id is longer than [`MAX_SESSION_ID_LEN`].
    #[error("session_id is {len} characters long; at most {MAX_SESSION_ID_LEN} are allowed")]
    TooLong {
        /// Length of the rejected id, in characters.
        len: usize,
    },
    /// The id contains a character outside `[A-Za-z0-9._-]`.
    #[error(
        "session_id contains {found:?} at position {position}; only letters, digits, '.', '_' and '-' are allowed"
    )]
    InvalidChar {
        /// The first offending character.
        found: char,
        /// Its position (in characters, from 0).
        position: usize,
    },
}

impl SessionId {
    /// Validates `id` and wraps it.
    pub fn parse(id: impl Into<String>) -> Result<Self, SessionIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(SessionIdError::Empty);
        }
        let len = id.chars().count();
        if len > MAX_SESSION_ID_LEN {
            return Err(SessionIdError::TooLong { len });
        }
        if let Some((position, found)) = id
            .chars()
            .enumerate()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(SessionIdError::InvalidChar { found, position });
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SessionId {
    type Error = SessionIdError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(value)
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> Self {
        id.0
    }
}

impl AsRef<str> for SessionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SessionId {
    type Err = SessionIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in ["a", "abc-123", "A.b_c-9", &"x".repeat(128)] {
            assert_eq!(SessionId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_what_could_change_a_key() {
        assert_eq!(SessionId::parse(""), Err(SessionIdError::Empty));
        assert_eq!(
            SessionId::parse("x".repeat(129)),
            Err(SessionIdError::TooLong { len: 129 })
        );
        for (bad, ch, pos) in [
            ("*", '*', 0),
            ("a:b", ':', 1),
            ("a b", ' ', 1),
            ("{tag}", '{', 0),
            ("ab\n", '\n', 2),
            ("é", 'é', 0),
        ] {
            assert_eq!(
                SessionId::parse(bad),
                Err(SessionIdError::InvalidChar {
                    found: ch,
                    position: pos
                }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn deserializing_validates() {
        let err = serde_json::from_str::<SessionId>("\"a:b\"").unwrap_err();
        assert!(err.to_string().contains("':'"), "{err}");
    }
}
