//! `WatchEvents` streams, bounded: at most [`MAX_WATCHERS_PER_PEER`] per peer (the client's
//! address; every local client is one peer) and [`MAX_WATCHERS`] in all, each refused past that
//! with `RESOURCE_EXHAUSTED`. A watcher that stops reading falls behind the event channel and is
//! dropped (its stream ends with `RESOURCE_EXHAUSTED`), so nothing queues for it.

use super::{convert, pb};
use crate::model::{Event, Verdict, VerdictFilter};
use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::UNIX_EPOCH,
};
use tokio::sync::broadcast;
use tokio_stream::{wrappers::BroadcastStream, Stream, StreamExt};
use tonic::{Request, Status};

/// Most event streams open at once.
pub const MAX_WATCHERS: usize = 256;
/// Most event streams one peer may hold open.
pub const MAX_WATCHERS_PER_PEER: usize = 32;

/// The stream `WatchEvents` returns.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

/// Open event streams, in all and per peer.
#[derive(Debug, Default)]
pub struct Watchers {
    open: Mutex<(usize, HashMap<String, usize>)>,
}

/// One admitted stream; frees its place when the stream is dropped (the client went away).
#[derive(Debug)]
pub struct Slot {
    watchers: Arc<Watchers>,
    peer: String,
}

impl Watchers {
    /// Admits one more stream for `peer`, or refuses with `RESOURCE_EXHAUSTED`.
    #[allow(clippy::result_large_err)]
    pub fn admit(self: &Arc<Self>, peer: String) -> Result<Slot, Status> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| Status::internal("the watcher table is poisoned"))?;
        let (total, per_peer) = &mut *open;
        let mine = per_peer.get(&peer).copied().unwrap_or(0);
        if *total >= MAX_WATCHERS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_WATCHERS} event streams are open, the most the agent serves; close one first"
            )));
        }
        if mine >= MAX_WATCHERS_PER_PEER {
            return Err(Status::resource_exhausted(format!(
                "{peer} has {MAX_WATCHERS_PER_PEER} event streams open, the most one peer may hold; close one first"
            )));
        }
        *total += 1;
        per_peer.insert(peer.clone(), mine + 1);
        Ok(Slot {
            watchers: self.clone(),
            peer,
        })
    }

    /// Streams open now (in all).
    pub fn open(&self) -> usize {
        self.open.lock().map_or(0, |o| o.0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // A poisoned table has no count left to keep right.
        if let Ok(mut open) = self.watchers.open.lock() {
            let (total, per_peer) = &mut *open;
            *total = total.saturating_sub(1);
            if let Some(n) = per_peer.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_peer.remove(&self.peer);
                }
            }
        }
    }
}

/// Who is asking: the client's IP address (all local clients share one), or "local" where
/// the transport has none.
pub fn peer_of<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "local".to_owned(), |a| a.ip().to_string())
}

/// The actions a verdict filter may name.
pub const VERDICT_ACTIONS: [&str; 4] = ["deny", "audit", "shed", "park"];

/// What a `WatchEvents` request asks for, checked: `INVALID_ARGUMENT` names the bad field.
#[allow(clippy::result_large_err)]
pub fn request_of(req: &pb::WatchEventsRequest) -> Result<(bool, Option<VerdictFilter>), Status> {
    for (i, a) in req.actions.iter().enumerate() {
        if !VERDICT_ACTIONS.contains(&a.as_str()) {
            return Err(Status::invalid_argument(format!(
                "actions[{i}] {:?}: expected one of {}",
                crate::model::log_escape(a),
                VERDICT_ACTIONS.join(", ")
            )));
        }
    }
    let wants_filter = !req.actions.is_empty() || !req.cgroup.is_empty() || !req.rule.is_empty();
    if (wants_filter || req.only_verdicts) && !req.verdicts {
        return Err(Status::invalid_argument(
            "only_verdicts, actions, cgroup and rule filter verdicts: set verdicts = true",
        ));
    }
    let filter = req.verdicts.then(|| VerdictFilter {
        actions: req.actions.clone(),
        cgroup: (!req.cgroup.is_empty()).then(|| req.cgroup.clone()),
        rule: (!req.rule.is_empty()).then(|| req.rule.clone()),
    });
    Ok((!req.only_verdicts, filter))
}

