//! One writer per output: the lease a run takes before it cleans up or commits anything.
//!
//! Without it, a second `verger run` on the same output (an accidental second launch, a
//! restart while the old process still drains) deletes the first one's staged files as
//! "leftovers" and commits manifests under the same epoch numbers.
//!
//! - **Local directory**: an exclusive lock (`flock`) on `_lease.json` in the output, held by
//!   the open file for as long as the process lives; the kernel drops it when the process
//!   ends, however it ends, so a crashed holder never blocks the next run. The file keeps the
//!   holder's description for the message a second run prints.
//! - **S3**: the object `_lease.json`, created with a conditional put (`If-None-Match: *`)
//!   and renewed every [`LeaseSettings::ttl`] / 3 with `If-Match` on the version the holder
//!   wrote last. A lease whose `expires` time has passed may be taken over (a crashed holder
//!   blocks the output for at most one TTL, 60 s by default); so may one whose holder ran on
//!   this host under a process id that no longer exists (a restart after `kill -9` does not
//!   wait). A holder that fails to renew, or finds its lease taken, stops committing.
//!
//! Expiry compares the holder's clock with the taker's: hosts whose clocks differ by more
//! than a few seconds need a TTL larger than the difference.

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::storage::{ObjectStore, StorageError};

/// Key of the lease in the output store.
pub const LEASE_KEY: &str = "_lease.json";

/// Who holds an output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Host name of the holder.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Its run id.
    pub run: String,
    /// When it took the lease (seconds since the Unix epoch).
    pub since: u64,
    /// When the lease lapses unless renewed (seconds since the Unix epoch; 0 for a local
    /// lock, which lapses with the process).
    pub expires: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = UNIX_EPOCH + Duration::from_secs(self.since);
        write!(
            f,
            "host {}, pid {}, since {}",
            self.host,
            self.pid,
            humantime::format_rfc3339_seconds(since)
        )?;
        if self.expires > 0 {
            let expires = UNIX_EPOCH + Duration::from_secs(self.expires);
            write!(
                f,
                ", lease expires {} unless renewed",
                humantime::format_rfc3339_seconds(expires)
            )?;
        }
        Ok(())
    }
}

