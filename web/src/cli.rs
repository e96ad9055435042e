//! The `cdp` command line: its arguments (clap), where to find the appliance and its token,
//! and `cdp status`. `cdp demo` lives in [`crate::demo`]; `src/bin/cdp.rs` only wires these
//! together.
//!
//! Must never take a token on the command line (other users see it in `ps`), and never read
//! the process environment directly: the caller passes a lookup, so tests choose it.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::api::JobStatus;
use crate::client::{ApiClient, ClientError};
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
    about = "The command-line client of a cdp appliance: job status, and a demo on loopback",
    after_help = "Exit codes: 0 ok, 1 refused (bad token, no such job), 2 error."
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
    Status(StatusArgs),
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

/// Why `cdp status` did not show what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No API endpoint could be worked out.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The API did not answer as asked.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// No job has that name, id or id prefix.
    #[error("no job is named {query:?} or has an id starting with it")]
    NoSuchJob {
        /// What was asked for.
        query: String,
    },
    /// More than one job matches.
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

impl StatusError {
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

/// `cdp status`: resolves the endpoint, asks the API and writes the table, the detail or the
/// JSON to `out`.
pub async fn status(
    api: &ApiArgs,
    args: &StatusArgs,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
) -> Result<(), StatusError> {
    let endpoint = api.resolve(env)?;
    let client = ApiClient::new(&endpoint.url, endpoint.token).map_err(ConfigError::Url)?;
    let text = status_text(&client, args).await?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(StatusError::Output)
}

/// What `cdp status` prints, from the API behind `client`.
pub async fn status_text(client: &ApiClient, args: &StatusArgs) -> Result<String, StatusError> {
    // The raw JSON is kept so that `--json` passes on fields this cdp does not know.
    let raw: serde_json::Value = client.get_json("/jobs").await?;
    let list: crate::api::JobList =
        serde_json::from_value(raw.clone()).map_err(|source| ClientError::Decode { source })?;
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

fn pretty(value: &serde_json::Value) -> String {
    // Serialising a `Value` cannot fail: its map keys are strings.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// The index of the one job `query` names: an exact name first, then an exact id, then a
/// unique id prefix.
pub fn select_job(jobs: &[JobStatus], query: &str) -> Result<usize, StatusError> {
    let pick = |matches: Vec<usize>| -> Option<Result<usize, StatusError>> {
        match matches.as_slice() {
            [] => None,
            [one] => Some(Ok(*one)),
            _ => Some(Err(StatusError::Ambiguous {
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
        return Err(StatusError::NoSuchJob {
            query: query.to_owned(),
        });
    }
    pick(positions(&|job| job.name == query))
        .or_else(|| pick(positions(&|job| job.id == query)))
        .or_else(|| pick(positions(&|job| job.id.starts_with(query))))
        .unwrap_or_else(|| {
            Err(StatusError::NoSuchJob {
                query: query.to_owned(),
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::{two_jobs, FakeControl, ID_DB, ID_DEMO, TOKEN};
    use crate::api::{router, serve};
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
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
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
            Arc::new(FakeControl(two_jobs())),
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
}
