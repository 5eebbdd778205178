//! systemd/meshd.service as systemd itself judges it: `systemd-analyze security --offline=yes` must score the
//! unit's exposure at 2.0 or less (issue 11), and `systemd-analyze verify` must find nothing wrong with it
//! beyond the binary not being installed on this machine. tests/hosts.rs runs the same unit on real systemd.

use std::path::PathBuf;
use std::process::Command;

/// The highest exposure score the unit may have.
const MAX_EXPOSURE: f64 = 2.0;

fn unit() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd/meshd.service")
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    let found = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "systemd-analyze is not installed: it comes with Debian's `systemd` package (apt-get install systemd); \
         the unit's hardening score cannot be checked without it"
    );
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze {args:?}: {e}"))
}

/// The number on the "→ Overall exposure level for meshd.service: 1.6 OK 🙂" line.
fn exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    let after = line.rsplit_once(": ")?.1;
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn the_unit_scores_at_most_2_0_in_systemd_analyze_security() {
    let unit = unit();
    let o = systemd_analyze(&[
        "security",
        "--offline=yes",
        "--no-pager",
        unit.to_str().expect("UTF-8 path"),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let score = exposure(&out)
        .unwrap_or_else(|| panic!("no \"Overall exposure level\" line in:\n{out}\n{err}"));
    println!("systemd-analyze security: meshd.service scores {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "meshd.service's exposure is {score}, more than {MAX_EXPOSURE}:\n{out}"
    );
}

#[test]
fn the_exposure_line_is_parsed() {
    assert_eq!(
        exposure("x\n→ Overall exposure level for meshd.service: 1.6 OK 🙂\n"),
        Some(1.6)
    );
    assert_eq!(
        exposure("→ Overall exposure level for a.service: 9.6 UNSAFE 😨"),
        Some(9.6)
    );
    assert_eq!(exposure("nothing here"), None);
}

#[test]
fn the_unit_verifies_apart_from_the_missing_binary() {
    let unit = unit();
    let o = systemd_analyze(&["verify", unit.to_str().expect("UTF-8 path")]);
    let err = String::from_utf8_lossy(&o.stderr);
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        // The binary is installed on hosts, not on the machine running the tests.
        .filter(|l| !l.contains("/usr/local/bin/meshd is not executable"))
        .collect();
    assert!(
        problems.is_empty(),
        "systemd-analyze verify meshd.service:\n{}",
        problems.join("\n")
    );
}
