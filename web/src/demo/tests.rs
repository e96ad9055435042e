//! Tests of `cdp demo`: its pure parts (child output, status lines, the guide, log tails),
//! and its orchestration against fake `cdp-receiver` and `cdp-agent` shell scripts with the
//! real API served in-process. Must never depend on the real binaries.

use super::*;
use crate::api::tests::{two_jobs, TOKEN};
use crate::api::{router, serve, Control};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

#[test]
fn child_lines_are_parsed() {
    let check = |line: &str, expected: ChildLine| assert_eq!(parse_child_line(line), expected);
    let listening = |what: &str, value: &str| ChildLine::Listening {
        what: what.to_owned(),
        value: value.to_owned(),
    };
    check("ready", ChildLine::Ready);
    check("ready\r\n", ChildLine::Ready);
    check(
        "listening quic 127.0.0.1:7443",
        listening("quic", "127.0.0.1:7443"),
    );
    check("listening api [::1]:7444\n", listening("api", "[::1]:7444"));
    // A path may hold spaces: the value is the rest of the line.
    check(
        "listening nbd-unix /tmp/a b/nbd.sock",
        listening("nbd-unix", "/tmp/a b/nbd.sock"),
    );
    for other in [
        "",
        "readyish",
        "listening",
        "listening quic",
        "listening  x",
        "hello",
    ] {
        check(other, ChildLine::Other(other.to_owned()));
    }
}

#[tokio::test]
async fn read_until_ready_collects_the_listeners() {
    let long_line = "x".repeat(10_000);
    let input = format!(
        "starting\n{long_line}\nlistening quic 127.0.0.1:7443\nlistening metrics not-an-address\n\
         listening nbd-unix /tmp/d/nbd.sock\nready\nlistening api 127.0.0.1:1\n"
    );
    let mut reader = input.as_bytes();
    let listeners = read_until_ready("cdp-receiver", &mut reader).await.unwrap();
    assert_eq!(listeners.value("nbd-unix"), Some("/tmp/d/nbd.sock"));
    assert_eq!(
        listeners.socket_addr("cdp-receiver", "quic").unwrap(),
        "127.0.0.1:7443".parse().unwrap()
    );
    // Lines after `ready` are not read here.
    assert_eq!(listeners.value("api"), None);
    assert_eq!(
        listeners
            .socket_addr("cdp-receiver", "api")
            .unwrap_err()
            .to_string(),
        "cdp-receiver did not report a usable api address (got None)"
    );
    assert_eq!(
        listeners
            .socket_addr("cdp-receiver", "metrics")
            .unwrap_err()
            .to_string(),
        "cdp-receiver did not report a usable metrics address (got Some(\"not-an-address\"))"
    );

    let mut reader: &[u8] = b"listening quic 127.0.0.1:7443\n";
    assert!(matches!(
        read_until_ready("cdp-receiver", &mut reader).await,
        Err(ReadyError::Eof)
    ));
}

fn job(state: &str) -> JobStatus {
    JobStatus {
        state: state.to_owned(),
        ..two_jobs()[0].clone()
    }
}

#[test]
fn status_lines_say_state_rpo_lag_and_seqs() {
    assert_eq!(
        status_line(Duration::from_millis(15_700), Some(&job("replicating"))),
        "[   15s]  demo: replicating, RPO 0.25s, lag 12 rec / 48 KiB, applied seq 1200 of 1240"
    );
    let mut refused = job("refused");
    refused.state_reason = Some("agent is not paired".to_owned());
    assert_eq!(
        status_line(Duration::from_secs(185), Some(&refused)),
        "[ 3m05s]  demo: refused (agent is not paired), RPO 0.25s, lag 12 rec / 48 KiB, \
         applied seq 1200 of 1240"
    );
    // A new job's first sync shows its progress.
    let mut syncing = job("syncing");
    syncing.resync_done_bytes = 64 << 20;
    syncing.resync_total_bytes = 256 << 20;
    assert_eq!(
        status_line(Duration::from_secs(5), Some(&syncing)),
        "[    5s]  demo: syncing 25% (64 MiB of 256 MiB), RPO 0.25s, lag 12 rec / 48 KiB, \
         applied seq 1200 of 1240"
    );
    assert_eq!(
        status_line(Duration::ZERO, None),
        "[    0s]  job demo is not listed by the appliance"
    );
}

