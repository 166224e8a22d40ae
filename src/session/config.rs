//! A session's config, `session:<id>:config`, as the agent's command line can carry it
//! (contract §1 and §4).
//!
//! Read inside the claim script (see [`crate::session::SessionStore::claim`]); validated here:
//! a voice must be there and not empty, and no value may hold a NUL byte or be longer than one
//! command-line argument can carry. A config that cannot be used is a permanent error naming
//! the key, the field and the problem.

use std::collections::BTreeMap;

use agent_jobs::session_config::fields;
use redis::Value;

use super::SessionError;

/// The session's config fields that become options of the agent's command line, with their
/// option names (contract §4), in command-line order after `--room`. Validation owns them: it
/// checks each value against what its `--name=value` element can carry, and
/// [`crate::agent::command`] builds the command line from the same list.
pub const SESSION_OPTIONS: [(&str, &str); 3] = [
    (fields::VOICE_ID, "--voice-id"),
    (fields::OPENING_LINE, "--opening-line"),
    (fields::SYSTEM_PROMPT, "--system-prompt"),
];

/// Linux refuses a single argv or environment string of 128 KiB or more (`MAX_ARG_STRLEN`).
/// A config value that would not fit is a permanent error, caught before any spawn.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;

/// Where a session's config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// Read from `session:<id>:config`.
    Stored,
    /// The key was missing; defaults were used (and written back).
    Default,
}

impl ConfigSource {
    /// `stored` or `default`, as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Default => "default",
        }
    }
}

/// A session's config: every field of the hash, validated for the agent's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    fields: BTreeMap<String, String>,
    source: ConfigSource,
}

impl SessionConfig {
    /// A config of these fields, unvalidated (for unit tests of what is built from one).
    #[cfg(test)]
    pub(crate) fn for_tests(pairs: &[(&str, &str)]) -> Self {
        Self {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            source: ConfigSource::Stored,
        }
    }

    /// The value of `field`, if the hash has it.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    /// The TTS voice (always present and non-empty).
    pub fn voice_id(&self) -> &str {
        &self.fields[fields::VOICE_ID]
    }

    /// The optional opening line.
    pub fn opening_line(&self) -> Option<&str> {
        self.fields.get(fields::OPENING_LINE).map(String::as_str)
    }

    /// The optional system prompt.
    pub fn system_prompt(&self) -> Option<&str> {
        self.fields.get(fields::SYSTEM_PROMPT).map(String::as_str)
    }

    /// Where it came from.
    pub fn source(&self) -> ConfigSource {
        self.source
    }

    /// Field names, sorted; logged instead of values (prompts are never logged).
    pub fn field_names(&self) -> Vec<&str> {
        self.fields.keys().map(String::as_str).collect()
    }

    /// The hash as a JSON object for the agent's `SESSION_CONFIG`: every field but the
    /// opening line and the system prompt, which reach the agent as options. A prompt is
    /// carried once, so it may use the whole of one argument (128 KiB), not half of it
    /// (JSON escaping can double it, too).
    pub fn to_json(&self) -> String {
        let rest: BTreeMap<&String, &String> = self
            .fields
            .iter()
            .filter(|(field, _)| !ON_COMMAND_LINE_ONLY.contains(&field.as_str()))
            .collect();
        serde_json::to_string(&rest).expect("a map of strings always serializes")
    }
}

/// Config fields the agent gets on its command line and not again in `SESSION_CONFIG`.
const ON_COMMAND_LINE_ONLY: [&str; 2] = [fields::OPENING_LINE, fields::SYSTEM_PROMPT];

/// The field/value pairs of an `HGETALL` reply as UTF-8 strings.
pub(crate) fn config_from_pairs(
    key: &str,
    flat: Vec<Value>,
) -> Result<BTreeMap<String, String>, SessionError> {
    let mut map = BTreeMap::new();
    let mut it = flat.into_iter();
    while let (Some(field), Some(value)) = (it.next(), it.next()) {
        let field = utf8(key, "name", field)?;
        let value = utf8(key, &field, value)?;
        map.insert(field, value);
    }
    Ok(map)
}

