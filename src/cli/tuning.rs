//! Process tuning before a run starts: the allocator's arenas, and a warning about more
//! workers than cores.

use super::args::{default_workers, MAX_WORKERS_PER_CORE};

/// Caps glibc's malloc arenas at one per worker (at least 2) unless `MALLOC_ARENA_MAX` is set.
/// With glibc's default (8 per core), the short-lived allocations of many threads (timely
/// workers, tokio I/O threads) spread over arenas that keep their freed memory, and peak RSS
/// creeps up with the length of the run. Measured, `verger bench --workers 2`: peak RSS
/// 132 MiB at 5,000 images and 153 MiB at 50,000 (+16%) by default, 108 and 115 MiB (+6.5%)
/// with 2 arenas, at the same images/s.
pub fn limit_malloc_arenas(workers: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let arenas = workers.clamp(2, 1024) as libc::c_int;
        // SAFETY: mallopt only sets an allocator parameter; this runs before the job's
        // threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = workers;
}

/// Refuses more than [`MAX_WORKERS_PER_CORE`] workers per core unless `oversubscribe`: a
/// slip like `-w 100000` would otherwise start that many threads, each with its own buffers,
/// until the machine runs out of memory.
pub fn check_worker_count(workers: usize, oversubscribe: bool) -> Result<(), String> {
    let cores = default_workers();
    let bound = MAX_WORKERS_PER_CORE * cores;
    if workers > bound && !oversubscribe {
        return Err(format!(
            "-w {workers} is more than {MAX_WORKERS_PER_CORE} workers per core ({cores} cores \
             here, so at most {bound}); one worker per core is fastest, and --oversubscribe \
             allows more"
        ));
    }
    Ok(())
}

/// Warns when there are many more workers than cores: they compete for the cores, and every
/// worker holds its own batch of decoded images and activations.
pub fn warn_oversubscription(workers: usize) {
    let cores = default_workers();
    if workers > 2 * cores {
        tracing::warn!(
            "-w {workers} is far above the {cores} cores this process may use: the workers \
             compete for them (slower, more memory); one worker per core is fastest"
        );
    }
}
