//! [`Capacity`]: a replica takes an agent-start job only when it has room for one more agent.
//!
//! A voice agent is heavy, so a replica runs at most `agent.max_agents`. The gate is a tower
//! layer in front of the job handler: apalis asks the service whether it is ready *before* it
//! fetches, so a replica at capacity fetches nothing and the jobs stay in the queue for replicas
//! with room. It resumes as soon as one of its agents exits (the supervisor wakes it).
//!
//! What counts against the limit: agents running, plus starts in progress counted as the larger
//! of jobs being handled and launches under way. A job normally has one launch; a launch whose
//! job was dropped (the job worker died on a Redis error) still counts, and a job that has not
//! reached its launch yet (reading the config) counts too. An agent that just became ready is
//! counted twice until its job completes a moment later, which errs on the side of not
//! over-committing. A fetched job
//! must be startable at once, so the worker fetches one job per round trip when this gate is
//! on (see `worker.batch_size`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use futures::task::AtomicWaker;
use tower::{Layer, Service};

/// Room for agents on this replica. Shared by the supervisor (agents) and the layer (jobs).
#[derive(Debug)]
pub struct Capacity {
    max: usize,
    jobs: AtomicUsize,
    launches: AtomicUsize,
    agents: AtomicUsize,
    waker: AtomicWaker,
}

impl Capacity {
    /// Room for `max` agents.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            jobs: AtomicUsize::new(0),
            launches: AtomicUsize::new(0),
            agents: AtomicUsize::new(0),
            waker: AtomicWaker::new(),
        })
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Agents running now.
    pub fn agents(&self) -> usize {
        self.agents.load(Ordering::SeqCst)
    }

    /// Starts in progress: the larger of jobs being handled and launches under way.
    pub fn starting(&self) -> usize {
        self.jobs
            .load(Ordering::SeqCst)
            .max(self.launches.load(Ordering::SeqCst))
    }

    /// A launch began.
    pub fn launch_started(&self) {
        self.launches.fetch_add(1, Ordering::SeqCst);
    }

    /// A launch ended (its agent is ready, or it failed).
    pub fn launch_ended(&self) {
        self.launches.fetch_sub(1, Ordering::SeqCst);
        self.waker.wake();
    }

    /// An agent became ready.
    pub fn agent_started(&self) {
        self.agents.fetch_add(1, Ordering::SeqCst);
    }

    /// An agent exited: there may be room again.
    pub fn agent_exited(&self) {
        self.agents.fetch_sub(1, Ordering::SeqCst);
        self.waker.wake();
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Register before checking, so an exit between the check and the registration still
        // wakes us.
        self.waker.register(cx.waker());
        if self.starting() + self.agents.load(Ordering::SeqCst) < self.max {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The tower layer gating the job handler on [`Capacity`].
#[derive(Debug, Clone)]
pub struct CapacityLayer {
    capacity: Arc<Capacity>,
}

impl CapacityLayer {
    /// A layer over `capacity`.
    pub fn new(capacity: Arc<Capacity>) -> Self {
        Self { capacity }
    }
}

impl<S> Layer<S> for CapacityLayer {
    type Service = CapacityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CapacityService {
            inner,
            capacity: self.capacity.clone(),
        }
    }
}

/// See [`CapacityLayer`].
#[derive(Debug, Clone)]
pub struct CapacityService<S> {
    inner: S,
    capacity: Arc<Capacity>,
}

impl<S, Request> Service<Request> for CapacityService<S>
where
    S: Service<Request>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.capacity.poll_room(cx).is_pending() {
            return Poll::Pending;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let guard = JobGuard::new(self.capacity.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let _guard = guard;
            future.await
        })
    }
}

/// Counts a job from `call` until its future completes or is dropped.
struct JobGuard(Arc<Capacity>);

impl JobGuard {
    fn new(capacity: Arc<Capacity>) -> Self {
        capacity.jobs.fetch_add(1, Ordering::SeqCst);
        Self(capacity)
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.0.jobs.fetch_sub(1, Ordering::SeqCst);
        self.0.waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    #[test]
    fn room_counts_jobs_and_agents() {
        let capacity = Capacity::new(2);
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(capacity.poll_room(&mut cx).is_ready());
        let job = JobGuard::new(capacity.clone());
        capacity.agent_started();
        assert!(capacity.poll_room(&mut cx).is_pending());
        drop(job);
        assert!(capacity.poll_room(&mut cx).is_ready());
        capacity.agent_started();
        assert!(capacity.poll_room(&mut cx).is_pending());
        capacity.agent_exited();
        assert!(capacity.poll_room(&mut cx).is_ready());
        // A launch whose job is gone still takes room.
        capacity.launch_started();
        assert!(capacity.poll_room(&mut cx).is_pending());
        capacity.launch_ended();
        assert!(capacity.poll_room(&mut cx).is_ready());
    }
}
