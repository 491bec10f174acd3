//! Generic timely operators verger's stages are made of, and the context every stage gets.
//!
//! Every operator here keeps its per-epoch state in one [`EpochCaps`]: the state of each
//! epoch beside the capability that still lets the operator emit at that epoch. Dropping the
//! entry releases the capability, which is how "this epoch is done here" travels downstream.
//!
//! - [`fold_epochs`]: fold an epoch's records into a state, emit when the epoch's frontier
//!   passes (may also emit early, e.g. a full batch). The sink, the commit's gathering and the
//!   embed stage's batching are folds.
//! - [`async_map`]: one future per record on the process's tokio runtime, at most `limit` in
//!   flight per worker, the operator woken through a `SyncActivator` when a result is back: the
//!   worker thread never blocks on I/O.
//! - [`paced_map`]: a CPU stage that maps a few records per scheduling, so its output (say,
//!   decoded pixels) stays in step with a slower consumer.
//!
//! A panic in a stage's function does not take the worker down or hold an epoch open: it is
//! caught, it goes to the run's [`Fatal`] slot, and from then on every operator drops what it
//! holds, so the dataflow drains within moments and the run fails with that error.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, InputCapability};
use timely::dataflow::StreamVec;
use timely::scheduling::SyncActivator;

pub use crate::error::Fatal;
use crate::error::StageError;
use crate::metrics::Metrics;
use crate::panic::panic_message;
use crate::record::Epoch;
use crate::stats::StageClock;

/// What every stage builder is given: the I/O runtime its futures run on, the run's metrics
/// and stage clock, and the fatal-error slot.
#[derive(Clone)]
pub struct StageContext {
    /// The process's tokio runtime (fetch, publish, commit, listing).
    pub runtime: tokio::runtime::Handle,
    /// Counters and gauges of the run.
    pub metrics: Arc<Metrics>,
    /// Busy time per CPU stage.
    pub clock: Arc<StageClock>,
    /// The first error that fails the run.
    pub fatal: Fatal,
}

impl StageContext {
    /// Records that `stage` panicked with `payload`.
    fn panicked(&self, stage: &str, payload: &(dyn std::any::Any + Send)) {
        self.fatal.set(StageError::Panicked {
            stage: stage.to_string(),
            message: panic_message(payload),
        });
    }
}

/// Per-epoch state `S` of one operator, each with the capability that lets the operator still
/// emit at that epoch; oldest epoch first.
pub struct EpochCaps<S> {
    held: BTreeMap<Epoch, (Capability<Epoch>, S)>,
}

impl<S> Default for EpochCaps<S> {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
        }
    }
}

impl<S> EpochCaps<S> {
    /// The epoch of `cap`, its held capability and its state (made by `init` on the epoch's
    /// first message); `None` for a message without a time.
    pub fn entry(
        &mut self,
        cap: &InputCapability<Epoch>,
        port: usize,
        init: impl FnOnce(Epoch) -> S,
    ) -> Option<(Epoch, &Capability<Epoch>, &mut S)> {
        let &t = cap.least()?;
        let (held, state) = self
            .held
            .entry(t)
            .or_insert_with(|| (cap.retain_least(port).expect("input time"), init(t)));
        Some((t, held, state))
    }

    /// The held capability and state of `epoch`.
    pub fn get_mut(&mut self, epoch: Epoch) -> Option<(&Capability<Epoch>, &mut S)> {
        self.held.get_mut(&epoch).map(|(c, s)| (&*c, s))
    }

    /// The oldest epoch held, with its capability and state.
    pub fn oldest_mut(&mut self) -> Option<(Epoch, &Capability<Epoch>, &mut S)> {
        self.held.iter_mut().next().map(|(&t, (c, s))| (t, &*c, s))
    }

    /// Takes out, oldest first, every epoch that `open` no longer says is open (the input
    /// frontier has passed it): nothing more arrives for them.
    pub fn take_passed(
        &mut self,
        open: impl Fn(&Epoch) -> bool,
    ) -> Vec<(Epoch, Capability<Epoch>, S)> {
        let mut passed = Vec::new();
        while let Some(entry) = self.held.first_entry() {
            if open(entry.key()) {
                break;
            }
            let (t, (cap, state)) = entry.remove_entry();
            passed.push((t, cap, state));
        }
        passed
    }

