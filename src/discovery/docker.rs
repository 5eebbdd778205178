//! Docker discovery: this host's containers, found through the Docker Engine API (bollard), as this host's
//! `Source::Docker` endpoint set.
//!
//! **Owns** the view of the local containers (a [`ContainerSet`]) and the connection to the Docker API.
//! **Reads** the Docker API with GET requests only — `/version`, `/containers/json`, `/containers/{id}/json`
//! and `/events` — never creating, changing or removing anything, so it works through a read-only socket proxy
//! (docs/security.md). **Writes** one thing: `Update::SetLocal { source: Source::Docker, .. }` to the router,
//! whenever the set of routable containers changes; plus its own metrics and a [`Status`] for `/v1/services`.
//! It must not route, gossip, or touch other sources' endpoints.
//!
//! The file has two halves:
//! - **Pure** (no I/O, unit-tested below): labels → [`Exposure`] ([`classify`]: service name, port, protocol,
//!   network/address choice, weight, node ownership), health gating ([`is_routable`]), which `kill` signals stop
//!   a container ([`kill_stops`]), the [`ContainerSet`] that turns events and resyncs into an endpoint set, and the
//!   reconnect backoff ([`RECONNECT_BACKOFF`]).
//! - **I/O** ([`DockerDiscovery::run`]): connect (`discovery.docker.host`, else `DOCKER_HOST`, else the default
//!   socket) → negotiate the API version → list + inspect every running container → follow the event stream,
//!   with a full resync every [`RESYNC_INTERVAL`]. Any error or end of stream restarts that sequence after an
//!   exponential backoff ([`BACKOFF_MIN`] → [`BACKOFF_MAX`], forever). While the API is unreachable nothing is
//!   withdrawn: containers keep running without the daemon (live-restore), so the last known set stays and the
//!   status reads *degraded* until a resync succeeds and applies the difference.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, Protocol, check_service_name};
use crate::readiness::ReadyToken;
use crate::routing::{DEFAULT_WEIGHT, EndpointSpec, RoutingHandle, Source, Table, Update};
use crate::telemetry::metrics::DiscoveryMetrics;
use crate::util::Backoff;

/// A full list + inspect this often repairs anything the event stream missed.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);
/// First reconnect delay after the Docker API fails; doubled on each failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay; retries continue at this pace forever.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Up to this fraction of each reconnect delay is added at random, so agents sharing a daemon do not retry in step.
pub const BACKOFF_JITTER: f64 = 0.2;
/// The reconnect backoff.
pub const RECONNECT_BACKOFF: Backoff = Backoff {
    min: BACKOFF_MIN,
    max: BACKOFF_MAX,
    jitter: BACKOFF_JITTER,
};
/// Bound on any single Docker API call (connect, version, list, inspect).
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Inspects run at most this many at a time, in a resync and for events.
const INSPECT_CONCURRENCY: usize = 8;
/// On (re)connect the event stream starts this long before the resync began, so nothing that happens between
/// the list and the subscription is lost (replayed events are harmless: handling is idempotent).
const EVENTS_OVERLAP: Duration = Duration::from_secs(2);
/// How long the first sync waits for the router to publish its endpoints before reporting ready anyway.
const FIRST_PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// `true`/`false`: expose the container (default: `discovery.docker.expose_by_default`).
pub const LABEL_ENABLE: &str = "mesh.enable";
/// The service name.
pub const LABEL_SERVICE: &str = "mesh.service";
/// The container port to send to.
pub const LABEL_PORT: &str = "mesh.port";
/// `http`, `h2c` or `grpc`.
pub const LABEL_PROTOCOL: &str = "mesh.protocol";
/// Which network's address to use.
pub const LABEL_NETWORK: &str = "mesh.network";
/// Relative weight.
pub const LABEL_WEIGHT: &str = "mesh.weight";
/// Service-name fallbacks, in order, before the container name.
pub const LABEL_SWARM_SERVICE: &str = "com.docker.swarm.service.name";
pub const LABEL_COMPOSE_SERVICE: &str = "com.docker.compose.service";
/// Compose's project name: `mesh.network = "backend"` also matches the network `<project>_backend`.
pub const LABEL_COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// `True` on `docker compose run` containers, which are never exposed.
pub const LABEL_COMPOSE_ONEOFF: &str = "com.docker.compose.oneoff";
/// Swarm's routing-mesh network: never used for an endpoint address.
pub const INGRESS_NETWORK: &str = "ingress";
/// The largest accepted `mesh.weight`.
pub const MAX_WEIGHT: u32 = 1_000_000;

// ---------------------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------------------

/// What went wrong talking to the Docker API. Every one of them leads to a reconnect with backoff; none
/// withdraws endpoints.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot use the Docker API at {host}: {source} (check discovery.docker.host / DOCKER_HOST and that the daemon runs)"
    )]
    Connect {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("Docker API {what} failed: {source}")]
    Api {
        what: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("Docker API {what} did not answer within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the Docker event stream ended")]
    StreamEnded,
}

// ---------------------------------------------------------------------------------------------------------
// Pure part: a container as discovery sees it, and what its labels make of it.
// ---------------------------------------------------------------------------------------------------------

/// The parts of `docker inspect` that discovery reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// As Docker lists them: `"8080/tcp"`, `"53/udp"`.
    pub exposed_ports: Vec<String>,
    /// `HostConfig.NetworkMode`: `host`, `none`, `bridge`, `default`, a network name, or `container:<id>`.
    pub network_mode: String,
    /// Network name → this container's addresses on it.
    pub networks: BTreeMap<String, NetAddrs>,
    /// `Config.StopSignal`, when the image or run sets one (`docker stop` sends it).
    pub stop_signal: Option<String>,
    pub state: RunState,
}

/// A container's addresses on one network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetAddrs {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl NetAddrs {
    /// IPv4 when the network has it, else the global IPv6 address (IPv6-only networks).
    pub fn preferred(&self) -> Option<IpAddr> {
        self.ipv4
            .map(IpAddr::V4)
            .or_else(|| self.ipv6.map(IpAddr::V6))
    }
}

/// Docker's health check status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No health check.
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    /// From the text after `health_status: ` in an event.
    pub fn parse(s: &str) -> Option<Health> {
        match s.trim() {
            "healthy" => Some(Health::Healthy),
            "unhealthy" => Some(Health::Unhealthy),
            "starting" => Some(Health::Starting),
            "none" | "" => Some(Health::None),
            _ => None,
        }
    }
}

/// The run state of a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunState {
    pub running: bool,
    pub paused: bool,
    pub restarting: bool,
    pub health: Health,
    /// `State.StartedAt`: tells one run of a container from the next.
    pub started_at: String,
}

/// Routable while running (not paused or restarting) and healthy or without a health check.
pub fn is_routable(s: &RunState) -> bool {
    s.running && !s.paused && !s.restarting && matches!(s.health, Health::None | Health::Healthy)
}

/// How discovery reads labels on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub expose_by_default: bool,
    /// `discovery.docker.node_label`: when set, only containers whose label of that name equals `node_name`.
    pub node_label: Option<String>,
    pub node_name: String,
    /// Address for host-network containers: `node.advertise_addr`, else 127.0.0.1.
    pub host_ip: IpAddr,
}

impl Rules {
    pub fn from_config(config: &Config) -> Rules {
        Rules {
            expose_by_default: config.discovery.docker.expose_by_default,
            node_label: config.discovery.docker.node_label.clone(),
            node_name: config.node.name.clone(),
            host_ip: config
                .node
                .advertise_addr
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        }
    }
}

