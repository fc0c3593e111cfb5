//! Keeping a mount in step with SOURCE: a thread polls the catalog every `interval` and,
//! when SOURCE changed (a backup finished, a set was deleted or rotated away), swaps in
//! the new tree. A new backup therefore shows within one interval plus one build.
//!
//! Polling, not inotify: backup folders are often NFS or CIFS shares, where inotify never
//! hears of files another host writes, and a poll is one walk of `lstat`s. The mount
//! opens stream files read-only and takes no lock in SOURCE, so backups keep writing
//! into it while it is mounted.
//!
//! SOURCE gone (removed, unreadable, or its filesystem unmounted from under it) is not
//! an empty SOURCE: the mount keeps showing the last catalog (see [`Watched::poll`]).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::{info, warn};

use super::ImageFs;
use crate::catalog::Watched;

/// What the polling thread is at, as its owner sees it.
#[derive(Default)]
struct State {
    /// Set by the owner: the thread ends at its next look.
    stop: bool,
    /// A new tree is being swapped in (and the kept overlays of images that left it saved).
    refreshing: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// The polling thread; dropping it stops the thread. The drop waits for a refresh under
/// way, which saves the kept overlays of the images it takes out of the tree, but not
/// for a poll: a walk of SOURCE only reads, and on a hung NFS server it may never end,
/// which must not keep the process from exiting after the unmount.
pub struct Refresher {
    state: Shared,
}

/// Clears `refreshing` when the refresh ends, however it ends.
struct Refreshing<'a>(&'a Shared);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.0.lock().refreshing = false;
        self.0.1.notify_all();
    }
}

impl Refresher {
    pub fn start(fs: Arc<ImageFs>, mut watched: Watched, interval: Duration) -> Refresher {
        let state: Shared = Arc::default();
        let shared = state.clone();
        std::thread::spawn(move || {
            let mut failing = false;
            loop {
                {
                    let mut s = shared.0.lock();
                    if !s.stop {
                        shared.1.wait_for(&mut s, interval);
                    }
                    if s.stop {
                        return;
                    }
                }
                match watched.poll() {
                    Ok(changed) => {
                        failing = false;
                        if let Some(catalog) = changed {
                            let _refreshing = {
                                let mut s = shared.0.lock();
                                if s.stop {
                                    return;
                                }
                                s.refreshing = true;
                                Refreshing(&shared)
                            };
                            let (added, removed) = fs.refresh(&catalog);
                            info!("backup folder changed: {added} images added, {removed} removed");
                        }
                    }
                    // SOURCE unreachable (an NFS server down): keep serving what is mounted,
                    // and say so once, not every interval.
                    Err(e) => {
                        if !failing {
                            warn!("{}; showing the last catalog", crate::error_chain(&e));
                        }
                        failing = true;
                    }
                }
            }
        });
        Refresher { state }
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        let mut s = self.state.0.lock();
        s.stop = true;
        self.state.1.notify_all();
        while s.refreshing {
            self.state.1.wait(&mut s);
        }
    }
}
