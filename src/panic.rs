//! Caught panics as messages: what a stage, a listing task or a decoder panicked with.

use std::any::Any;

/// The message of a caught panic (`"(no message)"` when it carried none).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".to_string())
}
