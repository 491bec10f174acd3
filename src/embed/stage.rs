//! Embed stage: decoded, labelled pictures to embedding rows, a batch at a time.

use timely::dataflow::StreamVec;

use std::sync::Arc;

use super::Embedder;
use crate::head::SavedHead;
use crate::metrics::Metrics;
use crate::operators::{batch_ok, StageContext};
use crate::record::{Embedded, Epoch, Failure, Labelled, Miss, Outcome, Stage};
use crate::stats::TimedStage;

/// The embed stage: runs the network on batches of at most `batch` pictures of an epoch (a
/// short batch once the epoch is complete here), then the head if there is one, and passes
/// the objects that failed earlier on as their outcome.
pub fn stage<'s>(
    labelled: StreamVec<'s, Epoch, Result<Labelled, Miss>>,
    ctx: &StageContext,
    (embedder, head): (Embedder, Option<Arc<SavedHead>>),
    batch: usize,
) -> StreamVec<'s, Epoch, Outcome> {
    let (clock, metrics) = (ctx.clock.clone(), ctx.metrics.clone());
    batch_ok(
        labelled,
        "Embed",
        ctx,
        batch,
        move |pictures| {
            clock.time(TimedStage::Embed, || {
                embed_batch((&embedder, head.as_deref()), pictures, &metrics)
            })
        },
        Outcome::from,
    )
}

/// Embeds a batch (and predicts its labels with `head`); if the backend fails, every image
/// of the batch gets an error record.
pub fn embed_batch(
    (embedder, head): (&Embedder, Option<&SavedHead>),
    batch: Vec<Labelled>,
    metrics: &Metrics,
) -> Vec<Outcome> {
    let pixels: Vec<&[u8]> = batch.iter().map(|l| l.pixels.rgb.as_slice()).collect();
    match embedder.embed(&pixels) {
        Ok(rows) => {
            let predictions: Vec<_> = match head {
                Some(head) => {
                    let features: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
                    head.predict(&features).into_iter().map(Some).collect()
                }
                None => vec![None; rows.len()],
            };
            batch
                .into_iter()
                .zip(rows.into_iter().zip(predictions))
                .map(|(l, (embedding, prediction))| {
                    metrics.embedded.inc();
                    Outcome::Row(Embedded {
                        key: l.key,
                        etag: l.etag,
                        label: l.label,
                        columns: l.columns,
                        width: l.pixels.width,
                        height: l.pixels.height,
                        embedding,
                        prediction,
                    })
                })
                .collect()
        }
        Err(e) => batch
            .into_iter()
            .map(|l| {
                Outcome::Failed(Failure {
                    key: l.key,
                    etag: l.etag,
                    stage: Stage::Embed,
                    reason: e.to_string(),
                })
            })
            .collect(),
    }
}
