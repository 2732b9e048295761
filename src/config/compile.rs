//! The compile step: turns the checked configuration ([`CheckedConfig`])
//! into the form the gateway runs on ([`Config`]).
//!
//! It holds all the I/O of loading a configuration, and only that: host
//! names are resolved (listeners, the admin listener, upstreams), CA files
//! are read (`upstream_ca`, `shared_state.ca`), and the process's CPU
//! count and open-file limit are read for the defaults of `threads` and
//! `max_connections`. Each failure names the setting's file, line and
//! column, which the checked form kept. (Certificate and key files of TLS
//! listeners and the ACME cache are not read here: the `tls` layer reads
//! them when it sets listeners up and on every reload.)

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::Path;

use serde_saphyr::Spanned;

use super::address::HostPort;
use super::clients::ClientLimits;
use super::error::{LoadError, Location};
use super::file::CheckedConfig;
use super::fleet::UpstreamEntry;
use super::gateway::Config;
use super::listen::{CheckedListener, ListenSpec};
use super::pem::parse_certificates;
use super::routes::{CheckedRoute, RouteSpec, UpstreamCa, UpstreamSpec};
use super::shared::{CheckedSharedState, RedisCa, SharedStateSpec};
use super::yaml::location;

impl CheckedConfig {
    /// Resolves, reads and fills in what the checks left (see the module
    /// documentation).
    pub fn compile(self) -> Result<Config, LoadError> {
        let path = self.path;
        let (listen, listeners) = compile_listeners(&path, self.listeners)?;
        let ops = self.operations;
        let admin_listen = match ops.admin_listen {
            None => None,
            Some((a, at)) => {
                let addr = resolve(&a).map_err(|why| {
                    LoadError::at(
                        &path,
                        at,
                        format!("admin_listen {:?}: {why}", a.to_string()),
                    )
                })?;
                if listen.contains(&addr) {
                    return Err(LoadError::at(
                        &path,
                        at,
                        format!("admin_listen {addr} is also a listen address"),
                    ));
                }
                Some(addr)
            }
        };
        let threads = ops.threads.map_or_else(cpu_count, NonZeroUsize::get);
        let routes = self
            .routes
            .into_iter()
            .map(|r| compile_route(&path, r))
            .collect::<Result<Vec<_>, _>>()?;
        let shared_state = self
            .shared_state
            .map(|s| compile_shared_state(&path, s))
            .transpose()?;
        Ok(Config {
            listen,
            listeners,
            keys_file: self.keys_file,
            shutdown_grace: ops.shutdown_grace,
            threads,
            clients: ClientLimits::from_settings(&self.clients, threads, open_file_limit()),
            watch: ops.watch,
            audit_log: ops.audit_log,
            admin_listen,
            metrics_per_user: ops.metrics_per_user,
            upgrade_sock: ops.upgrade_sock,
            underscores_in_headers: self.underscores_in_headers,
            limits: self.limits,
            allow: self.allow,
            trusted_proxies: self.trusted_proxies,
            failed_key_throttle: self.failed_key_throttle,
            shared_state,
            alerts: self.alerts,
            routes,
            path,
        })
    }
}

/// The listen addresses resolved, each once, in the order written.
fn compile_listeners(
    path: &Path,
    checked: Vec<CheckedListener>,
) -> Result<(Vec<SocketAddr>, Vec<ListenSpec>), LoadError> {
    let mut listen = Vec::with_capacity(checked.len());
    let mut listeners = Vec::with_capacity(checked.len());
    for l in checked {
        let written = l.address.to_string();
        let addr = resolve(&l.address)
            .map_err(|why| LoadError::at(path, l.at, format!("listen {written:?}: {why}")))?;
        if listen.contains(&addr) {
            return Err(LoadError::at(
                path,
                l.at,
                format!("listen {written:?} is listed twice"),
            ));
        }
        listen.push(addr);
        listeners.push(ListenSpec { addr, kind: l.kind });
    }
    Ok((listen, listeners))
}

/// The route with its upstreams resolved and its CA file read.
fn compile_route(path: &Path, r: CheckedRoute) -> Result<RouteSpec, LoadError> {
    let name = r.name;
    let upstreams = resolve_upstreams(&r.upstreams, |u, why| {
        LoadError::at(
            path,
            location(u),
            format!("route {name:?}: upstream {:?}: {why}", u.value.addr.written),
        )
    })?;
    let mut model_upstreams = Vec::with_capacity(r.models.len());
    let mut seen: Vec<&UpstreamSpec> = Vec::new();
    same_settings(path, &name, &r.upstreams, &upstreams, &mut seen)?;
    for (pattern, ups) in &r.models {
        let addrs = resolve_upstreams(ups, |u, why| {
            LoadError::at(
                path,
                location(u),
                format!(
                    "route {name:?}: models {:?}: upstream {:?}: {why}",
                    pattern.as_str(),
                    u.value.addr.written
                ),
            )
        })?;
        model_upstreams.push((pattern.clone(), addrs));
    }
    for ((_, ups), (_, specs)) in r.models.iter().zip(&model_upstreams) {
        same_settings(path, &name, ups, specs, &mut seen)?;
    }
    let upstream_ca = match r.upstream_ca {
        None => None,
        Some((ca, at)) => {
            let certs = read_ca(&ca)
                .and_then(|pem| parse_certificates(&ca, &pem))
                .map_err(|e| ca_error(path, at, &format!("route {name:?}: upstream_ca"), &e))?;
            Some(UpstreamCa { path: ca, certs })
        }
    };
    Ok(RouteSpec {
        name,
        path_prefix: r.path_prefix,
        methods: r.methods,
        service: r.service,
        strip_prefix: r.strip_prefix,
        upstreams,
        upstream_ca,
        connect_timeout: r.connect_timeout,
        read_timeout: r.read_timeout,
        health_check: r.health_check,
        websocket: r.websocket,
        allow_path_params: r.allow_path_params,
        limits: r.limits,
        allow: r.allow,
        cors: r.cors,
        api: r.api,
        include_usage: r.include_usage,
        model_upstreams,
        balance: r.fleet.balance,
        queue: r.fleet.queue,
        retry: r.fleet.retry,
        aliases: r.fleet.aliases,
    })
}

