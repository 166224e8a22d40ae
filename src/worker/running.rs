//! The run step: what a built [`Worker`] starts, and the order it stops it in.

use std::sync::Arc;

use super::{
    agents::{Agents, ShutdownSteps},
    background::Background,
    listener::Listener,
    startup::{ContainmentInUse, Worker},
};
use crate::{
    agent::command::AgentCommand,
    clock,
    connection::{self, Locator, RedisConn},
    job_worker::JobWorker,
    jobs::agent_start::AgentStartJob,
    metrics,
    presence::{Presence, WorkerInfo},
    queue::QueueOps,
    settings::{RedisSettings, Settings},
    shutdown::Shutdown,
    wake::WakeHub,
};

impl Worker {
    /// Runs the worker until its shutdown: starts the agents' supervisor, the background tasks
    /// and the job worker, fetches until the first shutdown request, then drains and stops
    /// everything in the order of the module docs of [`crate::worker`], and returns.
    pub async fn run(self) {
        let Worker {
            settings,
            make_launcher,
            shutdown,
            health,
            listener,
            connected: c,
        } = self;
        metrics::agents_max(settings.agent.max_agents);
        tracing::info!(
            worker_id = %c.id,
            queue = c.keys.queue(),
            redis = %settings.redis.url,
            tls = settings.redis.tls_mode().as_str(),
            max_agents = settings.agent.max_agents,
            containment = c.containment.0.name(),
            limits = c.containment.0.enforcement().name(),
            clock_offset_ms = clock::offset_ms(),
            "worker_started"
        );
        let agents = Agents::start(&settings, make_launcher, &c);
        let presence = Presence::new(
            c.conn.clone(),
            c.id.clone(),
            WorkerInfo::of_this_process(settings.agent.max_agents),
            shutdown.graceful.clone(),
        );
        let (hub, ops) = (
            WakeHub::new(),
            QueueOps::new(c.conn.clone(), c.keys.clone()),
        );
        let background = Background::start(&settings, &c, &health, &agents, &presence, &hub, &ops);
        let steps = ShutdownSteps::watch(&agents.supervisor, &shutdown);
        let job_worker = JobWorker {
            job: Arc::new(AgentStartJob {
                supervisor: agents.supervisor.clone(),
                store: agents.store.clone(),
                command: Arc::new(agent_command(&settings, &c.conn)),
                queue: c.keys.clone(),
                conn: c.conn.clone(),
            }),
            settings: settings.clone(),
            conn: c.conn.clone(),
            worker_id: c.id.clone(),
            ops,
            hub,
            capacity: agents.capacity.clone(),
            health,
            redis_health: c.redis_health.clone(),
        };
        let running = Running {
            settings,
            shutdown,
            id: c.id,
            job_worker,
            agents,
            steps,
            background,
            presence,
            containment: c.containment,
            listener,
        };
        running.until_stopped().await;
    }
}

/// Everything a running worker started, each part owned once.
struct Running {
    settings: Settings,
    shutdown: Shutdown,
    id: String,
    job_worker: JobWorker,
    agents: Agents,
    steps: ShutdownSteps,
    background: Background,
    presence: Presence,
    containment: ContainmentInUse,
    listener: Listener,
}

impl Running {
    /// Fetches jobs until the first shutdown request, then stops in the order the agents need.
    /// The whole order is here, in one place, so that a change to it (a drain that waits for
    /// the last agent, a reconnect after a failover) is made in one function.
    async fn until_stopped(self) {
        let Running {
            settings,
            shutdown,
            id,
            job_worker,
            agents,
            steps,
            background,
            presence,
            containment,
            listener,
        } = self;
        job_worker.supervise(&shutdown.graceful).await;
        // 1. No more fetching; starts in progress make no further attempts (`steps` closed the
        //    supervisor at the request).
        drop(job_worker);
        // 2. The drain (`shutdown.drain_timeout`), 3. the stop of the rest (`agent.stop_grace`;
        //    a second request cuts it short).
        agents.drain_then_stop(&settings, &shutdown, steps).await;
        // 4. The background tasks: heartbeats went on while agents drained, or their sessions
        //    would have looked stale.
        background.stop().await;
        // 5. Deregistration.
        if let Err(error) = presence.leave().await {
            tracing::debug!(error = %error, "worker_deregistration_failed");
        }
        agents.close().await;
        drop(containment);
        tracing::info!(worker_id = %id, "worker_stopped");
        // 6. Last the HTTP listener: probes and scrapes saw the whole drain.
        listener.stop().await;
    }
}

/// How agents are launched; under Sentinel each agent also learns the current primary.
fn agent_command(settings: &Settings, conn: &RedisConn) -> AgentCommand {
    let command = AgentCommand::from_settings(&settings.agent);
    match conn.locator() {
        Locator::Endpoint => command,
        Locator::Sentinel(_) => {
            command.with_launch_env(Arc::new(sentinel_env(conn.clone(), settings.redis.clone())))
        }
    }
}

/// What an agent gets under Sentinel, computed at each launch: `REDIS_URL` names the primary
/// the worker is on at that moment (with `redis.url`'s credentials, database and scheme), and
/// `REDIS_SENTINELS` (comma-separated `host:port`) and `REDIS_SENTINEL_MASTER` let an agent
/// that can follow a failover itself do so.
fn sentinel_env(
    conn: RedisConn,
    settings: RedisSettings,
) -> impl Fn() -> Vec<(String, String)> + Send + Sync {
    move || {
        vec![
            (
                "REDIS_URL".to_owned(),
                connection::url_at(&settings, &conn.server().addr),
            ),
            ("REDIS_SENTINELS".to_owned(), settings.sentinels.join(",")),
            (
                "REDIS_SENTINEL_MASTER".to_owned(),
                settings.sentinel_master.clone(),
            ),
        ]
    }
}
