//! Tenant isolation of the query API and the dashboard: API keys, each naming one
//! advertiser or `admin`, sent as `Authorization: Bearer <key>`.
//!
//! - **No keys configured**: every caller is [`Principal::Open`] (sees everything). The
//!   query API then refuses to listen on a non-loopback address unless `query_insecure`
//!   is set ([`check_bind`]), and says so in its log.
//! - **Keys configured**: a call without a key answers 401, a wrong key 401 too (both
//!   JSON). An advertiser sees only campaigns whose events named it as `advertiser_id`
//!   (the store's owner map): any other campaign answers **404, not 403**, so ids of other
//!   tenants do not leak; `/v1/top` and `/v1/campaigns` are filtered to its campaigns;
//!   `/metrics` (operator data) needs an admin key. The page (`/`, `/assets/*`) and
//!   `/healthz` carry no data and stay open: the page asks for the key itself.
//! - **Where it is decided**: never on the raw path. The handlers take their campaign id
//!   only through [`VisibleCampaign`], which reads the router's decoded `{campaign_id}`,
//!   parses it with the handlers' own parser and checks ownership; every data route takes
//!   [`Caller`] (or [`AdminCaller`]); the open routes take neither. So `/v1/campaigns/%31%32%33/…`,
//!   `/v1/campaigns/+123/…` and `/v1/campaigns/0123/…` are checked as campaign 123, exactly
//!   as they are answered.
//! - Keys are compared in constant time (independent of where they differ and of their
//!   length, up to [`KEY_BYTES_MAX`]), against every configured key, no early exit.
//! - Failed attempts are counted per client address in a bounded table
//!   ([`AuthConfig::failures_addresses_max`]); an address with more than
//!   [`AuthConfig::failures_per_minute_max`] failures in its current minute gets 429 with
//!   `Retry-After` for every keyed call until the minute is over — before its key is even
//!   looked at, so guessing does not get faster by trying harder. Metric:
//!   `clickgate_query_auth_failures_total{reason}`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::metrics::Metrics;
use crate::read::CounterRead;

/// Longest key accepted, in bytes (keys are compared over this many bytes).
pub const KEY_BYTES_MAX: usize = 128;
/// Shortest key accepted, in bytes: shorter ones are guessable.
pub const KEY_BYTES_MIN: usize = 16;
/// Keys configured, at most (each call compares against all of them).
pub const KEYS_MAX: usize = 10_000;

/// Who a key belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Advertiser(u64),
}

/// Who is calling, as the handlers see it (resolved by the [`Caller`] extractor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Principal {
    /// No keys are configured: everything is visible.
    Open,
    Admin,
    Advertiser(u64),
}

impl Principal {
    /// Whether a campaign owned by `owner` (`None`: unknown to the store) is visible.
    pub fn sees(self, owner: Option<u64>) -> bool {
        match self {
            Principal::Open | Principal::Admin => true,
            Principal::Advertiser(a) => owner == Some(a),
        }
    }

    /// The advertiser a listing is restricted to (`None`: all).
    pub fn advertiser(self) -> Option<u64> {
        match self {
            Principal::Advertiser(a) => Some(a),
            _ => None,
        }
    }
}

/// The configured keys: `(key padded to KEY_BYTES_MAX, key length, role)`.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<([u8; KEY_BYTES_MAX], usize, Role)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

impl ApiKeys {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Parses key lines: `key = advertiser_id` or `key = "admin"` (TOML-style: the key
    /// and the value may be quoted; `#` comments and blank lines are skipped). `origin`
    /// names the source in errors (`api_keys_file /etc/k.toml`).
    pub fn parse(text: &str, origin: &str) -> Result<ApiKeys, String> {
        let mut out = ApiKeys::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push_line(line)
                .map_err(|e| format!("{origin} line {}: {e}", i + 1))?;
        }
        Ok(out)
    }

