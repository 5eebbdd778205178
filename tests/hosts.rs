//! Host packaging on real systemd (issue 11): three "VPS nodes" are containers booting systemd as PID 1 from a
//! Debian 12 root filesystem built by tests/hosts/rootfs.sh (debootstrap, `docker import`). `ansible-playbook
//! ansible/site.yml` rolls meshd out to them over Ansible's docker connection, with the hardened unit
//! (systemd/meshd.service), the certificates made on the controller and a sysctl profile. Then, as a user would
//! see it: meshd is active on every node and they formed one gossip cluster; a service on node 1 answers
//! through node 3; a config change applied by `systemctl reload` drops no request; a config that fails
//! check-config stops the playbook at that host and replaces nothing (nor does a bad file with `systemctl
//! reload`); a second run changes nothing; and a rolling upgrade to a new binary under steady traffic fails no
//! request. The containers and their network are removed at the end, also when a step fails.
//!
//! Slow steps are cached in ~/.cache/meshd: the root filesystem tarball (tests/hosts/rootfs.sh) and the
//! Ansible virtualenv (tests/hosts/ansible-venv.sh).

#[path = "cluster/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// The service the nodes serve: a Python HTTP server on nodes 1 and 2, declared as a static service.
const SERVICE: &str = "hello";
/// The same server on node 1, declared under a second name on node 1 alone.
const SOLO: &str = "solo";
const SERVICE_PORT: u16 = 8080;

