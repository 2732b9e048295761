//! `ai-gateway run`: build the Pingora server around the gateway and run it
//! in the foreground until SIGTERM or SIGINT.
//!
//! Owns: start-up, the proxy services and their listeners (one service per
//! core: [`services`]), reloads (SIGHUP and file changes), the active
//! health checker, the audit log's writer, the budget alerts' sender,
//! and shutdown. The only layer
//! that spawns threads, binds sockets or builds the Pingora `Server`
//! (`cluster` and `proxy::connection` spawn tasks on runtimes it made).
//!
//! May import: every other layer.

mod alerts;
mod handshake;
mod health_check;
mod memory;
mod reload;
pub mod services;
mod tls;
mod watch;

pub use health_check::probe;
pub use memory::configure_allocator;
pub use reload::Reloader;
pub use watch::DEBOUNCE;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use log::{error, info, warn};
use pingora::server::configuration::Opt;
use pingora::server::{ExecutionPhase, Server};
use pingora::services::listening::Service as ListeningService;
use prometheus::IntGauge;
use signal_hook::consts::{SIGHUP, SIGUSR1};
use signal_hook::iterator::Signals;

use self::tls::TlsListeners;
use self::watch::{next_trigger, FileWatcher, Trigger};
use crate::admin::{rebuild, Admin, Control, RebuildState};
use crate::cluster::Cluster;
use crate::config::{AuditDest, LoadError, OnRedisError};
use crate::ops::{AuditLog, History, Live, Metrics, ReloadLog, SharedLive};
use crate::policy::{load_timed, Snapshot};
use crate::proxy::{Gateway, GatewayParts, Listeners};
use crate::state::Carried;
use crate::tls::Challenges;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot set up shared state: {0}")]
    SharedState(String),
    #[error("cannot open the audit log {path}: {source}")]
    Audit {
        path: String,
        source: std::io::Error,
    },
}

/// Catches SIGHUP (reload) and SIGUSR1 (reopen the audit log) and queues
/// them until the reloader runs. Called first thing in `main`, so that a
/// SIGHUP during start-up cannot kill the process.
pub fn catch_signals() -> std::io::Result<Signals> {
    Signals::new([SIGHUP, SIGUSR1])
}