    /// Parses the environment form: `key=advertiser_id,key=admin`.
    pub fn parse_list(list: &str, origin: &str) -> Result<ApiKeys, String> {
        let mut out = ApiKeys::default();
        for (i, item) in list.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            out.push_line(item)
                .map_err(|e| format!("{origin} item {}: {e}", i + 1))?;
        }
        Ok(out)
    }

    /// Reads [`ApiKeys::parse`]'s format from a file.
    pub fn from_file(path: &Path) -> Result<ApiKeys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read api_keys_file {}: {e}", path.display()))?;
        ApiKeys::parse(&text, &format!("api_keys_file {}", path.display()))
    }

    /// Both sources together (a key in both must agree on its role).
    pub fn merge(mut self, other: ApiKeys) -> Result<ApiKeys, String> {
        for (k, n, role) in other.keys {
            self.insert(k, n, role)?;
        }
        Ok(self)
    }

    fn push_line(&mut self, line: &str) -> Result<(), String> {
        let (k, v) = line
            .split_once('=')
            .ok_or("expected `key = advertiser_id` or `key = \"admin\"`")?;
        let unquote = |s: &str| {
            let s = s.trim();
            s.strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .unwrap_or(s)
                .to_string()
        };
        let (key, value) = (unquote(k), unquote(v));
        if !(KEY_BYTES_MIN..=KEY_BYTES_MAX).contains(&key.len()) {
            return Err(format!(
                "key of {} bytes: a key has {KEY_BYTES_MIN}..={KEY_BYTES_MAX} bytes",
                key.len()
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
            return Err("a key is printable ASCII without spaces or quotes".into());
        }
        let role = if value == "admin" {
            Role::Admin
        } else {
            Role::Advertiser(value.parse::<u64>().map_err(|_| {
                format!(
                    "bad value {value:?}: expected an advertiser_id (unsigned 64-bit) or \"admin\""
                )
            })?)
        };
        let mut padded = [0u8; KEY_BYTES_MAX];
        padded[..key.len()].copy_from_slice(key.as_bytes());
        self.insert(padded, key.len(), role)
    }

    fn insert(&mut self, key: [u8; KEY_BYTES_MAX], len: usize, role: Role) -> Result<(), String> {
        if let Some(e) = self.keys.iter().find(|(k, n, _)| *k == key && *n == len) {
            if e.2 != role {
                return Err("the same key is given two different roles".into());
            }
            return Ok(());
        }
        if self.keys.len() >= KEYS_MAX {
            return Err(format!("more than {KEYS_MAX} keys"));
        }
        self.keys.push((key, len, role));
        Ok(())
    }

    /// The role of `given`, comparing against every key over [`KEY_BYTES_MAX`] bytes
    /// without an early exit: the time does not depend on which key matched, where a
    /// wrong key differs, or its length.
    pub fn lookup(&self, given: &[u8]) -> Option<Role> {
        let mut padded = [0u8; KEY_BYTES_MAX];
        let fits = given.len() <= KEY_BYTES_MAX;
        let n = given.len().min(KEY_BYTES_MAX);
        padded[..n].copy_from_slice(&given[..n]);
        let mut found = None;
        for (key, len, role) in &self.keys {
            let mut diff = (*len ^ given.len()) as u64;
            for (a, b) in key.iter().zip(&padded) {
                diff |= (a ^ b) as u64;
            }
            if std::hint::black_box(diff) == 0 {
                found = Some(*role);
            }
        }
        found.filter(|_| fits)
    }
}

/// The query API's authentication settings.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Empty: no authentication (loopback only unless `query_insecure`).
    pub keys: ApiKeys,
    /// Serve an unauthenticated query API on a non-loopback address anyway.
    pub query_insecure: bool,
    /// Failed attempts per client address per minute before 429, at least 1.
    pub failures_per_minute_max: u32,
    /// Client addresses whose failures are tracked, at most (the oldest minute goes first).
    pub failures_addresses_max: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys: ApiKeys::default(),
            query_insecure: false,
            failures_per_minute_max: 10,
            failures_addresses_max: 4096,
        }
    }
}

