//! Python readers of the output (the `deltalake` package, Polars), installed with pip when
//! missing (`.ci/run` installs the same pinned versions).

use std::path::Path;
use std::process::Command;

/// The versions the README's snippets and the tests were written against.
pub const PYTHON_PACKAGES: [&str; 4] = [
    "deltalake==1.6.6",
    "polars==2.1.0",
    "pandas==3.1.1",
    "pyarrow==26.0.1",
];

/// Makes sure python3 can import the readers, installing them with pip if not.
pub fn require_python_packages() {
    let importable = || {
        Command::new("python3")
            .args(["-c", "import deltalake, numpy, pandas, polars, pyarrow"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable() {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(PYTHON_PACKAGES)
            .status();
    }
    assert!(
        importable(),
        "python3 cannot import deltalake, pandas, polars and pyarrow: pip install {}",
        PYTHON_PACKAGES.join(" ")
    );
}

/// Runs `code` with python3 in `dir`, asserts it succeeds, returns what it printed.
pub fn run_python(code: &str, dir: &Path) -> String {
    run_python_with(code, dir, &[])
}

/// [`run_python`] with extra environment variables.
///
/// The interpreter leaves by `os._exit` once `code` is done: with `deltalake` loaded, a normal
/// exit aborts now and then ("terminate called without an active exception", about 1 in 20
/// here with four at once) while its runtime's threads are torn down, after the work is done.
pub fn run_python_with(code: &str, dir: &Path, env: &[(&str, &str)]) -> String {
    let code =
        format!("{code}\nimport os, sys\nsys.stdout.flush()\nsys.stderr.flush()\nos._exit(0)\n");
    let out = Command::new("python3")
        .arg("-c")
        .arg(&code)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed in {}:\n{code}\n--- stderr\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the `deltalake` package sees in the table at `location` (a directory, or s3:// with
/// the `AWS_*` environment and `env`): (rows, distinct keys of rows, error records, Delta
/// version).
pub fn deltalake_counts(location: &str, env: &[(&str, &str)]) -> (usize, usize, usize, u64) {
    require_python_packages();
    let code = format!(
        "from deltalake import DeltaTable\n\
         t = DeltaTable({location:?})\n\
         df = t.to_pandas()\n\
         rows = df[df['stage'].isna()]\n\
         print(len(rows), rows['key'].nunique(), len(df) - len(rows), t.version())\n"
    );
    let printed = run_python_with(&code, Path::new("."), env);
    let n: Vec<u64> = printed
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    (n[0] as usize, n[1] as usize, n[2] as usize, n[3])
}
