//! Redis's own count of the commands it ran (`INFO commandstats`), for tests and the bench
//! that check what an operation cost. Shared with `benches/agent_start/harness.rs` by path,
//! so it uses nothing else of `tests/common`.

use std::collections::HashMap;

use agent_worker::connection::RedisConn;

/// Calls per command so far (lower-case names, subcommands as `config|resetstat`), commands
/// run inside scripts included.
pub async fn command_calls(conn: &RedisConn) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn.clone())
        .await
        .expect("INFO commandstats");
    parse_commandstats(&info)
}

/// Calls of one command so far (lower-case name), 0 if Redis has not run it; as
/// [`command_calls`].
pub async fn command_count(conn: &RedisConn, command: &str) -> u64 {
    command_calls(conn).await.get(command).copied().unwrap_or(0)
}

/// The calls of each `cmdstat_<name>:calls=N,...` line of an `INFO commandstats` reply.
pub fn parse_commandstats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.trim().parse().ok()?))
        })
        .collect()
}
