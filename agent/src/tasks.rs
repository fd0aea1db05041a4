//! Who owns a background task, and how it stops.
//!
//! Every long-running task belongs to a [`TaskGroup`], held by whoever started it (in the agent,
//! `agent.rs`). A task watches its group's [`Stop`] signal and finishes its work when it fires
//! (the receipts writer flushes, witnessing pushes the final checkpoint); [`TaskGroup::shutdown`] fires
//! the signal and awaits every task until a deadline, then aborts what is left and says so. A
//! group that is dropped without a shutdown aborts its tasks, so no task outlives its owner.

use std::future::Future;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

/// The stop signal of a [`TaskGroup`], for its tasks.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Resolves once a stop is requested (or the group is gone).
    pub async fn requested(&mut self) {
        // An error means the sender (the group) is gone: that is a stop too.
        let _stopped = self.0.wait_for(|stop| *stop).await;
    }

    /// Whether a stop has been requested.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }
}

/// A set of named tasks with one stop signal and one owner.
#[derive(Debug)]
pub struct TaskGroup {
    name: &'static str,
    stop: watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<()>)>,
}

impl TaskGroup {
    /// An empty group; `name` labels its log lines.
    pub fn new(name: &'static str) -> TaskGroup {
        TaskGroup {
            name,
            stop: watch::Sender::new(false),
            tasks: Vec::new(),
        }
    }

    /// The signal the group's tasks watch.
    pub fn stop_signal(&self) -> Stop {
        Stop(self.stop.subscribe())
    }

    /// Spawns `task` (on the current runtime) as a member of the group.
    pub fn spawn(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.push((name.into(), tokio::spawn(task)));
    }

    /// Adds a task spawned elsewhere.
    pub fn adopt(&mut self, name: impl Into<String>, handle: JoinHandle<()>) {
        self.tasks.push((name.into(), handle));
    }

    /// Requests a stop without waiting.
    pub fn request_stop(&self) {
        self.stop.send_replace(true);
    }

    /// Requests a stop and waits for every task until `deadline`; tasks still running then are
    /// aborted. Returns the names of the tasks that did not finish in time (or panicked).
    pub async fn shutdown(mut self, deadline: Instant) -> Vec<String> {
        self.request_stop();
        let mut late = Vec::new();
        for (name, mut handle) in std::mem::take(&mut self.tasks) {
            match tokio::time::timeout_at(deadline, &mut handle).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(group = self.name, task = %name, "task failed: {e}");
                    late.push(name);
                }
                Err(_) => {
                    tracing::warn!(group = self.name, task = %name, "task did not stop in time: aborted");
                    handle.abort();
                    late.push(name);
                }
            }
        }
        late
    }
}

impl Drop for TaskGroup {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for (_, handle) in &self.tasks {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn tasks_finish_their_work_on_stop_and_laggards_are_aborted() {
        let mut group = TaskGroup::new("test");
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let mut stop = group.stop_signal();
        group.spawn("polite", async move {
            stop.requested().await;
            let _ = done_tx.send("flushed");
        });
        group.spawn("stubborn", async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let started = Instant::now();
        let late = group
            .shutdown(Instant::now() + Duration::from_millis(200))
            .await;
        assert_eq!(late, ["stubborn"]);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(done_rx.await, Ok("flushed"));
    }

    #[tokio::test]
    async fn a_dropped_group_stops_its_tasks() {
        let mut group = TaskGroup::new("test");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        group.spawn("holder", async move {
            let _tx = tx;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        drop(group);
        // The task was aborted, so its sender is gone.
        assert!(rx.await.is_err());
    }
}
