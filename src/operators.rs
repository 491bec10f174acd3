//! Generic timely operators verger's stages are made of.
//!
//! [`async_map`] runs one future per record on the process's shared tokio runtime, at most
//! `limit` at a time per worker, and wakes the operator through a `SyncActivator` when a result
//! is back: the worker thread never blocks on I/O. It holds a capability for each epoch until
//! every record of that epoch has come back, so downstream frontiers mean "all done".
//!
//! A panic in a stage's function (a future of [`async_map`], the closures of [`paced_map`]
//! and [`batch_ok`]) does not take the worker down or hold an epoch open forever: it is
//! caught, its message goes to the run's [`Fatal`] slot, and from then on every operator
//! drops what it holds, so the dataflow drains within moments and the run fails with that
//! message.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use timely::scheduling::SyncActivator;

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use crate::record::Epoch;

/// The first error that ends a run, shared by every stage of every worker of the process.
/// Once it is set, stages stop starting work and drop what they hold.
#[derive(Clone, Debug, Default)]
pub struct Fatal {
    set: Arc<AtomicBool>,
    reason: Arc<Mutex<Option<String>>>,
}

impl Fatal {
    /// Records `reason` unless an earlier one is recorded; returns whether this one was.
    pub fn set(&self, reason: impl Into<String>) -> bool {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(reason.into());
        self.set.store(true, Ordering::Release);
        true
    }

    /// Whether the run is failing.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".to_string())
}

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
/// `gate`, no more records started than the gate's consumer has yet to use. A future that
/// panics sets `fatal` (its record is dropped, its epoch still completes).
#[allow(clippy::too_many_arguments)]
pub fn async_map<'s, T, U, F, Fut>(
    stream: StreamVec<'s, Epoch, T>,
    name: &str,
    runtime: tokio::runtime::Handle,
    limit: usize,
    gate: Option<Gate>,
    fatal: Fatal,
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
    let stage = name.to_string();
    stream.unary_frontier(Pipeline, name, move |initial, info| {
        drop(initial);
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        if let Some(gate) = &gate {
            let waker = scope.worker().sync_activator_for(info.address.to_vec());
            *gate.producer.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
        }
        let (tx, rx) = mpsc::channel::<(Epoch, Option<U>)>();
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
            let mut done: BTreeMap<Epoch, (usize, Vec<U>)> = BTreeMap::new();
            loop {
                let mut progress = false;
                while let Ok((t, result)) = rx.try_recv() {
                    in_flight -= 1;
                    progress = true;
                    let entry = done.entry(t).or_default();
                    entry.0 += 1;
                    entry.1.extend(result);
                }
                if fatal.is_set() {
                    // The run is failing: start nothing more, let go of what waits.
                    for (t, _) in queue.drain(..) {
                        done.entry(t).or_default().0 += 1;
                    }
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
                    let (fatal, stage) = (fatal.clone(), stage.clone());
                    let task = runtime.spawn(future);
                    runtime.spawn(async move {
                        let result = match task.await {
                            Ok(result) => Some(result),
                            Err(e) => {
                                let message = match e.try_into_panic() {
                                    Ok(payload) => panic_message(payload.as_ref()),
                                    Err(e) => e.to_string(),
                                };
                                fatal.set(format!("{stage} stage panicked: {message}"));
                                None
                            }
                        };
                        let _ = tx.send((t, result));
                        let _ = activator.activate();
                    });
                }
                if !progress {
                    break;
                }
            }
            for (t, (finished, results)) in done {
                let entry = pending.get_mut(&t).expect("capability held for epoch");
                entry.1 -= finished;
                output.session(&entry.0).give_iterator(results.into_iter());
            }
            pending.retain(|_, (_, outstanding)| *outstanding > 0);
        }
    })
}

