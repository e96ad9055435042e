//! A real link to impair: two network namespaces joined by a veth pair ([`NetPair`]), its
//! bandwidth limited with `tc tbf` and its UDP packets dropped at random with nftables; and
//! [`UdpRelay`], the `cdp-udp-relay` process that delays datagrams (this kernel has no
//! `tc netem`). Processes run inside a namespace through `ip netns exec`
//! ([`command_in`], [`tool_in`]); the harness's in-process TCP clients (metrics scrapes,
//! REST API calls) reach listeners inside one from a thread that entered it ([`in_netns`]).
//!
//! Must never: touch a namespace, an interface or a process it did not create (names carry
//! the test process's pid and a counter), leave a namespace or a relay behind (Drop removes
//! them), move the test's own threads into a namespace (only a fresh thread enters one, and
//! it ends with the closure), or wait for a command without a deadline.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::agent::binary;
use crate::cmd::{wait_deadline, Tool};

/// Deadline of one `ip`, `tc` or `nft` call.
const NET_TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Where `ip netns add` mounts a namespace (`/var/run` links here).
const NETNS_DIR: &str = "/run/netns";
/// Longest name of a network interface (IFNAMSIZ - 1); the veth ends share the namespaces'
/// names, so the namespaces' names must fit too.
const IFNAME_BYTES_MAX: usize = 15;
/// The nftables table each namespace's drop rule lives in.
const NFT_TABLE: &str = "cdp_lossy";
/// Longest wait for the relay's `ready` line and for its answer to `stats`.
const RELAY_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pairs made by this process so far: with the pid, what makes names unique on the host.
static PAIRS_MADE: AtomicU32 = AtomicU32::new(0);

/// One end of a [`NetPair`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first namespace (`.1` of the /30).
    A,
    /// The second namespace (`.2` of the /30).
    B,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// Two network namespaces, each with `lo` up and one end of a veth pair addressed from a
/// private /30 (`10.213.k.1` in A, `10.213.k.2` in B). Removed on drop.
#[derive(Debug)]
pub struct NetPair {
    /// `cdp<pid>n<k>a`, `cdp<pid>n<k>b`; each veth end is named as its namespace.
    /// Invariant: at most [`IFNAME_BYTES_MAX`] bytes, and unique to this process.
    names: [String; 2],
    addrs: [Ipv4Addr; 2],
}

