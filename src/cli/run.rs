//! `verger run`: settings to a [`RunConfig`], signals, progress bar, the run, its summary and
//! exit code.
//!
//! Everything printed on stdout goes through `writeln!`, so a reader that closes the pipe
//! early ends the command quietly instead of a panic.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use verger::cluster::Cluster;
use verger::dataflow::{self, InputLimits, RunConfig, Summary};
use verger::metrics::Metrics;
use verger::sink::lease::LeaseSettings;
use verger::source::{EpochPolicy, KeyFilter, Mode};

use super::args::EngineArgs;
use super::model::load_embedder;
use super::progress;
use super::tuning::{limit_malloc_arenas, warn_oversubscription};

/// How a command ended, when it did not fail: decides the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Everything asked for was done.
    Done,
    /// The input listed nothing to process (exit code 4 unless allowed).
    Empty,
    /// A signal stopped a batch run before its end (exit code 128 + signal).
    Interrupted(i32),
}

/// How a run is operated: once or as a service, with metrics and a progress bar or not.
pub struct Service {
    /// List once, or keep polling.
    pub mode: Mode,
    /// Where to serve Prometheus metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// How long cluster processes wait for each other.
    pub connect_timeout: Duration,
    /// Whether an empty input is a success.
    pub allow_empty: bool,
    /// Whether rows of objects deleted from the input stay in the snapshot.
    pub keep_deleted: bool,
    /// A head directory to predict every row's label with.
    pub head: Option<std::path::PathBuf>,
}

impl Default for Service {
    fn default() -> Self {
        Self {
            mode: Mode::Once,
            metrics_addr: None,
            progress: false,
            connect_timeout: verger::cluster::CONNECT_TIMEOUT,
            allow_empty: false,
            keep_deleted: false,
            head: None,
        }
    }
}

/// Which stop signal arrived, if any.
struct StopSignals {
    stop: Arc<AtomicBool>,
    by_signal: Vec<(i32, Arc<AtomicBool>)>,
}

impl StopSignals {
    /// SIGINT and SIGTERM set `stop` (stop listing, finish the epochs in flight); a second
    /// one ends the process at once (exit 130), as an impatient user expects.
    fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let stop = Arc::new(AtomicBool::new(false));
        let mut by_signal = Vec::new();
        for signal in [SIGINT, SIGTERM] {
            let seen = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
            signal_hook::flag::register(signal, stop.clone())?;
            signal_hook::flag::register(signal, seen.clone())?;
            by_signal.push((signal, seen));
        }
        Ok(Self { stop, by_signal })
    }

    fn received(&self) -> Option<i32> {
        self.by_signal
            .iter()
            .find(|(_, seen)| seen.load(Ordering::Relaxed))
            .map(|(signal, _)| *signal)
    }
}