/// Why a container with mesh labels was refused. Each is a bounded `reason` label value of
/// `meshd_discovery_skipped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    BadEnable,
    BadService,
    BadPort,
    NoPort,
    AmbiguousPort,
    BadProtocol,
    BadWeight,
    BadNetwork,
    NoAddress,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::BadEnable => "bad-enable",
            SkipReason::BadService => "bad-service",
            SkipReason::BadPort => "bad-port",
            SkipReason::NoPort => "no-port",
            SkipReason::AmbiguousPort => "ambiguous-port",
            SkipReason::BadProtocol => "bad-protocol",
            SkipReason::BadWeight => "bad-weight",
            SkipReason::BadNetwork => "bad-network",
            SkipReason::NoAddress => "no-address",
        }
    }
}

/// A container that asked to be exposed but cannot be, and why (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    pub reason: SkipReason,
    pub detail: String,
}

fn skip(reason: SkipReason, detail: impl Into<String>) -> Exposure {
    Exposure::Skip(Skip {
        reason,
        detail: detail.into(),
    })
}

/// What discovery makes of a container's labels, whatever its run state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// An endpoint (routable only while [`is_routable`]). `warning` explains an address chosen by the
    /// several-networks rule.
    Route {
        spec: EndpointSpec,
        warning: Option<String>,
    },
    /// Not for this node to expose (not enabled, another node's, a compose one-off): not an error.
    Ignore(&'static str),
    /// Asked to be exposed, but its labels cannot be used.
    Skip(Skip),
}

/// Go's `strconv.ParseBool`, which is what Docker users expect of a boolean label.
fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Turns a container's labels into an endpoint, or says why not. Order: one-off → enable → node → service →
/// port → protocol → weight → address.
pub fn classify(c: &Container, rules: &Rules) -> Exposure {
    let label = |k: &str| c.labels.get(k).map(|v| v.trim());
    if label(LABEL_COMPOSE_ONEOFF).and_then(parse_bool) == Some(true) {
        return Exposure::Ignore("compose one-off container");
    }
    match label(LABEL_ENABLE) {
        None if !rules.expose_by_default => return Exposure::Ignore("mesh.enable is not set"),
        None => {}
        Some(v) => match parse_bool(v) {
            Some(true) => {}
            Some(false) => return Exposure::Ignore("mesh.enable=false"),
            None => {
                return skip(
                    SkipReason::BadEnable,
                    format!("mesh.enable={v:?}: use true or false"),
                );
            }
        },
    }
    if let Some(key) = &rules.node_label {
        match label(key) {
            Some(v) if v == rules.node_name => {}
            Some(_) => return Exposure::Ignore("belongs to another node"),
            None => return Exposure::Ignore("no node label"),
        }
    }

    let (service, from) = [LABEL_SERVICE, LABEL_SWARM_SERVICE, LABEL_COMPOSE_SERVICE]
        .iter()
        .find_map(|k| label(k).filter(|v| !v.is_empty()).map(|v| (v, *k)))
        .unwrap_or((c.name.as_str(), "the container name"));
    let service = service.to_ascii_lowercase();
    if let Err(why) = check_service_name(&service) {
        return skip(
            SkipReason::BadService,
            format!("service name {service:?} (from {from}): {why}; set mesh.service"),
        );
    }

    let port = match label(LABEL_PORT) {
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return skip(
                    SkipReason::BadPort,
                    format!("mesh.port={v:?}: not a port number (1-65535)"),
                );
            }
        },
        None => {
            let mut tcp: Vec<u16> = c
                .exposed_ports
                .iter()
                .filter_map(|p| match p.split_once('/') {
                    Some((n, "tcp")) => n.parse().ok(),
                    None => p.parse().ok(),
                    Some(_) => None,
                })
                .collect();
            tcp.sort_unstable();
            tcp.dedup();
            match tcp.as_slice() {
                [p] => *p,
                [] => {
                    return skip(
                        SkipReason::NoPort,
                        "no mesh.port label and no exposed TCP port",
                    );
                }
                several => {
                    return skip(
                        SkipReason::AmbiguousPort,
                        format!(
                            "no mesh.port label and several exposed TCP ports {several:?}: set mesh.port"
                        ),
                    );
                }
            }
        }
    };

    let protocol = match label(LABEL_PROTOCOL) {
        None => Protocol::Http,
        Some(v) => match Protocol::parse(&v.to_ascii_lowercase()) {
            Some(p) => p,
            None => {
                return skip(
                    SkipReason::BadProtocol,
                    format!("mesh.protocol={v:?}: use http, h2c or grpc"),
                );
            }
        },
    };

    let weight = match label(LABEL_WEIGHT) {
        None => DEFAULT_WEIGHT,
        Some(v) => match v.parse::<u32>() {
            Ok(w) if (1..=MAX_WEIGHT).contains(&w) => w,
            _ => {
                return skip(
                    SkipReason::BadWeight,
                    format!("mesh.weight={v:?}: a whole number from 1 to {MAX_WEIGHT}"),
                );
            }
        },
    };

    let (ip, warning) = match choose_address(c, rules) {
        Ok(found) => found,
        Err(v) => return v,
    };
    Exposure::Route {
        spec: EndpointSpec {
            service,
            addr: SocketAddr::new(ip, port),
            protocol,
            weight,
        },
        warning,
    }
}

/// The address rule (docs/docker.md): host network → the node's address; `mesh.network` → that network
/// (also `<compose project>_<name>`); else the only network that is not `ingress`; else the first such network
/// by name, with a warning. On the chosen network IPv4 is preferred, else its global IPv6 address.
fn choose_address(c: &Container, rules: &Rules) -> Result<(IpAddr, Option<String>), Exposure> {
    if c.network_mode == "host" {
        return Ok((rules.host_ip, None));
    }
    if c.network_mode == "none" {
        return Err(skip(SkipReason::NoAddress, "network_mode none: no address"));
    }
    if let Some(other) = c.network_mode.strip_prefix("container:") {
        return Err(skip(
            SkipReason::NoAddress,
            format!(
                "shares the network of container {other}: put the mesh labels on that container"
            ),
        ));
    }
    let usable = || {
        c.networks
            .iter()
            .filter(|(name, _)| name.as_str() != INGRESS_NETWORK)
    };
    let on = || {
        usable()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(wanted) = c.labels.get(LABEL_NETWORK).map(|v| v.trim()) {
        if wanted == INGRESS_NETWORK {
            return Err(skip(
                SkipReason::BadNetwork,
                "mesh.network=ingress: the swarm ingress network is never used",
            ));
        }
        let prefixed = c
            .labels
            .get(LABEL_COMPOSE_PROJECT)
            .map(|p| format!("{p}_{wanted}"));
        let found = c
            .networks
            .get(wanted)
            .or_else(|| prefixed.as_ref().and_then(|p| c.networks.get(p)));
        return match found {
            Some(addrs) => match addrs.preferred() {
                Some(ip) => Ok((ip, None)),
                None => Err(skip(
                    SkipReason::NoAddress,
                    format!("no address on network {wanted:?} yet"),
                )),
            },
            None => Err(skip(
                SkipReason::BadNetwork,
                format!(
                    "mesh.network={wanted:?}: the container is not on that network (it is on: {})",
                    on()
                ),
            )),
        };
    }
    let with_addr: Vec<(&String, IpAddr)> = usable()
        .filter_map(|(n, a)| a.preferred().map(|ip| (n, ip)))
        .collect();
    match with_addr.as_slice() {
        [] => Err(skip(SkipReason::NoAddress, "no address on any network")),
        [(_, ip)] => Ok((*ip, None)),
        [(first, ip), ..] => Ok((
            *ip,
            Some(format!(
                "on several networks ({}): using {first:?}, the first by name; set mesh.network to choose",
                on()
            )),
        )),
    }
}

/// Signal numbers by name, for comparing a `kill` event's signal with a container's stop signal.
fn signal_number(s: &str) -> Option<u32> {
    let s = s.trim();
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "WINCH" => 28,
        _ => return None,
    })
}

