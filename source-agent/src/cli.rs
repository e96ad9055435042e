//! The command line of `cdp-agent`: `run` (from a TOML file or quick flags, two spellings of
//! one [`AgentConfig`]) and `replay`. Parsing only; `main.rs` acts on the result.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_disk_flag, AgentConfig, ConfigError, DiskConfig};

/// cdp-agent: serves protected disks over NBD and journals every write.
#[derive(Debug, Parser)]
#[command(name = "cdp-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the configured disks until SIGINT or SIGTERM.
    Run(Box<RunArgs>),
    /// Rebuild a disk's image from the journal.
    Replay(ReplayArgs),
    /// Pair with an appliance using the bundle `cdp-receiver pair` printed.
    Pair(PairArgs),
}

/// `cdp-agent pair`.
#[derive(Debug, Args)]
pub struct PairArgs {
    /// The agent's data directory (its identity and trust store are kept here).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The bundle file `cdp-receiver pair` printed.
    #[arg(long, value_name = "FILE")]
    pub bundle: PathBuf,
    /// The name the appliance will know this agent by (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

/// `cdp-agent run`: either `--config FILE` or the quick flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (see docs/agent.md); excludes the other flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data_dir", "nbd_listen", "nbd_socket", "disk", "metrics_listen", "filters", "target", "mode", "job_name", "checkpoint_hook", "backlog_bytes_max", "backlog_age_max_secs", "throttle", "congestion"])]
    pub config: Option<PathBuf>,
    /// Data directory (journal and disk table).
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    pub data_dir: Option<PathBuf>,
    /// NBD TCP listener, IP:PORT (port 0 picks one); repeatable.
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Vec<SocketAddr>,
    /// NBD Unix-socket listener; repeatable.
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Vec<PathBuf>,
    /// A disk to protect, NAME=PATH (raw image file or block device); repeatable.
    #[arg(long, value_name = "NAME=PATH")]
    pub disk: Vec<String>,
    /// Serve /metrics on IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Filter chain of every disk, comma-separated (default stats,journal).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub filters: Option<Vec<String>>,
    /// Ship the journal to this paired appliance, IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub target: Option<SocketAddr>,
    /// Replication mode: async (default) or sync.
    #[arg(long, value_name = "MODE", requires = "target")]
    pub mode: Option<String>,
    /// The job's name as the appliance shows it.
    #[arg(long, value_name = "NAME", requires = "target")]
    pub job_name: Option<String>,
    /// Run as `HOOK freeze` / `HOOK thaw` around application-consistent checkpoints.
    #[arg(long, value_name = "HOOK", requires = "target")]
    pub checkpoint_hook: Option<PathBuf>,
    /// Unacknowledged journal bytes past which the job goes `ahead` (tracks dirty regions
    /// instead of journalling) [default: 1 GiB].
    #[arg(long, value_name = "BYTES", requires = "target")]
    pub backlog_bytes_max: Option<u64>,
    /// Age in seconds of the oldest unacknowledged write past which the job goes `ahead`
    /// [default: 600].
    #[arg(long, value_name = "SECONDS", requires = "target")]
    pub backlog_age_max_secs: Option<u64>,
    /// Stored bytes per second the agent ships, at most [default: no limit].
    #[arg(long, value_name = "BYTES_PER_SECOND", requires = "target")]
    pub throttle: Option<u64>,
    /// Congestion control of the link: cubic (default) or bbr (lossy WAN links).
    #[arg(long, value_name = "NAME", requires = "target")]
    pub congestion: Option<String>,
}

impl RunArgs {
    /// The configuration these arguments describe (read from the file, or built from the
    /// flags with every other setting at its default).
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        if let Some(path) = &self.config {
            return AgentConfig::from_file(path);
        }
        let mut config = AgentConfig::new(self.data_dir.unwrap_or_default());
        config.nbd_listen = self.nbd_listen;
        config.nbd_socket = self.nbd_socket;
        config.metrics_listen = self.metrics_listen;
        if let Some(filters) = self.filters {
            config.filters = filters;
        }
        if let Some(target) = self.target {
            let mut replication = crate::config::ReplicationSettings::new(target);
            if let Some(mode) = self.mode {
                replication.mode = mode;
            }
            replication.job_name = self.job_name;
            replication.checkpoint_hook = self.checkpoint_hook;
            if let Some(bytes) = self.backlog_bytes_max {
                replication.backlog_bytes_max = bytes;
            }
            if let Some(secs) = self.backlog_age_max_secs {
                replication.backlog_age_max_secs = secs;
            }
            if let Some(rate) = self.throttle {
                replication.throttle_bytes_per_second = rate;
            }
            if let Some(congestion) = self.congestion {
                replication.congestion = congestion;
            }
            config.replication = Some(replication);
        }
        for flag in &self.disk {
            let (name, path) = parse_disk_flag(flag)?;
            config.disks.push(DiskConfig {
                name,
                path,
                filters: None,
                block_size_min: 512,
            });
        }
        Ok(config)
    }
}

