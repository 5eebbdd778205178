//! The compose demo (compose/), brought up for real on the local Docker engine: three agents, the init
//! service, the demo app; requests across agents, the chain front -> mid -> back-stable as one trace at the
//! demo's collector (issue 12), an agent killed and restarted, and the bad-input cases of issue 10 (broken
//! labels, a duplicate node name, an agent without its certificates, no Docker socket).
//! Everything it creates is removed at the end, also when a step fails.

#[path = "cluster/support.rs"]
mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Tears the project down (containers, networks, volumes), the extra containers and, when this test built
/// them, the images — on success and on failure alike.
struct Project {
    name: String,
    env: Vec<(&'static str, String)>,
    extra: Vec<String>,
    tag: String,
    own_images: bool,
    scratch: tempfile::TempDir,
}

impl Project {
    fn compose(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["-p", &self.name, "-f", "compose/docker-compose.yml"];
        all.extend_from_slice(args);
        run("docker-compose", &all, &self.env)
    }

    fn compose_ok(&self, args: &[&str]) -> String {
        let o = self.compose(args);
        assert!(
            o.status.success(),
            "docker-compose {args:?} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.name)
    }

    fn port(&self, var: &str) -> u16 {
        self.env
            .iter()
            .find(|(k, _)| *k == var)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no {var}"))
    }

    /// `docker run -d` on the project's network with the project's volumes at hand; removed at the end.
    fn run_extra(&mut self, name: &str, args: &[&str]) -> String {
        let full = format!("{}_{name}", self.name);
        let network = format!("{}_default", self.name);
        let mut all = vec!["run", "-d", "--name", &full, "--network", &network];
        all.extend_from_slice(args);
        self.extra.push(full.clone());
        ok("docker", &all, &[]);
        full
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        for c in &self.extra {
            let _ = run("docker", &["rm", "-f", "-v", c], &[]);
        }
        // The volume the "agent before init" case started with (not a compose volume).
        let _ = run(
            "docker",
            &["volume", "rm", "-f", &format!("{}_empty", self.name)],
            &[],
        );
        let o = self.compose(&["down", "-v", "--remove-orphans", "--timeout", "3"]);
        if !o.status.success() {
            eprintln!(
                "docker-compose down failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if self.own_images {
            remove_images(&self.tag);
        }
    }
}

/// Counts by replica or by error.
type Counts = BTreeMap<String, u64>;

/// The front's tally of `calls` requests to `back`: (answered 200, replica → count, error → count).
fn tally(p: &Project, calls: usize) -> Option<(u64, Counts, Counts)> {
    let (status, body) = http_get(
        p.port("DEMO_PORT"),
        "front",
        &format!("/?calls={calls}&format=json"),
    )?;
    if status != 200 {
        return None;
    }
    let v = json_in(&body)?;
    let counts = |key: &str, field: Option<&str>| -> Counts {
        v[key]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, x)| {
                        let n = match field {
                            Some(f) => x[f].as_u64(),
                            None => x.as_u64(),
                        };
                        (k.clone(), n.unwrap_or(0))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    Some((
        v["ok"].as_u64()?,
        counts("replicas", Some("count")),
        counts("errors", None),
    ))
}

fn admin(p: &Project, var: &str, path: &str) -> Option<Value> {
    let (status, body) = http_get(p.port(var), "localhost", path)?;
    (status == 200).then(|| json_in(&body)).flatten()
}

/// Nodes with endpoints of `service` in agent-a's table.
fn nodes_of(p: &Project, service: &str) -> Option<Vec<String>> {
    let v = admin(p, "DEMO_ADMIN_A", "/v1/services")?;
    let s = v["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?;
    let mut nodes: Vec<String> = s["endpoints"]
        .as_array()?
        .iter()
        .filter_map(|e| e["node"].as_str().map(str::to_string))
        .collect();
    nodes.sort();
    nodes.dedup();
    Some(nodes)
}

fn member_state(p: &Project, var: &str, node: &str) -> Option<String> {
    let v = admin(p, var, "/v1/members")?;
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == node)
        .and_then(|m| m["state"].as_str().map(str::to_string))
}

/// A caller's trace context, as the test sends it to the front: (headers, trace id, the caller's span id).
fn caller_context(b3: bool) -> (Vec<(&'static str, String)>, String, String) {
    let trace = format!("{:032x}", fastrand::u128(1..));
    let span = format!("{:016x}", fastrand::u64(1..));
    let headers = if b3 {
        vec![
            ("X-B3-TraceId", trace.clone()),
            ("X-B3-SpanId", span.clone()),
            ("X-B3-Sampled", "1".to_string()),
        ]
    } else {
        vec![("traceparent", format!("00-{trace}-{span}-01"))]
    };
    (headers, trace, span)
}

/// Whether `spans` (the collector's Zipkin v2 JSON for `trace`) hold the whole chain front -> mid ->
/// back-stable under the caller's span, each hop the child of the one before:
/// agent-a's server span for front's request (a child of the caller's span: front passed the context on) ->
/// its client span -> agent-c's inbound server span -> agent-c's server span for mid's request to back-stable
/// (its child: mid passed the context on) -> agent-c's client span that got 200 -> with a replica on another
/// node, that agent's inbound server span. Every span's parent is in the trace or is the caller's span.
/// Ok: the chain as `node KIND name` lines; Err: what is missing yet (each agent exports once a second).
fn chain_trace(spans: &Value, trace: &str, caller: &str) -> Result<Vec<String>, String> {
    let spans = spans.as_array().ok_or("not a JSON array")?;
    let str_of = |v: &Value, key: &str| v[key].as_str().unwrap_or("").to_string();
    let node = |v: &Value| {
        v["localEndpoint"]["serviceName"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let tag = |v: &Value, key: &str| v["tags"][key].as_str().unwrap_or("").to_string();
    let ids: HashSet<String> = spans.iter().map(|v| str_of(v, "id")).collect();
    for v in spans {
        let parent = str_of(v, "parentId");
        if str_of(v, "traceId") != trace || (parent != caller && !ids.contains(&parent)) {
            return Err(format!("span not linked into the trace: {v}"));
        }
    }
    let child = |parent: &Value, kind: &str, at: &str, service: &str| -> Result<Value, String> {
        spans
            .iter()
            .find(|v| {
                str_of(v, "parentId") == str_of(parent, "id")
                    && str_of(v, "kind") == kind
                    && node(v) == at
                    && tag(v, "mesh.service") == service
                    && (kind == "SERVER" || tag(v, "http.status_code") == "200")
            })
            .cloned()
            .ok_or_else(|| {
                format!(
                    "no {kind} span on {at} for {service} under {:?} yet",
                    str_of(parent, "name")
                )
            })
    };
    let caller_span = serde_json::json!({ "id": caller, "name": "the caller's span" });
    let mut chain = vec![child(&caller_span, "SERVER", "node-a", "mid")?];
    chain.push(child(&chain[0], "CLIENT", "node-a", "mid")?);
    chain.push(child(&chain[1], "SERVER", "node-c", "mid")?);
    chain.push(child(&chain[2], "SERVER", "node-c", "back-stable")?);
    chain.push(child(&chain[3], "CLIENT", "node-c", "back-stable")?);
    let replica_node = tag(&chain[4], "mesh.peer_node");
    if !replica_node.is_empty() {
        chain.push(child(&chain[4], "SERVER", &replica_node, "back-stable")?);
    }
    Ok(chain
        .iter()
        .map(|v| format!("{} {} {}", node(v), str_of(v, "kind"), str_of(v, "name")))
        .collect())
}

fn healthy(container: &str) -> bool {
    let o = run(
        "docker",
        &["inspect", "--format", "{{.State.Health.Status}}", container],
        &[],
    );
    String::from_utf8_lossy(&o.stdout).trim() == "healthy"
}

#[test]
fn three_agents_route_across_hosts_survive_a_killed_agent_and_report_bad_input() {
    let (tag, own_images) = images();
    let name = format!("meshdc{}", fastrand::u32(..));
    let mut p = Project {
        name,
        env: vec![
            ("MESHD_TAG", tag.clone()),
            ("DEMO_PORT", free_port().to_string()),
            ("DEMO_ADMIN_A", free_port().to_string()),
            ("DEMO_ADMIN_B", free_port().to_string()),
            ("DEMO_ADMIN_C", free_port().to_string()),
            ("DEMO_COLLECTOR", free_port().to_string()),
        ],
        extra: Vec::new(),
        tag: tag.clone(),
        own_images,
        scratch: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")),
    };
    p.compose_ok(&["up", "-d"]);

    // Every agent healthy (`meshd health` in the image's healthcheck), the init service done.
    let agents = ["agent-a", "agent-b", "agent-c"].map(|s| p.container(s));
    let up = wait_for(Duration::from_secs(120), || {
        agents.iter().all(|c| healthy(c)).then_some(())
    });
    assert!(
        up.is_some(),
        "agents not healthy:\n{}",
        agents.iter().map(|c| logs(c)).collect::<String>()
    );
    let init_exit = ok(
        "docker",
        &[
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &p.container("init"),
        ],
        &[],
    );
    assert_eq!(init_exit.trim(), "0");

    // The front on node-a reaches replicas on all three hosts through agent-a.
    let spread = wait_for(Duration::from_secs(60), || {
        let (okc, replicas, _) = tally(&p, 40)?;
        let hosts = ["@node-a", "@node-b", "@node-c"];
        (okc == 40
            && hosts
                .iter()
                .all(|h| replicas.keys().any(|r| r.ends_with(h))))
        .then_some(replicas)
    });
    assert!(
        spread.is_some(),
        "the front never reached all three hosts: {:?}",
        tally(&p, 40)
    );

    // The chain front -> mid -> back-stable is one trace at the collector, with W3C and with B3 context. The test
    // plays the user: its own context goes to the front, which passes it on, as mid does on its call.
    for b3 in [false, true] {
        let called = wait_for(Duration::from_secs(60), || {
            let (headers, trace, caller) = caller_context(b3);
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, body) = http_get_with(
                p.port("DEMO_PORT"),
                "front",
                "/?calls=1&upstream=mid&format=json",
                &headers,
            )?;
            let v = json_in(&body)?;
            let chain = v["replicas"].as_object()?.keys().next()?.clone();
            (status == 200 && v["ok"] == 1).then_some((trace, caller, chain))
        });
        let (_, (trace, caller, chain)) =
            called.expect("the front never got an answer from back-stable through mid");
        assert!(chain.starts_with("mid@node-c > back-"), "{chain}");
        let collector = p.port("DEMO_COLLECTOR");
        let spans = || {
            let (status, body) =
                http_get(collector, "collector", &format!("/api/v2/trace/{trace}"))?;
            (status == 200).then(|| json_in(&body)).flatten()
        };
        let linked = wait_for(Duration::from_secs(30), || {
            chain_trace(&spans()?, &trace, &caller).ok()
        });
        let Some((took, hops)) = linked else {
            panic!(
                "trace {trace} ({}) never linked up at the collector: {:?}\n{:?}",
                if b3 { "B3" } else { "W3C" },
                spans().map(|s| chain_trace(&s, &trace, &caller)),
                http_get(collector, "collector", "/traces?limit=5")
            );
        };
        eprintln!("{chain}: trace {trace} complete at the collector after {took:?}: {hops:#?}");
        // The same trace, as the collector prints it for people.
        let (_, text) = http_get(collector, "collector", "/traces?limit=10").unwrap_or_default();
        assert!(
            text.contains(&format!("trace {trace}")) && text.contains("inbound GET mid"),
            "{text}"
        );
    }

    // 300 calls: all answered; the broken replica never answers 200 (retried elsewhere) and its breaker opens;
    // the slow one gets less than any fast one; the canary gets its share of the split.
    let mut all = BTreeMap::new();
    let mut answered = 0;
    for _ in 0..3 {
        let (okc, replicas, errors) = tally(&p, 100).expect("front answers");
        assert!(errors.is_empty(), "errors through the mesh: {errors:?}");
        answered += okc;
        for (k, v) in replicas {
            *all.entry(k).or_insert(0) += v;
        }
    }
    assert_eq!(answered, 300, "{all:?}");
    assert!(!all.contains_key("back-broken@node-c"), "{all:?}");
    let get = |k: &str| all.get(k).copied().unwrap_or(0);
    assert!(
        get("back-slow@node-b") < get("back-1@node-a").min(get("back-2@node-b")),
        "the slow replica was not avoided: {all:?}"
    );
    let canary = get("back-canary@node-b");
    assert!(
        (5..=75).contains(&canary),
        "canary share of 300 under a 10 % split: {all:?}"
    );
    let services = admin(&p, "DEMO_ADMIN_A", "/v1/services").expect("agent-a's /v1/services");
    let broken = services["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "back-stable"))
        .and_then(|s| s["endpoints"].as_array())
        .map(|e| {
            e.iter()
                .filter(|e| e["breaker"] != "closed")
                .filter_map(|e| e["node"].as_str())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert_eq!(
        broken,
        ["node-c"],
        "only the broken replica's breaker is open"
    );

    // Kill agent-c (no graceful leave): its endpoints leave agent-a's table within the detection bound, and
    // requests keep succeeding on the remaining replicas.
    ok("docker", &["kill", &agents[2]], &[]);
    let gone = wait_for(Duration::from_secs(20), || {
        let nodes = nodes_of(&p, "back-stable")?;
        (!nodes.iter().any(|n| n == "node-c")).then_some(nodes)
    });
    let (took, left) = gone.expect("node-c's endpoints stayed in agent-a's table for 20 s");
    eprintln!("node-c removed from agent-a's table {took:?} after the kill; left {left:?}");
    let (okc, replicas, errors) = tally(&p, 100).expect("front answers");
    assert_eq!((okc, errors.len()), (100, 0), "{replicas:?} {errors:?}");
    assert!(
        replicas.keys().all(|r| !r.ends_with("@node-c")),
        "{replicas:?}"
    );

    // Restart it: it rejoins and its replicas are used again.
    ok("docker", &["start", &agents[2]], &[]);
    let back = wait_for(Duration::from_secs(60), || {
        let (_, replicas, _) = tally(&p, 40)?;
        (replicas.contains_key("back-3@node-c")
            && member_state(&p, "DEMO_ADMIN_A", "node-c").as_deref() == Some("alive"))
        .then_some(())
    });
    assert!(
        back.is_some(),
        "agent-c did not rejoin: {:?}\n{}",
        admin(&p, "DEMO_ADMIN_A", "/v1/members"),
        logs(&agents[0])
    );

    let image = format!("meshd:{tag}");
    let demo = format!("meshd-demo:{tag}");
    let config_dir = format!("{}/compose/config:/etc/meshd:ro", path_str(&repo()));
    let pki = format!("{}_pki:/pki:ro", p.name);

    // Bad input 1: a container with broken labels is skipped with a warning naming it; the rest works.
    let bad = p.run_extra(
        "bad-labels",
        &[
            "-l",
            "mesh.enable=true",
            "-l",
            "mesh.service=back-stable",
            "-l",
            "mesh.port=eighty",
            "-l",
            "mesh.node=node-b",
            &demo,
            "--name",
            "bad",
        ],
    );
    let warned = wait_for(Duration::from_secs(20), || {
        let l = logs(&agents[1]);
        l.lines()
            .find(|l| l.contains(&bad) && l.contains("mesh.port"))
            .map(str::to_string)
    });
    let (_, line) = warned.expect("agent-b logged nothing about the broken labels");
    eprintln!("agent-b: {line}");

    // Bad input 2: a second agent claiming node-b's name: both log it, requests keep working.
    let dup = p.run_extra(
        "dup-node-b",
        &[
            "-v",
            &pki,
            "-v",
            &config_dir,
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock:ro",
            &image,
            "run",
            "--config",
            "/etc/meshd/node-b.toml",
        ],
    );
    let conflict = "another agent claims this agent's node name";
    let seen = wait_for(Duration::from_secs(30), || {
        (logs(&agents[1]).contains(conflict) && logs(&dup).contains(conflict)).then_some(())
    });
    assert!(
        seen.is_some(),
        "no name-conflict log:\n{}\n{}",
        logs(&agents[1]),
        logs(&dup)
    );
    let (okc, _, errors) = tally(&p, 50).expect("front answers");
    assert_eq!((okc, errors.len()), (50, 0), "{errors:?}");
    // Removing the duplicate changes nothing for the routed node-b.
    ok("docker", &["rm", "-f", &dup], &[]);
    let healed = wait_for(Duration::from_secs(40), || {
        let (okc, replicas, errors) = tally(&p, 50)?;
        (okc == 50 && errors.is_empty() && replicas.contains_key("back-canary@node-b"))
            .then_some(())
    });
    assert!(
        healed.is_some(),
        "node-b stopped routing after the duplicate went:\n{}",
        logs(&agents[1])
    );
    eprintln!(
        "node-b routed again {:?} after the duplicate was removed",
        healed.map(|h| h.0)
    );

    // Bad input 3: an agent started before the init service made its files: exit 64 naming the key and file.
    let empty = format!("{}_empty:/pki", p.name);
    let early = p.run_extra(
        "early",
        &[
            "-v",
            &empty,
            "-v",
            &config_dir,
            &image,
            "run",
            "--config",
            "/etc/meshd/node-c.toml",
        ],
    );
    let exited = wait_for(Duration::from_secs(20), || {
        let o = run(
            "docker",
            &[
                "inspect",
                "--format",
                "{{.State.Status}} {{.State.ExitCode}}",
                &early,
            ],
            &[],
        );
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        s.starts_with("exited").then_some(s)
    });
    assert_eq!(exited.map(|(_, s)| s).as_deref(), Some("exited 64"));
    let l = logs(&early);
    assert!(l.contains("tls.ca") && l.contains("/pki/ca.crt"), "{l}");
    // Its empty volume goes with the extra containers at the end (it is in use until then).

    // Bad input 4: an agent with no Docker socket says so, stays unready, and the cluster keeps working.
    let node_d = format!("{}/node-d.toml", path_str(p.scratch.path()));
    std::fs::write(
        &node_d,
        std::fs::read_to_string(repo().join("compose/config/node-c.toml"))
            .unwrap_or_default()
            .replace("node-c", "node-d"),
    )
    .unwrap_or_else(|e| panic!("{node_d}: {e}"));
    let pki_rw = format!("{}_pki:/pki", p.name);
    let ca = format!("{}_ca:/ca:ro", p.name);
    ok(
        "docker",
        &[
            "run",
            "--rm",
            "-v",
            &pki_rw,
            "-v",
            &ca,
            &image,
            "cert",
            "issue",
            "--ca",
            "/ca",
            "--node",
            "node-d",
            "--out",
            "/pki/node-d",
        ],
        &[],
    );
    let scratch_mount = format!("{}:/etc/meshd-d:ro", path_str(p.scratch.path()));
    let no_socket = p.run_extra(
        "no-socket",
        &[
            "-v",
            &pki,
            "-v",
            &scratch_mount,
            &image,
            "run",
            "--config",
            "/etc/meshd-d/node-d.toml",
        ],
    );
    let said = wait_for(Duration::from_secs(30), || {
        let l = logs(&no_socket);
        (l.contains("docker discovery degraded")
            && member_state(&p, "DEMO_ADMIN_A", "node-d").as_deref() == Some("alive"))
        .then_some(l)
    });
    let (_, l) =
        said.unwrap_or_else(|| panic!("the agent without a socket:\n{}", logs(&no_socket)));
    let line = l
        .lines()
        .find(|l| l.contains("docker discovery degraded"))
        .unwrap_or_default();
    eprintln!("no socket: {line}");
    let health = run("docker", &["exec", &no_socket, "/meshd", "health"], &[]);
    assert!(
        !health.status.success(),
        "an agent that cannot see Docker must not report ready"
    );
    let (okc, _, errors) = tally(&p, 50).expect("front answers");
    assert_eq!((okc, errors.len()), (50, 0), "{errors:?}");
}
