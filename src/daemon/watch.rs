//! Reload triggers: SIGHUP, and changes to the config or key file.
//!
//! Files are watched through their folders, not directly: editors, `keygen`
//! and `keys revoke` replace a file by renaming a new one over it, which a
//! watch on the old file would miss. Events are filtered by file name and
//! debounced, so one save (often several events) causes one reload.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use log::{debug, warn};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// Quiet time after the last file event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// A stream of events never postpones a reload longer than this.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChanged,
}

/// Watches the folders of a set of files and sends [`Trigger::FileChanged`]
/// when one of those files is created, written, renamed or removed.
pub struct FileWatcher {
    watcher: RecommendedWatcher,
    dirs: BTreeSet<PathBuf>,
    files: std::sync::Arc<std::sync::Mutex<BTreeSet<(PathBuf, OsString)>>>,
}

impl FileWatcher {
    pub fn new(tx: Sender<Trigger>) -> notify::Result<FileWatcher> {
        let files: std::sync::Arc<std::sync::Mutex<BTreeSet<(PathBuf, OsString)>>> =
            Default::default();
        let seen = std::sync::Arc::clone(&files);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            // Reads (our own reload reading the file) must not trigger reloads.
            if matches!(event.kind, EventKind::Access(_) | EventKind::Other) {
                return;
            }
            let Ok(files) = seen.lock() else { return };
            let relevant = event.paths.iter().any(|p| {
                let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                    return false;
                };
                files.iter().any(|(d, n)| n == name && same_dir(d, dir))
            });
            if relevant {
                debug!("file event {:?} on {:?}", event.kind, event.paths);
                let _ = tx.send(Trigger::FileChanged);
            }
        })?;
        Ok(FileWatcher {
            watcher,
            dirs: BTreeSet::new(),
            files,
        })
    }

    /// Watches exactly `paths` from now on.
    pub fn set_files(&mut self, paths: &[&Path]) {
        let wanted: BTreeSet<(PathBuf, OsString)> = paths
            .iter()
            .filter_map(|p| {
                let abs = std::path::absolute(p).ok()?;
                Some((abs.parent()?.to_path_buf(), abs.file_name()?.to_os_string()))
            })
            .collect();
        let dirs: BTreeSet<PathBuf> = wanted.iter().map(|(d, _)| d.clone()).collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in dirs.difference(&self.dirs) {
            if let Err(e) = self.watcher.watch(new, RecursiveMode::NonRecursive) {
                warn!(
                    "cannot watch {} for changes: {e}; SIGHUP still reloads",
                    new.display()
                );
            }
        }
        self.dirs = dirs;
        if let Ok(mut files) = self.files.lock() {
            *files = wanted;
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || std::path::absolute(b).is_ok_and(|b| a == b)
}

/// Waits for the next trigger; a file change first waits for the writer to
/// go quiet. Returns `None` when every sender is gone.
pub fn next_trigger(rx: &Receiver<Trigger>) -> Option<Trigger> {
    let first = rx.recv().ok()?;
    if first == Trigger::Signal {
        return Some(first);
    }
    let start = Instant::now();
    let mut got_signal = false;
    loop {
        match rx.recv_timeout(DEBOUNCE) {
            Ok(Trigger::Signal) => got_signal = true,
            Ok(Trigger::FileChanged) => {}
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if start.elapsed() >= MAX_DELAY {
            break;
        }
    }
    Some(if got_signal {
        Trigger::Signal
    } else {
        Trigger::FileChanged
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_burst_of_file_events_is_one_trigger() {
        let (tx, rx) = channel();
        for _ in 0..5 {
            tx.send(Trigger::FileChanged).unwrap();
        }
        assert_eq!(next_trigger(&rx), Some(Trigger::FileChanged));
        assert!(rx.try_recv().is_err());
        tx.send(Trigger::Signal).unwrap();
        assert_eq!(next_trigger(&rx), Some(Trigger::Signal));
        drop(tx);
        assert_eq!(next_trigger(&rx), None);
    }

    #[test]
    fn rename_over_a_watched_file_is_seen_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.json");
        std::fs::write(&keys, "{}").unwrap();
        let (tx, rx) = channel();
        let mut w = FileWatcher::new(tx).unwrap();
        w.set_files(&[&keys]);
        std::fs::write(dir.path().join("other.txt"), "x").unwrap();
        std::fs::read_to_string(&keys).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        let tmp = dir.path().join("keys.json.tmp");
        std::fs::write(&tmp, "{ }").unwrap();
        std::fs::rename(&tmp, &keys).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Trigger::FileChanged
        );
    }
}
