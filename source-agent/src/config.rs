//! The agent's configuration: one struct read from TOML (`run --config agent.toml`) or built
//! from the quick flags (`run --data-dir ... --disk NAME=PATH ...`), and its validation into
//! the form the agent runs from. Validation is the only place that decides whether a
//! configuration is acceptable; nothing here touches a disk or a socket.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use nbd_server::ServerLimits;
use serde::Deserialize;
use thiserror::Error;

use crate::filter::{parse_chain, ChainError, FilterKind};

/// Largest `READ`/`WRITE` the agent accepts by default, in bytes (the protocol's portable
/// maximum, 32 MiB).
pub const REQUEST_BYTES_MAX_DEFAULT: u32 = 32 << 20;

/// The whole configuration of one agent (one job: all its disks share one journal).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Data directory: `journal/` and `disks.toml` live here.
    pub data_dir: PathBuf,
    /// TCP listeners for NBD (`IP:PORT`; port 0 picks a free port).
    #[serde(default)]
    pub nbd_listen: Vec<SocketAddr>,
    /// Unix-socket listeners for NBD.
    #[serde(default)]
    pub nbd_socket: Vec<PathBuf>,
    /// Where `/metrics` is served (`IP:PORT`), if anywhere.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Filter chain of every disk that does not name its own.
    #[serde(default = "default_filters")]
    pub filters: Vec<String>,
    /// The protected disks.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Bounds on what clients may make the agent hold.
    #[serde(default)]
    pub limits: Limits,
    /// Journal settings.
    #[serde(default)]
    pub journal: JournalSettings,
    /// Where and how the journal is shipped; absent: the agent only journals.
    #[serde(default)]
    pub replication: Option<ReplicationSettings>,
}

/// Shipping the journal to a paired appliance (`[replication]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSettings {
    /// The appliance's QUIC address (`IP:PORT`). The appliance must be paired
    /// (`cdp-agent pair`): its certificate is checked against the pinned one.
    pub target: SocketAddr,
    /// `async` (default): a write is acknowledged once it is in the local journal. `sync`:
    /// only once the appliance holds it durably (RPO 0), see `sync_ack_timeout_ms`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// The job's name, shown by the appliance (default: the agent's data directory name).
    #[serde(default)]
    pub job_name: Option<String>,
    /// In sync mode, how long a write waits for the appliance's ack before the job falls
    /// back to async (the write is then acknowledged; sync resumes once the appliance has
    /// caught up), in milliseconds.
    #[serde(default = "default_sync_ack_timeout_ms")]
    pub sync_ack_timeout_ms: u64,
    /// Stored bytes shipped but not yet acknowledged, at most.
    #[serde(default = "default_inflight_bytes_max")]
    pub inflight_bytes_max: u64,
    /// Stored bytes per batch, at most.
    #[serde(default = "default_batch_bytes_max")]
    pub batch_bytes_max: u64,
    /// Run as `HOOK freeze` before and `HOOK thaw` after an application-consistent
    /// checkpoint (for example a script calling a guest agent's fsfreeze); the checkpoint is
    /// marked application-consistent only if `freeze` exits 0.
    #[serde(default)]
    pub checkpoint_hook: Option<PathBuf>,
    /// Stored journal bytes not yet acknowledged by the appliance, at most: past it the job
    /// goes `ahead` (writes are no longer journalled, their regions are marked dirty and
    /// resynced later).
    #[serde(default = "default_backlog_bytes_max")]
    pub backlog_bytes_max: u64,
    /// Age of the oldest write not yet acknowledged, at most, in seconds: past it the job
    /// goes `ahead` too.
    #[serde(default = "default_backlog_age_max_secs")]
    pub backlog_age_max_secs: u64,
    /// Stored record bytes per second this agent ships, at most (0: no limit). The appliance
    /// can set a lower limit per job at run time (`cdp throttle`).
    #[serde(default)]
    pub throttle_bytes_per_second: u64,
    /// Congestion control of the link: `cubic` (default) or `bbr` (for lossy WAN links:
    /// CUBIC's rate falls far below the link's capacity there; quinn marks its BBR
    /// experimental).
    #[serde(default = "default_congestion")]
    pub congestion: String,
}