#[test]
fn the_guide_gives_copyable_commands() {
    let layout = Layout::new(Path::new("/tmp/cdp-demo.Ab12"), Path::new("/opt/cdp/bin"));
    let facts = GuideFacts {
        nbd_socket: layout.nbd_socket.clone(),
        layout,
        nbd_tcp: Some("127.0.0.1:10809".to_owned()),
        receiver_metrics: Some("127.0.0.1:9101".to_owned()),
        agent_metrics: None,
        receiver_pid: Some(100),
        agent_pid: Some(101),
        replica: PathBuf::from("/tmp/cdp-demo.Ab12/appliance/replica/demo/disk0.img"),
    };
    let expected = "\
The appliance (cdp-receiver, pid 100) and the agent (cdp-agent, pid 101) are running.

Write to the protected disk (any NBD client; this one comes with qemu-utils):
  qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd+unix:///disk0?socket=/tmp/cdp-demo.Ab12/nbd.sock'
  (or over TCP: nbd://127.0.0.1:10809/disk0)

Watch it replicate:
  /opt/cdp/bin/cdp --appliance-dir /tmp/cdp-demo.Ab12/appliance status

The replica is /tmp/cdp-demo.Ab12/appliance/replica/demo/disk0.img
Compare it with the source once applied seq has caught up:
  cmp /tmp/cdp-demo.Ab12/source/disk0.img /tmp/cdp-demo.Ab12/appliance/replica/demo/disk0.img
  qemu-img compare -f raw -F raw /tmp/cdp-demo.Ab12/source/disk0.img /tmp/cdp-demo.Ab12/appliance/replica/demo/disk0.img

Go back in time: checkpoint, overwrite, then read the disk as it was:
  /opt/cdp/bin/cdp --appliance-dir /tmp/cdp-demo.Ab12/appliance checkpoint demo --tag before
  qemu-io -f raw -c 'write -P 0xcd 0 1M' 'nbd+unix:///disk0?socket=/tmp/cdp-demo.Ab12/nbd.sock'
  /opt/cdp/bin/cdp --appliance-dir /tmp/cdp-demo.Ab12/appliance view create demo --at tag:before
  qemu-io -f raw -r -c 'read -P 0xab 0 1M' NBD-URI-THE-VIEW-PRINTS
  /opt/cdp/bin/cdp --appliance-dir /tmp/cdp-demo.Ab12/appliance checkpoints demo    /opt/cdp/bin/cdp --appliance-dir /tmp/cdp-demo.Ab12/appliance view list

Metrics:
  appliance  http://127.0.0.1:9101/metrics
  agent      (not reported)
Logs:
  appliance  /tmp/cdp-demo.Ab12/appliance.log
  agent      /tmp/cdp-demo.Ab12/agent.log

Press Ctrl-C to stop both; the demo directory is kept.
";
    assert_eq!(guide_text(&facts), expected);
}

#[test]
fn log_tail_keeps_the_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
    fs::write(&path, text).unwrap();
    let tail = log_tail(&path);
    let expected: Vec<String> = (11..=30).map(|i| format!("line {i}")).collect();
    assert_eq!(tail.lines, expected);

    // Longer than what is read: the first, probably cut, line is dropped.
    let long: String = (0..2_000).map(|i| format!("{i:>20}\n")).collect();
    fs::write(&path, long).unwrap();
    let tail = log_tail(&path);
    assert_eq!(tail.lines.len(), LOG_TAIL_LINES);
    assert_eq!(tail.lines.last().unwrap().trim(), "1999");

    let missing = log_tail(&dir.path().join("missing.log"));
    assert_eq!(missing.lines.len(), 1);
    assert!(
        missing.lines[0].starts_with("(cannot read it: "),
        "{missing:?}"
    );
}

#[test]
fn prepare_dir_takes_an_empty_or_absent_directory_or_makes_one() {
    let parent = tempfile::tempdir().unwrap();
    let absent = parent.path().join("a/b");
    let made = prepare_dir(Some(&absent)).unwrap();
    assert!(made.is_absolute() && made.is_dir());
    assert_eq!(prepare_dir(Some(&absent)).unwrap(), made);

    fs::write(absent.join("f"), b"x").unwrap();
    let err = prepare_dir(Some(&absent)).unwrap_err();
    assert_eq!(err.step, Step::PrepareDir);
    assert_eq!(
        err.to_string(),
        format!(
            "preparing the demo directory: {} is not empty; give an empty or absent directory",
            absent.display()
        )
    );

    let fresh = prepare_dir(None).unwrap();
    let name = fresh.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("cdp-demo.") && name.len() > "cdp-demo.".len(),
        "{name}"
    );
    assert_eq!(fs::read_dir(&fresh).unwrap().count(), 0);
    fs::remove_dir(&fresh).unwrap();
}

