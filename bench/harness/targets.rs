//! What the load generator is pointed at: the backend directly, or one of the proxies in front of it, each
//! written a config and started here with the same pinning.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procs::{Cores, Proc, wait_listening};

/// The backend's address (every target ends there).
pub const BACKEND: u16 = 19080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2c,
    Grpc,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::H1, Proto::H2c, Proto::Grpc];

    pub fn name(self) -> &'static str {
        match self {
            Proto::H1 => "http1",
            Proto::H2c => "h2c",
            Proto::Grpc => "grpc",
        }
    }

    /// The service name meshd routes on (the request's authority); the other proxies ignore it.
    pub fn service(self) -> &'static str {
        match self {
            Proto::H1 => "bench",
            Proto::H2c => "bench-h2",
            Proto::Grpc => "bench-grpc",
        }
    }

    fn index(self) -> u16 {
        match self {
            Proto::H1 => 0,
            Proto::H2c => 1,
            Proto::Grpc => 2,
        }
    }
}

/// How the proxies run: pinned to one core with one worker thread, or on every core with one per core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    OneCore,
    AllCores,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::OneCore => "one-core",
            Layout::AllCores => "all-cores",
        }
    }

    fn cores(self) -> Cores {
        match self {
            Layout::OneCore => Cores::Proxy,
            Layout::AllCores => Cores::All,
        }
    }

    fn threads(self) -> usize {
        match self {
            Layout::OneCore => 1,
            Layout::AllCores => crate::procs::cores(),
        }
    }
}

/// One target: where each protocol's load goes, and the processes that make it up.
pub struct Target {
    pub name: &'static str,
    /// `one-hop` or `two-hops`; direct is `direct`.
    pub scenario: &'static str,
    /// The port the load goes to, by [`Proto::index`].
    ports: [u16; 3],
    pub procs: Vec<Proc>,
}

impl Target {
    pub fn addr(&self, proto: Proto) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[proto.index() as usize]))
    }

    /// User + system CPU seconds of every process of the target (nginx's workers included).
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(crate::procs::cpu_seconds).sum()
    }

    /// Resident memory of every process of the target, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.pids().into_iter().map(crate::procs::rss_mib).sum()
    }

    fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for p in &self.procs {
            let mut stack = vec![p.pid()];
            while let Some(pid) = stack.pop() {
                out.push(pid);
                stack.extend(children(pid));
            }
        }
        out
    }
}

/// The direct children of `pid` (nginx's workers under its master).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Binaries and the work directory the targets are started from.
pub struct Env {
    pub meshd: PathBuf,
    pub backend: PathBuf,
    pub work: PathBuf,
    /// The mesh CA and node certificates, made once by `meshd ca init` / `meshd cert issue`.
    pub pki: PathBuf,
    pub keyring: PathBuf,
    /// A command every proxy is started under (valgrind), or nothing.
    pub prefix: Vec<String>,
}

