//! `clickgate rules apply|list`: a client of the control API (docs/api.md).
//!
//! A file is validated locally first with the same parser the server uses, so a bad
//! file is reported (rule and problem, or JSON line and column) without a round trip;
//! the server validates again and its verdict is final.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clickgate_core::fraud::RuleSet;
use clickgate_proto::control::control_client::ControlClient;
use clickgate_proto::control::{ApplyRulesRequest, ListRulesRequest, RuleSetReply};
use tonic::transport::{Channel, Endpoint};

pub const DEFAULT_URL: &str = "http://127.0.0.1:50051";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest rules file read, in bytes (the server's request bound).
const FILE_BYTES_MAX: u64 = clickgate_controlplane::control::REQUEST_BYTES_MAX as u64;

#[derive(clap::Args, Debug, Clone)]
pub struct RulesArgs {
    /// Control API endpoint
    #[arg(long, env = "CLICKGATE_CONTROL_URL", default_value = DEFAULT_URL)]
    pub url: String,

    /// Bearer token of the control API
    #[arg(long, env = "CLICKGATE_CONTROL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Certificate authority (PEM) to trust for an https:// control URL (the server's
    /// control_tls_cert, or the CA that signed it)
    #[arg(long, env = "CLICKGATE_CONTROL_CA")]
    pub ca: Option<PathBuf>,

    #[command(subcommand)]
    pub action: RulesAction,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum RulesAction {
    /// Replace the whole rule set with the rules in FILE, atomically
    Apply {
        /// Rules file (JSON, docs/fraud.md): {"rules":[{"id":..,"kind":..,...}]}
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Print the current rule set (JSON on stdout)
    List,
}

/// A failure, with its exit code.
#[derive(Debug)]
pub enum RulesError {
    /// A bad file or argument: exit 2.
    BadInput(String),
    /// The server refused the token: exit 3.
    Unauthenticated(String),
    /// The endpoint could not be reached: exit 4.
    Unreachable(String),
    /// Anything else the server said: exit 1.
    Server(String),
}

impl RulesError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RulesError::BadInput(_) => 2,
            RulesError::Unauthenticated(_) => 3,
            RulesError::Unreachable(_) => 4,
            RulesError::Server(_) => 1,
        }
    }
}

impl std::fmt::Display for RulesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RulesError::BadInput(m)
            | RulesError::Unauthenticated(m)
            | RulesError::Unreachable(m)
            | RulesError::Server(m) => f.write_str(m),
        }
    }
}

/// Runs the subcommand; the text to print on success.
pub fn run(args: &RulesArgs) -> Result<String, RulesError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RulesError::Server(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        match &args.action {
            RulesAction::Apply { file } => {
                let text = read_rules_file(file)?;
                let mut client = connect(&args.url, args.ca.as_deref()).await?;
                let r = client
                    .apply_rules(request(
                        ApplyRulesRequest { rules_json: text },
                        args.token.as_deref(),
                    )?)
                    .await
                    .map_err(|s| status_error(&args.url, s))?
                    .into_inner();
                Ok(format!(
                    "applied rule set version {} ({} rules)",
                    r.version,
                    r.rules.len()
                ))
            }
            RulesAction::List => {
                let mut client = connect(&args.url, args.ca.as_deref()).await?;
                let r: RuleSetReply = client
                    .list_rules(request(ListRulesRequest {}, args.token.as_deref())?)
                    .await
                    .map_err(|s| status_error(&args.url, s))?
                    .into_inner();
                Ok(r.rules_json.trim_end().to_string())
            }
        }
    })
}

/// Reads and validates a rules file; the error names the file and the rule or the
/// JSON position.
pub fn read_rules_file(file: &Path) -> Result<String, RulesError> {
    let shown = file.display();
    let md = std::fs::metadata(file)
        .map_err(|e| RulesError::BadInput(format!("cannot read {shown}: {e}")))?;
    if md.len() > FILE_BYTES_MAX {
        return Err(RulesError::BadInput(format!(
            "{shown}: {} bytes, more than the {FILE_BYTES_MAX} the control API takes",
            md.len()
        )));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| RulesError::BadInput(format!("cannot read {shown}: {e}")))?;
    let set = RuleSet::parse(&text)
        .map_err(|e| RulesError::BadInput(format!("{shown}: {e}; nothing was applied")))?;
    set.compile()
        .map_err(|e| RulesError::BadInput(format!("{shown}: {e}; nothing was applied")))?;
    Ok(text)
}

async fn connect(url: &str, ca: Option<&Path>) -> Result<ControlClient<Channel>, RulesError> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| RulesError::BadInput(format!("bad control API url {url:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    if url.starts_with("https://") {
        let Some(ca) = ca else {
            return Err(RulesError::BadInput(format!(
                "{url} is https: pass --ca FILE, the certificate authority (PEM) to trust"
            )));
        };
        let pem = std::fs::read(ca)
            .map_err(|e| RulesError::BadInput(format!("cannot read --ca {}: {e}", ca.display())))?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(pem));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| RulesError::BadInput(format!("TLS for {url}: {e}")))?;
    } else if ca.is_some() {
        return Err(RulesError::BadInput(format!(
            "--ca given but {url} is not https://"
        )));
    }
    let channel = endpoint.connect().await.map_err(|e| {
        RulesError::Unreachable(format!(
            "cannot reach the control API at {url}: {}",
            source_chain(&e)
        ))
    })?;
    Ok(ControlClient::new(channel)
        .max_decoding_message_size(clickgate_controlplane::control::REQUEST_BYTES_MAX))
}

fn request<T>(msg: T, token: Option<&str>) -> Result<tonic::Request<T>, RulesError> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            RulesError::BadInput("the token holds characters a header cannot carry".into())
        })?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

fn status_error(url: &str, s: tonic::Status) -> RulesError {
    use tonic::Code;
    let msg = s.message().to_string();
    match s.code() {
        Code::Unauthenticated => RulesError::Unauthenticated(format!(
            "the control API refused the token: {msg} (pass --token or set CLICKGATE_CONTROL_TOKEN)"
        )),
        Code::InvalidArgument => {
            RulesError::BadInput(format!("rule set refused: {msg}; nothing was applied"))
        }
        Code::Unavailable => {
            RulesError::Unreachable(format!("cannot reach the control API at {url}: {msg}"))
        }
        code => RulesError::Server(format!("control API error ({code:?}): {msg}")),
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