#[test]
fn the_source_disk_is_sparse_and_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("source/disk0.img");
    create_sparse_disk(&path, DISK_SIZE_BYTES_DEFAULT).unwrap();
    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(metadata.len(), DISK_SIZE_BYTES_DEFAULT);
    assert!(
        metadata.blocks() * 512 < DISK_SIZE_BYTES_DEFAULT / 2,
        "{}",
        metadata.blocks()
    );
    let err = create_sparse_disk(&path, 1).unwrap_err();
    assert!(
        matches!(&err, Cause::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists)
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), DISK_SIZE_BYTES_DEFAULT);
}

/// Fake sibling binaries in a directory of their own, and files they leave for the test.
struct Fakes {
    bin: tempfile::TempDir,
}

impl Fakes {
    fn new() -> Self {
        Self {
            bin: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes the scripts. `receiver_run` and `agent_run` are the shell bodies of their
    /// `run` subcommands; every invocation is appended to `calls`.
    fn install(&self, receiver_run: &str, agent_run: &str) {
        let calls = self.file("calls");
        let receiver = format!(
            r#"#!/bin/sh
echo "cdp-receiver $*" >> '{calls}'
cmd="$1"; shift
data=""
while [ $# -gt 0 ]; do
  case "$1" in --data-dir) data="$2"; shift 2 ;; *) shift ;; esac
done
case "$cmd" in
  init) mkdir -p "$data" && echo "receiver: initialised $data" >&2 ;;
  pair) echo "cdp-pairing-bundle v1"; echo "token fake" ;;
  run) {receiver_run} ;;
  *) echo "receiver: unknown command $cmd" >&2; exit 64 ;;
esac
"#,
            calls = calls.display()
        );
        let agent = format!(
            r#"#!/bin/sh
echo "cdp-agent $*" >> '{calls}'
cmd="$1"
sock=""
prev=""
for arg in "$@"; do
  [ "$prev" = "--nbd-socket" ] && sock="$arg"
  prev="$arg"
done
case "$cmd" in
  pair) echo "agent: paired" >&2 ;;
  run) {agent_run} ;;
  *) echo "agent: unknown command $cmd" >&2; exit 64 ;;
esac
"#,
            calls = calls.display()
        );
        for (name, script) in [(RECEIVER_PROGRAM, receiver), (AGENT_PROGRAM, agent)] {
            let path = self.file(name);
            fs::write(&path, script).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.bin.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.file(name)).unwrap_or_default()
    }

    /// Shell: wait for SIGTERM, then append `who` to `stops` and exit 0.
    fn until_terminated(&self, who: &str) -> String {
        format!(
            r#"trap 'echo {who} >> "{stops}"; kill $sleeper; exit 0' TERM
    sleep 1000 >/dev/null &
    sleeper=$!
    wait $sleeper"#,
            stops = self.file("stops").display()
        )
    }

    fn config(&self, dir: &Path) -> DemoConfig {
        DemoConfig {
            ready_timeout: Duration::from_secs(20),
            job_poll_interval: Duration::from_millis(10),
            status_interval: Duration::from_millis(10),
            ..DemoConfig::new(Some(dir.to_owned()), self.bin.path().to_owned())
        }
    }
}

/// The appliance shell body of a healthy `cdp-receiver run` whose API is `api`.
fn receiver_run(fakes: &Fakes, api: SocketAddr) -> String {
    format!(
        r#"umask 077
    printf '%s\n' {TOKEN} > "$data/api-token"
    echo "receiver: running" >&2
    echo "listening quic 127.0.0.1:7443"
    echo "listening api {api}"
    echo "listening metrics 127.0.0.1:9101"
    echo ready
    {}"#,
        fakes.until_terminated("receiver")
    )
}

