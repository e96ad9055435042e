//! `cdp-udp-relay --listen ADDR --upstream ADDR --delay-ms N`: test tooling that adds a
//! fixed one-way delay to a UDP path (this kernel has no `tc netem`). Every datagram a client
//! sends to `--listen` goes out to `--upstream` from a socket of the client's own (one per
//! client address), and every reply comes back to that client; each datagram leaves N ms
//! after it arrived. One timer queue holds what is waiting, so a datagram never waits for
//! another's delay: the relay delays, it does not serialise.
//!
//! Prints `ready <listen addr>` on stdout once bound. Reads stdin: a `stats` line prints
//! `stats to_upstream=.. to_client=.. ...`; end of stdin ends the relay, as SIGTERM does.
//!
//! Must never: panic on a datagram (it never looks inside one), hold more than
//! [`QUEUE_BYTES_MAX`] or [`QUEUE_DATAGRAMS_MAX`] waiting (beyond, it drops and counts), or
//! open more than [`SESSIONS_MAX`] upstream sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Largest UDP payload.
const DATAGRAM_BYTES_MAX: usize = 65_535;
/// Datagrams waiting in the delay queue, at most.
const QUEUE_DATAGRAMS_MAX: usize = 65_536;
/// Payload bytes waiting in the delay queue, at most.
const QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Client addresses served, at most (each has an upstream socket and a thread).
const SESSIONS_MAX: usize = 64;
/// Longest delay accepted.
const DELAY_MS_MAX: u64 = 60_000;
/// Kernel buffer asked for each socket, each way: a burst the size of a congestion window
/// waits in the kernel rather than being lost there (the default is about 200 KiB).
const SOCKET_BUFFER_BYTES: libc::c_int = 8 * 1024 * 1024;
/// Pause after a failed receive, so a persistent error does not spin.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(10);

const USAGE: &str = "usage: cdp-udp-relay --listen ADDR --upstream ADDR --delay-ms N";

/// Where a queued datagram goes.
#[derive(Debug)]
enum Leg {
    /// Out of this client's upstream socket.
    ToUpstream(Arc<UdpSocket>),
    /// Out of the listening socket to this client.
    ToClient(SocketAddr),
}

/// One datagram waiting for its time.
#[derive(Debug)]
struct Delayed {
    due: Instant,
    leg: Leg,
    payload: Vec<u8>,
}

/// The timer queue. Every datagram waits the same delay and is stamped under the lock, so
/// the queue is in order of `due` and a FIFO is a timer queue.
#[derive(Debug, Default)]
struct Queue {
    /// Invariant: `due` never decreases from front to back.
    datagrams: VecDeque<Delayed>,
    /// Sum of the payloads' lengths. Invariant: at most [`QUEUE_BYTES_MAX`].
    bytes: usize,
}

/// What the relay counted (the `stats` line).
#[derive(Debug, Default)]
struct Stats {
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_sessions_full: AtomicU64,
    send_errors: AtomicU64,
    sessions: AtomicU64,
}

impl Stats {
    fn line(&self) -> String {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "stats to_upstream={} to_client={} forwarded_bytes={} dropped_queue_full={} \
             dropped_sessions_full={} send_errors={} sessions={}",
            v(&self.to_upstream),
            v(&self.to_client),
            v(&self.forwarded_bytes),
            v(&self.dropped_queue_full),
            v(&self.dropped_sessions_full),
            v(&self.send_errors),
            v(&self.sessions),
        )
    }
}

