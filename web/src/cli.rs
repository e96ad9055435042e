//! The `cdp` command line: its arguments (clap), where to find the appliance and its token,
//! and the commands that talk to the API: `cdp status`, `cdp checkpoint`, `cdp checkpoints`,
//! `cdp view create|list|delete` and `cdp pause|resume|throttle`. `cdp demo` lives in [`crate::demo`]; `src/bin/cdp.rs`
//! only wires these together.
//!
//! Must never take a token on the command line (other users see it in `ps`), and never read
//! the process environment directly: the caller passes a lookup, so tests choose it.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::api::{
    CheckpointList, CheckpointStatus, CreateCheckpoint, CreateView, JobList, JobStatus, LinkChange,
    ViewList, ViewStatus,
};
use crate::client::{checkpoints_path, link_path, ApiClient, ClientError};
use crate::format;
use crate::token::{ApiToken, ParseTokenError, TokenFileError, TOKEN_FILE_NAME};

/// Exit code: the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit code: the appliance (or the command) refused: bad token, no such job, ….
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: something failed: no connection, bad configuration, a child died, ….
pub const EXIT_ERROR: u8 = 2;

/// File in the appliance's data directory holding the API's bound socket address.
pub const API_ADDR_FILE_NAME: &str = "api.addr";
/// Environment variable: the API's URL (`--api`).
pub const ENV_API: &str = "CDP_API";
/// Environment variable: the token file (`--token-file`).
pub const ENV_TOKEN_FILE: &str = "CDP_TOKEN_FILE";
/// Environment variable: the token itself.
pub const ENV_TOKEN: &str = "CDP_TOKEN";
/// Environment variable: the appliance's data directory (`--appliance-dir`).
pub const ENV_APPLIANCE_DIR: &str = "CDP_APPLIANCE_DIR";

/// `cdp`: the command-line client of a cdp appliance.
#[derive(Debug, Parser)]
#[command(
    name = "cdp",
    version,
    about = "The command-line client of a cdp appliance: job status, pausing and throttling \
             jobs, checkpoints, recovery views, and a demo on loopback",
    after_help = "Exit codes: 0 ok, 1 refused (bad token, no such job, a point that has \
                  expired), 2 error."
)]
pub struct Cli {
    /// Where the appliance's API is and how to authenticate to it.
    #[command(flatten)]
    pub api: ApiArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the appliance is. Flags beat environment variables; a specific setting (`--api`,
/// `--token-file`) beats the appliance directory at the same level.
#[derive(Debug, Clone, Default, Args)]
pub struct ApiArgs {
    /// The appliance's REST API, e.g. http://127.0.0.1:7444 [env: CDP_API]
    #[arg(long, value_name = "URL", global = true)]
    pub api: Option<String>,
    /// File holding the API token (mode 0600) [env: CDP_TOKEN_FILE; or the token itself in
    /// CDP_TOKEN]
    #[arg(long, value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The appliance's data directory on this host: reads DIR/api.addr and DIR/api-token
    /// [env: CDP_APPLIANCE_DIR]
    #[arg(long, value_name = "DIR", global = true)]
    pub appliance_dir: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the replication jobs (all of them as a table, or one in detail).
    #[command(after_help = JOB_STATES_HELP)]
    Status(StatusArgs),
    /// Pause a job's replication.
    ///
    /// The agent ships nothing and journals its writes; past its backlog bound it only marks
    /// dirty regions, to be resynced after `cdp resume`. The setting is kept across restarts
    /// of the appliance and reconnects of the agent.
    Pause(LinkArgs),
    /// Resume a paused job.
    ///
    /// The agent ships what it journalled while paused and, if it went past its backlog
    /// bound, resyncs the regions it marked dirty (the replicas are inconsistent until that
    /// resync ends).
    Resume(LinkArgs),
    /// Limit the bandwidth a job's replication may use, or lift the limit.
    ///
    /// The limit is on the stored bytes the agent ships per second, and is kept across
    /// restarts; the agent's own limit (`cdp-agent run --throttle`), if lower, still applies.
    /// A job that writes faster than its limit falls behind: its backlog grows, and past its
    /// bound it goes `ahead`.
    Throttle(ThrottleArgs),
    /// Ask a job's agent for a tagged checkpoint; waits until it is in the history.
    Checkpoint(CheckpointArgs),
    /// List the checkpoints a job's history keeps, oldest first.
    Checkpoints(CheckpointsArgs),
    /// Recovery views: a job's disks as they were at a point of its history, served over
    /// NBD.
    #[command(subcommand)]
    View(ViewCommand),
    /// Start an appliance and an agent on loopback with a sample disk, and guide a first
    /// replication (runs until Ctrl-C).
    Demo(DemoArgs),
}

/// `cdp status [--json] [JOB]`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// One job, by name or by id (or a unique prefix of its id).
    pub job: Option<String>,
}

/// What `cdp status --help` says about the states a job can be in.
pub const JOB_STATES_HELP: &str = "\
Job states:
  syncing       a new job copies its disks (only blocks whose blake3 hashes differ are sent)
  replicating   every write is journalled and shipped
  ahead         past the job's backlog bound or in a long outage: the agent keeps serving
                I/O and only marks dirty regions (crash-safely), to resync later
  resyncing     dirty regions are compared by block hash and differing blocks sent; the
                replicas are inconsistent (no checkpoint, no recovery view inside it) until
                it ends
  paused        an operator paused replication (cdp pause); the agent journals, then past
                its bound marks dirty regions
  error         needs an operator: the reason says why
  disconnected, refused, waiting
                the agent is not connected: the reason says why";

/// `cdp pause [--json] JOB` and `cdp resume [--json] JOB`.
#[derive(Debug, Clone, Args)]
pub struct LinkArgs {
    /// The job: its name, its id, or a unique prefix of its id.
    pub job: String,
    /// Print the API's JSON (the job's status after the change) instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// `cdp throttle [--json] JOB RATE`.
#[derive(Debug, Clone, Args)]
pub struct ThrottleArgs {
    /// The job: its name, its id, or a unique prefix of its id.
    pub job: String,
    /// Bytes per second the job may ship: a whole number with an optional suffix K, M or G
    /// (powers of 1024), e.g. 10M; `off` or 0 for no limit.
    #[arg(value_parser = parse_rate)]
    pub rate: u64,
    /// Print the API's JSON (the job's status after the change) instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// Why a `cdp throttle` rate does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseRateError {
    /// Not a whole number with an optional K, M or G, nor `off`.
    #[error(
        "expected bytes per second as a whole number with an optional suffix K, M or G \
         (powers of 1024), e.g. 10M, or off for no limit"
    )]
    Malformed,
    /// More bytes per second than 64 bits hold.
    #[error("too large: a rate is at most {} bytes per second", u64::MAX)]
    TooLarge,
}

