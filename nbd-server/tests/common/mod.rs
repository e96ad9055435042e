//! Test harness: an in-memory backend that records every call and can hold or fail requests,
//! an events hook that counts, a server context on in-memory pipes, and a minimal raw NBD
//! client built on the `nbd` codecs. Every wait is bounded, so a hung server fails the test.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // test helpers

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd::{
    BlockSizes, ChunkBody, ChunkHeader, ClientFlags, ClientOption, Command, CommandFlags,
    ErrorCode, ExportQuery, Handle, InfoReply, InfoType, Operation, OptionReply, ReplyType,
    Request, RequestHeader, ServerGreeting, SimpleReplyHeader, StructuredChunk, TransmissionFlags,
};
use nbd_server::{
    BackendError, BackendFuture, Export, ExportBackend, ServerContext, ServerEvents, ServerLimits,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{watch, Semaphore};

/// Longest any single step may take.
pub const STEP: Duration = Duration::from_secs(20);

/// Runs `f` with a deadline.
pub async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

/// An in-memory export: its bytes, every operation it was asked to carry out, an optional
/// failure for every request, and an optional gate that holds reads at one offset.
#[derive(Debug)]
pub struct MemBackend {
    pub data: Mutex<Vec<u8>>,
    pub calls: Mutex<Vec<Operation>>,
    pub fail: Mutex<Option<BackendError>>,
    /// Answer reads with this many bytes instead of the requested length.
    pub short_reads: Mutex<Option<usize>>,
    pub gate_offset: Option<u64>,
    pub gate: Semaphore,
}

impl MemBackend {
    pub fn new(size: usize, fill: u8) -> Self {
        Self {
            data: Mutex::new(vec![fill; size]),
            calls: Mutex::new(Vec::new()),
            fail: Mutex::new(None),
            short_reads: Mutex::new(None),
            gate_offset: None,
            gate: Semaphore::new(0),
        }
    }

    /// Holds reads at `offset` until `release`.
    pub fn gated(mut self, offset: u64) -> Self {
        self.gate_offset = Some(offset);
        self
    }

    pub fn release(&self) {
        self.gate.add_permits(1);
    }

    pub fn calls(&self) -> Vec<Operation> {
        self.calls.lock().unwrap().clone()
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

impl ExportBackend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn execute(&self, op: Operation, payload: Vec<u8>) -> BackendFuture<'_> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(op);
            if let Some(e) = self.fail.lock().unwrap().clone() {
                return Err(e);
            }
            match op {
                Operation::Read { offset, length } => {
                    if self.gate_offset == Some(offset) {
                        self.gate.acquire().await.unwrap().forget();
                    }
                    let start = offset as usize;
                    let mut data =
                        self.data.lock().unwrap()[start..start + length as usize].to_vec();
                    if let Some(len) = *self.short_reads.lock().unwrap() {
                        data.truncate(len);
                    }
                    Ok(Some(data))
                }
                Operation::Write { offset, .. } => {
                    let start = offset as usize;
                    self.data.lock().unwrap()[start..start + payload.len()]
                        .copy_from_slice(&payload);
                    Ok(None)
                }
                Operation::Trim { offset, length, .. }
                | Operation::WriteZeroes { offset, length, .. } => {
                    let start = offset as usize;
                    self.data.lock().unwrap()[start..start + length as usize].fill(0);
                    Ok(None)
                }
                Operation::Flush => Ok(None),
            }
        })
    }
}

/// Counts what the server reports.
#[derive(Debug, Default)]
pub struct Counts {
    pub open: AtomicI64,
    pub rejected: Mutex<Vec<(String, ErrorCode)>>,
}

impl ServerEvents for Counts {
    fn connection_opened(&self) {
        self.open.fetch_add(1, Ordering::SeqCst);
    }
    fn connection_closed(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
    fn rejected(&self, export: &str, error: ErrorCode) {
        self.rejected
            .lock()
            .unwrap()
            .push((export.to_owned(), error));
    }
}

pub const BLOCK_SIZES: BlockSizes = BlockSizes {
    min_bytes: 512,
    preferred_bytes: 4096,
    max_bytes: 1 << 20,
};

/// An export of `backend`.
pub fn export(name: &str, backend: &Arc<MemBackend>, read_only: bool) -> Export {
    Export {
        name: name.to_owned(),
        description: format!("test export {name}"),
        block_sizes: BLOCK_SIZES,
        backend: Arc::clone(backend) as Arc<dyn ExportBackend>,
        read_only,
    }
}

/// A server context with no listener: connections come from `connect`.
pub struct Server {
    pub ctx: Arc<ServerContext>,
    pub events: Arc<Counts>,
    pub stop: watch::Sender<bool>,
}

impl Server {
    pub fn new() -> Self {
        Self::with_limits(ServerLimits::default())
    }

    pub fn with_limits(limits: ServerLimits) -> Self {
        let (stop, shutdown) = watch::channel(false);
        let events = Arc::new(Counts::default());
        let ctx = Arc::new(ServerContext::new(
            limits,
            Arc::clone(&events) as Arc<dyn ServerEvents>,
            shutdown,
        ));
        Self { ctx, events, stop }
    }

