//! `meshd sysctl check|apply` as an operator runs it: the real binary against a copy of a `/proc/sys` tree, as a
//! user who may not write it, and inside a container where `/proc/sys` is read-only.

#[path = "cluster/support.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};

const MESHD: &str = env!("CARGO_BIN_EXE_meshd");

fn meshd(args: &[&str]) -> Output {
    Command::new(MESHD)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run meshd: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A `/proc/sys` look-alike holding the kernel defaults of the keys the proxy-host profile sets.
fn defaults(root: &Path) {
    for (key, value) in [
        ("net/ipv4/ip_local_port_range", "32768\t60999"),
        ("net/ipv4/ip_local_reserved_ports", ""),
        ("net/ipv4/tcp_tw_reuse", "2"),
        ("net/ipv4/tcp_fin_timeout", "60"),
        ("net/core/somaxconn", "4096"),
        ("net/ipv4/tcp_max_syn_backlog", "512"),
        ("net/core/netdev_max_backlog", "1000"),
        ("fs/file-max", "9223372036854775807"),
    ] {
        let p = root.join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("{value}\n")).unwrap();
    }
}

#[test]
fn check_reports_drift_apply_fixes_it_and_check_then_passes() {
    let dir = tempfile::tempdir().unwrap();
    defaults(dir.path());
    let root = dir.path().to_str().unwrap();

    let check = meshd(&[
        "sysctl",
        "check",
        "--profile",
        "proxy-host",
        "--proc-sys",
        root,
    ]);
    let out = text(&check);
    assert_eq!(check.status.code(), Some(1), "{out}");
    let row = |key: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no row for {key} in:\n{out}"))
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect()
    };
    assert!(out.starts_with("KEY"), "{out}");
    assert_eq!(
        row("net.ipv4.ip_local_port_range")[..4],
        [
            "net.ipv4.ip_local_port_range",
            "32768 60999",
            "10240 65535",
            "DRIFT"
        ]
    );
    // The host's file-max is larger than the profile's: that already satisfies it.
    assert_eq!(row("fs.file-max")[3], "ok", "{out}");
    // conntrack is not loaded in this tree.
    assert_eq!(
        row("net.netfilter.nf_conntrack_max")[1..=3][2],
        "absent",
        "{out}"
    );
    // Every row says why.
    assert!(
        out.lines()
            .skip(1)
            .filter(|l| l.starts_with("net.") || l.starts_with("fs."))
            .all(|l| l.split("  ").filter(|c| !c.trim().is_empty()).count() == 5),
        "{out}"
    );

    let apply = meshd(&[
        "sysctl",
        "apply",
        "--profile",
        "proxy-host",
        "--proc-sys",
        root,
    ]);
    let out = text(&apply);
    assert!(apply.status.success(), "{out}");
    assert!(
        out.contains("net.ipv4.ip_local_port_range: 32768 60999 -> 10240 65535"),
        "{out}"
    );
    assert!(out.contains("net.ipv4.tcp_tw_reuse: 2 -> 1"), "{out}");
    assert!(
        !out.contains("fs.file-max:"),
        "a larger file-max is never lowered:\n{out}"
    );
    assert!(out.contains("network namespace"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("net/core/netdev_max_backlog")).unwrap(),
        "16384"
    );

    let again = meshd(&[
        "sysctl",
        "check",
        "--profile",
        "proxy-host",
        "--proc-sys",
        root,
    ]);
    assert!(again.status.success(), "{}", text(&again));

    let unknown = meshd(&["sysctl", "check", "--profile", "fast"]);
    assert_eq!(unknown.status.code(), Some(64));
    assert!(text(&unknown).contains("conservative, proxy-host"));
}

#[test]
fn apply_without_the_right_to_write_changes_nothing() {
    // Dropping to another user needs root (the test runs as root under tests/run.sh and in CI).
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test runs as root, to run meshd as a user who may not write the files"
    );
    // Under /tmp, readable and searchable by everyone, writable by root only, whatever the umask.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    defaults(dir.path());
    fn open_up(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                open_up(&e.unwrap().path());
            }
        }
    }
    open_up(dir.path());
    let before = std::fs::read_to_string(dir.path().join("net/ipv4/tcp_tw_reuse")).unwrap();
    let root = dir.path().to_str().unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", MESHD])
        .args([
            "sysctl",
            "apply",
            "--profile",
            "proxy-host",
            "--proc-sys",
            root,
        ])
        .output()
        .unwrap_or_else(|e| panic!("setpriv: {e}"));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("Permission denied") && out.contains("run it as root"),
        "{out}"
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("net/ipv4/tcp_tw_reuse")).unwrap(),
        before
    );
}

/// In a container `/proc/sys` is mounted read-only: apply says so and exits non-zero. The static binary of the
/// compose images (tests/run.sh builds them; built here otherwise).
#[test]
fn apply_in_a_container_reports_a_read_only_proc_sys() {
    let (tag, own_images) = support::images();
    let run = Command::new("docker")
        .args(["run", "--rm", "--network", "none"])
        .arg(format!("meshd:{tag}"))
        .args(["sysctl", "apply", "--profile", "proxy-host"])
        .output()
        .unwrap_or_else(|e| panic!("docker: {e}"));
    if own_images {
        support::remove_images(&tag);
    }
    let out = text(&run);
    assert_eq!(run.status.code(), Some(2), "{out}");
    assert!(
        out.contains("read-only") && out.contains("nothing was changed"),
        "{out}"
    );
}
