//! The `meshd` command: parses the command line, then hands over to `meshd::app`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshd::config::{self, Config, EXIT_CONFIG, RawConfig, RawStatic};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (before `main`); `_RJEM_MALLOC_CONF` in the environment adds to
/// them. A thread's cache is garbage-collected after every 1 MiB allocated instead of every 64 KiB: hyper
/// takes a fresh 8 KiB read buffer per message on each side of a proxied request, so the default collected
/// every few requests, about 1.5 % of a request's instructions (docs/benchmarks.md). Resident memory idle
/// and at 20k requests/s did not move measurably.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: Option<&'static std::ffi::c_char> =
    Some(unsafe { &*c"tcache_gc_incr_bytes:1048576".as_ptr() });

const DEFAULT_CONFIG_PATH: &str = "/etc/meshd/meshd.toml";

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "A service mesh agent for Docker hosts and bare VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run a one-node mesh on loopback with built-in defaults, for a first try.
    Dev {
        /// A static service: NAME=ADDR[,ADDR...], optionally PROTO://ADDR with proto http, h2c or grpc.
        /// Repeatable.
        #[arg(long = "service", short = 's', value_name = "NAME=ADDR")]
        services: Vec<String>,
        /// Where local apps send requests.
        #[arg(long, default_value = config::DEFAULT_OUTBOUND_LISTEN)]
        listen: String,
        /// The admin API and /metrics.
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: String,
        /// The inbound listener for peer agents (mutual TLS with a CA made in memory at start).
        #[arg(long, default_value = "127.0.0.1:4143")]
        inbound: String,
    },
    /// Validate a config file: exit 0, or print every problem and exit 64.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// The mesh certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Host certificates.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Exit 0 when the agent's /ready answers 200 (a healthcheck for images without curl).
    Health {
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: SocketAddr,
    },
    /// Members and services as tables, from a running agent's admin API.
    Status {
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: SocketAddr,
    },
    /// Per-service requests per second, success rate, latency percentiles and open breakers, refreshed live.
    Stat {
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: SocketAddr,
        /// The window the figures cover (1s to 60s).
        #[arg(long, default_value = "30s")]
        window: String,
        /// Print the table once and exit.
        #[arg(long)]
        once: bool,
        /// Print /v1/stats as JSON once and exit (for scripts).
        #[arg(long)]
        json: bool,
        /// How often the live table is redrawn.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        every: std::time::Duration,
    },
    /// Stream a service's requests as they happen (method, path without query, status, latency, endpoint).
    Tap {
        service: String,
        #[arg(long, default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: SocketAddr,
        /// outbound or inbound (both by default).
        #[arg(long)]
        direction: Option<String>,
        /// Print the JSON lines as the agent sends them.
        #[arg(long)]
        json: bool,
        /// Stop after this many requests.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Gossip keys.
    Gossip {
        #[command(subcommand)]
        command: GossipCommand,
    },
    /// Kernel settings for a proxy host (systemd/sysctl.d/): compare with /proc/sys, or write them.
    Sysctl {
        #[command(subcommand)]
        command: SysctlCommand,
    },
}

#[derive(Subcommand)]
enum SysctlCommand {
    /// Print key, current, wanted and why; exit 0 when the host matches the profile, 1 when it drifts.
    Check {
        /// conservative or proxy-host.
        #[arg(long)]
        profile: String,
        /// Where the kernel's settings are read (for tests).
        #[arg(long, default_value = "/proc/sys", hide = true)]
        proc_sys: PathBuf,
    },
    /// Write the profile's values that differ (as root), and print what changed.
    Apply {
        /// conservative or proxy-host.
        #[arg(long)]
        profile: String,
        #[arg(long, default_value = "/proc/sys", hide = true)]
        proc_sys: PathBuf,
    },
}

