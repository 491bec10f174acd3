//! Listing a store page by page on the I/O runtime, so that pages reach the dataflow as they
//! arrive instead of after the whole listing.

use std::sync::Arc;

use super::{Listing, ObjectMeta, StorageError};

/// Why a listing did not reach its end.
#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    /// The store refused a page.
    #[error("listing {location}, page {page}{}: {source}", after_key(.after))]
    Page {
        /// The input.
        location: String,
        /// Which page (1 for the first).
        page: u64,
        /// The last key of the page before (`None` on the first page).
        after: Option<String>,
        /// The store's error.
        #[source]
        source: StorageError,
    },
    /// The listing task panicked: the listing is incomplete.
    #[error(
        "listing {location}, page {page}{}: the listing task panicked: {message}",
        after_key(.after)
    )]
    Panicked {
        /// The input.
        location: String,
        /// The page being listed.
        page: u64,
        /// The last key listed before it.
        after: Option<String>,
        /// The panic's message.
        message: String,
    },
}

fn after_key(after: &Option<String>) -> String {
    after
        .as_ref()
        .map_or_else(String::new, |k| format!(" (after {k})"))
}

/// Pages of a listing as they arrive; the channel closes after the last page or an error.
pub type Pages = tokio::sync::mpsc::Receiver<Result<Vec<ObjectMeta>, ListingError>>;

/// Starts listing `prefix` of `store` on `runtime`; pages arrive on the returned channel.
/// A listing ends with its last page or with an error naming the page that failed; a panic
/// of the listing task is such an error too, never a silently shorter listing.
pub fn start_listing(
    runtime: &tokio::runtime::Handle,
    store: Arc<dyn Listing>,
    prefix: String,
    page_size: usize,
) -> Pages {
    // A few pages of look-ahead: listing stays ahead of processing without running away.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let location = store.location();
    // Where the listing is (page, last key listed), for the message of a panic.
    let progress: Arc<std::sync::Mutex<(u64, Option<String>)>> = Arc::default();
    let at = progress.clone();
    let pages = tx.clone();
    let task = runtime.spawn(async move {
        let mut token = None;
        for page in 1.. {
            let after = {
                let mut at = at.lock().unwrap_or_else(|e| e.into_inner());
                at.0 = page;
                at.1.clone()
            };
            match store.list_page(&prefix, token, page_size).await {
                Ok(listed) => {
                    if let Some(last) = listed.objects.last() {
                        at.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(last.key.clone());
                    }
                    if pages.send(Ok(listed.objects)).await.is_err() {
                        return; // the source stopped listening
                    }
                    match listed.next {
                        Some(next) => token = Some(next),
                        None => return,
                    }
                }
                Err(source) => {
                    let _ = pages
                        .send(Err(ListingError::Page {
                            location: store.location(),
                            page,
                            after,
                            source,
                        }))
                        .await;
                    return;
                }
            }
        }
    });
    runtime.spawn(async move {
        if let Err(e) = task.await {
            if let Ok(payload) = e.try_into_panic() {
                let (page, after) = progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let message = crate::panic::panic_message(payload.as_ref());
                let _ = tx
                    .send(Err(ListingError::Panicked {
                        location,
                        page,
                        after,
                        message,
                    }))
                    .await;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ListPage;

    /// A listing that gives one page, then panics (or fails) on the second.
    #[derive(Debug)]
    struct BrokenListing {
        panic: bool,
    }

    #[async_trait::async_trait]
    impl Listing for BrokenListing {
        fn location(&self) -> String {
            "broken://in".into()
        }
        async fn list_page(
            &self,
            _prefix: &str,
            token: Option<String>,
            _limit: usize,
        ) -> Result<ListPage, StorageError> {
            match token {
                None => Ok(ListPage {
                    objects: vec![ObjectMeta::new("a/1.jpg".into(), 1, "e".into())],
                    next: Some("t".into()),
                }),
                Some(_) if self.panic => panic!("listing bug"),
                Some(_) => Err(StorageError::Remote {
                    key: self.location(),
                    reason: "AccessDenied".into(),
                }),
            }
        }
    }

    /// A listing that breaks mid-way ends with an error naming the page, never with a
    /// closed channel that looks like the end of the input.
    #[test]
    fn a_listing_that_panics_or_fails_mid_way_is_an_error_naming_the_page() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        for panic in [true, false] {
            let store: Arc<dyn Listing> = Arc::new(BrokenListing { panic });
            let mut pages = start_listing(runtime.handle(), store, String::new(), 10);
            let first = pages.blocking_recv().unwrap().unwrap();
            assert_eq!(first.len(), 1);
            let err = pages
                .blocking_recv()
                .expect("an error, not the end of the listing")
                .unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("listing broken://in, page 2 (after a/1.jpg)"),
                "{text}"
            );
            let cause = if panic {
                "panicked: listing bug"
            } else {
                "AccessDenied"
            };
            assert!(text.contains(cause), "{text}");
            assert!(pages.blocking_recv().is_none());
        }
    }
}
