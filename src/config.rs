//! Configuration: the TOML schema, its documented defaults, and validation.
//!
//! Parsing is pure (`Config::from_toml`): it never touches the environment, so tests feed it strings. A file is
//! read in two steps: serde turns the text into a [`RawConfig`] of plain strings (collecting every unknown key on
//! the way), then [`RawConfig::validate`] checks every value and returns either a typed [`Config`] or the whole
//! list of problems, each with its key path and line. Nothing here binds a socket or reads a clock.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::util::duration;
use crate::util::subnet::Subnet;

pub mod policy;

pub use policy::{RawPolicy, ServicePolicy};

/// Default outbound listener: local apps send here.
pub const DEFAULT_OUTBOUND_LISTEN: &str = "127.0.0.1:4140";
/// Default inbound listener: peer agents send here.
pub const DEFAULT_INBOUND_LISTEN: &str = "0.0.0.0:4143";
/// Default admin listener (loopback only).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9990";
/// Default domain suffixes removed from a Host before it is looked up as a service name.
pub const DEFAULT_STRIP_SUFFIXES: &[&str] = &[".mesh"];
/// Default cluster name: packets and peers from another cluster are refused.
pub const DEFAULT_CLUSTER: &str = "default";
/// How long in-flight requests may finish after SIGTERM/SIGINT.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Per-request timeout (until the response headers arrive) when a service sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send a whole request head within this long of its first byte.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Apps' keep-alive connections with no request in flight are closed after this long: longer than the idle
/// times of common client pools (Go's 90 s), so meshd is not the side that closes a connection a client is
/// about to reuse.
pub const DEFAULT_OUTBOUND_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Peer agents keep their HTTP/2 connections open between bursts; closed after this long with no stream.
pub const DEFAULT_INBOUND_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Admin API connections with no request in flight are closed after this long.
pub const DEFAULT_ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections the outbound and inbound listeners each accept at once; further ones wait in the kernel's
/// accept queue.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Connections the admin listener accepts at once: a flood there can never use up what the proxy needs.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 128;
/// An upgraded connection (WebSocket) with no bytes either way for this long is closed.
pub const DEFAULT_UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default log level (an `EnvFilter` directive); `RUST_LOG` overrides it.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// `[tracing] sample_rate`: one new trace in a hundred.
pub const DEFAULT_SAMPLE_RATE: f64 = 0.01;
/// `[log] access_sample`: every request is logged once the access log is on.
pub const DEFAULT_ACCESS_SAMPLE: f64 = 1.0;

/// Default gossip listener (UDP; 7946 is avoided because Docker Swarm uses it).
pub const DEFAULT_GOSSIP_LISTEN: &str = "0.0.0.0:4145";
/// The gossip port a seed without one is assumed to use.
pub const DEFAULT_GOSSIP_PORT: u16 = 4145;
/// How long `/ready` waits for the first join when seeds are configured before it reports degraded.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Exit status for a configuration that cannot be used (EX_USAGE/EX_DATAERR family, as linkerd2-proxy uses).
pub const EXIT_CONFIG: i32 = 64;

// ---------------------------------------------------------------------------------------------------------
// Validated configuration: what the rest of the program reads.
// ---------------------------------------------------------------------------------------------------------

/// The effective, validated configuration.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    pub outbound: OutboundConfig,
    pub inbound: InboundConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub discovery: DiscoveryConfig,
    /// `[tls]`: this host's mesh certificate (checked when loaded: [`crate::tls::load`]).
    pub tls: Option<TlsConfig>,
    /// `[gossip]`: membership with other hosts (absent: a one-host mesh).
    pub gossip: Option<GossipConfig>,
    /// `[tracing]`: distributed tracing (off without a collector).
    pub tracing: TracingConfig,
    /// The policy of every service without its own `[services.<name>]` block.
    pub defaults: ServicePolicy,
    /// Services with their own block, each fully resolved against `[defaults]`.
    pub services: BTreeMap<String, ServicePolicy>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NodeConfig {
    pub name: String,
    pub advertise_addr: Option<IpAddr>,
    /// `advertise_addr` written as a subnet: the agent advertises its own address on that network.
    pub advertise_subnet: Option<Subnet>,
    pub cluster: String,
    #[serde(serialize_with = "duration::ser")]
    pub drain_timeout: Duration,
}

/// Limits every listener has: how long a client may take over a request head, how long an idle connection
/// stays open, and how many connections are served at once.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct ListenerLimits {
    #[serde(serialize_with = "duration::ser")]
    pub header_timeout: Duration,
    #[serde(serialize_with = "duration::ser")]
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OutboundConfig {
    pub listen: Vec<SocketAddr>,
    pub strip_suffixes: Vec<String>,
    #[serde(flatten)]
    pub limits: ListenerLimits,
    #[serde(serialize_with = "duration::ser")]
    pub upgrade_idle_timeout: Duration,
}

/// `[tls]`: PEM files, and the trust domain the certificates must belong to.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TlsConfig {
    pub trust_domain: String,
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// `[gossip]`: SWIM membership over encrypted UDP.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct GossipConfig {
    pub listen: SocketAddr,
    /// `host:port` of agents to join through: IPs or DNS names, re-resolved whenever they are announced to.
    pub seeds: Vec<String>,
    /// The keyring file (checked when loaded: [`crate::membership::keyring::Keyring::read`]).
    pub keyring: std::path::PathBuf,
    pub profile: GossipProfile,
    /// `/ready` waits this long for the first join before it answers 200 with `gossip: degraded`.
    #[serde(serialize_with = "duration::ser")]
    pub join_timeout: Duration,
}

/// Timing presets (docs/configuration.md lists their figures).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GossipProfile {
    Lan,
    Wan,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct InboundConfig {
    pub listen: SocketAddr,
    pub insecure_plaintext: bool,
    #[serde(flatten)]
    pub limits: ListenerLimits,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    #[serde(flatten)]
    pub limits: ListenerLimits,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[tracing]`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TracingConfig {
    /// The share of new traces sampled (a sender's decision is always honoured; `mesh-sample: 1` forces).
    pub sample_rate: f64,
    /// Zipkin v2 collector (`http://host:port/api/v2/spans`).
    pub zipkin: Option<String>,
    /// OTLP/HTTP collector (`http://host:port/v1/traces`).
    pub otlp: Option<String>,
    /// Request headers whose values spans record (lower-cased names); none by default.
    pub record_headers: Vec<String>,
}

