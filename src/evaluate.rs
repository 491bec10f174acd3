//! Quality check of embeddings: nearest-class-centroid accuracy.
//!
//! Class centroids are the mean embeddings of the training rows; each test row is assigned the
//! class whose centroid is most cosine-similar. High accuracy with such a trivial classifier
//! shows the features separate the classes (what transfer learning needs).

use std::collections::BTreeMap;

use crate::record::Embedded;

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
        }
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