fn utf8(key: &str, field: &str, value: Value) -> Result<String, SessionError> {
    let bytes = match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(s) => s.into_bytes(),
        other => {
            return Err(SessionError::UnusableField {
                key: key.to_owned(),
                field: field.to_owned(),
                problem: format!("has an unexpected reply type {other:?}"),
            });
        }
    };
    String::from_utf8(bytes).map_err(|_| SessionError::UnusableField {
        key: key.to_owned(),
        field: field.to_owned(),
        problem: "is not valid UTF-8".into(),
    })
}

/// Checks that the agent can be launched with this config: a voice, no value its command
/// line or environment cannot carry.
pub(crate) fn validate(
    key: &str,
    fields_map: BTreeMap<String, String>,
    source: ConfigSource,
) -> Result<SessionConfig, SessionError> {
    let unusable = |field: &str, problem: String| SessionError::UnusableField {
        key: key.to_owned(),
        field: field.to_owned(),
        problem,
    };
    match fields_map.get(fields::VOICE_ID) {
        None => return Err(unusable(fields::VOICE_ID, "is missing".into())),
        Some(v) if v.trim().is_empty() => {
            return Err(unusable(fields::VOICE_ID, "is empty".into()));
        }
        Some(_) => {}
    }
    for (field, option) in SESSION_OPTIONS {
        if let Some(value) = fields_map.get(field) {
            if value.contains('\0') {
                return Err(unusable(
                    field,
                    "contains a NUL byte, which a command-line argument cannot carry".into(),
                ));
            }
            // The whole `--option=value` element must fit (the larger of the two arg styles).
            let element = option.len() + 1 + value.len();
            if element > MAX_ARG_BYTES {
                return Err(unusable(
                    field,
                    format!(
                        "is {} bytes; as {option}=<value> one command-line argument holds at \
                         most {MAX_ARG_BYTES} bytes (Linux's MAX_ARG_STRLEN)",
                        value.len()
                    ),
                ));
            }
        }
    }
    let config = SessionConfig {
        fields: fields_map,
        source,
    };
    let json_len = config.to_json().len() + "SESSION_CONFIG=".len();
    if json_len > MAX_ARG_BYTES {
        return Err(unusable(
            "(all)",
            format!(
                "the config's other fields are {json_len} bytes as SESSION_CONFIG; one \
                 environment entry holds at most {MAX_ARG_BYTES} bytes (Linux's MAX_ARG_STRLEN)"
            ),
        ));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// [`validate`] of a stored config with voice `v` and this system prompt.
    fn with_prompt(prompt: &str) -> Result<SessionConfig, SessionError> {
        validate(
            "k",
            map(&[("voiceId", "v"), ("systemPrompt", prompt)]),
            ConfigSource::Stored,
        )
    }

    #[test]
    fn validation_names_the_field() {
        let err = validate("k", map(&[("userName", "u")]), ConfigSource::Stored).unwrap_err();
        assert_eq!(err.to_string(), "k: field voiceId is missing");
        let err = validate("k", map(&[("voiceId", "a\0b")]), ConfigSource::Stored).unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
        let err = with_prompt(&"x".repeat(MAX_ARG_BYTES + 1)).unwrap_err();
        assert!(err.to_string().contains("systemPrompt is"), "{err}");
        assert!(err.is_permanent());
    }

    #[test]
    fn config_json_carries_every_field_but_the_command_line_options() {
        let config = validate(
            "k",
            map(&[
                ("voiceId", "Craig"),
                ("custom", "$(x)"),
                ("systemPrompt", "long"),
                ("openingLine", "hi"),
            ]),
            ConfigSource::Stored,
        )
        .unwrap();
        assert_eq!(config.to_json(), r#"{"custom":"$(x)","voiceId":"Craig"}"#);
        assert_eq!(
            config.field_names(),
            ["custom", "openingLine", "systemPrompt", "voiceId"]
        );
        // The limit met is one argument's, whatever the prompt's characters.
        let quotes = "\"".repeat(MAX_ARG_BYTES - "--system-prompt=".len());
        assert!(with_prompt(&quotes).is_ok());
        let err = with_prompt(&format!("{quotes}\"")).unwrap_err();
        assert!(err.to_string().contains("MAX_ARG_STRLEN"), "{err}");
    }
}
