//! The whole pipeline on the local filesystem, on the real Fruits-360 sample.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;

const SAMPLE_IMAGES: usize = 2_624;

/// The sample featurized once with 2 workers and 512-key epochs, shared by several tests.
fn sample_output() -> &'static (tempfile::TempDir, PathBuf) {
    static OUT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    OUT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let summary = run(&config(&sample_dir(), &out, 2, 512));
        assert_eq!(summary.embedded as usize, SAMPLE_IMAGES);
        assert_eq!(summary.errors, 0);
        assert_eq!(summary.epochs, 6, "2,624 keys in epochs of 512");
        (dir, out)
    })
}

#[test]
fn sample_gives_one_row_per_image_with_its_folder_as_label() {
    let (_, out) = sample_output();
    let table = read_output(out);
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    let rows = by_key(table.rows);
    let images: HashSet<String> = files_under(&sample_dir()).into_iter().collect();
    assert_eq!(images.len(), SAMPLE_IMAGES);
    assert_eq!(rows.keys().cloned().collect::<HashSet<_>>(), images);
    for (key, row) in &rows {
        let folder = key.split('/').nth(1).unwrap();
        assert_eq!(row.label.as_deref(), Some(folder), "{key}");
        assert_eq!((row.width, row.height), (100, 100), "{key}");
        assert_eq!(row.embedding.len(), 1280);
        assert!(row.embedding.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn sample_classes_are_separable_by_nearest_centroid() {
    let (_, out) = sample_output();
    let (accuracy, scored) = sample_nearest_centroid(&read_output(out).rows);
    assert!(scored > 600);
    assert!(accuracy >= 0.98, "accuracy {accuracy}");
}

#[test]
fn end_to_end_embeddings_match_pytorch_from_the_jpegs() {
    let (_, out) = sample_output();
    let rows = by_key(read_output(out).rows);
    let mut cosines = Vec::new();
    for (path, want) in reference_rows() {
        let row = rows
            .get(&path)
            .unwrap_or_else(|| panic!("{path} not in output"));
        let cos = cosine(&row.embedding, &want);
        assert!(cos >= 0.98, "{path}: cosine {cos}");
        cosines.push(cos);
    }
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    assert!(mean >= 0.99, "mean cosine {mean}");
}

#[test]
fn one_worker_and_two_workers_give_the_same_rows() {
    let (_, out) = sample_output();
    let two = by_key(read_output(out).rows);
    let dir = tempfile::tempdir().unwrap();
    let one_out = dir.path().join("one");
    // The Test half with one worker and small epochs (many epochs, many files).
    let mut cfg = config(&sample_dir(), &one_out, 1, 150);
    cfg.prefix = "Test/".into();
    let summary = run(&cfg);
    assert_eq!(summary.epochs, 5, "662 keys in epochs of 150");
    let one = by_key(read_output(&one_out).rows);
    assert_eq!(one.len(), 662);
    for (key, row) in &one {
        let other = &two[key];
        assert_eq!(row.label, other.label);
        assert!(
            max_abs_diff(&row.embedding, &other.embedding) <= 1e-5,
            "{key}"
        );
    }
}

#[test]
fn rerun_adds_nothing_and_a_lost_commit_is_redone_exactly() {
    let (_, out) = sample_output();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("out");
    copy_tree(out, &copy);
    let before = by_key(read_output(&copy).rows);

    let again = run(&config(&sample_dir(), &copy, 2, 512));
    assert_eq!((again.embedded, again.errors, again.epochs), (0, 0, 0));
    assert_eq!(again.source.listed as usize, SAMPLE_IMAGES);
    assert_eq!(again.source.skipped as usize, SAMPLE_IMAGES);
    assert_eq!(read_output(&copy).rows.len(), SAMPLE_IMAGES);

    // Lose the last commit (its Delta version): its files become invisible leftovers, its
    // keys uncommitted.
    let table = read_output(&copy);
    let lost = table.commits.last().unwrap().clone();
    let version = table.version.unwrap();
    std::fs::remove_file(copy.join(format!("_delta_log/{version:020}.json"))).unwrap();
    let shrunk = read_output(&copy);
    assert_eq!(shrunk.rows.len(), SAMPLE_IMAGES - lost.rows as usize);
    assert_eq!(shrunk.version, Some(version - 1));

    let redo = run(&config(&sample_dir(), &copy, 2, 512));
    assert_eq!(redo.embedded, lost.rows, "exactly the lost epoch is redone");
    let table = read_output(&copy);
    let epochs: Vec<u64> = table.commits.iter().map(|c| c.epoch).collect();
    assert_eq!(
        epochs,
        (0..epochs.len() as u64).collect::<Vec<_>>(),
        "the redone epoch takes the lost one's number: txn versions stay consecutive"
    );
    let after = by_key(table.rows);
    assert_eq!(after.len(), SAMPLE_IMAGES);
    for (key, row) in &after {
        assert!(
            max_abs_diff(&row.embedding, &before[key].embedding) <= 1e-5,
            "{key}"
        );
    }
    // Every file the log adds exists; the lost epoch's files are still on disk, unlisted.
    let listed: HashSet<String> = table_files(&copy);
    let on_disk: HashSet<String> = files_under(&copy).into_iter().collect();
    assert!(listed.is_subset(&on_disk));
    for f in &lost.files {
        assert!(
            on_disk.contains(&f.key) && !listed.contains(&f.key),
            "{}",
            f.key
        );
    }
}

/// The files of the output table's latest snapshot.
fn table_files(out: &std::path::Path) -> HashSet<String> {
    let store = verger::storage::local::LocalStore::open(out, false).unwrap();
    let delta = verger::commit::DeltaOutput::of(&store, &Default::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let committed = rt
        .block_on(verger::commit::Committed::load(&delta, &store, &|_| true))
        .unwrap();
    committed.files.into_iter().map(|f| f.path).collect()
}

#[test]
fn commits_count_the_rows_of_their_files() {
    let (_, out) = sample_output();
    let table = read_output(out);
    let mut total = 0;
    for c in &table.commits {
        assert_eq!(c.rows, c.files.iter().map(|f| f.rows).sum::<u64>());
        assert!(c.files.len() <= 2, "one data file per worker per epoch");
        total += c.rows;
        for f in &c.files {
            let bytes = std::fs::metadata(out.join(&f.key)).unwrap().len();
            assert_eq!(bytes, f.bytes, "{}", f.key);
            let stats: serde_json::Value = serde_json::from_str(&f.stats).unwrap();
            assert_eq!(stats["numRecords"], f.rows, "{}", f.key);
            assert_eq!(stats["minValues"]["epoch"], c.epoch, "{}", f.key);
        }
    }
    assert_eq!(total as usize, SAMPLE_IMAGES);
    let listed: HashSet<String> = table
        .commits
        .iter()
        .flat_map(|c| c.files.iter().map(|f| f.key.clone()))
        .collect();
    assert_eq!(
        listed,
        table_files(out),
        "the snapshot is the committed files"
    );
}

/// Every row and error record carries the epoch that committed it, as an int64 that every
/// Delta reader has.
#[test]
fn every_row_carries_the_epoch_of_its_commit() {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    let (_, out) = sample_output();
    let table = read_output(out);
    let mut rows = 0;
    for commit in &table.commits {
        for file in &commit.files {
            let bytes = bytes::Bytes::from(std::fs::read(out.join(&file.key)).unwrap());
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                    .unwrap()
                    .build()
                    .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let epochs = batch
                    .column_by_name("epoch")
                    .unwrap_or_else(|| panic!("no epoch column in {}", file.key))
                    .as_primitive::<Int64Type>();
                assert!(
                    epochs.values().iter().all(|&e| e == commit.epoch as i64),
                    "{}: epochs other than {}",
                    file.key,
                    commit.epoch
                );
                rows += batch.num_rows();
            }
        }
    }
    assert_eq!(rows, SAMPLE_IMAGES);
}

/// A picture put back at its key after another one was committed there (a revert, a restore
/// from backup, `cp -p` of the original, which also restores the modification time and so
/// the version tag) is embedded again, and the key's current row embeds it, not the other.
#[test]
fn a_version_that_comes_back_supersedes_the_one_it_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    let class = input.join("Fruit");
    std::fs::create_dir_all(&class).unwrap();
    let picture_a = std::fs::read(sample_dir().join("Test/apple/321_100.jpg")).unwrap();
    let other = files_under(&sample_dir().join("Test"))
        .into_iter()
        .find(|k| !k.starts_with("apple/"))
        .unwrap();
    let picture_b = std::fs::read(sample_dir().join("Test").join(other)).unwrap();
    assert_ne!(picture_a, picture_b);
    let key = "Fruit/x.jpg";
    let path = input.join(key);
    std::fs::write(class.join("unchanged.jpg"), &picture_a).unwrap();
    let put = |bytes: &[u8], mtime_secs: u64| {
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime_secs))
            .unwrap();
    };
    let current = || {
        let table = read_output(&output);
        let row = table
            .latest_rows()
            .into_iter()
            .find(|r| r.key == key)
            .cloned()
            .unwrap();
        row
    };

    put(&picture_a, 1_700_000_000);
    assert_eq!(run(&config(&input, &output, 1, 16)).embedded, 2);
    let row_a = current();
    put(&picture_b, 1_700_000_100);
    assert_eq!(run(&config(&input, &output, 1, 16)).embedded, 1);
    let row_b = current();
    assert_ne!(row_a.etag, row_b.etag);
    assert!(cosine(&row_a.embedding, &row_b.embedding) < 0.99);

    // A back, with its original modification time: the same version tag as the first run's.
    put(&picture_a, 1_700_000_000);
    let third = run(&config(&input, &output, 1, 16));
    assert_eq!(
        (third.embedded, third.source.skipped),
        (1, 1),
        "A is embedded again, the unchanged file skipped"
    );
    let row = current();
    assert_eq!(row.etag, row_a.etag);
    assert!(
        max_abs_diff(&row.embedding, &row_a.embedding) <= 1e-5,
        "the current row embeds the bytes at the key"
    );
    // And it stays current: a fourth run has nothing to do.
    let fourth = run(&config(&input, &output, 1, 16));
    assert_eq!((fourth.embedded, fourth.source.skipped), (0, 2));
    assert_eq!(current().etag, row_a.etag);
}