/// The events from `events` (when given) and the verdicts from `verdicts` that pass its filter
/// (when given), merged, as a stream that holds `slot` while it lives and ends when its reader
/// falls more than a channel's capacity behind.
pub fn event_stream(
    events: Option<broadcast::Receiver<Event>>,
    verdicts: Option<(broadcast::Receiver<Verdict>, VerdictFilter)>,
    slot: Slot,
) -> EventStream {
    let lagged = |n: u64| {
        Status::resource_exhausted(format!(
            "this watcher fell {n} events behind and was dropped; reconnect and read faster"
        ))
    };
    let events = events.map(|rx| {
        BroadcastStream::new(rx).map(move |e| match e {
            Ok(e) => Some(Ok(to_pb(e))),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Err(lagged(n)))
            }
        })
    });
    let verdicts = verdicts.map(|(rx, filter)| {
        BroadcastStream::new(rx).map(move |v| match v {
            Ok(v) if filter.matches(&v) => Some(Ok(verdict_to_pb(v))),
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Err(lagged(n)))
            }
        })
    });
    type Items =
        Pin<Box<dyn Stream<Item = Option<Result<pb::WatchEventsResponse, Status>>> + Send>>;
    let merged: Items = match (events, verdicts) {
        (Some(e), Some(v)) => Box::pin(e.merge(v)),
        (Some(e), None) => Box::pin(e),
        (None, Some(v)) => Box::pin(v),
        (None, None) => Box::pin(tokio_stream::empty()),
    };
    let mut dropped = false;
    let stream = merged.filter_map(|item| item).map_while(move |item| {
        let _held = &slot;
        if dropped {
            return None;
        }
        // A lagged watcher's error ends the response (tonic sends it and stops).
        dropped = item.is_err();
        Some(item)
    });
    Box::pin(stream)
}

/// A verdict as the API sends it.
fn verdict_to_pb(v: Verdict) -> pb::WatchEventsResponse {
    pb::WatchEventsResponse {
        unix_millis: v
            .at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        event: Some(pb::watch_events_response::Event::Verdict(pb::Verdict {
            cgroup: v.cgroup,
            destination: v.destination.to_string(),
            port: v.port.into(),
            protocol: v.protocol.into(),
            action: v.action.into(),
            runtime_class: convert::class_to_proto(v.class) as i32,
            // No rule: the default action, the empty string as the proto says.
            rule: v.rule.unwrap_or_default(),
            generation: v.generation,
            hook: v.hook.into(),
            // Not in a known pod: the empty string, as the proto says.
            pod: v.pod.unwrap_or_default(),
        })),
    }
}

/// An event as the API sends it.
fn to_pb(e: Event) -> pb::WatchEventsResponse {
    let millis = |t: std::time::SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    };
    match e {
        Event::PolicySwitched {
            at,
            generation,
            digest,
            cause,
        } => pb::WatchEventsResponse {
            unix_millis: millis(at),
            event: Some(pb::watch_events_response::Event::PolicySwitched(
                pb::PolicySwitched {
                    generation,
                    digest,
                    cause: cause.into(),
                },
            )),
        },
        Event::ClassStateChanged {
            at,
            class,
            from,
            to,
        } => pb::WatchEventsResponse {
            unix_millis: millis(at),
            event: Some(pb::watch_events_response::Event::ClassStateChanged(
                pb::ClassStateChanged {
                    runtime_class: convert::class_to_proto(class) as i32,
                    from: from.as_str().into(),
                    to: to.as_str().into(),
                },
            )),
        },
        Event::Rollout {
            at,
            action,
            candidate_generation,
            candidate_digest,
            state,
            step,
            percent,
            detail,
        } => pb::WatchEventsResponse {
            unix_millis: millis(at),
            event: Some(pb::watch_events_response::Event::Rollout(
                pb::RolloutEvent {
                    action: action.into(),
                    candidate_generation,
                    candidate_digest,
                    state: state.into(),
                    step,
                    percent,
                    detail,
                },
            )),
        },
        Event::CgroupChanged {
            at,
            cgroup,
            present,
        } => pb::WatchEventsResponse {
            unix_millis: millis(at),
            event: Some(pb::watch_events_response::Event::CgroupChanged(
                pb::CgroupChanged { cgroup, present },
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_peer_and_in_total_and_freed_on_drop() {
        let w = Arc::new(Watchers::default());
        let mine: Vec<Slot> = (0..MAX_WATCHERS_PER_PEER)
            .map(|_| w.admit("10.0.0.1".into()).expect("admitted"))
            .collect();
        let e = w
            .admit("10.0.0.1".into())
            .expect_err("over the per-peer cap");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        drop(mine);
        assert_eq!(w.open(), 0);
        let all: Vec<Slot> = (0..MAX_WATCHERS)
            .map(|i| w.admit(format!("peer-{}", i % 100)).expect("admitted"))
            .collect();
        let e = w.admit("another".into()).expect_err("over the total cap");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        drop(all);
        assert_eq!(w.open(), 0);
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_dropped() {
        let (tx, rx) = broadcast::channel(4);
        let w = Arc::new(Watchers::default());
        let mut stream = event_stream(Some(rx), None, w.admit("p".into()).expect("admitted"));
        for i in 0..10 {
            tx.send(Event::CgroupChanged {
                at: std::time::SystemTime::now(),
                cgroup: format!("c{i}"),
                present: true,
            })
            .expect("send");
        }
        let first = stream.next().await.expect("an item");
        assert_eq!(
            first.expect_err("lagged").code(),
            tonic::Code::ResourceExhausted
        );
        tx.send(Event::CgroupChanged {
            at: std::time::SystemTime::now(),
            cgroup: "after".into(),
            present: true,
        })
        .expect("send");
        assert!(stream.next().await.is_none(), "the stream ends");
        drop(stream);
        assert_eq!(w.open(), 0, "its place is free");
    }
}
