//! What the worker can tell about the Redis dataset it relies on: whether Redis may evict its
//! keys, and whether data was lost since it last looked.
//!
//! The worker reads a missing `session:<id>` as "the orchestrator ended this session" and stops
//! the agent. That is only right while the dataset is intact. Two things break it:
//! - **Eviction.** With a `maxmemory-policy` other than `noeviction`, Redis deletes keys under
//!   memory pressure, session records among them. So the worker refuses to start on such a
//!   Redis unless `redis.allow_eviction` says the operator accepts it (then it warns, and the
//!   `agent_worker_redis_evicting` gauge says so), and it re-reads the policy on every
//!   presence tick (a managed service's parameter group can change under it). The policy is
//!   read from `INFO memory`: managed services often disable `CONFIG`. A policy that cannot be
//!   read is warned about, not refused: that must not stop the fleet.
//! - **Loss.** A restart without persistence, a failover to a replica that missed writes, or
//!   eviction. The heartbeat tells lost records from deleted ones by the worker's own index
//!   (see `lua/heartbeat.lua`); a growing `evicted_keys` or a new `run_id` since the previous
//!   heartbeat also marks records that went missing as lost, not ended. Lost records of live
//!   agents are written again ([`crate::session::SessionStore::restore`]), never their agents
//!   stopped.

use crate::connection::RedisConn;

/// The policy under which Redis never deletes keys on its own.
pub const NO_EVICTION: &str = "noeviction";

/// What `INFO` said, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// `run_id`: changes with every restart of the server.
    pub run_id: Option<String>,
    /// `evicted_keys` since the server started.
    pub evicted_keys: Option<u64>,
    /// `maxmemory_policy` (`noeviction`, `allkeys-lru`, ...).
    pub maxmemory_policy: Option<String>,
}

impl Sample {
    /// Reads `INFO` (the default sections: server, memory, stats, ...) in one round trip.
    pub async fn read(conn: &RedisConn) -> redis::RedisResult<Self> {
        let text: String = redis::cmd("INFO").query_async(&mut conn.clone()).await?;
        Ok(Self::parse(&text))
    }

    /// The fields of an `INFO` reply.
    pub fn parse(text: &str) -> Self {
        let mut sample = Self::default();
        for line in text.lines() {
            let Some((name, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            match name {
                "run_id" => sample.run_id = Some(value.to_owned()),
                "evicted_keys" => sample.evicted_keys = value.parse().ok(),
                "maxmemory_policy" => sample.maxmemory_policy = Some(value.to_owned()),
                _ => {}
            }
        }
        sample
    }

    /// True when the policy is known and lets Redis delete keys.
    pub fn evicts(&self) -> bool {
        self.maxmemory_policy
            .as_deref()
            .is_some_and(|policy| policy != NO_EVICTION)
    }

    /// Why records that went missing between `earlier` and this sample may have been lost
    /// rather than deleted: `restarted` (a new `run_id`) or `evicted` (`evicted_keys` grew).
    pub fn loss_since(&self, earlier: &Sample) -> Option<&'static str> {
        if let (Some(before), Some(now)) = (&earlier.run_id, &self.run_id)
            && before != now
        {
            return Some("restarted");
        }
        match (earlier.evicted_keys, self.evicted_keys) {
            (Some(before), Some(now)) if now > before => Some("evicted"),
            _ => None,
        }
    }
}

/// The message that refuses a Redis that evicts, naming the setting and why.
pub fn eviction_refusal(policy: &str) -> String {
    format!(
        "Redis evicts keys (maxmemory-policy {policy}): under memory pressure it would delete \
         session records, and workers would take live sessions for ended ones. Set \
         maxmemory-policy {NO_EVICTION} on the server (managed services: in its parameter \
         group), or set redis.allow_eviction = true (AGENT_WORKER__REDIS__ALLOW_EVICTION=true) \
         to run anyway"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_and_what_they_mean() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n# Memory\r\n\
                    maxmemory_policy:allkeys-lru\r\n# Stats\r\nevicted_keys:3\r\n";
        let sample = Sample::parse(info);
        assert_eq!(sample.run_id.as_deref(), Some("abc"));
        assert_eq!(sample.evicted_keys, Some(3));
        assert!(sample.evicts());
        let later = Sample {
            evicted_keys: Some(5),
            ..sample.clone()
        };
        assert_eq!(later.loss_since(&sample), Some("evicted"));
        let restarted = Sample {
            run_id: Some("def".into()),
            ..sample.clone()
        };
        assert_eq!(restarted.loss_since(&sample), Some("restarted"));
        assert_eq!(sample.loss_since(&sample), None);
        assert!(
            !Sample::default().evicts(),
            "an unknown policy is not refused"
        );
    }
}
