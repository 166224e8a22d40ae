//! What a session's page may show of its prompts: the values of [`PRIVATE_FIELDS`] are shown
//! as a size only, and inside any other text (a log line of an agent that prints its
//! arguments, a stored error) the value, raw or JSON-escaped, is replaced by a marker, unless
//! `http.console_show_config`. A defence in depth, not a filter of everything: an agent
//! printing part of its prompt is not caught.

use super::format::truncate;
use crate::inspect::session::SessionDetail;

/// Config fields whose values may hold customer data: shown as a size only, and masked in
/// every text of the session page, unless `http.console_show_config`.
pub const PRIVATE_FIELDS: [&str; 2] = ["systemPrompt", "openingLine"];

/// Characters of one log line or stored value shown (lines can be 64 KiB).
pub const MAX_SHOWN_CHARS: usize = 2000;

/// Shorter values are not masked inside texts (a two-letter opening line would blank out
/// every log line containing those letters, and hides nothing).
const MIN_MASKED_CHARS: usize = 6;

/// The masking of one session's page.
#[derive(Debug)]
pub struct Mask {
    show: bool,
    /// Text to hide and its marker, longest first.
    secrets: Vec<(String, String)>,
}

impl Mask {
    /// The mask of `detail`'s private values; with `show`, nothing is hidden.
    pub fn of(detail: &SessionDetail, show: bool) -> Self {
        let mut secrets = Vec::new();
        if !show {
            for (name, value) in detail.config.iter().chain(&detail.record) {
                if PRIVATE_FIELDS.contains(&name.as_str())
                    && value.chars().count() >= MIN_MASKED_CHARS
                {
                    let marker = format!("[{name} hidden]");
                    let json = serde_json::to_string(value).unwrap_or_default();
                    let json = json.trim_matches('"').to_owned();
                    if json != *value {
                        secrets.push((json, marker.clone()));
                    }
                    secrets.push((value.clone(), marker));
                }
            }
            // Longest first, so a value containing another is replaced whole.
            secrets.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        }
        Self { show, secrets }
    }

    /// A stored field's value as shown.
    pub fn value(&self, name: &str, value: &str) -> String {
        if !self.show && PRIVATE_FIELDS.contains(&name) {
            return format!("(hidden, {} bytes)", value.len());
        }
        truncate(&self.text(value), MAX_SHOWN_CHARS)
    }

    /// Any other text as shown.
    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (secret, marker) in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), marker);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_masked_in_texts_raw_and_json_escaped() {
        let prompt = "say \"hi\" to <everyone>";
        let detail = SessionDetail {
            config: vec![
                ("systemPrompt".into(), prompt.into()),
                ("openingLine".into(), "Hi".into()),
            ],
            ..SessionDetail::default()
        };
        let mask = Mask::of(&detail, false);
        let json = serde_json::to_string(prompt).unwrap();
        assert_eq!(
            mask.text(&format!("argv --system-prompt={prompt} and {json}")),
            "argv --system-prompt=[systemPrompt hidden] and \"[systemPrompt hidden]\""
        );
        assert_eq!(mask.value("systemPrompt", prompt), "(hidden, 22 bytes)");
        // Too short to mask inside texts (it would blank out ordinary words), hidden as a field.
        assert_eq!(mask.text("Hi there"), "Hi there");
        assert_eq!(mask.value("openingLine", "Hi"), "(hidden, 2 bytes)");
        let shown = Mask::of(&detail, true);
        assert_eq!(shown.value("systemPrompt", prompt), prompt);
    }
}
