//! Compaction through whole runs on real sample photos: the small files of earlier epochs,
//! merged by later epochs' commits, keep every record as it was (same rows, embeddings and
//! epochs as an output that never merges); the snapshot holds fewer files; the merge's
//! actions say `dataChange: false`; every file's statistics give its records' epoch range;
//! a later run that deletes objects rewrites merged files, and a restart finds nothing to
//! redo; a Python `deltalake` reader sees the same rows.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use verger::commit::{Committed, CompactionPolicy, DeltaOutput};
use verger::record::FileKind;
use verger::storage::local::LocalStore;

/// Photos per class copied from the sample's Test split.
const PER_CLASS: usize = 24;

/// A small input: `PER_CLASS` photos of each class, and beside every eighth one a file that
/// is no picture (an error record), so that error files, too, come in several epochs.
fn input(dir: &Path) -> usize {
    let test = common::sample_dir().join("Test");
    let mut objects = 0;
    let mut classes: Vec<_> = std::fs::read_dir(&test)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    for class in classes {
        let name = class.file_name().unwrap();
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let mut photos: Vec<_> = std::fs::read_dir(&class)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        photos.sort();
        for (i, photo) in photos.iter().take(PER_CLASS).enumerate() {
            std::fs::copy(photo, dir.join(name).join(photo.file_name().unwrap())).unwrap();
            objects += 1;
            if i % 8 == 0 {
                let stem = photo.file_stem().unwrap().to_str().unwrap();
                std::fs::write(dir.join(name).join(format!("{stem}-broken.jpg")), b"no").unwrap();
                objects += 1;
            }
        }
    }
    objects
}

/// (path, dataChange, statistics) of the add and remove actions of every log version,
/// oldest first.
fn log_actions(out: &Path) -> Vec<(&'static str, String, bool, Option<serde_json::Value>)> {
    let log = out.join("_delta_log");
    let mut versions: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    versions.sort();
    let mut actions = Vec::new();
    for version in versions {
        for line in std::fs::read_to_string(version).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            for kind in ["add", "remove"] {
                if let Some(a) = action.get(kind) {
                    let stats = a
                        .get("stats")
                        .and_then(|s| s.as_str())
                        .map(|s| serde_json::from_str(s).unwrap());
                    actions.push((
                        if kind == "add" { "add" } else { "remove" },
                        a["path"].as_str().unwrap().to_string(),
                        a["dataChange"].as_bool().unwrap(),
                        stats,
                    ));
                }
            }
        }
    }
    actions
}

