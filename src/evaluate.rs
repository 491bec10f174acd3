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

/// How keys name their split.
///
/// [`Splits::Folders`]: by a folder named as one of `train` or `test` anywhere in the key's path
/// (the folder nearest the file wins). The defaults, `Training` and `Test`, are Fruits-360's
/// layout (`Training/<class>/x.jpg`, `Test/<class>/y.jpg`); under a prefix
/// (`fruits/v2/Test/kiwi/y.jpg`) the split is still found. A key in neither is left out.
///
/// [`Splits::Hash`]: for a collection without split folders, a share of the keys, chosen by a
/// hash of the key (XXH3, a published algorithm: the same keys on every machine and run, and a
/// key keeps its split as the collection grows), is the test split; every other key trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Splits {
    /// Folder names of each split.
    Folders {
        /// Folder names of the training split.
        train: Vec<String>,
        /// Folder names of the test split.
        test: Vec<String>,
    },
    /// A share of the keys, by hash, is the test split.
    Hash {
        /// The test split's share of the keys, in (0, 1).
        test_share: f64,
    },
}

impl Default for Splits {
    fn default() -> Self {
        Splits::Folders {
            train: vec!["Training".to_string()],
            test: vec!["Test".to_string()],
        }
    }
}

impl Splits {
    /// The split of `key`, if one of its folders names one (always one for a hash split).
    pub fn of(&self, key: &str) -> Option<Split> {
        match self {
            Splits::Folders { train, test } => key.split('/').rev().skip(1).find_map(|folder| {
                if train.iter().any(|t| t == folder) {
                    Some(Split::Train)
                } else if test.iter().any(|t| t == folder) {
                    Some(Split::Test)
                } else {
                    None
                }
            }),
            Splits::Hash { test_share } => {
                let hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
                // The hash's top 53 bits as a fraction in [0, 1).
                let position = (hash >> 11) as f64 / (1u64 << 53) as f64;
                Some(if position < *test_share {
                    Split::Test
                } else {
                    Split::Train
                })
            }
        }
    }

    /// The training split, as output lines name it: its folder names joined by `+`
    /// (`Training`, `train+extra`), or `hash 0.8` for a hash split.
    pub fn train_name(&self) -> String {
        match self {
            Splits::Folders { train, .. } => train.join("+"),
            Splits::Hash { test_share } => format!("hash {}", 1.0 - test_share),
        }
    }

    /// The test split, as output lines name it (`Test`, `val+holdout`, `hash 0.2`).
    pub fn test_name(&self) -> String {
        match self {
            Splits::Folders { test, .. } => test.join("+"),
            Splits::Hash { test_share } => format!("hash {test_share}"),
        }
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
            columns: Vec::new(),
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
        let custom = Splits::Folders {
            train: vec!["train".into(), "extra".into()],
            test: vec!["val".into(), "holdout".into()],
        };
        assert_eq!(custom.of("data/val/kiwi/a.jpg"), Some(Split::Test));
        assert_eq!(custom.of("data/holdout/kiwi/a.jpg"), Some(Split::Test));
        assert_eq!(custom.of("extra/kiwi/a.jpg"), Some(Split::Train));
        assert_eq!(custom.of("Test/kiwi/a.jpg"), None);
        assert_eq!(custom.test_name(), "val+holdout");
        assert_eq!(Splits::default().train_name(), "Training");
        assert_eq!(Splits::Hash { test_share: 0.25 }.train_name(), "hash 0.75");
    }

    #[test]
    fn a_hash_split_takes_its_share_of_the_keys_the_same_way_every_time() {
        let splits = Splits::Hash { test_share: 0.2 };
        let keys: Vec<String> = (0..10_000)
            .map(|i| format!("field{}/crop/IMG_{i:05}.jpg", i % 7))
            .collect();
        let test: Vec<&String> = keys
            .iter()
            .filter(|k| splits.of(k) == Some(Split::Test))
            .collect();
        let share = test.len() as f64 / keys.len() as f64;
        assert!((0.18..0.22).contains(&share), "test share {share}");
        assert!(
            keys.iter().all(|k| splits.of(k).is_some()),
            "every key has a split"
        );
        // The same keys again (another run, another machine), and a key keeps its split when
        // others are added.
        let again: Vec<&String> = keys
            .iter()
            .filter(|k| splits.of(k) == Some(Split::Test))
            .collect();
        assert_eq!(test, again);
        // Pinned: a change of hash (which would move rows between the splits of an existing
        // collection) changes this count.
        assert_eq!(test.len(), 1984);
        let wider = Splits::Hash { test_share: 0.5 };
        assert!(
            test.iter().all(|k| wider.of(k) == Some(Split::Test)),
            "a wider share keeps the narrower one's test keys"
        );
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
