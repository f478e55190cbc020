//! `clickgate tune check` reports what the host has (compared here with the kernel's
//! own files), its exit code follows its statuses, and `tune apply` without `--yes`
//! changes nothing.

mod common;

use std::process::Command;

fn proc_sys(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

#[test]
fn check_reports_the_hosts_values_and_exit_code_follows_statuses() {
    let out = Command::new(common::BIN)
        .args(["tune", "check", "--json"])
        .output()
        .expect("run clickgate tune check");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(checks.len() >= 15, "every check reported: {text}");
    let mut sysctls = 0;
    for c in &checks {
        let status = c["status"].as_str().expect("status");
        assert!(
            ["ok", "differs", "fails", "unknown"].contains(&status),
            "{c}"
        );
        for field in ["name", "current", "recommended", "fix"] {
            assert!(
                c[field].as_str().is_some_and(|s| !s.is_empty()),
                "{field} of {c}"
            );
        }
        if let Some(key) = c["sysctl"].as_str() {
            sysctls += 1;
            match proc_sys(key) {
                Some(v) => {
                    assert_eq!(c["current"], v.as_str(), "{key} as the kernel says");
                    // Where the recommendation is a floor, recompute the verdict.
                    if let Some(min) = c["recommended"]
                        .as_str()
                        .and_then(|r| r.strip_prefix(">= "))
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        let meets = v.parse::<u64>().is_ok_and(|x| x >= min);
                        assert_eq!(status == "ok", meets, "{key} = {v} vs >= {min}");
                    }
                }
                None => assert_eq!(status, "unknown", "{key} unreadable here"),
            }
        }
    }
    assert!(sysctls >= 8, "the sysctls of tuning/sysctl.d are checked");
    let has = |s: &str| checks.iter().any(|c| c["status"] == s);
    let expected = if has("fails") {
        1
    } else if has("differs") {
        3
    } else {
        0
    };
    assert_eq!(out.status.code(), Some(expected), "{text}");
    // Tests run under scripts/host.sh: io_uring and locked memory are there.
    for c in &checks[..3] {
        assert_ne!(c["status"], "fails", "hard requirement: {c}");
    }
}

#[test]
fn apply_without_yes_changes_nothing() {
    let keys = [
        "net.core.somaxconn",
        "vm.swappiness",
        "net.ipv4.tcp_tw_reuse",
    ];
    let before: Vec<_> = keys.iter().map(|k| proc_sys(k)).collect();
    let out = Command::new(common::BIN)
        .args(["tune", "apply"])
        .output()
        .expect("run clickgate tune apply");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("dry run") || text.contains("already set"),
        "{text}"
    );
    let after: Vec<_> = keys.iter().map(|k| proc_sys(k)).collect();
    assert_eq!(before, after, "a dry run wrote a sysctl");
}
