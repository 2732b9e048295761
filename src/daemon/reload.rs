//! Reloading: re-read the config and the key file, validate them completely,
//! and only then swap the new snapshot in.
//!
//! Reloads run on a dedicated thread, never on a serving thread, so parsing
//! a large key file cannot stall requests. A failed reload changes nothing:
//! the running snapshot stays and the error is logged with the file and the
//! reason.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{error, info, warn};

use crate::cluster::Cluster;
use crate::config::LoadError;
use crate::keys::KeyId;
use crate::ops::{Live, Metrics, ReloadLog, ReloadSeen, SharedLive};
use crate::policy::load_timed;
use crate::state::Carried;

/// Rebuilds and swaps the shared snapshot.
pub struct Reloader {
    config_path: PathBuf,
    shared: SharedLive,
    metrics: Arc<Metrics>,
    carried: Arc<Carried>,
    /// Where keys newly disabled in the key file are published, so that
    /// instances whose copy of the file is older refuse them too.
    cluster: Option<Arc<Cluster>>,
    /// Each reload's time and result, for the status page.
    log: Arc<ReloadLog>,
}

impl Reloader {
    pub fn new(
        config_path: &Path,
        shared: SharedLive,
        metrics: Arc<Metrics>,
        carried: Arc<Carried>,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Reloader {
            config_path: config_path.to_path_buf(),
            shared,
            metrics,
            carried,
            cluster,
            log: Arc::default(),
        }
    }

    /// Records every reload in `log` from now on.
    pub fn recording(mut self, log: Arc<ReloadLog>) -> Reloader {
        self.log = log;
        self
    }

    /// The snapshot in service now.
    pub fn current(&self) -> Arc<Live> {
        self.shared.load_full()
    }

    /// Loads a new snapshot and swaps it in; on failure keeps the current one.
    /// `why` names the trigger in the log line (`SIGHUP`, a file change).
    pub fn reload(&self, why: &str) -> Result<u64, LoadError> {
        let result = self.load_and_swap(why);
        self.log.record(ReloadSeen {
            at: std::time::SystemTime::now(),
            why: why.to_string(),
            result: result.as_ref().map(|g| *g).map_err(ToString::to_string),
        });
        result
    }

    fn load_and_swap(&self, why: &str) -> Result<u64, LoadError> {
        let current = self.shared.load_full();
        let generation = current.snapshot.generation + 1;
        match load_timed(&self.config_path, generation, &self.carried) {
            Ok((snapshot, took)) => {
                let restart = current
                    .snapshot
                    .config
                    .restart_only_differences(&snapshot.config);
                if !restart.is_empty() {
                    warn!(
                        "reload ({why}): {} changed in {}; the new value needs a restart, the old one stays in effect",
                        restart.join(", "),
                        self.config_path.display()
                    );
                }
                for w in &snapshot.warnings {
                    warn!("{w}");
                }
                let summary = snapshot.summary();
                let named = snapshot.upstream_addrs();
                if let Some(cluster) = &self.cluster {
                    let before: HashSet<KeyId> = current.snapshot.keys.disabled_ids().collect();
                    let newly: Vec<KeyId> = snapshot
                        .keys
                        .disabled_ids()
                        .filter(|id| !before.contains(id))
                        .collect();
                    if !newly.is_empty() {
                        info!(
                            "reload ({why}): {} key(s) newly disabled, published to every instance",
                            newly.len()
                        );
                    }
                    cluster.publish_revoked(newly);
                }
                self.shared
                    .store(Arc::new(Live::new(snapshot, &self.metrics)));
                // Said once it serves: a line read as "the new config is
                // live" must be true when it is read.
                info!(
                    "reload ({why}): generation {generation}, {summary} in {} ms",
                    took.as_millis()
                );
                // Only now: until the swap, requests of the old snapshot
                // still report on upstreams the new one may have dropped.
                self.carried.upstreams.retain(&named);
                self.metrics.reloaded(true);
                Ok(generation)
            }
            Err(e) => {
                error!(
                    "reload ({why}) failed, still serving generation {}: {e}",
                    current.snapshot.generation
                );
                self.metrics.reloaded(false);
                Err(e)
            }
        }
    }
}
