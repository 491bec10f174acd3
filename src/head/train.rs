//! Training a head with Burn's autodiff on the CPU: standardised features, Adam with weight
//! decay, mini-batches in a seeded order, and early stopping on a validation split carved from
//! the training rows.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::model::{Head, HeadShape};
use super::HeadError;

/// How a head is trained. The defaults suit embeddings of a pretrained CNN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Units of a hidden layer (`None`: softmax regression).
    pub hidden: Option<usize>,
    /// Adam's step size.
    pub learning_rate: f64,
    /// L2 penalty on the weights (Adam's weight decay); `None`: 1 / training rows, the penalty
    /// of scikit-learn's `LogisticRegression(C=1)` on the mean loss.
    pub weight_decay: Option<f64>,
    /// Rows per optimisation step; `None`: one 200th of the training rows, at least 64 and at
    /// most 512 (small sets take many small steps, large ones fewer, cheaper passes).
    pub batch: Option<usize>,
    /// Passes over the training rows at most.
    pub max_epochs: usize,
    /// Passes without a better validation loss before training stops.
    pub patience: usize,
    /// Share of each label's training rows held out for validation.
    pub validation_share: f64,
    /// Seed of the initialisation, the validation split and the batch order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            hidden: None,
            learning_rate: 3e-3,
            weight_decay: None,
            batch: None,
            max_epochs: 300,
            patience: 10,
            validation_share: 0.1,
            seed: 42,
        }
    }
}

/// One labelled embedding to learn from.
#[derive(Clone, Copy, Debug)]
pub struct Example<'a> {
    /// The object's key (decides the validation split and nothing else).
    pub key: &'a str,
    /// The label.
    pub label: &'a str,
    /// The embedding.
    pub features: &'a [f32],
}

/// Loss and accuracy after one pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochScore {
    /// The pass, from 1.
    pub epoch: usize,
    /// Mean cross-entropy over the training rows' batches.
    pub train_loss: f64,
    /// Cross-entropy on the validation rows (`None` without any).
    pub validation_loss: Option<f64>,
    /// Accuracy on the validation rows.
    pub validation_accuracy: Option<f64>,
}

/// A trained head and how it got there.
#[derive(Debug)]
pub struct Trained {
    /// The head of the best epoch (lowest validation loss), on a plain CPU device.
    pub head: Head,
    /// Its shape.
    pub shape: HeadShape,
    /// The labels, in output order (sorted).
    pub labels: Vec<String>,
    /// Rows it learnt from and rows it validated on.
    pub rows: (usize, usize),
    /// The epoch kept.
    pub best_epoch: usize,
    /// Every epoch's scores.
    pub history: Vec<EpochScore>,
}