impl ReplicationSettings {
    /// Settings for `target` with every default.
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            mode: default_mode(),
            job_name: None,
            sync_ack_timeout_ms: default_sync_ack_timeout_ms(),
            inflight_bytes_max: default_inflight_bytes_max(),
            batch_bytes_max: default_batch_bytes_max(),
            checkpoint_hook: None,
            backlog_bytes_max: default_backlog_bytes_max(),
            backlog_age_max_secs: default_backlog_age_max_secs(),
            throttle_bytes_per_second: 0,
            congestion: default_congestion(),
        }
    }

    /// The congestion controller, checked.
    pub fn congestion(&self) -> Result<transport::Congestion, ConfigError> {
        transport::Congestion::parse(&self.congestion)
            .ok_or_else(|| ConfigError::Congestion(self.congestion.clone()))
    }

    /// The replication mode, checked.
    pub fn mode(&self) -> Result<journal::wire::Mode, ConfigError> {
        match self.mode.as_str() {
            "async" => Ok(journal::wire::Mode::Async),
            "sync" => Ok(journal::wire::Mode::Sync),
            other => Err(ConfigError::Mode(other.to_owned())),
        }
    }
}

fn default_mode() -> String {
    "async".to_owned()
}

fn default_sync_ack_timeout_ms() -> u64 {
    5_000
}

fn default_inflight_bytes_max() -> u64 {
    64 << 20
}

fn default_batch_bytes_max() -> u64 {
    1 << 20
}

fn default_congestion() -> String {
    "cubic".to_owned()
}

fn default_backlog_bytes_max() -> u64 {
    1 << 30
}

fn default_backlog_age_max_secs() -> u64 {
    600
}

/// One protected disk.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Export name; also the disk's name in the journal's disk table.
    pub name: String,
    /// Raw image file or block device.
    pub path: PathBuf,
    /// This disk's filter chain, if not the agent's default.
    #[serde(default)]
    pub filters: Option<Vec<String>>,
    /// Minimum block size advertised to clients, in bytes: 1 allows any alignment; 512
    /// (default) or 4096 make misaligned requests fail with `EINVAL`.
    #[serde(default = "default_block_size_min")]
    pub block_size_min: u32,
}

/// Bounds on per-connection and per-agent resources. Every queue and buffer a client can
/// make grow is bounded by one of these.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest option data the server reads during the handshake, in bytes.
    pub option_bytes_max: u32,
    /// Largest oversize option data that is read and thrown away (the option is answered
    /// `ERR_TOO_BIG` and the handshake goes on); beyond it the connection is closed.
    pub option_discard_bytes_max: u32,
    /// Options a client may send before the server hangs up.
    pub options_per_connection_max: u32,
    /// Largest `READ`/`WRITE`, in bytes; advertised as the maximum block size.
    pub request_bytes_max: u32,
    /// Largest write payload that is read and thrown away after refusing its request (so the
    /// connection survives); beyond it the connection is closed after the error reply.
    pub write_discard_bytes_max: u32,
    /// Requests in flight on one connection; the server stops reading until one completes.
    pub requests_per_connection_max: u32,
    /// Read and write data buffered across all connections, in bytes.
    pub inflight_bytes_max: u64,
    /// Open connections across all listeners; more are accepted and closed at once.
    pub connections_max: u32,
    /// Time a client has to finish the handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
}

impl Default for Limits {
    /// The NBD server's own defaults, and `REQUEST_BYTES_MAX_DEFAULT`.
    fn default() -> Self {
        let server = ServerLimits::default();
        Self {
            option_bytes_max: server.option_bytes_max,
            option_discard_bytes_max: server.option_discard_bytes_max,
            options_per_connection_max: server.options_per_connection_max,
            request_bytes_max: REQUEST_BYTES_MAX_DEFAULT,
            write_discard_bytes_max: server.write_discard_bytes_max,
            requests_per_connection_max: server.requests_per_connection_max,
            inflight_bytes_max: server.inflight_bytes_max,
            connections_max: server.connections_max,
            handshake_timeout_ms: server.handshake_timeout_ms,
        }
    }
}

impl Limits {
    /// The bounds the NBD server enforces. `request_bytes_max` is not among them: it is
    /// advertised as every export's maximum block size, which the server holds requests to.
    pub fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            option_bytes_max: self.option_bytes_max,
            option_discard_bytes_max: self.option_discard_bytes_max,
            options_per_connection_max: self.options_per_connection_max,
            write_discard_bytes_max: self.write_discard_bytes_max,
            requests_per_connection_max: self.requests_per_connection_max,
            inflight_bytes_max: self.inflight_bytes_max,
            connections_max: self.connections_max,
            handshake_timeout_ms: self.handshake_timeout_ms,
        }
    }
}

