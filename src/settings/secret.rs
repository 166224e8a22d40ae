//! Values that must never reach a log line: [`Secret`] (a token) and [`RedisUrl`] (a URL that
//! may carry a password), and [`redact_url`], which hides a URL's credentials.
//!
//! Both types print redacted through `Debug` (and `RedisUrl` through `Display`), so a whole
//! [`Settings`](super::Settings) can be logged; the raw value is only reached through
//! `expose`, by the code that needs it.

use std::fmt;

use serde::Deserialize;

/// A secret setting (the console's admin token). `Debug` never shows it and there is no
/// `Display`: the raw value is only handed to the code that compares it.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// True unless empty (how `config/default.toml` says "unset").
    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// The secret itself; for comparisons only, never for output.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() {
            "Secret(***)"
        } else {
            "Secret(unset)"
        })
    }
}

/// A Redis URL. It may contain a password, so `Debug` and `Display` show it redacted; the raw
/// string is only handed to the Redis client.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its secret; for the Redis client only, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any user info (`user:password@`) replaced by `***@`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces everything between `://` and the last `@` of a URL with `***`, so credentials
/// never reach a log line, whatever characters the password holds (`/`, `#`, `?`, `@`, `%`
/// all occur in generated secrets, and a parser would stop at the first of them). A URL
/// without `://` is not shown at all: it cannot be told apart from a bare secret.
///
/// ```
/// use agent_worker::settings::redact_url;
/// assert_eq!(redact_url("redis://:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redact_url("redis://:a/b#c@cache:6379"), "redis://***@cache:6379");
/// assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "(a value that is not a URL, not shown)".to_owned();
    };
    let rest = &url[scheme_end + 3..];
    match rest.rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end + 3], &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::load::load_with_env;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:p@ss@host/1"),
            "rediss://***@host/1"
        );
        for secret in [
            "s3cr3t/PW",
            "s3cr3t#PW",
            "s3cr3t@PW",
            "s3cr3t%2FPW",
            "s3c?r3t",
        ] {
            let shown = redact_url(&format!("redis://:{secret}@127.0.0.1:6379/0"));
            assert_eq!(shown, "redis://***@127.0.0.1:6379/0", "{secret}");
        }
        assert!(!redact_url("s3cr3t").contains("s3cr3t"));
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        let url = RedisUrl::new("redis://:s3cret@h:1");
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        let err = load_with_env(&[("REDIS_URL", "http://:s3cret@h:1"), ("X", "")]).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
