//! How well a head classifies a labelled split: accuracy, top-5, macro-F1, per-class
//! precision and recall, and the confusion matrix (what `metrics.json` holds).

use serde::{Deserialize, Serialize};

/// Precision, recall and F1 of one label.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// The label.
    pub label: String,
    /// Rows of this label in the split.
    pub support: u64,
    /// Of the rows predicted as this label, the share that has it (0 when none is).
    pub precision: f64,
    /// Of the rows of this label, the share predicted as it (0 without support).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
}

/// The scores of a head on one split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Rows scored.
    pub rows: u64,
    /// Share of rows whose most probable label is theirs.
    pub accuracy: f64,
    /// Share of rows whose label is among the five most probable.
    pub top5_accuracy: f64,
    /// Mean F1 over the labels that occur in the split or are predicted.
    pub macro_f1: f64,
    /// Per label, in the head's label order.
    pub classes: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`: row counts, in the head's label order.
    pub confusion: Vec<Vec<u64>>,
    /// Rows whose label the head was not trained on (scored as wrong; not in the matrix).
    pub unseen_label_rows: u64,
}

impl Metrics {
    /// Scores `probabilities` (one row per example, one column per label of `labels`) against
    /// `truth` (an index into `labels`, or `None` for a label the head does not know).
    pub fn score(labels: &[String], truth: &[Option<usize>], probabilities: &[Vec<f32>]) -> Self {
        let n = labels.len();
        let mut confusion = vec![vec![0u64; n]; n];
        let (mut correct, mut top5, mut unseen) = (0u64, 0u64, 0u64);
        for (truth, p) in truth.iter().zip(probabilities) {
            let mut ranked: Vec<usize> = (0..p.len()).collect();
            ranked.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let Some(t) = *truth else {
                unseen += 1;
                continue;
            };
            let predicted = ranked[0];
            confusion[t][predicted] += 1;
            correct += u64::from(predicted == t);
            top5 += u64::from(ranked.iter().take(5).any(|&c| c == t));
        }
        let classes: Vec<ClassMetrics> = labels
            .iter()
            .enumerate()
            .map(|(c, label)| {
                let tp = confusion[c][c] as f64;
                let support: u64 = confusion[c].iter().sum();
                let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
                let ratio = |num: f64, den: u64| if den == 0 { 0.0 } else { num / den as f64 };
                let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                ClassMetrics {
                    label: label.clone(),
                    support,
                    precision,
                    recall,
                    f1,
                }
            })
            .collect();
        let scored: Vec<&ClassMetrics> = classes
            .iter()
            .enumerate()
            .filter(|(c, m)| m.support > 0 || confusion.iter().any(|row| row[*c] > 0))
            .map(|(_, m)| m)
            .collect();
        let rows = truth.len() as u64;
        let share = |k: u64| {
            if rows == 0 {
                0.0
            } else {
                k as f64 / rows as f64
            }
        };
        Metrics {
            rows,
            accuracy: share(correct),
            top5_accuracy: share(top5),
            macro_f1: if scored.is_empty() {
                0.0
            } else {
                scored.iter().map(|m| m.f1).sum::<f64>() / scored.len() as f64
            },
            classes,
            confusion,
            unseen_label_rows: unseen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A hand-checked case: 3 labels, 6 rows, two mistakes.
    #[test]
    fn scores_a_small_confusion_by_hand() {
        let labels = labels(&["a", "b", "c"]);
        let one_hot = |c: usize| {
            let mut p = vec![0.1f32; 3];
            p[c] = 0.8;
            p
        };
        // truth:     a a b b c c ; predicted: a b b b c a
        let truth = [0, 0, 1, 1, 2, 2].map(Some);
        let probabilities = [0, 1, 1, 1, 2, 0].map(one_hot);
        let m = Metrics::score(&labels, &truth, &probabilities);
        assert_eq!(m.rows, 6);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(
            m.top5_accuracy, 1.0,
            "three labels: every label is in the top 5"
        );
        assert_eq!(
            m.confusion,
            vec![vec![1, 1, 0], vec![0, 2, 0], vec![1, 0, 1]]
        );
        // a: p 1/2 r 1/2 f 1/2; b: p 2/3 r 1 f 0.8; c: p 1 r 1/2 f 2/3.
        let f1: Vec<f64> = m.classes.iter().map(|c| c.f1).collect();
        for (got, want) in f1.iter().zip([0.5, 0.8, 2.0 / 3.0]) {
            assert!((got - want).abs() < 1e-12, "{f1:?}");
        }
        assert!((m.macro_f1 - (0.5 + 0.8 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!((m.classes[1].precision - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.classes[2].recall, 0.5);
    }

    /// A label the head never saw counts as a miss and stays out of the matrix; top-5 looks
    /// past the first guess.
    #[test]
    fn unseen_labels_are_misses_and_top5_ranks_by_probability() {
        let labels = labels(&["a", "b", "c", "d", "e", "f"]);
        let p = vec![0.05f32, 0.3, 0.2, 0.15, 0.1, 0.2];
        let truth = [Some(0), Some(2), None];
        let m = Metrics::score(&labels, &truth, &[p.clone(), p.clone(), p]);
        assert_eq!(m.unseen_label_rows, 1);
        assert_eq!(m.accuracy, 0.0);
        assert!(
            (m.top5_accuracy - 1.0 / 3.0).abs() < 1e-12,
            "c is 2nd, a is 6th"
        );
        assert_eq!(m.confusion.iter().flatten().sum::<u64>(), 2);
    }
}