    /// Keeps only the epochs for which `keep` holds, releasing the others' capabilities.
    pub fn retain(&mut self, mut keep: impl FnMut(&Epoch, &mut S) -> bool) {
        self.held.retain(|t, (_, s)| keep(t, s));
    }

    /// The states of all epochs held.
    pub fn states(&self) -> impl Iterator<Item = &S> {
        self.held.values().map(|(_, s)| s)
    }

    /// Whether no epoch is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// Folds the records of each epoch into a state and emits when the epoch is complete at this
/// operator (the input frontier has passed it): `init` makes an epoch's state, `fold` adds one
/// record (and may emit at once, e.g. a full batch), `finish` turns the state into the
/// epoch's last outputs. Epochs finish oldest first; records may arrive for several open
/// epochs in any order.
pub fn fold_epochs<'s, T, S, U>(
    stream: StreamVec<'s, Epoch, T>,
    name: &str,
    mut init: impl FnMut(Epoch) -> S + 'static,
    mut fold: impl FnMut(&mut S, T, &mut Vec<U>) + 'static,
    mut finish: impl FnMut(Epoch, S, &mut Vec<U>) + 'static,
) -> StreamVec<'s, Epoch, U>
where
    T: Clone + 'static,
    S: 'static,
    U: Clone + 'static,
{
    stream.unary_frontier(Pipeline, name, move |initial, _info| {
        drop(initial);
        let mut epochs: EpochCaps<S> = EpochCaps::default();
        let mut out = Vec::new();
        move |(input, frontier), output| {
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some((_, held, state)) = epochs.entry(&cap, port, &mut init) else {
                    return;
                };
                for batch in data {
                    for record in batch.drain(..) {
                        fold(state, record, &mut out);
                    }
                }
                if !out.is_empty() {
                    output.session(held).give_iterator(out.drain(..));
                }
            });
            for (t, cap, state) in epochs.take_passed(|t| frontier.less_equal(t)) {
                finish(t, state, &mut out);
                output.session(&cap).give_iterator(out.drain(..));
            }
        }
    })
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
/// panics fails the run (its record is dropped, its epoch still completes). Each epoch's
/// capability is held until every record of it has come back, so downstream frontiers mean
/// "all done".
pub fn async_map<'s, T, U, F, Fut>(
    stream: StreamVec<'s, Epoch, T>,
    name: &str,
    ctx: &StageContext,
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
    let stage = name.to_string();
    let ctx = ctx.clone();
    stream.unary_frontier(Pipeline, name, move |initial, info| {
        drop(initial);
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        if let Some(gate) = &gate {
            let waker = scope.worker().sync_activator_for(info.address.to_vec());
            *gate.producer.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker);
        }
        let (tx, rx) = mpsc::channel::<(Epoch, Option<U>)>();
        let mut queue: VecDeque<(Epoch, T)> = VecDeque::new();
        // Per epoch: how many of its records are queued or in flight.
        let mut outstanding: EpochCaps<usize> = EpochCaps::default();
        let mut in_flight = 0usize;

        move |(input, _frontier), output| {
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some((t, _, count)) = outstanding.entry(&cap, port, |_| 0) else {
                    return;
                };
                for batch in data {
                    for record in batch.drain(..) {
                        *count += 1;
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
                if ctx.fatal.is_set() {
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
                    let (ctx, stage) = (ctx.clone(), stage.clone());
                    let task = ctx.runtime.spawn(future);
                    ctx.runtime.clone().spawn(async move {
                        let result = match task.await {
                            Ok(result) => Some(result),
                            Err(e) => {
                                match e.try_into_panic() {
                                    Ok(payload) => ctx.panicked(&stage, payload.as_ref()),
                                    Err(e) => ctx.panicked(&stage, &e.to_string()),
                                }
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
                let (cap, count) = outstanding.get_mut(t).expect("capability held for epoch");
                *count -= finished;
                output.session(cap).give_iterator(results.into_iter());
            }
            outstanding.retain(|_, count| *count > 0);
        }
    })
}

/// Applies `f` to at most `per_activation` records per scheduling, oldest epoch first, and
/// re-activates itself while records wait. Pacing a CPU stage like this keeps its output (say,
/// decoded pixels) in step with a slower consumer instead of materialising a whole epoch. With
/// a `gate`, every record used gives its permit back to the producer. A panic in `f` fails
/// the run and drops the record.
pub fn paced_map<'s, T, U, F>(
    stream: StreamVec<'s, Epoch, T>,
    name: &str,
    ctx: &StageContext,
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
    let stage = name.to_string();
    let ctx = ctx.clone();
    stream.unary_frontier(Pipeline, name, move |initial, info| {
        drop(initial);
        let activator = scope.activator_for(info.address.clone());
        let mut queues: EpochCaps<VecDeque<T>> = EpochCaps::default();
        move |(input, _frontier), output| {
            let port = output.output_index();
            input.for_each_stamp(|cap, data| {
                let Some((_, _, queue)) = queues.entry(&cap, port, |_| VecDeque::new()) else {
                    return;
                };
                for batch in data {
                    queue.extend(batch.drain(..));
                }
            });
            if ctx.fatal.is_set() {
                let dropped: usize = queues.states().map(VecDeque::len).sum();
                queues.retain(|_, _| false);
                if let Some(gate) = &gate {
                    gate.give_back(dropped);
                }
            }
            let mut budget = per_activation;
            while budget > 0 {
                let Some((_, cap, queue)) = queues.oldest_mut() else {
                    break;
                };
                let take = budget.min(queue.len());
                let mut session = output.session(cap);
                for record in queue.drain(..take) {
                    match catch_unwind(AssertUnwindSafe(|| f(record))) {
                        Ok(mapped) => session.give(mapped),
                        Err(payload) => ctx.panicked(&stage, payload.as_ref()),
                    }
                }
                drop(session);
                if let Some(gate) = &gate {
                    gate.give_back(take);
                }
                budget -= take;
                queues.retain(|_, queue| !queue.is_empty());
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
/// panic in `f` fails the run and drops the batch. A fold over each epoch.
pub fn batch_ok<'s, T, E, U, F, G>(
    stream: StreamVec<'s, Epoch, Result<T, E>>,
    name: &str,
    ctx: &StageContext,
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
    let stage = name.to_string();
    let ctx = ctx.clone();
    let run = std::rc::Rc::new(std::cell::RefCell::new(move |records: Vec<T>| -> Vec<U> {
        if ctx.fatal.is_set() {
            return Vec::new(); // the run is failing: drop the work
        }
        match catch_unwind(AssertUnwindSafe(|| f(records))) {
            Ok(mapped) => mapped,
            Err(payload) => {
                ctx.panicked(&stage, payload.as_ref());
                Vec::new()
            }
        }
    }));
    let run_full = run.clone();
    fold_epochs(
        stream,
        name,
        |_| Vec::new(),
        move |buffer: &mut Vec<T>, record, out| match record {
            Ok(r) => {
                buffer.push(r);
                if buffer.len() >= batch {
                    out.extend((run_full.borrow_mut())(std::mem::take(buffer)));
                }
            }
            Err(e) => out.push(on_err(e)),
        },
        move |_, buffer, out| {
            if !buffer.is_empty() {
                out.extend((run.borrow_mut())(buffer));
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;
    use timely::dataflow::operators::capture::{Event, Extract};
    use timely::dataflow::operators::core::UnorderedInput;
    use timely::dataflow::operators::{Capture, Exchange, ToStream};

    fn context(runtime: &tokio::runtime::Runtime) -> StageContext {
        StageContext {
            runtime: runtime.handle().clone(),
            metrics: Arc::default(),
            clock: Arc::default(),
            fatal: Fatal::default(),
        }
    }

    fn extract<T: Ord + Clone + 'static>(
        captured: Receiver<Event<Epoch, Vec<T>>>,
    ) -> Vec<(Epoch, Vec<T>)> {
        captured.extract()
    }

    /// Records of several epochs arrive interleaved and out of order, from three workers,
    /// and the epochs' frontiers pass in an order unlike the records': each epoch is folded
    /// once, over every worker's records, at its own time.
    #[test]
    fn fold_emits_each_epoch_once_at_its_time_over_every_worker() {
        let (tx, rx) = mpsc::channel();
        let tx = Arc::new(Mutex::new(tx));
        timely::execute(timely::Config::process(3), move |worker| {
            let tx = tx.lock().unwrap().clone();
            let index = worker.index() as u64;
            let (mut input, cap) = worker.dataflow::<Epoch, _, _>(|scope| {
                let ((input, cap), stream) = scope
                    .new_unordered_input::<timely::container::CapacityContainerBuilder<Vec<u64>>>();
                let gathered = stream.exchange(|_| 0);
                fold_epochs(
                    gathered,
                    "Sum",
                    |epoch| (epoch, 0u64, 0usize),
                    |(_, sum, n), x: u64, _out: &mut Vec<(Epoch, u64, usize)>| {
                        *sum += x;
                        *n += 1;
                    },
                    |_, state, out| out.push(state),
                )
                .capture_into(tx);
                (input, cap)
            });
            let caps: Vec<_> = [3u64, 1, 2].iter().map(|t| cap.delayed(t)).collect();
            drop(cap);
            // Epoch 3 first, then 1, then 2, then 1 and 3 again.
            for (c, x) in [(0, 300), (1, 100), (2, 200), (1, 10), (0, 30)] {
                input.activate().session(&caps[c]).give(x + index);
                worker.step();
            }
            // Release epoch 2 first, then 3, then 1.
            let mut caps: Vec<_> = caps.into_iter().map(Some).collect();
            for c in [2, 0, 1] {
                caps[c] = None;
                for _ in 0..5 {
                    worker.step();
                }
            }
        })
        .unwrap();
        let events = extract(rx);
        // Worker i adds i to each record: 0 + 1 + 2 = 3 per record, times the records.
        assert_eq!(
            events,
            vec![
                (1, vec![(1, 3 * 110 + 2 * 3, 6)]),
                (2, vec![(2, 3 * 200 + 3, 3)]),
                (3, vec![(3, 3 * 330 + 2 * 3, 6)]),
            ]
        );
    }

    /// A fold may emit before its epoch completes (a full batch), at the epoch's time, and
    /// still finishes the rest once the epoch is complete.
    #[test]
    fn fold_emits_early_and_finishes_the_remainder() {
        let (tx, rx) = mpsc::channel();
        let tx = Arc::new(Mutex::new(tx));
        timely::execute(timely::Config::thread(), move |worker| {
            let tx = tx.lock().unwrap().clone();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let numbers = (0u32..7).to_stream(scope);
                fold_epochs(
                    numbers,
                    "Batch",
                    |_| Vec::new(),
                    |batch: &mut Vec<u32>, x, out: &mut Vec<Vec<u32>>| {
                        batch.push(x);
                        if batch.len() == 3 {
                            out.push(std::mem::take(batch));
                        }
                    },
                    |_, rest, out| out.push(rest),
                )
                .capture_into(tx);
            });
        })
        .unwrap();
        let batches: Vec<Vec<u32>> = extract(rx).into_iter().flat_map(|(_, v)| v).collect();
        assert_eq!(batches, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    }

    /// A future that panics does not hold its epoch open: the stream completes without its
    /// record, the records started before it come through (once the run is failing, queued
    /// ones are let go, not started), and the run's fatal slot names the stage and message.
    #[test]
    fn a_panicking_future_fails_the_run_instead_of_hanging_it() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ctx = context(&runtime);
        let seen = ctx.fatal.clone();
        let started = std::time::Instant::now();
        let captured = timely::execute(timely::Config::thread(), move |worker| {
            let ctx = ctx.clone();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let numbers = (0u32..10).to_stream(scope);
                async_map(numbers, "Fetch", &ctx, 4, None, |n| async move {
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
        let mut out: Vec<u32> = extract(captured).into_iter().flat_map(|(_, v)| v).collect();
        out.sort();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // 4 in flight at most: 0..=3 started before the cursed 5 could, and come through.
        assert_eq!(out[..4], [0, 10, 20, 30], "{out:?}");
        assert!(
            out.iter()
                .all(|v| [0, 10, 20, 30, 40, 60, 70, 80, 90].contains(v)),
            "{out:?}"
        );
        let reason = seen.describe().expect("the panic is recorded");
        assert!(
            reason.contains("Fetch stage panicked") && reason.contains("object 5 is cursed"),
            "{reason}"
        );
    }

    #[test]
    fn a_panicking_batch_is_dropped_and_recorded() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let ctx = context(&runtime);
        let seen = ctx.fatal.clone();
        timely::execute(timely::Config::thread(), move |worker| {
            let ctx = ctx.clone();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let records = (0u32..8).map(Ok::<u32, u32>).to_stream(scope);
                batch_ok(
                    records,
                    "Embed",
                    &ctx,
                    4,
                    |batch| -> Vec<u32> { panic!("kernel bug on {} images", batch.len()) },
                    |e| e,
                );
            });
        })
        .unwrap();
        let reason = seen.describe().unwrap();
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
