//! Several verger processes as one timely computation (`-n` processes, `-p` this one's index,
//! `-h` hostfile), on timely's own TCP runtime: keys are exchanged over all processes x workers,
//! process 0 lists and commits, every process writes its own Parquet files.
//!
//! Timely takes a computation down when a peer's connection breaks: the network thread talking
//! to the lost peer (named `timely:recv-<process>` / `timely:send-<process>`) panics with
//! "timely communication error: ..." and poisons the queues the workers read, so they panic
//! too, and so would the main thread when it joins them (possibly aborting on a double panic).
//! [`watch_peers`] turns the first such panic into one clear message naming the process and its
//! address, and ends the process at once with exit code 2: its uncommitted epochs stay
//! uncommitted and are redone, exactly once, when every process is restarted.

use std::path::Path;
use std::sync::{Once, OnceLock};

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
                let hosts = parse_hostfile(&text);
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

/// The `host:port` lines of a hostfile, blank lines and `#` comments left out.
pub fn parse_hostfile(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Exit code of a process whose peer was lost.
pub const LOST_PEER_EXIT_CODE: i32 = 2;

/// Addresses of the processes, for the message of [`watch_peers`].
static PEERS: OnceLock<Vec<String>> = OnceLock::new();

/// From now on, a broken connection to a peer ends this process with exit code
/// [`LOST_PEER_EXIT_CODE`] and the message `lost contact with process <i> (<address>): ...`
/// (idempotent). Other panics go to the previous hook as before.
pub fn watch_peers(addresses: &[String]) {
    let _ = PEERS.set(addresses.to_vec());
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let peer = thread.name().and_then(|n| {
                n.strip_prefix("timely:recv-")
                    .or_else(|| n.strip_prefix("timely:send-"))
                    .and_then(|i| i.parse::<usize>().ok())
            });
            let Some(peer) = peer else {
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
                 redone once."
            );
            std::process::exit(LOST_PEER_EXIT_CODE);
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