impl TracingConfig {
    /// Tracing runs only with a collector to send spans to.
    pub fn enabled(&self) -> bool {
        self.zipkin.is_some() || self.otlp.is_some()
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    /// `[log] access`: where the access log's JSON lines go (`"stdout"`, or a file appended to); `None`: off.
    pub access: Option<AccessTarget>,
    /// `[log] access_sample`: the share of requests logged, 0 < x ≤ 1.
    pub access_sample: f64,
}

/// Where access log lines are written.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum AccessTarget {
    Stdout,
    File(std::path::PathBuf),
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DiscoveryConfig {
    #[serde(rename = "static")]
    pub static_: Vec<StaticService>,
    pub docker: DockerConfig,
}

/// `[discovery.docker]`: this host's containers, found through the Docker Engine API.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DockerConfig {
    /// Off by default: `meshd run` only talks to Docker when asked to.
    pub enabled: bool,
    /// Docker endpoint in `DOCKER_HOST` form (`unix:///var/run/docker.sock`, `tcp://127.0.0.1:2375`). When
    /// unset, `DOCKER_HOST` from the environment, then the default socket.
    pub host: Option<String>,
    /// Expose containers without a `mesh.enable` label.
    pub expose_by_default: bool,
    /// When set, the label holding the name of the node that owns a container (e.g. `"mesh.node"`); containers
    /// whose label names another node are left to that node. Used when several agents share one daemon.
    pub node_label: Option<String>,
}

