//! The one way a process ends before its run does: a lost peer or a cluster that never
//! connected. Timely gives no way to unwind workers blocked on a dead peer, so the process
//! exits, but first runs the clean-ups the job registered while it held them: the output's
//! lease released (a restart, from any host, takes it at once instead of waiting for it to
//! expire) and this process's staging folder removed. The normal end of a run does the same
//! clean-ups itself and unregisters them.

use std::sync::Mutex;

/// A clean-up to run before an early exit.
type Cleanup = Box<dyn FnOnce() + Send>;

/// Registered clean-ups, by id.
static CLEANUPS: Mutex<Vec<(u64, Cleanup)>> = Mutex::new(Vec::new());

/// Registration of a clean-up; dropping it unregisters the clean-up (the run ended normally
/// and cleaned up by itself).
#[derive(Debug)]
#[must_use = "dropping the registration unregisters the clean-up"]
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        let mut cleanups = CLEANUPS.lock().unwrap_or_else(|e| e.into_inner());
        cleanups.retain(|(id, _)| *id != self.0);
    }
}

/// Runs `cleanup` if the process exits early ([`exit`]) while the returned registration is
/// alive.
pub fn on_early_exit(cleanup: impl FnOnce() + Send + 'static) -> Registered {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut cleanups = CLEANUPS.lock().unwrap_or_else(|e| e.into_inner());
    cleanups.push((id, Box::new(cleanup)));
    Registered(id)
}

/// Runs the registered clean-ups, newest first, each at most once, and returns how many ran.
/// Each runs on a thread of its own: [`exit`] may be called from a panic hook, where a second
/// panic would abort the process, and one that panics does not keep the others from running.
pub fn run_cleanups() -> usize {
    let cleanups = std::mem::take(&mut *CLEANUPS.lock().unwrap_or_else(|e| e.into_inner()));
    let n = cleanups.len();
    for (_, cleanup) in cleanups.into_iter().rev() {
        let _ = std::thread::Builder::new()
            .name("verger-cleanup".to_string())
            .spawn(cleanup)
            .map(std::thread::JoinHandle::join);
    }
    n
}

/// Ends the process with `code` after the registered clean-ups.
pub fn exit(code: i32) -> ! {
    run_cleanups();
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Registered clean-ups run once, newest first, a panicking one does not stop the others,
    /// and an unregistered one does not run.
    #[test]
    fn registered_cleanups_run_once_newest_first() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let dropped = Arc::new(AtomicUsize::new(0));
        let push = |n: u32| {
            let order = order.clone();
            move || order.lock().unwrap().push(n)
        };
        let _first = on_early_exit(push(1));
        let _panics = on_early_exit(|| panic!("a clean-up that fails"));
        let gone = {
            let dropped = dropped.clone();
            on_early_exit(move || {
                dropped.fetch_add(1, Ordering::Relaxed);
            })
        };
        let _last = on_early_exit(push(3));
        drop(gone);
        assert_eq!(run_cleanups(), 3);
        assert_eq!(*order.lock().unwrap(), [3, 1]);
        assert_eq!(dropped.load(Ordering::Relaxed), 0, "unregistered");
        assert_eq!(run_cleanups(), 0, "each runs once");
    }
}
