//! Redis Sentinel: finding the current primary, and hearing at once when it changes.
//!
//! With `redis.sentinels` set, no address of a data node is configured: every connection the
//! worker makes (its [`super::RedisConn`], again on every move; the wake-up subscriber; each
//! CLI command) first asks the sentinels, in the configured order, `SENTINEL
//! get-master-addr-by-name <redis.sentinel_master>`, and the first answer wins. `redis.url`
//! still gives the data nodes' credentials, database and TLS; its host and port are not used.
//!
//! The worker also subscribes to `+switch-master` on one sentinel at a time
//! ([`super::RedisConn::follow_announcements`]), so it moves when the sentinels announce a
//! failover, not only on the next error. redis-rs's own Sentinel client resolves the primary once (its issue #1438:
//! it ignores `+switch-master`), and apalis-redis's Sentinel example builds one manager from
//! that one answer, which after a failover reconnects to the old address: hence this module.

use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError};

use crate::settings::{RedisSettings, Secret};

/// The sentinels and the name of the primary they watch.
#[derive(Debug, Clone)]
pub struct Sentinels {
    /// `host:port` of each sentinel, asked in this order.
    pub addrs: Vec<(String, u16)>,
    /// The monitored primary's name (`sentinel monitor <name> ...`).
    pub master: String,
    /// Password of the sentinels themselves (`requirepass` in their config), if any.
    pub password: Option<Secret>,
}

impl Sentinels {
    /// A client for the sentinel at `host:port` (same TLS settings as the data nodes).
    pub(crate) fn client(
        &self,
        settings: &RedisSettings,
        host: &str,
        port: u16,
    ) -> redis::RedisResult<Client> {
        super::client_at(settings, host, port, |info| match &self.password {
            Some(password) => info.set_password(password.expose()),
            None => info,
        })
    }

    /// Asks the sentinels in turn for the primary's address; the first that knows wins.
    pub async fn primary(&self, settings: &RedisSettings) -> redis::RedisResult<(String, u16)> {
        let mut last = None;
        for (host, port) in &self.addrs {
            match self.ask(settings, host, *port).await {
                Ok(Some(addr)) => return Ok(addr),
                Ok(None) => {
                    last = Some(RedisError::from((
                        ErrorKind::MasterNameNotFoundBySentinel,
                        "sentinel does not know the primary",
                        format!("{host}:{port} knows no primary named {:?}", self.master),
                    )))
                }
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((ErrorKind::EmptySentinelList, "redis.sentinels is empty"))
        }))
    }

    async fn ask(
        &self,
        settings: &RedisSettings,
        host: &str,
        port: u16,
    ) -> redis::RedisResult<Option<(String, u16)>> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(settings.connection_timeout))
            .set_response_timeout(Some(settings.response_timeout));
        let mut conn = self
            .client(settings, host, port)?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut conn)
            .await
    }
}
