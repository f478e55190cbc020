//! `clickgate tune check|apply`: compares this host with tuning/README.md's
//! recommendations. `check` only reads; `apply` prints what it would write unless given
//! `--yes`, and then writes only sysctls (the rest — kernel command line, IRQ affinity,
//! limits of a service manager — is the operator's, with the commands printed).
//!
//! Exit codes of `check`: 0 everything matches, 1 a hard requirement is not met (the
//! dataplane will not start), 3 only recommendations differ.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

#[derive(Args, Debug, Clone)]
pub struct TuneArgs {
    #[command(subcommand)]
    pub action: TuneAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum TuneAction {
    /// Report which host settings differ from the recommendation (reads only)
    Check {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
        /// The data directory whose disk's I/O scheduler is checked
        #[arg(long, default_value = "./clickgate-data")]
        data_dir: PathBuf,
        /// Dataplane cores planned for this host (sizes the locked-memory advice)
        #[arg(long)]
        cores: Option<usize>,
    },
    /// Write the recommended sysctls (needs root). Without --yes, only prints them
    Apply {
        /// Really write them (otherwise a dry run)
        #[arg(long)]
        yes: bool,
    },
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// A recommendation the host does not follow.
    Differs,
    /// A hard requirement the host does not meet: the dataplane refuses to start.
    Fails,
    /// Not readable here (no such file, not this kind of host).
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Differs => "differs",
            Status::Fails => "FAILS",
            Status::Unknown => "unknown",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub current: String,
    pub recommended: String,
    pub status: Status,
    /// How to fix it (a command or a config line).
    pub fix: String,
    /// A sysctl `apply` may write.
    pub sysctl: Option<(String, String)>,
}

/// Sysctls: (key, recommended, comparison).
enum Want {
    AtLeast(u64),
    Exactly(&'static str),
    /// `ip_local_port_range`: the span of ports at least this many.
    RangeSpan(u64),
}

const SYSCTLS: &[(&str, Want, &str)] = &[
    (
        "net.core.somaxconn",
        Want::AtLeast(65535),
        "accept backlog of each listener",
    ),
    (
        "net.ipv4.tcp_max_syn_backlog",
        Want::AtLeast(65535),
        "half-open connections",
    ),
    (
        "net.core.netdev_max_backlog",
        Want::AtLeast(16384),
        "packets queued per CPU before the stack",
    ),
    (
        "net.ipv4.ip_local_port_range",
        Want::RangeSpan(60000),
        "ephemeral ports (load generators on the box)",
    ),
    (
        "net.ipv4.tcp_tw_reuse",
        Want::Exactly("1"),
        "reuse TIME_WAIT for outgoing connections",
    ),
    (
        "net.core.rmem_max",
        Want::AtLeast(16 << 20),
        "socket receive buffer ceiling",
    ),
    (
        "net.core.wmem_max",
        Want::AtLeast(16 << 20),
        "socket send buffer ceiling",
    ),
    (
        "fs.file-max",
        Want::AtLeast(1 << 20),
        "open files host-wide",
    ),
    (
        "vm.swappiness",
        Want::Exactly("1"),
        "keep bloom shards and sketches in RAM",
    ),
];

fn proc_sys_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn sysctl_check(key: &str, want: &Want, why: &str) -> Check {
    let current = read_trim(&proc_sys_path(key));
    let (recommended, status) = match (want, current.as_deref()) {
        (_, None) => (describe(want), Status::Unknown),
        (Want::AtLeast(n), Some(c)) => (
            format!(">= {n}"),
            match c.parse::<u64>() {
                Ok(v) if v >= *n => Status::Ok,
                _ => Status::Differs,
            },
        ),
        (Want::Exactly(v), Some(c)) => (
            (*v).to_string(),
            if c == *v { Status::Ok } else { Status::Differs },
        ),
        (Want::RangeSpan(n), Some(c)) => {
            let mut it = c.split(' ').filter_map(|x| x.parse::<u64>().ok());
            let span = match (it.next(), it.next()) {
                (Some(lo), Some(hi)) if hi >= lo => hi - lo + 1,
                _ => 0,
            };
            (
                format!("span >= {n} (1024 65535)"),
                if span >= *n {
                    Status::Ok
                } else {
                    Status::Differs
                },
            )
        }
    };
    let value = match want {
        Want::AtLeast(n) => n.to_string(),
        Want::Exactly(v) => (*v).to_string(),
        Want::RangeSpan(_) => "1024 65535".to_string(),
    };
    Check {
        name: format!("sysctl {key} ({why})"),
        current: current.unwrap_or_else(|| "-".into()),
        recommended,
        status,
        fix: format!("sysctl -w {key}=\"{value}\"  (persist: tuning/sysctl.d/60-clickgate.conf)"),
        sysctl: Some((key.to_string(), value)),
    }
}

fn describe(want: &Want) -> String {
    match want {
        Want::AtLeast(n) => format!(">= {n}"),
        Want::Exactly(v) => (*v).to_string(),
        Want::RangeSpan(n) => format!("span >= {n}"),
    }
}

fn kernel_version() -> Option<(u32, u32)> {
    let r = read_trim(Path::new("/proc/sys/kernel/osrelease"))?;
    let mut it = r.split(['.', '-']).filter_map(|x| x.parse::<u32>().ok());
    Some((it.next()?, it.next()?))
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return None;
    }
    Some((r.rlim_cur, r.rlim_max))
}

fn limit_text(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// The I/O scheduler of the block device holding `dir` (its nearest existing ancestor).
fn scheduler_of(dir: &Path) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut p = dir.to_path_buf();
    let meta = loop {
        match std::fs::metadata(&p) {
            Ok(m) => break m,
            Err(_) => {
                if !p.pop() || p.as_os_str().is_empty() {
                    p = std::env::current_dir().ok()?;
                    break std::fs::metadata(&p).ok()?;
                }
            }
        }
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    // A partition's queue is its parent device's.
    for d in [sys.clone(), sys.parent()?.to_path_buf()] {
        if let Some(s) = read_trim(&d.join("queue/scheduler")) {
            let name = d.file_name()?.to_string_lossy().into_owned();
            return Some((name, s));
        }
    }
    None
}

/// Every check, in report order.
pub fn checks(data_dir: &Path, cores: Option<usize>) -> Vec<Check> {
    let mut out = Vec::new();
    // Hard requirements (the dataplane checks them at start too).
    let kv = kernel_version();
    out.push(Check {
        name: "kernel >= 5.8 (io_uring features glommio uses)".into(),
        current: kv.map_or("-".into(), |(a, b)| format!("{a}.{b}")),
        recommended: ">= 5.8".into(),
        status: match kv {
            Some(v) if v >= (5, 8) => Status::Ok,
            Some(_) => Status::Fails,
            None => Status::Unknown,
        },
        fix: "upgrade the kernel".into(),
        sysctl: None,
    });
    let disabled = read_trim(Path::new("/proc/sys/kernel/io_uring_disabled"));
    out.push(Check {
        name: "io_uring enabled".into(),
        current: disabled
            .clone()
            .unwrap_or_else(|| "absent (enabled)".into()),
        recommended: "0".into(),
        status: match disabled.as_deref() {
            None | Some("0") => Status::Ok,
            Some(_) => Status::Fails,
        },
        fix: "sysctl -w kernel.io_uring_disabled=0".into(),
        sysctl: None,
    });
    let cores = cores
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    // glommio locks its rings and the per-core io memory (1 MiB by default), plus headroom.
    let want_kib = 512 + cores as u64 * 2048;
    let memlock = rlimit(libc::RLIMIT_MEMLOCK);
    out.push(Check {
        name: format!("locked memory (ulimit -l) for {cores} dataplane cores"),
        current: memlock.map_or("-".into(), |(cur, max)| {
            format!(
                "{} KiB (hard {})",
                limit_text(cur / 1024),
                limit_text(max / 1024)
            )
        }),
        recommended: format!(">= {want_kib} KiB (hard minimum 512)"),
        status: match memlock {
            Some((cur, _)) if cur == libc::RLIM_INFINITY || cur / 1024 >= want_kib => Status::Ok,
            Some((cur, _)) if cur / 1024 >= 512 => Status::Differs,
            Some(_) => Status::Fails,
            None => Status::Unknown,
        },
        fix: "ulimit -l unlimited · systemd LimitMEMLOCK=infinity · limits.conf memlock".into(),
        sysctl: None,
    });
    let nofile = rlimit(libc::RLIMIT_NOFILE);
    out.push(Check {
        name: "open files (ulimit -n): one per connection".into(),
        current: nofile.map_or("-".into(), |(cur, _)| limit_text(cur)),
        recommended: ">= 65536".into(),
        status: match nofile {
            Some((cur, _)) if cur >= 65536 => Status::Ok,
            Some(_) => Status::Differs,
            None => Status::Unknown,
        },
        fix: "ulimit -n 1048576 · systemd LimitNOFILE=1048576".into(),
        sysctl: None,
    });
    for (key, want, why) in SYSCTLS {
        out.push(sysctl_check(key, want, why));
    }
    let thp = read_trim(Path::new("/sys/kernel/mm/transparent_hugepage/enabled"));
    let thp_mode = thp.as_deref().and_then(|s| {
        s.split(' ')
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']).to_string())
    });
    out.push(Check {
        name: "transparent hugepages (bloom shards, sketches)".into(),
        current: thp_mode.clone().unwrap_or_else(|| "-".into()),
        recommended: "madvise or always".into(),
        status: match thp_mode.as_deref() {
            Some("madvise") | Some("always") => Status::Ok,
            Some(_) => Status::Differs,
            None => Status::Unknown,
        },
        fix: "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled".into(),
        sysctl: None,
    });
    let gov = read_trim(Path::new(
        "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor",
    ));
    out.push(Check {
        name: "CPU frequency governor".into(),
        current: gov
            .clone()
            .unwrap_or_else(|| "- (no cpufreq: VM or fixed)".into()),
        recommended: "performance".into(),
        status: match gov.as_deref() {
            Some("performance") => Status::Ok,
            Some(_) => Status::Differs,
            None => Status::Unknown,
        },
        fix: "cpupower frequency-set -g performance".into(),
        sysctl: None,
    });
    let cmdline = read_trim(Path::new("/proc/cmdline")).unwrap_or_default();
    let isolated = cmdline
        .split(' ')
        .any(|w| w.starts_with("isolcpus=") || w.starts_with("nohz_full="));
    out.push(Check {
        name: "dataplane cores isolated from the kernel's housekeeping".into(),
        current: if isolated { "isolcpus/nohz_full set" } else { "none" }.into(),
        recommended: if cores > 2 {
            "isolcpus= or nohz_full= for the dataplane cores"
        } else {
            "optional on <= 2 cores"
        }
        .into(),
        status: if isolated || cores <= 2 {
            Status::Ok
        } else {
            Status::Differs
        },
        fix: "kernel command line: isolcpus=2-7 nohz_full=2-7 (then --cores 2-7); see tuning/README.md".into(),
        sysctl: None,
    });
    let irqbalance = std::fs::read_dir("/proc").ok().is_some_and(|d| {
        d.flatten()
            .any(|e| read_trim(&e.path().join("comm")).is_some_and(|c| c == "irqbalance"))
    });
    out.push(Check {
        name: "irqbalance (moves NIC IRQs onto dataplane cores)".into(),
        current: if irqbalance { "running" } else { "not running" }.into(),
        recommended: "not running; IRQs pinned by tuning/irq-affinity.sh".into(),
        status: if irqbalance {
            Status::Differs
        } else {
            Status::Ok
        },
        fix: "systemctl disable --now irqbalance; tuning/irq-affinity.sh --apply".into(),
        sysctl: None,
    });
    let sched = scheduler_of(data_dir);
    let active = sched.as_ref().and_then(|(_, s)| {
        s.split(' ')
            .find(|w| w.starts_with('['))
            .map(|w| w.trim_matches(['[', ']']).to_string())
    });
    out.push(Check {
        name: format!(
            "I/O scheduler of the log disk{}",
            sched
                .as_ref()
                .map(|(d, _)| format!(" ({d})"))
                .unwrap_or_default()
        ),
        current: active.clone().unwrap_or_else(|| "-".into()),
        recommended: "none (NVMe) or mq-deadline".into(),
        status: match active.as_deref() {
            Some("none") | Some("mq-deadline") => Status::Ok,
            Some(_) => Status::Differs,
            None => Status::Unknown,
        },
        fix: "echo none > /sys/block/<dev>/queue/scheduler".into(),
        sysctl: None,
    });
    out
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// Runs the subcommand; returns (stdout text, exit code).
pub fn run(args: &TuneArgs) -> (String, u8) {
    match &args.action {
        TuneAction::Check {
            json,
            data_dir,
            cores,
        } => {
            let checks = checks(data_dir, *cores);
            let code = if checks.iter().any(|c| c.status == Status::Fails) {
                1
            } else if checks.iter().any(|c| c.status == Status::Differs) {
                3
            } else {
                0
            };
            (report(&checks, *json), code)
        }
        TuneAction::Apply { yes } => apply(*yes),
    }
}

fn report(checks: &[Check], json: bool) -> String {
    let mut out = String::new();
    if json {
        out.push('[');
        for (i, c) in checks.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "\n {{\"name\":{},\"current\":{},\"recommended\":{},\"status\":\"{}\",\"fix\":{}{}}}",
                json_str(&c.name),
                json_str(&c.current),
                json_str(&c.recommended),
                c.status.as_str().to_ascii_lowercase(),
                json_str(&c.fix),
                c.sysctl
                    .as_ref()
                    .map(|(k, _)| format!(",\"sysctl\":{}", json_str(k)))
                    .unwrap_or_default(),
            );
        }
        out.push_str("\n]");
        return out;
    }
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(10);
    for c in checks {
        let _ = writeln!(
            out,
            "{:<8} {:<w$}  now: {}  want: {}",
            c.status.as_str(),
            c.name,
            c.current,
            c.recommended
        );
        if matches!(c.status, Status::Differs | Status::Fails) {
            let _ = writeln!(out, "{:<8} {:<w$}  fix: {}", "", "", c.fix);
        }
    }
    let n = |s| checks.iter().filter(|c| c.status == s).count();
    let _ = write!(
        out,
        "{} ok, {} differ, {} fail, {} unknown (tuning/README.md explains each)",
        n(Status::Ok),
        n(Status::Differs),
        n(Status::Fails),
        n(Status::Unknown)
    );
    out
}

fn apply(yes: bool) -> (String, u8) {
    let mut out = String::new();
    let mut failed = false;
    for c in checks(Path::new("."), None) {
        let Some((key, value)) = c.sysctl else {
            continue;
        };
        if c.status != Status::Differs {
            continue;
        }
        if !yes {
            let _ = writeln!(out, "would set {key} = {value} (now {})", c.current);
            continue;
        }
        match std::fs::write(proc_sys_path(&key), &value) {
            Ok(()) => {
                let _ = writeln!(out, "set {key} = {value} (was {})", c.current);
            }
            Err(e) => {
                failed = true;
                let _ = writeln!(out, "could not set {key} = {value}: {e}");
            }
        }
    }
    if out.is_empty() {
        out.push_str("every recommended sysctl is already set");
    } else if !yes {
        out.push_str("dry run: nothing changed; run with --yes (as root) to write these");
    }
    (out.trim_end().to_string(), u8::from(failed))
}
