//! meshd on a real single-node Docker Swarm (compose/swarm-stack.yml): the agent runs as a global service on
//! an overlay network, discovers the node's tasks by their Swarm labels, routes a request by service name, and
//! follows `docker service scale` up and down. The stack, its network and configs go at the end; the Swarm is
//! left and its `docker_gwbridge` removed when this test made the Swarm — also when a step fails.

#[path = "cluster/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::*;

struct Stack {
    name: String,
    env: Vec<(&'static str, String)>,
    /// Whether this test ran `docker swarm init` (then it leaves the Swarm at the end).
    own_swarm: bool,
    tag: String,
    own_images: bool,
    _pki: tempfile::TempDir,
}

impl Stack {
    fn port(&self, var: &str) -> u16 {
        self.env
            .iter()
            .find(|(k, _)| *k == var)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no {var}"))
    }

    /// Endpoint addresses of `service` in the agent's table, once the admin API answers.
    fn endpoints(&self, service: &str) -> Option<BTreeSet<String>> {
        let (status, body) = http_get(self.port("MESHD_SWARM_ADMIN"), "localhost", "/v1/services")?;
        if status != 200 {
            return None;
        }
        let v = json_in(&body)?;
        let found = v["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)
            .and_then(|s| s["endpoints"].as_array())
            .map(|eps| {
                eps.iter()
                    .filter_map(|e| e["address"].as_str().map(str::to_string))
                    .collect()
            });
        Some(found.unwrap_or_default())
    }

    fn wait_endpoints(&self, service: &str, n: usize) -> BTreeSet<String> {
        match wait_for(Duration::from_secs(90), || {
            self.endpoints(service).filter(|e| e.len() == n)
        }) {
            Some((_, eps)) => eps,
            None => panic!(
                "{service} never had {n} endpoints (now {:?}); agent logs:\n{}\ntasks:\n{}",
                self.endpoints(service),
                self.service_logs("agent"),
                String::from_utf8_lossy(
                    &run("docker", &["stack", "ps", "--no-trunc", &self.name], &[]).stdout
                )
            ),
        }
    }

    fn service_logs(&self, service: &str) -> String {
        let o = run(
            "docker",
            &[
                "service",
                "logs",
                "--raw",
                &format!("{}_{service}", self.name),
            ],
            &[],
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// `calls` requests to `hello` through the agent's published outbound port: replica names that answered.
    fn call_hello(&self, calls: usize) -> BTreeSet<String> {
        let mut answered = BTreeSet::new();
        for i in 0..calls {
            match http_get(self.port("MESHD_SWARM_OUTBOUND"), "hello", "/") {
                Some((200, body)) => {
                    answered.insert(body.trim().to_string());
                }
                other => panic!(
                    "request {i} to hello through the agent: {other:?}\nagent logs:\n{}",
                    self.service_logs("agent")
                ),
            }
        }
        answered
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = run("docker", &["stack", "rm", &self.name], &[]);
        // `stack rm` returns before the tasks are gone; the network goes only after them.
        let network = format!("{}_mesh", self.name);
        let gone = wait_for(Duration::from_secs(60), || {
            let o = run("docker", &["network", "inspect", &network], &[]);
            (!o.status.success()).then_some(())
        });
        if gone.is_none() {
            let _ = run("docker", &["network", "rm", &network], &[]);
        }
        if self.own_swarm {
            let o = run("docker", &["swarm", "leave", "--force"], &[]);
            if !o.status.success() {
                eprintln!("docker swarm leave: {}", String::from_utf8_lossy(&o.stderr));
            }
            // Leaving keeps the bridge Swarm made for its tasks' outside traffic.
            let _ = run("docker", &["network", "rm", "docker_gwbridge"], &[]);
        }
        if self.own_images {
            remove_images(&self.tag);
        }
    }
}

fn swarm_state() -> String {
    ok(
        "docker",
        &["info", "--format", "{{.Swarm.LocalNodeState}}"],
        &[],
    )
    .trim()
    .to_string()
}

#[test]
fn a_global_agent_routes_to_swarm_tasks_and_follows_scaling() {
    let (tag, own_images) = images();
    let pki = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // The guard exists before the Swarm does: whatever fails from here, it is left and cleaned up.
    let mut stack = Stack {
        name: format!("meshds{}", fastrand::u32(..)),
        env: vec![
            ("MESHD_TAG", tag.clone()),
            ("MESHD_SWARM_OUTBOUND", free_port().to_string()),
            ("MESHD_SWARM_ADMIN", free_port().to_string()),
        ],
        own_swarm: false,
        tag: tag.clone(),
        own_images,
        _pki: pki,
    };
    match swarm_state().as_str() {
        "inactive" => {
            stack.own_swarm = true;
            ok(
                "docker",
                &["swarm", "init", "--advertise-addr", "127.0.0.1"],
                &[],
            );
        }
        "active" => {}
        other => {
            panic!("this Docker engine's Swarm state is {other:?}: expected inactive or active")
        }
    }
    let node_id = ok("docker", &["info", "--format", "{{.Swarm.NodeID}}"], &[])
        .trim()
        .to_string();
    stack.env.push((
        "MESHD_SWARM_PKI",
        format!("{}/hosts/{node_id}", path_str(stack._pki.path())),
    ));
    let pki_out = ok(
        "bash",
        &["compose/swarm-pki.sh", path_str(stack._pki.path())],
        &[("MESHD_TAG", tag.clone())],
    );
    assert!(pki_out.contains(&node_id), "{pki_out}");

    ok(
        "docker",
        &[
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            "compose/swarm-stack.yml",
            &stack.name,
        ],
        &stack.env,
    );

    // The agent finds both replicas of hello on this node, at their overlay addresses.
    let two = stack.wait_endpoints("hello", 2);
    for ep in &two {
        assert!(ep.starts_with("10.213."), "not an overlay address: {ep}");
    }
    // The mesh's node is the Swarm node, and the agent advertises its overlay address.
    let (_, members) = http_get(stack.port("MESHD_SWARM_ADMIN"), "localhost", "/v1/members")
        .unwrap_or_else(|| panic!("no /v1/members"));
    let members = json_in(&members).unwrap_or_else(|| panic!("/v1/members: {members}"));
    assert_eq!(members["node"], node_id.as_str(), "{members}");
    let gossip_addr = members["self"]["gossip_addr"].as_str().unwrap_or_default();
    assert!(gossip_addr.starts_with("10.213."), "{members}");

    // Routed by service name through the agent's published port, to both replicas.
    let answered = stack.call_hello(40);
    assert_eq!(answered.len(), 2, "replicas that answered: {answered:?}");

    // Scale up: the third task shows up in the agent's table and gets traffic.
    let service = format!("{}_hello", stack.name);
    ok(
        "docker",
        &["service", "scale", "--detach", &format!("{service}=3")],
        &[],
    );
    let three = stack.wait_endpoints("hello", 3);
    assert!(two.is_subset(&three), "{two:?} then {three:?}");
    let answered = stack.call_hello(60);
    assert_eq!(answered.len(), 3, "replicas that answered: {answered:?}");

    // Scale down: the removed tasks leave the table, and requests go to the one left.
    ok(
        "docker",
        &["service", "scale", "--detach", &format!("{service}=1")],
        &[],
    );
    let one = stack.wait_endpoints("hello", 1);
    assert!(one.is_subset(&three), "{three:?} then {one:?}");
    let answered = stack.call_hello(20);
    assert_eq!(answered.len(), 1, "replicas that answered: {answered:?}");
}