/// A `cdp throttle` rate in bytes per second: `off` (any case) or a whole number with an
/// optional suffix K, M or G (either case; powers of 1024). 0 and `off` mean no limit.
pub fn parse_rate(text: &str) -> Result<u64, ParseRateError> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let (digits, unit) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    // `u64::from_str` alone would also take a leading `+`.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseRateError::Malformed);
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|count| count.checked_mul(unit))
        .ok_or(ParseRateError::TooLarge)
}

/// `cdp checkpoint JOB --tag TAG [--tag TAG ...] [--app-consistent] [--json]`.
#[derive(Debug, Clone, Args)]
pub struct CheckpointArgs {
    /// The job: its name, its id, or a unique prefix of its id.
    pub job: String,
    /// A tag for the checkpoint; repeat for several. `cdp view create JOB --at tag:TAG`
    /// finds the newest checkpoint with it.
    #[arg(long = "tag", value_name = "TAG", required = true)]
    pub tags: Vec<String>,
    /// Have the agent run its consistency hook first (quiesce the application). If the hook
    /// fails, or the agent has none, the checkpoint is made crash-consistent and says so.
    #[arg(long)]
    pub app_consistent: bool,
    /// Print the API's JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

/// `cdp checkpoints [--json] JOB`.
#[derive(Debug, Clone, Args)]
pub struct CheckpointsArgs {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The job: its name, its id, or a unique prefix of its id.
    pub job: String,
}

/// `cdp view ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ViewCommand {
    /// Open a view of a job at a point of its history and show how to reach its disks.
    Create(ViewCreateArgs),
    /// List the open views.
    List(ViewListArgs),
    /// Close a view; writes made to a writable view are dropped.
    Delete(ViewDeleteArgs),
}

/// `cdp view create JOB --at POINT [--writable] [--json]`.
#[derive(Debug, Clone, Args)]
pub struct ViewCreateArgs {
    /// The job: its name, its id, or a unique prefix of its id.
    pub job: String,
    /// The point: latest, seq:N, checkpoint:SEQ, tag:TAG (the newest checkpoint with it),
    /// an RFC 3339 time such as 2025-06-01T12:00:00Z or @UNIX_SECONDS (the newest
    /// checkpoint at or before it).
    #[arg(long, value_name = "POINT")]
    pub at: String,
    /// Let NBD clients write (to a scratch layer dropped with the view), e.g. to boot a
    /// copy; the replica and the history never change.
    #[arg(long)]
    pub writable: bool,
    /// Print the API's JSON instead of the guide.
    #[arg(long)]
    pub json: bool,
}

/// `cdp view list [--json]`.
#[derive(Debug, Clone, Args)]
pub struct ViewListArgs {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `cdp view delete ID`.
#[derive(Debug, Clone, Args)]
pub struct ViewDeleteArgs {
    /// The view's id (`cdp view list`).
    pub id: u64,
}

/// `cdp demo [--dir DIR]`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Directory for everything the demo makes; must be empty or absent [default: a new
    /// /tmp/cdp-demo.XXXXXX]. It is kept afterwards.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The API to talk to, resolved from flags, environment and the appliance directory.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The API's URL (or `host:port`).
    pub url: String,
    /// The bearer token.
    pub token: ApiToken,
}

/// Why no API endpoint could be worked out.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither an address nor an appliance directory was given.
    #[error(
        "no appliance given: pass --appliance-dir DIR, or --api URL with --token-file FILE \
         (or set CDP_API with CDP_TOKEN_FILE or CDP_TOKEN)"
    )]
    NoAppliance,
    /// An address but no token was given.
    #[error(
        "no api token given for {url}: pass --token-file FILE or --appliance-dir DIR, or set \
         CDP_TOKEN_FILE or CDP_TOKEN"
    )]
    NoToken {
        /// The address that was given.
        url: String,
    },
    /// The appliance's `api.addr` file could not be read.
    #[error("reading {path}: {source} (is the appliance running?)")]
    AddrFile {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The appliance's `api.addr` file does not hold a socket address.
    #[error("{path} does not hold a socket address such as 127.0.0.1:7444")]
    AddrMalformed {
        /// The file.
        path: PathBuf,
    },
    /// The token file could not be used.
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    /// `CDP_TOKEN` does not hold a token.
    #[error("{ENV_TOKEN}: {0}")]
    EnvToken(#[source] ParseTokenError),
    /// The API URL is not usable.
    #[error(transparent)]
    Url(ClientError),
    /// An environment variable is not UTF-8.
    #[error("{name} is not valid utf-8")]
    EnvNotUtf8 {
        /// The variable.
        name: &'static str,
    },
}

/// Why a `cdp` command that talks to the API did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No API endpoint could be worked out.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The API did not answer as asked.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// No job has that name, id or id prefix (`cdp status JOB`).
    #[error("no job is named {query:?} or has an id starting with it")]
    NoSuchJob {
        /// What was asked for.
        query: String,
    },
    /// More than one job matches (`cdp status JOB`).
    #[error("{query:?} matches {} jobs ({}); give more of the id", .matches.len(), .matches.join(", "))]
    Ambiguous {
        /// What was asked for.
        query: String,
        /// `name (short id)` of each match.
        matches: Vec<String>,
    },
    /// Writing the output failed (a closed pipe, a full disk).
    #[error("writing the output: {0}")]
    Output(#[source] io::Error),
}

impl CommandError {
    /// The process exit code for this error: [`EXIT_REFUSED`] when the appliance or the
    /// query said no, [`EXIT_ERROR`] otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Client(err) if err.is_refusal() => EXIT_REFUSED,
            Self::NoSuchJob { .. } | Self::Ambiguous { .. } => EXIT_REFUSED,
            _ => EXIT_ERROR,
        }
    }
}