/// The snapshot's files, as the table's reader (delta-rs) lists them.
fn snapshot_files(out: &Path) -> Vec<String> {
    let store = LocalStore::open(out, false).unwrap();
    let delta = DeltaOutput::of(&store, &Default::default()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let committed = runtime
        .block_on(Committed::load(&delta, &store, &|_| true))
        .unwrap();
    let mut files: Vec<String> = committed.files.into_iter().map(|f| f.path).collect();
    files.sort();
    files
}

/// The smallest and largest epoch of the records in `file` of the output `out`.
fn epoch_range(out: &Path, file: &str) -> (i64, i64) {
    let store = LocalStore::open(out, false).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let batches = runtime
        .block_on(verger::table::read_batches(&store, file, Some(&["epoch"])))
        .unwrap();
    let mut range = (i64::MAX, i64::MIN);
    for batch in &batches {
        for e in verger::table::epochs_of(batch, file).unwrap().values() {
            range = (range.0.min(*e), range.1.max(*e));
        }
    }
    range
}

/// (key, epoch, etag, label, embedding) of every row, and (key, epoch, stage) of every
/// error record, of an output.
type Records = (
    BTreeMap<String, (u64, String, Option<String>, Vec<f32>)>,
    BTreeMap<String, (u64, String)>,
);

fn records(out: &Path) -> Records {
    let table = common::read_output(out);
    let epochs = table.row_epochs.clone();
    let rows = common::by_key(table.rows.clone());
    let mut by_key = BTreeMap::new();
    for (row, epoch) in table.rows.iter().zip(epochs) {
        let r = &rows[&row.key];
        by_key.insert(
            row.key.clone(),
            (epoch, r.etag.clone(), r.label.clone(), r.embedding.clone()),
        );
    }
    let mut errors = BTreeMap::new();
    for (failure, epoch) in table.errors.iter().zip(&table.error_epochs) {
        let old = errors.insert(
            failure.key.clone(),
            (*epoch, failure.stage.as_str().to_string()),
        );
        assert!(old.is_none(), "{} has two error records", failure.key);
    }
    (by_key, errors)
}

#[test]
fn merged_files_keep_every_record_and_later_runs_rewrite_them() {
    let dir = tempfile::tempdir().unwrap();
    let (input_dir, plain, merged) = (
        dir.path().join("in"),
        dir.path().join("plain"),
        dir.path().join("merged"),
    );
    let objects = input(&input_dir);
    let policy = CompactionPolicy {
        files: 3,
        target_bytes: 64 << 20,
    };

    let mut config = common::config(&input_dir, &plain, 1, 8);
    config.compaction = CompactionPolicy::never();
    common::run(&config);
    let mut config = common::config(&input_dir, &merged, 1, 8);
    config.compaction = policy;
    let summary = common::run(&config);
    assert_eq!(summary.embedded + summary.errors, objects as u64);
    assert!(summary.epochs >= 12, "{} epochs", summary.epochs);

    // The same records, embeddings and epochs as an output that never merges.
    let (rows, errors) = records(&merged);
    assert_eq!(
        (rows.len(), errors.len()),
        (4 * PER_CLASS, 4 * PER_CLASS / 8)
    );
    assert!(records(&plain) == (rows.clone(), errors.clone()));

    // Fewer files: merges of data files and of error files, each out of the snapshot.
    let (never, files) = (snapshot_files(&plain), snapshot_files(&merged));
    assert!(
        never.len() as u64 >= summary.epochs,
        "a file per epoch at least"
    );
    assert!(
        files.len() * 2 <= never.len(),
        "{} files merged, {} not",
        files.len(),
        never.len()
    );
    let table = common::read_output(&merged);
    let merged_kinds: HashSet<&str> = table
        .commits
        .iter()
        .flat_map(|c| c.compacted.iter())
        .map(|f| match f.kind {
            FileKind::Data => "data",
            FileKind::Errors => "errors",
        })
        .collect();
    assert_eq!(merged_kinds.len(), 2, "data and error files merged");
    let gone: HashSet<&String> = table
        .commits
        .iter()
        .flat_map(|c| &c.compacted_from)
        .collect();
    assert!(files.iter().all(|f| !gone.contains(f)));

    // The merges rearrange: dataChange false both ways; the epochs' own adds are changes.
    let actions = log_actions(&merged);
    let merged_files: HashSet<&String> = table
        .commits
        .iter()
        .flat_map(|c| c.compacted.iter().map(|f| &f.key))
        .collect();
    for (kind, path, data_change, _) in &actions {
        let merge = match *kind {
            "add" => merged_files.contains(path),
            _ => gone.contains(path),
        };
        assert_eq!(*data_change, !merge, "{kind} {path}");
    }

    // Each snapshot file's statistics give its records' epoch range, merged files spanning
    // several epochs.
    let stats: BTreeMap<&String, &serde_json::Value> = actions
        .iter()
        .filter(|a| a.0 == "add")
        .map(|a| (&a.1, a.3.as_ref().unwrap()))
        .collect();
    let mut spanning = 0;
    for file in &files {
        let (lo, hi) = epoch_range(&merged, file);
        let s = stats[file];
        assert_eq!(s["minValues"]["epoch"].as_i64(), Some(lo), "{file}");
        assert_eq!(s["maxValues"]["epoch"].as_i64(), Some(hi), "{file}");
        spanning += usize::from(lo < hi);
    }
    assert!(spanning >= 2, "merged files span several epochs");

    // A class deleted from the input leaves the snapshot: merged files are rewritten
    // without its records; every other record stays as it was, its epoch included.
    let deleted_class = std::fs::read_dir(&input_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .min()
        .unwrap();
    std::fs::remove_dir_all(input_dir.join(&deleted_class)).unwrap();
    common::run(&config);
    let (after, after_errors) = records(&merged);
    let kept = |key: &String| !key.starts_with(&format!("{deleted_class}/"));
    let expected: BTreeMap<_, _> = rows.into_iter().filter(|(k, _)| kept(k)).collect();
    let expected_errors: BTreeMap<_, _> = errors.into_iter().filter(|(k, _)| kept(k)).collect();
    assert_eq!(after.len(), 3 * PER_CLASS);
    assert!(after == expected, "the other rows changed");
    assert!(
        after_errors == expected_errors,
        "the other error records changed"
    );

    // A restart finds every remaining record, merged or not, handled.
    let again = common::run(&config);
    assert_eq!((again.embedded, again.errors, again.epochs), (0, 0, 0));

    // Any Delta reader sees each remaining key once.
    common::python::require_python_packages();
    let seen = common::python::run_python(
        "from deltalake import DeltaTable\n\
         df = DeltaTable('merged').to_pandas()\n\
         print(len(df), df['key'].nunique(), df['embedding'].isna().sum())",
        dir.path(),
    );
    let n = after.len() + after_errors.len();
    assert_eq!(
        seen.split_whitespace().collect::<Vec<_>>(),
        [n.to_string(), n.to_string(), after_errors.len().to_string()]
    );
}

/// The tombstones of merged-away files: kept in the table's checkpoints for Delta's default
/// week, dropped at once with `deleted_file_retention` zero (what keeps start-up flat in a
/// long watch run), and the table reads the same either way.
#[test]
fn a_short_deleted_file_retention_keeps_tombstones_out_of_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let input_dir = dir.path().join("in");
    std::fs::create_dir_all(&input_dir).unwrap();
    for i in 0..30 {
        std::fs::write(input_dir.join(format!("f{i:02}.jpg")), b"").unwrap();
    }
    common::python::require_python_packages();
    let mut seen = Vec::new();
    for (name, retention) in [("week", None), ("zero", Some(std::time::Duration::ZERO))] {
        let out = dir.path().join(name);
        let mut config = common::config(&input_dir, &out, 1, 1);
        config.compaction = CompactionPolicy {
            files: 2,
            target_bytes: 64 << 20,
        };
        config.checkpoint_interval = 10;
        config.deleted_file_retention = retention;
        let summary = common::run(&config);
        assert_eq!((summary.errors, summary.epochs), (30, 30));
        let counts = common::python::run_python(
            &format!(
                "import glob, pyarrow.parquet as pq\n\
                 from deltalake import DeltaTable\n\
                 last = sorted(glob.glob('{name}/_delta_log/*.checkpoint.parquet'))[-1]\n\
                 t = pq.read_table(last).to_pydict()\n\
                 adds = sum(1 for a in t['add'] if a)\n\
                 removes = sum(1 for r in t.get('remove', []) if r)\n\
                 df = DeltaTable('{name}').to_pandas()\n\
                 print(adds, removes, len(df), df['key'].nunique())"
            ),
            dir.path(),
        );
        let n: Vec<usize> = counts
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        seen.push((name, n));
    }
    let (week, zero) = (&seen[0].1, &seen[1].1);
    assert!(week[1] > week[0], "a week keeps the tombstones: {seen:?}");
    assert_eq!(zero[1], 0, "zero keeps none: {seen:?}");
    assert_eq!(&week[2..], [30, 30]);
    assert_eq!(&zero[2..], [30, 30]);
}