/// The test's containers and network; removed on drop.
struct Hosts {
    nodes: Vec<String>,
    network: String,
    run_label: Option<String>,
    scratch: tempfile::TempDir,
    venv_bin: PathBuf,
    started: Instant,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                let o = run(
                    "docker",
                    &[
                        "exec",
                        n,
                        "journalctl",
                        "-u",
                        "meshd",
                        "--no-pager",
                        "-n",
                        "40",
                    ],
                    &[],
                );
                eprintln!(
                    "--- {n}: journalctl -u meshd (last 40 lines)\n{}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
        }
        for n in &self.nodes {
            let _ = run("docker", &["rm", "-f", "-v", n], &[]);
        }
        let o = run("docker", &["network", "rm", &self.network], &[]);
        if !o.status.success() {
            eprintln!(
                "docker network rm {}: {}",
                self.network,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

impl Hosts {
    fn step(&self, what: &str) {
        println!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn node(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// `docker exec NODE sh -c SCRIPT`.
    fn sh(&self, node: &str, script: &str) -> Output {
        run("docker", &["exec", node, "sh", "-c", script], &[])
    }

    /// Like [`Hosts::sh`], and it must succeed: its stdout.
    fn sh_ok(&self, node: &str, script: &str) -> String {
        let o = self.sh(node, script);
        assert!(
            o.status.success(),
            "{node}: `{script}` failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn main_pid(&self, node: &str) -> String {
        self.sh_ok(node, "systemctl show -p MainPID --value meshd")
    }

    fn admin_json(&self, node: &str, path: &str) -> Option<Value> {
        let o = self.sh(node, &format!("curl -sf -m 5 http://127.0.0.1:9990{path}"));
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    /// One request for SERVICE through NODE's outbound port: (status, body).
    fn request(&self, node: &str, service: &str) -> (String, String) {
        let o = self.sh(
            node,
            &format!(
                "curl -s -m 5 -w '\\n%{{http_code}}' -H 'Host: {service}' http://127.0.0.1:4140/"
            ),
        );
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        match text.rsplit_once('\n') {
            Some((body, code)) => (code.trim().to_string(), body.trim().to_string()),
            None => (text.trim().to_string(), String::new()),
        }
    }

    /// `ansible-playbook -i inventory/hosts.json ansible/site.yml ARGS...`: (success, output).
    fn playbook(&self, args: &[&str]) -> (bool, String) {
        let inventory = self.scratch.path().join("inventory/hosts.json");
        let playbook = self.venv_bin.join("ansible-playbook");
        let mut all = vec!["-i", path_str(&inventory), "ansible/site.yml"];
        all.extend_from_slice(args);
        let home = self.scratch.path().join("ansible-home");
        let o = run(
            path_str(&playbook),
            &all,
            &[
                (
                    "ANSIBLE_CONFIG",
                    path_str(&repo().join("ansible/ansible.cfg")).to_string(),
                ),
                ("ANSIBLE_HOME", path_str(&home).to_string()),
                ("ANSIBLE_NOCOLOR", "1".to_string()),
                ("ANSIBLE_FORCE_COLOR", "0".to_string()),
            ],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    }

    fn playbook_ok(&self, what: &str, args: &[&str]) -> String {
        let start = Instant::now();
        let (ok, out) = self.playbook(args);
        assert!(ok, "ansible-playbook ({what}) failed:\n{out}");
        self.step(&format!(
            "ansible-playbook ({what}) took {:.1}s",
            start.elapsed().as_secs_f64()
        ));
        out
    }

    /// Starts a loop of requests for the service through NODE's agent, one every 50 ms, each with a 5 s limit.
    fn start_traffic(&self, node: &str, tag: &str) -> Traffic {
        let script = format!(
            "rm -f /tmp/stop-{tag} /tmp/done-{tag} /tmp/codes-{tag}; \
             while [ ! -e /tmp/stop-{tag} ]; do \
               c=$(curl -s -o /dev/null -m 5 -w '%{{http_code}} %header{{mesh-error}}' -H 'Host: {SERVICE}' http://127.0.0.1:4140/); \
               echo \"$(date +%T.%N | cut -c1-12) $c\" >> /tmp/codes-{tag}; sleep 0.05; \
             done; touch /tmp/done-{tag}"
        );
        ok("docker", &["exec", "-d", node, "sh", "-c", &script], &[]);
        Traffic {
            node: node.to_string(),
            tag: tag.to_string(),
        }
    }

    /// Stops the loop: (requests, the lines of those that did not get 200).
    fn stop_traffic(&self, t: Traffic) -> (usize, Vec<String>) {
        let (node, tag) = (t.node, t.tag);
        self.sh_ok(&node, &format!("touch /tmp/stop-{tag}"));
        let done = wait_for(Duration::from_secs(15), || {
            self.sh(&node, &format!("test -e /tmp/done-{tag}"))
                .status
                .success()
                .then_some(())
        });
        assert!(
            done.is_some(),
            "{node}: the traffic loop {tag} did not stop"
        );
        let codes = self.sh_ok(&node, &format!("cat /tmp/codes-{tag}"));
        let lines: Vec<&str> = codes.lines().filter(|l| !l.trim().is_empty()).collect();
        let failed = lines
            .iter()
            .filter(|l| l.split_whitespace().nth(1) != Some("200"))
            .map(|l| l.to_string())
            .collect();
        (lines.len(), failed)
    }

    fn file_sha(&self, node: &str, path: &str) -> String {
        self.sh_ok(node, &format!("sha256sum {path} | cut -d' ' -f1"))
    }
}

struct Traffic {
    node: String,
    tag: String,
}

/// Per host in the PLAY RECAP: (changed, failed).
fn recap(out: &str) -> BTreeMap<String, (u64, u64)> {
    let mut hosts = BTreeMap::new();
    let Some((_, tail)) = out.rsplit_once("PLAY RECAP") else {
        return hosts;
    };
    for line in tail.lines() {
        let Some((host, counts)) = line.split_once(" : ") else {
            continue;
        };
        let get = |key: &str| -> u64 {
            counts
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        hosts.insert(host.trim().to_string(), (get("changed"), get("failed")));
    }
    hosts
}

/// A short, stable hash of a file (FNV-1a), to name the image after the script that builds it.
fn short_hash(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")[..12].to_string()
}

/// The static release binary tests/run.sh builds; built here when it is missing.
fn release_binary() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target"));
    let bin = target.join("x86_64-unknown-linux-gnu/release/meshd");
    if !bin.exists() {
        ok(
            "cargo",
            &[
                "build",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--bin",
                "meshd",
            ],
            &[("RUSTFLAGS", "-C target-feature=+crt-static".to_string())],
        );
    }
    bin
}

fn sha256_of(path: &Path) -> String {
    let out = ok("sha256sum", &[path_str(path)], &[]);
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn ansible_rolls_meshd_out_to_systemd_hosts_reloads_and_upgrades_without_failed_requests() {
    let started = Instant::now();
    let venv = ok("bash", &["tests/hosts/ansible-venv.sh"], &[]);
    let venv_bin = PathBuf::from(venv.lines().last().unwrap_or_default().trim());
    let image = format!(
        "meshd-test-vps:{}",
        short_hash(&repo().join("tests/hosts/rootfs.sh"))
    );
    ok("bash", &["tests/hosts/rootfs.sh", &image], &[]);
    let binary = release_binary();
    println!(
        "[{:>6.1}s] venv, image {image} and binary ready",
        started.elapsed().as_secs_f64()
    );

    let prefix = format!("meshdh{:06x}", fastrand::u32(..0x100_0000));
    let run_label = std::env::var("MESHD_TEST_RUN")
        .ok()
        .filter(|r| !r.is_empty());
    let mut h = Hosts {
        nodes: Vec::new(),
        network: prefix.clone(),
        run_label: run_label.clone(),
        scratch: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
        venv_bin,
        started,
    };
    let label = h.run_label.as_ref().map(|r| format!("meshd-test-run={r}"));
    let mut net_args = vec!["network", "create"];
    if let Some(l) = &label {
        net_args.extend(["--label", l]);
    }
    net_args.push(&prefix);
    ok("docker", &net_args, &[]);

    // Node 1 reaches the engine's socket the way a Docker host's agent does (group docker), with Docker
    // discovery on; nodes 2 and 3 are hosts without Docker.
    let socket = Path::new("/var/run/docker.sock");
    let socket_gid = std::fs::metadata(socket).ok().map(|m| m.gid());
    for i in 1..=3 {
        let name = format!("{prefix}-{i}");
        h.nodes.push(name.clone());
        let mut args = vec![
            "run".to_string(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--hostname".into(),
            name.clone(),
            "--network".into(),
            prefix.clone(),
            "--cap-add".into(),
            "SYS_ADMIN".into(),
            "-v".into(),
            "/sys/fs/cgroup:/sys/fs/cgroup:ro".into(),
            "--tmpfs".into(),
            "/run".into(),
            "--tmpfs".into(),
            "/run/lock".into(),
            "-e".into(),
            "container=docker".into(),
        ];
        if let Some(l) = &label {
            args.extend(["--label".into(), l.clone()]);
        }
        if i == 1 && socket_gid.is_some() {
            args.extend(["-v".into(), "/var/run/docker.sock:/run/docker.sock".into()]);
        }
        args.extend([image.clone(), "/sbin/init".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok("docker", &args, &[]);
    }
    for n in h.nodes.clone() {
        let booted = wait_for(Duration::from_secs(60), || {
            let o = h.sh(&n, "systemctl is-system-running");
            let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
            matches!(state.as_str(), "running" | "degraded").then_some(state)
        });
        let Some((took, state)) = booted else {
            let o = h.sh(
                &n,
                "systemctl --failed --no-pager; systemctl is-system-running",
            );
            panic!(
                "{n}: systemd did not finish booting:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        };
        h.step(&format!(
            "{n}: systemd {state} after {:.1}s",
            took.as_secs_f64()
        ));
    }
    if let Some(gid) = socket_gid {
        h.sh_ok(h.node(0), &format!("groupadd -g {gid} docker"));
    }

    // The service: a Python HTTP server on nodes 1 and 2 that answers with its node's name.
    let mut ips = Vec::new();
    for n in &h.nodes {
        let ip = ok(
            "docker",
            &[
                "inspect",
                "-f",
                &format!("{{{{(index .NetworkSettings.Networks \"{prefix}\").IPAddress}}}}"),
                n,
            ],
            &[],
        );
        ips.push(ip.trim().to_string());
    }
    for n in &h.nodes[..2] {
        h.sh_ok(
            n,
            &format!(
                "mkdir -p /srv/hello && echo 'hello from {n}' > /srv/hello/index.html && \
                 systemd-run --unit=hello --uid=nobody --working-directory=/srv/hello \
                 python3 -m http.server {SERVICE_PORT} --bind 0.0.0.0"
            ),
        );
    }

    // The inventory: Ansible's docker connection, the release binary, a CA made in the scratch directory.
    let pki = h.scratch.path().join("pki");
    let endpoint = |i: usize| format!("{}:{SERVICE_PORT}", ips[i]);
    let inventory = json!({
        "meshd": {
            "hosts": {
                h.node(0): {
                    "meshd_discovery_docker": socket_gid.is_some(),
                    "meshd_docker_node_label": "mesh.node",
                    "meshd_static_services": [
                        { "service": SERVICE, "endpoints": [endpoint(0)] },
                        { "service": SOLO, "endpoints": [endpoint(0)] },
                    ],
                },
                h.node(1): {
                    "meshd_discovery_docker": false,
                    "meshd_static_services": [{ "service": SERVICE, "endpoints": [endpoint(1)] }],
                },
                h.node(2): { "meshd_discovery_docker": false },
            },
            "vars": {
                "ansible_connection": "community.docker.docker",
                "ansible_python_interpreter": "/usr/bin/python3",
                "meshd_binary_src": path_str(&binary),
                "meshd_pki_dir": path_str(&pki),
                "meshd_cluster": "hosts-test",
                "meshd_trust_domain": "hosts.test.mesh",
                "meshd_sysctl_profile": "proxy-host",
                // /proc/sys is read-only in a container: the profile is installed, not applied.
                "meshd_sysctl_apply": false,
                "meshd_gossip_join_timeout": "5s",
                "meshd_drain_timeout": "5s",
                "meshd_ready_delay": 1,
            },
        }
    });
    let inventory_dir = h.scratch.path().join("inventory");
    std::fs::create_dir_all(inventory_dir.join("host_vars")).expect("mkdir inventory");
    std::fs::write(
        inventory_dir.join("hosts.json"),
        serde_json::to_vec_pretty(&inventory).expect("json"),
    )
    .expect("write the inventory");
    let vars = |name: &str, v: Value| -> String {
        let p = h.scratch.path().join(name);
        std::fs::write(&p, v.to_string()).expect("write vars");
        format!("@{}", path_str(&p))
    };

    // 1. The first rollout.
    h.playbook_ok("first rollout", &[]);
    for n in &h.nodes {
        assert_eq!(h.sh_ok(n, "systemctl is-active meshd"), "active", "{n}");
        assert_eq!(
            h.sh_ok(
                n,
                "stat -c '%a %U' /etc/meshd/node.key /etc/meshd/gossip.keys"
            ),
            "600 meshd\n600 meshd",
            "{n}: key modes"
        );
        assert_eq!(
            h.sh_ok(
                n,
                "systemctl show -p User -p NoNewPrivileges -p ProtectSystem -p Type -p WatchdogUSec meshd | sort"
            ),
            "NoNewPrivileges=yes\nProtectSystem=strict\nType=notify\nUser=meshd\nWatchdogUSec=30s",
            "{n}: the unit's identity and hardening"
        );
        assert_eq!(
            h.sh_ok(n, "cat /etc/sysctl.d/30-meshd.conf"),
            std::fs::read_to_string(repo().join("systemd/sysctl.d/meshd-proxy-host.conf"))
                .expect("profile")
                .trim(),
            "{n}: the sysctl profile"
        );
    }
    h.step("meshd active on every node, keys 0600, the profile installed");

    // One gossip cluster: every node sees the two others alive.
    let cluster = wait_for(Duration::from_secs(30), || {
        h.nodes
            .iter()
            .all(|n| {
                let Some(v) = h.admin_json(n, "/v1/members") else {
                    return false;
                };
                let alive: Vec<&str> = v["members"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|m| m["state"] == "alive")
                            .filter_map(|m| m["name"].as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                h.nodes
                    .iter()
                    .filter(|o| *o != n)
                    .all(|o| alive.contains(&o.as_str()))
            })
            .then_some(())
    });
    assert!(
        cluster.is_some(),
        "the nodes did not form one cluster: {:?}",
        h.nodes
            .iter()
            .map(|n| h.admin_json(n, "/v1/members"))
            .collect::<Vec<_>>()
    );
    h.step("one gossip cluster of three");

    // The service on node 1 answers through node 3 (whose agent has no endpoint of its own).
    let node1_answer = format!("hello from {}", h.node(0));
    let answered = wait_for(Duration::from_secs(30), || {
        (h.request(h.node(2), SOLO) == ("200".to_string(), node1_answer.clone())).then_some(())
    });
    assert!(
        answered.is_some(),
        "{SOLO} on node 1 did not answer through node 3: {:?}",
        h.request(h.node(2), SOLO)
    );
    let (code, _) = h.request(h.node(2), SERVICE);
    assert_eq!(code, "200", "{SERVICE} (nodes 1 and 2) through node 3");
    h.step("the service on node 1 answers through node 3");
    if socket_gid.is_some() {
        // /ready waited for Docker discovery's first sync: the hardened unit reaches the socket.
        let v = h
            .admin_json(h.node(0), "/v1/config")
            .expect("node 1's /v1/config");
        assert_eq!(v["discovery"]["docker"]["enabled"], true, "{v}");
    }

    // 2. A config change applied by `systemctl reload` (the role's handler) under traffic: a new policy for the
    //    service on node 3, whose agent every request of the loop goes through. No request fails, the agent is
    //    not restarted, and the new policy is in force.
    let pids: Vec<String> = h.nodes.iter().map(|n| h.main_pid(n)).collect();
    std::fs::write(
        inventory_dir.join(format!("host_vars/{}.json", h.node(2))),
        json!({ "meshd_services": { SERVICE: { "timeout": "3s" } } }).to_string(),
    )
    .expect("write host_vars");
    let t = h.start_traffic(h.node(2), "reload");
    let out = h.playbook_ok("config change on node 3, reload", &["--limit", h.node(2)]);
    let (sent, failed) = h.stop_traffic(t);
    assert!(
        out.contains("RUNNING HANDLER [meshd : Reload meshd]") && !out.contains("Restart meshd]"),
        "{out}"
    );
    assert!(sent >= 20, "only {sent} requests during the reload");
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed during the reload:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(
        h.main_pid(h.node(2)),
        pids[2],
        "node 3 restarted instead of reloading"
    );
    let cfg = h.admin_json(h.node(2), "/v1/config").expect("/v1/config");
    assert_eq!(
        cfg["services"][SERVICE]["timeout"], "3s",
        "node 3's reloaded policy: {cfg}"
    );
    h.step(&format!("reload: {sent} requests, none failed, no restart"));

    // 3. A second run over every host changes nothing.
    let out = h.playbook_ok("again, unchanged", &[]);
    let counts = recap(&out);
    assert_eq!(counts.len(), 3, "{out}");
    assert!(
        counts.values().all(|(changed, _)| *changed == 0),
        "a second run changed something: {counts:?}\n{out}"
    );
    for (n, pid) in h.nodes.iter().zip(&pids) {
        assert_eq!(&h.main_pid(n), pid, "{n} was restarted");
    }
    h.step("second run: changed=0");

    // 4. A config that fails check-config: the play stops at the first host with the problems, and no
    //    host's config is replaced; every agent keeps serving.
    let before: Vec<String> = h
        .nodes
        .iter()
        .map(|n| h.file_sha(n, "/etc/meshd/meshd.toml"))
        .collect();
    let bad = vars(
        "bad.json",
        json!({ "meshd_services": { SERVICE: { "timeout": "fast" } } }),
    );
    let (ok_run, out) = h.playbook(&["-e", &bad]);
    assert!(!ok_run, "the playbook accepted a bad config:\n{out}");
    assert!(
        out.contains("failed to validate") && out.contains("not a duration"),
        "the playbook did not print check-config's problems:\n{out}"
    );
    if let Some(at) = out.find("failed to validate") {
        let from = out[..at].rfind("fatal:").unwrap_or(at);
        let excerpt: String = out[from..].lines().take(12).collect::<Vec<_>>().join("\n");
        println!("the playbook on a bad config:\n{excerpt}");
    }
    let counts = recap(&out);
    assert_eq!(
        counts.get(h.node(0)).map(|c| c.1),
        Some(1),
        "{counts:?}\n{out}"
    );
    for (i, n) in h.nodes.iter().enumerate() {
        assert_eq!(
            h.file_sha(n, "/etc/meshd/meshd.toml"),
            before[i],
            "{n}: config replaced"
        );
        assert_eq!(h.main_pid(n), pids[i], "{n}: restarted");
    }
    // Nodes 2 and 3 were not touched: the only "Write meshd.toml" task that ran failed on node 1.
    assert_eq!(
        out.matches("TASK [meshd : Write meshd.toml").count(),
        1,
        "the play went on after the failed host:\n{out}"
    );
    for n in [h.node(0), h.node(2)] {
        let (code, _) = h.request(n, SERVICE);
        assert_eq!(code, "200", "{n} stopped serving after the refused config");
    }
    // The same with `systemctl reload` on a file edited by hand: the reload fails, the agent keeps serving.
    let n2 = h.node(1);
    h.sh_ok(
        n2,
        "cp -p /etc/meshd/meshd.toml /root/meshd.toml.good && printf '\\n[node2]\\nx = 1\\n' >> /etc/meshd/meshd.toml",
    );
    let reload = h.sh(n2, "systemctl reload meshd");
    assert!(
        !reload.status.success(),
        "systemctl reload accepted a bad config"
    );
    assert_eq!(h.sh_ok(n2, "systemctl is-active meshd"), "active");
    assert_eq!(h.main_pid(n2), pids[1]);
    let journal = h.sh_ok(n2, "journalctl -u meshd --no-pager -n 30");
    assert!(journal.contains("unknown key"), "{journal}");
    h.sh_ok(
        n2,
        "mv /root/meshd.toml.good /etc/meshd/meshd.toml && systemctl reload meshd",
    );
    assert_eq!(h.request(h.node(2), SERVICE).0, "200");
    h.step("bad config refused by the playbook and by systemctl reload; agents kept serving");

    // 5. A rolling upgrade to a new binary (the same one with a byte appended: another checksum) under
    //    steady traffic. Requests sent through an agent while it restarts would find nothing listening, so
    //    the traffic comes from node 3 while nodes 1 and 2 (the service's hosts) are upgraded, then from
    //    node 1 while node 3 is.
    let next = h.scratch.path().join("meshd-next");
    let mut bytes = std::fs::read(&binary).expect("read the binary");
    bytes.push(b'\n');
    std::fs::write(&next, bytes).expect("write the new binary");
    std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let next_sha = sha256_of(&next);
    let upgrade = format!("meshd_binary_src={}", path_str(&next));
    let limit_12 = format!("{},{}", h.node(0), h.node(1));
    let t = h.start_traffic(h.node(2), "upgrade-a");
    h.playbook_ok(
        "upgrade nodes 1 and 2",
        &["-e", &upgrade, "--limit", &limit_12],
    );
    let (sent_a, failed_a) = h.stop_traffic(t);
    let t = h.start_traffic(h.node(0), "upgrade-b");
    h.playbook_ok("upgrade node 3", &["-e", &upgrade, "--limit", h.node(2)]);
    let (sent_b, failed_b) = h.stop_traffic(t);
    for (i, n) in h.nodes.iter().enumerate() {
        assert_eq!(
            h.file_sha(n, "/usr/local/bin/meshd"),
            next_sha,
            "{n}: binary"
        );
        assert_ne!(h.main_pid(n), pids[i], "{n} was not restarted");
        assert_eq!(h.sh_ok(n, "systemctl is-active meshd"), "active", "{n}");
        // No crash and no watchdog kill since (systemd counts only its own restarts); before the upgrade the
        // unchanged MainPIDs showed the same.
        assert_eq!(
            h.sh_ok(n, "systemctl show -p NRestarts --value meshd"),
            "0",
            "{n} was restarted by systemd"
        );
    }
    assert!(
        sent_a >= 20 && sent_b >= 20,
        "too few requests: {sent_a}, {sent_b}"
    );
    assert!(
        failed_a.is_empty() && failed_b.is_empty(),
        "requests failed during the rolling upgrade: {} of {sent_a} through node 3, {} of {sent_b} through node 1:\n{}",
        failed_a.len(),
        failed_b.len(),
        failed_a
            .iter()
            .chain(&failed_b)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    h.step(&format!(
        "rolling upgrade: {} requests, none failed",
        sent_a + sent_b
    ));
}

/// `ansible-lint` passes on the playbook, the role and the example inventory (its strictest profile). It runs
/// on a copy, so its caches (`.ansible/`) stay out of the work tree.
#[test]
fn ansible_lint_is_clean() {
    let venv = ok("bash", &["tests/hosts/ansible-venv.sh"], &[]);
    let bin = PathBuf::from(venv.lines().last().unwrap_or_default().trim());
    let copy = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let dir = path_str(copy.path());
    ok("cp", &["-r", "ansible", "systemd", dir], &[]);
    let path = format!(
        "{}:{}",
        path_str(&bin),
        std::env::var("PATH").unwrap_or_default()
    );
    let o = std::process::Command::new(bin.join("ansible-lint"))
        .args([
            "--nocolor",
            "--offline",
            "--project-dir",
            dir,
            "ansible/site.yml",
            "ansible/roles/meshd",
            "ansible/inventory.example.yml",
        ])
        .current_dir(copy.path())
        .env("PATH", path)
        .env("ANSIBLE_HOME", copy.path().join(".ansible-home"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run ansible-lint: {e}"));
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "ansible-lint found problems:\n{out}");
    assert!(out.contains("Passed"), "{out}");
}

#[test]
fn the_recap_is_read_per_host() {
    let out = "PLAY RECAP *****\n\
        h-1                        : ok=30   changed=2    unreachable=0    failed=0    skipped=5\n\
        h-2                        : ok=3    changed=0    unreachable=0    failed=1    skipped=0\n";
    let r = recap(out);
    assert_eq!(r.get("h-1"), Some(&(2, 0)));
    assert_eq!(r.get("h-2"), Some(&(0, 1)));
}