/// Refuses an unauthenticated query API on a non-loopback address unless told to.
pub fn check_bind(addr: SocketAddr, cfg: &AuthConfig) -> Result<(), String> {
    if cfg.keys.is_empty() && !addr.ip().is_loopback() {
        if !cfg.query_insecure {
            return Err(format!(
                "refusing to serve the query API on {addr} without API keys: configure keys \
                 (api_keys_file / CLICKGATE_API_KEYS_FILE, or CLICKGATE_API_KEYS), bind a \
                 loopback address, or pass --query-insecure to serve every tenant's data to \
                 anyone who can reach it"
            ));
        }
        tracing::warn!(query_addr = %addr, "query API serves every tenant's data without keys on a non-loopback address (--query-insecure)");
    }
    Ok(())
}

/// Failed authentication attempts of the current minute per client address, in a bounded
/// table: the query API's keys and the control API's token both throttle guessing with it.
pub struct FailureLimiter {
    per_minute_max: u32,
    addresses_max: usize,
    by_addr: Mutex<HashMap<IpAddr, (u64, u32)>>,
}

impl FailureLimiter {
    pub fn new(per_minute_max: u32, addresses_max: usize) -> FailureLimiter {
        FailureLimiter {
            per_minute_max: per_minute_max.max(1),
            addresses_max: addresses_max.max(1),
            by_addr: Mutex::new(HashMap::new()),
        }
    }

    fn minute() -> u64 {
        crate::now_ms() / 60_000
    }

    /// Whether `ip` used up its failures of this minute.
    pub fn limited(&self, ip: IpAddr) -> bool {
        let f = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        f.get(&ip)
            .is_some_and(|&(m, n)| m == Self::minute() && n >= self.per_minute_max)
    }

    /// Counts one failure of `ip`.
    pub fn fail(&self, ip: IpAddr) {
        let now = Self::minute();
        let mut f = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if !f.contains_key(&ip) && f.len() >= self.addresses_max {
            f.retain(|_, (m, _)| *m == now);
            if f.len() >= self.addresses_max {
                // Every tracked address failed this minute: drop the one with fewest.
                if let Some(k) = f.iter().min_by_key(|(_, (_, n))| *n).map(|(k, _)| *k) {
                    f.remove(&k);
                }
            }
        }
        let e = f.entry(ip).or_insert((now, 0));
        if e.0 != now {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.by_addr.lock().unwrap().len()
    }
}

/// Shared state of the auth extractors.
pub struct Auth {
    cfg: AuthConfig,
    failures: FailureLimiter,
    metrics: Arc<Metrics>,
    /// Where campaign ownership is read.
    reader: Arc<dyn CounterRead>,
}

impl Auth {
    pub fn new(cfg: AuthConfig, reader: Arc<dyn CounterRead>, metrics: Arc<Metrics>) -> Auth {
        metrics
            .api_keys
            .store(cfg.keys.len() as u64, Ordering::Relaxed);
        Auth {
            failures: FailureLimiter::new(cfg.failures_per_minute_max, cfg.failures_addresses_max),
            cfg,
            metrics,
            reader,
        }
    }

    fn limited(&self, ip: IpAddr) -> bool {
        self.failures.limited(ip)
    }