/// Starts the gateway on the config at `config_path`. Returns only on a
/// start-up failure; once serving, the process exits from Pingora's
/// shutdown path (or from the drain watcher, below). With `upgrade`, the
/// listening sockets are taken over from a running gateway instead of bound.
pub fn run(config_path: &Path, upgrade: bool, signals: Signals) -> Result<(), StartError> {
    let carried = Arc::new(Carried::default());
    let (snapshot, took) = load_timed(config_path, 1, &carried)?;
    for w in &snapshot.warnings {
        warn!("{w}");
    }
    let config = snapshot.config.clone();
    if !upgrade {
        check_binds(&config)?;
    }
    exit_if_listeners_fail();
    memory::release_free_memory();
    info!(
        "loaded {}: {} in {} ms",
        config_path.display(),
        snapshot.summary(),
        took.as_millis()
    );
    info!("{}", config.clients.describe());

    let metrics = Arc::new(Metrics::new());
    let tls = Arc::new(TlsListeners::load(&config, Arc::clone(&metrics))?);
    let challenges = Arc::new(Challenges::default());
    let (audit, history) = open_audit(&config, &metrics)?;
    let reloads = Arc::new(ReloadLog::default());
    let shared: SharedLive = Arc::new(ArcSwap::from_pointee(Live::new(snapshot, &metrics)));
    // The zero of the monotonic clock per-key windows are kept in, for the
    // proxy and the cluster alike.
    let epoch = Instant::now();
    let cluster = match &config.shared_state {
        None => None,
        Some(spec) => Some(start_cluster(spec, &metrics, &carried, epoch)?),
    };
    alerts::start(&carried, Arc::clone(&metrics));
    let reloader = Arc::new(Mutex::new(
        Reloader::new(
            config_path,
            Arc::clone(&shared),
            Arc::clone(&metrics),
            Arc::clone(&carried),
            cluster.clone(),
        )
        .recording(Arc::clone(&reloads)),
    ));
    start_reloader(
        Arc::clone(&reloader),
        Arc::clone(&tls),
        audit.clone(),
        signals,
    );

    let grace = config.shutdown_grace;
    let opt = Opt {
        upgrade,
        daemon: false,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server =
        Server::new_with_opt_and_conf(opt, services::server_conf(&config, config.threads));
    // On an upgrade this receives the listening sockets from the old
    // process (and exits 1 if there is none to receive them from).
    server.bootstrap();

    let threads = if upgrade && services::inherited_without_reuseport(&config.listen) {
        warn!(
            "the listening sockets came from a gateway without per-core services: \
             one proxy service of {} threads serves them until the next restart",
            config.threads
        );
        vec![config.threads]
    } else {
        services::layout(config.threads, &config.listen, config.admin_listen)
    };
    let parts = GatewayParts {
        live: Arc::clone(&shared),
        carried: Arc::clone(&carried),
        metrics: Arc::clone(&metrics),
        audit,
        listeners: Listeners::new(&config.listeners, Arc::clone(&challenges)),
        cluster,
        started: epoch,
    };
    let admin = config.admin_listen.map(|addr| {
        let control = Arc::new(DaemonControl { reloader });
        (addr, admin_of(&config, &parts, history, control, reloads))
    });
    let gateway = Gateway::from(parts);
    services::add_proxy_services(
        &mut server,
        &config,
        &threads,
        &gateway,
        &tls,
        &shared,
        &metrics,
    );
    let plain = config
        .listeners
        .iter()
        .find(|l| !l.is_tls())
        .map(|l| l.addr);
    tls.start_acme(Arc::clone(&challenges), plain);

    if let Some((addr, admin)) = admin {
        add_admin(&mut server, addr, admin);
    }

    let checked = Arc::clone(&shared);
    spawn_thread("health-checker", move || health_check::run_checker(checked));

    let phases = server.watch_execution_phase();
    let in_flight = metrics.in_flight.clone();
    spawn_thread("drain-watcher", move || {
        drain_watcher(phases, in_flight, grace)
    });

    server.run_forever()
}

/// Pingora binds in a service task and, when that fails, keeps running
/// with no listener: bind each address once here, where a clear exit is
/// possible. (Not on an upgrade: the old process still holds them.)
fn check_binds(config: &crate::config::Config) -> Result<(), StartError> {
    for addr in config.listen.iter().chain(config.admin_listen.iter()) {
        TcpListener::bind(addr).map_err(|source| StartError::Bind {
            addr: *addr,
            source,
        })?;
    }
    Ok(())
}

/// The status page's history, fed by the audit writer, and the state of
/// its rebuild from the audit log at start.
type Histories = (Option<Arc<History>>, Arc<RebuildState>);

/// Opens the audit log (when the config has one) and, with a file, the
/// history the status page charts: rebuilt from the file on a thread of
/// its own (the gateway serves meanwhile) up to what the file held before
/// this process wrote to it; the writer counts what comes after.
fn open_audit(
    config: &crate::config::Config,
    metrics: &Metrics,
) -> Result<(Option<AuditLog>, Histories), StartError> {
    let rebuild = Arc::new(RebuildState::default());
    let Some(dest) = &config.audit_log else {
        return Ok((None, (None, rebuild)));
    };
    let (AuditDest::File(path), Some(_)) = (dest, config.admin_listen) else {
        // Nothing would read a history (no admin listener), or nothing
        // could rebuild it (stderr).
        return Ok((Some(start_audit(dest, metrics, None)?), (None, rebuild)));
    };
    let history = Arc::new(History::default());
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    let audit = start_audit(dest, metrics, Some(&history))?;
    let (h, path, state) = (Arc::clone(&history), path.clone(), Arc::clone(&rebuild));
    spawn_thread("history-rebuild", move || {
        rebuild::rebuild_into(&h, &path, len, &state);
    });
    Ok((Some(audit), (Some(history), rebuild)))
}

/// The admin listener's endpoints, over what the proxy serves from.
fn admin_of(
    config: &crate::config::Config,
    parts: &GatewayParts,
    (history, rebuild): Histories,
    control: Arc<dyn Control>,
    reloads: Arc<ReloadLog>,
) -> Admin {
    Admin {
        metrics: Arc::clone(&parts.metrics),
        live: Arc::clone(&parts.live),
        listen: config.listen.clone(),
        needs_shared_state: config
            .shared_state
            .as_ref()
            .is_some_and(|s| s.on_error == OnRedisError::Deny),
        carried: Arc::clone(&parts.carried),
        cluster: parts.cluster.clone(),
        audit: parts.audit.clone(),
        history,
        rebuild,
        control,
        reloads,
        started: std::time::SystemTime::now(),
        epoch: parts.started,
    }
}

/// Opens the audit log and starts its writer thread, which feeds
/// `history` when there is one.
fn start_audit(
    dest: &AuditDest,
    metrics: &Metrics,
    history: Option<&Arc<History>>,
) -> Result<AuditLog, StartError> {
    let failed = |source| StartError::Audit {
        path: match dest {
            AuditDest::Stderr => "-".into(),
            AuditDest::File(p) => p.display().to_string(),
        },
        source,
    };
    let (log, writer) =
        AuditLog::open(dest.clone(), metrics.audit_dropped.clone()).map_err(failed)?;
    let writer = match history {
        Some(h) => writer.feeding(Arc::clone(h)),
        None => writer,
    };
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || writer.run())
        .map_err(failed)?;
    Ok(log)
}

/// The admin listener's service: `/metrics`, `/healthz`, `/readyz`, the
/// status page and the key API.
fn add_admin(server: &mut Server, addr: std::net::SocketAddr, admin: Admin) {
    let mut svc = ListeningService::new("admin".to_string(), admin);
    svc.threads = Some(1);
    svc.add_tcp(&addr.to_string());
    info!("admin (/metrics, /healthz, /readyz; status page and /api/keys with an admin key) on http://{addr}");
    server.add_service(svc);
}