/// The table's latest snapshot is the current state of the input: a class folder renamed
/// (`mangoo_typo` to `mango`) leaves no row of the old name, a replaced picture leaves only
/// its new row, and time travel still gives the first run's rows. A run's prefix bounds
/// what it can find deleted, and `keep_deleted` keeps deleted objects' rows. The `deltalake`
/// package sees the same snapshot.
#[test]
fn the_snapshot_drops_rows_of_deleted_and_replaced_objects() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    let copy = |class: &str, to: &str, n: usize| -> Vec<String> {
        let from = sample_dir().join("Test").join(class);
        std::fs::create_dir_all(input.join(to)).unwrap();
        let mut names: Vec<String> = files_under(&from).into_iter().take(n).collect();
        names.sort();
        for name in &names {
            std::fs::copy(from.join(name), input.join(to).join(name)).unwrap();
        }
        names
    };
    let mangoes = copy("mango", "mangoo_typo", 20);
    let apples = copy("apple", "apple", 10);
    let labels = |table: &verger::sink::reader::Table| {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for row in &table.rows {
            *counts
                .entry(row.label.clone().unwrap_or_default())
                .or_default() += 1;
        }
        counts
    };
    let first = run(&config(&input, &output, 1, 8));
    assert_eq!(
        (first.embedded, first.errors, first.source.deleted),
        (30, 0, 0)
    );
    let before = read_output(&output);
    let first_version = before.version.unwrap();
    assert_eq!(labels(&before)["mangoo_typo"], 20);

    // The folder's name fixed; one apple replaced by another picture of an apple.
    std::fs::rename(input.join("mangoo_typo"), input.join("mango")).unwrap();
    let replaced = format!("apple/{}", apples[0]);
    let other = files_under(&sample_dir().join("Test/apple"))
        .into_iter()
        .find(|n| !apples.contains(n))
        .unwrap();
    let path = input.join(&replaced);
    std::fs::copy(sample_dir().join("Test/apple").join(other), &path).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000))
        .unwrap();
    let second = run(&config(&input, &output, 2, 8));
    assert_eq!((second.embedded, second.errors), (21, 0));
    assert_eq!(second.source.deleted, 20, "the 20 keys under mangoo_typo/");

    let after = read_output(&output);
    let rows = by_key(after.rows.clone());
    assert_eq!(rows.len(), 30, "one row per object");
    assert_eq!(
        labels(&after),
        [("apple".to_string(), 10), ("mango".to_string(), 20)].into()
    );
    assert!(mangoes
        .iter()
        .all(|m| rows.contains_key(&format!("mango/{m}"))));
    let old = before.rows.iter().find(|r| r.key == replaced).unwrap();
    let new = &rows[&replaced];
    assert_ne!(old.etag, new.etag);
    assert!(cosine(&old.embedding, &new.embedding) < 0.9999);
    for (key, row) in &rows {
        if key != &replaced && key.starts_with("apple/") {
            let kept = before.rows.iter().find(|r| &r.key == key).unwrap();
            assert_eq!(
                (&kept.etag, &kept.embedding),
                (&row.etag, &row.embedding),
                "{key}: rewritten, unchanged"
            );
        }
    }
    let commit = after.commits.last().unwrap();
    assert!(commit.removed.len() >= commit.rewritten.len() && !commit.removed.is_empty());

    // Time travel: the first run's snapshot is still there.
    let then = read_location_at(
        output.to_str().unwrap(),
        &Default::default(),
        Some(first_version),
    );
    assert_eq!(labels(&then)["mangoo_typo"], 20);
    assert_eq!(then.rows.len(), 30);

    // Another engine reads the same snapshot, and the earlier one by version.
    common::python::require_python_packages();
    let code = format!(
        "from deltalake import DeltaTable\n\
         now = DeltaTable({out:?}).to_pandas()\n\
         then = DeltaTable({out:?}, version={first_version}).to_pandas()\n\
         print(len(now), now['key'].nunique(), (now['label'] == 'mangoo_typo').sum(), (then['label'] == 'mangoo_typo').sum())\n",
        out = output.to_str().unwrap()
    );
    let printed = common::python::run_python(&code, dir.path());
    assert_eq!(
        printed.split_whitespace().collect::<Vec<_>>(),
        ["30", "30", "0", "20"]
    );

    // Nothing changed: nothing to do, no version.
    let third = run(&config(&input, &output, 1, 8));
    assert_eq!(
        (third.embedded, third.source.deleted, third.epochs),
        (0, 0, 0)
    );
    assert_eq!(read_output(&output).version, after.version);

    // A run under a prefix finds nothing deleted outside it; keep_deleted keeps rows.
    std::fs::remove_file(input.join(&replaced)).unwrap();
    let mut scoped = config(&input, &output, 1, 8);
    scoped.prefix = "mango/".into();
    assert_eq!(run(&scoped).source.deleted, 0);
    let mut keeping = config(&input, &output, 1, 8);
    keeping.keep_deleted = true;
    assert_eq!(run(&keeping).source.deleted, 0);
    assert_eq!(read_output(&output).rows.len(), 30);
    let last = run(&config(&input, &output, 1, 8));
    assert_eq!(last.source.deleted, 1);
    let rows = by_key(read_output(&output).rows);
    assert_eq!(rows.len(), 29);
    assert!(!rows.contains_key(&replaced));
}

