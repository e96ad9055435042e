//! Test harness: an in-process agent on a temporary Unix socket with file-backed disks, and
//! a minimal NBD client built on the `nbd` codecs that can send well-formed and deliberately
//! malformed frames. Every wait is bounded by a timeout so a hung server fails the test.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test helpers

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nbd::{
    ChunkBody, ChunkHeader, ClientFlags, ClientOption, Command, CommandFlags, ErrorCode,
    ExportQuery, Handle, InfoReply, InfoType, OptionCode, OptionReply, ReplyType, Request,
    RequestHeader, ServerGreeting, SimpleReplyHeader, StructuredChunk, TransmissionFlags,
};
use source_agent::backing::BlockDevice;
use source_agent::sink::{RecordSink, Seq};
use source_agent::{Agent, AgentConfig, Overrides};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest any single step may take.
pub const STEP: Duration = Duration::from_secs(20);

/// Runs `f` with a deadline.
pub async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

/// A running agent and its files.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub disks: Vec<(String, PathBuf)>,
    pub sink: Arc<dyn RecordSink>,
    pub config: AgentConfig,
    pub metrics: Arc<source_agent::metrics::AgentMetrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), source_agent::ServeError>>>,
}

/// What to start.
pub struct Setup {
    pub disks: Vec<(&'static str, u64)>,
    pub block_size_min: u32,
    pub overrides: Overrides,
    pub limits: Option<source_agent::config::Limits>,
    /// Whether the first 8 KiB of each disk start as 0x5a (otherwise all zeroes).
    pub initial_pattern: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            disks: vec![("d0", 4 << 20)],
            block_size_min: 512,
            overrides: Overrides::default(),
            limits: None,
            initial_pattern: true,
        }
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Setup::default()).await
    }

    pub async fn with(setup: Setup) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let mut config = AgentConfig::new(dir.path().join("data"));
        config.nbd_socket = vec![socket.clone()];
        // Small segments: less disk per test, and rollovers get exercised.
        config.journal.segment_bytes_max = 1 << 20;
        if let Some(limits) = setup.limits {
            config.limits = limits;
        }
        let mut disks = Vec::new();
        for (name, size) in &setup.disks {
            let path = dir.path().join(format!("{name}.img"));
            let file = std::fs::File::create(&path).unwrap();
            file.set_len(*size).unwrap();
            if setup.initial_pattern {
                // Non-zero content, so a stray zeroing would show in the hash.
                use std::os::unix::fs::FileExt;
                file.write_all_at(&vec![0x5a; 8192], 0).unwrap();
            }
            drop(file);
            std::fs::copy(&path, dir.path().join(format!("{name}.base.img"))).unwrap();
            config.disks.push(source_agent::config::DiskConfig {
                name: (*name).to_owned(),
                path: path.clone(),
                filters: None,
                block_size_min: setup.block_size_min,
            });
            disks.push(((*name).to_owned(), path));
        }
        let agent = Agent::start_with(&config, setup.overrides).await.unwrap();
        let sink = agent.sink();
        let metrics = agent.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(agent.serve(async move {
            let _ = stopped.await;
        }));
        Self {
            dir,
            socket,
            disks,
            sink,
            config,
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A copy of disk `disk` as it was before the agent started.
    pub fn base(&self, disk: &str) -> PathBuf {
        self.dir.path().join(format!("{disk}.base.img"))
    }

    pub fn backing(&self, disk: &str) -> &Path {
        &self.disks.iter().find(|(n, _)| n == disk).unwrap().1
    }

    /// blake3 of every backing file and the journal's head seq: what a rejected request
    /// must leave unchanged.
    pub fn state(&self) -> (Vec<String>, Seq) {
        let hashes = self
            .disks
            .iter()
            .map(|(_, p)| {
                blake3::hash(&std::fs::read(p).unwrap())
                    .to_hex()
                    .to_string()
            })
            .collect();
        (hashes, self.sink.head_seq())
    }

    pub async fn connect(&self) -> UnixStream {
        bounded("connect", UnixStream::connect(&self.socket))
            .await
            .unwrap()
    }

    /// A client in transmission on `export` (via GO, asking for block sizes).
    pub async fn client(&self, export: &str, structured: bool) -> Client {
        let mut client = Client::greet(self.connect().await).await;
        if structured {
            let replies = client.option(ClientOption::StructuredReply).await;
            assert_eq!(replies[0].0, ReplyType::ACK);
        }
        client.go(export).await;
        client.structured = structured;
        client
    }

    /// Waits until exactly `n` NBD connections are open.
    pub async fn wait_connections(&self, n: i64) {
        let line = format!("cdp_nbd_connections {n}");
        bounded("connection count", async {
            while !self.metrics.render().lines().any(|l| l == line) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// Stops the agent and waits for it to finish; returns the temporary directory, which
    /// is removed when the caller drops it.
    pub async fn stop(mut self) -> Result<tempfile::TempDir, source_agent::ServeError> {
        let _ = self.stop.take().unwrap().send(());
        bounded("agent stop", self.task.take().unwrap())
            .await
            .unwrap()?;
        Ok(self.dir)
    }
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: Handle,
    pub error: ErrorCode,
    pub data: Vec<u8>,
}

/// A raw NBD client.
pub struct Client {
    pub stream: UnixStream,
    pub structured: bool,
    pub size_bytes: u64,
    pub flags: TransmissionFlags,
    pub block_sizes: Option<nbd::BlockSizes>,
    /// Read lengths of in-flight reads by handle (simple replies carry no length).
    reads: HashMap<u64, u32>,
    next_handle: u64,
}

impl Client {
    /// Reads the greeting and sends client flags (fixed newstyle, no zeroes).
    pub async fn greet(mut stream: UnixStream) -> Self {
        let mut greeting = [0u8; ServerGreeting::LEN];
        bounded("greeting", stream.read_exact(&mut greeting))
            .await
            .unwrap();
        ServerGreeting::decode(&greeting).unwrap();
        let mut out = Vec::new();
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        }
        .encode(&mut out);
        stream.write_all(&out).await.unwrap();
        Self {
            stream,
            structured: false,
            size_bytes: 0,
            flags: TransmissionFlags(0),
            block_sizes: None,
            reads: HashMap::new(),
            next_handle: 1,
        }
    }

    /// Sends raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one option reply: (type, option, data).
    pub async fn option_reply(&mut self) -> (ReplyType, OptionCode, Vec<u8>) {
        let mut header = [0u8; OptionReply::HEADER_LEN];
        bounded("option reply", self.stream.read_exact(&mut header))
            .await
            .unwrap();
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut frame = header.to_vec();
        frame.resize(OptionReply::HEADER_LEN + len, 0);
        bounded(
            "option reply data",
            self.stream
                .read_exact(&mut frame[OptionReply::HEADER_LEN..]),
        )
        .await
        .unwrap();
        let (reply, _) = OptionReply::decode(&frame, u32::MAX).unwrap();
        (reply.reply, reply.option, reply.data.to_vec())
    }

    /// Sends an option and reads replies up to the final one (ACK or an error).
    pub async fn option(&mut self, option: ClientOption<'_>) -> Vec<(ReplyType, Vec<u8>)> {
        let mut out = Vec::new();
        option.encode(&mut out);
        self.send_raw(&out).await;
        self.replies_until_final().await
    }

    pub async fn replies_until_final(&mut self) -> Vec<(ReplyType, Vec<u8>)> {
        let mut replies = Vec::new();
        loop {
            let (kind, _, data) = self.option_reply().await;
            let last = kind == ReplyType::ACK || kind.is_error();
            replies.push((kind, data));
            if last {
                return replies;
            }
        }
    }

    /// `NBD_OPT_GO` asking for block sizes; panics unless it succeeds.
    pub async fn go(&mut self, export: &str) {
        let replies = self
            .option(ClientOption::Go(ExportQuery {
                name: export,
                info_requests: vec![InfoType::BLOCK_SIZE, InfoType::NAME],
            }))
            .await;
        assert_eq!(
            replies.last().unwrap().0,
            ReplyType::ACK,
            "GO {export}: {replies:?}"
        );
        for (kind, data) in &replies {
            if *kind != ReplyType::INFO {
                continue;
            }
            match InfoReply::parse(data).unwrap() {
                InfoReply::Export { size_bytes, flags } => {
                    self.size_bytes = size_bytes;
                    self.flags = flags;
                }
                InfoReply::BlockSize(sizes) => self.block_sizes = Some(sizes),
                _ => {}
            }
        }
    }

    /// Sends a request; returns its handle.
    pub async fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Handle {
        let handle = Handle(self.next_handle);
        self.next_handle += 1;
        if command == Command::Read {
            self.reads.insert(handle.0, length);
        }
        let mut out = Vec::new();
        Request {
            header: RequestHeader {
                flags: CommandFlags(flags),
                command,
                handle,
                offset,
                length,
            },
            payload,
        }
        .encode(&mut out);
        self.send_raw(&out).await;
        handle
    }

    /// Reads the next reply: a simple reply (always possible for non-reads, even with
    /// structured replies negotiated) or all chunks of a structured one.
    pub async fn reply(&mut self) -> Reply {
        let mut error = ErrorCode::OK;
        let mut data = Vec::new();
        loop {
            let mut magic = [0u8; 4];
            bounded("reply magic", self.stream.read_exact(&mut magic))
                .await
                .unwrap();
            if u32::from_be_bytes(magic) == nbd::transmission::SIMPLE_REPLY_MAGIC {
                assert!(
                    data.is_empty() && error == ErrorCode::OK,
                    "simple reply inside a structured one"
                );
                let mut header = [0u8; SimpleReplyHeader::LEN];
                header[..4].copy_from_slice(&magic);
                bounded("simple reply", self.stream.read_exact(&mut header[4..]))
                    .await
                    .unwrap();
                let (reply, _) = SimpleReplyHeader::decode(&header).unwrap();
                if let Some(len) = self.reads.remove(&reply.handle.0) {
                    assert!(
                        !self.structured,
                        "simple reply to a read with structured replies"
                    );
                    if reply.error == ErrorCode::OK {
                        data.resize(len as usize, 0);
                        bounded("read data", self.stream.read_exact(&mut data))
                            .await
                            .unwrap();
                    }
                }
                return Reply {
                    handle: reply.handle,
                    error: reply.error,
                    data,
                };
            }
            assert!(self.structured, "structured chunk without negotiation");
            let mut header = [0u8; ChunkHeader::LEN];
            header[..4].copy_from_slice(&magic);
            bounded("chunk header", self.stream.read_exact(&mut header[4..]))
                .await
                .unwrap();
            let (chunk_header, _) = ChunkHeader::decode(&header).unwrap();
            let mut frame = header.to_vec();
            frame.resize(ChunkHeader::LEN + chunk_header.payload_bytes as usize, 0);
            bounded(
                "chunk payload",
                self.stream.read_exact(&mut frame[ChunkHeader::LEN..]),
            )
            .await
            .unwrap();
            let (chunk, _) = StructuredChunk::decode(&frame, u32::MAX).unwrap();
            match chunk.body {
                ChunkBody::OffsetData { data: d, .. } => data.extend_from_slice(d),
                ChunkBody::Error { error: e, .. } => error = e,
                ChunkBody::None => {}
                other => panic!("unexpected chunk {other:?}"),
            }
            if chunk.flags.contains(nbd::ReplyFlags::DONE) {
                self.reads.remove(&chunk.handle.0);
                return Reply {
                    handle: chunk.handle,
                    error,
                    data,
                };
            }
        }
    }

    /// Sends one request and reads its reply.
    pub async fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        let handle = self.send(command, flags, offset, length, payload).await;
        let reply = self.reply().await;
        assert_eq!(reply.handle, handle);
        reply
    }

    /// Whether the server closed the connection (EOF within the step bound).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            bounded("eof", self.stream.read(&mut buf)).await,
            Ok(0) | Err(_)
        )
    }
}

/// A backing device that holds reads at one offset until released, to force out-of-order
/// replies.
#[derive(Debug)]
pub struct GatedDevice {
    pub inner: source_agent::backing::MemDevice,
    pub gate_offset: u64,
    pub open: std::sync::Mutex<bool>,
    pub cond: std::sync::Condvar,
}

impl GatedDevice {
    pub fn new(size: usize, gate_offset: u64) -> Self {
        Self {
            inner: source_agent::backing::MemDevice::new(size),
            gate_offset,
            open: std::sync::Mutex::new(false),
            cond: std::sync::Condvar::new(),
        }
    }

    pub fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

impl BlockDevice for GatedDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset == self.gate_offset {
            let guard = self.open.lock().unwrap();
            let _open = self
                .cond
                .wait_timeout_while(guard, STEP, |open| !*open)
                .unwrap();
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(data, offset)
    }
    fn zero_range(&self, offset: u64, length: u64, may_punch: bool) -> std::io::Result<()> {
        self.inner.zero_range(offset, length, may_punch)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
}
