//! The command line of `cdp-receiver`: `init`, `pair` and `run`. Parsing and the small
//! library calls behind `init` and `pair`; `main.rs` acts on the result.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;
use transport::{DataDir, PairingBundle, PeerName, SystemClock, PAIRING_TTL_DEFAULT};

use crate::appliance::{ApplianceConfig, QUIC_ADDR_FILE};

/// cdp-receiver: the DR appliance that lands agents' journals and keeps replica disks.
#[derive(Debug, Parser)]
#[command(name = "cdp-receiver", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the data directory, the appliance's identity and its API token.
    Init(InitArgs),
    /// Print a one-time pairing bundle for an agent (`cdp-agent pair --bundle FILE`).
    Pair(PairArgs),
    /// Serve agents, the REST API and metrics until SIGINT or SIGTERM.
    Run(RunArgs),
}

/// `cdp-receiver init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
}

/// `cdp-receiver pair`.
#[derive(Debug, Args)]
pub struct PairArgs {
    /// Data directory of the appliance (which must be running to serve the pairing).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Address the agent dials, IP:PORT; repeatable. Default: the address the running
    /// appliance listens on (DIR/quic.addr), unless that is a wildcard address.
    #[arg(long = "address", value_name = "ADDR")]
    pub addresses: Vec<SocketAddr>,
    /// How long the bundle stays valid: 30s, 15m, 2h (at most 24h).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    pub expires: Duration,
    /// The name the agent will know the appliance by.
    #[arg(long, value_name = "NAME", default_value = "appliance")]
    pub name: String,
}

/// `cdp-receiver run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Data directory (made by `cdp-receiver init`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// QUIC listener for agents, IP:PORT (port 0 picks one).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// REST API listener, IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,
    /// /metrics listener, IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// NBD listener for recovery views, IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub view_listen: Option<SocketAddr>,
    /// How far back every job's history reaches: 30m, 24h, up to 720h (30 days).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub history_window: Duration,
    /// Interval between automatic checkpoints.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// How often retention runs over every job.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub retention_interval: Duration,
    /// Warn when a job's history grows beyond this many bytes (0: never).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub history_bytes_max: u64,
}

impl RunArgs {
    /// The appliance configuration these flags describe.
    pub fn into_config(self) -> ApplianceConfig {
        let mut config = ApplianceConfig::new(self.data_dir, self.listen);
        config.api_listen = self.api_listen;
        config.metrics_listen = self.metrics_listen;
        config.view_listen = self.view_listen;
        config.retention.window = self.history_window;
        config.retention.history_bytes_max = self.history_bytes_max;
        config.checkpoint_interval = self.checkpoint_interval;
        config.retention_interval = self.retention_interval;
        config
    }
}

/// Parses `30s`, `15m`, `2h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 15m or 2h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{text:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

/// Why a bundle could not be made.
#[derive(Debug, Error)]
pub enum PairCommandError {
    /// No address was given and the running appliance's could not be used.
    #[error("{0}")]
    Address(String),
    /// The name is not a valid peer name.
    #[error("--name: {0}")]
    Name(String),
    /// The identity could not be loaded.
    #[error("identity in {dir}: {message}")]
    Identity {
        /// The data directory.
        dir: PathBuf,
        /// The error.
        message: String,
    },
    /// The bundle could not be created.
    #[error("{0}")]
    Bundle(String),
}

/// Makes a pairing bundle for the appliance in `data_dir` (`cdp-receiver pair`) and returns
/// it as text.
pub fn pair(args: &PairArgs) -> Result<String, PairCommandError> {
    let name = PeerName::new(&args.name).map_err(|e| PairCommandError::Name(e.to_string()))?;
    let addrs = if args.addresses.is_empty() {
        vec![running_address(&args.data_dir)?]
    } else {
        args.addresses.clone()
    };
    let data = DataDir::new(&args.data_dir);
    if !data.identity_dir().join(transport::KEY_FILE).exists() {
        return Err(PairCommandError::Identity {
            dir: args.data_dir.clone(),
            message: "no identity: run `cdp-receiver init` first".into(),
        });
    }
    let identity = data.identity().map_err(|e| PairCommandError::Identity {
        dir: args.data_dir.clone(),
        message: e.to_string(),
    })?;
    let bundle = PairingBundle::create(
        &identity,
        name,
        addrs,
        args.expires,
        &data.pending_tokens(),
        &SystemClock,
    )
    .map_err(|e| PairCommandError::Bundle(e.to_string()))?;
    Ok(bundle.encode())
}

/// The address the running appliance recorded, refused if agents cannot dial it.
fn running_address(data_dir: &Path) -> Result<SocketAddr, PairCommandError> {
    let path = data_dir.join(QUIC_ADDR_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        PairCommandError::Address(format!(
            "{}: {e}; start `cdp-receiver run` first, or give --address ADDR",
            path.display()
        ))
    })?;
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        PairCommandError::Address(format!(
            "{}: {:?} is not an address",
            path.display(),
            text.trim()
        ))
    })?;
    if addr.ip().is_unspecified() {
        return Err(PairCommandError::Address(format!(
            "the appliance listens on {addr}, which agents cannot dial: give --address with an address of this host"
        )));
    }
    Ok(addr)
}

/// Default bundle validity, for help texts.
pub const EXPIRES_DEFAULT: Duration = PAIRING_TTL_DEFAULT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, seconds) in [("30s", 30), ("15m", 900), ("2h", 7200), ("45", 45)] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(seconds)),
                "{text}"
            );
        }
        for bad in ["", "m", "5d", "-1s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pairing_needs_a_dialable_address() {
        let dir = tempfile::tempdir().unwrap();
        let args = |addresses: Vec<SocketAddr>| PairArgs {
            data_dir: dir.path().to_owned(),
            addresses,
            expires: Duration::from_secs(60),
            name: "dr-site".into(),
        };
        let err = pair(&args(vec![])).unwrap_err().to_string();
        assert!(err.contains("start `cdp-receiver run` first"), "{err}");
        std::fs::write(dir.path().join(QUIC_ADDR_FILE), "0.0.0.0:7443\n").unwrap();
        let err = pair(&args(vec![])).unwrap_err().to_string();
        assert!(err.contains("agents cannot dial"), "{err}");
        std::fs::write(dir.path().join(QUIC_ADDR_FILE), "127.0.0.1:7443\n").unwrap();
        let err = pair(&args(vec![])).unwrap_err().to_string();
        assert!(err.contains("run `cdp-receiver init` first"), "{err}");
        crate::appliance::init(dir.path()).unwrap();
        let bundle = pair(&args(vec![])).unwrap();
        let decoded = PairingBundle::decode(bundle.as_bytes()).unwrap();
        assert_eq!(
            decoded.addrs,
            vec!["127.0.0.1:7443".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(decoded.appliance.as_str(), "dr-site");
    }
}