/// How meshd speaks to an endpoint.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1.
    Http,
    /// HTTP/2 with prior knowledge, cleartext.
    H2c,
    /// gRPC (HTTP/2).
    Grpc,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http" => Some(Protocol::Http),
            "h2c" => Some(Protocol::H2c),
            "grpc" => Some(Protocol::Grpc),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::H2c => "h2c",
            Protocol::Grpc => "grpc",
        }
    }

    /// Whether requests to this endpoint travel as HTTP/2.
    pub fn is_h2(self) -> bool {
        !matches!(self, Protocol::Http)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StaticService {
    pub service: String,
    pub endpoints: Vec<SocketAddr>,
    pub protocol: Protocol,
}

impl Config {
    /// Parses and validates a TOML document. On failure every problem found is returned at once.
    pub fn from_toml(text: &str) -> Result<Config, ConfigErrors> {
        RawConfig::parse(text)?.validate(Some(text))
    }

    /// The configuration used when no file is given: every default.
    pub fn defaults() -> Config {
        match RawConfig::default().validate(None) {
            Ok(cfg) => cfg,
            // The defaults are constants checked by a unit test; reaching this is a bug in this file.
            Err(e) => unreachable!("built-in defaults are invalid: {e}"),
        }
    }

    /// The effective policy of `service`.
    pub fn policy_for(&self, service: &str) -> &ServicePolicy {
        self.services.get(service).unwrap_or(&self.defaults)
    }

    /// The request timeout for `service`: its own, else `[defaults]`.
    pub fn timeout_for(&self, service: &str) -> Duration {
        self.policy_for(service).timeout
    }
}

// ---------------------------------------------------------------------------------------------------------
// Raw configuration: exactly what the file says, as strings, before validation.
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub node: RawNode,
    pub outbound: RawOutbound,
    pub inbound: RawInbound,
    pub admin: RawAdmin,
    pub log: RawLog,
    pub discovery: RawDiscovery,
    pub tls: Option<RawTls>,
    pub gossip: Option<RawGossip>,
    pub tracing: RawTracing,
    pub defaults: RawPolicy,
    pub services: BTreeMap<String, RawPolicy>,
    /// Keys the schema does not know, as found by `parse`.
    #[serde(skip)]
    pub unknown_keys: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawNode {
    pub name: Option<String>,
    pub advertise_addr: Option<String>,
    pub cluster: Option<String>,
    pub drain_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawOutbound {
    pub listen: Option<Vec<String>>,
    pub strip_suffixes: Option<Vec<String>>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub upgrade_idle_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawInbound {
    pub listen: Option<String>,
    pub insecure_plaintext: bool,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTls {
    pub trust_domain: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawGossip {
    pub listen: Option<String>,
    pub seeds: Vec<String>,
    pub keyring: Option<String>,
    pub profile: Option<String>,
    pub join_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTracing {
    pub sample_rate: Option<f64>,
    pub zipkin: Option<String>,
    pub otlp: Option<String>,
    pub record_headers: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
    pub access: Option<String>,
    pub access_sample: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDiscovery {
    #[serde(rename = "static")]
    pub static_: Vec<RawStatic>,
    pub docker: RawDocker,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDocker {
    pub enabled: bool,
    pub host: Option<String>,
    pub expose_by_default: bool,
    pub node_label: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawStatic {
    pub service: String,
    pub endpoints: Vec<String>,
    pub protocol: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// Problems.
// ---------------------------------------------------------------------------------------------------------

/// One thing wrong with a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `discovery.static[1].endpoints[0]`.
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {}): {}", self.path, line, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every problem found in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Collects problems while validating; paths are kept as segments so lines can be looked up afterwards.
struct Problems {
    list: Vec<(Vec<Seg>, String)>,
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                out.push_str(&format!("[{i}]"));
            }
        }
    }
    out
}

macro_rules! p {
    ($($seg:expr),* $(,)?) => { vec![$(Seg::from($seg)),*] };
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_string())
    }
}
impl From<&String> for Seg {
    fn from(s: &String) -> Self {
        Seg::Key(s.clone())
    }
}
impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

impl Problems {
    fn push(&mut self, at: Vec<Seg>, msg: impl Into<String>) {
        self.list.push((at, msg.into()));
    }

    fn finish(self, text: Option<&str>) -> ConfigErrors {
        let doc = text.and_then(|t| t.parse::<toml_edit::Document<String>>().ok());
        ConfigErrors(
            self.list
                .into_iter()
                .map(|(segs, message)| Problem {
                    line: match (&doc, text) {
                        (Some(doc), Some(text)) => line_of(doc, text, &segs),
                        _ => None,
                    },
                    path: path(&segs),
                    message,
                })
                .collect(),
        )
    }
}

/// Finds the line of the deepest part of `segs` present in the document.
fn line_of(doc: &toml_edit::Document<String>, text: &str, segs: &[Seg]) -> Option<usize> {
    let mut item = doc.as_item();
    let mut span = None;
    for seg in segs {
        let (next, key_span) = match seg {
            Seg::Key(k) => {
                let key_span = item
                    .as_table_like()
                    .and_then(|t| t.get_key_value(k))
                    .and_then(|(key, _)| key.span());
                (item.get(k.as_str()), key_span)
            }
            Seg::Index(i) => (item.get(*i), None),
        };
        match next {
            Some(next) => {
                span = next.span().or(key_span).or(span);
                item = next;
            }
            None => break,
        }
    }
    let offset = span?.start;
    Some(text[..offset.min(text.len())].matches('\n').count() + 1)
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

// ---------------------------------------------------------------------------------------------------------
// Parsing.
// ---------------------------------------------------------------------------------------------------------

impl RawConfig {
    /// TOML text → raw config. Unknown keys are collected for `validate` to report with everything else; a
    /// syntax error or a value of the wrong type stops parsing (the file cannot be read further) and is
    /// reported with its line.
    pub fn parse(text: &str) -> Result<RawConfig, ConfigErrors> {
        let de =
            toml::Deserializer::parse(text).map_err(|e| syntax_error(text, &e, String::new()))?;
        let mut unknown = Vec::new();
        let mut on_unknown = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
        let ignored = serde_ignored::Deserializer::new(de, &mut on_unknown);
        let raw: RawConfig = serde_path_to_error::deserialize(ignored).map_err(|e| {
            let at = e.path().to_string();
            syntax_error(text, e.inner(), if at == "." { String::new() } else { at })
        })?;
        // Reported by `validate`, together with every other problem.
        let mut raw = raw;
        raw.unknown_keys = unknown;
        Ok(raw)
    }
}

/// serde_ignored paths look like `node.nmae` or `discovery.static.0.x`.
fn split_path(p: &str) -> Vec<Seg> {
    p.split('.')
        .map(|s| match s.parse::<usize>() {
            Ok(i) => Seg::Index(i),
            Err(_) => Seg::Key(s.to_string()),
        })
        .collect()
}

fn syntax_error(text: &str, e: &toml::de::Error, at: String) -> ConfigErrors {
    let at = if at.is_empty() {
        "(file)".to_string()
    } else {
        // serde_path_to_error writes indexes as `static[0]` already.
        at
    };
    ConfigErrors(vec![Problem {
        path: at,
        line: e.span().map(|s| line_at(text, s.start)),
        message: e.message().trim().to_string(),
    }])
}

// ---------------------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------------------

impl RawConfig {
    /// Checks every value and builds the typed config, or returns every problem found. `text` (the file the raw
    /// config came from) is only used to attach line numbers.
    pub fn validate(&self, text: Option<&str>) -> Result<Config, ConfigErrors> {
        let mut pr = Problems { list: Vec::new() };
        for key in &self.unknown_keys {
            pr.push(
                split_path(key),
                "unknown key (check the spelling against docs/configuration.md)",
            );
        }

        // [node]
        let name = match &self.node.name {
            Some(n) => {
                if !is_valid_name(n) {
                    pr.push(
                        p!("node", "name"),
                        format!("{n:?}: use 1-63 characters of a-z, A-Z, 0-9, '.', '-', '_'"),
                    );
                }
                n.clone()
            }
            None => default_node_name(),
        };
        let mut advertise_subnet = None;
        let advertise_addr = self.node.advertise_addr.as_ref().and_then(|a| {
            if a.contains('/') {
                match a.parse::<Subnet>() {
                    Ok(net) => advertise_subnet = Some(net),
                    Err(why) => pr.push(
                        p!("node", "advertise_addr"),
                        format!("{a:?}: not a subnet: {why}"),
                    ),
                }
                return None;
            }
            match a.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => {
                    pr.push(
                        p!("node", "advertise_addr"),
                        format!("{a:?}: must be an address peers can dial"),
                    );
                    None
                }
                Ok(ip) => Some(ip),
                Err(_) => {
                    pr.push(
                        p!("node", "advertise_addr"),
                        format!("{a:?}: not an IP address or a subnet (ADDRESS/PREFIX)"),
                    );
                    None
                }
            }
        });
        let cluster = self
            .node
            .cluster
            .clone()
            .unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        if !is_valid_name(&cluster) {
            pr.push(
                p!("node", "cluster"),
                format!("{cluster:?}: use 1-63 characters of a-z, A-Z, 0-9, '.', '-', '_'"),
            );
        }
        let drain_timeout = read_duration(
            &mut pr,
            p!("node", "drain_timeout"),
            &self.node.drain_timeout,
        )
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT);

        // [outbound]
        let outbound_listen = match &self.outbound.listen {
            None => vec![parse_default_addr(DEFAULT_OUTBOUND_LISTEN)],
            Some(list) if list.is_empty() => {
                pr.push(p!("outbound", "listen"), "needs at least one address");
                Vec::new()
            }
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(i, a)| socket_addr(&mut pr, p!("outbound", "listen", i), a))
                .collect(),
        };
        let strip_suffixes: Vec<String> = match &self.outbound.strip_suffixes {
            None => DEFAULT_STRIP_SUFFIXES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            Some(list) => {
                for (i, s) in list.iter().enumerate() {
                    if !s.starts_with('.') || s.len() < 2 || !is_valid_name(&s[1..]) {
                        pr.push(
                            p!("outbound", "strip_suffixes", i),
                            format!("{s:?}: a suffix starts with '.' followed by a domain, like \".mesh\""),
                        );
                    }
                }
                list.iter().map(|s| s.to_ascii_lowercase()).collect()
            }
        };

        // [inbound], [admin]
        let inbound_listen = match &self.inbound.listen {
            None => Some(parse_default_addr(DEFAULT_INBOUND_LISTEN)),
            Some(a) => socket_addr(&mut pr, p!("inbound", "listen"), a),
        };
        let admin_listen = match &self.admin.listen {
            None => Some(parse_default_addr(DEFAULT_ADMIN_LISTEN)),
            Some(a) => socket_addr(&mut pr, p!("admin", "listen"), a),
        };

        let outbound_limits = limits(
            &mut pr,
            "outbound",
            (
                &self.outbound.header_timeout,
                &self.outbound.idle_timeout,
                self.outbound.max_connections,
            ),
            (DEFAULT_OUTBOUND_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS),
        );
        let upgrade_idle_timeout = positive_duration(
            &mut pr,
            p!("outbound", "upgrade_idle_timeout"),
            &self.outbound.upgrade_idle_timeout,
        )
        .unwrap_or(DEFAULT_UPGRADE_IDLE_TIMEOUT);
        let inbound_limits = limits(
            &mut pr,
            "inbound",
            (
                &self.inbound.header_timeout,
                &self.inbound.idle_timeout,
                self.inbound.max_connections,
            ),
            (DEFAULT_INBOUND_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS),
        );
        let admin_limits = limits(
            &mut pr,
            "admin",
            (
                &self.admin.header_timeout,
                &self.admin.idle_timeout,
                self.admin.max_connections,
            ),
            (DEFAULT_ADMIN_IDLE_TIMEOUT, DEFAULT_ADMIN_MAX_CONNECTIONS),
        );

        // Two listeners on one port.
        let mut listeners: Vec<(Vec<Seg>, SocketAddr)> = outbound_listen
            .iter()
            .enumerate()
            .map(|(i, a)| (p!("outbound", "listen", i), *a))
            .collect();
        if let Some(a) = inbound_listen {
            listeners.push((p!("inbound", "listen"), a));
        }
        if let Some(a) = admin_listen {
            listeners.push((p!("admin", "listen"), a));
        }
        for (i, (pa, a)) in listeners.iter().enumerate() {
            for (pb, b) in &listeners[..i] {
                if a.port() != 0 && a.port() == b.port() && overlaps(a.ip(), b.ip()) {
                    pr.push(
                        pa.clone(),
                        format!(
                            "{a} uses the same port as {} ({b}): give each listener its own port",
                            path(pb)
                        ),
                    );
                }
            }
        }

        // [log]
        let level = self
            .log
            .level
            .clone()
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string());
        if tracing_subscriber::EnvFilter::builder()
            .parse(&level)
            .is_err()
        {
            pr.push(
                p!("log", "level"),
                format!(
                    "{level:?}: not a log filter (try \"info\", \"debug\" or \"meshd=debug,info\")"
                ),
            );
        }
        let format = match self.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                pr.push(
                    p!("log", "format"),
                    format!("{other:?}: use \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        let access = match self.log.access.as_deref() {
            None | Some("off") => None,
            Some("stdout" | "-") => Some(AccessTarget::Stdout),
            Some(p) if p.starts_with('/') => Some(AccessTarget::File(p.into())),
            Some(other) => {
                pr.push(
                    p!("log", "access"),
                    format!("{other:?}: use \"stdout\", \"off\" or an absolute file path"),
                );
                None
            }
        };
        let access_sample = match self.log.access_sample {
            None => DEFAULT_ACCESS_SAMPLE,
            Some(x) if x > 0.0 && x <= 1.0 => x,
            Some(x) => {
                pr.push(
                    p!("log", "access_sample"),
                    format!(
                        "{x}: a share of requests above 0 and at most 1 (1.0 logs every request)"
                    ),
                );
                DEFAULT_ACCESS_SAMPLE
            }
        };

        // [tracing]
        let sample_rate = match self.tracing.sample_rate {
            None => DEFAULT_SAMPLE_RATE,
            Some(x) if (0.0..=1.0).contains(&x) => x,
            Some(x) => {
                pr.push(
                    p!("tracing", "sample_rate"),
                    format!("{x}: a share of new traces from 0 to 1"),
                );
                DEFAULT_SAMPLE_RATE
            }
        };
        let mut collector = |key: &'static str, url: &Option<String>| -> Option<String> {
            let url = url.as_ref()?;
            let rest = url.strip_prefix("http://");
            let host = rest.map(|r| r.split('/').next().unwrap_or(""));
            if host.is_none_or(|h| h.is_empty() || !h.contains(':')) {
                pr.push(
                    p!("tracing", key),
                    format!("{url:?}: use http://host:port/path (https is not supported; run a collector or agent on the host)"),
                );
                return None;
            }
            Some(url.clone())
        };
        let zipkin = collector("zipkin", &self.tracing.zipkin);
        let otlp = collector("otlp", &self.tracing.otlp);
        let mut record_headers = Vec::new();
        for (i, h) in self.tracing.record_headers.iter().flatten().enumerate() {
            let lower = h.to_ascii_lowercase();
            if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                pr.push(
                    p!("tracing", "record_headers", i),
                    format!("{h:?}: not a header name"),
                );
            } else {
                record_headers.push(lower);
            }
        }
        let tracing = TracingConfig {
            sample_rate,
            zipkin,
            otlp,
            record_headers,
        };

        // [[discovery.static]]
        let mut static_ = Vec::new();
        for (i, s) in self.discovery.static_.iter().enumerate() {
            if s.service.is_empty() {
                pr.push(
                    p!("discovery", "static", i, "service"),
                    "service name is empty",
                );
            } else if let Err(why) = check_service_name(&s.service) {
                pr.push(
                    p!("discovery", "static", i, "service"),
                    format!("{:?}: {why}", s.service),
                );
            } else if let Some(why) = unreachable_name(&s.service, &strip_suffixes) {
                pr.push(p!("discovery", "static", i, "service"), why);
            }
            if s.endpoints.is_empty() {
                pr.push(
                    p!("discovery", "static", i, "endpoints"),
                    "needs at least one \"ip:port\"",
                );
            }
            let endpoints: Vec<SocketAddr> = s
                .endpoints
                .iter()
                .enumerate()
                .filter_map(|(j, e)| {
                    let at = p!("discovery", "static", i, "endpoints", j);
                    let addr = endpoint_addr(&mut pr, at.clone(), e)?;
                    // Pointing a service at meshd itself would loop, or expose the admin API as a service.
                    if let Some((key, _)) = listeners.iter().find(|(_, l)| {
                        l.port() == addr.port() && (l.ip() == addr.ip() || l.ip().is_unspecified())
                    }) {
                        pr.push(at, format!("{e:?} is meshd's own listener {}", path(key)));
                        return None;
                    }
                    Some(addr)
                })
                .collect();
            let protocol = match s.protocol.as_deref() {
                None => Protocol::Http,
                Some(p) => Protocol::parse(p).unwrap_or_else(|| {
                    pr.push(
                        p!("discovery", "static", i, "protocol"),
                        format!("{p:?}: use \"http\", \"h2c\" or \"grpc\""),
                    );
                    Protocol::Http
                }),
            };
            static_.push(StaticService {
                service: s.service.to_ascii_lowercase(),
                endpoints,
                protocol,
            });
        }

        // [discovery.docker]
        let d = &self.discovery.docker;
        if let Some(host) = &d.host
            && !["unix://", "tcp://", "http://"]
                .iter()
                .any(|p| host.starts_with(p) && host.len() > p.len())
        {
            pr.push(
                p!("discovery", "docker", "host"),
                format!("{host:?}: use DOCKER_HOST form, e.g. \"unix:///var/run/docker.sock\" or \"tcp://127.0.0.1:2375\""),
            );
        }
        if let Some(label) = &d.node_label
            && (label.is_empty() || label.chars().any(|c| c.is_whitespace() || c == '='))
        {
            pr.push(
                p!("discovery", "docker", "node_label"),
                format!("{label:?}: a Docker label key such as \"mesh.node\""),
            );
        }
        let docker = DockerConfig {
            enabled: d.enabled,
            host: d.host.clone(),
            expose_by_default: d.expose_by_default,
            node_label: d.node_label.clone(),
        };

        // [defaults], [services.<name>]
        policy::validate(
            &mut pr,
            &[Seg::Key("defaults".into())],
            &self.defaults,
            true,
        );
        let mut lowered = std::collections::BTreeSet::new();
        for (name, svc) in &self.services {
            if let Err(why) = check_service_name(name) {
                pr.push(p!("services", name), format!("{name:?}: {why}"));
            } else if let Some(why) = unreachable_name(name, &strip_suffixes) {
                pr.push(p!("services", name), why);
            }
            if !lowered.insert(name.to_ascii_lowercase()) {
                pr.push(
                    p!("services", name),
                    format!("{name:?} is declared twice (service names are not case-sensitive)"),
                );
            }
            policy::validate(
                &mut pr,
                &[Seg::Key("services".into()), Seg::Key(name.clone())],
                svc,
                false,
            );
        }

        if !pr.list.is_empty() {
            return Err(pr.finish(text));
        }
        let defaults = policy::resolve(&self.defaults, None, DEFAULT_TIMEOUT);
        let services: BTreeMap<String, ServicePolicy> = self
            .services
            .iter()
            .map(|(name, svc)| {
                (
                    name.to_ascii_lowercase(),
                    policy::resolve(&self.defaults, Some(svc), DEFAULT_TIMEOUT),
                )
            })
            .collect();
        // Checks that need the merged values (a service's backoff.max against the min from [defaults]).
        for (at, pol) in std::iter::once((p!("defaults"), &defaults))
            .chain(services.iter().map(|(n, pol)| (p!("services", n), pol)))
        {
            policy::validate_resolved(&mut pr, &at, pol);
        }
        // [tls]
        let tls = self.tls.as_ref().and_then(|t| {
            let mut field = |key: &str, v: &Option<String>| match v.as_deref() {
                Some(v) if !v.trim().is_empty() => Some(v.to_string()),
                _ => {
                    pr.push(
                        p!("tls", key),
                        "required in [tls] (make the files with `meshd ca init` and `meshd cert issue`)",
                    );
                    None
                }
            };
            let trust_domain = field("trust_domain", &t.trust_domain);
            let (ca, cert, key) = (field("ca", &t.ca), field("cert", &t.cert), field("key", &t.key));
            let trust_domain = trust_domain.filter(|td| match crate::tls::identity::TrustDomain::parse(td) {
                Ok(_) => true,
                Err(e) => {
                    pr.push(p!("tls", "trust_domain"), e);
                    false
                }
            });
            Some(TlsConfig {
                trust_domain: trust_domain?,
                ca: ca?.into(),
                cert: cert?.into(),
                key: key?.into(),
            })
        });

        let gossip = self
            .gossip
            .as_ref()
            .and_then(|g| validate_gossip(&mut pr, g, advertise_addr, inbound_listen, &listeners));

        if !pr.list.is_empty() {
            return Err(pr.finish(text));
        }
        Ok(Config {
            node: NodeConfig {
                name,
                advertise_addr,
                advertise_subnet,
                cluster,
                drain_timeout,
            },
            outbound: OutboundConfig {
                listen: outbound_listen,
                strip_suffixes,
                limits: outbound_limits,
                upgrade_idle_timeout,
            },
            inbound: InboundConfig {
                listen: inbound_listen
                    .unwrap_or_else(|| parse_default_addr(DEFAULT_INBOUND_LISTEN)),
                insecure_plaintext: self.inbound.insecure_plaintext,
                limits: inbound_limits,
            },
            admin: AdminConfig {
                listen: admin_listen.unwrap_or_else(|| parse_default_addr(DEFAULT_ADMIN_LISTEN)),
                limits: admin_limits,
            },
            log: LogConfig {
                level,
                format,
                access,
                access_sample,
            },
            discovery: DiscoveryConfig { static_, docker },
            tls,
            gossip,
            tracing,
            defaults,
            services,
        })
    }
}