/// Journal settings the agent passes to the journal crate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSettings {
    /// Size at which a segment file is sealed and the next one started, in bytes.
    pub segment_bytes_max: u64,
    /// Compress payloads with zstd when it pays.
    pub compression: bool,
}

impl Default for JournalSettings {
    fn default() -> Self {
        Self {
            segment_bytes_max: journal::SEGMENT_BYTES_DEFAULT,
            compression: true,
        }
    }
}

fn default_filters() -> Vec<String> {
    vec!["stats".to_owned(), "journal".to_owned()]
}

fn default_block_size_min() -> u32 {
    512
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is not a valid configuration.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: toml::de::Error,
    },
    /// A `--disk` flag is not `NAME=PATH`.
    #[error("--disk {0:?}: expected NAME=PATH")]
    DiskFlag(String),
    /// No disk configured.
    #[error("no disk configured: add --disk NAME=PATH or a [[disk]] table")]
    NoDisk,
    /// No NBD listener configured.
    #[error("no NBD listener configured: add --nbd-listen ADDR or --nbd-socket PATH")]
    NoListener,
    /// A disk name is not usable as an export name and metric label.
    #[error(
        "disk name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - not starting with . or -"
    )]
    DiskName(String),
    /// Two disks share a name.
    #[error("disk name {0:?} is configured twice")]
    DuplicateDisk(String),
    /// Two disks share a backing path.
    #[error("backing path {0} is configured for two disks")]
    DuplicatePath(PathBuf),
    /// A disk's filter chain breaks a rule.
    #[error("disk {disk}: filters {filters:?}: {source}")]
    Chain {
        /// The disk.
        disk: String,
        /// The chain as configured.
        filters: Vec<String>,
        /// The rule broken.
        source: ChainError,
    },
    /// Block size constraints the protocol forbids.
    #[error(
        "disk {disk}: block_size_min {min_bytes} with request_bytes_max {max_bytes}: {reason}"
    )]
    BlockSizes {
        /// The disk.
        disk: String,
        /// The configured minimum.
        min_bytes: u32,
        /// The configured maximum.
        max_bytes: u32,
        /// The rule broken.
        reason: &'static str,
    },
    /// A limit is zero or inconsistent with another.
    #[error("limits: {0}")]
    Limit(&'static str),
    /// The replication mode is not one of the two.
    #[error("replication mode {0:?}: use async or sync")]
    Mode(String),
    /// The congestion controller is not one cdp knows.
    #[error("congestion controller {0:?}: use cubic or bbr")]
    Congestion(String),
    /// A replication setting is out of range.
    #[error("replication: {0}")]
    Replication(&'static str),
}

/// A disk whose configuration passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidDisk {
    /// Export name.
    pub name: String,
    /// Backing path.
    pub path: PathBuf,
    /// Filter chain, validated: ends with `journal`.
    pub chain: Vec<FilterKind>,
    /// Block size constraints to advertise.
    pub block_sizes: nbd::BlockSizes,
}

