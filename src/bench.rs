//! `verger bench`: end-to-end throughput at several worker counts on a replicated image set,
//! tabulated with the speedup, where the worker time goes and the peak memory.
//!
//! The input folder is replicated under new keys (`rep000/…`, `rep001/…`; hard links where the
//! file system allows, so 50,000 images cost no disk) until the requested count is reached:
//! the same pictures, but every key is new to the pipeline, so nothing is skipped or cached.
//! Each worker count runs in its own `verger run` process, so peak RSS is that run's own.

use std::path::{Path, PathBuf};

use crate::dataflow::Summary;

/// Every file under `dir`, relative paths in sorted order.
fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Fills `dest` with exactly `count` files taken in turn from `source` (all of them, then all
/// again under the next `repNNN/` prefix, ...), keeping each file's folder (its label).
/// Hard links are used when possible, copies otherwise. Returns the number of files.
pub fn replicate(source: &Path, dest: &Path, count: usize) -> std::io::Result<usize> {
    let files = files_under(source)?;
    if files.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no files under {}", source.display()),
        ));
    }
    for i in 0..count {
        let rel = &files[i % files.len()];
        let target = dest.join(format!("rep{:03}", i / files.len())).join(rel);
        if target.exists() {
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let from = source.join(rel);
        if std::fs::hard_link(&from, &target).is_err() {
            std::fs::copy(&from, &target)?;
        }
    }
    Ok(count)
}

/// One line of the summary table: a run at one worker count.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// Timely workers.
    pub workers: usize,
    /// What the run reported.
    pub summary: Summary,
}

/// The summary as a Markdown table; speedup is against the first row.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| workers | images | seconds | images/s | speedup | embed | decode | write | other/idle | peak RSS |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let base = rows.first().map(|r| r.summary.images_per_second());
    for r in rows {
        let s = &r.summary;
        let rate = s.images_per_second();
        let shares = s.stages.shares(s.seconds * r.workers as f64);
        let pct = |x: f64| format!("{:.0}%", x * 100.0);
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.2}x | {} | {} | {} | {} | {} |\n",
            r.workers,
            s.embedded + s.errors,
            s.seconds,
            rate,
            base.map_or(1.0, |b| rate / b.max(1e-9)),
            pct(shares.embed),
            pct(shares.decode),
            pct(shares.write),
            pct(shares.other),
            s.peak_rss_bytes
                .map_or("?".to_string(), |b| format!("{} MiB", b >> 20)),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StageSeconds;

    #[test]
    fn replicate_cycles_through_the_source_under_new_prefixes() {
        let src = tempfile::tempdir().unwrap();
        for (dir, name) in [
            ("Training/Kiwi", "a.jpg"),
            ("Training/Kiwi", "b.jpg"),
            ("Test/Lime", "c.jpg"),
        ] {
            std::fs::create_dir_all(src.path().join(dir)).unwrap();
            std::fs::write(src.path().join(dir).join(name), name).unwrap();
        }
        let dest = tempfile::tempdir().unwrap();
        assert_eq!(replicate(src.path(), dest.path(), 7).unwrap(), 7);
        let got = files_under(dest.path()).unwrap();
        assert_eq!(got.len(), 7);
        assert!(got.contains(&PathBuf::from("rep000/Test/Lime/c.jpg")));
        assert!(got.contains(&PathBuf::from("rep002/Test/Lime/c.jpg")));
        assert!(!got.contains(&PathBuf::from("rep002/Training/Kiwi/a.jpg")));
        let bytes = std::fs::read(dest.path().join("rep001/Training/Kiwi/b.jpg")).unwrap();
        assert_eq!(bytes, b"b.jpg");
        // The label (parent folder) survives replication.
        assert_eq!(
            crate::label::label_of("rep001/Training/Kiwi/b.jpg"),
            Some("Kiwi")
        );
    }

    #[test]
    fn table_shows_speedup_against_the_first_row() {
        let row = |workers: usize, seconds: f64| BenchRow {
            workers,
            summary: Summary {
                embedded: 1000,
                seconds,
                workers,
                stages: StageSeconds {
                    decode: 0.1 * seconds * workers as f64,
                    embed: 0.8 * seconds * workers as f64,
                    write: 0.0,
                },
                peak_rss_bytes: Some(300 << 20),
                ..Summary::default()
            },
        };
        let t = table(&[row(1, 10.0), row(2, 5.2)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[2].starts_with(
                "| 1 | 1000 | 10.0 | 100.0 | 1.00x | 80% | 10% | 0% | 10% | 300 MiB |"
            ),
            "{t}"
        );
        assert!(lines[3].contains("| 1.92x |"), "{t}");
    }
}
