//! Traffic policies tried as a user would: real backends behind a real agent, real HTTP/1.1 and gRPC.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

fn statics(services: &[(&str, &[SocketAddr])]) -> String {
    services
        .iter()
        .map(|(name, addrs)| {
            let eps: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
            format!(
                "[[discovery.static]]\nservice = \"{name}\"\nendpoints = [{}]\n",
                eps.join(", ")
            )
        })
        .collect()
}

fn hits(b: &Backend) -> usize {
    b.requests.load(Ordering::SeqCst)
}

#[tokio::test]
async fn failing_endpoint_is_ejected_then_probed_once_then_restored() {
    let (good, bad) = (backend("good").await, backend("bad").await);
    bad.faults.set_status(503);
    let agent = agent(&format!(
        "{}[services.web]\nload_balancer = \"round-robin\"\nretry = {{ max_attempts = 1 }}\ncircuit_breaker = {{ failures = 3, backoff = {{ min = \"1s\", max = \"2s\", jitter = 0.0 }} }}\n",
        statics(&[("web", &[good.addr, bad.addr])])
    ))
    .await;

    let mut failures = 0;
    for _ in 0..30 {
        if get(&agent, "web", "/").await.status != StatusCode::OK {
            failures += 1;
        }
    }
    assert_eq!(
        hits(&bad),
        3,
        "ejected after exactly `failures` failed requests"
    );
    assert_eq!(failures, 3);
    assert_eq!(
        endpoint_view(&agent, "web", bad.addr).await["breaker"],
        "open"
    );
    let m = metrics(&agent).await;
    let series = format!(
        "meshd_circuit_breaker_open{{endpoint=\"{}\",service=\"web\"}}",
        bad.addr
    );
    assert_eq!(sample(&m, &series), 1.0, "{m}");

    // After the backoff, ten concurrent requests: exactly one probes the bad endpoint.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = agent.url("/slow?ms=50");
        tasks.push(tokio::spawn(async move {
            let req = http::Request::get(url)
                .header("host", "web")
                .body(full(""))
                .unwrap();
            read(h1_client().request(req).await.unwrap()).await.status
        }));
    }
    let statuses: Vec<StatusCode> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(hits(&bad), 4, "one probe, no more: {statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 9);

    // The probe failed: open again, now for 2 s. Then the endpoint recovers and a probe closes the breaker.
    let probe_failed = Instant::now();
    bad.faults.set_status(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..4 {
        assert_eq!(get(&agent, "web", "/").await.status, StatusCode::OK);
    }
    assert_eq!(
        hits(&bad),
        4,
        "still open during the second, longer backoff"
    );
    tokio::time::sleep_until((probe_failed + Duration::from_millis(2300)).into()).await;
    for _ in 0..10 {
        assert_eq!(get(&agent, "web", "/").await.status, StatusCode::OK);
    }
    assert!(
        hits(&bad) >= 8,
        "traffic is back on the recovered endpoint: {}",
        hits(&bad)
    );
    assert_eq!(
        endpoint_view(&agent, "web", bad.addr).await["breaker"],
        "closed"
    );
    assert_eq!(sample(&metrics(&agent).await, &series), 0.0);
    agent.stop().await;
}

#[tokio::test]
async fn with_every_endpoint_ejected_requests_go_to_the_one_that_failed_longest_ago() {
    let (a, b) = (backend("a").await, backend("b").await);
    a.faults.set_status(500);
    b.faults.set_status(500);
    let agent = agent(&format!(
        "{}[services.two]\nload_balancer = \"round-robin\"\nmax_ejection_percent = 100\nretry = {{ max_attempts = 1 }}\ncircuit_breaker = {{ failures = 2, backoff = {{ min = \"30s\", max = \"60s\" }} }}\n",
        statics(&[("two", &[a.addr, b.addr])])
    ))
    .await;
    // Round-robin: each reaches two failures and is ejected.
    let mut first = Vec::new();
    for _ in 0..4 {
        let got = get(&agent, "two", "/").await;
        assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
        first.push(got.header("x-backend").to_string());
    }
    assert_eq!(
        endpoint_view(&agent, "two", a.addr).await["breaker"],
        "open"
    );
    assert_eq!(
        endpoint_view(&agent, "two", b.addr).await["breaker"],
        "open"
    );
    // No local "breaker-open" failure: each request goes to the endpoint that failed longest ago.
    let mut order = Vec::new();
    for _ in 0..4 {
        let got = get(&agent, "two", "/").await;
        assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR, "{got:?}");
        assert_eq!(got.header("mesh-error"), "");
        order.push(got.header("x-backend").to_string());
    }
    // The one ejected first (by the third request) failed longest ago, so it goes first, then they alternate.
    assert_eq!(
        order,
        [&*first[2], &*first[3], &*first[2], &*first[3]],
        "{first:?}"
    );
    assert_ne!(first[2], first[3]);
    // The one that failed longest ago recovers. Its successes do not close its breaker (only a probe does),
    // but they keep it the endpoint that failed longest ago, so it gets every request while the other keeps
    // failing.
    let (recovered, failing) = if first[2] == "a" { (&a, &b) } else { (&b, &a) };
    recovered.faults.set_status(0);
    let failing_hits = hits(failing);
    for _ in 0..5 {
        let got = get(&agent, "two", "/").await;
        assert_eq!(
            (got.status, got.header("x-backend")),
            (StatusCode::OK, recovered.name.as_str())
        );
    }
    assert_eq!(hits(failing), failing_hits);
    agent.stop().await;
}