impl AgentConfig {
    /// Reads a TOML configuration file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// A configuration with defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            nbd_listen: Vec::new(),
            nbd_socket: Vec::new(),
            metrics_listen: None,
            filters: default_filters(),
            disks: Vec::new(),
            limits: Limits::default(),
            journal: JournalSettings::default(),
            replication: None,
        }
    }

    /// Checks every rule and returns the disks in the form the agent runs from.
    pub fn validate(&self) -> Result<Vec<ValidDisk>, ConfigError> {
        if self.disks.is_empty() {
            return Err(ConfigError::NoDisk);
        }
        if self.nbd_listen.is_empty() && self.nbd_socket.is_empty() {
            return Err(ConfigError::NoListener);
        }
        self.validate_limits()?;
        if let Some(r) = &self.replication {
            r.mode()?;
            r.congestion()?;
            let checks = [
                (
                    r.sync_ack_timeout_ms > 0,
                    "sync_ack_timeout_ms must be positive",
                ),
                (
                    r.batch_bytes_max >= 4096,
                    "batch_bytes_max must be at least 4096",
                ),
                (
                    r.inflight_bytes_max >= r.batch_bytes_max,
                    "inflight_bytes_max must be at least batch_bytes_max",
                ),
                (
                    r.job_name.as_deref().is_none_or(valid_disk_name),
                    "job_name must be 1 to 64 characters from A-Z a-z 0-9 . _ -",
                ),
            ];
            if let Some((_, reason)) = checks.iter().find(|(ok, _)| !ok) {
                return Err(ConfigError::Replication(reason));
            }
        }
        let mut names = BTreeSet::new();
        let mut paths = BTreeSet::new();
        let mut valid = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            if !valid_disk_name(&disk.name) {
                return Err(ConfigError::DiskName(disk.name.clone()));
            }
            if !names.insert(disk.name.clone()) {
                return Err(ConfigError::DuplicateDisk(disk.name.clone()));
            }
            if !paths.insert(disk.path.clone()) {
                return Err(ConfigError::DuplicatePath(disk.path.clone()));
            }
            let filters = disk.filters.as_ref().unwrap_or(&self.filters);
            let chain = parse_chain(filters).map_err(|source| ConfigError::Chain {
                disk: disk.name.clone(),
                filters: filters.clone(),
                source,
            })?;
            let block_sizes = nbd::BlockSizes {
                min_bytes: disk.block_size_min,
                preferred_bytes: 4096.max(disk.block_size_min),
                max_bytes: self.limits.request_bytes_max,
            };
            block_sizes
                .validate()
                .map_err(|reason| ConfigError::BlockSizes {
                    disk: disk.name.clone(),
                    min_bytes: disk.block_size_min,
                    max_bytes: self.limits.request_bytes_max,
                    reason,
                })?;
            valid.push(ValidDisk {
                name: disk.name.clone(),
                path: disk.path.clone(),
                chain,
                block_sizes,
            });
        }
        Ok(valid)
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let checks = [
            (
                l.option_bytes_max >= 4096 + 6,
                "option_bytes_max must hold a 4096-byte export name (at least 4102)",
            ),
            (
                l.options_per_connection_max > 0,
                "options_per_connection_max must be positive",
            ),
            (
                l.request_bytes_max >= 4096,
                "request_bytes_max must be at least 4096",
            ),
            (
                l.requests_per_connection_max > 0,
                "requests_per_connection_max must be positive",
            ),
            (
                l.inflight_bytes_max >= u64::from(l.request_bytes_max),
                "inflight_bytes_max must be at least request_bytes_max",
            ),
            (l.connections_max > 0, "connections_max must be positive"),
            (
                l.handshake_timeout_ms > 0,
                "handshake_timeout_ms must be positive",
            ),
            (
                l.request_bytes_max <= journal::RECORD_PAYLOAD_BYTES_MAX,
                "request_bytes_max must not exceed the journal's record payload limit (32 MiB)",
            ),
            (
                (journal::SEGMENT_BYTES_MIN..=journal::SEGMENT_BYTES_LIMIT)
                    .contains(&self.journal.segment_bytes_max),
                "journal segment_bytes_max must be between 16 KiB and 1 TiB",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, reason)) => Err(ConfigError::Limit(reason)),
            None => Ok(()),
        }
    }
}

/// Parses a `--disk NAME=PATH` flag.
pub fn parse_disk_flag(flag: &str) -> Result<(String, PathBuf), ConfigError> {
    match flag.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        _ => Err(ConfigError::DiskFlag(flag.to_owned())),
    }
}