    /// A client at the start of the handshake, on an in-memory pipe.
    pub async fn connect(&self) -> Client<DuplexStream> {
        let (client, server) = tokio::io::duplex(4 << 20);
        nbd_server::spawn_connection(server, "test".to_owned(), &self.ctx);
        Client::greet(client).await
    }

    /// A client in transmission on `export` (via GO).
    pub async fn client(&self, export: &str, structured: bool) -> Client<DuplexStream> {
        let mut client = self.connect().await;
        if structured {
            assert_eq!(
                client.option(ClientOption::StructuredReply).await[0].0,
                ReplyType::ACK
            );
            client.structured = true;
        }
        client.go(export).await;
        client
    }

    /// Waits until exactly `n` connections are open.
    pub async fn wait_open(&self, n: i64) {
        bounded("open connections", async {
            while self.events.open.load(Ordering::SeqCst) != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub handle: Handle,
    pub error: ErrorCode,
    pub data: Vec<u8>,
    /// The message of a structured error chunk.
    pub message: String,
    /// Every byte the reply took on the wire.
    pub raw: Vec<u8>,
}

/// A raw NBD client.
pub struct Client<S> {
    pub stream: S,
    pub structured: bool,
    pub size_bytes: u64,
    pub flags: TransmissionFlags,
    reads: HashMap<u64, u32>,
    next_handle: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Reads the greeting and sends client flags (fixed newstyle, no zeroes).
    pub async fn greet(mut stream: S) -> Self {
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
            reads: HashMap::new(),
            next_handle: 1,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends an option and reads replies up to the final one (ACK or an error).
    pub async fn option(&mut self, option: ClientOption<'_>) -> Vec<(ReplyType, Vec<u8>)> {
        let mut out = Vec::new();
        option.encode(&mut out);
        self.send_raw(&out).await;
        let mut replies = Vec::new();
        loop {
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
            let last = reply.reply == ReplyType::ACK || reply.reply.is_error();
            replies.push((reply.reply, reply.data.to_vec()));
            if last {
                return replies;
            }
        }
    }

    /// `NBD_OPT_GO`; returns the replies (the size and flags are kept on success).
    pub async fn try_go(&mut self, export: &str) -> Vec<(ReplyType, Vec<u8>)> {
        let replies = self
            .option(ClientOption::Go(ExportQuery {
                name: export,
                info_requests: vec![InfoType::BLOCK_SIZE],
            }))
            .await;
        for (kind, data) in &replies {
            if *kind == ReplyType::INFO {
                if let InfoReply::Export { size_bytes, flags } = InfoReply::parse(data).unwrap() {
                    self.size_bytes = size_bytes;
                    self.flags = flags;
                }
            }
        }
        replies
    }

    /// `NBD_OPT_GO`; panics unless it succeeds.
    pub async fn go(&mut self, export: &str) {
        let replies = self.try_go(export).await;
        assert_eq!(
            replies.last().unwrap().0,
            ReplyType::ACK,
            "GO {export}: {replies:?}"
        );
    }

    /// `NBD_OPT_LIST`: the names served.
    pub async fn list(&mut self) -> Vec<String> {
        let replies = self.option(ClientOption::List).await;
        assert_eq!(replies.last().unwrap().0, ReplyType::ACK);
        replies
            .iter()
            .filter(|(kind, _)| *kind == ReplyType::SERVER)
            .map(|(_, data)| nbd::ServerEntry::parse(data).unwrap().name.to_owned())
            .collect()
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

    /// Reads the next reply (a simple reply, or every chunk of a structured one).
    pub async fn reply(&mut self) -> Reply {
        let mut error = ErrorCode::OK;
        let mut data = Vec::new();
        let mut message = String::new();
        let mut raw = Vec::new();
        loop {
            let mut magic = [0u8; 4];
            bounded("reply magic", self.stream.read_exact(&mut magic))
                .await
                .unwrap();
            if u32::from_be_bytes(magic) == nbd::transmission::SIMPLE_REPLY_MAGIC {
                let mut header = [0u8; SimpleReplyHeader::LEN];
                header[..4].copy_from_slice(&magic);
                bounded("simple reply", self.stream.read_exact(&mut header[4..]))
                    .await
                    .unwrap();
                raw.extend_from_slice(&header);
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
                        raw.extend_from_slice(&data);
                    }
                }
                return Reply {
                    handle: reply.handle,
                    error: reply.error,
                    data,
                    message,
                    raw,
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
            raw.extend_from_slice(&frame);
            let (chunk, _) = StructuredChunk::decode(&frame, u32::MAX).unwrap();
            match chunk.body {
                ChunkBody::OffsetData { data: d, .. } => data.extend_from_slice(d),
                ChunkBody::Error {
                    error: e,
                    message: m,
                } => {
                    error = e;
                    message = m.to_owned();
                }
                ChunkBody::None => {}
                other => panic!("unexpected chunk {other:?}"),
            }
            if chunk.flags.contains(nbd::ReplyFlags::DONE) {
                self.reads.remove(&chunk.handle.0);
                return Reply {
                    handle: chunk.handle,
                    error,
                    data,
                    message,
                    raw,
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