fn agent_run(fakes: &Fakes) -> String {
    format!(
        r#"echo "agent: running" >&2
    echo "listening nbd-tcp 127.0.0.1:10809"
    echo "listening nbd-unix $sock"
    echo "listening metrics 127.0.0.1:9102"
    echo ready
    {}"#,
        fakes.until_terminated("agent")
    )
}

/// An appliance whose `jobs()` runs `on_call(n)` at its n-th call (1-based).
struct ScriptedControl {
    jobs: Vec<JobStatus>,
    calls: AtomicUsize,
    on_call: Box<dyn Fn(usize) + Send + Sync>,
}

impl Control for ScriptedControl {
    fn jobs(&self) -> Vec<JobStatus> {
        (self.on_call)(self.calls.fetch_add(1, Ordering::SeqCst) + 1);
        self.jobs.clone()
    }
}

async fn serve_api(on_call: impl Fn(usize) + Send + Sync + 'static) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let control = ScriptedControl {
        jobs: two_jobs(),
        calls: AtomicUsize::new(0),
        on_call: Box::new(on_call),
    };
    let app = router(ApiToken::parse(TOKEN).unwrap(), Arc::new(control));
    tokio::spawn(serve(listener, app, std::future::pending()));
    addr
}

#[tokio::test]
async fn the_demo_runs_both_children_in_order_and_stops_them_agent_first() {
    // Call 1 waits for the job, call 2 prints the first status line, call 3 stops the demo.
    let stop = Arc::new(Notify::new());
    let notify = Arc::clone(&stop);
    let api = serve_api(move |call| {
        if call == 3 {
            notify.notify_one();
        }
    })
    .await;
    let fakes = Fakes::new();
    fakes.install(&receiver_run(&fakes, api), &agent_run(&fakes));
    let parent = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let dir = run(
        &fakes.config(&parent.path().join("demo")),
        &mut out,
        async move {
            stop.notified().await;
        },
    )
    .await
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    let d = dir.display();

    assert_eq!(
        fakes.read("calls"),
        format!(
            "cdp-receiver init --data-dir {d}/appliance
cdp-receiver run --data-dir {d}/appliance --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --view-listen 127.0.0.1:0
cdp-receiver pair --data-dir {d}/appliance
cdp-agent pair --data-dir {d}/agent --bundle {d}/bundle --name demo-agent
cdp-agent run --data-dir {d}/agent --nbd-socket {d}/nbd.sock --nbd-listen 127.0.0.1:0 --disk disk0={d}/source/disk0.img --metrics-listen 127.0.0.1:0 --target 127.0.0.1:7443 --job-name demo
"
        )
    );
    assert_eq!(fakes.read("stops"), "agent\nreceiver\n");

    let bundle = dir.join("bundle");
    assert_eq!(
        fs::read_to_string(&bundle).unwrap(),
        "cdp-pairing-bundle v1\ntoken fake\n"
    );
    assert_eq!(
        fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(dir.join("source/disk0.img")).unwrap().len(),
        DISK_SIZE_BYTES_DEFAULT
    );
    assert_eq!(
        fs::read_to_string(dir.join("appliance.log")).unwrap(),
        format!("receiver: initialised {d}/appliance\nreceiver: running\n")
    );
    assert_eq!(
        fs::read_to_string(dir.join("agent.log")).unwrap(),
        "agent: paired\nagent: running\n"
    );

    for expected in [
        format!("cdp demo in {d}\n"),
        format!(
            "  qemu-io -f raw -c 'write -P 0xab 0 1M' 'nbd+unix:///disk0?socket={d}/nbd.sock'\n"
        ),
        "The replica is /var/lib/cdp/replica/demo/disk0.img\n".to_owned(),
        "  demo: replicating, RPO 0.25s, lag 12 rec / 48 KiB, applied seq 1200 of 1240\n"
            .to_owned(),
        "stopping\n  cdp-agent: stopped (exit status: 0)\n  cdp-receiver: stopped (exit status: 0)\n"
            .to_owned(),
        format!("the demo directory is kept: {d}\n"),
    ] {
        assert!(out.contains(&expected), "{expected:?} not in:\n{out}");
    }
}