/// An address a route lists more than once (in `upstreams` and under
/// `models`, or written two ways) must have the same settings each time:
/// the route keeps one cap and one weight per address.
fn same_settings<'s>(
    path: &Path,
    route: &str,
    written: &[Spanned<UpstreamEntry>],
    specs: &'s [UpstreamSpec],
    seen: &mut Vec<&'s UpstreamSpec>,
) -> Result<(), LoadError> {
    for (entry, spec) in written.iter().zip(specs) {
        if seen.iter().any(|s| s.addr == spec.addr && *s != spec) {
            return Err(LoadError::at(
                path,
                location(entry),
                format!(
                    "route {route:?}: upstream {:?} ({}) is listed again with other settings; write the same max_in_flight and weight each time",
                    entry.value.addr.written, spec.addr
                ),
            ));
        }
        seen.push(spec);
    }
    Ok(())
}

/// Each upstream resolved; `error` words a failure.
fn resolve_upstreams(
    ups: &[Spanned<UpstreamEntry>],
    error: impl Fn(&Spanned<UpstreamEntry>, String) -> LoadError,
) -> Result<Vec<UpstreamSpec>, LoadError> {
    ups.iter()
        .map(|u| {
            resolve(&u.value.addr.addr)
                .map(|addr| UpstreamSpec {
                    addr,
                    tls: u.value.addr.tls_name.clone(),
                    max_in_flight: u.value.max_in_flight,
                    weight: u.value.weight,
                })
                .map_err(|why| error(u, why))
        })
        .collect()
}

/// `shared_state` with its CA file read (checked to hold certificates; the
/// Redis client takes the PEM text as it is).
fn compile_shared_state(path: &Path, s: CheckedSharedState) -> Result<SharedStateSpec, LoadError> {
    let ca = match s.ca {
        None => None,
        Some((ca, at)) => {
            let pem = read_ca(&ca)
                .and_then(|pem| parse_certificates(&ca, &pem).map(|_| pem))
                .map_err(|e| ca_error(path, at, "shared_state.ca", &e))?;
            Some(RedisCa { path: ca, pem })
        }
    };
    Ok(SharedStateSpec {
        redis: s.redis,
        on_error: s.on_error,
        timeout: s.timeout,
        ca,
    })
}

/// An error about a CA file, at the setting that names it; the message
/// names the file too.
fn ca_error(path: &Path, at: Location, setting: &str, e: &LoadError) -> LoadError {
    LoadError::at(path, at, format!("{setting}: {e}"))
}

fn read_ca(ca: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(ca).map_err(|e| LoadError::io(ca, e))
}

/// Resolves `host:port` once, at load, so the request path never touches
/// DNS. When a name has several addresses an IPv4 one is preferred: local
/// model servers (Ollama among them) listen on 127.0.0.1 by default while
/// `localhost` often resolves to `::1` first.
fn resolve(a: &HostPort) -> Result<SocketAddr, String> {
    if let Some(addr) = a.literal() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = (a.host(), a.port())
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| "the name has no addresses".to_string())
}

/// The default worker count: one per CPU this process may run on.
fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// This process's soft `RLIMIT_NOFILE` (`ulimit -n`); `RLIM_INFINITY` is
/// reported as `u64::MAX`. If the limit cannot be read, 1,024 (the usual
/// default) is assumed.
pub fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return 1024;
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        // rlim_t is narrower than u64 on some targets.
        #[allow(clippy::unnecessary_cast)]
        let soft = lim.rlim_cur as u64;
        soft
    }
}

#[cfg(test)]
mod tests {
    /// The files of parsing and checking, which must stay pure.
    const PURE: [(&str, &str); 13] = [
        ("address.rs", include_str!("address.rs")),
        ("admin.rs", include_str!("admin.rs")),
        ("ai.rs", include_str!("ai.rs")),
        ("clients.rs", include_str!("clients.rs")),
        ("error.rs", include_str!("error.rs")),
        ("file.rs", include_str!("file.rs")),
        ("key_file.rs", include_str!("key_file.rs")),
        ("limits.rs", include_str!("limits.rs")),
        ("listen.rs", include_str!("listen.rs")),
        ("routes.rs", include_str!("routes.rs")),
        ("shared.rs", include_str!("shared.rs")),
        ("values.rs", include_str!("values.rs")),
        ("yaml.rs", include_str!("yaml.rs")),
    ];

    /// Only the compile step does the I/O of loading: parsing and checking
    /// name no file, socket, lookup or system call.
    #[test]
    fn parsing_and_checking_do_no_io() {
        let io = [
            "std::fs",
            "File::",
            "to_socket_addrs",
            "ToSocketAddrs",
            "libc::",
            "available_parallelism",
            "std::env",
            "std::process",
        ];
        for (name, code) in PURE {
            for call in io {
                assert!(!code.contains(call), "{name} uses {call}");
            }
        }
    }
}