/// Trains a head on `examples` (rows of equal width, at least two labels).
pub fn train(examples: &[Example], config: &TrainConfig) -> Result<Trained, HeadError> {
    let mut labels: Vec<String> = examples.iter().map(|e| e.label.to_string()).collect();
    labels.sort();
    labels.dedup();
    if labels.len() < 2 {
        return Err(HeadError::TooFewLabels {
            labels: labels.len(),
            rows: examples.len(),
        });
    }
    let features = examples[0].features.len();
    if let Some(e) = examples.iter().find(|e| e.features.len() != features) {
        return Err(HeadError::Width {
            key: e.key.to_string(),
            width: e.features.len(),
            expected: features,
        });
    }
    let class = |label: &str| labels.binary_search_by(|l| l.as_str().cmp(label)).unwrap();
    let (fit, validation) = split(examples, config);
    let (mean, scale) = standardisation(&fit, features);
    let shape = HeadShape {
        features,
        hidden: config.hidden,
        classes: labels.len(),
    };

    let device = Device::flex().autodiff();
    device.seed(config.seed);
    let mut head = shape.init(&mean, &scale, &device);
    let tensors = |rows: &[&Example]| {
        let flat: Vec<f32> = rows
            .iter()
            .flat_map(|e| e.features.iter().copied())
            .collect();
        let targets: Vec<i64> = rows.iter().map(|e| class(e.label) as i64).collect();
        (
            Tensor::<2>::from_data(TensorData::new(flat, [rows.len(), features]), &device),
            Tensor::<1, Int>::from_data(TensorData::new(targets, [rows.len()]), &device),
        )
    };
    let (x, y) = tensors(&fit);
    let (vx, vy) = tensors(&validation);
    let loss = CrossEntropyLossConfig::new().init(&device);
    let mut optimizer = AdamConfig::new()
        .with_weight_decay(Some(WeightDecayConfig::new(
            config.weight_decay.unwrap_or(1.0 / fit.len() as f64) as f32,
        )))
        .init();

    let batch_rows = config
        .batch
        .unwrap_or((fit.len() / 200).clamp(64, 512))
        .max(1);
    let mut history = Vec::new();
    // The head kept: of the last epoch that reached the highest validation accuracy so far (a
    // tie goes to the later, better converged epoch: the weight decay, more than an early
    // stop, keeps it from overfitting); without validation rows, of the lowest training loss.
    // Training stops after `patience` epochs without progress: no higher validation accuracy
    // and no loss (validation, else training) lower by 0.1%.
    let (mut best, mut best_accuracy, mut best_epoch) = (head.valid(), f64::NEG_INFINITY, 0);
    let (mut lowest_loss, mut last_progress) = (f64::INFINITY, 0);
    for epoch in 1..=config.max_epochs {
        let order = shuffled(fit.len(), config.seed, epoch as u64);
        let mut total = 0.0;
        for batch in order.chunks(batch_rows) {
            let index = Tensor::<1, Int>::from_data(
                TensorData::new(batch.to_vec(), [batch.len()]),
                &device,
            );
            let logits = head.forward(x.clone().select(0, index.clone()));
            let l = loss.forward(logits, y.clone().select(0, index));
            total += l.clone().into_scalar::<f32>() as f64 * batch.len() as f64;
            let grads = GradientsParams::from_grads(l.backward(), &head);
            head = optimizer.step(config.learning_rate, head, grads);
        }
        let train_loss = total / fit.len() as f64;
        let score = if validation.is_empty() {
            (None, None)
        } else {
            let valid = head.valid();
            let logits = valid.forward(vx.clone().inner());
            let v_loss = loss.forward(logits.clone(), vy.clone().inner());
            let hits = logits
                .argmax(1)
                .squeeze_dim::<1>(1)
                .equal(vy.clone().inner());
            let accuracy = hits.int().sum().into_scalar::<i64>() as f64 / validation.len() as f64;
            (Some(v_loss.into_scalar::<f32>() as f64), Some(accuracy))
        };
        history.push(EpochScore {
            epoch,
            train_loss,
            validation_loss: score.0,
            validation_accuracy: score.1,
        });
        let watched_loss = score.0.unwrap_or(train_loss);
        let kept = match score.1 {
            Some(accuracy) => accuracy >= best_accuracy,
            None => watched_loss < lowest_loss,
        };
        if score.1.is_some_and(|a| a > best_accuracy) || watched_loss < lowest_loss * 0.999 {
            last_progress = epoch;
        }
        if kept {
            (best, best_epoch) = (head.valid(), epoch);
            best_accuracy = best_accuracy.max(score.1.unwrap_or(f64::NEG_INFINITY));
        }
        lowest_loss = lowest_loss.min(watched_loss);
        if epoch - last_progress >= config.patience {
            break;
        }
    }
    Ok(Trained {
        head: best,
        shape,
        labels,
        rows: (fit.len(), validation.len()),
        best_epoch,
        history,
    })
}

/// A validation split of fewer rows than this per label (on average) is not carved.
pub const MIN_VALIDATION_ROWS_PER_LABEL: usize = 5;

/// Training and validation rows: of each label's rows, ordered by a seeded hash of their key,
/// the first `validation_share` (rounded, at least one when the label has two rows or more)
/// validate, unless that makes fewer than [`MIN_VALIDATION_ROWS_PER_LABEL`] per label: then
/// every row trains and the epochs run until the training loss stops falling. The split
/// depends on the keys only, not on the order rows were committed in.
fn split<'e, 'a>(
    examples: &'e [Example<'a>],
    config: &TrainConfig,
) -> (Vec<&'e Example<'a>>, Vec<&'e Example<'a>>) {
    let mut by_label: std::collections::BTreeMap<&str, Vec<&Example>> = Default::default();
    for e in examples {
        by_label.entry(e.label).or_default().push(e);
    }
    let (mut fit, mut validation) = (Vec::new(), Vec::new());
    for rows in by_label.values_mut() {
        rows.sort_by_key(|e| (xxh3_64_with_seed(e.key.as_bytes(), config.seed), e.key));
        let held = if rows.len() < 2 || config.validation_share <= 0.0 {
            0
        } else {
            ((rows.len() as f64 * config.validation_share).round() as usize)
                .clamp(1, rows.len() - 1)
        };
        validation.extend(&rows[..held]);
        fit.extend(&rows[held..]);
    }
    if validation.len() < MIN_VALIDATION_ROWS_PER_LABEL * by_label.len() {
        // Too few to judge by: a few validation rows stop training at a lucky epoch, and
        // cost the head rows it needs (a few dozen per label).
        fit.append(&mut validation);
    }
    (fit, validation)
}