impl ApiArgs {
    /// Works out the API's address and token. `env` looks up an environment variable
    /// (`|name| std::env::var_os(name)` in the binary).
    ///
    /// Address: `--api`, then `--appliance-dir`'s `api.addr`, then `CDP_API`, then
    /// `CDP_APPLIANCE_DIR`'s `api.addr`. Token: `--token-file`, then `--appliance-dir`'s
    /// `api-token`, then `CDP_TOKEN_FILE`, then `CDP_TOKEN`, then `CDP_APPLIANCE_DIR`'s
    /// `api-token`.
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<OsString>) -> Result<Endpoint, ConfigError> {
        let env_string = |name: &'static str| -> Result<Option<String>, ConfigError> {
            env(name)
                .map(|value| {
                    value
                        .into_string()
                        .map_err(|_| ConfigError::EnvNotUtf8 { name })
                })
                .transpose()
        };
        let env_path = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let env_dir = env_path(ENV_APPLIANCE_DIR);

        let url = match (&self.api, &self.appliance_dir) {
            (Some(url), _) => url.clone(),
            (None, Some(dir)) => read_api_addr(dir)?.to_string(),
            (None, None) => match (env_string(ENV_API)?.filter(|v| !v.is_empty()), &env_dir) {
                (Some(url), _) => url,
                (None, Some(dir)) => read_api_addr(dir)?.to_string(),
                (None, None) => return Err(ConfigError::NoAppliance),
            },
        };

        let token = if let Some(file) = &self.token_file {
            ApiToken::load(file)?
        } else if let Some(dir) = &self.appliance_dir {
            ApiToken::load(&dir.join(TOKEN_FILE_NAME))?
        } else if let Some(file) = env_path(ENV_TOKEN_FILE) {
            ApiToken::load(&file)?
        } else if let Some(text) = env_string(ENV_TOKEN)?.filter(|v| !v.is_empty()) {
            ApiToken::parse(&text).map_err(ConfigError::EnvToken)?
        } else if let Some(dir) = &env_dir {
            ApiToken::load(&dir.join(TOKEN_FILE_NAME))?
        } else {
            return Err(ConfigError::NoToken { url });
        };
        Ok(Endpoint { url, token })
    }
}

/// Reads `DIR/api.addr`: one line, the API's bound socket address.
pub fn read_api_addr(dir: &Path) -> Result<SocketAddr, ConfigError> {
    use std::io::Read;
    let path = dir.join(API_ADDR_FILE_NAME);
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|file| file.take(256).read_to_string(&mut text))
        .map_err(|source| ConfigError::AddrFile {
            path: path.clone(),
            source,
        })?;
    text.trim()
        .parse()
        .map_err(|_| ConfigError::AddrMalformed { path })
}

/// The client for the endpoint that `api` and the environment give.
fn connect(
    api: &ApiArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<ApiClient, CommandError> {
    let endpoint = api.resolve(env)?;
    Ok(ApiClient::new(&endpoint.url, endpoint.token).map_err(ConfigError::Url)?)
}

/// Writes a command's output and flushes it.
fn write_out(out: &mut dyn Write, text: &str) -> Result<(), CommandError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CommandError::Output)
}

/// `value` decoded as `T`; `value` is JSON the appliance sent.
fn decode<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, CommandError> {
    Ok(T::deserialize(value).map_err(|source| ClientError::Decode { source })?)
}

/// `cdp status`: resolves the endpoint, asks the API and writes the table, the detail or the
/// JSON to `out`.
pub async fn status(
    api: &ApiArgs,
    args: &StatusArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let client = connect(api, env)?;
    write_out(out, &status_text(&client, args).await?)
}

/// What `cdp status` prints, from the API behind `client`.
pub async fn status_text(client: &ApiClient, args: &StatusArgs) -> Result<String, CommandError> {
    // The raw JSON is kept so that `--json` passes on fields this cdp does not know; so in
    // every command below.
    let raw: serde_json::Value = client.get_json("/jobs").await?;
    let list: JobList = decode(&raw)?;
    match &args.job {
        None if args.json => Ok(pretty(&raw)),
        None => Ok(format::jobs_table(&list.jobs)),
        Some(query) => {
            let index = select_job(&list.jobs, query)?;
            if args.json {
                Ok(pretty(&raw["jobs"][index]))
            } else {
                Ok(format::job_detail(&list.jobs[index]))
            }
        }
    }
}

/// `cdp checkpoint`: asks for a checkpoint and writes what was made to `out`.
pub async fn checkpoint(
    api: &ApiArgs,
    args: &CheckpointArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let client = connect(api, env)?;
    write_out(out, &checkpoint_text(&client, args).await?)
}

/// What `cdp checkpoint` prints, from the API behind `client`. The job is passed as given:
/// the appliance resolves names, ids and id prefixes.
pub async fn checkpoint_text(
    client: &ApiClient,
    args: &CheckpointArgs,
) -> Result<String, CommandError> {
    let request = CreateCheckpoint {
        tags: args.tags.clone(),
        app_consistent: args.app_consistent,
    };
    let raw: serde_json::Value = client
        .post_json(
            &checkpoints_path(&args.job)?,
            &request,
            client.checkpoint_timeout(),
        )
        .await?;
    let made: CheckpointStatus = decode(&raw)?;
    if args.json {
        Ok(pretty(&raw))
    } else {
        Ok(format::checkpoint_made(&made))
    }
}

/// `cdp checkpoints`: writes a job's checkpoints to `out`.
pub async fn checkpoints(
    api: &ApiArgs,
    args: &CheckpointsArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let client = connect(api, env)?;
    write_out(out, &checkpoints_text(&client, args).await?)
}

