//! The claim script's reply, decoded: `lua/claim_session.lua` answers with a positional
//! array whose meaning depends on its first element; [`ClaimReply::from_redis`] turns it into a
//! type once, so [`super::SessionStore::claim`] reads as what happens in each case.

use agent_jobs::SessionStatus;
use redis::{FromRedisValue, Value};

use super::config::ConfigSource;

/// The claim script's reply (`lua/claim_session.lua`), decoded from its positional array:
/// `[code, ...]`, the rest depending on the code.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ClaimReply {
    /// `[-1, type]`: the config key holds another Redis type.
    WrongType {
        /// The type found, when the script could name it.
        found: Option<String>,
    },
    /// `[0, owner, status]`: another live worker owns the session.
    HeldBy {
        /// That worker's id.
        owner: String,
        /// Its status is `ready`.
        ready: bool,
    },
    /// `[2, status]`: the session is over (`status` empty when its record is gone).
    Ended {
        /// Its status, if it has a record.
        status: Option<SessionStatus>,
    },
    /// `[3, kind, reason]`: the start is refused (`start_expired`, `config_missing`); the
    /// script recorded it.
    Refused {
        /// `start_expired` or `config_missing`.
        kind: String,
        /// The reason written on the session and the event.
        reason: String,
    },
    /// `[1, _, source, config pairs, enqueued]`: claimed; the config as a flat field/value
    /// array.
    Claimed {
        /// `stored`, or `default` when the script wrote the defaults.
        source: ConfigSource,
        /// Field, value, field, value...
        pairs: Vec<Value>,
        /// When the producer enqueued the job (unix ms, Redis's clock), if it recorded it.
        enqueued_ms: Option<u64>,
    },
}

impl ClaimReply {
    /// Decodes `reply`; a shape the script never returns is an error naming the whole reply.
    pub(super) fn from_redis(mut reply: Vec<Value>) -> redis::RedisResult<Self> {
        let text = |value: &Value| String::from_redis_value_ref(value).ok();
        let status = |value: &Value| {
            text(value)
                .filter(|s| !s.is_empty())
                .map(|s| SessionStatus::parse(&s))
        };
        let decoded = match reply.as_mut_slice() {
            [Value::Int(-1), found, ..] => Some(Self::WrongType { found: text(found) }),
            [Value::Int(0), owner, rest @ ..] => Some(Self::HeldBy {
                owner: text(owner).unwrap_or_default(),
                ready: rest.first().and_then(status) == Some(SessionStatus::Ready),
            }),
            [Value::Int(2), ended, ..] => Some(Self::Ended {
                status: status(ended),
            }),
            [Value::Int(3), kind, reason, ..] => Some(Self::Refused {
                kind: text(kind).unwrap_or_default(),
                reason: text(reason).unwrap_or_default(),
            }),
            [Value::Int(_), _, source, Value::Array(pairs), rest @ ..] => Some(Self::Claimed {
                source: match text(source).as_deref() {
                    Some("default") => ConfigSource::Default,
                    _ => ConfigSource::Stored,
                },
                pairs: std::mem::take(pairs),
                enqueued_ms: rest.first().and_then(text).and_then(|t| t.parse().ok()),
            }),
            _ => None,
        };
        decoded.ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply from the claim script",
                format!("{reply:?}"),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn every_reply_of_the_claim_script_decodes_and_another_shape_is_an_error() {
        assert_eq!(
            ClaimReply::from_redis(vec![Value::Int(-1), bulk("string")]).unwrap(),
            ClaimReply::WrongType {
                found: Some("string".into())
            }
        );
        assert_eq!(
            ClaimReply::from_redis(vec![Value::Int(0), bulk("w-1"), bulk("ready")]).unwrap(),
            ClaimReply::HeldBy {
                owner: "w-1".into(),
                ready: true
            }
        );
        assert_eq!(
            ClaimReply::from_redis(vec![Value::Int(0), bulk("w-1"), bulk("starting")]).unwrap(),
            ClaimReply::HeldBy {
                owner: "w-1".into(),
                ready: false
            }
        );
        assert_eq!(
            ClaimReply::from_redis(vec![Value::Int(2), bulk("")]).unwrap(),
            ClaimReply::Ended { status: None }
        );
        assert_eq!(
            ClaimReply::from_redis(vec![Value::Int(2), bulk("terminated")]).unwrap(),
            ClaimReply::Ended {
                status: Some(SessionStatus::Terminated)
            }
        );
        assert_eq!(
            ClaimReply::from_redis(vec![Value::Int(3), bulk("start_expired"), bulk("late")])
                .unwrap(),
            ClaimReply::Refused {
                kind: "start_expired".into(),
                reason: "late".into()
            }
        );
        let pairs = vec![bulk("voiceId"), bulk("Craig")];
        assert_eq!(
            ClaimReply::from_redis(vec![
                Value::Int(1),
                bulk("w-1"),
                bulk("default"),
                Value::Array(pairs.clone())
            ])
            .unwrap(),
            ClaimReply::Claimed {
                source: ConfigSource::Default,
                pairs: pairs.clone(),
                enqueued_ms: None,
            }
        );
        // The producer's enqueue time, when the job's meta has one.
        assert_eq!(
            ClaimReply::from_redis(vec![
                Value::Int(1),
                bulk(""),
                bulk("stored"),
                Value::Array(pairs.clone()),
                bulk("1765000000123"),
            ])
            .unwrap(),
            ClaimReply::Claimed {
                source: ConfigSource::Stored,
                pairs,
                enqueued_ms: Some(1_765_000_000_123),
            }
        );

        let error =
            ClaimReply::from_redis(vec![Value::Int(1), bulk("w-1"), bulk("stored")]).unwrap_err();
        assert_eq!(error.kind(), redis::ErrorKind::UnexpectedReturnType);
        // The whole reply is named, not just the part that was decoded.
        assert!(error.to_string().contains("stored"), "{error}");
        assert!(ClaimReply::from_redis(Vec::new()).is_err());
    }
}
