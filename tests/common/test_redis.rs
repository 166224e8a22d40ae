//! A test's own `redis-server` with a connection to it, the worker settings that point at it,
//! and reads of what it holds.

use agent_worker::connection::RedisConn;
use std::collections::HashMap;

use agent_worker::{cli::local_redis::LocalRedis, connection, settings::Settings};
use redis::AsyncCommands;

use super::TEST_AGENT;

/// A test's own Redis, with a connection to it.
pub struct TestRedis {
    /// The server (stop and restart it to simulate an outage).
    pub redis: LocalRedis,
    /// The test's own connection (never the worker's).
    pub conn: RedisConn,
}

impl TestRedis {
    /// A fresh server with persistence off.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A fresh server with extra `redis-server` arguments.
    pub async fn start_with(args: &[&str]) -> Self {
        let redis = LocalRedis::start_with(args)
            .await
            .expect("redis-server must be on PATH for the tests");
        let settings = settings(&redis.url(), &[]);
        let conn = connection::connect(&settings.redis).await.expect("connect");
        Self { redis, conn }
    }

    /// A Redis whose default user needs `password` (percent-encoded here for our own
    /// connection; `url()` stays without it).
    pub async fn start_requiring(password: &str, encoded: &str) -> Self {
        let redis = LocalRedis::start_with(&["--requirepass", password])
            .await
            .expect("redis-server must be on PATH for the tests");
        let url = redis
            .url()
            .replacen("redis://", &format!("redis://:{encoded}@"), 1);
        let conn = connection::connect(&settings(&url, &[]).redis)
            .await
            .expect("connect with the password");
        Self { redis, conn }
    }

    /// The server's URL, without credentials.
    pub fn url(&self) -> String {
        self.redis.url()
    }

    /// Settings pointing at this Redis and the test agent with `behaviour`, plus overrides.
    pub fn settings(&self, behaviour: &str, overrides: &[(&str, &str)]) -> Settings {
        let command = format!("{TEST_AGENT},--behaviour,{behaviour}");
        let mut all = vec![("AGENT_WORKER__AGENT__COMMAND", command.as_str())];
        all.extend_from_slice(overrides);
        settings(&self.url(), &all)
    }
}

/// Test settings: fast retries and timeouts; the fallback poll is effectively off so that
/// pick-up relies on wake-ups.
pub fn settings(url: &str, overrides: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = [
        ("AGENT_WORKER__REDIS__URL", url),
        ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "5s"),
        ("AGENT_WORKER__AGENT__RETRY_BACKOFF", "20ms"),
        ("AGENT_WORKER__AGENT__STOP_GRACE", "2s"),
        ("AGENT_WORKER__WORKER__POLL_INTERVAL", "1h"),
        ("AGENT_WORKER__WORKER__HEARTBEAT_INTERVAL", "1s"),
        ("AGENT_WORKER__WORKER__ORPHAN_TIMEOUT", "3s"),
        ("AGENT_WORKER__WORKER__RESTART_BACKOFF_MAX", "500ms"),
        // Every in-process worker serves HTTP too; many run at once.
        ("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in overrides {
        env.insert(k.to_string(), v.to_string());
    }
    Settings::load_from(None, env).expect("test settings are valid")
}

/// `HGET key field`.
pub async fn hget(conn: &RedisConn, key: &str, field: &str) -> Option<String> {
    conn.clone().hget(key, field).await.expect("HGET")
}

/// Asserts that the hash `key` holds each `(field, value)` of `expected`.
pub async fn assert_fields(conn: &RedisConn, key: &str, expected: &[(&str, &str)]) {
    for (field, value) in expected {
        assert_eq!(
            hget(conn, key, field).await.as_deref(),
            Some(*value),
            "{key} {field}"
        );
    }
}

/// The TTL of `key` in seconds (`-2` when it does not exist, `-1` without a TTL).
pub async fn ttl_of(conn: &RedisConn, key: &str) -> i64 {
    conn.clone().ttl(key).await.expect("TTL")
}

/// `SISMEMBER set member`.
pub async fn is_member(conn: &RedisConn, set: &str, member: &str) -> bool {
    conn.clone()
        .sismember(set, member)
        .await
        .expect("SISMEMBER")
}
