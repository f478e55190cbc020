//! The control API (docs/api.md): gRPC on `control_addr`, bearer-token auth on every
//! call, fraud rules and runtime settings.
//!
//! A change is validated with the same parser and compiler the dataplane and billing
//! use (`clickgate_core::fraud`), then persisted as `<data_dir>/rules/current.json` with
//! the next version (atomic write + fsync, `clickgate_proto::control_files`); only then
//! is the call answered. The dataplane cores poll that file and swap the new set in
//! within a second; the file is also what carries the rules across restarts of either
//! plane. Changes are serialised by one async mutex, so versions never interleave.
//!
//! Rules travel as the contract's JSON text (`ApplyRules` takes the rules file as is),
//! so the CLI, this server, the dataplane and billing share one format and one parser.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clickgate_core::fraud::RuleSet;
use clickgate_proto::control::control_server::{Control, ControlServer};
use clickgate_proto::control::{
    AddRuleRequest, ApplyRulesRequest, CidrList, DeleteRuleRequest, GetConfigRequest,
    GetStatsRequest, ListRulesRequest, RuleSetReply, RuleSummary, RuntimeConfig, SetConfigReply,
    SetConfigRequest, Stats, WatchRulesRequest,
};
use clickgate_proto::control_files::{self, RuntimeOverrides};
use futures_util::Stream;
use tokio::sync::{watch, Mutex};
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::store::Store;

/// The message of every call refused because no token is configured.
pub const NO_TOKEN_MESSAGE: &str = "the control API has no token configured, so it refuses every call: set CLICKGATE_CONTROL_TOKEN (or --control-token / control_token) on the controlplane";
/// Shortest control token accepted, in bytes: shorter ones are guessable.
pub const TOKEN_BYTES_MIN: usize = 16;
/// Largest request message the server decodes, in bytes (a 10k-CIDR set is ≈ 250 KiB).
pub const REQUEST_BYTES_MAX: usize = 16 << 20;

/// Counters of the control API (rendered in the controlplane's `/metrics`).
#[derive(Default)]
pub struct ControlMetrics {
    pub rule_changes: AtomicU64,
    pub rule_changes_refused: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub rules_version: AtomicU64,
}

struct Current {
    set: RuleSet,
    applied_ms: u64,
}

