//! `verger report`: one self-contained HTML page of what an output holds, for a person. Rows
//! per label, a 2-D PCA map of the embeddings coloured by label, a head's metrics and
//! confusion matrix (given its `metrics.json`), the error records grouped by reason and the
//! objects committed over wall-clock time by each run. The page embeds its data as JSON and draws its charts
//! as SVG with a short inline script: no network, no external asset.

use std::collections::BTreeMap;

use nalgebra::{DMatrix, SymmetricEigen};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::commit::EpochCommit;
use crate::head::Metrics;
use crate::record::{Embedded, Failure};
use crate::sink::reader::Table;

/// What the page shows besides the table.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Title line (the output's location).
    pub title: String,
    /// Rows drawn on the PCA map at most (a sample fixed by the keys' hash).
    pub max_points: usize,
    /// Which rows are the training and which the test split (rows per label and split).
    pub splits: crate::evaluate::Splits,
}

/// The embeddings projected on their two principal components.
#[derive(Clone, Debug, Serialize)]
pub struct PcaMap {
    /// Share of the sample's variance each component explains.
    pub explained: [f64; 2],
    /// One point per sampled row: key, label, x, y.
    pub points: Vec<MapPoint>,
}

/// One row on the PCA map.
#[derive(Clone, Debug, Serialize)]
pub struct MapPoint {
    /// The object's key.
    pub key: String,
    /// Its label ("" without one).
    pub label: String,
    /// First principal component.
    pub x: f64,
    /// Second principal component.
    pub y: f64,
}

/// One committed epoch on its run's clock: when it committed, and the run's total by then.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Commit {
    /// The epoch.
    pub epoch: u64,
    /// Seconds from the run's start to this commit.
    pub seconds: f64,
    /// Rows and error records this epoch committed.
    pub objects: u64,
    /// Rows and error records the run had committed with this epoch.
    pub total: u64,
}

/// Progress of one run: objects committed over wall-clock time. (Epochs overlap, so a rate
/// per epoch would overstate the run's: its rate is the slope of this curve.)
#[derive(Clone, Debug, Serialize)]
pub struct RunProgress {
    /// The run's id.
    pub run: String,
    /// Its commits, in order.
    pub commits: Vec<Commit>,
    /// Objects committed per second, from the run's start to its last commit.
    pub per_second: f64,
}

/// Error records of one stage and reason.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorGroup {
    /// The stage that failed.
    pub stage: String,
    /// The reason, as recorded.
    pub reason: String,
    /// Records with this reason.
    pub count: usize,
    /// Up to five of their keys.
    pub keys: Vec<String>,
}

/// Everything the page draws, as it embeds it.
#[derive(Clone, Debug, Serialize)]
pub struct ReportData {
    /// Title line.
    pub title: String,
    /// Current rows per label (`(none)` for rows without one).
    pub labels: Vec<(String, usize)>,
    /// The names of the training and test splits.
    pub split_names: [String; 2],
    /// Per label (in the order of `labels`), its rows in the training and the test split.
    pub label_splits: Vec<[usize; 2]>,
    /// The PCA map (`None` with fewer than three rows).
    pub map: Option<PcaMap>,
    /// The head's metrics, when given.
    pub metrics: Option<Metrics>,
    /// Current error records grouped by stage and reason, largest group first.
    pub errors: Vec<ErrorGroup>,
    /// Per epoch, from the commit records.
    pub throughput: Vec<RunProgress>,
    /// Models of the commit records.
    pub models: Vec<String>,
}

impl ReportData {
    /// Gathers the page's data from a committed table (rows, errors and commit records).
    pub fn gather(table: &Table, metrics: Option<Metrics>, options: &ReportOptions) -> Self {
        let commits = &table.commits;
        let latest = table.latest_rows();
        let labels: Vec<(String, usize)> = crate::evaluate::label_counts(latest.iter().copied())
            .into_iter()
            .collect();
        let mut splits: BTreeMap<&str, [usize; 2]> = BTreeMap::new();
        for row in &latest {
            let label = row.label.as_deref().unwrap_or("(none)");
            match options.splits.of(&row.key) {
                Some(crate::evaluate::Split::Train) => splits.entry(label).or_default()[0] += 1,
                Some(crate::evaluate::Split::Test) => splits.entry(label).or_default()[1] += 1,
                None => {}
            }
        }
        let label_splits = labels
            .iter()
            .map(|(label, _)| splits.get(label.as_str()).copied().unwrap_or_default())
            .collect();
        let mut models: Vec<String> = commits.iter().map(|m| m.model.clone()).collect();
        models.sort();
        models.dedup();
        Self {
            title: options.title.clone(),
            labels,
            split_names: [options.splits.train_name(), options.splits.test_name()],
            label_splits,
            map: pca_map(&latest, options.max_points),
            metrics,
            errors: error_groups(&table.current_errors()),
            throughput: throughput(commits),
            models,
        }
    }