/// Per-feature mean and 1 / standard deviation of `rows` (1 where a feature is constant).
fn standardisation(rows: &[&Example], width: usize) -> (Vec<f32>, Vec<f32>) {
    let n = rows.len().max(1) as f64;
    let mut mean = vec![0f64; width];
    for e in rows {
        for (m, &v) in mean.iter_mut().zip(e.features) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; width];
    for e in rows {
        for ((s, &v), m) in var.iter_mut().zip(e.features).zip(&mean) {
            *s += (v as f64 - m).powi(2);
        }
    }
    let scale = var
        .iter()
        .map(|s| {
            let std = (s / n).sqrt();
            if std > 1e-12 {
                (1.0 / std) as f32
            } else {
                1.0
            }
        })
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), scale)
}

/// `0..n` in an order fixed by `seed` and `epoch`.
fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<i64> {
    let mut order: Vec<(u64, i64)> = (0..n as i64)
        .map(|i| {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&epoch.to_le_bytes());
            bytes[8..].copy_from_slice(&i.to_le_bytes());
            (xxh3_64_with_seed(&bytes, seed), i)
        })
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three noisy clusters in 16 dimensions, far apart along different axes.
    fn clusters(per_class: usize) -> Vec<(String, String, Vec<f32>)> {
        let mut rows = Vec::new();
        for (c, label) in ["a", "b", "c"].iter().enumerate() {
            for i in 0..per_class {
                let features = (0..16)
                    .map(|j| {
                        let noise = ((i * 31 + j * 17 + c * 7) % 23) as f32 / 23.0 - 0.5;
                        let centre = if j == c * 3 { 3.0 } else { 0.0 };
                        centre + noise + 10.0 // an offset standardisation removes
                    })
                    .collect();
                rows.push((format!("{label}/{i}.jpg"), label.to_string(), features));
            }
        }
        rows
    }

    fn examples(rows: &[(String, String, Vec<f32>)]) -> Vec<Example<'_>> {
        rows.iter()
            .map(|(key, label, features)| Example {
                key,
                label,
                features,
            })
            .collect()
    }

    /// Separable clusters are learnt exactly; the same seed gives the same weights; the
    /// validation split holds a tenth of each label and stopping keeps the best epoch.
    #[test]
    fn learns_separable_clusters_deterministically() {
        let rows = clusters(60);
        let config = TrainConfig {
            batch: Some(16),
            ..TrainConfig::default()
        };
        let trained = train(&examples(&rows), &config).unwrap();
        assert_eq!(trained.labels, ["a", "b", "c"]);
        assert_eq!(trained.rows, (162, 18));
        let features: Vec<&[f32]> = rows.iter().map(|r| r.2.as_slice()).collect();
        let p = trained.head.probabilities(&features);
        for (row, p) in rows.iter().zip(&p) {
            let best = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            assert_eq!(trained.labels[best], row.1, "{}: {p:?}", row.0);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        let last = trained.history.last().unwrap();
        let best = &trained.history[trained.best_epoch - 1];
        assert!(best.validation_loss <= last.validation_loss);
        assert_eq!(best.validation_accuracy, Some(1.0));

        let again = train(&examples(&rows), &config).unwrap();
        assert_eq!(
            again.head.probabilities(&features),
            p,
            "same seed, same head"
        );
    }

    /// One label is no classifier; rows of two widths are refused naming the odd one.
    #[test]
    fn refuses_one_label_and_ragged_rows() {
        let mut rows = clusters(3);
        rows.retain(|r| r.1 == "a");
        let err = train(&examples(&rows), &TrainConfig::default()).unwrap_err();
        assert!(
            matches!(err, HeadError::TooFewLabels { labels: 1, rows: 3 }),
            "{err}"
        );
        let mut rows = clusters(3);
        rows[4].2.pop();
        let err = train(&examples(&rows), &TrainConfig::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "row b/1.jpg has 15 features, the others 16"
        );
    }

    /// The validation rows depend on the keys, not on the order of the rows.
    #[test]
    fn the_validation_split_ignores_row_order() {
        let rows = clusters(50);
        let mut reversed = rows.clone();
        reversed.reverse();
        let keys = |rows: &[(String, String, Vec<f32>)]| {
            let examples = examples(rows);
            let (_, validation) = split(&examples, &TrainConfig::default());
            let mut keys: Vec<String> = validation.iter().map(|e| e.key.to_string()).collect();
            keys.sort();
            keys
        };
        let held = keys(&rows);
        assert_eq!(held.len(), 15, "five of each label's fifty");
        assert_eq!(held, keys(&reversed));
        assert!(
            keys(&clusters(40)).is_empty(),
            "four rows per label are too few to validate on: all train"
        );
    }
}
