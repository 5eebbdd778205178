//! The report of a run: a section of `benchmarks.md` (tables, the goals of issue 13 against what was measured)
//! and SVG charts beside it, drawn with plotters. Everything comes from the run's JSON.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

const BEGIN: &str = "<!-- harness:begin (written by bench/run; do not edit by hand) -->";
const END: &str = "<!-- harness:end -->";

/// The targets in the order every table and chart lists them.
const TARGETS: [&str; 6] = [
    "direct",
    "meshd",
    "haproxy",
    "nginx",
    "meshd mTLS",
    "haproxy TLS",
];
const PROTOCOLS: [&str; 3] = ["http1", "h2c", "grpc"];

/// Writes `docs/benchmarks.md`'s section and `docs/bench/*.svg` from one run.
pub fn write(doc: &Value, results_name: &str, docs: &Path) -> Result<(), String> {
    let charts = docs.join("bench");
    std::fs::create_dir_all(&charts).map_err(|e| format!("{}: {e}", charts.display()))?;
    let mut md = String::new();
    section(&mut md, doc, results_name);
    for proto in PROTOCOLS {
        latency_chart(doc, proto, &charts.join(format!("latency-{proto}.svg")))?;
    }
    throughput_chart(doc, &charts.join("throughput.svg"))?;
    let path = docs.join("benchmarks.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let body = format!("{BEGIN}\n{md}{END}\n");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{body}{}",
            &old[..b],
            old[e + END.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n\n{body}", old.trim_end()),
    };
    std::fs::write(&path, new).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("wrote {} and {}/*.svg", path.display(), charts.display());
    Ok(())
}

fn rows<'a>(doc: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    doc[key].as_array().into_iter().flatten()
}

fn find<'a>(doc: &'a Value, key: &str, want: &[(&str, Value)]) -> Option<&'a Value> {
    rows(doc, key).find(|r| want.iter().all(|(k, v)| &r[*k] == v))
}