    /// The page.
    pub fn html(&self) -> String {
        // `</` inside the JSON would end the script element early.
        let json = serde_json::to_string(self)
            .expect("serialisable")
            .replace("</", "<\\/");
        let (head, rest) = PAGE.split_once("{{title}}").expect("the page has a title");
        let (middle, tail) = rest.split_once("{{data}}").expect("the page has its data");
        format!("{head}{}{middle}{json}{tail}", escape(&self.title))
    }
}

/// A sample of at most `max_points` rows (those with the smallest key hash), projected on
/// the two leading principal components of the sample. Works on the smaller of the
/// covariance (features x features) and Gram (rows x rows) matrices; both give the same
/// projection.
pub fn pca_map(rows: &[&Embedded], max_points: usize) -> Option<PcaMap> {
    let mut sample: Vec<&Embedded> = rows.to_vec();
    sample.sort_by_key(|r| (xxh3_64(r.key.as_bytes()), r.key.as_str()));
    sample.truncate(max_points);
    let (n, d) = (sample.len(), sample.first()?.embedding.len());
    if n < 3 || d < 2 {
        return None;
    }
    let mut x = DMatrix::<f64>::from_fn(n, d, |i, j| sample[i].embedding[j] as f64);
    let mean = x.row_mean();
    for mut row in x.row_iter_mut() {
        row -= &mean;
    }
    let total: f64 = x.iter().map(|v| v * v).sum();
    let coordinates = if d <= n {
        let eigen = SymmetricEigen::new(x.transpose() * &x);
        let top = leading(&eigen.eigenvalues, 2);
        let axes = DMatrix::from_columns(&[
            eigen.eigenvectors.column(top[0]),
            eigen.eigenvectors.column(top[1]),
        ]);
        (
            x * axes,
            [eigen.eigenvalues[top[0]], eigen.eigenvalues[top[1]]],
        )
    } else {
        let eigen = SymmetricEigen::new(&x * x.transpose());
        let top = leading(&eigen.eigenvalues, 2);
        let mut projected = DMatrix::zeros(n, 2);
        for (c, &k) in top.iter().enumerate() {
            let s = eigen.eigenvalues[k].max(0.0).sqrt();
            projected.set_column(c, &(eigen.eigenvectors.column(k) * s));
        }
        (
            projected,
            [eigen.eigenvalues[top[0]], eigen.eigenvalues[top[1]]],
        )
    };
    let (projected, variances) = coordinates;
    let share = |v: f64| if total > 0.0 { v.max(0.0) / total } else { 0.0 };
    Some(PcaMap {
        explained: [share(variances[0]), share(variances[1])],
        points: sample
            .iter()
            .enumerate()
            .map(|(i, r)| MapPoint {
                key: r.key.clone(),
                label: r.label.clone().unwrap_or_default(),
                x: projected[(i, 0)],
                y: projected[(i, 1)],
            })
            .collect(),
    })
}

/// Indices of the `k` largest eigenvalues, largest first.
fn leading(values: &nalgebra::DVector<f64>, k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(k);
    order
}

fn error_groups(errors: &[&Failure]) -> Vec<ErrorGroup> {
    let mut groups: BTreeMap<(&str, &str), ErrorGroup> = BTreeMap::new();
    for e in errors {
        let group = groups
            .entry((e.stage.as_str(), e.reason.as_str()))
            .or_insert_with(|| ErrorGroup {
                stage: e.stage.as_str().to_string(),
                reason: e.reason.clone(),
                count: 0,
                keys: Vec::new(),
            });
        group.count += 1;
        if group.keys.len() < 5 {
            group.keys.push(e.key.clone());
        }
    }
    let mut groups: Vec<ErrorGroup> = groups.into_values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    groups
}