    fn fail(&self, ip: IpAddr) {
        self.failures.fail(ip)
    }
}

/// A JSON error answer.
pub fn json_error(status: StatusCode, error: &str) -> Response {
    (status, Json(serde_json::json!({ "error": error }))).into_response()
}

/// The authentication layer's only job: hand the shared [`Auth`] to the extractors below.
/// It decides nothing about paths; every decision is taken by an extractor on the
/// decoded, routed parameters the handler itself uses, so no encoding of a path can
/// reach a handler around it.
pub fn layer(auth: Arc<Auth>) -> axum::Extension<Arc<Auth>> {
    axum::Extension(auth)
}

/// The principal of a request, resolved once and kept in the request's extensions (a
/// handler may use several extractors; failures are counted once).
#[derive(Clone, Copy)]
struct Resolved(Principal);

#[allow(clippy::result_large_err)] // the rejection is the response itself
fn auth_of(parts: &Parts) -> Result<Arc<Auth>, Response> {
    parts
        .extensions
        .get::<Arc<Auth>>()
        .cloned()
        .ok_or_else(missing_layer)
}

#[cold]
fn missing_layer() -> Response {
    tracing::error!("query API: the auth layer is missing from this router");
    json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

/// Who calls: with keys configured, a valid `Authorization: Bearer <key>` is required
/// (401 without or with a wrong one, 429 for an address past its failure budget, checked
/// before the key is looked at); without keys, [`Principal::Open`].
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if let Some(Resolved(p)) = parts.extensions.get::<Resolved>() {
            return Ok(Caller(*p));
        }
        let auth = auth_of(parts)?;
        let principal = if auth.cfg.keys.is_empty() {
            Principal::Open
        } else {
            let ip = parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
            let count = |i: usize| auth.metrics.auth_failures[i].fetch_add(1, Ordering::Relaxed);
            if auth.limited(ip) {
                count(2);
                let mut r = json_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed key attempts from this address; retry after a minute",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
                return Err(r);
            }
            let given = parts
                .headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b""));
            match given.map(|k| auth.cfg.keys.lookup(k)) {
                None => {
                    count(0);
                    auth.fail(ip);
                    return Err(unauthorized(
                        "missing API key: send `Authorization: Bearer <key>`",
                    ));
                }
                Some(None) => {
                    count(1);
                    auth.fail(ip);
                    tracing::debug!(client = %ip, "query API: invalid key");
                    return Err(unauthorized("invalid API key"));
                }
                Some(Some(Role::Admin)) => Principal::Admin,
                Some(Some(Role::Advertiser(a))) => Principal::Advertiser(a),
            }
        };
        parts.extensions.insert(Resolved(principal));
        Ok(Caller(principal))
    }
}

/// A caller allowed operator data (`/metrics`): admin, or anyone on an API without keys;
/// an advertiser's key is 403.
pub struct AdminCaller;

impl<S: Send + Sync> FromRequestParts<S> for AdminCaller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Caller(p) = Caller::from_request_parts(parts, state).await?;
        if p.advertiser().is_some() {
            let auth = auth_of(parts)?;
            auth.metrics.auth_failures[3].fetch_add(1, Ordering::Relaxed);
            return Err(json_error(
                StatusCode::FORBIDDEN,
                "this route needs an admin key",
            ));
        }
        Ok(AdminCaller)
    }
}

/// The route's `{campaign_id}`, as the router decoded it, parsed by the one parser the
/// handlers use ([`crate::query::parse_campaign_id`]) and visible to the caller: the only
/// way a handler gets a campaign id. Another tenant's campaign, like one the store does
/// not know, is 404 (ids of other tenants do not leak); a malformed id is 400.
pub struct VisibleCampaign {
    pub id: u64,
    pub caller: Principal,
}

impl<S: Send + Sync> FromRequestParts<S> for VisibleCampaign {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Caller(caller) = Caller::from_request_parts(parts, state).await?;
        let raw = match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(raw)) => raw,
            Err(e) => {
                return Err(json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("bad campaign_id in the path: {e}"),
                ))
            }
        };
        let id = crate::query::parse_campaign_id(&raw)
            .map_err(|e| (StatusCode::BAD_REQUEST, Json(e)).into_response())?;
        if caller.advertiser().is_some() {
            let auth = auth_of(parts)?;
            if !caller.sees(auth.reader.owner(id)) {
                return Err(json_error(StatusCode::NOT_FOUND, "not found"));
            }
        }
        Ok(VisibleCampaign { id, caller })
    }
}