/// `[gossip]`: every problem with its key; `None` when there was one.
fn validate_gossip(
    pr: &mut Problems,
    g: &RawGossip,
    advertise_addr: Option<IpAddr>,
    inbound_listen: Option<SocketAddr>,
    listeners: &[(Vec<Seg>, SocketAddr)],
) -> Option<GossipConfig> {
    let before = pr.list.len();
    let listen = match &g.listen {
        None => parse_default_addr(DEFAULT_GOSSIP_LISTEN),
        Some(a) => socket_addr(pr, p!("gossip", "listen"), a)?,
    };
    // TCP and UDP ports do not clash, but one number for two things is a mistake waiting to happen in firewalls.
    if let Some((key, _)) = listeners.iter().find(|(_, l)| {
        listen.port() != 0 && l.port() == listen.port() && overlaps(l.ip(), listen.ip())
    }) {
        pr.push(
            p!("gossip", "listen"),
            format!(
                "{listen} uses the same port as {}: give gossip its own port",
                path(key)
            ),
        );
    }
    // The address peers reach this agent's gossip and inbound ports at: one IP for both.
    let own_ip = advertise_addr.or((!listen.ip().is_unspecified()).then(|| listen.ip()));
    if let (Some(ip), Some(inbound)) = (own_ip, inbound_listen)
        && !inbound.ip().is_unspecified()
        && inbound.ip() != ip
    {
        pr.push(
            p!("inbound", "listen"),
            format!(
                "{inbound}: with [gossip], peers reach the inbound port at the gossip address {ip}: listen on \
                 {ip} or on 0.0.0.0"
            ),
        );
    }
    let mut seeds = Vec::new();
    for (i, seed) in g.seeds.iter().enumerate() {
        let at = p!("gossip", "seeds", i);
        match parse_seed(seed) {
            Err(why) => pr.push(at, format!("{seed:?}: {why}")),
            Ok((host, port)) => {
                if let (Ok(ip), Some(own)) = (host.parse::<IpAddr>(), own_ip)
                    && ip == own
                    && (port == listen.port() || listen.port() == 0)
                {
                    pr.push(at, format!("{seed:?} is this agent's own gossip address"));
                }
                seeds.push(format!("{host}:{port}"));
            }
        }
    }
    let keyring = match &g.keyring {
        Some(k) if !k.is_empty() => Some(std::path::PathBuf::from(k)),
        _ => {
            pr.push(
                p!("gossip", "keyring"),
                "missing: gossip needs a keyring file (make a key with `meshd gossip keygen > FILE`)",
            );
            None
        }
    };
    let profile = match g.profile.as_deref() {
        None | Some("lan") => GossipProfile::Lan,
        Some("wan") => GossipProfile::Wan,
        Some(other) => {
            pr.push(
                p!("gossip", "profile"),
                format!("{other:?}: use \"lan\" or \"wan\""),
            );
            GossipProfile::Lan
        }
    };
    let join_timeout = positive_duration(pr, p!("gossip", "join_timeout"), &g.join_timeout)
        .unwrap_or(DEFAULT_JOIN_TIMEOUT);
    if pr.list.len() != before {
        return None;
    }
    Some(GossipConfig {
        listen,
        seeds,
        keyring: keyring?,
        profile,
        join_timeout,
    })
}