#[tokio::test]
async fn backends_that_start_after_meshd_serve_everything_once_up() {
    // Two free ports, nothing listening yet.
    let ports: Vec<SocketAddr> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let agent = agent(&statics(&[("late", &ports)])).await;
    let url = agent.url("/");
    let client = h1_client();
    let started = Instant::now();
    let traffic = tokio::spawn(async move {
        let mut seen = Vec::new();
        while started.elapsed() < Duration::from_millis(3500) {
            let req = http::Request::get(url.as_str())
                .header("host", "late")
                .body(full(""))
                .unwrap();
            let sent = started.elapsed();
            let got = read(client.request(req).await.unwrap()).await;
            seen.push((
                sent,
                started.elapsed(),
                got.status,
                got.header("mesh-error").to_string(),
            ));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let binding = started.elapsed();
    let backends = [
        backend_on(ports[0], "first").await,
        backend_on(ports[1], "second").await,
    ];
    let up = started.elapsed();
    let seen = traffic.await.unwrap();
    // Answered before the first backend listened / sent once both listened.
    let before: Vec<_> = seen
        .iter()
        .filter(|(_, done, _, _)| *done < binding)
        .collect();
    let after: Vec<_> = seen.iter().filter(|(sent, _, _, _)| *sent >= up).collect();
    assert!(
        !before.is_empty() && after.len() > 50,
        "{} before, {} after",
        before.len(),
        after.len()
    );
    // Before the backends listen, every request fails as a connect failure, never as a local breaker-open.
    assert!(
        before
            .iter()
            .all(|(_, _, s, e)| *s == StatusCode::BAD_GATEWAY && e == "connect-failed"),
        "{before:?}"
    );
    // Once both listen, every request is served: the breakers that opened during start-up eject at most half
    // of the endpoints (max_ejection_percent = 50), so one endpoint always stays in rotation.
    let failed: Vec<_> = after
        .iter()
        .filter(|(_, _, s, _)| *s != StatusCode::OK)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed after start-up: {failed:?}",
        failed.len(),
        after.len()
    );
    assert!(backends.iter().map(hits).sum::<usize>() >= after.len());
    agent.stop().await;
}

#[tokio::test]
async fn grpc_unavailable_counts_as_failure_in_headers_and_trailers() {
    let b = backend("grpc").await;
    let agent = agent(&format!(
        "[[discovery.static]]\nservice = \"g\"\nendpoints = [\"{}\"]\nprotocol = \"grpc\"\n[services.g]\ncircuit_breaker = {{ failures = 3, backoff = {{ min = \"30s\" }} }}\n",
        b.addr
    ))
    .await;
    let mut client = grpc_client(agent.outbound, "g").await;
    // A trailers-only UNAVAILABLE, and a stream that fails in its trailers after a message.
    for _ in 0..2 {
        let err = grpc_unary(&mut client, GRPC_UNAVAILABLE, "x")
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.metadata().get("mesh-error").is_none());
    }
    client.ready().await.unwrap();
    let msgs = tokio_stream::iter(vec![
        EchoRequest {
            message: "ok".into(),
        },
        EchoRequest {
            message: "unavailable".into(),
        },
    ]);
    let resp = client
        .streaming(
            tonic::Request::new(msgs),
            http::uri::PathAndQuery::from_static(GRPC_STREAM),
            tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default(),
        )
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "OK");
    assert_eq!(
        stream.message().await.unwrap_err().code(),
        tonic::Code::Unavailable
    );
    // Three UNAVAILABLEs (two in headers, one in trailers) opened the breaker.
    assert_eq!(endpoint_view(&agent, "g", b.addr).await["breaker"], "open");
    // It is the only endpoint, so it still gets requests (meshd never fails locally while endpoints exist).
    let reply = grpc_unary(&mut client, GRPC_UNARY, "x").await.unwrap();
    assert_eq!(reply.backend, "grpc");
    agent.stop().await;
}