fn unauthorized(msg: &str) -> Response {
    let mut r = json_error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"clickgate\""),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "key-of-advertiser-a-0001";
    const ADMIN: &str = "admin-key-0123456789";

    #[test]
    fn parses_files_and_lists_with_line_numbers() {
        let k = ApiKeys::parse(
            &format!("# keys\n\n\"{A}\" = 7\n{ADMIN} = \"admin\"\n"),
            "f",
        )
        .unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k.lookup(A.as_bytes()), Some(Role::Advertiser(7)));
        assert_eq!(k.lookup(ADMIN.as_bytes()), Some(Role::Admin));
        let l = ApiKeys::parse_list(&format!("{A}=7, {ADMIN}=admin"), "env").unwrap();
        assert_eq!(l.lookup(ADMIN.as_bytes()), Some(Role::Admin));
        let err = |text: &str, want: &str| {
            let e = ApiKeys::parse(text, "f").err().unwrap();
            assert!(e.contains(want), "{text}: {e}");
        };
        err(&format!("{A} = 7\nshort = 1"), "f line 2: key of 5 bytes");
        err(&format!("{A} 7"), "line 1: expected `key");
        err(&format!("{A} = boss"), "bad value \"boss\"");
        err(&format!("{A} = -1"), "advertiser_id");
        err(&format!("{A} = 1\n{A} = 2"), "two different roles");
        err(
            &format!("\"{}\" = 1", "k".repeat(KEY_BYTES_MAX + 1)),
            "bytes",
        );
        assert!(ApiKeys::parse_list("x=1", "CLICKGATE_API_KEYS")
            .err()
            .unwrap()
            .contains("CLICKGATE_API_KEYS item 1"));
    }

    #[test]
    fn lookup_needs_the_exact_key() {
        let k = ApiKeys::parse(&format!("{A} = 7"), "f").unwrap();
        for wrong in [
            "",
            "key-of-advertiser-a-000",
            "key-of-advertiser-a-00012",
            "key-of-advertiser-a-0002",
            "KEY-OF-ADVERTISER-A-0001",
        ] {
            assert_eq!(k.lookup(wrong.as_bytes()), None, "{wrong}");
        }
        let mut long = A.as_bytes().to_vec();
        long.resize(KEY_BYTES_MAX + 10, 0);
        assert_eq!(k.lookup(&long), None);
        assert_eq!(ApiKeys::default().lookup(b""), None);
    }

    #[test]
    fn principals_see_their_own() {
        assert!(Principal::Open.sees(None));
        assert!(Principal::Admin.sees(Some(3)));
        assert!(Principal::Advertiser(3).sees(Some(3)));
        assert!(!Principal::Advertiser(3).sees(Some(4)));
        assert!(!Principal::Advertiser(3).sees(None));
    }

    #[test]
    fn failures_are_bounded_and_limit_per_address() {
        let cfg = AuthConfig {
            failures_per_minute_max: 2,
            failures_addresses_max: 3,
            ..AuthConfig::default()
        };
        let store = crate::store::Store::new(Default::default(), 10);
        let a = Auth::new(
            cfg,
            Arc::new(crate::read::EmbeddedRead::new(Arc::new(
                std::sync::RwLock::new(store),
            ))),
            Arc::default(),
        );
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        a.fail(ip(1));
        assert!(!a.limited(ip(1)));
        a.fail(ip(1));
        assert!(a.limited(ip(1)));
        assert!(!a.limited(ip(2)));
        for n in 2..10 {
            a.fail(ip(n));
        }
        assert!(a.failures.tracked() <= 3);
    }

    #[test]
    fn bind_check() {
        let open = AuthConfig::default();
        assert!(check_bind("127.0.0.1:0".parse().unwrap(), &open).is_ok());
        assert!(check_bind("[::1]:0".parse().unwrap(), &open).is_ok());
        let e = check_bind("0.0.0.0:8081".parse().unwrap(), &open).unwrap_err();
        assert!(e.contains("--query-insecure"), "{e}");
        let insecure = AuthConfig {
            query_insecure: true,
            ..AuthConfig::default()
        };
        assert!(check_bind("0.0.0.0:8081".parse().unwrap(), &insecure).is_ok());
        let keyed = AuthConfig {
            keys: ApiKeys::parse_list(&format!("{A}=1"), "env").unwrap(),
            ..AuthConfig::default()
        };
        assert!(check_bind("0.0.0.0:8081".parse().unwrap(), &keyed).is_ok());
    }
}