/// Each run's commits over wall-clock time, from the commit records, runs in the order of
/// their first epoch.
fn throughput(commits: &[EpochCommit]) -> Vec<RunProgress> {
    let mut runs: Vec<RunProgress> = Vec::new();
    for m in commits {
        let (Some(committed), Some(started)) = (m.committed_ms, m.run_started_ms) else {
            continue;
        };
        let run = match runs.iter().position(|r| r.run == m.run) {
            Some(i) => &mut runs[i],
            None => {
                runs.push(RunProgress {
                    run: m.run.clone(),
                    commits: Vec::new(),
                    per_second: 0.0,
                });
                runs.last_mut().expect("just pushed")
            }
        };
        let objects = m.rows + m.errors;
        let total = run.commits.last().map_or(0, |c| c.total) + objects;
        let seconds = committed.saturating_sub(started) as f64 / 1000.0;
        run.commits.push(Commit {
            epoch: m.epoch,
            seconds,
            objects,
            total,
        });
        run.per_second = if seconds > 0.0 {
            total as f64 / seconds
        } else {
            0.0
        };
    }
    runs
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PAGE: &str = include_str!("report.html");

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: String, label: &str, embedding: Vec<f32>) -> Embedded {
        Embedded {
            columns: Vec::new(),
            key,
            etag: String::new(),
            label: Some(label.into()),
            width: 1,
            height: 1,
            embedding,
            prediction: None,
        }
    }

    /// Points spread along one direction (pairs of them off it by +-0.5 along another) in 6
    /// dimensions: PCA finds that direction first, the wobble second, in the covariance
    /// formulation (40 rows) and the Gram one (a sample of 4 rows fewer than 6 features).
    #[test]
    fn pca_finds_the_direction_of_largest_spread() {
        let direction = [0.6f32, 0.0, 0.8, 0.0, 0.0, 0.0];
        let t_of = |i: usize| (i / 2) as f32 - 9.5;
        let rows: Vec<Embedded> = (0..40)
            .map(|i| {
                let wobble = if i % 2 == 0 { 0.5 } else { -0.5 };
                let e = (0..6)
                    .map(|j| direction[j] * t_of(i) + if j == 1 { wobble } else { 0.0 } + 1.0)
                    .collect();
                row(format!("k{i}"), "l", e)
            })
            .collect();
        let refs: Vec<&Embedded> = rows.iter().collect();
        let map = pca_map(&refs, 40).unwrap();
        assert_eq!(map.points.len(), 40);
        // Variance along t: mean of t^2 = (20^2 - 1) / 12 = 33.25; along the wobble 0.25.
        let want = 33.25 / (33.25 + 0.25);
        assert!(
            (map.explained[0] - want).abs() < 1e-9,
            "{:?}",
            map.explained
        );
        assert!((map.explained[1] - (1.0 - want)).abs() < 1e-9);
        for p in &map.points {
            let i: usize = p.key[1..].parse().unwrap();
            // PC1 is +-t (the sign of an eigenvector is free), PC2 +-the wobble.
            assert!(
                (p.x.abs() - t_of(i).abs() as f64).abs() < 1e-4,
                "{}: {}",
                p.key,
                p.x
            );
            assert!((p.y.abs() - 0.5).abs() < 1e-4, "{}: {}", p.key, p.y);
        }
        let sample = pca_map(&refs, 4).unwrap();
        assert_eq!(sample.points.len(), 4);
        assert!(sample.explained[0] > 0.9, "{:?}", sample.explained);
        assert!(sample.explained[0] + sample.explained[1] <= 1.0 + 1e-9);
    }

    /// Throughput is each run's objects committed over its own clock; its rate is the
    /// slope to the last commit, not the sum of per-epoch rates (epochs overlap). Older
    /// commit records without commit times are left out.
    #[test]
    fn throughput_is_committed_objects_over_wall_clock_time_per_run() {
        let commit = |epoch, run: &str, started, committed, rows| EpochCommit {
            derivation: String::new(),
            epoch,
            run: run.into(),
            model: "m".into(),
            weights_sha256: String::new(),
            rows,
            errors: 0,
            files: Vec::new(),
            run_started_ms: started,
            committed_ms: committed,
            ..EpochCommit::default()
        };
        let runs = throughput(&[
            commit(0, "old", None, None, 5),
            commit(1, "r1", Some(1_000), Some(3_000), 100),
            // Committed 0.5 s after the first, but it was in flight alongside it.
            commit(2, "r1", Some(1_000), Some(3_500), 100),
            commit(3, "r2", Some(10_000), Some(14_000), 40),
        ]);
        let summary: Vec<(&str, f64)> = runs
            .iter()
            .map(|r| (r.run.as_str(), r.per_second))
            .collect();
        assert_eq!(summary, [("r1", 80.0), ("r2", 10.0)]);
        assert_eq!(
            runs[0].commits,
            [
                Commit {
                    epoch: 1,
                    seconds: 2.0,
                    objects: 100,
                    total: 100
                },
                Commit {
                    epoch: 2,
                    seconds: 2.5,
                    objects: 100,
                    total: 200
                },
            ]
        );
    }

    /// The page carries its data and no `</script>` from a key can break out of it.
    #[test]
    fn the_page_embeds_its_data_safely() {
        let rows = [
            row("a/</script><b>.jpg".into(), "a", vec![1.0, 0.0]),
            row("b/1.jpg".into(), "b", vec![0.0, 1.0]),
            row("b/2.jpg".into(), "b", vec![0.0, 2.0]),
        ];
        let table = Table {
            rows: rows.to_vec(),
            ..Table::default()
        };
        let options = ReportOptions {
            title: "out <1>".into(),
            max_points: 10,
            splits: crate::evaluate::Splits::default(),
        };
        let page = ReportData::gather(&table, None, &options).html();
        assert_eq!(page.matches("</script>").count(), 2, "only the page's own");
        assert!(page.contains("verger report: out &lt;1&gt;"));
        assert!(page.contains(r#""labels":[["a",1],["b",2]]"#));
    }
}
