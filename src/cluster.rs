//! Several verger processes as one timely computation (`-n` processes, `-p` this one's index,
//! `-h` hostfile), on timely's own TCP runtime: keys are exchanged over all processes x workers,
//! process 0 lists and commits, every process writes its own Parquet files.
//!
//! Timely takes a computation down when a peer's connection breaks: the network thread talking
//! to the lost peer panics with "timely communication error: ..." and poisons the queues the
//! workers read, so they panic too, and so would the main thread when it joins them (possibly
//! aborting on a double panic). [`network_hooks`] learns which peer each network thread talks to
//! through timely's public communication-logging hook (called on that thread with the remote
//! process's index), not from timely's private thread names; [`watch_peers`] turns the first
//! panic of such a thread into one clear message naming the process and its address, and ends the
//! process through the orderly shutdown path with exit code 2: its uncommitted epochs stay
//! uncommitted, and the next run (every process restarted) redoes them until they commit.

use std::cell::Cell;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// Where this process stands in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// This process's index, `0..addresses.len()`.
    pub process: usize,
    /// `host:port` of every process, in process order (timely's hostfile format).
    pub addresses: Vec<String>,
}

/// Why the cluster settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The hostfile could not be read.
    #[error("cannot read hostfile {path}: {reason}")]
    Hostfile {
        /// The file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// A line of the hostfile is not `host:port`.
    #[error("hostfile {path}, line {line}: {reason}")]
    BadLine {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The hostfile has fewer usable lines than processes.
    #[error("hostfile {path} lists {found} addresses, but -n is {processes}")]
    TooFewHosts {
        /// The file.
        path: String,
        /// Non-empty lines found.
        found: usize,
        /// Processes asked for.
        processes: usize,
    },
    /// `-p` is not below `-n`.
    #[error("process index {process} is out of range for {processes} processes")]
    BadIndex {
        /// `-p`.
        process: usize,
        /// `-n`.
        processes: usize,
    },
}

impl Cluster {
    /// Settings for `processes` processes, this one being `process`, addresses from the
    /// hostfile (first `processes` non-empty lines; `#` starts a comment) or, without one,
    /// `localhost:2101`, `localhost:2102`, ... as timely does. `None` for a single process.
    pub fn new(
        processes: usize,
        process: usize,
        hostfile: Option<&Path>,
    ) -> Result<Option<Self>, ClusterError> {
        if process >= processes.max(1) {
            return Err(ClusterError::BadIndex { process, processes });
        }
        if processes <= 1 {
            return Ok(None);
        }
        let addresses = match hostfile {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ClusterError::Hostfile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let hosts =
                    parse_hostfile(&text).map_err(|(line, reason)| ClusterError::BadLine {
                        path: path.display().to_string(),
                        line,
                        reason,
                    })?;
                if hosts.len() < processes {
                    return Err(ClusterError::TooFewHosts {
                        path: path.display().to_string(),
                        found: hosts.len(),
                        processes,
                    });
                }
                hosts.into_iter().take(processes).collect()
            }
            None => (0..processes)
                .map(|i| format!("localhost:{}", 2101 + i))
                .collect(),
        };
        Ok(Some(Self { process, addresses }))
    }

    /// Number of processes.
    pub fn processes(&self) -> usize {
        self.addresses.len()
    }
}

/// The `host:port` lines of a hostfile, blank lines and `#` comments left out. A line that
/// is not `host:port` (a port of 1 to 65535; an IPv6 host in brackets) is an error with its
/// 1-based line number.
pub fn parse_hostfile(text: &str) -> Result<Vec<String>, (usize, String)> {
    let mut hosts = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        check_address(entry).map_err(|reason| (number + 1, reason))?;
        hosts.push(entry.to_string());
    }
    Ok(hosts)
}

