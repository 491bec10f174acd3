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
pub fn files_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
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
    replicate_with(source, dest, count, |from, to| {
        if std::fs::hard_link(from, to).is_err() {
            std::fs::copy(from, to)?;
        }
        Ok(())
    })
}

/// [`replicate`], each file written as a phone-size photo of `size` ([`phone_photo`],
/// quality 90) instead of linked: the large-photo benchmark's input.
pub fn replicate_as_photos(
    source: &Path,
    dest: &Path,
    count: usize,
    size: (u32, u32),
) -> std::io::Result<usize> {
    replicate_with(source, dest, count, |from, to| {
        let photo = phone_photo(&std::fs::read(from)?, size, 90)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", from.display())))?;
        std::fs::write(to, photo)
    })
}

/// The replication of [`replicate`], with `place` putting one file (`from`) at its new path.
fn replicate_with(
    source: &Path,
    dest: &Path,
    count: usize,
    place: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<usize> {
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
        place(&source.join(rel), &target)?;
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

/// A phone-size photo made from a small one: `jpeg` decoded, upscaled to `width x height`
/// (bilinear), with deterministic noise of +-8 levels (so the DCT has detail to code, as a
/// real sensor's picture does), encoded as a baseline JPEG of `quality`. What the large-photo
/// benchmarks and tests feed verger: the sample's classes at 12 MP, without shipping photos.
pub fn phone_photo(
    jpeg: &[u8],
    (width, height): (u32, u32),
    quality: u8,
) -> Result<Vec<u8>, image::ImageError> {
    let small = image::load_from_memory(jpeg)?.into_rgb8();
    let mut big =
        image::imageops::resize(&small, width, height, image::imageops::FilterType::Triangle);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for value in big.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 17) as i16 - 8;
        *value = (i16::from(*value) + noise).clamp(0, 255) as u8;
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality).encode_image(&big)?;
    Ok(out)
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