/// A seed: `IP:port`, `[v6]:port`, `name:port`, or an IP or name alone (port 4145).
pub fn parse_seed(s: &str) -> Result<(String, u16), &'static str> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 || a.ip().is_unspecified() {
            return Err("a seed needs a real address and a non-zero port");
        }
        return Ok((a.ip().to_string(), a.port()));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Err("a seed needs a real address");
        }
        return Ok((ip.to_string(), DEFAULT_GOSSIP_PORT));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p != 0 => (h, p),
            _ => return Err("the port must be a number from 1 to 65535"),
        },
        None => (s, DEFAULT_GOSSIP_PORT),
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !ok {
        return Err("use IP:port or a DNS name with an optional :port");
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// `[<section>] header_timeout, idle_timeout, max_connections`, with this section's defaults.
fn limits(
    pr: &mut Problems,
    section: &str,
    (header, idle, max): (&Option<String>, &Option<String>, Option<i64>),
    (default_idle, default_max): (Duration, usize),
) -> ListenerLimits {
    let header_timeout = positive_duration(pr, p!(section, "header_timeout"), header)
        .unwrap_or(DEFAULT_HEADER_TIMEOUT);
    let idle_timeout =
        positive_duration(pr, p!(section, "idle_timeout"), idle).unwrap_or(default_idle);
    let max_connections = match max {
        None => default_max,
        Some(n) if (1..=1_000_000).contains(&n) => n as usize,
        Some(n) => {
            pr.push(
                p!(section, "max_connections"),
                format!("{n}: between 1 and 1000000"),
            );
            default_max
        }
    };
    ListenerLimits {
        header_timeout,
        idle_timeout,
        max_connections,
    }
}

fn parse_default_addr(s: &str) -> SocketAddr {
    match s.parse() {
        Ok(a) => a,
        Err(_) => unreachable!("default address {s} is a constant checked by tests"),
    }
}

fn default_node_name() -> String {
    let host = gethostname::gethostname().to_string_lossy().to_string();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(63)
        .collect();
    if host.is_empty() {
        "meshd".to_string()
    } else {
        host
    }
}

fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Service names are DNS-like labels joined by dots; they must not look like an IP address, since meshd never
/// routes to addresses.
pub fn check_service_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("service name is empty");
    }
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err("an IP address is not a service name");
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated part must be 1-63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("use letters, digits, '-', '_' and '.' only");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a part may not start or end with '-'");
        }
    }
    Ok(())
}