#[tokio::test]
async fn retries_hide_a_flaky_endpoint() {
    let (good, flaky) = (backend("good").await, backend("flaky").await);
    flaky.faults.fail_every.store(2, Ordering::SeqCst);
    let agent = agent(&format!(
        "{}[services.web]\nload_balancer = \"round-robin\"\nretry = {{ on = [\"503\"], budget_ratio = 0.5 }}\n",
        statics(&[("web", &[good.addr, flaky.addr])])
    ))
    .await;
    let n = 400;
    let mut ok = 0;
    for _ in 0..n {
        if get(&agent, "web", "/").await.status == StatusCode::OK {
            ok += 1;
        }
    }
    assert!(ok as f64 >= 0.99 * n as f64, "{ok}/{n} succeeded");
    assert!(
        hits(&flaky) > 20,
        "the flaky endpoint stayed in rotation: {}",
        hits(&flaky)
    );
    let m = metrics(&agent).await;
    assert!(
        sample(
            &m,
            "meshd_retries_total{outcome=\"success\",service=\"web\"}"
        ) > 10.0,
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn retry_budget_caps_attempts_against_a_dead_backend() {
    let started = Instant::now();
    let dead = backend("dead").await;
    dead.faults.set_status(503);
    let agent = agent(&format!(
        "{}[services.web]\nretry = {{ on = [\"503\"], max_attempts = 3, budget_ratio = 0.2, min_per_second = 10 }}\ncircuit_breaker = {{ failures = 10000 }}\n",
        statics(&[("web", &[dead.addr])])
    ))
    .await;
    let requests = 400;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = agent.url("/");
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            for _ in 0..requests / 4 {
                let req = http::Request::get(&url)
                    .header("host", "web")
                    .body(full(""))
                    .unwrap();
                let got = read(client.request(req).await.unwrap()).await;
                assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let attempts = hits(&dead) as f64;
    let bound = requests as f64 * 1.2 + 10.0 * seconds;
    assert!(
        attempts > requests as f64,
        "some retries were sent ({attempts})"
    );
    assert!(
        attempts <= bound,
        "{attempts} upstream attempts for {requests} requests in {seconds:.1}s; bound {bound:.0}"
    );
    let m = metrics(&agent).await;
    assert!(
        sample(&m, "meshd_retry_budget_exhausted_total{service=\"web\"}") > 0.0,
        "{m}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn only_safe_requests_are_replayed() {
    let dead = backend("dead").await;
    dead.faults.set_status(503);
    let agent = agent(&format!(
        "{}[services.web]\nretry = {{ on = [\"503\"], max_attempts = 3 }}\ncircuit_breaker = {{ failures = 10000 }}\n",
        statics(&[("web", &[dead.addr])])
    ))
    .await;
    // The retry budget's reserve fills from the moment the service appears.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = hits(&dead);
    send(&agent, "POST", "web", "/", &[], b"order=1".to_vec()).await;
    assert_eq!(
        hits(&dead) - before,
        1,
        "a POST is never retried by default"
    );

    let before = hits(&dead);
    send(
        &agent,
        "POST",
        "web",
        "/",
        &[("mesh-retryable", "true")],
        b"order=1".to_vec(),
    )
    .await;
    assert_eq!(hits(&dead) - before, 3, "mesh-retryable: true allows it");

    let before = hits(&dead);
    send(&agent, "PUT", "web", "/", &[], vec![b'x'; 100 * 1024]).await;
    assert_eq!(
        hits(&dead) - before,
        1,
        "a body over 64 KiB is never buffered for a retry"
    );

    let before = hits(&dead);
    send(&agent, "PUT", "web", "/", &[], vec![b'x'; 1024]).await;
    assert_eq!(hits(&dead) - before, 3);
    agent.stop().await;
}

#[tokio::test]
async fn connect_failures_retry_on_another_endpoint() {
    let good = backend("good").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let agent = agent(&format!(
        "{}[services.web]\nload_balancer = \"round-robin\"\nretry = {{ min_per_second = 100 }}\ncircuit_breaker = {{ failures = 10000 }}\n",
        statics(&[("web", &[closed, good.addr])])
    ))
    .await;
    // The retry budget's reserve fills from the moment the service appears.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        let got = send(
            &agent,
            "POST",
            "web",
            "/echo",
            &[("mesh-retryable", "true")],
            b"x".to_vec(),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        // The retry is the same request: its body, and one of each header meshd sets.
        assert_eq!(got.body, "x");
        assert_eq!(
            (got.header("x-seen-host"), got.header("x-seen-te")),
            ("web", "trailers")
        );
    }
    agent.stop().await;
}

#[tokio::test]
async fn per_try_timeout_and_deadlines() {
    let (slow, fast) = (backend("slow").await, backend("fast").await);
    slow.faults.set_delay(2000);
    let agent = agent(&format!(
        "{}{}[services.web]\nload_balancer = \"round-robin\"\ntimeout = \"5s\"\nper_try_timeout = \"200ms\"\nretry = {{ on = [\"timeout\"] }}\ncircuit_breaker = {{ failures = 10000 }}\n[services.lazy]\ntimeout = \"10s\"\n",
        statics(&[("web", &[slow.addr, fast.addr])]),
        statics(&[("lazy", &[slow.addr])])
    ))
    .await;
    for _ in 0..6 {
        let got = get(&agent, "web", "/").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.header("x-backend"), "fast");
        // meshd tells the upstream how long it has.
        let deadline: u128 = got.header("x-seen-mesh-deadline").parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(
            deadline > now && deadline <= now + 5000,
            "{deadline} vs {now}"
        );
    }
    // The caller's own mesh-deadline bounds the request: the slow backend (2 s) would be inside the 10 s
    // timeout, but not inside 300 ms.
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 300;
    let got = send(
        &agent,
        "GET",
        "lazy",
        "/",
        &[("mesh-deadline", &at.to_string())],
        vec![],
    )
    .await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    // A deadline already past is refused at once.
    let got = send(
        &agent,
        "GET",
        "lazy",
        "/",
        &[("mesh-deadline", "1000")],
        vec![],
    )
    .await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    agent.stop().await;
}

#[tokio::test]
async fn inbound_honours_the_senders_deadline() {
    let slow = backend("slow").await;
    slow.faults.set_delay(2000);
    let b = agent_at(
        "127.0.0.5",
        &format!(
            "{}[services.s]\ntimeout = \"10s\"\n",
            statics(&[("s", &[slow.addr])])
        ),
    )
    .await;
    let mut sender = h2_connect(b.inbound).await;
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 300;
    let req = http::Request::get(format!("http://{}/x", b.inbound))
        .version(http::Version::HTTP_2)
        .header("mesh-service", "s")
        .header("mesh-endpoint", slow.addr.to_string())
        .header("mesh-orig-proto", "HTTP/1.1")
        .header("mesh-deadline", at.to_string())
        .body(full(""))
        .unwrap();
    let got = read(sender.send_request(req).await.unwrap()).await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::GATEWAY_TIMEOUT, "timeout")
    );
    b.stop().await;
}

