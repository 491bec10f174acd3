//! Generic timely operators verger's stages are made of.
//!
//! [`async_map`] runs one future per record on the process's shared tokio runtime, at most
//! `limit` at a time per worker, and wakes the operator through a `SyncActivator` when a result
//! is back: the worker thread never blocks on I/O. It holds a capability for each epoch until
//! every record of that epoch has come back, so downstream frontiers mean "all done".

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use timely::scheduling::SyncActivator;

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use crate::record::Epoch;

/// A bound on records between a producer and a consumer operator of one worker: the producer
/// takes a permit for each record it starts, the consumer gives it back once it has used the
/// record, and that wakes the producer. Timely channels have no backpressure of their own, so
/// without it a fast fetch stage would pile up an epoch's compressed bytes in front of decode.
#[derive(Clone, Debug)]
pub struct Gate {
    permits: Arc<AtomicUsize>,
    producer: Arc<Mutex<Option<SyncActivator>>>,
}

impl Gate {
    /// A gate letting at most `permits` records (at least one) be between the two operators.
    pub fn new(permits: usize) -> Self {
        Self {
            permits: Arc::new(AtomicUsize::new(permits.max(1))),
            producer: Arc::default(),
        }
    }

    fn try_take(&self) -> bool {
        self.permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1))
            .is_ok()
    }

    /// Returns `n` permits and wakes the producer.
    fn give_back(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.permits.fetch_add(n, Ordering::AcqRel);
        let producer = self.producer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(activator) = producer.as_ref() {
            let _ = activator.activate();
        }
    }
}

/// Maps every record through an async function, `limit` in flight per worker, and, with a
/// `gate`, no more records started than the gate's consumer has yet to use.
pub fn async_map<'s, T, U, F, Fut>(
    stream: StreamVec<'s, Epoch, T>,
    name: &str,
    runtime: tokio::runtime::Handle,
    limit: usize,
    gate: Option<Gate>,
    f: F,
) -> StreamVec<'s, Epoch, U>
where
    T: Clone + 'static,
    U: Clone + Send + 'static,
    F: Fn(T) -> Fut + 'static,
    Fut: Future<Output = U> + Send + 'static,
{
    let scope = stream.scope();
    let limit = limit.max(1);
    stream.unary_frontier(Pipeline, name, move |initial, info| {
        drop(initial);
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        if let Some(gate) = &gate {
            let waker = scope.worker().sync_activator_for(info.address.to_vec());
            *gate.producer.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
        }
        let (tx, rx) = mpsc::channel::<(Epoch, U)>();
        let mut queue: VecDeque<(Epoch, T)> = VecDeque::new();
        // Per epoch: its capability and how many records are queued or in flight.
        let mut pending: BTreeMap<Epoch, (Capability<Epoch>, usize)> = BTreeMap::new();
        let mut in_flight = 0usize;

        move |(input, _frontier), output| {
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = pending
                    .entry(t)
                    .or_insert_with(|| (cap.retain_least(port).expect("input time"), 0));
                for batch in data {
                    for record in batch.drain(..) {
                        entry.1 += 1;
                        queue.push_back((t, record));
                    }
                }
            });
            let mut done: BTreeMap<Epoch, Vec<U>> = BTreeMap::new();
            loop {
                let mut progress = false;
                while let Ok((t, result)) = rx.try_recv() {
                    in_flight -= 1;
                    progress = true;
                    done.entry(t).or_default().push(result);
                }
                while in_flight < limit && !queue.is_empty() {
                    if gate.as_ref().is_some_and(|g| !g.try_take()) {
                        break; // the consumer gives permits back and wakes us
                    }
                    let Some((t, record)) = queue.pop_front() else {
                        break;
                    };
                    in_flight += 1;
                    progress = true;
                    let (tx, activator, future) = (tx.clone(), activator.clone(), f(record));
                    runtime.spawn(async move {
                        let result = future.await;
                        let _ = tx.send((t, result));
                        let _ = activator.activate();
                    });
                }
                if !progress {
                    break;
                }
            }
            for (t, results) in done {
                let entry = pending.get_mut(&t).expect("capability held for epoch");
                entry.1 -= results.len();
                output.session(&entry.0).give_iterator(results.into_iter());
            }
            pending.retain(|_, (_, outstanding)| *outstanding > 0);
        }
    })
}