/// A service name that ends with a suffix meshd strips from Host headers could never be asked for.
fn unreachable_name(name: &str, suffixes: &[String]) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    suffixes.iter().find(|s| lower.ends_with(s.as_str())).map(|s| {
        format!(
            "{name:?} ends with {s:?}, which outbound.strip_suffixes removes from requests: name it {:?}",
            &name[..name.len() - s.len()]
        )
    })
}

fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

fn socket_addr(pr: &mut Problems, at: Vec<Seg>, s: &str) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            pr.push(
                at,
                format!("{s:?}: not an IP:port (e.g. \"127.0.0.1:4140\" or \"[::1]:4140\")"),
            );
            None
        }
    }
}

fn endpoint_addr(pr: &mut Problems, at: Vec<Seg>, s: &str) -> Option<SocketAddr> {
    let a = socket_addr(pr, at.clone(), s)?;
    if a.port() == 0 || a.ip().is_unspecified() {
        pr.push(
            at,
            format!("{s:?}: an endpoint needs a real address and a non-zero port"),
        );
        return None;
    }
    Some(a)
}

fn read_duration(pr: &mut Problems, at: Vec<Seg>, s: &Option<String>) -> Option<Duration> {
    let s = s.as_ref()?;
    match duration::parse(s) {
        Ok(d) => Some(d),
        Err(why) => {
            pr.push(at, format!("{s:?}: {why}"));
            None
        }
    }
}

