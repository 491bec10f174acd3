//! The cluster launcher `deploy/launch.py`: its Python unit tests, and its `--dry-run` (of the
//! default `start` command and of `status`) as a user runs it. Needs `python3` (3.8+, standard
//! library only); a missing one fails, never skips.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `python3 args...` in the project root, without leaving `__pycache__` behind.
fn python3(args: &[&str]) -> Output {
    Command::new("python3")
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3, which the deploy tests need (CI installs it): {e}")
        })
}

/// Asserts `out` is a success, showing its status, stdout and stderr otherwise; returns stdout.
fn succeeded(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn launcher_unit_tests_pass() {
    let out = python3(&[
        "-m",
        "unittest",
        "discover",
        "-s",
        "deploy",
        "-p",
        "test_*.py",
    ]);
    succeeded("python3 -m unittest discover -s deploy", &out);
}

#[test]
fn dry_run_shows_the_hostfile_and_one_process_per_machine() {
    let out = python3(&[
        "deploy/launch.py",
        "--ips",
        "10.0.0.1,10.0.0.2",
        "--dry-run",
        "--",
        "run",
        "--input",
        "s3://b/in",
        "--output",
        "s3://b/out",
        "-w",
        "2",
    ]);
    let stdout = succeeded("launch.py --dry-run", &out);
    assert!(
        stdout.contains("\n10.0.0.1:2101\n10.0.0.2:2101\n"),
        "{stdout}"
    );
    for process in 0..2 {
        let flags = format!("-w 2 -n 2 -p {process} -H /etc/verger/hosts.txt");
        assert!(stdout.contains(flags.as_str()), "no `{flags}` in\n{stdout}");
    }
    assert!(
        stdout.contains("ec2-user@10.0.0.2:/tmp/verger-hosts.txt"),
        "{stdout}"
    );
}

#[test]
fn status_dry_run_checks_every_machine_and_runs_nothing() {
    let out = python3(&[
        "deploy/launch.py",
        "status",
        "--ips",
        "10.0.0.1,10.0.0.2",
        "--dry-run",
    ]);
    let stdout = succeeded("launch.py status --dry-run", &out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, host) in lines.iter().zip(["10.0.0.1", "10.0.0.2"]) {
        assert!(line.starts_with("ssh "), "{stdout}");
        assert!(line.contains(&format!("ec2-user@{host} ")), "{stdout}");
        assert!(line.contains("docker inspect"), "{stdout}");
    }
}

/// The image ships the binary without its debug info (the release build keeps it for
/// profiling: about ten times the size), and the debug info stays available to gdb and perf
/// through the stripped binary's debug link. The Dockerfile runs this script.
#[test]
fn the_image_binary_is_stripped_and_names_its_debug_file() {
    let dir = tempfile::tempdir().unwrap();
    let (stripped, debug) = (
        dir.path().join("bin/verger"),
        dir.path().join("debug/verger.debug"),
    );
    let built = Path::new(env!("CARGO_BIN_EXE_verger"));
    let out = Command::new("sh")
        .arg("deploy/split-debuginfo.sh")
        .args([built, &stripped, &debug])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .unwrap();
    succeeded("deploy/split-debuginfo.sh", &out);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&stripped) * 4 < size(built),
        "stripped {} bytes, built {} bytes",
        size(&stripped),
        size(built)
    );
    assert!(size(&debug) > size(&stripped), "the debug info is kept");
    let version = Command::new(&stripped).arg("--version").output().unwrap();
    assert!(succeeded("stripped verger --version", &version).starts_with("verger "));
    let link = Command::new("readelf")
        .args(["--string-dump=.gnu_debuglink"])
        .arg(&stripped)
        .output()
        .unwrap();
    assert!(succeeded("readelf", &link).contains("verger.debug"));
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    assert!(
        dockerfile
            .contains("deploy/split-debuginfo.sh target/release/verger /usr/local/bin/verger"),
        "the Dockerfile ships the stripped binary"
    );
}