/// Why the lease could not be taken or was lost.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another run holds the output.
    #[error(
        "{location} is in use by another verger run ({holder}); wait for it to finish, or \
         give this run another --output"
    )]
    Held {
        /// The output.
        location: String,
        /// The run holding it.
        holder: Holder,
    },
    /// The lease exists but cannot be read as one.
    #[error(
        "{location}: {LEASE_KEY} is not a verger lease ({reason}); if no run uses this output, \
         delete it"
    )]
    Unreadable {
        /// The output.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// How long a remote lease lasts without renewal.
#[derive(Clone, Copy, Debug)]
pub struct LeaseSettings {
    /// Time to live of a remote lease; renewed every third of it.
    pub ttl: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// This machine's host name ("unknown" if the OS does not say).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length, which is what is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether a process with id `pid` exists on this host.
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The writer lease of one output, held until dropped (local) or released (remote).
#[derive(Debug)]
pub struct Lease {
    kind: Kind,
    holder: Holder,
    lost: Arc<AtomicBool>,
}

#[derive(Debug)]
enum Kind {
    /// The locked file: the lock lives as long as this handle.
    Local { _locked: std::fs::File },
    /// The lease object and the version this holder wrote last.
    Remote {
        store: Arc<dyn ObjectStore>,
        etag: Arc<Mutex<String>>,
        renewal: Option<tokio::task::JoinHandle<()>>,
    },
}

impl Lease {
    /// Takes the lease of `store` for run `run`, or fails at once naming the holder.
    pub async fn acquire(
        store: Arc<dyn ObjectStore>,
        run: &str,
        settings: LeaseSettings,
    ) -> Result<Lease, LeaseError> {
        let holder = Holder {
            host: host_name(),
            pid: std::process::id(),
            run: run.to_string(),
            since: now_secs(),
            expires: 0,
        };
        match store.local_root() {
            Some(root) => Self::acquire_local(root, &store.location(), holder),
            None => Self::acquire_remote(store, holder, settings).await,
        }
    }

    fn acquire_local(root: &Path, location: &str, holder: Holder) -> Result<Lease, LeaseError> {
        let path = root.join(LEASE_KEY);
        let io = |source| {
            LeaseError::Storage(StorageError::Io {
                key: path.display().to_string(),
                source,
            })
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(match serde_json::from_str::<Holder>(&text) {
                    Ok(other) => LeaseError::Held {
                        location: location.to_string(),
                        holder: other,
                    },
                    Err(e) => LeaseError::Unreadable {
                        location: location.to_string(),
                        reason: format!("locked, but {e}"),
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let json = serde_json::to_vec_pretty(&holder).expect("a holder serialises");
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(&json).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Lease {
            kind: Kind::Local { _locked: file },
            holder,
            lost: Arc::default(),
        })
    }

    async fn acquire_remote(
        store: Arc<dyn ObjectStore>,
        mut holder: Holder,
        settings: LeaseSettings,
    ) -> Result<Lease, LeaseError> {
        let location = store.location();
        let ttl = settings.ttl.max(Duration::from_secs(3));
        // Bounded: each round either takes the lease or sees it change hands.
        for _ in 0..5 {
            holder.expires = now_secs() + ttl.as_secs();
            let body = Bytes::from(serde_json::to_vec_pretty(&holder).expect("serialises"));
            let taken = match store.put_new(LEASE_KEY, body.clone()).await {
                Ok(etag) => Some(etag),
                Err(StorageError::Exists { .. }) => {
                    let (bytes, etag) = match store.get_tagged(LEASE_KEY).await {
                        Ok(found) => found,
                        Err(StorageError::NotFound { .. }) => continue, // released meanwhile
                        Err(e) => return Err(e.into()),
                    };
                    let other: Holder =
                        serde_json::from_slice(&bytes).map_err(|e| LeaseError::Unreadable {
                            location: location.clone(),
                            reason: e.to_string(),
                        })?;
                    if other.run == holder.run && other.pid == holder.pid {
                        // Our own create, landed by a request whose answer was lost.
                        holder = other;
                        Some(etag)
                    } else {
                        let expired = other.expires <= now_secs();
                        let dead = other.host == holder.host && !process_exists(other.pid);
                        if !expired && !dead {
                            return Err(LeaseError::Held {
                                location,
                                holder: other,
                            });
                        }
                        tracing::warn!(
                            "taking over the lease of {location} from a run that is gone ({other})"
                        );
                        match store.put_if_match(LEASE_KEY, body, &etag).await {
                            Ok(etag) => Some(etag),
                            Err(StorageError::Changed { .. } | StorageError::NotFound { .. }) => {
                                None // someone else was quicker: look again
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(etag) = taken {
                let etag = Arc::new(Mutex::new(etag));
                let lost = Arc::new(AtomicBool::new(false));
                let renewal = tokio::spawn(renew(
                    store.clone(),
                    holder.clone(),
                    ttl,
                    etag.clone(),
                    lost.clone(),
                ));
                return Ok(Lease {
                    kind: Kind::Remote {
                        store,
                        etag,
                        renewal: Some(renewal),
                    },
                    holder,
                    lost,
                });
            }
        }
        Err(LeaseError::Unreadable {
            location,
            reason: "it kept changing hands while being taken".to_string(),
        })
    }

    /// Who holds it (this run).
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// A flag that turns true if the lease is lost (a remote lease not renewed in time, or
    /// taken over): the holder must stop committing.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }

    /// Whether the lease was lost.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// What gives this lease up without the handle: for a process that must exit while its
    /// workers (which hold the handle's owner) are stuck ([`crate::shutdown`]).
    pub fn releaser(&self) -> Releaser {
        match &self.kind {
            Kind::Local { .. } => Releaser(None),
            Kind::Remote { store, etag, .. } => Releaser(Some((store.clone(), etag.clone()))),
        }
    }

    /// Gives the lease up: the next run may take it at once.
    pub async fn release(mut self) -> Result<(), StorageError> {
        match &mut self.kind {
            Kind::Local { .. } => Ok(()), // unlocked when the file closes
            Kind::Remote {
                store,
                etag,
                renewal,
            } => {
                if let Some(task) = renewal.take() {
                    task.abort();
                    let _ = task.await;
                }
                delete_own_version(store.as_ref(), etag).await
            }
        }
    }
}

/// Gives a lease up on an early exit (see [`Lease::releaser`]).
#[derive(Clone)]
pub struct Releaser(Option<RemoteLease>);

/// A remote lease: the store holding the lease object, and the version this holder wrote last.
type RemoteLease = (Arc<dyn ObjectStore>, Arc<Mutex<String>>);

impl Releaser {
    /// Deletes the lease object if it is still this holder's version (a local lease is
    /// unlocked by the kernel when the process ends).
    pub async fn release(&self) -> Result<(), StorageError> {
        match &self.0 {
            None => Ok(()),
            Some((store, etag)) => delete_own_version(store.as_ref(), etag).await,
        }
    }
}

/// Deletes the lease object only if it is still the version this holder wrote last (a lost
/// lease belongs to someone else now).
async fn delete_own_version(
    store: &dyn ObjectStore,
    etag: &Mutex<String>,
) -> Result<(), StorageError> {
    let ours = etag.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match store.get_tagged(LEASE_KEY).await {
        Ok((_, current)) if current == ours => store.delete(LEASE_KEY).await,
        Ok(_) | Err(StorageError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Kind::Remote {
            renewal: Some(task),
            ..
        } = &self.kind
        {
            task.abort();
        }
    }
}

/// Rewrites the lease every third of `ttl`, conditional on the version written last; marks
/// it lost if another writer replaced it, or if renewals kept failing until it expired.
async fn renew(
    store: Arc<dyn ObjectStore>,
    mut holder: Holder,
    ttl: Duration,
    etag: Arc<Mutex<String>>,
    lost: Arc<AtomicBool>,
) {
    let mut valid_until = holder.expires;
    loop {
        tokio::time::sleep(ttl / 3).await;
        holder.expires = now_secs() + ttl.as_secs();
        let body = Bytes::from(serde_json::to_vec_pretty(&holder).expect("serialises"));
        let current = etag.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match store.put_if_match(LEASE_KEY, body, &current).await {
            Ok(new) => {
                *etag.lock().unwrap_or_else(|e| e.into_inner()) = new;
                valid_until = holder.expires;
            }
            Err(e @ (StorageError::Changed { .. } | StorageError::NotFound { .. })) => {
                tracing::error!(
                    "lost the lease of {}: {e}; no more epochs are committed",
                    store.location()
                );
                lost.store(true, Ordering::Release);
                return;
            }
            Err(e) if now_secs() >= valid_until => {
                tracing::error!(
                    "could not renew the lease of {} before it expired: {e}; no more epochs \
                     are committed",
                    store.location()
                );
                lost.store(true, Ordering::Release);
                return;
            }
            Err(e) => tracing::warn!("renewing the lease of {}: {e}", store.location()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::LocalStore;

    #[tokio::test]
    async fn a_second_local_lease_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path(), false).unwrap());
        let first = Lease::acquire(store.clone(), "run-a", LeaseSettings::default())
            .await
            .unwrap();
        let err = Lease::acquire(store.clone(), "run-b", LeaseSettings::default())
            .await
            .unwrap_err();
        let LeaseError::Held { holder, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(
            (holder.run.as_str(), holder.pid),
            ("run-a", std::process::id())
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id()))
                && message.contains(&host_name())
                && message.contains("since"),
            "{message}"
        );
        drop(first);
        let second = Lease::acquire(store, "run-b", LeaseSettings::default())
            .await
            .unwrap();
        assert_eq!(second.holder().run, "run-b");
    }

    #[test]
    fn this_process_exists_and_an_unused_pid_does_not() {
        assert!(process_exists(std::process::id()));
        assert!(!process_exists(i32::MAX as u32));
    }
}