/// Whether a `kill` event means the container is going away. `docker stop` and `docker kill` send the stop
/// signal, TERM, KILL and the like; HUP, USR1, USR2, WINCH, ALRM and CONT are how apps are told to reload or
/// reopen logs, and keep the container in rotation — unless that signal is the container's own stop signal.
pub fn kill_stops(signal: Option<&str>, stop_signal: Option<&str>) -> bool {
    let Some(sig) = signal.and_then(signal_number) else {
        return true;
    };
    if stop_signal.and_then(signal_number) == Some(sig) {
        return true;
    }
    !matches!(sig, 1 | 10 | 12 | 14 | 18 | 28)
}

/// The bounded `action` label of `meshd_discovery_events_total`.
pub fn action_label(action: &str) -> &'static str {
    match action {
        "start" => "start",
        "restart" => "restart",
        "kill" => "kill",
        "stop" => "stop",
        "die" => "die",
        "destroy" => "destroy",
        "pause" => "pause",
        "unpause" => "unpause",
        "rename" => "rename",
        "connect" => "connect",
        "disconnect" => "disconnect",
        "health_status: healthy" => "health_status: healthy",
        "health_status: unhealthy" => "health_status: unhealthy",
        "health_status: starting" => "health_status: starting",
        _ => "other",
    }
}

/// Something the I/O layer should log (and count) after a container was (re)classified. Returned only when
/// the exposure changed, so a resync does not repeat them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    Skipped { container: String, skip: Skip },
    Warning { container: String, warning: String },
}

#[derive(Clone, Debug)]
struct Known {
    container: Container,
    exposure: Exposure,
}

/// Every running container discovery knows of, with its exposure, and which are stopping. Pure: the I/O loop
/// feeds it inspect results and events, and reads the endpoint set back.
#[derive(Debug)]
pub struct ContainerSet {
    rules: Rules,
    containers: HashMap<String, Known>,
    /// Containers sent their stop signal: withdrawn until that run ends, even while still running (draining).
    /// Value: the `StartedAt` of the run that was stopped, so a later run is routable again.
    stopping: HashMap<String, String>,
}

impl ContainerSet {
    pub fn new(rules: Rules) -> ContainerSet {
        ContainerSet {
            rules,
            containers: HashMap::new(),
            stopping: HashMap::new(),
        }
    }

    /// Adds or refreshes one container from an inspect. A container that is not running is forgotten (its
    /// next `start` brings it back), so an exited container's labels are never judged or reported.
    pub fn upsert(&mut self, c: Container) -> Option<Note> {
        if !c.state.running {
            self.remove(&c.id);
            return None;
        }
        let exposure = classify(&c, &self.rules);
        if let Some(run) = self.stopping.get(&c.id)
            && (run != &c.state.started_at || !c.state.running)
        {
            self.stopping.remove(&c.id);
        }
        let changed = self
            .containers
            .get(&c.id)
            .is_none_or(|old| old.exposure != exposure);
        let note = match (&exposure, changed) {
            (Exposure::Skip(s), true) => Some(Note::Skipped {
                container: c.name.clone(),
                skip: s.clone(),
            }),
            (
                Exposure::Route {
                    warning: Some(w), ..
                },
                true,
            ) => Some(Note::Warning {
                container: c.name.clone(),
                warning: w.clone(),
            }),
            _ => None,
        };
        self.containers.insert(
            c.id.clone(),
            Known {
                container: c,
                exposure,
            },
        );
        note
    }

    /// Replaces everything with a fresh list (a resync): containers not in it are dropped, except those in
    /// `unknown` (listed, but not read this time), which keep their last state.
    pub fn replace_all(&mut self, list: Vec<Container>, unknown: &[String]) -> Vec<Note> {
        let keep: std::collections::HashSet<&str> = list
            .iter()
            .map(|c| c.id.as_str())
            .chain(unknown.iter().map(String::as_str))
            .collect();
        self.containers.retain(|id, _| keep.contains(id.as_str()));
        self.stopping.retain(|id, _| keep.contains(id.as_str()));
        list.into_iter().filter_map(|c| self.upsert(c)).collect()
    }

    pub fn remove(&mut self, id: &str) {
        self.containers.remove(id);
        self.stopping.remove(id);
    }

    pub fn contains(&self, id: &str) -> bool {
        self.containers.contains_key(id)
    }

    /// A `kill` event. Returns false when the container is unknown (the caller inspects it).
    pub fn on_kill(&mut self, id: &str, signal: Option<&str>) -> bool {
        let Some(t) = self.containers.get(id) else {
            return false;
        };
        if kill_stops(signal, t.container.stop_signal.as_deref()) {
            self.stopping
                .insert(id.to_string(), t.container.state.started_at.clone());
        }
        true
    }

    /// `die` or `stop`: the run has ended.
    pub fn on_exit(&mut self, id: &str) {
        if let Some(t) = self.containers.get_mut(id) {
            t.container.state.running = false;
        }
        self.stopping.remove(id);
    }

    /// `pause`.
    pub fn on_pause(&mut self, id: &str) -> bool {
        match self.containers.get_mut(id) {
            Some(t) => {
                t.container.state.paused = true;
                true
            }
            None => false,
        }
    }

    /// `health_status: …`. Returns false when the container is unknown (the caller inspects it).
    pub fn on_health(&mut self, id: &str, health: Health) -> bool {
        match self.containers.get_mut(id) {
            Some(t) => {
                t.container.state.health = health;
                true
            }
            None => false,
        }
    }

    /// The routable endpoints, sorted.
    pub fn endpoints(&self) -> Vec<EndpointSpec> {
        let mut out: Vec<EndpointSpec> = self
            .containers
            .iter()
            .filter(|(id, t)| is_routable(&t.container.state) && !self.stopping.contains_key(*id))
            .filter_map(|(_, t)| match &t.exposure {
                Exposure::Route { spec, .. } => Some(spec.clone()),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The events API's `since`: unix seconds with a nanosecond fraction.
pub fn since_param(unix_nanos: i64) -> String {
    format!(
        "{}.{:09}",
        unix_nanos.div_euclid(1_000_000_000),
        unix_nanos.rem_euclid(1_000_000_000)
    )
}

/// The discovery-relevant parts of an inspect response; `None` without an id.
pub fn from_inspect(r: ContainerInspectResponse) -> Option<Container> {
    let id = r.id?;
    let config = r.config.unwrap_or_default();
    let state = r.state.unwrap_or_default();
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) | None => Health::None,
    };
    let networks = r
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| {
            let ipv4 = ep
                .ip_address
                .as_deref()
                .and_then(|s| s.parse::<Ipv4Addr>().ok())
                .filter(|ip| !ip.is_unspecified());
            let ipv6 = ep
                .global_ipv6_address
                .as_deref()
                .and_then(|s| s.parse::<Ipv6Addr>().ok())
                .filter(|ip| !ip.is_unspecified());
            (name, NetAddrs { ipv4, ipv6 })
        })
        .collect();
    Some(Container {
        id,
        name: r
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        exposed_ports: config.exposed_ports.unwrap_or_default(),
        network_mode: r
            .host_config
            .and_then(|h| h.network_mode)
            .unwrap_or_default(),
        networks,
        stop_signal: config.stop_signal.filter(|s| !s.is_empty()),
        state: RunState {
            running: state.running.unwrap_or(false),
            paused: state.paused.unwrap_or(false),
            restarting: state.restarting.unwrap_or(false),
            health,
            started_at: state.started_at.unwrap_or_default(),
        },
    })
}

// ---------------------------------------------------------------------------------------------------------
// I/O part.
// ---------------------------------------------------------------------------------------------------------

/// Docker discovery's state, shown in `/v1/services` under `discovery.docker`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    pub enabled: bool,
    /// Where it connects (`discovery.docker.host`, `DOCKER_HOST`, or the default socket).
    pub host: String,
    /// A full sync has succeeded at least once.
    pub synced: bool,
    /// The Docker API is unreachable or its event stream broke: the last known endpoints are kept.
    pub degraded: bool,
    /// The last error, while degraded.
    pub error: Option<String>,
    /// Routable containers.
    pub endpoints: usize,
}