/// Export names double as metric labels and file-name parts: keep them plain.
fn valid_disk_name(name: &str) -> bool {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `toml` and validates it; compares the outcome (the disks' chains, or the error
    /// message) with `expected`.
    fn check(toml: &str, expected: &str) {
        let got = match toml::from_str::<AgentConfig>(toml) {
            Err(e) => format!("parse: {}", e.message()),
            Ok(config) => match config.validate() {
                Ok(disks) => disks
                    .iter()
                    .map(|d| {
                        let chain: Vec<&str> = d.chain.iter().map(|f| f.name()).collect();
                        format!("{}:{}:{}", d.name, chain.join(">"), d.block_sizes.min_bytes)
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                Err(e) => e.to_string(),
            },
        };
        assert_eq!(got, expected, "config:\n{toml}");
    }

    const HEAD: &str = "data_dir = \"/d\"\nnbd_socket = [\"/s\"]\n";

    #[test]
    fn the_congestion_controller_is_cubic_bbr_or_refused() {
        let disk = "[[disk]]\nname = \"vm1\"\npath = \"/a\"\n";
        let with =
            |line: &str| format!("{HEAD}{disk}[replication]\ntarget = \"127.0.0.1:7443\"\n{line}");
        check(&with(""), "vm1:stats>journal:512");
        check(&with("congestion = \"bbr\"\n"), "vm1:stats>journal:512");
        check(
            &with("congestion = \"reno\"\n"),
            "congestion controller \"reno\": use cubic or bbr",
        );
        let config: AgentConfig = toml::from_str(&with("congestion = \"bbr\"\n")).unwrap();
        let replication = config.replication.unwrap();
        assert_eq!(
            replication.congestion().unwrap(),
            transport::Congestion::Bbr
        );
        assert_eq!(replication.backlog_bytes_max, 1 << 30);
        assert_eq!(replication.backlog_age_max_secs, 600);
    }

    #[test]
    fn configurations() {
        check(
            &format!("{HEAD}[[disk]]\nname = \"vm1\"\npath = \"/a\"\n"),
            "vm1:stats>journal:512",
        );
        check(
            &format!(
                "{HEAD}filters = [\"journal\"]\n[[disk]]\nname = \"a\"\npath = \"/a\"\nblock_size_min = 1\n\
                 [[disk]]\nname = \"b\"\npath = \"/b\"\nfilters = [\"stats\", \"journal\"]\nblock_size_min = 4096\n"
            ),
            "a:journal:1 b:stats>journal:4096",
        );
        check(
            HEAD,
            "no disk configured: add --disk NAME=PATH or a [[disk]] table",
        );
        check(
            "data_dir = \"/d\"\n[[disk]]\nname = \"a\"\npath = \"/a\"\n",
            "no NBD listener configured: add --nbd-listen ADDR or --nbd-socket PATH",
        );
        check(
            &format!("{HEAD}[[disk]]\nname = \"a\"\npath = \"/a\"\n[[disk]]\nname = \"a\"\npath = \"/b\"\n"),
            "disk name \"a\" is configured twice",
        );
        check(
            &format!("{HEAD}[[disk]]\nname = \"a\"\npath = \"/a\"\n[[disk]]\nname = \"b\"\npath = \"/a\"\n"),
            "backing path /a is configured for two disks",
        );
        check(
            &format!("{HEAD}[[disk]]\nname = \"a b\"\npath = \"/a\"\n"),
            "disk name \"a b\": use 1 to 64 characters from A-Z a-z 0-9 . _ - not starting with . or -",
        );
        check(
            &format!("{HEAD}[[disk]]\nname = \"a\"\npath = \"/a\"\nfilters = [\"journal\", \"stats\"]\n"),
            "disk a: filters [\"journal\", \"stats\"]: `journal` must be the last filter (next to the backing disk), found `stats` after it",
        );
        check(
            &format!("{HEAD}[[disk]]\nname = \"a\"\npath = \"/a\"\nblock_size_min = 3\n"),
            "disk a: block_size_min 3 with request_bytes_max 33554432: minimum block size must be a power of two no larger than 65536",
        );
        check(
            &format!(
                "{HEAD}[limits]\nrequest_bytes_max = 1024\n[[disk]]\nname = \"a\"\npath = \"/a\"\n"
            ),
            "limits: request_bytes_max must be at least 4096",
        );
        check(
            &format!("{HEAD}[[disk]]\nname = \"a\"\npath = \"/a\"\ncolour = \"red\"\n"),
            "parse: unknown field `colour`, expected one of `name`, `path`, `filters`, `block_size_min`",
        );
    }

    #[test]
    fn default_limits_are_the_documented_ones() {
        let limits = Limits::default();
        let got = (
            limits.option_bytes_max,
            limits.option_discard_bytes_max,
            limits.options_per_connection_max,
            limits.request_bytes_max,
            limits.write_discard_bytes_max,
            limits.requests_per_connection_max,
            limits.inflight_bytes_max,
            limits.connections_max,
            limits.handshake_timeout_ms,
        );
        assert_eq!(
            got,
            (
                16 << 10,
                1 << 20,
                256,
                32 << 20,
                64 << 20,
                64,
                256 << 20,
                256,
                30_000
            )
        );
        assert_eq!(limits.server_limits(), ServerLimits::default());
    }

    #[test]
    fn disk_flags() {
        assert_eq!(
            parse_disk_flag("vm1=/images/vm1.img").unwrap(),
            ("vm1".to_owned(), PathBuf::from("/images/vm1.img"))
        );
        assert_eq!(
            parse_disk_flag("a=b=c").unwrap(),
            ("a".to_owned(), PathBuf::from("b=c"))
        );
        for bad in ["vm1", "=x", "x=", ""] {
            assert!(parse_disk_flag(bad).is_err(), "{bad}");
        }
    }
}
