//! The cluster launcher `deploy/launch.py`: its Python unit tests, and its `--dry-run` as a user
//! runs it. Needs `python3` (3.8+, standard library only); a missing one fails, never skips.

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
        let flags = format!("-w 2 -n 2 -p {process} -h /etc/verger/hosts.txt");
        assert!(stdout.contains(flags.as_str()), "no `{flags}` in\n{stdout}");
    }
    assert!(
        stdout.contains("ec2-user@10.0.0.2:/tmp/verger-hosts.txt"),
        "{stdout}"
    );
}