#[tokio::test]
async fn a_receiver_that_exits_while_starting_is_reported_with_its_log() {
    let fakes = Fakes::new();
    fakes.install(
        r#"echo "receiver: cannot bind: address in use" >&2; exit 3"#,
        "exit 99",
    );
    let parent = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let err = run(
        &fakes.config(&parent.path().join("demo")),
        &mut out,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    let dir = fs::canonicalize(parent.path().join("demo")).unwrap();
    assert_eq!(err.step, Step::StartAppliance);
    assert_eq!(
        err.to_string(),
        format!(
            "starting cdp-receiver: cdp-receiver exited with exit status: 3\n\
             --- last lines of {d}/appliance.log ---\n  \
             receiver: initialised {d}/appliance\n  \
             receiver: cannot bind: address in use",
            d = dir.display()
        )
    );
    // Nothing of the agent ran, and the directory is kept and named.
    assert!(!fakes.read("calls").contains("cdp-agent"));
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.ends_with(&format!("the demo directory is kept: {}\n", dir.display())),
        "{out}"
    );
}

#[tokio::test]
async fn a_receiver_that_never_gets_ready_is_stopped_after_the_deadline() {
    let fakes = Fakes::new();
    fakes.install(
        &format!(
            "echo $$ > '{}'; echo 'listening quic 127.0.0.1:1'; exec sleep 1000",
            fakes.file("pid").display()
        ),
        "exit 99",
    );
    let parent = tempfile::tempdir().unwrap();
    let config = DemoConfig {
        ready_timeout: Duration::from_secs(2),
        ..fakes.config(&parent.path().join("demo"))
    };
    let err = run(&config, &mut Vec::new(), std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("starting cdp-receiver: cdp-receiver did not say ready within 2 s\n"),
        "{err}"
    );
    // It was stopped and reaped: its pid is gone.
    let pid = fakes.read("pid");
    assert!(pid.ends_with('\n'), "{pid:?}");
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "{pid}"
    );
}

#[tokio::test]
async fn shutdown_while_starting_stops_the_half_started_child() {
    let fakes = Fakes::new();
    let pid_file = fakes.file("pid");
    fakes.install(
        &format!("echo $$ > '{}'; exec sleep 1000", pid_file.display()),
        "exit 99",
    );
    let parent = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    // The shutdown comes once the receiver has started (and written its pid).
    let watched = pid_file.clone();
    let shutdown = async move {
        while fs::read_to_string(&watched).map_or(true, |pid| !pid.ends_with('\n')) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    run(
        &fakes.config(&parent.path().join("demo")),
        &mut out,
        shutdown,
    )
    .await
    .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("stopping\n  cdp-receiver: stopped ("), "{out}");
    let pid = fs::read_to_string(&pid_file).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "{pid}"
    );
}

#[tokio::test]
async fn an_agent_that_dies_while_watched_is_reported_and_the_appliance_stopped() {
    let fakes = Fakes::new();
    let die = fakes.file("die");
    let die_now = die.clone();
    // The first status poll (call 2) tells the agent to die.
    let api = serve_api(move |call| {
        if call == 2 {
            fs::write(&die_now, b"").unwrap();
        }
    })
    .await;
    let agent = format!(
        r#"echo "listening nbd-unix $sock"; echo ready
    while [ ! -e '{die}' ]; do sleep 0.02; done
    echo "agent: lost its disk" >&2; exit 5"#,
        die = die.display()
    );
    fakes.install(&receiver_run(&fakes, api), &agent);
    let parent = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let err = run(
        &fakes.config(&parent.path().join("demo")),
        &mut out,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.step, Step::Watch);
    let text = err.to_string();
    assert!(
        text.starts_with("watching the job: cdp-agent exited with exit status: 5\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\n  agent: paired\n  agent: lost its disk"),
        "{text}"
    );
    assert_eq!(fakes.read("stops"), "receiver\n");
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("  cdp-agent: had already exited (exit status: 5)\n  cdp-receiver: stopped"),
        "{out}"
    );
}

#[tokio::test]
async fn missing_binaries_are_named() {
    let bin = tempfile::tempdir().unwrap();
    let parent = tempfile::tempdir().unwrap();
    let config = DemoConfig::new(Some(parent.path().join("demo")), bin.path().to_owned());
    let err = run(&config, &mut Vec::new(), std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "finding cdp-receiver and cdp-agent: {}/cdp-receiver not found; cdp demo runs the \
             cdp-receiver and cdp-agent built next to it (cargo build --workspace --bins)",
            bin.path().display()
        )
    );
}
