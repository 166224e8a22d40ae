//! How values read on the console's pages: durations, ages, times, long texts cut short, and
//! values for a query string. Plain text in, plain text out: escaping is the templates' job
//! ([`super::layout`]).

/// A duration in seconds as `42 s`, `3 m 20 s`, `2 h 5 m`, `3 d 4 h`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} m {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} m", s / 3600, (s % 3600) / 60),
        s => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// How long ago unix time `then` was at `now`: `12 s ago`; `-` when unknown.
pub fn ago(then: Option<u64>, now: u64) -> String {
    match then {
        Some(then) if then <= now => format!("{} ago", duration(now - then)),
        Some(_) => "in the future (clock skew)".into(),
        None => "-".into(),
    }
}

/// Unix seconds as an RFC 3339 UTC time; `-` when unknown.
pub fn time(unix: Option<u64>) -> String {
    unix.and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

/// At most `max` characters of `text`, with `…` when cut (log lines can be 64 KiB).
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// `text` percent-encoded for a query string value (a worker id in a link).
pub fn query_value(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatters() {
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(200), "3 m 20 s");
        assert_eq!(duration(7500), "2 h 5 m");
        assert_eq!(ago(Some(90), 100), "10 s ago");
        assert_eq!(ago(None, 100), "-");
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(truncate("ab", 3), "ab");
        assert_eq!(query_value("a b&c=<d>"), "a+b%26c%3D%3Cd%3E");
    }
}