#[tokio::test]
async fn faults_by_percentage_and_by_header() {
    let b = backend("f").await;
    let agent = agent(&format!(
        "{}[services.chaos]\nfault = {{ abort = {{ percent = 50, status = 503 }}, delay = {{ percent = 20, duration = \"1ms\" }} }}\n[services.lab]\nfault = {{ allow_header_override = true }}\n",
        statics(&[("chaos", &[b.addr]), ("lab", &[b.addr])])
    ))
    .await;
    let n = 400;
    let mut aborted = 0;
    for _ in 0..n {
        let got = get(&agent, "chaos", "/").await;
        if got.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(got.header("mesh-error"), "fault-injected");
            aborted += 1;
        }
    }
    // Binomial(400, 0.5): mean 200, sd 10; ±50 is 5 sd.
    assert!((150..=250).contains(&aborted), "{aborted} of {n} aborted");
    assert_eq!(
        hits(&b),
        n - aborted,
        "aborted requests never reach the backend"
    );
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_faults_injected_total{kind=\"abort\",service=\"chaos\"}"
        ),
        aborted as f64
    );
    let delayed = sample(
        &m,
        "meshd_faults_injected_total{kind=\"delay\",service=\"chaos\"}",
    );
    assert!(
        (40.0..=120.0).contains(&delayed),
        "{delayed} delays, expected about 80"
    );

    // Per-request faults by header, only where allowed.
    let got = send(
        &agent,
        "GET",
        "lab",
        "/",
        &[("mesh-fault-abort", "504")],
        vec![],
    )
    .await;
    assert_eq!(
        (got.status, got.header("mesh-error")),
        (StatusCode::GATEWAY_TIMEOUT, "fault-injected")
    );
    let got = send(
        &agent,
        "GET",
        "chaos",
        "/",
        &[("mesh-fault-abort", "504")],
        vec![],
    )
    .await;
    assert_ne!(
        got.status,
        StatusCode::GATEWAY_TIMEOUT,
        "headers are ignored without allow_header_override"
    );
    let got = send(
        &agent,
        "GET",
        "lab",
        "/",
        &[("mesh-fault-delay", "50ms")],
        vec![],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let m = metrics(&agent).await;
    assert_eq!(
        sample(
            &m,
            "meshd_faults_injected_total{kind=\"delay\",service=\"lab\"}"
        ),
        1.0
    );
    agent.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let b = backend("r").await;
    let agent = agent(&format!(
        "{}[services.api]\nrate_limit = {{ requests_per_second = 2, burst = 5 }}\n",
        statics(&[("api", &[b.addr])])
    ))
    .await;
    let mut ok = 0;
    let mut limited = 0;
    let started = Instant::now();
    for _ in 0..30 {
        let got = get(&agent, "api", "/").await;
        match got.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(got.header("mesh-error"), "rate-limited");
                assert!(got.header("retry-after").parse::<u64>().unwrap() >= 1);
                limited += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // The burst, plus what refilled at 2/s while the test ran.
    let refilled = (2.0 * started.elapsed().as_secs_f64()).floor() as usize;
    assert!(
        ok >= 5 && ok <= 5 + refilled + 1,
        "{ok} admitted in {:?}",
        started.elapsed()
    );
    assert_eq!(ok + limited, 30);
    assert_eq!(hits(&b), ok);
    let m = metrics(&agent).await;
    assert_eq!(
        sample(&m, "meshd_rate_limited_total{service=\"api\"}"),
        limited as f64
    );
    agent.stop().await;
}

#[tokio::test]
async fn canary_split_and_routes() {
    let (v1, v2, api) = (
        backend("v1").await,
        backend("v2").await,
        backend("api").await,
    );
    let agent = agent(&format!(
        "{}[services.web]\nsplit = [{{ service = \"web-v1\", weight = 90 }}, {{ service = \"web-v2\", weight = 10 }}]\nroutes = [{{ match = {{ header = {{ \"x-canary\" = \"always\" }} }}, service = \"web-v2\" }}, {{ match = {{ path_prefix = \"/api/\" }}, service = \"api\" }}]\n",
        statics(&[("web-v1", &[v1.addr]), ("web-v2", &[v2.addr]), ("api", &[api.addr])])
    ))
    .await;
    let n = 2000;
    let mut to_v2 = 0;
    for _ in 0..n {
        let got = get(&agent, "web", "/").await;
        assert_eq!(got.status, StatusCode::OK);
        if got.header("x-backend") == "v2" {
            to_v2 += 1;
        }
    }
    let share = to_v2 as f64 / n as f64;
    assert!((0.07..=0.13).contains(&share), "v2 got {share:.3}");
    let got = send(&agent, "GET", "web", "/", &[("x-canary", "always")], vec![]).await;
    assert_eq!(got.header("x-backend"), "v2");
    assert_eq!(got.header("x-seen-mesh-service"), "web-v2");
    let got = get(&agent, "web", "/api/users").await;
    assert_eq!(got.header("x-backend"), "api");
    agent.stop().await;
}

#[tokio::test]
async fn slow_endpoint_loses_its_share_under_p2c_ewma() {
    let (a, b, slow) = (
        backend("a").await,
        backend("b").await,
        backend("slow").await,
    );
    slow.faults.set_delay(40);
    a.faults.set_delay(2);
    b.faults.set_delay(2);
    let agent = agent(&statics(&[("web", &[a.addr, b.addr, slow.addr])])).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = agent.url("/");
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut seen = Vec::new();
            for _ in 0..150 {
                let req = http::Request::get(&url)
                    .header("host", "web")
                    .body(full(""))
                    .unwrap();
                seen.push(
                    read(client.request(req).await.unwrap())
                        .await
                        .header("x-backend")
                        .to_string(),
                );
            }
            seen
        }));
    }
    let mut late = Vec::new();
    for t in tasks {
        let seen = t.await.unwrap();
        late.extend(seen[50..].to_vec());
    }
    let slow_share = late.iter().filter(|b| *b == "slow").count() as f64 / late.len() as f64;
    assert!(
        slow_share < 0.10,
        "the 20× slower endpoint still got {slow_share:.3} once warmed up"
    );
    let view = endpoint_view(&agent, "web", slow.addr).await;
    assert!(view["ewma_latency_ms"].as_f64().unwrap() > 5.0, "{view}");
    assert_eq!(view["pending"], 0);
    agent.stop().await;
}