impl Env {
    fn write(&self, name: &str, text: &str) -> Result<PathBuf, String> {
        let path = self.work.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// Starts a proxy process under [`Env::prefix`].
    fn spawn(
        &self,
        name: &str,
        cores: Cores,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc, String> {
        let Some((first, rest)) = self.prefix.split_first() else {
            return Proc::start(name, cores, program, args, env, log);
        };
        let program_arg = program.to_string_lossy();
        let mut all: Vec<&str> = rest.iter().map(String::as_str).collect();
        all.push(&program_arg);
        all.extend_from_slice(args);
        Proc::start(name, cores, Path::new(first), &all, env, log)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.log"))
    }

    /// The backend, on the load generator's cores (or all cores), with `threads` runtime threads.
    pub fn backend(&self, layout: Layout) -> Result<Proc, String> {
        let (cores, threads) = match layout {
            Layout::OneCore => (Cores::Load, 1),
            Layout::AllCores => (Cores::All, crate::procs::cores()),
        };
        let listen = format!("127.0.0.1:{BACKEND}");
        let threads = threads.to_string();
        let p = Proc::start(
            "backend",
            cores,
            &self.backend,
            &["--listen", &listen, "--threads", &threads],
            &[],
            &self.log(&format!("backend-{}", layout.name())),
        )?;
        wait_listening(
            SocketAddr::from(([127, 0, 0, 1], BACKEND)),
            Duration::from_secs(10),
        )?;
        Ok(p)
    }

    pub fn direct(&self) -> Target {
        Target {
            name: "direct",
            scenario: "direct",
            ports: [BACKEND; 3],
            procs: Vec::new(),
        }
    }

    /// meshd with its default policies, its outbound port in front of the backend (static endpoints).
    pub fn meshd(&self, layout: Layout, base: u16) -> Result<Target, String> {
        let config = format!("{}{}", meshd_base("bench-one", base), static_services());
        let path = self.write(&format!("meshd-one-{}.toml", layout.name()), &config)?;
        let p = self.start_meshd("meshd", &path, layout)?;
        Ok(Target {
            name: "meshd",
            scenario: "one-hop",
            ports: [base; 3],
            procs: vec![p],
        })
    }

    fn start_meshd(&self, name: &str, config: &Path, layout: Layout) -> Result<Proc, String> {
        let threads = layout.threads().to_string();
        let config = config.to_string_lossy();
        self.spawn(
            name,
            layout.cores(),
            &self.meshd,
            &["run", "--config", &config],
            &[("TOKIO_WORKER_THREADS", &threads), ("RUST_LOG", "warn")],
            &self.log(&format!("{name}-{}", layout.name())),
        )
    }

    /// Agent A (no endpoints of its own) → agent B over mutual TLS (pooled h2) → the backend. A learns B's
    /// services by gossip, as in a real cluster.
    pub fn meshd_two_hops(&self, layout: Layout, base: u16) -> Result<Target, String> {
        let pki = self.pki.display();
        let keyring = self.keyring.display();
        let tls = |node: &str| {
            format!(
                "[tls]\ntrust_domain = \"bench.test\"\nca = \"{pki}/ca/ca.crt\"\ncert = \"{pki}/{node}/{node}.crt\"\nkey = \"{pki}/{node}/{node}.key\"\n"
            )
        };
        let b = format!(
            "{}{}[gossip]\nlisten = \"127.0.0.1:{}\"\nkeyring = \"{keyring}\"\n{}",
            meshd_base("bench-b", base + 100).replace("insecure_plaintext = true\n", ""),
            tls("bench-b"),
            base + 105,
            static_services()
        );
        let a = format!(
            "{}{}[gossip]\nlisten = \"127.0.0.1:{}\"\nkeyring = \"{keyring}\"\nseeds = [\"127.0.0.1:{}\"]\n",
            meshd_base("bench-a", base).replace("insecure_plaintext = true\n", ""),
            tls("bench-a"),
            base + 5,
            base + 105
        );
        let b = self.start_meshd(
            "meshd-b",
            &self.write(&format!("meshd-b-{}.toml", layout.name()), &b)?,
            layout,
        )?;
        let a = self.start_meshd(
            "meshd-a",
            &self.write(&format!("meshd-a-{}.toml", layout.name()), &a)?,
            layout,
        )?;
        Ok(Target {
            name: "meshd mTLS",
            scenario: "two-hops",
            ports: [base; 3],
            procs: vec![a, b],
        })
    }

    /// meshd as the first host of a gossip cluster (no seeds), for the members of [`crate::swarm`] to join.
    pub fn meshd_gossip(&self, base: u16) -> Result<(Target, SocketAddr), String> {
        let gossip = SocketAddr::from(([127, 0, 0, 1], base + 5));
        let config = format!(
            "{}[gossip]\nlisten = \"{gossip}\"\nkeyring = \"{}\"\n{}",
            meshd_base("bench-gossip", base),
            self.keyring.display(),
            static_services()
        );
        let path = self.write("meshd-gossip.toml", &config)?;
        let p = self.start_meshd("meshd-gossip", &path, Layout::OneCore)?;
        Ok((
            Target {
                name: "meshd",
                scenario: "gossip",
                ports: [base; 3],
                procs: vec![p],
            },
            gossip,
        ))
    }

    /// The admin address of the meshd started from `base`.
    pub fn admin(base: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], base + 9))
    }

    /// HAProxy with one thread per core of the layout: one frontend per protocol, h2 to the backend for h2c
    /// and gRPC, connections to the backend reused.
    pub fn haproxy(&self, layout: Layout, base: u16) -> Result<Target, String> {
        let config = format!(
            "{}\
frontend h1\n  bind 127.0.0.1:{base}\n  default_backend be_h1\n\
frontend h2c\n  bind 127.0.0.1:{} proto h2\n  default_backend be_h2\n\
frontend grpc\n  bind 127.0.0.1:{} proto h2\n  default_backend be_h2\n\
backend be_h1\n  http-reuse always\n  server s1 127.0.0.1:{BACKEND}\n\
backend be_h2\n  http-reuse always\n  server s1 127.0.0.1:{BACKEND} proto h2\n",
            haproxy_base(layout),
            base + 1,
            base + 2
        );
        let path = self.write(&format!("haproxy-{}.cfg", layout.name()), &config)?;
        let p = self.start_haproxy("haproxy", &path, layout)?;
        Ok(Target {
            name: "haproxy",
            scenario: "one-hop",
            ports: [base, base + 1, base + 2],
            procs: vec![p],
        })
    }

    fn start_haproxy(&self, name: &str, config: &Path, layout: Layout) -> Result<Proc, String> {
        let config = config.to_string_lossy();
        self.spawn(
            name,
            layout.cores(),
            Path::new("haproxy"),
            &["-f", &config, "-db"],
            &[],
            &self.log(&format!("{name}-{}", layout.name())),
        )
    }

    /// HAProxy A → HAProxy B over TLS with client certificates (h2, pooled) → the backend: the same path as
    /// two meshd agents, with the same certificates.
    pub fn haproxy_two_hops(&self, layout: Layout, base: u16) -> Result<Target, String> {
        let pki = &self.pki;
        let pem = |node: &str| -> Result<String, String> {
            let dir = pki.join(node);
            let cert = std::fs::read_to_string(dir.join(format!("{node}.crt")))
                .map_err(|e| e.to_string())?;
            let key = std::fs::read_to_string(dir.join(format!("{node}.key")))
                .map_err(|e| e.to_string())?;
            let path = self.write(&format!("{node}.pem"), &format!("{cert}{key}"))?;
            Ok(path.display().to_string())
        };
        let (a_pem, b_pem) = (pem("bench-a")?, pem("bench-b")?);
        let ca = pki.join("ca/ca.crt").display().to_string();
        let tls_server = format!("ssl crt {b_pem} ca-file {ca} verify required alpn h2");
        let tls_client = format!("ssl crt {a_pem} ca-file {ca} verify required alpn h2");
        let (b1, b2) = (base + 100, base + 101);
        let a = format!(
            "{}\
frontend h1\n  bind 127.0.0.1:{base}\n  default_backend to_b_h1\n\
frontend h2c\n  bind 127.0.0.1:{} proto h2\n  default_backend to_b_h2\n\
frontend grpc\n  bind 127.0.0.1:{} proto h2\n  default_backend to_b_h2\n\
backend to_b_h1\n  http-reuse always\n  server b 127.0.0.1:{b1} {tls_client}\n\
backend to_b_h2\n  http-reuse always\n  server b 127.0.0.1:{b2} {tls_client}\n",
            haproxy_base(layout),
            base + 1,
            base + 2
        );
        let b = format!(
            "{}\
frontend from_a_h1\n  bind 127.0.0.1:{b1} {tls_server}\n  default_backend be_h1\n\
frontend from_a_h2\n  bind 127.0.0.1:{b2} {tls_server}\n  default_backend be_h2\n\
backend be_h1\n  http-reuse always\n  server s1 127.0.0.1:{BACKEND}\n\
backend be_h2\n  http-reuse always\n  server s1 127.0.0.1:{BACKEND} proto h2\n",
            haproxy_base(layout)
        );
        let b = self.start_haproxy(
            "haproxy-b",
            &self.write(&format!("haproxy-b-{}.cfg", layout.name()), &b)?,
            layout,
        )?;
        let a = self.start_haproxy(
            "haproxy-a",
            &self.write(&format!("haproxy-a-{}.cfg", layout.name()), &a)?,
            layout,
        )?;
        Ok(Target {
            name: "haproxy TLS",
            scenario: "two-hops",
            ports: [base, base + 1, base + 2],
            procs: vec![a, b],
        })
    }

    /// nginx as the reverse proxy: one worker (no master process) on one core, else a master and one worker
    /// per core. HTTP/1.1 to the backend with pooled connections (nginx proxies plain HTTP only over
    /// HTTP/1.x); gRPC with `grpc_pass` through its own pool (an HTTP/2 connection must not be offered to a
    /// plain HTTP request).
    pub fn nginx(&self, layout: Layout, base: u16) -> Result<Target, String> {
        let dir = self.work.join(format!("nginx-{}", layout.name()));
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
        let master = match layout {
            Layout::OneCore => "master_process off;\n",
            Layout::AllCores => "",
        };
        let location = "location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }";
        let config = format!(
            "{master}daemon off;\nworker_processes {};\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
events {{ worker_connections 10500; }}\n\
http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 120s;\n\
  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
  upstream b {{ server 127.0.0.1:{BACKEND}; keepalive 64; }}\n\
  upstream g {{ server 127.0.0.1:{BACKEND}; keepalive 64; }}\n\
  server {{ listen 127.0.0.1:{base}; {location} }}\n\
  server {{ listen 127.0.0.1:{} http2; {location} }}\n\
  server {{ listen 127.0.0.1:{} http2; location / {{ grpc_pass grpc://g; }} }}\n}}\n",
            layout.threads(),
            base + 1,
            base + 2,
            d = dir.display()
        );
        let path = self.write(&format!("nginx-{}.conf", layout.name()), &config)?;
        let (path, prefix) = (path.to_string_lossy(), dir.to_string_lossy());
        let p = self.spawn(
            "nginx",
            layout.cores(),
            Path::new("nginx"),
            &["-c", &path, "-p", &prefix],
            &[],
            &self.log(&format!("nginx-{}", layout.name())),
        )?;
        Ok(Target {
            name: "nginx",
            scenario: "one-hop",
            ports: [base, base + 1, base + 2],
            procs: vec![p],
        })
    }
}

/// The part of every meshd config the harness writes: loopback listeners from `base` (outbound, +3 inbound,
/// +9 admin), a quick shutdown, warnings only, room for the 10,000-connection run.
fn meshd_base(node: &str, base: u16) -> String {
    format!(
        "[node]\nname = \"{node}\"\nadvertise_addr = \"127.0.0.1\"\ndrain_timeout = \"0s\"\n\
[outbound]\nlisten = [\"127.0.0.1:{base}\"]\nmax_connections = 10500\n\
[inbound]\nlisten = \"127.0.0.1:{}\"\ninsecure_plaintext = true\n\
[admin]\nlisten = \"127.0.0.1:{}\"\n\
[log]\nlevel = \"warn\"\n",
        base + 3,
        base + 9
    )
}

fn static_services() -> String {
    Proto::ALL
        .iter()
        .map(|p| {
            let protocol = match p {
                Proto::H1 => "http",
                Proto::H2c => "h2c",
                Proto::Grpc => "grpc",
            };
            format!(
                "[[discovery.static]]\nservice = \"{}\"\nendpoints = [\"127.0.0.1:{BACKEND}\"]\nprotocol = \"{protocol}\"\n",
                p.service()
            )
        })
        .collect()
}

fn haproxy_base(layout: Layout) -> String {
    format!(
        "global\n  nbthread {}\n  maxconn 10500\n  no strict-limits\n\
defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  timeout server 30s\n  timeout http-keep-alive 120s\n  option http-keep-alive\n",
        layout.threads()
    )
}
