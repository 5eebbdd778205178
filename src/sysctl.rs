//! `meshd sysctl check|apply --profile P`: the kernel settings of systemd/sysctl.d/meshd-P.conf, compared with
//! or written to `/proc/sys`.
//!
//! A profile is `key = value` lines, each after the comment lines that say why. Values of several numbers are
//! compared field by field whatever the whitespace. For the capacity keys in [`AT_LEAST`] a larger value on the
//! host already satisfies the profile, and `apply` never lowers it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The profiles shipped in systemd/sysctl.d/, by name.
pub const PROFILES: &[(&str, &str)] = &[
    (
        "conservative",
        include_str!("../systemd/sysctl.d/meshd-conservative.conf"),
    ),
    (
        "proxy-host",
        include_str!("../systemd/sysctl.d/meshd-proxy-host.conf"),
    ),
];

/// Capacity limits: more than the profile asks is fine.
pub const AT_LEAST: &[&str] = &[
    "fs.file-max",
    "net.core.somaxconn",
    "net.core.netdev_max_backlog",
    "net.ipv4.tcp_max_syn_backlog",
    "net.netfilter.nf_conntrack_max",
];

#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    pub key: String,
    pub value: String,
    pub why: String,
}

/// One profile line against the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub setting: Setting,
    /// `None`: the key does not exist here (a module not loaded, an older kernel).
    pub current: Option<String>,
}

impl Row {
    pub fn matches(&self) -> bool {
        match &self.current {
            None => true,
            Some(cur) => satisfies(&self.setting.key, cur, &self.setting.value),
        }
    }
}

fn fields(v: &str) -> Vec<&str> {
    v.split([' ', '\t', '\n'])
        .filter(|f| !f.is_empty())
        .collect()
}

fn satisfies(key: &str, current: &str, wanted: &str) -> bool {
    if AT_LEAST.contains(&key)
        && let (Ok(c), Ok(w)) = (current.trim().parse::<u64>(), wanted.trim().parse::<u64>())
    {
        return c >= w;
    }
    fields(current) == fields(wanted)
}

/// Parses a profile. Errors name the line.
pub fn parse(text: &str) -> Result<Vec<Setting>, String> {
    let mut out = Vec::new();
    let mut why: Vec<&str> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            why.clear();
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            why.push(c.trim());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: not `key = value`: {line:?}", n + 1))?;
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!("line {}: bad key {key:?}", n + 1));
        }
        out.push(Setting {
            key: key.to_string(),
            value: value.trim().to_string(),
            why: why.join(" "),
        });
        why.clear();
    }
    Ok(out)
}

pub fn profile(name: &str) -> Result<Vec<Setting>, String> {
    let text = PROFILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = PROFILES.iter().map(|(n, _)| *n).collect();
            format!("no profile {name:?}: use one of {}", names.join(", "))
        })?;
    parse(text).map_err(|e| format!("profile {name}: {e}"))
}

fn path_of(root: &Path, key: &str) -> PathBuf {
    root.join(key.replace('.', "/"))
}

/// Reads every key of the profile under `root` (normally /proc/sys). A key that does not exist is `None`;
/// any other read error is an error (a key only root may read must not pass as absent).
pub fn compare(root: &Path, settings: &[Setting]) -> Result<Vec<Row>, String> {
    settings
        .iter()
        .map(|s| {
            let path = path_of(root, &s.key);
            let current = match std::fs::read_to_string(&path) {
                Ok(v) => Some(fields(&v).join(" ")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            };
            Ok(Row {
                setting: s.clone(),
                current,
            })
        })
        .collect()
}

/// The check's table: key, current, wanted, ok, why.
pub fn render(rows: &[Row]) -> String {
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let state = match (&r.current, r.matches()) {
                (None, _) => "absent",
                (Some(_), true) => "ok",
                (Some(_), false) => "DRIFT",
            };
            let wanted = if AT_LEAST.contains(&r.setting.key.as_str()) {
                format!(">= {}", r.setting.value)
            } else {
                r.setting.value.clone()
            };
            vec![
                r.setting.key.clone(),
                match r.current.as_deref() {
                    None => "-".into(),
                    Some("") => "(empty)".into(),
                    Some(v) => v.to_string(),
                },
                wanted,
                state.into(),
                r.setting.why.clone(),
            ]
        })
        .collect();
    crate::cli::status::table(&["KEY", "CURRENT", "WANTED", "STATE", "WHY"], &table_rows)
}

