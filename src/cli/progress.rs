//! The progress bar of a batch run, drawn on stderr from the run's metrics.
//!
//! The bar moves as images are embedded (or fail), not as epochs commit, so it never sits at
//! zero for the first epoch; committed objects are a second figure. The rate is the one the
//! final summary prints: objects done over the wall time since the run started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use verger::metrics::Metrics;

/// What the bar shows at one moment.
#[derive(Debug, PartialEq)]
pub struct Figures {
    /// Objects done: embedded, failed or vanished.
    pub done: u64,
    /// Objects released so far (grows while the listing runs).
    pub released: u64,
    /// The text after the bar.
    pub message: String,
}

/// The bar's figures from `metrics`, `elapsed` after the run started
/// ([`Metrics::run_started`]).
pub fn figures(metrics: &Metrics, elapsed: Duration) -> Figures {
    let processed = metrics.embedded.get() + metrics.failed.get();
    let rate = processed as f64 / elapsed.as_secs_f64().max(1e-3);
    Figures {
        done: processed + metrics.vanished.get(),
        released: metrics.released.get(),
        message: format!(
            "{} committed, {rate:.1} images/s, {} failed",
            metrics.committed.get(),
            metrics.failed.get()
        ),
    }
}

/// A bar redrawn from a background thread until [`Bar::finish`].
pub struct Bar {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Bar {
    /// Starts drawing.
    pub fn start(metrics: Arc<Metrics>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let finished = done.clone();
        let thread = std::thread::spawn(move || {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} embedded, {msg}",
                )
                .expect("valid template"),
            );
            while !finished.load(Ordering::Relaxed) {
                let elapsed = metrics
                    .run_started
                    .get()
                    .map_or(Duration::ZERO, Instant::elapsed);
                let f = figures(&metrics, elapsed);
                bar.set_length(f.released);
                bar.set_position(f.done);
                bar.set_message(f.message);
                std::thread::sleep(Duration::from_millis(200));
            }
            bar.finish_and_clear();
        });
        Self { done, thread }
    }

    /// Stops and clears the bar.
    pub fn finish(self) {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_counts_embedded_images_before_any_commit_at_the_run_rate() {
        let m = Metrics::new();
        m.released.inc_by(100);
        m.embedded.inc_by(38);
        m.failed.inc_by(2);
        m.vanished.inc_by(1);
        let f = figures(&m, Duration::from_secs(4));
        assert_eq!(f.done, 41);
        assert_eq!(f.released, 100);
        assert_eq!(f.message, "0 committed, 10.0 images/s, 2 failed");
        m.committed.inc_by(40);
        assert!(figures(&m, Duration::from_secs(8))
            .message
            .starts_with("40 committed, 5.0 images/s"));
    }
}