/// Applies `f` to at most `per_activation` records per scheduling, oldest epoch first, and
/// re-activates itself while records wait. Pacing a CPU stage like this keeps its output (say,
/// decoded pixels) in step with a slower consumer instead of materialising a whole epoch. With
/// a `gate`, every record used gives its permit back to the producer.
pub fn paced_map<'s, T, U, F>(
    stream: StreamVec<'s, Epoch, T>,
    name: &str,
    per_activation: usize,
    gate: Option<Gate>,
    mut f: F,
) -> StreamVec<'s, Epoch, U>
where
    T: Clone + 'static,
    U: Clone + 'static,
    F: FnMut(T) -> U + 'static,
{
    let scope = stream.scope();
    let per_activation = per_activation.max(1);
    stream.unary_frontier(Pipeline, name, move |initial, info| {
        drop(initial);
        let activator = scope.activator_for(info.address.clone());
        let mut queues: BTreeMap<Epoch, (Capability<Epoch>, VecDeque<T>)> = BTreeMap::new();
        move |(input, _frontier), output| {
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let (_, queue) = queues.entry(t).or_insert_with(|| {
                    (cap.retain_least(port).expect("input time"), VecDeque::new())
                });
                for batch in data {
                    queue.extend(batch.drain(..));
                }
            });
            let mut budget = per_activation;
            while budget > 0 {
                let Some(mut entry) = queues.first_entry() else {
                    break;
                };
                let (cap, queue) = entry.get_mut();
                let take = budget.min(queue.len());
                let mut session = output.session(&*cap);
                for record in queue.drain(..take) {
                    session.give(f(record));
                }
                drop(session);
                if let Some(gate) = &gate {
                    gate.give_back(take);
                }
                budget -= take;
                if queue.is_empty() {
                    entry.remove();
                }
            }
            if !queues.is_empty() {
                activator.activate();
            }
        }
    })
}

/// Batches the `Ok` records of each epoch and maps whole batches with `f` (one batch of at
/// most `batch` records, as soon as one is full, and the remainder once the epoch is complete
/// at this operator); `Err` records are mapped one by one with `on_err` without waiting.
pub fn batch_ok<'s, T, E, U, F, G>(
    stream: StreamVec<'s, Epoch, Result<T, E>>,
    name: &str,
    batch: usize,
    mut f: F,
    on_err: G,
) -> StreamVec<'s, Epoch, U>
where
    T: Clone + 'static,
    E: Clone + 'static,
    U: Clone + 'static,
    F: FnMut(Vec<T>) -> Vec<U> + 'static,
    G: Fn(E) -> U + 'static,
{
    let batch = batch.max(1);
    stream.unary_frontier(Pipeline, name, move |initial, _info| {
        drop(initial);
        let mut buffers: BTreeMap<Epoch, (Capability<Epoch>, Vec<T>)> = BTreeMap::new();
        move |(input, frontier), output| {
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let (cap, buffer) = buffers
                    .entry(t)
                    .or_insert_with(|| (cap.retain_least(port).expect("input time"), Vec::new()));
                for records in data {
                    for record in records.drain(..) {
                        match record {
                            Ok(r) => buffer.push(r),
                            Err(e) => output.session(&*cap).give(on_err(e)),
                        }
                        if buffer.len() >= batch {
                            let full = std::mem::take(buffer);
                            output.session(&*cap).give_iterator(f(full).into_iter());
                        }
                    }
                }
            });
            buffers.retain(|t, (cap, buffer)| {
                if frontier.less_equal(t) {
                    return true;
                }
                if !buffer.is_empty() {
                    output
                        .session(&*cap)
                        .give_iterator(f(std::mem::take(buffer)).into_iter());
                }
                false
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::Gate;

    #[test]
    fn gate_hands_out_at_most_its_permits_until_they_come_back() {
        let gate = Gate::new(3);
        let producer = gate.clone();
        assert!((0..3).all(|_| producer.try_take()));
        assert!(!producer.try_take(), "a fourth record must wait");
        gate.give_back(2);
        assert!(producer.try_take() && producer.try_take());
        assert!(!producer.try_take());
    }
}