/// Applies `f` to at most `per_activation` records per scheduling, oldest epoch first, and
/// re-activates itself while records wait. Pacing a CPU stage like this keeps its output (say,
/// decoded pixels) in step with a slower consumer instead of materialising a whole epoch. With
/// a `gate`, every record used gives its permit back to the producer. A panic in `f` sets
/// `fatal` and drops the record.
pub fn paced_map<'s, T, U, F>(
    stream: StreamVec<'s, Epoch, T>,
    name: &str,
    per_activation: usize,
    gate: Option<Gate>,
    fatal: Fatal,
    mut f: F,
) -> StreamVec<'s, Epoch, U>
where
    T: Clone + 'static,
    U: Clone + 'static,
    F: FnMut(T) -> U + 'static,
{
    let scope = stream.scope();
    let per_activation = per_activation.max(1);
    let stage = name.to_string();
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
            if fatal.is_set() {
                let dropped: usize = queues.values().map(|(_, q)| q.len()).sum();
                queues.clear();
                if let Some(gate) = &gate {
                    gate.give_back(dropped);
                }
            }
            let mut budget = per_activation;
            while budget > 0 {
                let Some(mut entry) = queues.first_entry() else {
                    break;
                };
                let (cap, queue) = entry.get_mut();
                let take = budget.min(queue.len());
                let mut session = output.session(&*cap);
                for record in queue.drain(..take) {
                    match catch_unwind(AssertUnwindSafe(|| f(record))) {
                        Ok(mapped) => session.give(mapped),
                        Err(payload) => {
                            fatal.set(format!(
                                "{stage} stage panicked: {}",
                                panic_message(payload.as_ref())
                            ));
                        }
                    }
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
/// at this operator); `Err` records are mapped one by one with `on_err` without waiting. A
/// panic in `f` sets `fatal` and drops the batch.
pub fn batch_ok<'s, T, E, U, F, G>(
    stream: StreamVec<'s, Epoch, Result<T, E>>,
    name: &str,
    batch: usize,
    fatal: Fatal,
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
    let stage = name.to_string();
    let mut run = move |records: Vec<T>| -> Vec<U> {
        if fatal.is_set() {
            return Vec::new(); // the run is failing: drop the work
        }
        match catch_unwind(AssertUnwindSafe(|| f(records))) {
            Ok(mapped) => mapped,
            Err(payload) => {
                fatal.set(format!(
                    "{stage} stage panicked: {}",
                    panic_message(payload.as_ref())
                ));
                Vec::new()
            }
        }
    };
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
                            output.session(&*cap).give_iterator(run(full).into_iter());
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
                        .give_iterator(run(std::mem::take(buffer)).into_iter());
                }
                false
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use timely::dataflow::operators::{Capture, ToStream};

    /// A future that panics does not hold its epoch open: the stream completes without its
    /// record, the others come through, and the run's fatal slot names the stage and message.
    #[test]
    fn a_panicking_future_fails_the_run_instead_of_hanging_it() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let handle = runtime.handle().clone();
        let fatal = Fatal::default();
        let seen = fatal.clone();
        let started = std::time::Instant::now();
        let captured = timely::execute(timely::Config::thread(), move |worker| {
            let (handle, fatal) = (handle.clone(), fatal.clone());
            worker.dataflow::<Epoch, _, _>(|scope| {
                let numbers = (0u32..10).to_stream(scope);
                async_map(numbers, "Fetch", handle, 4, None, fatal, |n| async move {
                    assert!(n != 5, "object {n} is cursed");
                    n * 10
                })
                .capture()
            })
        })
        .unwrap()
        .join()
        .pop()
        .unwrap()
        .unwrap();
        use timely::dataflow::operators::capture::Extract;
        let mut out: Vec<u32> = captured
            .extract()
            .into_iter()
            .flat_map(|(_, v)| v)
            .collect();
        out.sort();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(!out.contains(&50) && out.len() <= 9, "{out:?}");
        let reason = seen.reason().expect("the panic is recorded");
        assert!(
            reason.contains("Fetch stage panicked") && reason.contains("object 5 is cursed"),
            "{reason}"
        );
    }

    #[test]
    fn a_panicking_batch_is_dropped_and_recorded() {
        let fatal = Fatal::default();
        let seen = fatal.clone();
        timely::execute(timely::Config::thread(), move |worker| {
            let fatal = fatal.clone();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let records = (0u32..8).map(Ok::<u32, u32>).to_stream(scope);
                batch_ok(
                    records,
                    "Embed",
                    4,
                    fatal,
                    |batch| -> Vec<u32> { panic!("kernel bug on {} images", batch.len()) },
                    |e| e,
                );
            });
        })
        .unwrap();
        let reason = seen.reason().unwrap();
        assert!(
            reason.contains("Embed stage panicked: kernel bug on 4 images"),
            "{reason}"
        );
    }

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