impl NetPair {
    /// Creates both namespaces and the veth pair between them (replacing a stale namespace
    /// of the same name, left by an earlier process that had this pid).
    pub fn new() -> Result<NetPair> {
        let k = PAIRS_MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let names = [format!("cdp{pid}n{k}a"), format!("cdp{pid}n{k}b")];
        for name in &names {
            ensure!(
                name.len() <= IFNAME_BYTES_MAX,
                "namespace name {name:?} is longer than an interface name may be"
            );
        }
        // Any /30 will do (each pair has namespaces of its own); k only tells pairs apart.
        let octet = (k % 256) as u8;
        let pair = NetPair {
            names,
            addrs: [
                Ipv4Addr::new(10, 213, octet, 1),
                Ipv4Addr::new(10, 213, octet, 2),
            ],
        };
        // From here on, Drop removes whatever was made.
        for name in &pair.names {
            if netns_path(name).exists() {
                eprintln!("removing the stale network namespace {name}");
                ip(&["netns", "del", name])?;
            }
            ip(&["netns", "add", name])?;
        }
        let [a, b] = &pair.names;
        ip(&[
            "link", "add", a, "netns", a, "type", "veth", "peer", "name", b, "netns", b,
        ])?;
        for side in [Side::A, Side::B] {
            let ns = pair.name(side);
            let cidr = format!("{}/30", pair.addr(side));
            ip(&["-n", ns, "addr", "add", &cidr, "dev", ns])?;
            ip(&["-n", ns, "link", "set", ns, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// The namespace's name (also the name of its veth end).
    pub fn name(&self, side: Side) -> &str {
        &self.names[side.index()]
    }

    /// The address of the namespace's veth end.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        self.addrs[side.index()]
    }

    /// Limits what each veth end sends to `rate_bits_per_sec`, with a bucket of
    /// `burst_bytes` and packets queued at most `latency` (then dropped): `tc tbf` as the
    /// root qdisc on both ends.
    pub fn limit_bandwidth(
        &self,
        rate_bits_per_sec: u64,
        burst_bytes: u64,
        latency: Duration,
    ) -> Result<()> {
        let rate = format!("{rate_bits_per_sec}bit");
        let burst = burst_bytes.to_string();
        let latency = format!("{}us", latency.as_micros());
        for side in [Side::A, Side::B] {
            let ns = self.name(side);
            Tool::new("tc")
                .args(["-n", ns, "qdisc", "replace", "dev", ns, "root", "tbf"])
                .args(["rate", &rate, "burst", &burst, "latency", &latency])
                .timeout(NET_TOOL_TIMEOUT)
                .run_ok()
                .with_context(|| format!("limiting the bandwidth of {ns}"))?;
        }
        Ok(())
    }

    /// Drops `percent` % of the UDP packets arriving on each veth end, at random, and counts
    /// them (see [`NetPair::udp_counts`]).
    ///
    /// The rule sits in an input chain on purpose: a drop in an output chain makes the
    /// sender's `sendmsg` fail with EPERM, which a link never does; a packet lost on the way
    /// is silently never received. Only packets from the veth are touched, so loopback
    /// traffic inside a namespace (the agent and its relay) is not.
    pub fn drop_percent(&self, percent: u32) -> Result<()> {
        ensure!(percent <= 100, "cannot drop {percent} % of packets");
        // `numgen random mod 100` is 0..=99 and nft refuses `< 100`: 100 % is the rule
        // without sampling.
        let sample = match percent {
            100 => String::new(),
            p => format!("numgen random mod 100 < {p} "),
        };
        for side in [Side::A, Side::B] {
            let ns = self.name(side);
            let ruleset = format!(
                "table inet {NFT_TABLE}\n\
                 delete table inet {NFT_TABLE}\n\
                 table inet {NFT_TABLE} {{\n\
                 \tcounter udp_in {{\n\t}}\n\
                 \tcounter udp_dropped {{\n\t}}\n\
                 \tchain input {{\n\
                 \t\ttype filter hook input priority 0; policy accept;\n\
                 \t\tiifname \"{ns}\" meta l4proto udp counter name \"udp_in\"\n\
                 \t\tiifname \"{ns}\" meta l4proto udp {sample}counter name \"udp_dropped\" drop\n\
                 \t}}\n\
                 }}\n"
            );
            nft(ns, &ruleset).with_context(|| format!("dropping UDP packets in {ns}"))?;
        }
        Ok(())
    }

    /// UDP packets that reached either veth end from the link, and how many of them the
    /// [`NetPair::drop_percent`] rule dropped: `(arrived, dropped)`.
    pub fn udp_counts(&self) -> Result<(u64, u64)> {
        let (mut arrived, mut dropped) = (0, 0);
        for side in [Side::A, Side::B] {
            let ns = self.name(side);
            arrived += nft_counter(ns, "udp_in")?;
            dropped += nft_counter(ns, "udp_dropped")?;
        }
        Ok((arrived, dropped))
    }

    /// Bytes sent by the veth end of `side` (its `tx_bytes`), what crossed the link that way.
    pub fn tx_bytes(&self, side: Side) -> Result<u64> {
        let ns = self.name(side);
        let out = Tool::new("ip")
            .args(["netns", "exec", ns, "cat"])
            .arg(format!("/sys/class/net/{ns}/statistics/tx_bytes"))
            .timeout(NET_TOOL_TIMEOUT)
            .run_ok()?;
        out.stdout
            .trim()
            .parse()
            .with_context(|| format!("tx_bytes of {ns}: {:?}", out.stdout))
    }

    /// A command running `program` inside the namespace of `side`.
    pub fn command(&self, side: Side, program: impl AsRef<OsStr>) -> Command {
        command_in(Some(self.name(side)), program)
    }

    /// A [`Tool`] (deadline, captured output) running `program` inside the namespace of
    /// `side`.
    pub fn tool(&self, side: Side, program: impl AsRef<OsStr>) -> Tool {
        tool_in(Some(self.name(side)), program)
    }

    /// Runs `f` on a fresh thread that first entered the namespace of `side`, and returns
    /// what it returned (a panic in `f` is resumed here).
    pub fn in_ns<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(self.name(side), f)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and with it the other end.
        for name in &self.names {
            if !netns_path(name).exists() {
                continue;
            }
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("could not remove the network namespace {name}: {e:#}");
            }
        }
    }
}

/// The file `ip netns add NAME` mounted the namespace on.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// A command running `program` inside the network namespace `netns` (`ip netns exec`, which
/// execs `program` in its own process: the pid is the program's), or directly when `None`.
pub fn command_in(netns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A [`Tool`] running `program` inside the network namespace `netns`, or directly when
/// `None`.
pub fn tool_in(netns: Option<&str>, program: impl AsRef<OsStr>) -> Tool {
    match netns {
        Some(ns) => Tool::new("ip").args(["netns", "exec", ns]).arg(program),
        None => Tool::new(program),
    }
}

/// Runs `f` on a fresh thread that first entered the network namespace `name`
/// (`setns(2)` on `/run/netns/NAME`); the calling thread stays where it is.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(name);
    let ns = File::open(&path)
        .with_context(|| format!("opening the network namespace {}", path.display()))?;
    thread::scope(|s| {
        let entered = s.spawn(move || -> Result<T> {
            // SAFETY: setns(2) takes a file descriptor, which `ns` keeps open for the call,
            // and a flag; it touches no memory of ours. CLONE_NEWNET moves only this thread,
            // which ends when `f` returns.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering the network namespace {name}"));
            }
            Ok(f())
        });
        match entered.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `f` inside the network namespace `netns`, or on this thread when `None`.
pub fn within<T: Send>(netns: Option<&str>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match netns {
        Some(ns) => in_netns(ns, f)?,
        None => f(),
    }
}

fn ip(args: &[&str]) -> Result<()> {
    Tool::new("ip")
        .args(args)
        .timeout(NET_TOOL_TIMEOUT)
        .run_ok()
        .map(drop)
}

/// Loads `ruleset` with `nft -f` inside the namespace `ns`.
fn nft(ns: &str, ruleset: &str) -> Result<()> {
    // Tool gives its child no stdin, so the ruleset goes through a file.
    let file = tempfile::Builder::new()
        .prefix("cdp-nft-")
        .suffix(".nft")
        .tempfile()
        .context("creating a temporary nftables file")?;
    std::fs::write(file.path(), ruleset)
        .with_context(|| format!("writing {}", file.path().display()))?;
    Tool::new("ip")
        .args(["netns", "exec", ns, "nft", "-f"])
        .arg(file.path())
        .timeout(NET_TOOL_TIMEOUT)
        .run_ok()
        .with_context(|| format!("loading the ruleset\n{ruleset}"))
        .map(drop)
}

/// The packets of the named counter in [`NFT_TABLE`] inside the namespace `ns`.
fn nft_counter(ns: &str, counter: &str) -> Result<u64> {
    let out = Tool::new("ip")
        .args(["netns", "exec", ns, "nft", "-j", "list", "counter", "inet"])
        .args([NFT_TABLE, counter])
        .timeout(NET_TOOL_TIMEOUT)
        .run_ok()?;
    let value: serde_json::Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("`nft -j` printed no JSON:\n{}", out.describe()))?;
    value["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|item| item["counter"]["packets"].as_u64())
        .with_context(|| format!("no counter {counter} in {value}"))
}

/// A running `cdp-udp-relay`: datagrams to [`UdpRelay::addr`] reach `upstream` `delay` later,
/// and the replies come back `delay` later. Killed on drop.
#[derive(Debug)]
pub struct UdpRelay {
    /// Invariant: `Some` until the process has been reaped.
    child: Option<Child>,
    /// The relay's stdin: `stats` lines go there; closing it ends the relay.
    stdin: Option<ChildStdin>,
    /// Lines the relay printed after `ready`.
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
}

/// What a relay counted since it started (its `stats` line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Datagrams from clients sent upstream.
    pub to_upstream: u64,
    /// Datagrams from upstream sent back to a client.
    pub to_client: u64,
    /// Bytes forwarded, both ways.
    pub forwarded_bytes: u64,
    /// Datagrams dropped because the delay queue was full.
    pub dropped_queue_full: u64,
    /// Datagrams dropped because a new client would exceed the session limit.
    pub dropped_sessions_full: u64,
    /// Sends that failed.
    pub send_errors: u64,
    /// Client addresses seen.
    pub sessions: u64,
}

impl UdpRelay {
    /// Starts `cdp-udp-relay --listen LISTEN --upstream UPSTREAM --delay-ms DELAY` (inside
    /// the namespace `netns` when given) and waits for its `ready` line.
    pub fn start(
        netns: Option<&str>,
        listen: SocketAddr,
        upstream: SocketAddr,
        delay: Duration,
    ) -> Result<UdpRelay> {
        let mut cmd = command_in(netns, binary("cdp-udp-relay")?);
        cmd.args(["--listen", &listen.to_string()])
            .args(["--upstream", &upstream.to_string()])
            .args(["--delay-ms", &delay.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe and touches no memory of the parent. It makes the kernel
        // kill the relay if the thread that started it dies without running Drop.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let command_line = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {command_line}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("relay stdout not piped")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut relay = UdpRelay {
            child: Some(child),
            stdin,
            lines,
            addr: listen,
        };
        let line = relay
            .next_line(|l| l.starts_with("ready "))
            .with_context(|| format!("starting {command_line}"))?;
        relay.addr = line
            .trim_start_matches("ready ")
            .trim()
            .parse()
            .with_context(|| format!("bad address in {line:?}"))?;
        Ok(relay)
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks the relay what it counted so far.
    pub fn stats(&mut self) -> Result<RelayStats> {
        let stdin = self.stdin.as_mut().context("the relay's stdin is closed")?;
        stdin
            .write_all(b"stats\n")
            .and_then(|()| stdin.flush())
            .context("asking the relay for its stats")?;
        let line = self.next_line(|l| l.starts_with("stats "))?;
        let mut stats = RelayStats::default();
        for field in line.split_whitespace().skip(1) {
            let (key, value) = field
                .split_once('=')
                .with_context(|| format!("bad field {field:?} in {line:?}"))?;
            let value: u64 = value
                .parse()
                .with_context(|| format!("bad value of {key} in {line:?}"))?;
            let slot = match key {
                "to_upstream" => &mut stats.to_upstream,
                "to_client" => &mut stats.to_client,
                "forwarded_bytes" => &mut stats.forwarded_bytes,
                "dropped_queue_full" => &mut stats.dropped_queue_full,
                "dropped_sessions_full" => &mut stats.dropped_sessions_full,
                "send_errors" => &mut stats.send_errors,
                "sessions" => &mut stats.sessions,
                _ => continue,
            };
            *slot = value;
        }
        Ok(stats)
    }

    /// The next line the relay prints that `wanted` accepts, skipping others; fails if the
    /// relay exits or says nothing of the kind within [`RELAY_READY_TIMEOUT`].
    fn next_line(&mut self, wanted: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + RELAY_READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(line) if wanted(&line) => return Ok(line),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.kill();
                    bail!("the relay closed its stdout (exited?)");
                }
            }
            ensure!(
                Instant::now() < deadline,
                "the relay said nothing expected within {RELAY_READY_TIMEOUT:?}"
            );
        }
    }

    /// Kills the relay and reaps it.
    pub fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this child's pid only.
            let _ = child.kill();
            let _ = wait_deadline(&mut child, Duration::from_secs(10));
        }
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.kill();
    }
}