/// Writes what differs. Every file is opened for writing first, so a read-only `/proc/sys` or a user without
/// the right to write changes nothing; a value the kernel refuses midway rolls back the ones written before it.
pub fn apply(root: &Path, settings: &[Setting]) -> Result<String, String> {
    let rows = compare(root, settings).map_err(|e| format!("{e}; nothing was changed"))?;
    let mut todo = Vec::new();
    let mut report = String::new();
    for r in &rows {
        match &r.current {
            None => {
                let _ = writeln!(
                    report,
                    "skipped {}: not present on this kernel (module not loaded?)",
                    r.setting.key
                );
            }
            Some(cur) if !r.matches() => {
                let path = path_of(root, &r.setting.key);
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| {
                        let hint = match e.raw_os_error() {
                            Some(30) => " (read-only: in a container, /proc/sys belongs to the host; run this on the host)",
                            Some(1) | Some(13) => " (run it as root)",
                            _ => "",
                        };
                        format!("cannot write {}: {e}{hint}; nothing was changed", path.display())
                    })?;
                todo.push((r.setting.clone(), cur.clone(), file));
            }
            Some(_) => {}
        }
    }
    let mut done: Vec<(Setting, String)> = Vec::new();
    for (s, old, mut file) in todo {
        if let Err(e) = file.write_all(s.value.as_bytes()) {
            // Put back what this run changed before the refusal (with a newline: an empty value must still
            // be written, or it is not restored).
            let failed: Vec<String> = done
                .iter()
                .filter(|(d, prev)| {
                    std::fs::write(path_of(root, &d.key), format!("{prev}\n")).is_err()
                })
                .map(|(d, _)| d.key.clone())
                .collect();
            let restored = if failed.is_empty() {
                format!(
                    "the {} value(s) written before it were restored",
                    done.len()
                )
            } else {
                format!("these could not be restored: {}", failed.join(", "))
            };
            return Err(format!(
                "the kernel refused {} = {}: {e}; {restored}",
                s.key, s.value
            ));
        }
        let _ = writeln!(report, "{}: {old} -> {}", s.key, s.value);
        done.push((s, old));
    }
    if done.is_empty() {
        report.push_str("nothing to change: the host already matches the profile\n");
    } else if done.iter().any(|(s, _)| s.key.starts_with("net.")) {
        report.push_str(
            "net.* keys were set in this network namespace only: containers with their own network keep theirs\n",
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(dir: &Path, values: &[(&str, &str)]) {
        for (k, v) in values {
            let p = path_of(dir, k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn shipped_profiles_parse_explain_every_key_and_never_recycle() {
        for (name, _) in PROFILES {
            let settings = profile(name).unwrap();
            assert!(settings.len() >= 6, "{name}");
            for s in &settings {
                assert!(!s.why.is_empty(), "{name}: {} has no comment", s.key);
                assert_ne!(s.key, "net.ipv4.tcp_tw_recycle");
            }
        }
        assert!(
            profile("fast")
                .unwrap_err()
                .contains("conservative, proxy-host")
        );
        assert!(parse("# c\nnot a line\n").unwrap_err().contains("line 2"));
    }

    #[test]
    fn check_compares_fields_and_capacities_and_apply_writes_only_drift() {
        let dir = tempfile::tempdir().unwrap();
        let settings = parse(
            "# a\nnet.ipv4.ip_local_port_range = 10240 65535\n# b\nnet.core.somaxconn = 4096\n# c\nfs.file-max = 100\n# d\nnet.netfilter.nf_conntrack_max = 9\n",
        )
        .unwrap();
        host(
            dir.path(),
            &[
                ("net.ipv4.ip_local_port_range", "10240\t65535"),
                ("net.core.somaxconn", "128"),
                ("fs.file-max", "5000"),
            ],
        );
        let rows = compare(dir.path(), &settings).unwrap();
        let states: Vec<bool> = rows.iter().map(Row::matches).collect();
        assert_eq!(states, [true, false, true, true]);
        let table = render(&rows);
        assert!(
            table.contains("DRIFT") && table.contains("absent") && table.contains(">= 100"),
            "{table}"
        );

        let report = apply(dir.path(), &settings).unwrap();
        assert!(
            report.contains("net.core.somaxconn: 128 -> 4096"),
            "{report}"
        );
        assert!(
            !report.contains("fs.file-max:"),
            "a larger value is never lowered: {report}"
        );
        assert!(
            report.contains("skipped net.netfilter.nf_conntrack_max"),
            "{report}"
        );
        assert!(
            compare(dir.path(), &settings)
                .unwrap()
                .iter()
                .all(Row::matches)
        );
        let again = apply(dir.path(), &settings).unwrap();
        assert!(again.contains("nothing to change"), "{again}");
    }
}