struct State {
    data_dir: PathBuf,
    /// Serialises changes (and their file writes).
    rules: Mutex<Current>,
    runtime: Mutex<RuntimeOverrides>,
    watch: watch::Sender<Arc<RuleSetReply>>,
    metrics: Arc<ControlMetrics>,
    cp_metrics: Arc<Metrics>,
    store: Arc<RwLock<Store>>,
    started: Instant,
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct ControlService {
    state: Arc<State>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn reply(cur: &Current) -> RuleSetReply {
    RuleSetReply {
        version: cur.set.version,
        rules_json: cur.set.to_json(),
        rules: cur
            .set
            .rules
            .iter()
            .map(|r| RuleSummary {
                id: r.id.clone(),
                kind: r.spec.kind().to_string(),
                entries: entries(&r.spec),
            })
            .collect(),
        applied_ms: cur.applied_ms,
    }
}

fn entries(spec: &clickgate_core::fraud::RuleSpec) -> u64 {
    use clickgate_core::fraud::RuleSpec as S;
    (match spec {
        S::IpBlock { cidrs } => cidrs.len(),
        S::UserAgent { patterns } => patterns.len(),
        S::Honeypot { ad_ids } => ad_ids.len(),
        S::IpRate { .. } => 1,
        S::RiskModel { model, .. } => {
            model.weights.len() + model.geo.values().map(Vec::len).sum::<usize>()
        }
    }) as u64
}

impl ControlService {
    /// Loads the persisted rule set and runtime settings. A rules file that does not
    /// load is an error: starting with no rules would silently make fraud billable.
    pub fn open(
        data_dir: PathBuf,
        cp_metrics: Arc<Metrics>,
        store: Arc<RwLock<Store>>,
    ) -> anyhow::Result<ControlService> {
        let set = control_files::read_rules(&data_dir)?.unwrap_or_else(RuleSet::empty);
        // Compiling catches what parsing alone would not, before anyone relies on it.
        set.compile()
            .map_err(|e| anyhow::anyhow!("persisted rules do not compile: {e}"))?;
        let applied_ms = std::fs::metadata(control_files::rules_path(&data_dir))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let runtime = control_files::read_runtime(&data_dir)?.unwrap_or_default();
        let metrics = Arc::new(ControlMetrics::default());
        metrics.rules_version.store(set.version, Ordering::Relaxed);
        let cur = Current { set, applied_ms };
        let (watch, _) = watch::channel(Arc::new(reply(&cur)));
        tracing::info!(
            rules_version = cur.set.version,
            rules = cur.set.rules.len(),
            runtime_version = runtime.version,
            "control API state loaded"
        );
        Ok(ControlService {
            state: Arc::new(State {
                data_dir,
                rules: Mutex::new(cur),
                runtime: Mutex::new(runtime),
                watch,
                metrics,
                cp_metrics,
                store,
                started: Instant::now(),
            }),
        })
    }

    pub fn metrics(&self) -> Arc<ControlMetrics> {
        self.state.metrics.clone()
    }

    /// The tonic service with the bearer-token check in front of every call.
    /// The service behind the token check. A client address with more than its budget
    /// of failed token attempts this minute (`limiter`) is refused before its token is
    /// looked at (`RESOURCE_EXHAUSTED`), so guessing does not get faster by trying harder.
    pub fn into_server(
        self,
        token: Option<String>,
        limiter: Arc<crate::auth::FailureLimiter>,
    ) -> tonic::service::interceptor::InterceptedService<
        ControlServer<ControlService>,
        impl tonic::service::Interceptor + Clone,
    > {
        let metrics = self.state.metrics.clone();
        let server = ControlServer::new(self).max_decoding_message_size(REQUEST_BYTES_MAX);
        tonic::service::interceptor::InterceptedService::new(server, move |req: Request<()>| {
            let ip = req
                .remote_addr()
                .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            if limiter.limited(ip) {
                metrics.unauthenticated.fetch_add(1, Ordering::Relaxed);
                return Err(Status::resource_exhausted(
                    "too many failed token attempts from this address; retry after a minute",
                ));
            }
            let r = check_token(token.as_deref(), &req);
            if r.is_err() {
                metrics.unauthenticated.fetch_add(1, Ordering::Relaxed);
                if token.as_deref().is_some_and(|t| !t.is_empty()) {
                    limiter.fail(ip);
                }
            }
            r.map(|()| req)
        })
    }

    /// Validates, persists with the next version, publishes. `change` maps the current
    /// set to the new one (without its version).
    async fn change(
        &self,
        what: &str,
        change: impl FnOnce(&RuleSet) -> Result<RuleSet, Status>,
    ) -> Result<Response<RuleSetReply>, Status> {
        let st = &self.state;
        let mut cur = st.rules.lock().await;
        let next = match change(&cur.set).and_then(|mut s| {
            s.version = cur.set.version + 1;
            s.compile()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                st.metrics
                    .rule_changes_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(call = what, error = %e.message(), "rule change refused");
                return Err(e);
            }
        };
        let path = control_files::rules_path(&st.data_dir);
        let text = next.to_json();
        tokio::task::spawn_blocking(move || control_files::write_atomic(&path, text.as_bytes()))
            .await
            .map_err(|e| Status::internal(format!("writing the rules: {e}")))?
            .map_err(|e| Status::internal(format!("writing the rules file: {e}")))?;
        *cur = Current {
            set: next,
            applied_ms: now_ms(),
        };
        st.metrics.rule_changes.fetch_add(1, Ordering::Relaxed);
        st.metrics
            .rules_version
            .store(cur.set.version, Ordering::Relaxed);
        let r = reply(&cur);
        st.watch.send_replace(Arc::new(r.clone()));
        tracing::info!(
            call = what,
            version = cur.set.version,
            rules = cur.set.rules.len(),
            "rule set applied"
        );
        Ok(Response::new(r))
    }
}

/// `authorization: Bearer <token>`, compared in constant time.
fn check_token(token: Option<&str>, req: &Request<()>) -> Result<(), Status> {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Err(Status::unauthenticated(NO_TOKEN_MESSAGE));
    };
    let Some(value) = req.metadata().get("authorization") else {
        return Err(Status::unauthenticated(
            "missing `authorization: Bearer <token>` metadata",
        ));
    };
    let given = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
    if ct_eq(given, token.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated("invalid token"))
    }
}