/// Checkpoints: with an interval of 4, a run of ten epochs leaves Parquet checkpoints and
/// `_last_checkpoint`. With the log's JSON versions before the last checkpoint removed (as
/// Delta's log clean-up does once they expire), a restart still knows every committed epoch
/// (the checkpoint holds the txn), processes nothing again, goes on at the next epoch, and
/// the `deltalake` package reads the table.
#[test]
fn start_up_reads_the_last_checkpoint_not_the_whole_log() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    let from = sample_dir().join("Test/lemon");
    let names = files_under(&from);
    std::fs::create_dir_all(input.join("lemon")).unwrap();
    for name in names.iter().take(40) {
        std::fs::copy(from.join(name), input.join("lemon").join(name)).unwrap();
    }
    let mut cfg = config(&input, &output, 1, 4);
    cfg.checkpoint_interval = 4;
    let first = run(&cfg);
    assert_eq!((first.embedded, first.epochs), (40, 10));

    let log = output.join("_delta_log");
    let last: serde_json::Value =
        serde_json::from_slice(&std::fs::read(log.join("_last_checkpoint")).unwrap()).unwrap();
    let checkpoint = last["version"].as_u64().unwrap();
    assert_eq!(
        checkpoint, 7,
        "versions 0 to 10: checkpoints after versions 3 and 7"
    );
    assert!(log
        .join(format!("{checkpoint:020}.checkpoint.parquet"))
        .exists());
    for version in 0..checkpoint {
        std::fs::remove_file(log.join(format!("{version:020}.json"))).unwrap();
    }

    let second = run(&cfg);
    assert_eq!((second.embedded, second.source.skipped), (0, 40));
    for name in names.iter().skip(40).take(4) {
        std::fs::copy(from.join(name), input.join("lemon").join(name)).unwrap();
    }
    let third = run(&cfg);
    assert_eq!((third.embedded, third.source.skipped), (4, 40));
    let (rows, keys, errors, version) =
        common::python::deltalake_counts(output.to_str().unwrap(), &[]);
    assert_eq!((rows, keys, errors, version), (44, 44, 0, 11));
}