/// Whether `entry` is `host:port`.
fn check_address(entry: &str) -> Result<(), String> {
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Err(format!("`{entry}` is not host:port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("`{entry}`: `{port}` is not a port (1-65535)")),
    }
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    let plain = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !(bracketed || plain) {
        return Err(format!("`{entry}`: `{host}` is not a host name or address"));
    }
    if entry.chars().any(char::is_whitespace) {
        return Err(format!("`{entry}` holds a space"));
    }
    Ok(())
}

/// Default of `--connect-timeout`: how long the processes of a run wait for each other.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

/// Exit code of a process whose peers did not all connect in time.
pub const CONNECT_TIMEOUT_EXIT_CODE: i32 = 3;

/// Ends the process if its cluster is not connected within a timeout. Timely connects the
/// processes before it runs any worker, retrying for ever: a peer that never starts (a typo in
/// the hostfile, an instance that did not boot) would leave the others waiting silently.
#[derive(Debug)]
pub struct ConnectWatchdog {
    connected: std::sync::Arc<(Mutex<bool>, Condvar)>,
}

impl ConnectWatchdog {
    /// Starts the countdown for `cluster`: unless [`disarm`](Self::disarm)ed within
    /// `timeout`, the process prints which peers it is still waiting for and exits with
    /// [`CONNECT_TIMEOUT_EXIT_CODE`].
    pub fn arm(cluster: &Cluster, timeout: Duration) -> Self {
        let connected = std::sync::Arc::new((Mutex::new(false), Condvar::new()));
        let watched = connected.clone();
        let cluster = cluster.clone();
        std::thread::Builder::new()
            .name("verger-connect-watchdog".to_string())
            .spawn(move || {
                let deadline = Instant::now() + timeout;
                let (lock, signal) = &*watched;
                let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !*done {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        let message = missing_peers_message(&cluster, timeout);
                        tracing::error!("{message}");
                        eprintln!("verger: {message}");
                        crate::shutdown::exit(CONNECT_TIMEOUT_EXIT_CODE);
                    }
                    done = signal
                        .wait_timeout(done, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })
            .expect("start the connect watchdog");
        Self { connected }
    }

    /// The cluster is connected: stop the countdown (idempotent).
    pub fn disarm(&self) {
        let (lock, signal) = &*self.connected;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        signal.notify_all();
    }
}

/// Which peers this process is still waiting for. Timely has process `p` connect to every
/// lower-numbered process and accept connections from every higher-numbered one: a lower peer
/// whose address does not accept a TCP connection is not running; higher peers are named as
/// the ones expected to connect here.
fn missing_peers_message(cluster: &Cluster, timeout: Duration) -> String {
    let me = cluster.process;
    let mut missing = Vec::new();
    for (peer, address) in cluster.addresses.iter().enumerate() {
        if peer < me {
            let reachable = address.to_socket_addrs().ok().is_some_and(|mut addrs| {
                addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
            });
            if !reachable {
                missing.push(format!("process {peer} ({address}) is not reachable"));
            }
        } else if peer > me {
            missing.push(format!(
                "process {peer} ({address}) has not connected to this process ({})",
                cluster.addresses[me]
            ));
        }
    }
    if missing.is_empty() {
        missing.push("the handshake with the other processes did not finish".to_string());
    }
    format!(
        "process {me}: the cluster did not connect within {} (--connect-timeout): {}; start \
         every process with the same -n and hostfile",
        humantime::format_duration(timeout),
        missing.join("; ")
    )
}

/// Exit code of a process whose peer was lost.
pub const LOST_PEER_EXIT_CODE: i32 = 2;

/// Addresses of the processes, for the message of [`watch_peers`].
static PEERS: OnceLock<Vec<String>> = OnceLock::new();

thread_local! {
    /// On one of timely's network threads: the process at the other end of its connection.
    static PEER_OF_THIS_THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Timely's communication hooks for a cluster run: every network thread, as it starts, records
/// the peer it talks to (timely calls `log_fn` on that thread with the remote process's index),
/// so that [`watch_peers`] can name the peer whose connection broke. No logger is installed.
pub fn network_hooks() -> timely::communication::Hooks {
    timely::communication::Hooks {
        log_fn: Arc::new(|setup| {
            if let Some(remote) = setup.remote {
                PEER_OF_THIS_THREAD.with(|peer| peer.set(Some(remote)));
            }
            None
        }),
        ..Default::default()
    }
}

/// The peer this thread talks to, if it is a network thread set up with [`network_hooks`].
fn peer_of_this_thread() -> Option<usize> {
    PEER_OF_THIS_THREAD.with(Cell::get)
}

/// From now on, a broken connection to a peer ends this process with exit code
/// [`LOST_PEER_EXIT_CODE`] and the message `lost contact with process <i> (<address>): ...`
/// (idempotent). Other panics go to the previous hook as before.
pub fn watch_peers(addresses: &[String]) {
    let _ = PEERS.set(addresses.to_vec());
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let Some(peer) = peer_of_this_thread() else {
                return previous(info);
            };
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let address = PEERS
                .get()
                .and_then(|a| a.get(peer))
                .map_or("unknown address", String::as_str);
            tracing::error!(peer, address, "{message}");
            eprintln!(
                "verger: lost contact with process {peer} ({address}): {message}; stopping. \
                 Restart every process to resume: committed epochs are kept, the others are \
                 redone."
            );
            crate::shutdown::exit(LOST_PEER_EXIT_CODE);
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfile_lines_are_taken_in_order_without_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts.txt");
        std::fs::write(
            &path,
            "# cluster\n10.0.0.7:2101\n\n10.0.0.3:2101  # second\n[::1]:2200\n",
        )
        .unwrap();
        let c = Cluster::new(2, 1, Some(&path)).unwrap().unwrap();
        assert_eq!(c.addresses, ["10.0.0.7:2101", "10.0.0.3:2101"]);
        assert_eq!((c.process, c.processes()), (1, 2));
        let err = Cluster::new(4, 0, Some(&path)).unwrap_err();
        assert!(
            err.to_string().contains("lists 3 addresses, but -n is 4"),
            "{err}"
        );
    }

    #[test]
    fn a_line_that_is_not_host_port_is_named() {
        for bad in [
            "10.0.0.7",
            "host:0",
            "host:99999",
            ":2101",
            "a b:2101",
            "h:x",
        ] {
            let err = parse_hostfile(&format!("# c\nok:1\n{bad}\n")).unwrap_err();
            assert_eq!(err.0, 3, "{bad}: {err:?}");
        }
        assert_eq!(
            parse_hostfile("[::1]:2200\nip-10-0-0-7.ec2.internal:2101").unwrap(),
            ["[::1]:2200", "ip-10-0-0-7.ec2.internal:2101"]
        );
    }

    #[test]
    fn defaults_follow_timely_and_bad_indices_are_refused() {
        assert_eq!(Cluster::new(1, 0, None).unwrap(), None);
        let c = Cluster::new(3, 2, None).unwrap().unwrap();
        assert_eq!(
            c.addresses,
            ["localhost:2101", "localhost:2102", "localhost:2103"]
        );
        assert!(matches!(
            Cluster::new(2, 2, None),
            Err(ClusterError::BadIndex { .. })
        ));
        let missing = Cluster::new(2, 0, Some(Path::new("/nonexistent/hosts"))).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/hosts"),
            "{missing}"
        );
    }
}
