//! The `verger` binary as a child process: start it, read its stderr as it runs, scrape its
//! metrics endpoint, signal it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `verger` with its stderr collected line by line.
pub struct Verger {
    /// The process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stderr line so far.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// The thread reading stderr: joined once the process has exited, so that [`Verger::wait`]
    /// returns only when every line is in `stderr`.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Verger {
    /// Starts `verger ARGS` with the test weights; stdout is kept for [`Verger::wait`].
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Verger {
        let mut child = Command::new(env!("CARGO_BIN_EXE_verger"))
            .env("VERGER_WEIGHTS", super::weights())
            .env("VERGER_LOG", "info")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start verger");
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr: Arc<Mutex<Vec<String>>> = Arc::default();
        let all = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                all.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Verger {
            child,
            lines,
            stderr,
            reader: Some(reader),
        }
    }

    /// Waits (at most `timeout`) for a stderr line containing `needle`, and returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no stderr line with {needle:?} within {timeout:?}:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                ),
            }
        }
    }

    /// The metrics address printed at start (`--metrics-addr 127.0.0.1:0`).
    pub fn metrics_addr(&self) -> String {
        let line = self.wait_for_line("metrics on http://", Duration::from_secs(60));
        let rest = line.split("http://").nth(1).unwrap();
        rest.trim_end_matches("/metrics").to_string()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits at most `timeout` for the exit; returns the status and stdout.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The pipe closes when the process (and any child holding it) is gone.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                let mut out = String::new();
                self.child
                    .stdout
                    .take()
                    .unwrap()
                    .read_to_string(&mut out)
                    .unwrap();
                return (status, out);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "verger did not exit within {timeout:?}:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One scrape of a metrics endpoint: `name` or `name{labels}` to value.
pub fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The `label="..."` values of `verger_label_rows`, by label.
pub fn label_rows(metrics: &BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    metrics
        .iter()
        .filter_map(|(k, v)| {
            let label = k
                .strip_prefix("verger_label_rows{label=\"")?
                .strip_suffix("\"}")?;
            (*v > 0.0).then(|| (label.to_string(), *v as u64))
        })
        .collect()
}

/// Polls `check` every 200 ms until it returns `Some`, at most `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = check() {
            return t;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