/// A status receiver for when Docker discovery is off.
pub fn disabled_status() -> watch::Receiver<Status> {
    watch::channel(Status::default()).1
}

/// The Docker endpoint meshd uses: the configured one, else `DOCKER_HOST`, else the default socket.
pub fn effective_host(configured: Option<&str>) -> String {
    configured
        .map(str::to_string)
        .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

/// For `meshd dev`: the Docker endpoint to use when one looks reachable — `DOCKER_HOST` when set (a unix
/// socket must accept connections; `tcp://`/`http://` are taken as given), else the default socket when
/// something accepts connections on it. `None` also for schemes meshd does not speak (`ssh://`, `https://`).
pub fn detect_local_docker() -> Option<String> {
    let host = effective_host(None);
    if let Some(path) = host.strip_prefix("unix://") {
        return std::os::unix::net::UnixStream::connect(path)
            .ok()
            .map(|_| host.clone());
    }
    (host.starts_with("tcp://") || host.starts_with("http://")).then_some(host)
}

/// The Docker discovery subsystem.
pub struct DockerDiscovery {
    /// `discovery.docker.host`; `None` means `DOCKER_HOST`, then the default socket.
    host: Option<String>,
    containers: ContainerSet,
    routing: RoutingHandle,
    table: watch::Receiver<Arc<Table>>,
    metrics: DiscoveryMetrics,
    status: watch::Sender<Status>,
    /// Given back after the first successful sync is in the routing table.
    ready: Option<ReadyToken>,
    /// What the router was last sent.
    published: Option<Vec<EndpointSpec>>,
    /// Time of the last event seen (unix ns, daemon clock).
    last_event: Option<i64>,
}

/// Starts Docker discovery when `discovery.docker.enabled`: returns its task (if any) and its status.
pub fn spawn(
    config: &Config,
    routing: RoutingHandle,
    table: watch::Receiver<Arc<Table>>,
    metrics: DiscoveryMetrics,
    ready: ReadyToken,
    shutdown: CancellationToken,
) -> (Option<JoinHandle<()>>, watch::Receiver<Status>) {
    if !config.discovery.docker.enabled {
        return (None, disabled_status());
    }
    let d = DockerDiscovery::new(config, routing, table, metrics, ready);
    let status = d.status();
    let task = tokio::spawn(d.run(shutdown).instrument(tracing::info_span!("docker")));
    (Some(task), status)
}

impl DockerDiscovery {
    pub fn new(
        config: &Config,
        routing: RoutingHandle,
        table: watch::Receiver<Arc<Table>>,
        metrics: DiscoveryMetrics,
        ready: ReadyToken,
    ) -> DockerDiscovery {
        let host = config.discovery.docker.host.clone();
        let status = Status {
            enabled: true,
            host: effective_host(host.as_deref()),
            ..Status::default()
        };
        metrics.degraded.with_label_values(&["docker"]).set(0);
        DockerDiscovery {
            host,
            containers: ContainerSet::new(Rules::from_config(config)),
            routing,
            table,
            metrics,
            status: watch::channel(status).0,
            ready: Some(ready),
            published: None,
            last_event: None,
        }
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Follows the Docker API until `shutdown`, reconnecting forever.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Consecutive failed sessions; reset by a successful sync.
        let mut failures = 0u32;
        tracing::info!(host = %self.status.borrow().host, "docker discovery starting");
        loop {
            let err = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = self.session(&mut failures) => e,
            };
            self.set_degraded(&err);
            self.metrics.reconnects.with_label_values(&["docker"]).inc();
            let delay = RECONNECT_BACKOFF.delay(failures, fastrand::f64());
            failures = failures.saturating_add(1);
            tracing::debug!(error = %err, retry_in = ?delay, "docker API attempt failed");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection: connect, resync, follow events. Returns only with the error that ended it.
    async fn session(&mut self, failures: &mut u32) -> DockerError {
        match self.session_inner(failures).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn session_inner(
        &mut self,
        failures: &mut u32,
    ) -> Result<std::convert::Infallible, DockerError> {
        let docker = self.connect().await?;
        let sync_started = unix_nanos_now();
        self.resync(&docker).await?;
        *failures = 0;
        self.set_synced().await;

        // Resume from the last event seen, or from just before this resync when that is later: everything
        // earlier is already in the resync.
        let overlap = EVENTS_OVERLAP.as_nanos() as i64;
        let since = self
            .last_event
            .unwrap_or(i64::MIN)
            .max(sync_started - overlap);
        let filters: HashMap<&str, Vec<&str>> = HashMap::from([
            ("type", vec!["container", "network"]),
            (
                "event",
                vec![
                    "start",
                    "restart",
                    "kill",
                    "stop",
                    "die",
                    "destroy",
                    "pause",
                    "unpause",
                    "health_status",
                    "rename",
                    "connect",
                    "disconnect",
                ],
            ),
        ]);
        let opts = EventsOptionsBuilder::default()
            .since(&since_param(since))
            .filters(&filters)
            .build();
        let mut events = std::pin::pin!(docker.events(Some(opts)));
        let mut resync = tokio::time::interval_at(
            tokio::time::Instant::now() + RESYNC_INTERVAL,
            RESYNC_INTERVAL,
        );
        let mut work = Work::default();
        // A periodic resync runs beside the event loop; events seen meanwhile are applied at once and again
        // after the resync's snapshot, which may predate them.
        let mut resyncing: Option<BoxFuture<Result<Snapshot, DockerError>>> = None;
        let mut during_resync: Vec<EventMessage> = Vec::new();
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(ev)) => {
                        if resyncing.is_some() {
                            during_resync.push(ev.clone());
                        }
                        self.on_event(&docker, &mut work, ev);
                    }
                    Some(Err(e)) => return Err(DockerError::Api { what: "GET /events", source: e }),
                    None => return Err(DockerError::StreamEnded),
                },
                Some((id, result)) = work.inspects.next(), if !work.inspects.is_empty() => {
                    self.inspected(&docker, &mut work, id, result);
                }
                _ = resync.tick(), if resyncing.is_none() => {
                    resyncing = Some(Box::pin(snapshot(docker.clone())));
                }
                snap = maybe(resyncing.as_mut()) => {
                    resyncing = None;
                    self.apply_snapshot(snap?);
                    for ev in std::mem::take(&mut during_resync) {
                        self.apply(&docker, &mut work, ev, true);
                    }
                    self.publish();
                    tracing::debug!("periodic docker resync done");
                }
            }
        }
    }

    async fn connect(&self) -> Result<Docker, DockerError> {
        let host = effective_host(self.host.as_deref());
        let docker = Docker::connect_with_host(&host)
            .map_err(|source| DockerError::Connect {
                host: host.clone(),
                source,
            })?
            .with_timeout(API_TIMEOUT);
        match tokio::time::timeout(API_TIMEOUT, docker.negotiate_version()).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(source)) => Err(DockerError::Connect { host, source }),
            Err(_) => Err(DockerError::Timeout {
                what: "GET /version",
                after: API_TIMEOUT,
            }),
        }
    }

    /// Lists and inspects every running container, replaces the container set, and publishes the difference.
    async fn resync(&mut self, docker: &Docker) -> Result<(), DockerError> {
        let snap = snapshot(docker.clone()).await?;
        self.apply_snapshot(snap);
        self.publish();
        Ok(())
    }

    /// Replaces the container set with a snapshot. A container whose inspect failed keeps its last state.
    fn apply_snapshot(&mut self, snap: Snapshot) {
        for (id, err) in &snap.failed {
            self.inspect_failed(id, err);
        }
        let keep: Vec<String> = snap.failed.into_iter().map(|(id, _)| id).collect();
        let notes = self.containers.replace_all(snap.containers, &keep);
        self.report(notes);
    }

    /// An inspect failed: the container keeps the state last seen (it is running, or was), and the failure is
    /// counted and logged.
    fn inspect_failed(&self, id: &str, err: &DockerError) {
        self.metrics
            .inspect_errors
            .with_label_values(&["docker"])
            .inc();
        tracing::warn!(container = %short(id), error = %err,
            "docker inspect failed; keeping the container's last known state");
    }

    /// One event from the daemon.
    fn on_event(&mut self, docker: &Docker, work: &mut Work, ev: EventMessage) {
        if let Some(t) = ev.time_nano {
            self.last_event = Some(self.last_event.map_or(t, |l| l.max(t)));
        }
        self.metrics
            .events
            .with_label_values(&["docker", action_label(ev.action.as_deref().unwrap_or(""))])
            .inc();
        self.apply(docker, work, ev, true);
        self.publish();
    }

    /// Applies an event to the container set. An event about a container not seen before starts an inspect (when
    /// `may_inspect`), which never blocks events for other containers. Events for a container being inspected
    /// wait behind the inspect so that they apply in order — except that a withdrawal (kill, stop, die, pause,
    /// unhealthy) also takes effect at once: it only ever takes traffic away.
    fn apply(&mut self, docker: &Docker, work: &mut Work, ev: EventMessage, may_inspect: bool) {
        let action = ev.action.clone().unwrap_or_default();
        let attrs = ev
            .actor
            .as_ref()
            .and_then(|a| a.attributes.clone())
            .unwrap_or_default();
        // Network events name the container in an attribute; container events in the actor id.
        let id = match action.as_str() {
            "connect" | "disconnect" => attrs.get("container").cloned(),
            _ => ev.actor.as_ref().and_then(|a| a.id.clone()),
        };
        let Some(id) = id else { return };
        let (base, detail) = match action.split_once(':') {
            Some((b, d)) => (b, Some(d.trim())),
            None => (action.as_str(), None),
        };
        if let Some(waiting) = work.queued.get_mut(&id) {
            let health = detail.and_then(Health::parse);
            let withdrawal = matches!(base, "kill" | "die" | "stop" | "destroy" | "pause")
                || (base == "health_status"
                    && !matches!(health, Some(Health::Healthy | Health::None)));
            waiting.later.push(ev);
            if withdrawal {
                self.on_known(&id, base, detail, &attrs);
            }
            return;
        }
        tracing::debug!(%action, container = %short(&id), "docker event");
        let needs_inspect = self.on_known(&id, base, detail, &attrs);
        if !(needs_inspect && may_inspect) {
            return;
        }
        // A kill is applied again once the container is known; the others are what the inspect shows.
        let trigger = (base == "kill").then_some(ev);
        work.queued.insert(
            id.clone(),
            Waiting {
                trigger,
                later: Vec::new(),
            },
        );
        work.inspect(docker, id);
    }

    /// Applies an event to a container the set knows; returns whether the container must be read (unknown, or an
    /// event that changes what only an inspect shows).
    fn on_known(
        &mut self,
        id: &str,
        base: &str,
        detail: Option<&str>,
        attrs: &HashMap<String, String>,
    ) -> bool {
        match base {
            "kill" => {
                let signal = attrs.get("signal").map(String::as_str);
                // Not seen before (its start was missed): read it, then apply the kill to it.
                !self.containers.on_kill(id, signal)
            }
            "die" | "stop" => {
                self.containers.on_exit(id);
                false
            }
            "destroy" => {
                self.containers.remove(id);
                false
            }
            "pause" => !self.containers.on_pause(id),
            "health_status" => {
                !matches!(detail.and_then(Health::parse), Some(h) if self.containers.on_health(id, h))
            }
            // A network event for a container that is not running (or not ours) needs no inspect.
            "connect" | "disconnect" if !self.containers.contains(id) => false,
            // start, restart, unpause, rename, connect, disconnect: read the container afresh.
            _ => true,
        }
    }

    /// An inspect started by an event finished: apply it, then the events that waited for it.
    fn inspected(
        &mut self,
        docker: &Docker,
        work: &mut Work,
        id: String,
        result: Result<Option<Container>, DockerError>,
    ) {
        let waiting = work.queued.remove(&id).unwrap_or_default();
        let ok = match result {
            Ok(Some(c)) => {
                let note = self.containers.upsert(c);
                self.report(note);
                true
            }
            Ok(None) => {
                self.containers.remove(&id);
                true
            }
            Err(e) => {
                self.inspect_failed(&id, &e);
                false
            }
        };
        // The kill that started the inspect applies to what it found, and never starts another: a container that
        // is gone stays gone.
        if let Some(ev) = waiting.trigger {
            self.apply(docker, work, ev, false);
        }
        // Later events may need a fresh read (a restart since); after a failed inspect they apply to the last
        // known state without inspecting again.
        for ev in waiting.later {
            self.apply(docker, work, ev, ok);
        }
        work.next_inspect(docker);
        self.publish();
    }

    fn report(&self, notes: impl IntoIterator<Item = Note>) {
        for n in notes {
            match n {
                Note::Skipped { container, skip } => {
                    tracing::warn!(
                        %container,
                        reason = skip.reason.as_str(),
                        "docker container skipped: {}",
                        skip.detail
                    );
                    self.metrics
                        .skipped
                        .with_label_values(&["docker", skip.reason.as_str()])
                        .inc();
                }
                Note::Warning { container, warning } => {
                    tracing::warn!(%container, "docker container address: {warning}");
                }
            }
        }
    }

    /// Sends the endpoint set to the router when it changed.
    fn publish(&mut self) {
        let endpoints = self.containers.endpoints();
        if self.published.as_ref() == Some(&endpoints) {
            return;
        }
        let before = self.published.take().unwrap_or_default();
        for e in endpoints.iter().filter(|e| !before.contains(e)) {
            tracing::info!(service = %e.service, addr = %e.addr, "docker endpoint added");
        }
        for e in before.iter().filter(|e| !endpoints.contains(e)) {
            tracing::info!(service = %e.service, addr = %e.addr, "docker endpoint withdrawn");
        }
        self.status.send_modify(|s| s.endpoints = endpoints.len());
        self.routing.update(Update::SetLocal {
            source: Source::Docker,
            endpoints: endpoints.clone(),
        });
        self.published = Some(endpoints);
    }

    async fn set_synced(&mut self) {
        let was_degraded = self.status.borrow().degraded;
        self.status.send_modify(|s| {
            s.synced = true;
            s.degraded = false;
            s.error = None;
        });
        self.metrics.degraded.with_label_values(&["docker"]).set(0);
        if was_degraded {
            tracing::info!("docker API reachable again: resynchronised");
        }
        if let Some(token) = self.ready.take() {
            // Ready once the router has published the first sync's endpoints.
            let expect = self.published.clone().unwrap_or_default();
            let mut table = self.table.clone();
            let published = table.wait_for(|t| {
                expect
                    .iter()
                    .all(|e| t.local_endpoint(&e.service, e.addr).is_some())
            });
            let _ = tokio::time::timeout(FIRST_PUBLISH_WAIT, published).await;
            tracing::info!(endpoints = expect.len(), "docker discovery synchronised");
            token.ready();
        }
    }

    fn set_degraded(&mut self, err: &DockerError) {
        let was = self.status.borrow().degraded;
        let kept = self.published.as_ref().map_or(0, Vec::len);
        self.status.send_modify(|s| {
            s.degraded = true;
            s.error = Some(err.to_string());
        });
        self.metrics.degraded.with_label_values(&["docker"]).set(1);
        if !was {
            tracing::warn!(
                error = %err,
                kept_endpoints = kept,
                "docker discovery degraded: keeping the endpoints last seen and reconnecting"
            );
        }
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;
/// An inspect under way: the container's id and what the daemon said.
type Inspecting = BoxFuture<(String, Result<Option<Container>, DockerError>)>;

/// Inspects started by events, and the events waiting for them.
#[derive(Default)]
struct Work {
    /// At most [`INSPECT_CONCURRENCY`] at a time.
    inspects: futures_util::stream::FuturesUnordered<Inspecting>,
    /// Containers waiting for a place among `inspects`.
    backlog: std::collections::VecDeque<String>,
    /// Container id → the events waiting for its inspect.
    queued: HashMap<String, Waiting>,
}

/// The events waiting for a container's inspect.
#[derive(Default)]
struct Waiting {
    /// The event that started it, to apply to what it finds (a kill of a container not seen before).
    trigger: Option<EventMessage>,
    /// Events that arrived while it was under way.
    later: Vec<EventMessage>,
}

impl Work {
    /// Inspects `id` now, or as soon as there is room.
    fn inspect(&mut self, docker: &Docker, id: String) {
        if self.inspects.len() >= INSPECT_CONCURRENCY {
            self.backlog.push_back(id);
            return;
        }
        let docker = docker.clone();
        self.inspects.push(Box::pin(async move {
            let result = inspect(&docker, &id).await;
            (id, result)
        }));
    }

    /// Starts the next inspect that waited for room.
    fn next_inspect(&mut self, docker: &Docker) {
        if let Some(id) = self.backlog.pop_front() {
            self.inspect(docker, id);
        }
    }
}

/// Every running container, as a resync lists and inspects them.
struct Snapshot {
    containers: Vec<Container>,
    /// Listed, but their inspect failed.
    failed: Vec<(String, DockerError)>,
}

/// Lists and inspects every running container. Only a failed list fails the whole snapshot: an inspect that
/// fails is reported for that one container, and the others are still read.
async fn snapshot(docker: Docker) -> Result<Snapshot, DockerError> {
    let opts = ListContainersOptionsBuilder::default().all(false).build();
    let list = call("GET /containers/json", docker.list_containers(Some(opts))).await?;
    let ids: Vec<String> = list.into_iter().filter_map(|c| c.id).collect();
    let docker = &docker;
    let inspected: Vec<(String, Result<Option<Container>, DockerError>)> =
        futures_util::stream::iter(ids)
            .map(|id| async move {
                let r = inspect(docker, &id).await;
                (id, r)
            })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .collect()
            .await;
    let mut snap = Snapshot {
        containers: Vec::with_capacity(inspected.len()),
        failed: Vec::new(),
    };
    for (id, r) in inspected {
        match r {
            Ok(Some(c)) => snap.containers.push(c),
            Ok(None) => {}
            Err(e) => snap.failed.push((id, e)),
        }
    }
    Ok(snap)
}

/// `f`'s output, or never when there is no `f`.
async fn maybe<F: Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// One Docker API call with [`API_TIMEOUT`].
async fn call<T>(
    what: &'static str,
    f: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, DockerError> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(DockerError::Api { what, source }),
        Err(_) => Err(DockerError::Timeout {
            what,
            after: API_TIMEOUT,
        }),
    }
}