/// Equal-length inputs are compared without an early exit; the length is not secret.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn runtime_to_proto(o: &RuntimeOverrides) -> RuntimeConfig {
    RuntimeConfig {
        rate_limit_events_per_sec: o.rate_limit_events_per_sec,
        trusted_cidrs: o
            .trusted_cidrs
            .as_ref()
            .map(|c| CidrList { cidrs: c.clone() }),
        dedup_window_secs: o.dedup_window_secs,
        version: o.version,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<RuleSetReply, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn apply_rules(
        &self,
        req: Request<ApplyRulesRequest>,
    ) -> Result<Response<RuleSetReply>, Status> {
        let text = req.into_inner().rules_json;
        self.change("ApplyRules", |_| {
            RuleSet::parse(&text).map_err(|e| Status::invalid_argument(e.to_string()))
        })
        .await
    }

    async fn add_rule(
        &self,
        req: Request<AddRuleRequest>,
    ) -> Result<Response<RuleSetReply>, Status> {
        let text = req.into_inner().rule_json;
        self.change("AddRule", |cur| {
            let rule =
                RuleSet::parse_rule(&text).map_err(|e| Status::invalid_argument(e.to_string()))?;
            cur.with_rule(rule)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        })
        .await
    }

    async fn delete_rule(
        &self,
        req: Request<DeleteRuleRequest>,
    ) -> Result<Response<RuleSetReply>, Status> {
        let id = req.into_inner().id;
        self.change("DeleteRule", |cur| {
            cur.without_rule(&id)
                .ok_or_else(|| Status::not_found(format!("no rule with id \"{id}\"")))
        })
        .await
    }

    async fn list_rules(
        &self,
        _req: Request<ListRulesRequest>,
    ) -> Result<Response<RuleSetReply>, Status> {
        let cur = self.state.rules.lock().await;
        Ok(Response::new(reply(&cur)))
    }

    type WatchRulesStream = WatchStream;

    async fn watch_rules(
        &self,
        _req: Request<WatchRulesRequest>,
    ) -> Result<Response<Self::WatchRulesStream>, Status> {
        let mut rx = self.state.watch.subscribe();
        rx.mark_changed();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let r = (**rx.borrow_and_update()).clone();
            Some((Ok(r), rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_config(
        &self,
        _req: Request<GetConfigRequest>,
    ) -> Result<Response<RuntimeConfig>, Status> {
        let o = self.state.runtime.lock().await;
        Ok(Response::new(runtime_to_proto(&o)))
    }

    async fn set_config(
        &self,
        req: Request<SetConfigRequest>,
    ) -> Result<Response<SetConfigReply>, Status> {
        let c = req.into_inner().config.unwrap_or_default();
        let st = &self.state;
        let mut cur = st.runtime.lock().await;
        let next = RuntimeOverrides {
            version: cur.version + 1,
            rate_limit_events_per_sec: c.rate_limit_events_per_sec,
            trusted_cidrs: c.trusted_cidrs.map(|l| l.cidrs),
            dedup_window_secs: c.dedup_window_secs,
        };
        next.validate().map_err(Status::invalid_argument)?;
        let path = control_files::runtime_path(&st.data_dir);
        let text = next.to_json();
        tokio::task::spawn_blocking(move || control_files::write_atomic(&path, text.as_bytes()))
            .await
            .map_err(|e| Status::internal(format!("writing the settings: {e}")))?
            .map_err(|e| Status::internal(format!("writing the settings file: {e}")))?;
        *cur = next;
        tracing::info!(version = cur.version, "runtime settings applied");
        Ok(Response::new(SetConfigReply {
            config: Some(runtime_to_proto(&cur)),
            applied_hot: RuntimeOverrides::HOT.map(String::from).to_vec(),
            needs_restart: RuntimeOverrides::RESTART.map(String::from).to_vec(),
        }))
    }

    async fn get_stats(&self, _req: Request<GetStatsRequest>) -> Result<Response<Stats>, Status> {
        let st = &self.state;
        let (rules_version, rules) = {
            let cur = st.rules.lock().await;
            (cur.set.version, cur.set.rules.len() as u64)
        };
        let config_version = st.runtime.lock().await.version;
        let applied = st
            .store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
            .frames_applied;
        let m = &st.metrics;
        Ok(Response::new(Stats {
            rules_version,
            rules,
            config_version,
            uptime_secs: st.started.elapsed().as_secs(),
            delta_frames_received: st.cp_metrics.frames_received.load(Ordering::Relaxed),
            delta_frames_applied: applied,
            rule_changes: m.rule_changes.load(Ordering::Relaxed),
            rule_changes_refused: m.rule_changes_refused.load(Ordering::Relaxed),
            calls_unauthenticated: m.unauthenticated.load(Ordering::Relaxed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn token_checks() {
        let t = Some("s3cret");
        assert!(check_token(t, &req(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret "),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            let e = check_token(t, &req(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        for none in [None, Some("")] {
            let e = check_token(none, &req(Some("Bearer "))).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            assert!(
                e.message().contains("CLICKGATE_CONTROL_TOKEN"),
                "{}",
                e.message()
            );
        }
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}