#[tokio::test]
async fn live_reload_applies_policies_without_dropping_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (good, bad) = (backend("good").await, backend("bad").await);
    bad.faults.set_status(503);
    let dir = std::env::temp_dir().join(format!("meshd-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshd.toml");
    let base = agent_config(
        "127.0.0.1",
        &format!(
            "{}[services.web]\nload_balancer = \"round-robin\"\nretry = {{ max_attempts = 1 }}\ncircuit_breaker = {{ failures = 2, backoff = {{ min = \"60s\" }} }}\n",
            statics(&[("web", &[good.addr, bad.addr])])
        ),
    );
    std::fs::write(&path, &base).unwrap();
    let agent = start_from_file(&path).await;

    // Open the bad endpoint's breaker.
    for _ in 0..6 {
        get(&agent, "web", "/").await;
    }
    assert_eq!(
        endpoint_view(&agent, "web", bad.addr).await["breaker"],
        "open"
    );

    // A keep-alive client connection, used before and after the reload.
    let mut conn = tokio::net::TcpStream::connect(agent.outbound)
        .await
        .unwrap();
    let roundtrip = async |conn: &mut tokio::net::TcpStream| {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = conn.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(roundtrip(&mut conn).await.starts_with("HTTP/1.1 200"));

    // A new policy: every request aborted.
    std::fs::write(
        &path,
        format!("{base}fault = {{ abort = {{ percent = 100, status = 503 }} }}\n"),
    )
    .unwrap();
    let got = admin_post(&agent, "/v1/reload").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    let text = roundtrip(&mut conn).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("mesh-error: fault-injected"), "{text}");
    // Endpoint statistics survived the reload.
    assert_eq!(
        endpoint_view(&agent, "web", bad.addr).await["breaker"],
        "open"
    );

    // An invalid file is refused; the running policy stays.
    std::fs::write(&path, format!("{base}timeout = \"soon\"\n")).unwrap();
    let got = admin_post(&agent, "/v1/reload").await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert!(got.body.contains("services.web.timeout"), "{}", got.body);
    assert!(roundtrip(&mut conn).await.starts_with("HTTP/1.1 503"));
    let m = metrics(&agent).await;
    assert_eq!(sample(&m, "meshd_config_reload_failures_total"), 1.0, "{m}");

    // Back to no fault.
    std::fs::write(&path, &base).unwrap();
    assert_eq!(
        admin_post(&agent, "/v1/reload").await.status,
        StatusCode::OK
    );
    assert!(roundtrip(&mut conn).await.starts_with("HTTP/1.1 200"));
    agent.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
