//! Shared by the benches: each owns a marked section of docs/benchmarks.md and rewrites only that.

/// Replaces the section between `begin` and `end` in docs/benchmarks.md (appending it, or creating the file,
/// when missing).
pub fn write_section(begin: &str, end: &str, report: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nNumbers written by the benches under bench/.\n".to_string()
    });
    let section = format!("{begin}\n{report}{end}\n");
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!(
                "{}{section}{}",
                &old[..b],
                &old[e + end.len()..].trim_start_matches('\n')
            )
        }
        _ => format!("{}\n\n{section}", old.trim_end()),
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&path, new).expect("writing docs/benchmarks.md");
    println!("wrote {}", path.display());
}

/// Whether this run is `cargo bench --bench NAME`. Under `cargo test`/`cargo nextest` (a `--list`, or no
/// `--bench` argument) a bench target holds no tests and does nothing.
pub fn bench_requested(name: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("{name}: a benchmark; run it with `cargo bench --bench {name}`");
        return false;
    }
    true
}
