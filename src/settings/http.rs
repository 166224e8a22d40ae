//! `[http]`: the listener of the metrics, health endpoints and console, and the console's
//! admin token.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Secret, SettingsError, empty_as_none, invalid};

/// Shortest admin token accepted: anything shorter can be guessed by a script over a
/// port-forward.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Listen address of the metrics and health endpoints and of the console.
    pub addr: std::net::SocketAddr,
    /// The console's write actions' token, given inline (prefer
    /// [`HttpSettings::admin_token_file`]); empty: unset. Only prints redacted.
    pub admin_token: Secret,
    /// File holding the console's admin token (a mounted secret); empty: unset.
    #[serde(deserialize_with = "empty_as_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Show the values of `systemPrompt` and `openingLine` on the console's session page
    /// (they may hold customer data; off by default: only field names are shown).
    pub console_show_config: bool,
}

impl HttpSettings {
    /// Checks the section's values: the admin token is read (from its file) and checked.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.admin_token().map(drop)
    }

    /// The console's admin token: from `http.admin_token_file` (read now, surrounding
    /// whitespace and the trailing newline of a mounted secret trimmed) or `http.admin_token`;
    /// `None` when neither is set, which leaves the console without any write route. Errors
    /// name the key and never quote the token.
    pub fn admin_token(&self) -> Result<Option<Secret>, SettingsError> {
        let (key, token) = match (&self.admin_token_file, self.admin_token.is_set()) {
            (Some(_), true) => {
                return Err(invalid(
                    "http.admin_token",
                    "is set together with http.admin_token_file; set only one of them",
                ));
            }
            (Some(path), false) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "http.admin_token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                ("http.admin_token_file", Secret::new(text.trim()))
            }
            (None, true) => (
                "http.admin_token",
                Secret::new(self.admin_token.expose().trim()),
            ),
            (None, false) => return Ok(None),
        };
        let len = token.expose().chars().count();
        if len < MIN_ADMIN_TOKEN_LEN {
            return Err(invalid(
                key,
                format!(
                    "the token has {len} characters; use at least {MIN_ADMIN_TOKEN_LEN} \
                     (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        if token.expose().chars().any(|c| c.is_control() || c == ' ') {
            return Err(invalid(
                key,
                "the token holds spaces or control characters (it travels in an HTTP header)",
            ));
        }
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use crate::settings::load::load_with_env;

    #[test]
    fn the_admin_token_comes_from_a_file_or_the_environment_and_never_prints() {
        let token = "t0ken-with-enough-characters";
        let none = load_with_env(&[]).unwrap();
        assert!(none.http.admin_token().unwrap().is_none());
        assert!(!none.http.console_show_config);

        let inline = load_with_env(&[("AGENT_WORKER__HTTP__ADMIN_TOKEN", token)]).unwrap();
        assert_eq!(inline.http.admin_token().unwrap().unwrap().expose(), token);
        assert!(!format!("{inline:?}").contains(token));

        let file = std::env::temp_dir().join(format!("admin-token-{}", ulid::Ulid::generate()));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let path = file.display().to_string();
        let from_file =
            load_with_env(&[("AGENT_WORKER__HTTP__ADMIN_TOKEN_FILE", path.as_str())]).unwrap();
        let secret = from_file.http.admin_token().unwrap().unwrap();
        assert_eq!(secret.expose(), token);
        assert!(!format!("{from_file:?} {secret:?}").contains(token));

        for (pairs, key) in [
            (
                vec![("AGENT_WORKER__HTTP__ADMIN_TOKEN", "short")],
                "http.admin_token",
            ),
            (
                vec![("AGENT_WORKER__HTTP__ADMIN_TOKEN_FILE", "/nonexistent/token")],
                "http.admin_token_file",
            ),
            (
                vec![
                    ("AGENT_WORKER__HTTP__ADMIN_TOKEN_FILE", path.as_str()),
                    ("AGENT_WORKER__HTTP__ADMIN_TOKEN", token),
                ],
                "http.admin_token",
            ),
        ] {
            let err = load_with_env(&pairs).unwrap_err().to_string();
            assert!(err.contains(key), "{pairs:?}: {err}");
            assert!(!err.contains(token) && !err.contains("short"), "{err}");
        }
        let _ = std::fs::remove_file(&file);
    }
}