/// What the admin listener asks of the daemon: reloads (under the same
/// lock as the reloader thread's, so they never overlap) and threads for
/// key file edits.
struct DaemonControl {
    reloader: Arc<Mutex<Reloader>>,
}

impl Control for DaemonControl {
    fn reload(&self, why: &str) -> Result<u64, String> {
        self.reloader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reload(why)
            .map_err(|e| e.to_string())
    }

    fn off_thread(&self, job: Box<dyn FnOnce() + Send>) {
        spawn_thread("admin-change", job);
    }
}

/// Connects to the shared-state Redis (probing it once, so the first
/// requests know whether it answers) and starts the cluster's thread.
fn start_cluster(
    spec: &crate::config::SharedStateSpec,
    metrics: &Arc<Metrics>,
    carried: &Arc<Carried>,
    epoch: Instant,
) -> Result<Arc<Cluster>, StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::SharedState(e.to_string()))?;
    let cluster = Cluster::new(
        spec,
        Arc::clone(metrics),
        Arc::clone(carried),
        epoch,
        runtime.handle().clone(),
    )
    .map_err(StartError::SharedState)?;
    runtime.block_on(cluster.first_probe());
    info!(
        "shared state: limits counted in redis {} (on_redis_error: {})",
        spec.redis.redacted(),
        spec.on_error.name()
    );
    let background = Arc::clone(&cluster);
    spawn_thread("shared-state", move || {
        runtime.block_on(background.background())
    });
    Ok(cluster)
}

/// Starts the threads that turn signals and file changes into reloads and
/// audit log reopens. Reload triggers arrive on one channel, so reloads
/// never run concurrently.
fn start_reloader(
    reloader: Arc<Mutex<Reloader>>,
    tls: Arc<TlsListeners>,
    audit: Option<AuditLog>,
    signals: Signals,
) {
    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    let mut signals = signals;
    spawn_thread("signals", move || {
        for sig in signals.forever() {
            // SIGHUP and SIGUSR1 both reopen the audit log (logrotate's
            // postrotate may send either); only SIGHUP reloads.
            if let Some(a) = &audit {
                a.reopen();
            }
            if sig == SIGHUP && signal_tx.send(Trigger::Signal).is_err() {
                return;
            }
        }
    });
    let mut watcher = match FileWatcher::new(tx) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!("cannot watch files for changes ({e}); reload with SIGHUP");
            None
        }
    };
    let watch_files = |w: &mut Option<FileWatcher>, snapshot: &Snapshot| {
        if let Some(w) = w.as_mut() {
            if snapshot.config.watch {
                let certs = TlsListeners::watched_files(&snapshot.config);
                let mut files: Vec<&Path> = vec![&snapshot.config.path, &snapshot.config.keys_file];
                files.extend(certs.iter().map(PathBuf::as_path));
                w.set_files(&files);
            } else {
                w.set_files(&[]);
            }
        }
    };
    let locked = |r: &Arc<Mutex<Reloader>>| {
        let guard = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.current()
    };
    watch_files(&mut watcher, &locked(&reloader).snapshot);
    spawn_thread("reloader", move || {
        while let Some(trigger) = next_trigger(&rx) {
            let why = match trigger {
                Trigger::Signal => "SIGHUP",
                Trigger::FileChanged => "file change",
            };
            // Errors are logged by reload(); the old snapshot stays.
            let reloaded = reloader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reload(why)
                .is_ok();
            let current = locked(&reloader);
            if reloaded {
                watch_files(&mut watcher, &current.snapshot);
            }
            // Certificates are re-read whatever became of the config (a
            // renewed certificate is served even while the config has a
            // mistake), from the paths of the snapshot in service.
            tls.reload(&current.snapshot.config);
            memory::release_free_memory();
        }
    });
}

/// Pingora's graceful shutdown sleeps the whole grace period even when no
/// request is in flight. This watcher ends the process as soon as the last
/// request has finished (or leaves it to Pingora once the grace is over).
fn drain_watcher(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    in_flight: IntGauge,
    grace: Duration,
) {
    loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownGracePeriod) => break,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
    let deadline = std::time::Instant::now() + grace;
    let mut idle_polls = 0;
    while std::time::Instant::now() < deadline {
        if in_flight.get() == 0 {
            idle_polls += 1;
            // Two quiet polls in a row, so a connection accepted just before
            // the listeners closed has had time to become a request.
            if idle_polls >= 2 {
                info!("no request in flight; exiting");
                log::logger().flush();
                std::process::exit(0);
            }
        } else {
            idle_polls = 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    warn!(
        "shutdown grace of {}s is over with {} request(s) still in flight",
        grace.as_secs(),
        in_flight.get()
    );
}

/// Pingora reports a listener it cannot build by panicking inside its
/// service task and carrying on without it (cloudflare/pingora#502). The
/// check above catches the ordinary cases; this turns the remaining race
/// (the address taken between the check and the bind) into an exit too.
fn exit_if_listeners_fail() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("Failed to build listeners") {
            error!("a listen address could not be bound; exiting");
            std::process::exit(1);
        }
    }));
}

pub(crate) fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        error!("cannot start the {name} thread: {e}");
        std::process::exit(1);
    }
}