fn num(v: Option<&Value>, field: &str) -> f64 {
    v.and_then(|r| r[field].as_f64()).unwrap_or(f64::NAN)
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// The rate the latency charts and the goals use: 5,000/s, else the run's highest.
fn chart_rate(doc: &Value) -> u64 {
    let rates: Vec<u64> = doc["plan"]["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    if rates.contains(&5000) {
        5000
    } else {
        rates.iter().copied().max().unwrap_or(0)
    }
}

fn lowest_rate(doc: &Value) -> u64 {
    doc["plan"]["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .min()
        .unwrap_or(0)
}

fn highest_rate(doc: &Value) -> u64 {
    doc["plan"]["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .max()
        .unwrap_or(0)
}

fn latency(doc: &Value, target: &str, proto: &str, rate: u64, field: &str) -> f64 {
    num(
        find(
            doc,
            "latency",
            &[
                ("target", s(target)),
                ("protocol", s(proto)),
                ("rate", Value::from(rate)),
            ],
        ),
        field,
    )
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("−{out}") } else { out }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

fn section(md: &mut String, doc: &Value, results_name: &str) {
    let plan = &doc["plan"];
    let reps = plan["repetitions"].as_u64().unwrap_or(0);
    let rate_s = plan["rate_seconds"].as_f64().unwrap_or(0.0);
    let max_s = plan["max_seconds"].as_f64().unwrap_or(0.0);
    let rate = chart_rate(doc);
    let _ = writeln!(md, "## meshd beside HAProxy and nginx\n");
    if doc["quick"].as_bool() == Some(true) {
        let _ = writeln!(
            md,
            "**A `--quick` run: a smoke test of the harness; its figures mean nothing.**\n"
        );
    }
    let _ = writeln!(
        md,
        "`bench/run` (meshd `{}`), {} cores ({}), kernel {}; {}, {}, {}, {}. All figures: `bench/results/{results_name}`.\n",
        doc["meshd"].as_str().unwrap_or("?"),
        doc["host"]["cores"],
        doc["host"]["cpu"].as_str().unwrap_or("?"),
        doc["host"]["kernel"].as_str().unwrap_or("?"),
        doc["tools"]["haproxy"].as_str().unwrap_or("?"),
        doc["tools"]["nginx"].as_str().unwrap_or("?"),
        doc["tools"]["oha"].as_str().unwrap_or("?"),
        doc["tools"]["valgrind"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "Everything on 127.0.0.1. The same backend for every target: `bench/backend.rs`, a hyper server answering \
         1 KiB (gRPC: one 1 KiB message and `grpc-status: 0`). **One core**: each proxy pinned to core 0 with one \
         worker thread (meshd one tokio worker, HAProxy `nbthread 1`, nginx one worker and no master); the \
         backend and `oha` on the other cores. **All cores**: every process on every core, one thread or worker \
         per core. meshd runs with its default policies (P2C peak-EWMA balancing, circuit breakers, retry budget, \
         metrics). Two hops: agent A → agent B over mutual TLS (pooled h2; A learns B's endpoints by gossip) → \
         backend, against HAProxy → HAProxy over TLS with client certificates (h2, connections reused). Each \
         figure is the median of {reps} repetitions, the targets interleaved within each; fixed-rate runs last \
         {rate_s} s (open loop, `oha -q RATE --latency-correction`: a request counts from when it was due), \
         maximum-throughput runs {max_s} s (closed loop). Failed or non-2xx requests over the whole run: {}.\n",
        doc["failed_requests"]
    );

    goals(md, doc);

    let _ = writeln!(md, "### Latency at fixed rates (one core)\n");
    for proto in PROTOCOLS {
        let _ = writeln!(
            md,
            "![{proto} latency at {rate}/s](bench/latency-{proto}.svg)\n"
        );
    }
    let _ = writeln!(
        md,
        "| protocol | rate/s | target | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs |\n|---|---|---|---|---|---|---|---|"
    );
    for proto in PROTOCOLS {
        for r in doc["plan"]["rates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
        {
            let d50 = latency(doc, "direct", proto, r, "p50_us");
            let d99 = latency(doc, "direct", proto, r, "p99_us");
            for t in TARGETS {
                let (p50, p99, p999) = (
                    latency(doc, t, proto, r, "p50_us"),
                    latency(doc, t, proto, r, "p99_us"),
                    latency(doc, t, proto, r, "p999_us"),
                );
                let added = |v: f64, d: f64| {
                    if t == "direct" {
                        "".into()
                    } else {
                        fmt_num(v - d)
                    }
                };
                let _ = writeln!(
                    md,
                    "| {proto} | {} | {t} | {} | {} | {} | {} | {} |",
                    fmt_num(r as f64),
                    fmt_num(p50),
                    fmt_num(p99),
                    fmt_num(p999),
                    added(p50, d50),
                    added(p99, d99)
                );
            }
        }
    }

    let _ = writeln!(
        md,
        "\n### Maximum throughput\n\n![throughput](bench/throughput.svg)\n"
    );
    let _ = writeln!(
        md,
        "| protocol | target | one core req/s | vs HAProxy | all cores req/s | vs HAProxy |\n|---|---|---|---|---|---|"
    );
    for proto in PROTOCOLS {
        let get = |t: &str, layout: &str| {
            num(
                find(
                    doc,
                    "throughput",
                    &[
                        ("target", s(t)),
                        ("protocol", s(proto)),
                        ("layout", s(layout)),
                    ],
                ),
                "rps",
            )
        };
        for t in TARGETS {
            let vs = |layout: &str| {
                let other = if t.ends_with("TLS") || t.ends_with("mTLS") {
                    "haproxy TLS"
                } else {
                    "haproxy"
                };
                if t == "direct" {
                    String::new()
                } else {
                    ratio(get(t, layout), get(other, layout))
                }
            };
            let _ = writeln!(
                md,
                "| {proto} | {t} | {} | {} | {} | {} |",
                fmt_num(get(t, "one-core")),
                vs("one-core"),
                fmt_num(get(t, "all-cores")),
                vs("all-cores")
            );
        }
    }
    let _ = writeln!(
        md,
        "\nDirect is the backend and the load generator alone; a proxy's figure cannot exceed what the load \
         cores can send and answer, so near direct the load side is the limit, not the proxy.\n"
    );

    let _ = writeln!(
        md,
        "### CPU seconds per 1,000 requests (one core, all processes of the target)\n"
    );
    let rates: Vec<u64> = doc["plan"]["rates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let _ = write!(md, "| protocol | target |");
    for r in &rates {
        let _ = write!(md, " at {}/s |", fmt_num(*r as f64));
    }
    let _ = writeln!(md, "\n|---|---|{}", "---|".repeat(rates.len()));
    for proto in PROTOCOLS {
        for t in TARGETS.iter().skip(1) {
            let _ = write!(md, "| {proto} | {t} |");
            for r in &rates {
                let v = num(
                    find(
                        doc,
                        "cpu",
                        &[
                            ("target", s(t)),
                            ("protocol", s(proto)),
                            ("rate", Value::from(*r)),
                        ],
                    ),
                    "cpu_s_per_1k",
                );
                let _ = write!(
                    md,
                    " {} |",
                    if v.is_finite() {
                        format!("{v:.3}")
                    } else {
                        "–".into()
                    }
                );
            }
            let _ = writeln!(md);
        }
    }
    let _ = writeln!(
        md,
        "\nFrom the processes' user + system time in /proc (10 ms ticks), over the answered requests of each run.\n"
    );

    let _ = writeln!(
        md,
        "### Instructions per request (callgrind, one hop, HTTP/1.1)\n"
    );
    let _ = writeln!(
        md,
        "| target | instructions per request | vs HAProxy | repetitions |\n|---|---|---|---|"
    );
    let haproxy = num(
        find(doc, "instructions", &[("target", s("haproxy"))]),
        "per_request",
    );
    for r in rows(doc, "instructions") {
        let per = r["per_request"].as_f64().unwrap_or(f64::NAN);
        let reps: Vec<String> = r["repetitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .map(fmt_num)
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r["target"].as_str().unwrap_or("?"),
            fmt_num(per),
            ratio(per, haproxy),
            reps.join(", ")
        );
    }
    let _ = writeln!(
        md,
        "\nEach proxy under `valgrind --tool=callgrind` serves N and then 2N sequential keep-alive requests (N = {}); \
         (Ir(2N) − Ir(N)) / N counts one request's instructions with start-up and shutdown subtracted, in every \
         thread of the process. Counting starts once the proxy answers (`callgrind_control --instr=on`).\n",
        doc["plan"]["callgrind_requests"]
    );

    let _ = writeln!(md, "### Resident memory (MiB)\n");
    let states: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in rows(doc, "memory") {
            if let Some(st) = r["state"].as_str()
                && !v.iter().any(|x| x == st)
            {
                v.push(st.to_string());
            }
        }
        v
    };
    let _ = write!(md, "| target |");
    for st in &states {
        let _ = write!(md, " {st} |");
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(states.len()));
    for t in TARGETS.iter().skip(1) {
        let _ = write!(md, "| {t} |");
        for st in &states {
            let v = num(
                find(doc, "memory", &[("target", s(t)), ("state", s(st))]),
                "mib",
            );
            let _ = write!(
                md,
                " {} |",
                if v.is_finite() {
                    format!("{v:.1}")
                } else {
                    "–".into()
                }
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\nVmRSS of all the target's processes (two for the two-hop targets): idle after warm-up; the peak while \
         the highest rate ran (every protocol); with the idle client connections open, each after one request.\n"
    );
}

/// The goals of issue 13, each against this run's figures.
fn goals(md: &mut String, doc: &Value) {
    let rate = chart_rate(doc);
    let low = lowest_rate(doc);
    let high = highest_rate(doc);
    let instr = |t: &str| {
        num(
            find(doc, "instructions", &[("target", s(t))]),
            "per_request",
        )
    };
    let max = |t: &str| {
        num(
            find(
                doc,
                "throughput",
                &[
                    ("target", s(t)),
                    ("protocol", s("http1")),
                    ("layout", s("one-core")),
                ],
            ),
            "rps",
        )
    };
    let added = |t: &str, field: &str, r: u64| {
        latency(doc, t, "http1", r, field) - latency(doc, "direct", "http1", r, field)
    };
    let mem = |t: &str, st: &str| {
        num(
            find(doc, "memory", &[("target", s(t)), ("state", s(st))]),
            "mib",
        )
    };
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    let (mi, hi) = (instr("meshd"), instr("haproxy"));
    let (mm, hm) = (max("meshd"), max("haproxy"));
    let _ = writeln!(
        md,
        "### Against the goals (HTTP/1.1, one hop unless said)\n"
    );
    let _ = writeln!(
        md,
        "| goal | meshd | HAProxy | ratio | met |\n|---|---|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| instructions per request ≤ HAProxy's (first milestone ≤ 1.25×) | {} | {} | {} | {} (1.25×: {}) |",
        fmt_num(mi),
        fmt_num(hi),
        ratio(mi, hi),
        yes(mi <= hi),
        yes(mi <= 1.25 * hi)
    );
    let _ = writeln!(
        md,
        "| one-core maximum throughput ≥ HAProxy's | {} req/s | {} req/s | {} | {} |",
        fmt_num(mm),
        fmt_num(hm),
        ratio(mm, hm),
        yes(mm >= hm)
    );
    for (label, field) in [("p50", "p50_us"), ("p99", "p99_us")] {
        let (m, h) = (added("meshd", field, rate), added("haproxy", field, rate));
        let _ = writeln!(
            md,
            "| added {label} latency at {}/s ≤ HAProxy's | {} µs | {} µs | {} | {} |",
            fmt_num(rate as f64),
            fmt_num(m),
            fmt_num(h),
            ratio(m, h),
            yes(m <= h)
        );
    }
    let (m2, h2) = (
        added("meshd mTLS", "p99_us", low),
        added("haproxy TLS", "p99_us", low),
    );
    let _ = writeln!(
        md,
        "| two hops with mTLS add ≤ 1 ms at p99 at {}/s | {} µs | {} µs | {} | {} |",
        fmt_num(low as f64),
        fmt_num(m2),
        fmt_num(h2),
        ratio(m2, h2),
        yes(m2 <= 1000.0)
    );
    let idle = mem("meshd", "idle");
    let _ = writeln!(
        md,
        "| resident memory idle < 20 MiB | {idle:.1} MiB | {:.1} MiB | | {} |",
        mem("haproxy", "idle"),
        yes(idle < 20.0)
    );
    let st = format!("load {high}/s");
    let load = mem("meshd", &st);
    let _ = writeln!(
        md,
        "| resident memory at {}/s < 50 MiB | {load:.1} MiB | {:.1} MiB | | {} |\n",
        fmt_num(high as f64),
        mem("haproxy", &st),
        yes(load < 50.0)
    );
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb3),
    RGBColor(0x93, 0x78, 0x60),
];

/// Grouped bars: one group per entry of `groups`, one bar per series in each.
fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[&str],
    series: &[(String, Vec<f64>)],
    log: bool,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let k = series.len().max(1);
    let slots = groups.len() * (k + 1);
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.3;
    let label_of = |i: usize| -> String {
        if i % (k + 1) == k / 2 {
            groups
                .get(i / (k + 1))
                .map(|g| g.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        }
    };
    let x_fmt = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => label_of(*i),
        _ => String::new(),
    };
    macro_rules! draw {
        ($y:expr, $base:expr) => {{
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(70)
                .build_cartesian_2d((0..slots).into_segmented(), $y)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(slots)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&|v: &f64| fmt_num(*v))
                .y_desc(y_label)
                .draw()
                .map_err(|e| err(&e))?;
            for (si, (name, values)) in series.iter().enumerate() {
                let color = COLORS[si % COLORS.len()];
                let data: Vec<(usize, f64)> = values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite() && **v > 0.0)
                    .map(|(g, v)| (g * (k + 1) + si, *v))
                    .collect();
                chart
                    .draw_series(
                        Histogram::vertical(&chart)
                            .style(color.filled())
                            .margin(1)
                            .baseline($base)
                            .data(data),
                    )
                    .map_err(|e| err(&e))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    if log {
        draw!((1.0..top * 3.0).log_scale(), 1.0);
    } else {
        // Room above the bars for the legend.
        draw!(0.0..top * 1.3, 0.0);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn latency_chart(doc: &Value, proto: &str, path: &Path) -> Result<(), String> {
    let rate = chart_rate(doc);
    let series: Vec<(String, Vec<f64>)> =
        [("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")]
            .iter()
            .map(|(name, field)| {
                (
                    name.to_string(),
                    TARGETS
                        .iter()
                        .map(|t| latency(doc, t, proto, rate, field))
                        .collect(),
                )
            })
            .collect();
    bars(
        path,
        &format!("{proto}: latency at {rate} requests/s, one core (µs, log scale)"),
        "µs",
        &TARGETS,
        &series,
        true,
    )
}

fn throughput_chart(doc: &Value, path: &Path) -> Result<(), String> {
    let cores = doc["host"]["cores"].as_f64().unwrap_or(1.0);
    let mut series = Vec::new();
    for proto in PROTOCOLS {
        for (layout, per) in [("one-core", 1.0), ("all-cores", cores)] {
            let values = TARGETS
                .iter()
                .map(|t| {
                    num(
                        find(
                            doc,
                            "throughput",
                            &[
                                ("target", s(t)),
                                ("protocol", s(proto)),
                                ("layout", s(layout)),
                            ],
                        ),
                        "rps",
                    ) / per
                })
                .collect();
            series.push((format!("{proto} {layout}"), values));
        }
    }
    bars(
        path,
        &format!("Maximum throughput per core (requests/s; all cores divided by {cores})"),
        "requests/s per core",
        &TARGETS,
        &series,
        false,
    )
}