/// What `cdp checkpoints` prints, from the API behind `client`.
pub async fn checkpoints_text(
    client: &ApiClient,
    args: &CheckpointsArgs,
) -> Result<String, CommandError> {
    let raw: serde_json::Value = client.get_json(&checkpoints_path(&args.job)?).await?;
    let list: CheckpointList = decode(&raw)?;
    if args.json {
        Ok(pretty(&raw))
    } else {
        Ok(format::checkpoints_table(&list.checkpoints))
    }
}

/// `cdp view create|list|delete`: does it and writes the result to `out`.
pub async fn view(
    api: &ApiArgs,
    command: &ViewCommand,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let client = connect(api, env)?;
    write_out(out, &view_text(&client, command).await?)
}

/// What `cdp view ...` prints, from the API behind `client`.
pub async fn view_text(client: &ApiClient, command: &ViewCommand) -> Result<String, CommandError> {
    match command {
        ViewCommand::Create(args) => {
            let request = CreateView {
                job: args.job.clone(),
                at: args.at.clone(),
                writable: args.writable,
            };
            let raw: serde_json::Value = client
                .post_json("/views", &request, client.request_timeout())
                .await?;
            let view: ViewStatus = decode(&raw)?;
            if args.json {
                Ok(pretty(&raw))
            } else {
                Ok(format::view_created(&view))
            }
        }
        ViewCommand::List(args) => {
            let raw: serde_json::Value = client.get_json("/views").await?;
            let list: ViewList = decode(&raw)?;
            if args.json {
                Ok(pretty(&raw))
            } else {
                Ok(format::views_table(&list.views))
            }
        }
        ViewCommand::Delete(args) => {
            client.delete_view(args.id).await?;
            Ok(format!("view {} deleted\n", args.id))
        }
    }
}

/// `cdp pause`: pauses the job and writes what it is now to `out`.
pub async fn pause(
    api: &ApiArgs,
    args: &LinkArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let change = LinkChange {
        paused: Some(true),
        ..LinkChange::default()
    };
    change_link(api, &args.job, change, args.json, env, out).await
}

/// `cdp resume`: resumes the job and writes what it is now to `out`.
pub async fn resume(
    api: &ApiArgs,
    args: &LinkArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let change = LinkChange {
        paused: Some(false),
        ..LinkChange::default()
    };
    change_link(api, &args.job, change, args.json, env, out).await
}

/// `cdp throttle`: sets or lifts the job's bandwidth limit and writes what it is now to
/// `out`.
pub async fn throttle(
    api: &ApiArgs,
    args: &ThrottleArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let change = LinkChange {
        throttle_bytes_per_second: Some(args.rate),
        ..LinkChange::default()
    };
    change_link(api, &args.job, change, args.json, env, out).await
}

async fn change_link(
    api: &ApiArgs,
    job: &str,
    change: LinkChange,
    json: bool,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), CommandError> {
    let client = connect(api, env)?;
    write_out(out, &link_text(&client, job, change, json).await?)
}

/// What `cdp pause`, `cdp resume` and `cdp throttle` print, from the API behind `client`:
/// one sentence, or with `json` the job's status after the change. The job is passed as
/// given: the appliance resolves names, ids and id prefixes.
pub async fn link_text(
    client: &ApiClient,
    job: &str,
    change: LinkChange,
    json: bool,
) -> Result<String, CommandError> {
    let raw: serde_json::Value = client
        .post_json(&link_path(job)?, &change, client.request_timeout())
        .await?;
    let status: JobStatus = decode(&raw)?;
    if json {
        Ok(pretty(&raw))
    } else {
        Ok(format::link_changed(&change, &status))
    }
}

