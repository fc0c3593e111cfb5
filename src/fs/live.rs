//! Keeping a mount in step with SOURCE: a thread polls the catalog every `interval` and,
//! when SOURCE changed (a backup finished, a set was deleted or rotated away), swaps in
//! the new tree. A new backup therefore shows within one interval plus one build.
//!
//! Polling, not inotify: backup folders are often NFS or CIFS shares, where inotify never
//! hears of files another host writes, and a poll is one walk of `lstat`s. The mount
//! opens stream files read-only and takes no lock in SOURCE, so backups keep writing
//! into it while it is mounted.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tracing::{info, warn};

use super::ImageFs;
use crate::catalog::Watched;

/// The polling thread; dropping it stops the thread.
pub struct Refresher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Refresher {
    pub fn start(fs: Arc<ImageFs>, mut watched: Watched, interval: Duration) -> Refresher {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut failing = false;
            loop {
                {
                    let mut done = stopped.0.lock();
                    if !*done {
                        stopped.1.wait_for(&mut done, interval);
                    }
                    if *done {
                        return;
                    }
                }
                match watched.poll() {
                    Ok(changed) => {
                        failing = false;
                        if let Some(catalog) = changed {
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
        Refresher { stop, thread: Some(thread) }
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
