//! Where a run's time and memory go: busy time per compute stage summed over workers, and the
//! process's peak resident memory. Shown in the run summary, written by `--report-json`, and
//! tabulated by `verger bench`, so a slow or unbalanced stage is visible without a profiler.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The stages that run on timely worker threads and cost CPU. Fetch and publish are async I/O
/// on the tokio runtime; a worker waiting for them shows up as idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimedStage {
    /// JPEG/PNG decode, RGB conversion, resize and labelling.
    Decode,
    /// The network's forward pass (including normalisation).
    Embed,
    /// Arrow batches, Parquet encoding and the local staging file.
    Write,
}

/// Busy nanoseconds per [`TimedStage`], shared by all workers of a process.
#[derive(Debug, Default)]
pub struct StageClock {
    nanos: [AtomicU64; 3],
}

impl StageClock {
    /// Runs `f`, adding its duration to `stage`.
    pub fn time<R>(&self, stage: TimedStage, f: impl FnOnce() -> R) -> R {
        let _timer = self.start(stage);
        f()
    }

    /// Starts timing `stage` until the returned guard is dropped (for operator bodies with
    /// early returns).
    pub fn start(&self, stage: TimedStage) -> StageTimer<'_> {
        StageTimer {
            clock: self,
            stage,
            started: Instant::now(),
        }
    }

    /// Seconds spent so far per stage.
    pub fn seconds(&self) -> StageSeconds {
        let s =
            |stage: TimedStage| self.nanos[stage as usize].load(Ordering::Relaxed) as f64 * 1e-9;
        StageSeconds {
            decode: s(TimedStage::Decode),
            embed: s(TimedStage::Embed),
            write: s(TimedStage::Write),
        }
    }
}

/// Times one stage until dropped; see [`StageClock::start`].
#[derive(Debug)]
pub struct StageTimer<'a> {
    clock: &'a StageClock,
    stage: TimedStage,
    started: Instant,
}

impl Drop for StageTimer<'_> {
    fn drop(&mut self) {
        let spent = self.started.elapsed().as_nanos() as u64;
        self.clock.nanos[self.stage as usize].fetch_add(spent, Ordering::Relaxed);
    }
}

/// Busy seconds per stage, summed over the workers of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSeconds {
    /// Decode, resize, label.
    pub decode: f64,
    /// Forward pass.
    pub embed: f64,
    /// Parquet encoding and staging.
    pub write: f64,
}

impl StageSeconds {
    /// Shares of `worker_seconds` (workers x wall time) per stage, and the rest: fetch and
    /// publish bookkeeping, timely, and time a worker had nothing to do.
    pub fn shares(&self, worker_seconds: f64) -> StageShares {
        let total = worker_seconds.max(1e-9);
        let busy = self.decode + self.embed + self.write;
        StageShares {
            decode: self.decode / total,
            embed: self.embed / total,
            write: self.write / total,
            other: (1.0 - busy / total).max(0.0),
        }
    }
}

/// Fractions of worker time per stage (they sum to 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageShares {
    /// Decode, resize, label.
    pub decode: f64,
    /// Forward pass.
    pub embed: f64,
    /// Parquet encoding and staging.
    pub write: f64,
    /// Everything else, idle included.
    pub other: f64,
}

/// Peak resident set size of this process in bytes (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_time_accumulates_where_it_was_spent() {
        let clock = StageClock::default();
        let v = clock.time(TimedStage::Embed, || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            7
        });
        assert_eq!(v, 7);
        clock.time(TimedStage::Decode, || ());
        let s = clock.seconds();
        // Lower bounds and order only: a loaded machine can stretch any span.
        assert!(s.embed >= 0.03, "the 30 ms sleep counts as embed: {s:?}");
        assert!(s.decode < s.embed && s.write == 0.0, "{s:?}");
        let shares = s.shares(0.06);
        let sum = shares.decode + shares.embed + shares.write + shares.other;
        assert!(
            (sum - 1.0).abs() < 1e-9 || shares.other == 0.0,
            "{shares:?}"
        );
        assert!(shares.embed >= 0.5, "{shares:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_rss_sees_a_large_allocation() {
        let before = peak_rss_bytes().expect("VmHWM on Linux");
        let block = vec![1u8; 96 << 20];
        // Touch every page so it is resident, and keep the optimiser from dropping it.
        let sum: u64 = block.iter().step_by(4096).map(|&b| b as u64).sum();
        assert!(sum > 0);
        let after = peak_rss_bytes().expect("VmHWM on Linux");
        assert!(after >= before.max(96 << 20), "{before} -> {after}");
        drop(block);
    }
}