#[derive(Subcommand)]
enum GossipCommand {
    /// Print a new gossip key (base64, 32 bytes) for a keyring file.
    Keygen,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a mesh CA: DIR/ca.crt (for every host) and DIR/ca.key (keep it off the hosts).
    Init {
        /// The SPIFFE trust domain, e.g. mesh.example.com (a-z, 0-9, '.', '-', '_').
        #[arg(long)]
        trust_domain: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = meshd::tls::pki::CA_DAYS)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue a host certificate for a node: DIR/NAME.crt and DIR/NAME.key.
    Issue {
        /// The CA directory (`meshd ca init --out`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The node's name, as in its [node] name.
        #[arg(long)]
        node: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = meshd::tls::pki::HOST_DAYS)]
        days: u32,
        /// An extra IP address SAN. Repeatable.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// An extra DNS name SAN. Repeatable.
        #[arg(long)]
        dns: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => match load(&config) {
            Ok(cfg) => run(cfg, Some(config), None, None),
            Err(code) => code,
        },
        Command::Dev {
            services,
            listen,
            admin,
            inbound,
        } => match dev_config(&services, listen, admin, inbound) {
            Ok(cfg) => match meshd::tls::in_memory(&cfg.node.name) {
                Ok(material) => {
                    let banner = dev_banner(&services);
                    run(cfg, None, Some(banner), Some(material))
                }
                Err(e) => {
                    eprintln!("meshd dev: cannot make the in-memory CA: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(msg) => {
                eprintln!("meshd dev: {msg}");
                ExitCode::from(EXIT_CONFIG as u8)
            }
        },
        Command::Health { admin } => health(admin),
        Command::Status { admin } => meshd::cli::status::run(admin),
        Command::Stat {
            admin,
            window,
            once,
            json,
            every,
        } => meshd::cli::stat::run(admin, &window, once, json, every),
        Command::Tap {
            service,
            admin,
            direction,
            json,
            count,
        } => meshd::cli::tap::run(admin, &service, direction.as_deref(), json, count),
        Command::Gossip {
            command: GossipCommand::Keygen,
        } => {
            println!("{}", meshd::membership::keyring::generate_line());
            ExitCode::SUCCESS
        }
        Command::Sysctl { command } => sysctl(command),
        Command::Ca {
            command:
                CaCommand::Init {
                    trust_domain,
                    out,
                    days,
                    force,
                },
        } => report(
            "meshd ca init",
            meshd::tls::pki::ca_init(&trust_domain, &out, days, force),
        ),
        Command::Cert {
            command:
                CertCommand::Issue {
                    ca,
                    node,
                    out,
                    days,
                    ip,
                    dns,
                    force,
                },
        } => report(
            "meshd cert issue",
            meshd::tls::pki::cert_issue(&ca, &node, &out, days, &ip, &dns, force),
        ),
    }
}

/// Prints what a PKI command wrote, or why it did not: exit 64 for bad input, 73 when an output file exists or
/// cannot be written.
fn report(what: &str, result: Result<String, meshd::tls::pki::PkiError>) -> ExitCode {
    use meshd::tls::pki::PkiError;
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{what}: {e}");
            ExitCode::from(match e {
                PkiError::Input(_) => EXIT_CONFIG as u8,
                PkiError::Output(_) => 73,
            })
        }
    }
}

fn load(path: &PathBuf) -> Result<Config, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshd: cannot read config {}: {e}", path.display());
            return Err(ExitCode::from(EXIT_CONFIG as u8));
        }
    };
    let cfg = Config::from_toml(&text).map_err(|errs| {
        eprint!("meshd: {}: {errs}", path.display());
        ExitCode::from(EXIT_CONFIG as u8)
    })?;
    // Agents talk to each other over mutual TLS; plaintext only when asked for by name.
    if cfg.tls.is_none() && !cfg.inbound.insecure_plaintext {
        eprintln!(
            "meshd: {}: tls: missing. Agents accept each other only over mutual TLS. Make a CA once and a \
             certificate per host:\n  meshd ca init --trust-domain mesh.example.com --out ./mesh-ca\n  \
             meshd cert issue --ca ./mesh-ca --node <this host's [node] name> --out ./hosts\nthen add a [tls] \
             section (trust_domain, ca, cert, key; docs/security.md). On a trusted test network only, set \
             inbound.insecure_plaintext = true instead.",
            path.display()
        );
        return Err(ExitCode::from(EXIT_CONFIG as u8));
    }
    // The files [tls] names: read and checked together, each problem with its key.
    if let Err(problems) = meshd::tls::load(&cfg) {
        eprintln!("meshd: {}: problems with the [tls] files:", path.display());
        for (key, msg) in problems {
            eprintln!("  {key}: {msg}");
        }
        return Err(ExitCode::from(EXIT_CONFIG as u8));
    }
    if let Some(g) = &cfg.gossip
        && let Err(problems) = meshd::membership::keyring::Keyring::read(&g.keyring)
    {
        eprintln!(
            "meshd: {}: problems with the gossip keyring:",
            path.display()
        );
        for p in problems {
            eprintln!("  gossip.keyring: {p}");
        }
        return Err(ExitCode::from(EXIT_CONFIG as u8));
    }
    Ok(cfg)
}

