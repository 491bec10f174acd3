//! Embed stage: decoded, labelled pictures to embedding rows, a batch at a time.

use timely::dataflow::StreamVec;

use super::Embedder;
use crate::metrics::Metrics;
use crate::operators::{batch_ok, StageContext};
use crate::record::{Embedded, Epoch, Failure, Labelled, Miss, Outcome, Stage};
use crate::stats::TimedStage;

/// The embed stage: runs the network on batches of at most `batch` pictures of an epoch (a
/// short batch once the epoch is complete here), and passes the objects that failed earlier
/// on as their outcome.
pub fn stage<'s>(
    labelled: StreamVec<'s, Epoch, Result<Labelled, Miss>>,
    ctx: &StageContext,
    embedder: Embedder,
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
                embed_batch(&embedder, pictures, &metrics)
            })
        },
        Outcome::from,
    )
}

/// Embeds a batch; if the backend fails, every image of the batch gets an error record.
pub fn embed_batch(embedder: &Embedder, batch: Vec<Labelled>, metrics: &Metrics) -> Vec<Outcome> {
    let pixels: Vec<&[u8]> = batch.iter().map(|l| l.pixels.rgb.as_slice()).collect();
    match embedder.embed(&pixels) {
        Ok(rows) => batch
            .into_iter()
            .zip(rows)
            .map(|(l, embedding)| {
                metrics.embedded.inc();
                Outcome::Row(Embedded {
                    key: l.key,
                    etag: l.etag,
                    label: l.label,
                    width: l.pixels.width,
                    height: l.pixels.height,
                    embedding,
                })
            })
            .collect(),
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