/// `cdp-agent replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The agent's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// NAME=OUT: rebuild disk NAME into the file OUT.
    #[arg(long, value_name = "NAME=OUT")]
    pub disk: String,
    /// Start from a copy of this image instead of zeroes.
    #[arg(long, value_name = "IMAGE")]
    pub base: Option<PathBuf>,
}

/// Why `cdp-agent pair` failed.
#[derive(Debug, thiserror::Error)]
pub enum PairCommandError {
    /// The bundle file could not be read.
    #[error("reading the bundle {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Anything else: the bundle, the name, the identity, the exchange.
    #[error("{0}")]
    Pair(String),
}

/// Pairs the agent in `args.data_dir` with the appliance the bundle names: the
/// appliance's certificate is pinned in `DIR/trust`, the agent's in the appliance's. Returns
/// the appliance's name and addresses for the operator.
pub async fn pair(args: &PairArgs) -> Result<transport::PinnedPeer, PairCommandError> {
    let text = std::fs::read(&args.bundle).map_err(|source| PairCommandError::Read {
        path: args.bundle.clone(),
        source,
    })?;
    let bundle = transport::PairingBundle::decode(&text)
        .map_err(|e| PairCommandError::Pair(e.to_string()))?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => host_name(),
    };
    let name = transport::PeerName::new(&name)
        .map_err(|e| PairCommandError::Pair(format!("--name {name:?}: {e}")))?;
    transport::fsutil::create_private_dir(&args.data_dir)
        .map_err(|e| PairCommandError::Pair(format!("{}: {e}", args.data_dir.display())))?;
    let data = transport::DataDir::new(&args.data_dir);
    let identity = data
        .identity()
        .map_err(|e| PairCommandError::Pair(format!("identity: {e}")))?;
    let trust = data
        .trust_store()
        .map_err(|e| PairCommandError::Pair(format!("trust store: {e}")))?;
    transport::pair_agent(&bundle, &identity, &name, &trust, &transport::SystemClock)
        .await
        .map_err(|e| PairCommandError::Pair(e.to_string()))
}

/// This host's name as a peer name (letters, digits, `.`, `_`, `-`), or `agent`.
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        "agent".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> Result<AgentConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.kind().to_string())?;
        match cli.command {
            Command::Run(run) => run.into_config().map_err(|e| e.to_string()),
            Command::Replay(_) | Command::Pair(_) => Err("not run".into()),
        }
    }

    #[test]
    fn flags_and_file_are_the_same_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "data_dir = \"/var/lib/cdp\"\nnbd_listen = [\"127.0.0.1:0\"]\nnbd_socket = [\"/run/a.sock\"]\n\
             metrics_listen = \"127.0.0.1:9187\"\nfilters = [\"journal\"]\n\
             [[disk]]\nname = \"vm1\"\npath = \"/img/vm1\"\n",
        )
        .unwrap();
        let from_file =
            run_config(&["cdp-agent", "run", "--config", file.to_str().unwrap()]).unwrap();
        let from_flags = run_config(&[
            "cdp-agent",
            "run",
            "--data-dir",
            "/var/lib/cdp",
            "--nbd-listen",
            "127.0.0.1:0",
            "--nbd-socket",
            "/run/a.sock",
            "--metrics-listen",
            "127.0.0.1:9187",
            "--filters",
            "journal",
            "--disk",
            "vm1=/img/vm1",
        ])
        .unwrap();
        assert_eq!(from_file, from_flags);
    }

    #[test]
    fn bad_command_lines() {
        assert_eq!(
            run_config(&["cdp-agent", "run", "--config", "a.toml", "--disk", "x=y"]).unwrap_err(),
            "an argument cannot be used with one or more of the other specified arguments"
        );
        assert_eq!(
            run_config(&["cdp-agent", "run", "--disk", "x=y"]).unwrap_err(),
            "one or more required arguments were not provided"
        );
        assert_eq!(
            run_config(&["cdp-agent", "run", "--data-dir", "d", "--disk", "x"]).unwrap_err(),
            "--disk \"x\": expected NAME=PATH"
        );
        assert!(run_config(&[
            "cdp-agent",
            "run",
            "--data-dir",
            "d",
            "--nbd-listen",
            "localhost"
        ])
        .is_err());
    }
}