fn dev_config(
    services: &[String],
    listen: String,
    admin: String,
    inbound: String,
) -> Result<Config, String> {
    let mut raw = RawConfig::default();
    raw.outbound.listen = Some(vec![listen]);
    raw.admin.listen = Some(admin);
    raw.inbound.listen = Some(inbound);
    // Peer agents over mutual TLS, with an in-memory CA made at start (see run).
    raw.node.name = Some("dev".into());
    // Docker discovery when a Docker socket is reachable (DOCKER_HOST, else /var/run/docker.sock).
    raw.discovery.docker.enabled = meshd::discovery::docker::detect_local_docker().is_some();
    for s in services {
        let (name, rest) = s.split_once('=').ok_or_else(|| {
            format!("--service {s:?}: expected NAME=ADDR, e.g. users=127.0.0.1:8080")
        })?;
        let (protocol, addrs) = match rest.split_once("://") {
            Some((p, a)) => (Some(p.to_string()), a),
            None => (None, rest),
        };
        raw.discovery.static_.push(RawStatic {
            service: name.to_string(),
            endpoints: addrs.split(',').map(str::to_string).collect(),
            protocol,
        });
    }
    raw.validate(None).map_err(|e| e.to_string())
}

fn dev_banner(services: &[String]) -> String {
    let mut out = String::from("services:\n");
    if services.is_empty() {
        out.push_str("  (none: add some with --service NAME=ADDR)\n");
    }
    for s in services {
        out.push_str(&format!("  {s}\n"));
    }
    out
}

/// The runtime: one worker thread per core meshd may run on (its CPU affinity and cgroup quota), or
/// `TOKIO_WORKER_THREADS`; with a single core, one current-thread runtime.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let configured = std::env::var("TOKIO_WORKER_THREADS").ok().and_then(|v| {
        let n = v.trim().parse::<usize>().ok().filter(|n| *n > 0);
        if n.is_none() {
            tracing::warn!(value = %v, "TOKIO_WORKER_THREADS is not a positive number; using one thread per core");
        }
        n
    });
    let threads = configured
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1);
    meshd::util::runtime::build(threads)
}

/// Runs the agent; `material` is TLS made in memory (`meshd dev`) instead of `[tls]` files.
fn run(
    cfg: Config,
    path: Option<PathBuf>,
    dev_banner: Option<String>,
    material: Option<meshd::tls::material::Material>,
) -> ExitCode {
    meshd::telemetry::logging::init(&cfg.log);
    // The one crypto provider, installed before anything could pick another (meshd also passes it explicitly).
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    // Purge freed pages in the background: without it, memory freed after a burst of connections stays with
    // the process until the allocator happens to run again.
    #[cfg(feature = "jemalloc")]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "cannot start jemalloc's background purging");
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let bound = match meshd::app::build_with(cfg, material).await {
            Ok(b) => match path {
                Some(p) => b.with_config_path(p),
                None => b,
            },
            Err(e) => {
                eprintln!("meshd: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(services) = dev_banner {
            let out = bound.outbound[0];
            let first = bound
                .config
                .discovery
                .static_
                .first()
                .map(|s| s.service.clone())
                .unwrap_or_else(|| "SERVICE".into());
            let docker = if bound.config.discovery.docker.enabled {
                format!(
                    "docker:\n  on ({}): containers labelled mesh.enable=true are services (see docs/docker.md)\n",
                    meshd::discovery::docker::effective_host(None)
                )
            } else {
                "docker:\n  off (no Docker socket: set DOCKER_HOST or start Docker)\n".to_string()
            };
            println!(
                "meshd dev: a one-node mesh is running\n  outbound  http://{out}   (apps send requests here)\n  inbound   {}   (peer agents; mutual TLS with an in-memory CA)\n  admin     http://{}   (/ready, /metrics, /v1/services)\n{services}{docker}try:\n  curl -H 'Host: {first}' http://{out}/\n  curl -x http://{out} http://{first}/\nCtrl-C stops it.",
                bound.inbound, bound.admin
            );
        }
        match bound.run(meshd::shutdown::on_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshd: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn sysctl(command: SysctlCommand) -> ExitCode {
    let (profile, root, apply) = match &command {
        SysctlCommand::Check { profile, proc_sys } => (profile, proc_sys, false),
        SysctlCommand::Apply { profile, proc_sys } => (profile, proc_sys, true),
    };
    let settings = match meshd::sysctl::profile(profile) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("meshd sysctl: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if apply {
        return match meshd::sysctl::apply(root, &settings) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshd sysctl apply: {e}");
                ExitCode::from(2)
            }
        };
    }
    let rows = match meshd::sysctl::compare(root, &settings) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("meshd sysctl check: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", meshd::sysctl::render(&rows));
    if rows.iter().all(meshd::sysctl::Row::matches) {
        ExitCode::SUCCESS
    } else {
        println!(
            "the host drifts from profile {profile}: `meshd sysctl apply --profile {profile}` as root sets it"
        );
        ExitCode::FAILURE
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    meshd::util::duration::parse(s)
}

fn health(admin: SocketAddr) -> ExitCode {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let check = || -> std::io::Result<bool> {
        let mut s = std::net::TcpStream::connect_timeout(&admin, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(
            format!("GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf.starts_with(b"HTTP/1.1 200"))
    };
    match check() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("meshd health: {admin}/ready is not 200");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("meshd health: cannot reach {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}
