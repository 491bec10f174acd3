//! `train`: how long `verger train` takes to fit a head on 100,000 rows of 1,280 features in
//! 131 classes (Fruits-360's full class count), softmax regression and one hidden layer of 256,
//! with the command's defaults (early stopping included). The rows are synthetic clusters, as
//! separable as real embeddings of distinct fruits. Prints the figures (no criterion samples). Run: `cargo bench --bench train`.

use std::time::Instant;
use verger::head::{train, Example, TrainConfig};

const ROWS: usize = 100_000;
const FEATURES: usize = 1280;
const CLASSES: usize = 131;

/// `ROWS` rows: each class a random centre, each row its centre plus noise of the same scale.
fn rows() -> (Vec<String>, Vec<String>, Vec<Vec<f32>>) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let centres: Vec<Vec<f32>> = (0..CLASSES)
        .map(|_| (0..FEATURES).map(|_| uniform()).collect())
        .collect();
    let (mut keys, mut labels, mut features) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ROWS {
        let c = i % CLASSES;
        keys.push(format!("Training/class{c}/{i}.jpg"));
        labels.push(format!("class{c}"));
        features.push(centres[c].iter().map(|&m| m + 2.0 * uniform()).collect());
    }
    (keys, labels, features)
}

/// Trains once per head shape and prints the time (a training takes seconds to a minute:
/// criterion's repeated samples would take many minutes for no better figure).
fn main() {
    let (keys, labels, features) = rows();
    let examples: Vec<Example> = (0..ROWS)
        .map(|i| Example {
            key: &keys[i],
            label: &labels[i],
            features: &features[i],
        })
        .collect();
    println!("{ROWS} rows x {FEATURES} features, {CLASSES} classes, `verger train` defaults");
    for hidden in [None, Some(256)] {
        let config = TrainConfig {
            hidden,
            ..TrainConfig::default()
        };
        let started = Instant::now();
        let trained = train(&examples, &config).expect("trains");
        let seconds = started.elapsed().as_secs_f64();
        let kept = &trained.history[trained.best_epoch - 1];
        println!(
            "hidden {:>4}: {seconds:6.1} s, {} epochs ({:.2} s each), kept epoch {}, validation accuracy {:.4}",
            hidden.map_or("none".to_string(), |h| h.to_string()),
            trained.history.len(),
            seconds / trained.history.len() as f64,
            trained.best_epoch,
            kept.validation_accuracy.unwrap_or(0.0)
        );
    }
}
