//! Quality check of embeddings: nearest-class-centroid accuracy.
//!
//! Class centroids are the mean embeddings of the training rows; each test row is assigned the
//! class whose centroid is most cosine-similar. High accuracy with such a trivial classifier
//! shows the features separate the classes (what transfer learning needs).

use std::collections::BTreeMap;

use crate::record::Embedded;

/// Which half of a labelled set a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Rows the centroids (or a classifier) learn from.
    Train,
    /// Rows that are scored.
    Test,
}

/// How keys name their split: by a folder named `train` or `test` anywhere in the key's path
/// (the folder nearest the file wins). The defaults, `Training` and `Test`, are Fruits-360's
/// layout (`Training/<class>/x.jpg`, `Test/<class>/y.jpg`); under a prefix
/// (`fruits/v2/Test/kiwi/y.jpg`) the split is still found. A key in neither is left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splits {
    /// Folder name of the training split.
    pub train: String,
    /// Folder name of the test split.
    pub test: String,
}

impl Default for Splits {
    fn default() -> Self {
        Self {
            train: "Training".to_string(),
            test: "Test".to_string(),
        }
    }
}

impl Splits {
    /// The split of `key`, if one of its folders names one.
    pub fn of(&self, key: &str) -> Option<Split> {
        key.split('/').rev().skip(1).find_map(|folder| {
            if folder == self.train {
                Some(Split::Train)
            } else if folder == self.test {
                Some(Split::Test)
            } else {
                None
            }
        })
    }

    /// The rows of each split: (train, test).
    pub fn partition<'a>(&self, rows: &[&'a Embedded]) -> (Vec<&'a Embedded>, Vec<&'a Embedded>) {
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for &row in rows {
            match self.of(&row.key) {
                Some(Split::Train) => train.push(row),
                Some(Split::Test) => test.push(row),
                None => {}
            }
        }
        (train, test)
    }
}

/// Accuracy of nearest-centroid classification of `test` with centroids from `train`, and
/// the number of test rows scored. Rows without a label are ignored.
pub fn nearest_centroid_accuracy(train: &[&Embedded], test: &[&Embedded]) -> (f64, usize) {
    let mut sums: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
    for row in train {
        let Some(label) = row.label.as_deref() else {
            continue;
        };
        let (sum, n) = sums
            .entry(label)
            .or_insert_with(|| (vec![0.0; row.embedding.len()], 0));
        for (s, &v) in sum.iter_mut().zip(&row.embedding) {
            *s += v as f64;
        }
        *n += 1;
    }
    let centroids: Vec<(&str, Vec<f64>)> = sums
        .into_iter()
        .map(|(label, (sum, n))| (label, sum.into_iter().map(|s| s / n as f64).collect()))
        .collect();
    let mut right = 0;
    let mut scored = 0;
    for row in test {
        let Some(label) = row.label.as_deref() else {
            continue;
        };
        let best = centroids
            .iter()
            .map(|(l, c)| (l, cosine(&row.embedding, c)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        scored += 1;
        if best.is_some_and(|(l, _)| *l == label) {
            right += 1;
        }
    }
    (right as f64 / scored.max(1) as f64, scored)
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let x = x as f64;
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-12)
}

/// Rows per label.
pub fn label_counts<'a>(rows: impl IntoIterator<Item = &'a Embedded>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for row in rows {
        *counts
            .entry(row.label.clone().unwrap_or_else(|| "(none)".into()))
            .or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, e: &[f32]) -> Embedded {
        Embedded {
            key: format!("{label}/x"),
            etag: String::new(),
            label: Some(label.into()),
            width: 1,
            height: 1,
            embedding: e.to_vec(),
            prediction: None,
        }
    }

    #[test]
    fn the_split_is_the_nearest_folder_named_so_under_any_prefix() {
        let splits = Splits::default();
        assert_eq!(splits.of("Training/kiwi/a.jpg"), Some(Split::Train));
        assert_eq!(splits.of("bucket/v2/Test/kiwi/a.jpg"), Some(Split::Test));
        assert_eq!(splits.of("Training/Test/a.jpg"), Some(Split::Test));
        assert_eq!(
            splits.of("Training.jpg"),
            None,
            "the file name is not a folder"
        );
        assert_eq!(
            splits.of("Trainingset/kiwi/a.jpg"),
            None,
            "whole folder names only"
        );
        let custom = Splits {
            train: "train".into(),
            test: "val".into(),
        };
        assert_eq!(custom.of("data/val/kiwi/a.jpg"), Some(Split::Test));
        assert_eq!(custom.of("Test/kiwi/a.jpg"), None);
    }

    #[test]
    fn separable_classes_score_one_and_swapped_labels_score_zero() {
        let train = [
            row("a", &[1.0, 0.0]),
            row("a", &[0.9, 0.1]),
            row("b", &[0.0, 1.0]),
        ];
        let test = [row("a", &[0.8, 0.3]), row("b", &[0.1, 0.9])];
        let t: Vec<_> = train.iter().collect();
        assert_eq!(
            nearest_centroid_accuracy(&t, &test.iter().collect::<Vec<_>>()),
            (1.0, 2)
        );
        let swapped = [row("b", &[0.8, 0.3]), row("a", &[0.1, 0.9])];
        assert_eq!(
            nearest_centroid_accuracy(&t, &swapped.iter().collect::<Vec<_>>()),
            (0.0, 2)
        );
    }
}