/// Inspects a container; `None` when it no longer exists.
async fn inspect(docker: &Docker, id: &str) -> Result<Option<Container>, DockerError> {
    match call(
        "GET /containers/{id}/json",
        docker.inspect_container(id, None),
    )
    .await
    {
        Ok(r) => Ok(from_inspect(r)),
        Err(DockerError::Api {
            source:
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                },
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn unix_nanos_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            expose_by_default: false,
            node_label: None,
            node_name: "node-a".into(),
            host_ip: "10.0.0.5".parse().unwrap(),
        }
    }

    fn net(ip: &str) -> NetAddrs {
        NetAddrs {
            ipv4: Some(ip.parse().unwrap()),
            ipv6: None,
        }
    }

    /// A running container named `web-1` on network `app` at 172.20.0.2, exposing 8080, with `labels`.
    fn container(labels: &[(&str, &str)]) -> Container {
        Container {
            id: "c1".into(),
            name: "web-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            exposed_ports: vec!["8080/tcp".into()],
            network_mode: "app".into(),
            networks: [("app".to_string(), net("172.20.0.2"))].into(),
            stop_signal: None,
            state: RunState {
                running: true,
                started_at: "2026-01-01T00:00:00Z".into(),
                ..RunState::default()
            },
        }
    }

    fn route(v: &Exposure) -> &EndpointSpec {
        match v {
            Exposure::Route { spec, .. } => spec,
            other => panic!("expected a route, got {other:?}"),
        }
    }

    fn reason(v: &Exposure) -> SkipReason {
        match v {
            Exposure::Skip(s) => s.reason,
            other => panic!("expected a skip, got {other:?}"),
        }
    }

    #[test]
    fn enabled_container_with_defaults() {
        let v = classify(&container(&[("mesh.enable", "true")]), &rules());
        assert_eq!(
            route(&v),
            &EndpointSpec {
                service: "web-1".into(),
                addr: "172.20.0.2:8080".parse().unwrap(),
                protocol: Protocol::Http,
                weight: DEFAULT_WEIGHT,
            }
        );
    }

    #[test]
    fn enable_label_and_expose_by_default() {
        let r = rules();
        assert!(matches!(classify(&container(&[]), &r), Exposure::Ignore(_)));
        assert!(matches!(
            classify(&container(&[("mesh.enable", "false")]), &r),
            Exposure::Ignore(_)
        ));
        assert_eq!(
            reason(&classify(&container(&[("mesh.enable", "yes")]), &r)),
            SkipReason::BadEnable
        );
        let by_default = Rules {
            expose_by_default: true,
            ..rules()
        };
        assert!(matches!(
            classify(&container(&[]), &by_default),
            Exposure::Route { .. }
        ));
        assert!(matches!(
            classify(&container(&[("mesh.enable", "0")]), &by_default),
            Exposure::Ignore(_)
        ));
    }

    #[test]
    fn service_name_fallbacks() {
        let name = |labels: &[(&str, &str)]| {
            let mut l = vec![("mesh.enable", "true")];
            l.extend_from_slice(labels);
            route(&classify(&container(&l), &rules())).service.clone()
        };
        assert_eq!(name(&[]), "web-1");
        assert_eq!(name(&[("com.docker.compose.service", "api")]), "api");
        assert_eq!(
            name(&[
                ("com.docker.compose.service", "api"),
                ("com.docker.swarm.service.name", "shop_api")
            ]),
            "shop_api"
        );
        assert_eq!(
            name(&[
                ("com.docker.swarm.service.name", "shop_api"),
                ("mesh.service", "Users")
            ]),
            "users"
        );
        let bad = classify(
            &container(&[("mesh.enable", "true"), ("mesh.service", "10.0.0.1")]),
            &rules(),
        );
        assert_eq!(reason(&bad), SkipReason::BadService);
    }

    #[test]
    fn compose_oneoff_is_ignored() {
        let v = classify(
            &container(&[
                ("mesh.enable", "true"),
                ("com.docker.compose.oneoff", "True"),
            ]),
            &rules(),
        );
        assert!(matches!(v, Exposure::Ignore(_)));
    }

    #[test]
    fn ports() {
        let en = ("mesh.enable", "true");
        let r = rules();
        let p = |c: &Container| route(&classify(c, &r)).addr.port();
        assert_eq!(p(&container(&[en, ("mesh.port", "9000")])), 9000);
        for bad in ["abc", "0", "65536", "-1", "80.5"] {
            assert_eq!(
                reason(&classify(&container(&[en, ("mesh.port", bad)]), &r)),
                SkipReason::BadPort,
                "{bad}"
            );
        }
        let mut c = container(&[en]);
        c.exposed_ports = vec!["8080/tcp".into(), "9090/tcp".into()];
        assert_eq!(reason(&classify(&c, &r)), SkipReason::AmbiguousPort);
        c.labels.insert("mesh.port".into(), "9090".into());
        assert_eq!(p(&c), 9090);
        // UDP ports do not count.
        let mut c = container(&[en]);
        c.exposed_ports = vec!["53/udp".into(), "8080/tcp".into()];
        assert_eq!(p(&c), 8080);
        c.exposed_ports = vec!["53/udp".into()];
        assert_eq!(reason(&classify(&c, &r)), SkipReason::NoPort);
    }

    #[test]
    fn protocol_and_weight() {
        let en = ("mesh.enable", "true");
        let r = rules();
        let s = |l: &[(&str, &str)]| route(&classify(&container(l), &r)).clone();
        assert_eq!(s(&[en, ("mesh.protocol", "grpc")]).protocol, Protocol::Grpc);
        assert_eq!(s(&[en, ("mesh.protocol", "H2C")]).protocol, Protocol::H2c);
        assert_eq!(s(&[en, ("mesh.weight", "7")]).weight, 7);
        assert_eq!(
            reason(&classify(&container(&[en, ("mesh.protocol", "spdy")]), &r)),
            SkipReason::BadProtocol
        );
        for bad in ["0", "x", "-3", "2000000"] {
            assert_eq!(
                reason(&classify(&container(&[en, ("mesh.weight", bad)]), &r)),
                SkipReason::BadWeight
            );
        }
    }

    #[test]
    fn node_label_selects_this_nodes_containers() {
        let r = Rules {
            node_label: Some("mesh.node".into()),
            ..rules()
        };
        let en = ("mesh.enable", "true");
        assert!(matches!(
            classify(&container(&[en, ("mesh.node", "node-a")]), &r),
            Exposure::Route { .. }
        ));
        assert!(matches!(
            classify(&container(&[en, ("mesh.node", "node-b")]), &r),
            Exposure::Ignore(_)
        ));
        assert!(matches!(
            classify(&container(&[en]), &r),
            Exposure::Ignore(_)
        ));
        // Without node_label the label means nothing.
        assert!(matches!(
            classify(&container(&[en, ("mesh.node", "node-b")]), &rules()),
            Exposure::Route { .. }
        ));
    }

    #[test]
    fn address_choice() {
        let en = ("mesh.enable", "true");
        let r = rules();
        let two = |labels: &[(&str, &str)]| {
            let mut c = container(labels);
            c.networks = [
                ("front".to_string(), net("172.21.0.2")),
                ("back".to_string(), net("172.22.0.2")),
                ("ingress".to_string(), net("10.255.0.2")),
            ]
            .into();
            classify(&c, &r)
        };
        // mesh.network picks; ingress is never used; several networks → first by name, with a warning.
        assert_eq!(
            route(&two(&[en, ("mesh.network", "front")])).addr,
            "172.21.0.2:8080".parse().unwrap()
        );
        match two(&[en]) {
            Exposure::Route { spec, warning } => {
                assert_eq!(spec.addr, "172.22.0.2:8080".parse().unwrap());
                assert!(warning.unwrap().contains("mesh.network"));
            }
            v => panic!("{v:?}"),
        }
        assert_eq!(
            reason(&two(&[en, ("mesh.network", "ingress")])),
            SkipReason::BadNetwork
        );
        assert_eq!(
            reason(&two(&[en, ("mesh.network", "other")])),
            SkipReason::BadNetwork
        );
        // Compose prefixes network names with the project.
        assert_eq!(
            route(&two(&[
                en,
                ("mesh.network", "front"),
                ("com.docker.compose.project", "shop")
            ]))
            .addr,
            "172.21.0.2:8080".parse().unwrap()
        );
        let mut c = container(&[en, ("mesh.network", "back")]);
        c.labels
            .insert("com.docker.compose.project".into(), "shop".into());
        c.networks = [
            ("shop_front".to_string(), net("172.21.0.2")),
            ("shop_back".to_string(), net("172.22.0.2")),
        ]
        .into();
        assert_eq!(
            route(&classify(&c, &r)).addr,
            "172.22.0.2:8080".parse().unwrap()
        );
        // Only ingress + one other: the other, no warning.
        let mut c = container(&[en]);
        c.networks = [
            ("ingress".to_string(), net("10.255.0.2")),
            ("overlay".to_string(), net("10.0.1.7")),
        ]
        .into();
        assert_eq!(
            classify(&c, &r),
            Exposure::Route {
                spec: EndpointSpec {
                    service: "web-1".into(),
                    addr: "10.0.1.7:8080".parse().unwrap(),
                    protocol: Protocol::Http,
                    weight: DEFAULT_WEIGHT
                },
                warning: None
            }
        );
    }

    #[test]
    fn host_network_ipv6_and_no_address() {
        let en = ("mesh.enable", "true");
        let mut c = container(&[en]);
        c.network_mode = "host".into();
        c.networks = [("host".to_string(), NetAddrs::default())].into();
        assert_eq!(
            route(&classify(&c, &rules())).addr,
            "10.0.0.5:8080".parse().unwrap()
        );
        let mut c = container(&[en]);
        c.networks = [(
            "v6only".to_string(),
            NetAddrs {
                ipv4: None,
                ipv6: Some("fd00:1::5".parse().unwrap()),
            },
        )]
        .into();
        assert_eq!(
            route(&classify(&c, &rules())).addr,
            "[fd00:1::5]:8080".parse().unwrap()
        );
        let mut c = container(&[en]);
        c.networks.clear();
        assert_eq!(reason(&classify(&c, &rules())), SkipReason::NoAddress);
        c.network_mode = "container:abc".into();
        assert_eq!(reason(&classify(&c, &rules())), SkipReason::NoAddress);
    }

    #[test]
    fn health_gating() {
        let mut s = RunState {
            running: true,
            ..RunState::default()
        };
        assert!(is_routable(&s));
        s.health = Health::Starting;
        assert!(!is_routable(&s));
        s.health = Health::Healthy;
        assert!(is_routable(&s));
        s.health = Health::Unhealthy;
        assert!(!is_routable(&s));
        s.health = Health::Healthy;
        s.paused = true;
        assert!(!is_routable(&s));
        s.paused = false;
        s.restarting = true;
        assert!(!is_routable(&s));
        s.restarting = false;
        s.running = false;
        assert!(!is_routable(&s));
    }

    #[test]
    fn which_kills_stop() {
        assert!(kill_stops(Some("15"), None));
        assert!(kill_stops(Some("9"), None));
        assert!(kill_stops(None, None));
        assert!(!kill_stops(Some("1"), None));
        assert!(!kill_stops(Some("SIGUSR1"), None));
        // An app whose stop signal is SIGHUP does stop on it.
        assert!(kill_stops(Some("1"), Some("SIGHUP")));
        assert!(kill_stops(Some("3"), Some("SIGQUIT")));
    }

    #[test]
    fn since_format() {
        assert_eq!(
            since_param(1_700_000_000_123_000_000),
            "1700000000.123000000"
        );
        assert_eq!(since_param(5), "0.000000005");
    }

    #[test]
    fn reconnect_backoff_doubles_to_the_cap_with_bounded_jitter() {
        let got: Vec<u128> = (0..10)
            .map(|n| RECONNECT_BACKOFF.delay(n, 0.0).as_millis())
            .collect();
        assert_eq!(
            got,
            [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]
        );
        assert_eq!(RECONNECT_BACKOFF.delay(0, 0.999).as_millis(), 119);
        assert_eq!(RECONNECT_BACKOFF.delay(9, 0.999), BACKOFF_MAX);
    }

    #[test]
    fn action_labels_are_bounded() {
        assert_eq!(
            action_label("health_status: healthy"),
            "health_status: healthy"
        );
        assert_eq!(action_label("exec_start: sh -c true"), "other");
        assert_eq!(action_label("kill"), "kill");
    }

    fn tracked(id: &str, ip: &str, labels: &[(&str, &str)]) -> Container {
        let mut c = container(labels);
        c.id = id.into();
        c.name = format!("web-{id}");
        c.networks = [("app".to_string(), net(ip))].into();
        c
    }

    #[test]
    fn container_set_follows_events() {
        let en = ("mesh.enable", "true");
        let mut t = ContainerSet::new(rules());
        assert_eq!(t.upsert(tracked("a", "172.20.0.2", &[en])), None);
        t.upsert(tracked("b", "172.20.0.3", &[en]));
        assert_eq!(t.endpoints().len(), 2);

        // kill (TERM) withdraws while the container still runs, and a resync of the same run keeps it out.
        assert!(t.on_kill("a", Some("15")));
        assert_eq!(t.endpoints().len(), 1);
        t.replace_all(
            vec![
                tracked("a", "172.20.0.2", &[en]),
                tracked("b", "172.20.0.3", &[en]),
            ],
            &[],
        );
        assert_eq!(t.endpoints().len(), 1);
        // A new run of it is routable again.
        let mut again = tracked("a", "172.20.0.2", &[en]);
        again.state.started_at = "2026-01-01T00:01:00Z".into();
        t.upsert(again);
        assert_eq!(t.endpoints().len(), 2);

        // SIGHUP (reload) keeps it; die, pause and unhealthy withdraw it.
        assert!(t.on_kill("b", Some("1")));
        assert_eq!(t.endpoints().len(), 2);
        t.on_exit("b");
        assert_eq!(t.endpoints().len(), 1);
        assert!(t.on_pause("a"));
        assert!(t.endpoints().is_empty());
        t.upsert(tracked("a", "172.20.0.2", &[en]));
        assert!(t.on_health("a", Health::Unhealthy));
        assert!(t.endpoints().is_empty());
        assert!(t.on_health("a", Health::Healthy));
        assert_eq!(t.endpoints().len(), 1);

        // Unknown containers are reported so the caller inspects them.
        assert!(!t.on_kill("zz", Some("15")));
        assert!(!t.on_health("zz", Health::Healthy));
        t.remove("a");
        assert!(t.endpoints().is_empty());

        // An inspect after exit (e.g. prompted by a network disconnect) forgets it without a note, even though
        // an exited container has no address any more.
        let mut exited = tracked("b", "172.20.0.3", &[en]);
        exited.state.running = false;
        exited.networks.clear();
        assert_eq!(t.upsert(exited), None);
        assert!(!t.contains("b"));
    }

    #[test]
    fn container_set_resync_applies_the_difference_and_notes_skips_once() {
        let en = ("mesh.enable", "true");
        let mut t = ContainerSet::new(rules());
        let bad = tracked("bad", "172.20.0.9", &[en, ("mesh.port", "http")]);
        let notes = t.replace_all(vec![tracked("a", "172.20.0.2", &[en]), bad.clone()], &[]);
        assert!(
            matches!(&notes[..], [Note::Skipped { skip, .. }] if skip.reason == SkipReason::BadPort)
        );
        assert_eq!(t.endpoints().len(), 1);
        // The same containers again: no new notes (nothing counted twice).
        let notes = t.replace_all(vec![tracked("a", "172.20.0.2", &[en]), bad], &[]);
        assert!(notes.is_empty());
        // "a" went away and "c" appeared while we were not looking.
        t.replace_all(vec![tracked("c", "172.20.0.4", &[en])], &[]);
        // A container listed but not read (its inspect failed) keeps its last state.
        t.upsert(tracked("d", "172.20.0.5", &[en]));
        t.replace_all(vec![tracked("c", "172.20.0.4", &[en])], &["d".to_string()]);
        assert!(t.contains("d"));
        t.replace_all(vec![tracked("c", "172.20.0.4", &[en])], &[]);
        assert!(!t.contains("d"));
        let eps = t.endpoints();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].addr, "172.20.0.4:8080".parse().unwrap());
    }

    #[test]
    fn reads_an_inspect_response() {
        // Trimmed from a real `GET /containers/{id}/json` (API 1.41).
        let json = r#"{
          "Id": "27dbc1272a56", "Name": "/web-1",
          "State": {"Status": "running", "Running": true, "Paused": false, "Restarting": false,
                    "StartedAt": "2026-11-25T14:07:51.35Z",
                    "Health": {"Status": "starting", "FailingStreak": 0, "Log": []}},
          "HostConfig": {"NetworkMode": "shop_back"},
          "Config": {"ExposedPorts": {"8080/tcp": {}}, "StopSignal": "SIGQUIT",
                     "Labels": {"mesh.enable": "true", "com.docker.compose.service": "api"}},
          "NetworkSettings": {"Networks": {
             "shop_back": {"IPAddress": "172.18.0.2", "GlobalIPv6Address": ""},
             "v6": {"IPAddress": "", "GlobalIPv6Address": "fd00::2"}}}
        }"#;
        let r: ContainerInspectResponse = serde_json::from_str(json).unwrap();
        let c = from_inspect(r).unwrap();
        assert_eq!(c.name, "web-1");
        assert_eq!(c.exposed_ports, vec!["8080/tcp".to_string()]);
        assert_eq!(c.state.health, Health::Starting);
        assert!(c.state.running);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(c.networks["shop_back"], net("172.18.0.2"));
        assert_eq!(
            c.networks["v6"].preferred(),
            Some("fd00::2".parse().unwrap())
        );
        assert_eq!(c.labels["com.docker.compose.service"], "api");
    }
}
