//! Waking idle workers the moment a job is pushed.
//!
//! apalis-redis only fetches again on its heartbeat (30 s by default) or on a poll interval;
//! polling fast enough for voice sessions would cost a script call per worker every few
//! milliseconds. Instead our producers `PUBLISH` on `<queue>:wake` after a push; one pub/sub
//! connection per process ([`WakeListener`]) relays that to every local worker through a
//! [`WakeHub`], and [`WakeStrategy`] turns it into a fetch. A slow fallback poll covers
//! producers that do not publish and messages lost while the pub/sub connection reconnects;
//! after a reconnect every worker is woken once, in case a push happened meanwhile.
//!
//! The listener follows the process's [`RedisConn`] through a failover: when the connection
//! moves to a new primary, the subscription is made again there ([`RedisConn::moves`],
//! [`RedisConn::client`]). A demoted primary may still relay the new primary's publishes (they
//! replicate), but one that was killed or fenced does not.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{PollSnapshot, PollStrategy};
use futures::StreamExt;
use tokio::{sync::mpsc, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::connection::RedisConn;

/// Fans wake-ups out to the workers of this process.
#[derive(Debug, Clone, Default)]
pub struct WakeHub {
    senders: Arc<Mutex<Vec<mpsc::Sender<()>>>>,
}

impl WakeHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// A strategy for one worker: woken by this hub, and at least every `fallback`.
    pub fn strategy(&self, fallback: Duration) -> WakeStrategy {
        // Capacity 1: wake-ups that arrive while one is pending coalesce into it.
        let (tx, rx) = mpsc::channel(1);
        self.senders.lock().expect("wake hub lock").push(tx);
        let mut interval = tokio::time::interval(fallback);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        WakeStrategy {
            rx,
            interval,
            recheck: None,
        }
    }

    /// Wakes every live worker; forgets workers that are gone.
    pub fn wake_all(&self) {
        self.senders
            .lock()
            .expect("wake hub lock")
            .retain(|tx| !matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(_))));
    }
}

/// After a wake-up, fetch once more this much later. apalis polls the strategy and then
/// fetches, but ignores whether the strategy fired: a wake-up that arrives while a fetch is
/// already in flight is consumed, and that fetch may have read the ready list just before the
/// push. The second look closes that gap for the price of one extra fetch per burst.
const RECHECK_AFTER: Duration = Duration::from_millis(25);

/// A [`PollStrategy`] woken by the [`WakeHub`] or the fallback interval.
#[derive(Debug)]
pub struct WakeStrategy {
    rx: mpsc::Receiver<()>,
    interval: tokio::time::Interval,
    recheck: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PollStrategy for WakeStrategy {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        // Every source is polled until it returns Pending, which registers the waker for its
        // next event; the caller fetches on any wake-up.
        let mut woken = false;
        let mut pushed = false;
        while let Poll::Ready(Some(())) = self.rx.poll_recv(cx) {
            pushed = true;
        }
        while self.interval.poll_tick(cx).is_ready() {
            woken = true;
        }
        if let Some(recheck) = self.recheck.as_mut()
            && recheck.as_mut().poll(cx).is_ready()
        {
            self.recheck = None;
            woken = true;
        }
        if pushed {
            let mut recheck = Box::pin(tokio::time::sleep(RECHECK_AFTER));
            // Registers the waker for the second look.
            let _ = recheck.as_mut().poll(cx);
            self.recheck = Some(recheck);
            woken = true;
        }
        if woken {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// The process's pub/sub connection: relays messages on `channel` to `hub`, reconnecting with
/// back-off, and again on the primary whenever `conn` moves; after each (re)connect every
/// worker is woken once.
pub struct WakeListener {
    conn: RedisConn,
    channel: String,
    hub: WakeHub,
}

impl WakeListener {
    /// A listener on `channel` (the queue's wake channel) through its own connection to the
    /// primary `conn` is on, relaying to `hub`.
    pub fn new(conn: RedisConn, channel: String, hub: WakeHub) -> Self {
        Self { conn, channel, hub }
    }

    /// Relays until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { conn, channel, hub } = self;
        let mut moves = conn.moves();
        let mut delay = Duration::from_millis(100);
        let mut failing = false;
        loop {
            moves.mark_unchanged();
            let client = conn.client();
            let session = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = session => result,
            };
            match pubsub {
                Ok(mut pubsub) => {
                    if failing {
                        tracing::info!(channel = %channel, "wake_listener_reconnected");
                    }
                    delay = Duration::from_millis(100);
                    // Anything pushed while we were not subscribed has no message coming.
                    hub.wake_all();
                    let mut messages = pubsub.on_message();
                    let moved = loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = moves.changed() => break true,
                            message = messages.next() => match message {
                                Some(_) => hub.wake_all(),
                                None => break false,
                            },
                        }
                    };
                    if moved {
                        // Subscribe on the new primary at once, no back-off.
                        tracing::info!(channel = %channel, "wake_listener_moved");
                        continue;
                    }
                    tracing::warn!(channel = %channel, "wake_listener_disconnected");
                    failing = true;
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(channel = %channel, error = %error, "wake_listener_disconnected");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}
