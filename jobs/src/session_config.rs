//! Writing `session:<id>:config` the way the orchestrator does (contract §1).
//!
//! The worker only reads this hash (and writes a default one when it is missing); producers
//! that also own session configuration, like `agent-worker enqueue --voice-id ...` or a Rust
//! orchestrator, write it with [`write_session_config`].

use std::{
    sync::LazyLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{Script, aio::ConnectionLike};

use crate::{SessionId, SessionKeys};

static WRITE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/write_session_config.lua")));

/// Field names of the config hash.
pub mod fields {
    /// TTS voice of the session.
    pub const VOICE_ID: &str = "voiceId";
    /// Who started the session (informational).
    pub const USER_NAME: &str = "userName";
    /// Unix seconds, as a decimal string.
    pub const UPDATED_AT: &str = "updatedAt";
    /// Optional first sentence of the agent.
    pub const OPENING_LINE: &str = "openingLine";
    /// Optional system prompt; may be several KB.
    pub const SYSTEM_PROMPT: &str = "systemPrompt";
}

/// A session's configuration as a producer writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfigInput {
    /// The TTS voice, e.g. `Craig`.
    pub voice_id: String,
    /// Who started the session.
    pub user_name: String,
    /// Optional opening line.
    pub opening_line: Option<String>,
    /// Optional system prompt.
    pub system_prompt: Option<String>,
}

impl SessionConfigInput {
    /// The hash fields, in a stable order, with `updatedAt` set to `updated_at`.
    pub fn to_fields(&self, updated_at: SystemTime) -> Vec<(&'static str, String)> {
        let secs = updated_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut out = vec![
            (fields::VOICE_ID, self.voice_id.clone()),
            (fields::USER_NAME, self.user_name.clone()),
            (fields::UPDATED_AT, secs.to_string()),
        ];
        if let Some(line) = &self.opening_line {
            out.push((fields::OPENING_LINE, line.clone()));
        }
        if let Some(prompt) = &self.system_prompt {
            out.push((fields::SYSTEM_PROMPT, prompt.clone()));
        }
        out
    }
}

/// Replaces `session:<id>:config` with `config` and sets its TTL, atomically.
pub async fn write_session_config<C: ConnectionLike + Send>(
    conn: &mut C,
    id: &SessionId,
    config: &SessionConfigInput,
    ttl: Duration,
) -> redis::RedisResult<()> {
    let mut invocation = WRITE.prepare_invoke();
    invocation
        .key(SessionKeys::new(id).config())
        .arg(ttl.as_secs().max(1));
    for (field, value) in config.to_fields(SystemTime::now()) {
        invocation.arg(field).arg(value);
    }
    invocation.invoke_async::<i64>(conn).await?;
    Ok(())
}