/// State shared by the relay's threads.
#[derive(Debug)]
struct Relay {
    listen: UdpSocket,
    upstream: SocketAddr,
    delay: Duration,
    queue: Mutex<Queue>,
    /// Signalled when the queue gains a datagram.
    queued: Condvar,
    stats: Stats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere does not make it inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relay {
    /// Queues `payload` to leave by `leg` after the delay, or drops it when the queue is
    /// full.
    fn enqueue(&self, leg: Leg, payload: &[u8]) {
        let mut q = lock(&self.queue);
        if q.datagrams.len() >= QUEUE_DATAGRAMS_MAX || q.bytes + payload.len() > QUEUE_BYTES_MAX {
            self.stats
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.bytes += payload.len();
        q.datagrams.push_back(Delayed {
            due: Instant::now() + self.delay,
            leg,
            payload: payload.to_vec(),
        });
        drop(q);
        self.queued.notify_one();
    }

    /// Sends each queued datagram when it is due; never returns.
    fn deliver(&self) {
        let mut q = lock(&self.queue);
        loop {
            let now = Instant::now();
            match q.datagrams.front().map(|d| d.due) {
                None => {
                    q = self.queued.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                Some(due) if due > now => {
                    q = self
                        .queued
                        .wait_timeout(q, due - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Some(_) => {
                    let Some(d) = q.datagrams.pop_front() else {
                        continue;
                    };
                    q.bytes -= d.payload.len();
                    // Sends without the lock: the receiving threads keep queueing meanwhile.
                    drop(q);
                    self.send(&d);
                    q = lock(&self.queue);
                }
            }
        }
    }

    fn send(&self, d: &Delayed) {
        let (sent, counter) = match &d.leg {
            Leg::ToUpstream(socket) => (socket.send(&d.payload), &self.stats.to_upstream),
            Leg::ToClient(client) => (
                self.listen.send_to(&d.payload, client),
                &self.stats.to_client,
            ),
        };
        match sent {
            Ok(_) => {
                counter.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .forwarded_bytes
                    .fetch_add(d.payload.len() as u64, Ordering::Relaxed);
            }
            // A link loses datagrams; so may the relay (for example ECONNREFUSED after an
            // ICMP error, or ENOBUFS).
            Err(_) => {
                self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Receives from clients, opening an upstream socket per new client; never returns.
    fn serve_clients(self: &Arc<Self>) {
        let mut sessions: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        loop {
            let (n, client) = match self.listen.recv_from(&mut buf) {
                Ok(got) => got,
                Err(_) => {
                    thread::sleep(RECV_ERROR_PAUSE);
                    continue;
                }
            };
            let payload = buf.get(..n).unwrap_or_default();
            let socket = match sessions.get(&client) {
                Some(socket) => Arc::clone(socket),
                None => {
                    if sessions.len() >= SESSIONS_MAX {
                        self.stats
                            .dropped_sessions_full
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    match self.open_session(client) {
                        Ok(socket) => {
                            sessions.insert(client, Arc::clone(&socket));
                            socket
                        }
                        Err(e) => {
                            eprintln!("cdp-udp-relay: no upstream socket for {client}: {e}");
                            self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
            };
            self.enqueue(Leg::ToUpstream(socket), payload);
        }
    }

    /// An upstream socket for `client`, with a thread queueing what comes back on it.
    fn open_session(self: &Arc<Self>, client: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
        let local = match self.upstream {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let socket = UdpSocket::bind(local)?;
        enlarge_buffers(&socket);
        // Connected: the kernel passes up only what the upstream sends.
        socket.connect(self.upstream)?;
        let socket = Arc::new(socket);
        let relay = Arc::clone(self);
        let replies = Arc::clone(&socket);
        thread::Builder::new()
            .name(format!("from-upstream-{client}"))
            .spawn(move || relay.serve_upstream(&replies, client))?;
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        Ok(socket)
    }

    /// Receives the upstream's replies for `client`; never returns.
    fn serve_upstream(&self, socket: &UdpSocket, client: SocketAddr) {
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => self.enqueue(Leg::ToClient(client), buf.get(..n).unwrap_or_default()),
                // ECONNREFUSED after an ICMP error, for one: keep going, as a link would.
                Err(_) => thread::sleep(RECV_ERROR_PAUSE),
            }
        }
    }
}

/// Asks for [`SOCKET_BUFFER_BYTES`] of receive and send buffer: beyond `rmem_max` when
/// privileged (`SO_RCVBUFFORCE`), else as much as the limit allows. Best effort: a smaller
/// buffer only makes the relay lose more under a burst, as a shallow queue would.
fn enlarge_buffers(socket: &UdpSocket) {
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |option: libc::c_int| {
            let value = SOCKET_BUFFER_BYTES;
            // SAFETY: setsockopt(2) reads `size_of::<c_int>()` bytes at `&value`, a live
            // c_int, and the descriptor is open for as long as `socket` is borrowed.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    std::ptr::from_ref(&value).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(forced) != 0 {
            set(plain);
        }
    }
}

/// The parsed command line.
#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    delay: Duration,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut upstream, mut delay) = (None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => {
                listen = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--listen {value:?}: {e}"))?,
                )
            }
            "--upstream" => {
                upstream = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--upstream {value:?}: {e}"))?,
                )
            }
            "--delay-ms" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|e| format!("--delay-ms {value:?}: {e}"))?;
                if ms > DELAY_MS_MAX {
                    return Err(format!("--delay-ms {ms}: at most {DELAY_MS_MAX}"));
                }
                delay = Some(Duration::from_millis(ms));
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        delay: delay.ok_or("--delay-ms is required")?,
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("cdp-udp-relay: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listen = match UdpSocket::bind(args.listen) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("cdp-udp-relay: binding {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    enlarge_buffers(&listen);
    let bound = match listen.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("cdp-udp-relay: the bound address: {e}");
            return ExitCode::FAILURE;
        }
    };
    let relay = Arc::new(Relay {
        listen,
        upstream: args.upstream,
        delay: args.delay,
        queue: Mutex::new(Queue::default()),
        queued: Condvar::new(),
        stats: Stats::default(),
    });
    let deliver = Arc::clone(&relay);
    let clients = Arc::clone(&relay);
    let started = thread::Builder::new()
        .name("deliver".to_owned())
        .spawn(move || deliver.deliver())
        .and_then(|_| {
            thread::Builder::new()
                .name("from-clients".to_owned())
                .spawn(move || clients.serve_clients())
        });
    if let Err(e) = started {
        eprintln!("cdp-udp-relay: starting a thread: {e}");
        return ExitCode::FAILURE;
    }
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "ready {bound}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    // Runs until stdin ends: the harness closes it (or dies) and the relay goes with it.
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "stats" {
            let printed = writeln!(stdout, "{}", relay.stats.line()).and_then(|()| stdout.flush());
            if printed.is_err() {
                break;
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(line: &str) -> Result<Args, String> {
        parse_args(line.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn parses_the_three_flags_and_refuses_the_rest() {
        let a = args("--listen 127.0.0.1:0 --upstream 10.0.0.2:7000 --delay-ms 25").unwrap();
        assert_eq!(a.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(a.upstream, "10.0.0.2:7000".parse().unwrap());
        assert_eq!(a.delay, Duration::from_millis(25));
        for bad in [
            "",
            "--listen 127.0.0.1:0 --upstream 10.0.0.2:7000",
            "--listen nowhere --upstream 10.0.0.2:7000 --delay-ms 1",
            "--listen 127.0.0.1:0 --upstream 10.0.0.2:7000 --delay-ms -1",
            "--listen 127.0.0.1:0 --upstream 10.0.0.2:7000 --delay-ms 60001",
            "--listen 127.0.0.1:0 --upstream 10.0.0.2:7000 --delay-ms 1 --extra 2",
            "--listen",
        ] {
            assert!(args(bad).is_err(), "accepted {bad:?}");
        }
    }
}