fn pretty(value: &serde_json::Value) -> String {
    // Serialising a `Value` cannot fail: its map keys are strings.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// The index of the one job `query` names: an exact name first, then an exact id, then a
/// unique id prefix.
pub fn select_job(jobs: &[JobStatus], query: &str) -> Result<usize, CommandError> {
    let pick = |matches: Vec<usize>| -> Option<Result<usize, CommandError>> {
        match matches.as_slice() {
            [] => None,
            [one] => Some(Ok(*one)),
            _ => Some(Err(CommandError::Ambiguous {
                query: query.to_owned(),
                matches: matches
                    .iter()
                    .map(|&i| format!("{} ({})", jobs[i].name, format::short_id(&jobs[i].id)))
                    .collect(),
            })),
        }
    };
    let positions = |matches: &dyn Fn(&JobStatus) -> bool| -> Vec<usize> {
        (0..jobs.len()).filter(|&i| matches(&jobs[i])).collect()
    };
    if query.is_empty() {
        return Err(CommandError::NoSuchJob {
            query: query.to_owned(),
        });
    }
    pick(positions(&|job| job.name == query))
        .or_else(|| pick(positions(&|job| job.id == query)))
        .or_else(|| pick(positions(&|job| job.id.starts_with(query))))
        .unwrap_or_else(|| {
            Err(CommandError::NoSuchJob {
                query: query.to_owned(),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::{
        demo_checkpoints, nightly_view, two_jobs, FakeControl, ID_DB, ID_DEMO, TOKEN,
    };
    use crate::api::{router, serve};
    use hyper::StatusCode;
    use std::collections::HashMap;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    #[test]
    fn arguments_parse_before_and_after_the_subcommand() {
        let cli = Cli::try_parse_from(["cdp", "--appliance-dir", "/a", "status", "--json", "db"])
            .unwrap();
        assert_eq!(cli.api.appliance_dir.as_deref(), Some(Path::new("/a")));
        let Command::Status(args) = cli.command else {
            panic!("not status: {cli:?}");
        };
        assert!(args.json);
        assert_eq!(args.job.as_deref(), Some("db"));

        let cli =
            Cli::try_parse_from(["cdp", "status", "--api", "http://h:1", "--token-file", "/t"])
                .unwrap();
        assert_eq!(cli.api.api.as_deref(), Some("http://h:1"));
        assert_eq!(cli.api.token_file.as_deref(), Some(Path::new("/t")));

        let cli = Cli::try_parse_from(["cdp", "demo", "--dir", "/tmp/d"]).unwrap();
        let Command::Demo(args) = cli.command else {
            panic!("not demo: {cli:?}");
        };
        assert_eq!(args.dir.as_deref(), Some(Path::new("/tmp/d")));

        for bad in [
            vec!["cdp"],
            vec!["cdp", "status", "a", "b"],
            vec!["cdp", "frobnicate"],
            vec!["cdp", "status", "--token", "x"],
            vec!["cdp", "checkpoint", "demo"],
            vec!["cdp", "checkpoint", "--tag", "x"],
            vec!["cdp", "checkpoints"],
            vec!["cdp", "view"],
            vec!["cdp", "view", "create", "demo"],
            vec!["cdp", "view", "create", "--at", "latest"],
            vec!["cdp", "view", "delete", "x"],
            vec!["cdp", "view", "delete", "-1"],
            vec!["cdp", "view", "delete"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn checkpoint_and_view_arguments_parse() {
        let cli = Cli::try_parse_from([
            "cdp",
            "checkpoint",
            "demo",
            "--tag",
            "before upgrade",
            "--app-consistent",
            "--tag",
            "v2",
        ])
        .unwrap();
        let Command::Checkpoint(args) = cli.command else {
            panic!("not checkpoint: {cli:?}");
        };
        assert_eq!(
            (args.job.as_str(), args.tags, args.app_consistent, args.json),
            (
                "demo",
                vec!["before upgrade".to_owned(), "v2".to_owned()],
                true,
                false
            )
        );

        let cli = Cli::try_parse_from(["cdp", "checkpoints", "--json", "0123"]).unwrap();
        let Command::Checkpoints(args) = cli.command else {
            panic!("not checkpoints: {cli:?}");
        };
        assert_eq!((args.job.as_str(), args.json), ("0123", true));

        // The API flags reach into nested subcommands too.
        let cli = Cli::try_parse_from([
            "cdp",
            "view",
            "create",
            "db",
            "--at",
            "2025-06-01T12:00:00Z",
            "--writable",
            "--api",
            "http://h:1",
        ])
        .unwrap();
        assert_eq!(cli.api.api.as_deref(), Some("http://h:1"));
        let Command::View(ViewCommand::Create(args)) = cli.command else {
            panic!("not view create: {cli:?}");
        };
        assert_eq!(
            (
                args.job.as_str(),
                args.at.as_str(),
                args.writable,
                args.json
            ),
            ("db", "2025-06-01T12:00:00Z", true, false)
        );

        let cli = Cli::try_parse_from(["cdp", "view", "list", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::View(ViewCommand::List(ViewListArgs { json: true }))
        ));
        let cli = Cli::try_parse_from(["cdp", "view", "delete", "7"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::View(ViewCommand::Delete(ViewDeleteArgs { id: 7 }))
        ));
    }

    #[test]
    fn pause_resume_and_throttle_arguments_parse() {
        let cli = Cli::try_parse_from(["cdp", "pause", "erp-db"]).unwrap();
        let Command::Pause(args) = cli.command else {
            panic!("not pause: {cli:?}");
        };
        assert_eq!((args.job.as_str(), args.json), ("erp-db", false));
        let cli = Cli::try_parse_from(["cdp", "resume", "--json", "0123"]).unwrap();
        let Command::Resume(args) = cli.command else {
            panic!("not resume: {cli:?}");
        };
        assert_eq!((args.job.as_str(), args.json), ("0123", true));
        let cli = Cli::try_parse_from(["cdp", "throttle", "erp-db", "10M", "--json"]).unwrap();
        let Command::Throttle(args) = cli.command else {
            panic!("not throttle: {cli:?}");
        };
        assert_eq!(
            (args.job.as_str(), args.rate, args.json),
            ("erp-db", 10 << 20, true)
        );

        for bad in [
            vec!["cdp", "pause"],
            vec!["cdp", "pause", "a", "b"],
            vec!["cdp", "resume"],
            vec!["cdp", "throttle", "erp-db"],
            vec!["cdp", "throttle", "erp-db", "10M", "x"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
        // A bad rate says what a rate is.
        let err = Cli::try_parse_from(["cdp", "throttle", "erp-db", "10MB"]).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(
                "error: invalid value '10MB' for '<RATE>': expected bytes per second as a whole \
                 number with an optional suffix K, M or G (powers of 1024), e.g. 10M, or off \
                 for no limit"
            ),
            "{message}"
        );
    }

    #[test]
    fn rates_are_bytes_per_second_with_binary_suffixes() {
        let check = |text: &str, expected: Result<u64, ParseRateError>| {
            assert_eq!(parse_rate(text), expected, "{text:?}");
        };
        check("off", Ok(0));
        check("OFF", Ok(0));
        check("0", Ok(0));
        check("0M", Ok(0));
        check("1000", Ok(1000));
        check("512K", Ok(512 << 10));
        check("512k", Ok(512 << 10));
        check("10M", Ok(10 << 20));
        check("10m", Ok(10 << 20));
        check("2G", Ok(2 << 30));
        check("18446744073709551615", Ok(u64::MAX));
        for malformed in [
            "", "K", "M", "10MB", "10MiB", "1.5M", "-1", "+1", " 10M", "10 M", "10T", "none", "1e6",
        ] {
            check(malformed, Err(ParseRateError::Malformed));
        }
        check("18446744073709551616", Err(ParseRateError::TooLarge));
        check("17179869184G", Err(ParseRateError::TooLarge));
        assert_eq!(
            ParseRateError::TooLarge.to_string(),
            "too large: a rate is at most 18446744073709551615 bytes per second"
        );
    }

    #[test]
    fn status_help_explains_the_job_states() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("status")
            .unwrap()
            .render_help()
            .to_string();
        for state in [
            "syncing",
            "replicating",
            "ahead",
            "resyncing",
            "paused",
            "error",
        ] {
            assert!(help.contains(&format!("\n  {state} ")), "{state}: {help}");
        }
    }

    /// An appliance data directory as the running appliance leaves it.
    fn appliance_dir(addr: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(API_ADDR_FILE_NAME), format!("{addr}\n")).unwrap();
        ApiToken::parse(TOKEN)
            .unwrap()
            .save_new(&dir.path().join(TOKEN_FILE_NAME))
            .unwrap();
        dir
    }

    fn resolve(args: &ApiArgs, env: &[(&str, &str)]) -> Result<(String, String), String> {
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        args.resolve(&|name| env.get(name).cloned())
            .map(|e| (e.url, e.token.as_str().to_owned()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn endpoint_resolution_follows_the_documented_order() {
        let dir = appliance_dir("127.0.0.1:7444");
        let dir_path = dir.path().to_str().unwrap();
        let other = ApiToken::from_bytes(&[1; 32]);
        let other_file = dir.path().join("other-token");
        other.save_new(&other_file).unwrap();
        let other_path = other_file.to_str().unwrap();
        let ok = |url: &str, token: &str| Ok((url.to_owned(), token.to_owned()));
        let with_dir = ApiArgs {
            appliance_dir: Some(dir.path().to_owned()),
            ..ApiArgs::default()
        };

        // The appliance directory alone gives both.
        assert_eq!(resolve(&with_dir, &[]), ok("127.0.0.1:7444", TOKEN));
        assert_eq!(
            resolve(&ApiArgs::default(), &[(ENV_APPLIANCE_DIR, dir_path)]),
            ok("127.0.0.1:7444", TOKEN)
        );
        // Flags beat the directory; the directory (a flag) beats the environment.
        let args = ApiArgs {
            api: Some("http://elsewhere:1".to_owned()),
            token_file: Some(other_file.clone()),
            ..with_dir.clone()
        };
        assert_eq!(
            resolve(&args, &[(ENV_API, "http://env:2"), (ENV_TOKEN, TOKEN)]),
            ok("http://elsewhere:1", other.as_str())
        );
        assert_eq!(
            resolve(
                &with_dir,
                &[(ENV_API, "http://env:2"), (ENV_TOKEN_FILE, other_path)]
            ),
            ok("127.0.0.1:7444", TOKEN)
        );
        // Environment only: CDP_TOKEN_FILE beats CDP_TOKEN.
        assert_eq!(
            resolve(
                &ApiArgs::default(),
                &[
                    (ENV_API, "http://env:2"),
                    (ENV_TOKEN_FILE, other_path),
                    (ENV_TOKEN, TOKEN)
                ]
            ),
            ok("http://env:2", other.as_str())
        );
        assert_eq!(
            resolve(
                &ApiArgs::default(),
                &[(ENV_API, "http://env:2"), (ENV_TOKEN, TOKEN)]
            ),
            ok("http://env:2", TOKEN)
        );
    }

    #[test]
    fn endpoint_resolution_explains_what_is_missing() {
        let err = |args: &ApiArgs, env: &[(&str, &str)]| resolve(args, env).unwrap_err();
        assert_eq!(
            err(&ApiArgs::default(), &[(ENV_API, "")]),
            "no appliance given: pass --appliance-dir DIR, or --api URL with --token-file FILE \
             (or set CDP_API with CDP_TOKEN_FILE or CDP_TOKEN)"
        );
        let api_only = ApiArgs {
            api: Some("http://h:1".to_owned()),
            ..ApiArgs::default()
        };
        assert_eq!(
            err(&api_only, &[]),
            "no api token given for http://h:1: pass --token-file FILE or --appliance-dir DIR, \
             or set CDP_TOKEN_FILE or CDP_TOKEN"
        );
        assert_eq!(
            err(&api_only, &[(ENV_TOKEN, "abc")]),
            "CDP_TOKEN: a token is 64 lowercase hex digits; this one has 3 characters"
        );

        let empty = tempfile::tempdir().unwrap();
        let args = ApiArgs {
            appliance_dir: Some(empty.path().to_owned()),
            ..ApiArgs::default()
        };
        let message = err(&args, &[]);
        let addr_file = empty.path().join(API_ADDR_FILE_NAME);
        assert!(
            message.starts_with(&format!("reading {}: ", addr_file.display()))
                && message.ends_with("(is the appliance running?)"),
            "{message}"
        );
        fs::write(&addr_file, "not an address\n").unwrap();
        assert_eq!(
            err(&args, &[]),
            format!(
                "{} does not hold a socket address such as 127.0.0.1:7444",
                addr_file.display()
            )
        );

        let dir = appliance_dir("127.0.0.1:7444");
        let token_file = dir.path().join(TOKEN_FILE_NAME);
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o644)).unwrap();
        let args = ApiArgs {
            appliance_dir: Some(dir.path().to_owned()),
            ..ApiArgs::default()
        };
        assert_eq!(
            err(&args, &[]),
            format!(
                "{} has permissions 644; it must be readable by its owner only (chmod 600)",
                token_file.display()
            )
        );
    }

    #[test]
    fn jobs_are_selected_by_name_id_or_unique_prefix() {
        let mut jobs = two_jobs();
        let check = |jobs: &[JobStatus], query: &str, expected: Result<usize, &str>| {
            let got = select_job(jobs, query).map_err(|e| e.to_string());
            assert_eq!(got, expected.map_err(str::to_owned), "{query}");
        };
        check(&jobs, "demo", Ok(0));
        check(&jobs, "db", Ok(1));
        check(&jobs, ID_DB, Ok(1));
        check(&jobs, "0123", Ok(0));
        check(&jobs, "f", Ok(1));
        let none = "no job is named \"x\" or has an id starting with it";
        check(&jobs, "x", Err(none));
        check(
            &jobs,
            "",
            Err("no job is named \"\" or has an id starting with it"),
        );
        // A name that looks like a prefix wins over the prefix.
        jobs[0].name = "fed".to_owned();
        check(&jobs, "fed", Ok(0));
        jobs[0].id = format!("fe{}", &ID_DEMO[2..]);
        check(
            &jobs,
            "fe",
            Err("\"fe\" matches 2 jobs (fed (fe234567), db (fedcba98)); give more of the id"),
        );
        let err = select_job(&jobs, "fe").unwrap_err();
        assert_eq!(err.exit_code(), EXIT_REFUSED);
    }

    /// The fake appliance served on loopback, its data directory, and a function that stops
    /// it and returns once its listener is closed.
    async fn serve_fake() -> (tempfile::TempDir, impl std::future::Future<Output = ()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dir = appliance_dir(&listener.local_addr().unwrap().to_string());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(
            ApiToken::parse(TOKEN).unwrap(),
            Arc::new(FakeControl::new(two_jobs())),
        );
        let server = tokio::spawn(serve(listener, app, async move {
            let _ = stopped.await;
        }));
        let stop = async move {
            stop.send(()).unwrap();
            server.await.unwrap().unwrap();
        };
        (dir, stop)
    }

    async fn run_status(dir: &Path, json: bool, job: Option<&str>) -> Result<String, (u8, String)> {
        let api = ApiArgs {
            appliance_dir: Some(dir.to_owned()),
            ..ApiArgs::default()
        };
        let args = StatusArgs {
            json,
            job: job.map(str::to_owned),
        };
        let mut out = Vec::new();
        status(&api, &args, &|_| None, &mut out)
            .await
            .map(|()| String::from_utf8(out).unwrap())
            .map_err(|err| (err.exit_code(), err.to_string()))
    }

    #[tokio::test]
    async fn status_prints_table_detail_and_json() {
        let (dir, _server) = serve_fake().await;
        let table = run_status(dir.path(), false, None).await.unwrap();
        assert_eq!(table, format::jobs_table(&two_jobs()));
        let detail = run_status(dir.path(), false, Some("fedc")).await.unwrap();
        assert_eq!(detail, format::job_detail(&two_jobs()[1]));

        let json = run_status(dir.path(), true, None).await.unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["jobs"], serde_json::to_value(two_jobs()).unwrap());
        let json = run_status(dir.path(), true, Some("demo")).await.unwrap();
        let job: JobStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(job, two_jobs()[0]);
    }

    #[tokio::test]
    async fn status_exit_codes_tell_refusals_from_errors() {
        let (dir, stop) = serve_fake().await;
        assert_eq!(
            run_status(dir.path(), false, Some("nope"))
                .await
                .unwrap_err(),
            (
                EXIT_REFUSED,
                "no job is named \"nope\" or has an id starting with it".to_owned()
            )
        );

        // A wrong token: the appliance refuses.
        let wrong = tempfile::tempdir().unwrap();
        fs::copy(
            dir.path().join(API_ADDR_FILE_NAME),
            wrong.path().join(API_ADDR_FILE_NAME),
        )
        .unwrap();
        ApiToken::from_bytes(&[9; 32])
            .save_new(&wrong.path().join(TOKEN_FILE_NAME))
            .unwrap();
        assert_eq!(
            run_status(wrong.path(), false, None).await.unwrap_err(),
            (
                EXIT_REFUSED,
                "the appliance refused the request (401 Unauthorized): invalid token".to_owned()
            )
        );

        // The appliance gone: an error, not a refusal.
        stop.await;
        let (code, message) = run_status(dir.path(), false, None).await.unwrap_err();
        assert_eq!(code, EXIT_ERROR, "{message}");
        assert!(
            message.starts_with("cannot connect to the appliance api at 127.0.0.1:"),
            "{message}"
        );
    }

    /// Runs `cdp --appliance-dir DIR ARGS...` as the binary does (parse, then the command)
    /// with an empty environment: what it prints, or its exit code and message.
    async fn run(dir: &Path, args: &[&str]) -> Result<String, (u8, String)> {
        let dir = dir.to_str().unwrap();
        let argv = [["cdp", "--appliance-dir", dir].as_slice(), args].concat();
        let cli = Cli::try_parse_from(argv).unwrap();
        let env = |_: &str| None;
        let mut out = Vec::new();
        let done = match &cli.command {
            Command::Status(args) => status(&cli.api, args, &env, &mut out).await,
            Command::Checkpoint(args) => checkpoint(&cli.api, args, &env, &mut out).await,
            Command::Checkpoints(args) => checkpoints(&cli.api, args, &env, &mut out).await,
            Command::View(command) => view(&cli.api, command, &env, &mut out).await,
            Command::Pause(args) => pause(&cli.api, args, &env, &mut out).await,
            Command::Resume(args) => resume(&cli.api, args, &env, &mut out).await,
            Command::Throttle(args) => throttle(&cli.api, args, &env, &mut out).await,
            Command::Demo(_) => panic!("the demo is tested in demo::tests"),
        };
        done.map(|()| String::from_utf8(out).unwrap())
            .map_err(|err| (err.exit_code(), err.to_string()))
    }

    fn refused(status: &str, message: &str) -> Result<String, (u8, String)> {
        Err((
            EXIT_REFUSED,
            format!("the appliance refused the request ({status}): {message}"),
        ))
    }

    #[tokio::test]
    async fn checkpoints_are_made_and_listed() {
        let (dir, _server) = serve_fake().await;
        let dir = dir.path();
        assert_eq!(
            run(dir, &["checkpoints", "demo"]).await.unwrap(),
            format::checkpoints_table(&demo_checkpoints())
        );
        assert_eq!(
            run(
                dir,
                &[
                    "checkpoint",
                    "demo",
                    "--tag",
                    "before-upgrade",
                    "--tag",
                    "v2",
                    "--app-consistent"
                ]
            )
            .await
            .unwrap(),
            "checkpoint seq 1241 at 2025-06-01T12:00:01.000000Z (tags before-upgrade v2, \
             application-consistent)\n"
        );
        let json = run(dir, &["checkpoint", ID_DEMO, "--tag", "x", "--json"])
            .await
            .unwrap();
        let made: CheckpointStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (made.seq, made.app_consistent, made.tags),
            (1_242, false, vec!["x".to_owned()])
        );
        let json = run(dir, &["checkpoints", "--json", "demo"]).await.unwrap();
        let list: CheckpointList = serde_json::from_str(&json).unwrap();
        let seqs: Vec<u64> = list.checkpoints.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, [1_000, 1_100, 1_241, 1_242]);
        assert_eq!(
            run(dir, &["checkpoints", "db"]).await.unwrap(),
            "no checkpoints\n"
        );
    }

    #[tokio::test]
    async fn checkpoint_refusals_exit_1() {
        let (dir, _server) = serve_fake().await;
        let dir = dir.path();
        assert_eq!(
            run(dir, &["checkpoint", "db", "--tag", "x"]).await,
            refused("409 Conflict", "the agent is not connected")
        );
        let no_job = refused("404 Not Found", "no such job");
        assert_eq!(run(dir, &["checkpoints", "nope"]).await, no_job);
        // Sent as typed, percent-encoded: the appliance looks for this name, rather than
        // the router seeing another path.
        assert_eq!(run(dir, &["checkpoints", "../x/y z?"]).await, no_job);
        assert_eq!(run(dir, &["checkpoints", ".."]).await, no_job);
        assert_eq!(run(dir, &["checkpoints", ""]).await, no_job);
    }

    #[tokio::test]
    async fn jobs_are_paused_throttled_and_resumed() {
        let (dir, stop) = serve_fake().await;
        let path = dir.path();
        assert_eq!(
            run(path, &["pause", "demo"]).await.unwrap(),
            "job demo paused\n"
        );
        // By id: the sentence names the job.
        assert_eq!(
            run(path, &["throttle", ID_DEMO, "10M"]).await.unwrap(),
            "job demo: throttle 10 MiB/s\n"
        );
        let mut demo = two_jobs()[0].clone();
        demo.paused = true;
        demo.throttle_bytes_per_second = 10 << 20;
        assert_eq!(
            run(path, &["status"]).await.unwrap(),
            format::jobs_table(&[demo.clone(), two_jobs()[1].clone()])
        );
        let table = run(path, &["status"]).await.unwrap();
        assert!(
            table.contains("  replicating, paused, throttle 10 MiB/s  async  "),
            "{table}"
        );
        let detail = run(path, &["status", "demo"]).await.unwrap();
        assert!(
            detail.contains("\npaused          yes\nthrottle        10 MiB/s\n"),
            "{detail}"
        );
        assert_eq!(
            run(path, &["throttle", "demo", "off"]).await.unwrap(),
            "job demo: no throttle\n"
        );
        let json = run(path, &["resume", "demo", "--json"]).await.unwrap();
        let resumed: JobStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(resumed, two_jobs()[0]);
        assert_eq!(
            run(path, &["resume", "demo"]).await.unwrap(),
            "job demo resumed\n"
        );

        let no_job = refused("404 Not Found", "no such job");
        assert_eq!(run(path, &["pause", "nope"]).await, no_job);
        assert_eq!(run(path, &["throttle", "../x", "1M"]).await, no_job);
        assert_eq!(run(path, &["resume", ""]).await, no_job);
        stop.await;
        let (code, message) = run(path, &["pause", "demo"]).await.unwrap_err();
        assert_eq!(code, EXIT_ERROR, "{message}");
    }

    #[tokio::test]
    async fn views_are_created_listed_and_deleted() {
        let (dir, _server) = serve_fake().await;
        let dir = dir.path();
        assert_eq!(run(dir, &["view", "list"]).await.unwrap(), "no views\n");
        assert_eq!(
            run(dir, &["view", "create", "demo", "--at", "tag:nightly"])
                .await
                .unwrap(),
            format::view_created(&nightly_view())
        );
        let json = run(
            dir,
            &[
                "view",
                "create",
                "db",
                "--at",
                "latest",
                "--writable",
                "--json",
            ],
        )
        .await
        .unwrap();
        let db: ViewStatus = serde_json::from_str(&json).unwrap();
        assert_eq!((db.id, db.seq, db.writable), (2, 77, true));
        assert_eq!(
            run(dir, &["view", "list"]).await.unwrap(),
            format::views_table(&[nightly_view(), db.clone()])
        );
        let json = run(dir, &["view", "list", "--json"]).await.unwrap();
        let list: ViewList = serde_json::from_str(&json).unwrap();
        assert_eq!(list.views, [nightly_view(), db.clone()]);

        assert_eq!(
            run(dir, &["view", "delete", "1"]).await.unwrap(),
            "view 1 deleted\n"
        );
        let no_view = refused("404 Not Found", "no such view");
        assert_eq!(run(dir, &["view", "delete", "1"]).await, no_view);
        assert_eq!(
            run(dir, &["view", "list"]).await.unwrap(),
            format::views_table(&[db])
        );
    }

    #[tokio::test]
    async fn view_refusals_exit_1_and_failures_exit_2() {
        let (dir, stop) = serve_fake().await;
        let path = dir.path();
        for (at, expected) in [
            (
                "seq:5",
                refused("409 Conflict", "seq 5 is no longer in the history"),
            ),
            (
                "yesterday",
                refused("400 Bad Request", "\"yesterday\" is not a point"),
            ),
            (
                "tag:weekly",
                refused("404 Not Found", "no checkpoint matches \"tag:weekly\""),
            ),
        ] {
            assert_eq!(
                run(path, &["view", "create", "demo", "--at", at]).await,
                expected,
                "{at}"
            );
        }
        // The appliance failing is an error, not a refusal.
        let failed = CommandError::Client(ClientError::Server {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the checkpoint was not confirmed within 45 s".to_owned(),
        });
        assert_eq!(failed.exit_code(), EXIT_ERROR);
        stop.await;
        for args in [
            &["view", "list"][..],
            &["view", "delete", "1"],
            &["checkpoint", "demo", "--tag", "x"],
        ] {
            let (code, message) = run(path, args).await.unwrap_err();
            assert_eq!(code, EXIT_ERROR, "{args:?}: {message}");
            assert!(
                message.starts_with("cannot connect to the appliance api at 127.0.0.1:"),
                "{message}"
            );
        }
    }
}