/// Runs the pipeline from `input` to `output` and prints its summary.
pub fn run_job(
    out: &mut dyn Write,
    (input, output, prefix): (&str, &str, &str),
    filter: KeyFilter,
    engine: &EngineArgs,
    cluster: Option<Cluster>,
    service: Service,
) -> Result<Ending> {
    warn_oversubscription(engine.workers);
    limit_malloc_arenas(engine.workers);
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = service.metrics_addr {
        let endpoint = verger::metrics::serve(addr, metrics.clone())?;
        eprintln!("verger: metrics on http://{}/metrics", endpoint.addr);
    }
    let head = match &service.head {
        Some(dir) => Some(Arc::new(
            verger::head::SavedHead::load(dir).context("loading the head (--head)")?,
        )),
        None => None,
    };
    let signals = StopSignals::install()?;
    let leader = cluster.as_ref().is_none_or(|c| c.process == 0);
    let config = RunConfig {
        input: input.to_string(),
        prefix: prefix.to_string(),
        output: output.to_string(),
        workers: engine.workers,
        epochs: EpochPolicy {
            epoch_keys: engine.epoch_size,
            epoch_bytes: engine.epoch_bytes,
            max_epochs_in_flight: engine.max_epochs_in_flight,
            ..EpochPolicy::default()
        },
        batch_size: engine.batch_size,
        fetch_concurrency: engine.fetch_concurrency,
        filter,
        store: engine.upload.apply(engine.store.options()),
        cluster,
        mode: service.mode,
        stop: signals.stop.clone(),
        metrics: metrics.clone(),
        limits: InputLimits {
            max_object_bytes: engine.max_object_bytes,
            max_pixels: engine.max_megapixels.saturating_mul(1_000_000),
        },
        lease: LeaseSettings {
            ttl: engine.lease_ttl,
        },
        connect_timeout: service.connect_timeout,
        head,
        orientation: engine.orientation,
        labels: engine.label_rule(),
        keep_deleted: service.keep_deleted,
        checkpoint_interval: engine.checkpoint_interval,
        deleted_file_retention: engine.deleted_file_retention,
        compaction: verger::commit::CompactionPolicy {
            files: engine.compact_files,
            target_bytes: engine.compact_target_mib << 20,
        },
    };
    let bar = (service.progress && service.mode == Mode::Once)
        .then(|| progress::Bar::start(metrics.clone()));
    let result = dataflow::run_loading(&config, || {
        load_embedder(&engine.model, &engine.backend).map_err(Into::into)
    });
    if let Some(bar) = bar {
        bar.finish();
    }
    let summary = result?;
    print_summary(out, &summary, config.workers)?;
    if let verger::label::LabelRule::Pattern(pattern) = &config.labels {
        let unlabelled = summary.labels.get("").copied().unwrap_or(0);
        if leader && unlabelled > 0 {
            let rows: u64 = summary.labels.values().sum();
            writeln!(
                out,
                "verger: {unlabelled} of {rows} rows have no label: --label-pattern {pattern} does not match their key"
            )?;
        }
    }
    if let Some(path) = &engine.report_json {
        let json = serde_json::to_vec_pretty(&summary)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    let batch = service.mode == Mode::Once;
    // A member other than process 0 that got the signal ends as interrupted: its stop reached
    // process 0, which ended the run early (process 0 alone knows whether anything was left).
    let stopped_here = !leader && signals.received().is_some();
    if batch && (summary.source.interrupted || stopped_here) {
        // Process 0 stopped by another member's signal ends as SIGTERM does: the signal
        // service managers and `docker stop` send.
        let signal = signals
            .received()
            .unwrap_or(match summary.source.stopped_by_process {
                Some(_) => signal_hook::consts::SIGTERM,
                None => signal_hook::consts::SIGINT,
            });
        let by = match summary.source.stopped_by_process {
            Some(process) => format!(" (process {process} was asked to stop)"),
            None => String::new(),
        };
        eprintln!(
            "verger: interrupted before the end of the input{by}: {} epochs committed; run the \
             same command again to finish (what is committed is skipped)",
            summary.epochs
        );
        return Ok(Ending::Interrupted(signal));
    }
    let seen = summary.source.listed - summary.source.filtered;
    if batch && leader && seen == 0 && !service.allow_empty {
        let what = if summary.source.listed == 0 {
            "lists no objects".to_string()
        } else {
            format!(
                "lists {} objects, none accepted by --include/--exclude",
                summary.source.listed
            )
        };
        eprintln!(
            "verger: warning: the input {input}{} {what}: nothing to do (pass --allow-empty if \
             that is expected)",
            match prefix {
                "" => String::new(),
                p => format!(" under --prefix {p}"),
            }
        );
        return Ok(Ending::Empty);
    }
    Ok(Ending::Done)
}

fn print_summary(out: &mut dyn Write, summary: &Summary, workers: usize) -> Result<()> {
    writeln!(
        out,
        "verger: embedded {}, errors {}, vanished {}, {:.1} images/s ({} workers, {} epochs, {} listed, {} skipped as already committed, {:.1} s)",
        summary.embedded,
        summary.errors,
        summary.vanished,
        summary.images_per_second(),
        workers,
        summary.epochs,
        summary.source.listed,
        summary.source.skipped,
        summary.seconds,
    )?;
    let shares = summary
        .stages
        .shares(summary.seconds * summary.workers as f64);
    writeln!(
        out,
        "verger: worker time: embed {:.0}%, decode {:.0}%, write {:.0}%, other/idle {:.0}%; peak RSS {}",
        shares.embed * 100.0,
        shares.decode * 100.0,
        shares.write * 100.0,
        shares.other * 100.0,
        summary
            .peak_rss_bytes
            .map_or("unknown".to_string(), |b| format!("{} MiB", b >> 20)),
    )?;
    Ok(())
}