fn positive_duration(pr: &mut Problems, at: Vec<Seg>, s: &Option<String>) -> Option<Duration> {
    let d = read_duration(pr, at.clone(), s)?;
    if d.is_zero() {
        pr.push(at, "must be greater than zero");
        return None;
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match Config::from_toml(text) {
            Ok(cfg) => panic!("expected problems, got {cfg:?}"),
            Err(e) => e.0,
        }
    }

    fn has(problems: &[Problem], path: &str, line: usize, needle: &str) {
        assert!(
            problems
                .iter()
                .any(|p| p.path == path && p.line == Some(line) && p.message.contains(needle)),
            "no problem at {path} line {line} containing {needle:?} in {problems:#?}"
        );
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.outbound.listen, vec!["127.0.0.1:4140".parse().unwrap()]);
        assert_eq!(cfg.inbound.listen, "0.0.0.0:4143".parse().unwrap());
        assert_eq!(cfg.admin.listen, "127.0.0.1:9990".parse().unwrap());
        assert_eq!(cfg.outbound.strip_suffixes, vec![".mesh".to_string()]);
        assert_eq!(cfg.node.drain_timeout, Duration::from_secs(10));
        assert_eq!(cfg.defaults.timeout, DEFAULT_TIMEOUT);
        assert_eq!(cfg.node.cluster, "default");
        assert!(!cfg.inbound.insecure_plaintext);
        assert_eq!(cfg.log.format, LogFormat::Text);
        assert_eq!(cfg.outbound.limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(cfg.outbound.limits.header_timeout, Duration::from_secs(10));
        assert_eq!(cfg.admin.limits.max_connections, 128);
        assert_eq!(cfg.inbound.limits.max_connections, 10_000);
        assert_eq!(Config::defaults(), cfg);
    }

    #[test]
    fn listener_limits() {
        let cfg = Config::from_toml(
            "[outbound]\nidle_timeout = \"90s\"\nmax_connections = 50\nupgrade_idle_timeout = \"1m\"\n[admin]\nheader_timeout = \"2s\"\n",
        )
        .unwrap();
        assert_eq!(cfg.outbound.limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.outbound.limits.max_connections, 50);
        assert_eq!(cfg.outbound.upgrade_idle_timeout, Duration::from_secs(60));
        assert_eq!(cfg.admin.limits.header_timeout, Duration::from_secs(2));
        let ps = problems(
            "[inbound]\nidle_timeout = \"0s\"\nmax_connections = 0\n[admin]\nheader_timeout = \"soon\"\n",
        );
        has(&ps, "inbound.idle_timeout", 2, "greater than zero");
        has(&ps, "inbound.max_connections", 3, "between 1");
        has(&ps, "admin.header_timeout", 5, "not a duration");
    }

    #[test]
    fn advertise_addr_takes_an_ip_or_a_subnet() {
        let cfg = Config::from_toml("[node]\nadvertise_addr = \"10.213.0.0/20\"\n").unwrap();
        assert_eq!(cfg.node.advertise_addr, None);
        assert_eq!(
            cfg.node.advertise_subnet.map(|s| s.to_string()),
            Some("10.213.0.0/20".to_string())
        );
        for (bad, needle) in [
            ("10.213.0.1/20", "write the network address (10.213.0.0/20)"),
            ("10.0.0.0/40", "prefix \"40\""),
            ("node-a", "not an IP address or a subnet"),
            ("0.0.0.0", "peers can dial"),
        ] {
            let ps = problems(&format!("[node]\nadvertise_addr = \"{bad}\"\n"));
            has(&ps, "node.advertise_addr", 2, needle);
        }
    }

    #[test]
    fn full_example_parses() {
        let cfg = Config::from_toml(
            r#"
[node]
name = "host-a"
advertise_addr = "10.0.0.11"
cluster = "prod"
drain_timeout = "3s"

[outbound]
listen = ["127.0.0.1:4140", "[::1]:4140"]
strip_suffixes = [".mesh", ".svc.local"]

[inbound]
listen = "0.0.0.0:4143"
insecure_plaintext = true

[admin]
listen = "127.0.0.1:9990"

[log]
level = "meshd=debug,info"
format = "json"

[[discovery.static]]
service = "users"
endpoints = ["10.0.0.5:8080", "10.0.0.6:8080"]

[[discovery.static]]
service = "search"
endpoints = ["[fd00::5]:50051"]
protocol = "grpc"

[defaults]
timeout = "2s"

[services.users]
timeout = "250ms"
"#,
        )
        .unwrap();
        assert_eq!(cfg.node.name, "host-a");
        assert_eq!(cfg.discovery.static_.len(), 2);
        assert_eq!(cfg.discovery.static_[1].protocol, Protocol::Grpc);
        assert_eq!(cfg.timeout_for("users"), Duration::from_millis(250));
        assert_eq!(cfg.timeout_for("search"), Duration::from_secs(2));
        assert_eq!(cfg.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_are_all_reported_with_lines() {
        let ps = problems(
            "[node]\nnmae = \"x\"\n\n[outbound]\nlisten = [\"127.0.0.1:1\"]\nlsten = 3\n[bogus]\na=1\n",
        );
        has(&ps, "node.nmae", 2, "unknown key");
        has(&ps, "outbound.lsten", 6, "unknown key");
        has(&ps, "bogus", 7, "unknown key");
        assert_eq!(ps.len(), 3, "{ps:#?}");
    }

    #[test]
    fn unknown_keys_and_bad_values_together() {
        let ps = problems("[node]\nnmae = \"x\"\ndrain_timeout = \"soon\"\n");
        has(&ps, "node.nmae", 2, "unknown key");
        has(&ps, "node.drain_timeout", 3, "not a duration");
    }

    #[test]
    fn bad_duration_names_its_key() {
        let ps = problems(
            "[defaults]\ntimeout = \"10\"\n\n[services.users]\ntimeout = \"fast\"\n[node]\ndrain_timeout=\"0.5x\"\n",
        );
        has(&ps, "defaults.timeout", 2, "not a duration");
        has(&ps, "services.users.timeout", 5, "not a duration");
        has(&ps, "node.drain_timeout", 7, "not a duration");
    }

    #[test]
    fn bad_address_names_its_key() {
        let ps = problems(
            "[admin]\nlisten = \"localhost:9990\"\n[outbound]\nlisten = [\"127.0.0.1:4140\", \"1.2.3.4\"]\n",
        );
        has(&ps, "admin.listen", 2, "not an IP:port");
        has(&ps, "outbound.listen[1]", 4, "not an IP:port");
    }

    #[test]
    fn two_listeners_on_one_port() {
        let ps = problems("[admin]\nlisten = \"127.0.0.1:4140\"\n");
        has(&ps, "admin.listen", 2, "same port as outbound.listen[0]");
        // 0.0.0.0 overlaps every address on the same port.
        let ps = problems("[inbound]\nlisten = \"0.0.0.0:9990\"\n");
        assert!(
            ps.iter()
                .any(|p| p.path == "admin.listen"
                    && p.message.contains("same port as inbound.listen")),
            "{ps:#?}"
        );
    }

    #[test]
    fn empty_service_name_and_bad_endpoints() {
        let ps = problems(
            "[[discovery.static]]\nservice = \"\"\nendpoints = [\"10.0.0.1:80\"]\n\n[[discovery.static]]\nservice = \"users\"\nendpoints = [\"10.0.0.1\", \"host:80\", \"10.0.0.2:0\"]\nprotocol = \"spdy\"\n",
        );
        has(&ps, "discovery.static[0].service", 2, "empty");
        has(&ps, "discovery.static[1].endpoints[0]", 7, "not an IP:port");
        has(&ps, "discovery.static[1].endpoints[1]", 7, "not an IP:port");
        has(&ps, "discovery.static[1].endpoints[2]", 7, "non-zero port");
        has(&ps, "discovery.static[1].protocol", 8, "\"grpc\"");
        assert_eq!(ps.len(), 5, "{ps:#?}");
    }

    #[test]
    fn names_and_endpoints_that_cannot_work() {
        let ps = problems(
            "[[discovery.static]]\nservice = \"users.mesh\"\nendpoints = [\"127.0.0.1:9990\", \"10.0.0.1:4140\"]\n[outbound]\nlisten = [\"0.0.0.0:4140\"]\n[services.Web]\n[services.web]\n",
        );
        has(&ps, "discovery.static[0].service", 2, "name it \"users\"");
        has(
            &ps,
            "discovery.static[0].endpoints[0]",
            3,
            "own listener admin.listen",
        );
        has(
            &ps,
            "discovery.static[0].endpoints[1]",
            3,
            "own listener outbound.listen[0]",
        );
        assert!(
            ps.iter().any(|p| p.message.contains("declared twice")),
            "{ps:#?}"
        );
        let ps = problems(
            "[defaults]\ncircuit_breaker = { backoff = { min = \"5s\" } }\n[services.a]\ncircuit_breaker = { backoff = { max = \"2s\" } }\n",
        );
        assert!(
            ps.iter()
                .any(|p| p.path == "services.a.circuit_breaker.backoff"),
            "{ps:#?}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let ps = problems(
            "[node]\ndrain_timeout = \"soon\"\n[log]\nformat = \"xml\"\nlevel = \"[\"\n[services.\"10.0.0.1\"]\ntimeout = \"0s\"\n",
        );
        has(&ps, "node.drain_timeout", 2, "not a duration");
        has(&ps, "log.format", 4, "\"json\"");
        has(&ps, "log.level", 5, "not a log filter");
        has(&ps, "services.10.0.0.1", 6, "IP address");
        has(&ps, "services.10.0.0.1.timeout", 7, "greater than zero");
    }

    #[test]
    fn wrong_type_and_syntax_errors_have_lines() {
        let ps = problems("[defaults]\ntimeout = 5\n");
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].path, "defaults.timeout");
        assert_eq!(ps[0].line, Some(2));
        assert!(ps[0].message.contains("string"), "{ps:?}");
        let ps = problems("[node\nname = 1\n");
        assert_eq!(ps[0].line, Some(1), "{ps:?}");
    }

    #[test]
    fn docker_section() {
        let cfg = Config::from_toml(
            "[discovery.docker]\nenabled = true\nhost = \"unix:///run/docker.sock\"\nnode_label = \"mesh.node\"\n",
        )
        .unwrap();
        assert!(cfg.discovery.docker.enabled);
        assert_eq!(
            cfg.discovery.docker.node_label.as_deref(),
            Some("mesh.node")
        );
        let ps =
            problems("[discovery.docker]\nhost = \"/var/run/docker.sock\"\nnode_label = \"\"\n");
        has(&ps, "discovery.docker.host", 2, "DOCKER_HOST form");
        has(&ps, "discovery.docker.node_label", 3, "label key");
    }

    proptest::proptest! {
        /// Whatever the file says, parsing ends in a config or a list of problems, never a panic.
        #[test]
        fn never_panics(text in "(\\[[a-z._]{0,12}\\]\n|[a-z_.]{1,12} = (\"[^\"\n]{0,20}\"|[0-9.-]{1,6}|true|\\[\\]|\\{\\})\n|.{0,10}\n){0,12}") {
            let _ = Config::from_toml(&text);
        }

    }

    #[test]
    fn service_names() {
        assert!(check_service_name("users").is_ok());
        assert!(check_service_name("users.prod").is_ok());
        assert!(check_service_name("10.1.2.3").is_err());
        assert!(check_service_name("::1").is_err());
        assert!(check_service_name("a..b").is_err());
        assert!(check_service_name("-a").is_err());
        assert!(check_service_name("a b").is_err());
    }
}
