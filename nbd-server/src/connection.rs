//! One NBD connection: the fixed-newstyle handshake, then the transmission phase with many
//! requests in flight (replies may go out of order; writes to the socket are serialized by
//! one lock), and the bounded linger that keeps a last error reply from being lost to a
//! connection reset.
//!
//! This file only moves bytes; what is valid comes from the `nbd` crate. Must never: let a
//! request `nbd::judge` did not accept reach a backend, buffer more than the context's bounds,
//! panic on anything a client sends, or put a backend's error message on the wire.

use std::sync::Arc;
use std::time::Duration;

use nbd::{
    ChunkBody, ChunkHeader, ClientFlags, ClientOption, ErrorCode, ExportNameReply, ExportQuery,
    HandshakeFlags, InfoReply, InfoType, Operation, OptionCode, OptionHeader, OptionReply,
    OptionRequest, ReplyFlags, ReplyType, RequestHeader, ServerEntry, ServerGreeting,
    SimpleReplyHeader, StructuredChunk, Verdict,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, WriteHalf};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::backend::{BackendError, Export};
use crate::context::ServerContext;

/// Bytes read at a time when throwing data away.
const DISCARD_CHUNK_BYTES: usize = 64 << 10;
/// How long a closing connection keeps reading what the client still sends, so the close
/// does not turn into a reset that destroys the error reply in flight.
const LINGER_MS: u64 = 2_000;
/// Bytes a closing connection reads at most while lingering.
const LINGER_BYTES_MAX: u64 = 64 << 20;
/// Capacity of a connection's reply buffer, in bytes.
const REPLY_BUFFER_BYTES: usize = 256 << 10;

/// Serves one accepted connection if the connection limit allows, in its own task; otherwise
/// closes it at once. `peer` names the client in the log.
pub fn spawn_connection<S>(stream: S, peer: String, ctx: &Arc<ServerContext>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = Arc::clone(&ctx.connections).try_acquire_owned() else {
        tracing::warn!(%peer, "connection limit reached, closing new connection");
        return;
    };
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        ctx.events().connection_opened();
        tracing::debug!(%peer, "connection opened");
        let end = serve_connection(stream, &ctx).await;
        tracing::debug!(%peer, ?end, "connection closed");
        ctx.events().connection_closed();
        drop(permit);
    });
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_OPT_ABORT` or `NBD_CMD_DISC`.
    ClientDone,
    /// The client closed the socket or a read failed (a partial request is dropped).
    ClientGone,
    /// The client broke the protocol in a way that cannot be answered; hung up.
    Violation(&'static str),
    /// The handshake took too long.
    Timeout,
    /// The server is stopping.
    Shutdown,
    /// The export was removed while the connection used it.
    Removed,
}

/// Completes once `signal` is `true` (or its sender is gone). The watch guard is dropped
/// inside, so callers stay `Send`.
async fn raised(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|raised| *raised).await;
}

/// Completes when the server stops or the export is removed, saying which.
async fn closing(shutdown: &mut watch::Receiver<bool>, removed: &mut watch::Receiver<bool>) -> End {
    tokio::select! {
        biased;
        _ = raised(shutdown) => End::Shutdown,
        _ = raised(removed) => End::Removed,
    }
}

async fn serve_connection<S>(mut stream: S, ctx: &ServerContext) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = ctx.shutdown();
    let timeout = Duration::from_millis(ctx.limits().handshake_timeout_ms);
    let handshake = tokio::select! {
        biased;
        _ = raised(&mut shutdown) => return End::Shutdown,
        outcome = tokio::time::timeout(timeout, handshake(&mut stream, ctx)) => outcome,
    };
    match handshake {
        Err(_) => End::Timeout,
        Ok(Handshake::Closed(end)) => end,
        Ok(Handshake::Linger) => {
            linger(&mut stream).await;
            End::Violation("oversize option data")
        }
        Ok(Handshake::Transmission {
            export,
            removed,
            structured,
        }) => transmission(stream, export, removed, structured, ctx).await,
    }
}

enum Handshake {
    Transmission {
        export: Arc<Export>,
        /// The export's removal signal, taken when the client selected it.
        removed: watch::Receiver<bool>,
        structured: bool,
    },
    Closed(End),
    /// Close after draining what the client still sends (an error reply is in flight).
    Linger,
}

async fn handshake<S>(io: &mut S, ctx: &ServerContext) -> Handshake
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limits = ctx.limits();
    let offered = HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES;
    let mut out = Vec::with_capacity(256);
    ServerGreeting { flags: offered }.encode(&mut out);
    if send(io, &mut out).await.is_err() {
        return Handshake::Closed(End::ClientGone);
    }
    let mut flags_buf = [0u8; ClientFlags::LEN];
    if io.read_exact(&mut flags_buf).await.is_err() {
        return Handshake::Closed(End::ClientGone);
    }
    let Ok((client, _)) = ClientFlags::decode(&flags_buf, offered) else {
        return Handshake::Closed(End::Violation("unknown client flags"));
    };
    let mut structured = false;
    let mut data = Vec::new();
    for _ in 0..limits.options_per_connection_max {
        let mut header_buf = [0u8; OptionHeader::LEN];
        if io.read_exact(&mut header_buf).await.is_err() {
            return Handshake::Closed(End::ClientGone);
        }
        let Ok((header, _)) = OptionHeader::decode(&header_buf) else {
            return Handshake::Closed(End::Violation("bad option magic"));
        };
        let code = header.code;
        if header.data_bytes > limits.option_bytes_max {
            if code == OptionCode::EXPORT_NAME {
                // EXPORT_NAME cannot be answered with an error: hang up.
                return Handshake::Linger;
            }
            let message = format!(
                "option data of {} bytes exceeds the limit of {} bytes",
                header.data_bytes, limits.option_bytes_max
            );
            OptionReply::encode_error(code, ReplyType::ERR_TOO_BIG, &message, &mut out);
            if header.data_bytes > limits.option_discard_bytes_max {
                let _ = send(io, &mut out).await;
                return Handshake::Linger;
            }
            if discard(io, u64::from(header.data_bytes)).await.is_err()
                || send(io, &mut out).await.is_err()
            {
                return Handshake::Closed(End::ClientGone);
            }
            continue;
        }
        data.resize(header.data_bytes as usize, 0);
        if io.read_exact(&mut data).await.is_err() {
            return Handshake::Closed(End::ClientGone);
        }
        let request = OptionRequest { code, data: &data };
        let option = match ClientOption::parse(&request) {
            Ok(option) => option,
            Err(_) if code == OptionCode::EXPORT_NAME => {
                return Handshake::Closed(End::Violation("invalid export name"));
            }
            Err(e) => {
                OptionReply::encode_error(code, ReplyType::ERR_INVALID, &e.to_string(), &mut out);
                if send(io, &mut out).await.is_err() {
                    return Handshake::Closed(End::ClientGone);
                }
                continue;
            }
        };
        let mut enter = None;
        match option {
            ClientOption::ExportName { name } => {
                let Some((export, removed)) = ctx.lookup(name) else {
                    return Handshake::Closed(End::Violation("unknown export in EXPORT_NAME"));
                };
                let params = export.params(structured);
                ExportNameReply {
                    size_bytes: params.size_bytes,
                    flags: params.flags,
                    zero_padding: !client.no_zeroes,
                }
                .encode(&mut out);
                enter = Some((export, removed));
            }
            ClientOption::Abort => {
                OptionReply::encode_ack(code, &mut out);
                let _ = send(io, &mut out).await;
                return Handshake::Closed(End::ClientDone);
            }
            ClientOption::List => {
                for export in ctx.exports() {
                    OptionReply::encode_server(
                        &ServerEntry {
                            name: &export.name,
                            description: &export.description,
                        },
                        &mut out,
                    );
                }
                OptionReply::encode_ack(code, &mut out);
            }
            ClientOption::StartTls => OptionReply::encode_error(
                code,
                ReplyType::ERR_POLICY,
                "TLS is not offered by cdp-agent; use a Unix socket or a trusted network",
                &mut out,
            ),
            ClientOption::StructuredReply if structured => OptionReply::encode_error(
                code,
                ReplyType::ERR_INVALID,
                "structured replies are already negotiated",
                &mut out,
            ),
            ClientOption::StructuredReply => {
                structured = true;
                OptionReply::encode_ack(code, &mut out);
            }
            ClientOption::Info(query) => {
                describe(ctx, code, &query, structured, &mut out);
            }
            ClientOption::Go(query) => {
                enter = describe(ctx, code, &query, structured, &mut out);
            }
            ClientOption::Other { code, .. } => {
                let message = format!("option {} ({}) is not supported", code.0, code.name());
                OptionReply::encode_error(code, ReplyType::ERR_UNSUP, &message, &mut out);
            }
        }
        if send(io, &mut out).await.is_err() {
            return Handshake::Closed(End::ClientGone);
        }
        if let Some((export, removed)) = enter {
            return Handshake::Transmission {
                export,
                removed,
                structured,
            };
        }
    }
    Handshake::Closed(End::Violation("too many options"))
}

/// Answers `INFO`/`GO`: the export's information then `ACK`, or `ERR_UNKNOWN`. Returns the
/// export and its removal signal when the answer is a success.
fn describe(
    ctx: &ServerContext,
    code: OptionCode,
    query: &ExportQuery<'_>,
    structured: bool,
    out: &mut Vec<u8>,
) -> Option<(Arc<Export>, watch::Receiver<bool>)> {
    let Some((export, removed)) = ctx.lookup(query.name) else {
        let message = format!("no export named {:?}", query.name);
        OptionReply::encode_error(code, ReplyType::ERR_UNKNOWN, &message, out);
        return None;
    };
    let params = export.params(structured);
    OptionReply::encode_info(
        code,
        &InfoReply::Export {
            size_bytes: params.size_bytes,
            flags: params.flags,
        },
        out,
    );
    if query.requests(InfoType::NAME) {
        OptionReply::encode_info(code, &InfoReply::Name(&export.name), out);
    }
    if query.requests(InfoType::DESCRIPTION) {
        OptionReply::encode_info(code, &InfoReply::Description(&export.description), out);
    }
    // Sent whether asked or not (the protocol allows it): clients that understand it learn
    // the constraints, the others are held to them with EINVAL.
    OptionReply::encode_info(code, &InfoReply::BlockSize(params.block_sizes), out);
    OptionReply::encode_ack(code, out);
    Some((export, removed))
}

type Writer<S> = Arc<Mutex<BufWriter<WriteHalf<S>>>>;

/// A reply to send: success (with the data of a read), or an NBD error with the message a
/// structured error chunk carries (empty for backend errors, whose text stays in the log).
type Reply = Result<Option<Vec<u8>>, (ErrorCode, &'static str)>;

async fn transmission<S>(
    stream: S,
    export: Arc<Export>,
    mut removed: watch::Receiver<bool>,
    structured: bool,
    ctx: &ServerContext,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = ctx.limits();
    let (mut reader, writer) = tokio::io::split(stream);
    let writer: Writer<S> = Arc::new(Mutex::new(BufWriter::with_capacity(
        REPLY_BUFFER_BYTES,
        writer,
    )));
    let params = export.params(structured);
    let requests = Arc::new(Semaphore::new(
        usize::try_from(limits.requests_per_connection_max)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS),
    ));
    let mut shutdown = ctx.shutdown();
    let mut tasks = JoinSet::new();
    let mut linger_after = false;
    let end = loop {
        while tasks.try_join_next().is_some() {}
        let request_permit = tokio::select! {
            biased;
            end = closing(&mut shutdown, &mut removed) => break end,
            permit = Arc::clone(&requests).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break End::Shutdown,
            },
        };
        let mut header_buf = [0u8; RequestHeader::LEN];
        let read = tokio::select! {
            biased;
            end = closing(&mut shutdown, &mut removed) => break end,
            read = reader.read_exact(&mut header_buf) => read,
        };
        if read.is_err() {
            break End::ClientGone;
        }
        let Ok((header, _)) = RequestHeader::decode(&header_buf) else {
            break End::Violation("bad request magic");
        };
        let op = match nbd::judge(&header, &params) {
            Verdict::Disconnect => break End::ClientDone,
            Verdict::Reject { error, reason } => {
                ctx.events().rejected(&export.name, error);
                tracing::debug!(export = %export.name, ?header, error = error.name(), reason, "request rejected");
                let payload_bytes = u64::from(header.payload_bytes());
                let too_big = payload_bytes > u64::from(limits.write_discard_bytes_max);
                if !too_big && discard(&mut reader, payload_bytes).await.is_err() {
                    break End::ClientGone;
                }
                // The reason comes from `nbd::judge`: protocol text, nothing internal.
                let reply = Err((error, reason));
                if send_reply(&writer, &header, structured, reply)
                    .await
                    .is_err()
                {
                    break End::ClientGone;
                }
                if too_big {
                    linger_after = true;
                    break End::Violation("oversize write payload");
                }
                continue;
            }
            Verdict::Nothing => {
                if send_reply(&writer, &header, structured, Ok(None))
                    .await
                    .is_err()
                {
                    break End::ClientGone;
                }
                continue;
            }
            Verdict::Execute(op) => op,
        };
        let data_bytes = match op {
            Operation::Read { length, .. } | Operation::Write { length, .. } => length,
            _ => 0,
        };
        let data_permit = if data_bytes > 0 {
            // Never more than the semaphore holds: `add_export` checked that the maximum
            // block size fits in `inflight_bytes_max`.
            tokio::select! {
                biased;
                end = closing(&mut shutdown, &mut removed) => break end,
                permit = Arc::clone(&ctx.inflight_bytes).acquire_many_owned(data_bytes) => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => break End::Shutdown,
                },
            }
        } else {
            None
        };
        let mut payload = Vec::new();
        if let Operation::Write { length, .. } = op {
            payload.resize(length as usize, 0);
            let read = tokio::select! {
                biased;
                end = closing(&mut shutdown, &mut removed) => break end,
                read = reader.read_exact(&mut payload) => read,
            };
            // A client that vanishes mid-payload: the request is dropped, nothing is written.
            if read.is_err() {
                break End::ClientGone;
            }
        }
        let export = Arc::clone(&export);
        let writer = Arc::clone(&writer);
        tasks.spawn(async move {
            let result = export.backend.execute(op, payload).await;
            let reply = checked(&export.name, &op, result);
            let _ = send_reply(&writer, &header, structured, reply).await;
            drop(data_permit);
            drop(request_permit);
        });
    };
    // Finish every request in flight, then close.
    while tasks.join_next().await.is_some() {}
    let mut writer = writer.lock().await;
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
    drop(writer);
    if linger_after {
        let _ = tokio::time::timeout(
            Duration::from_millis(LINGER_MS),
            discard(&mut reader, LINGER_BYTES_MAX),
        )
        .await;
    }
    end
}

/// Turns a backend's answer into the reply: its error code without its message (which is
/// logged here), the data of a read only if it is exactly as long as asked (anything else
/// would desynchronise a simple-reply stream), and no data for any other operation.
fn checked(export: &str, op: &Operation, result: Result<Option<Vec<u8>>, BackendError>) -> Reply {
    match (op, result) {
        (_, Err(e)) => {
            tracing::warn!(export, error = %e, "request failed");
            let code = if e.code == ErrorCode::OK {
                ErrorCode::EIO
            } else {
                e.code
            };
            Err((code, ""))
        }
        (Operation::Read { length, .. }, Ok(Some(data))) if data.len() == *length as usize => {
            Ok(Some(data))
        }
        (Operation::Read { length, .. }, Ok(data)) => {
            let returned = data.map(|d| d.len());
            tracing::error!(
                export,
                length,
                ?returned,
                "backend answered a read with the wrong length"
            );
            Err((ErrorCode::EIO, ""))
        }
        (_, Ok(_)) => Ok(None),
    }
}

/// Sends the reply to `header`: data for a successful read, success, or an error (in a
/// structured error chunk, with its message, when structured replies were negotiated).
async fn send_reply<W: AsyncWrite + Unpin>(
    writer: &Mutex<BufWriter<W>>,
    header: &RequestHeader,
    structured: bool,
    reply: Reply,
) -> std::io::Result<()> {
    let handle = header.handle;
    let mut prefix = Vec::with_capacity(64);
    let mut data: &[u8] = &[];
    match (&reply, structured) {
        (Ok(Some(read)), true) => {
            ChunkHeader::encode_offset_data_prefix(
                handle,
                ReplyFlags::DONE,
                header.offset,
                nbd_len(read.len()),
                &mut prefix,
            );
            data = read;
        }
        (Ok(Some(read)), false) => {
            SimpleReplyHeader {
                error: ErrorCode::OK,
                handle,
            }
            .encode(&mut prefix);
            data = read;
        }
        (Ok(None), true) if header.command == nbd::Command::Read => StructuredChunk {
            flags: ReplyFlags::DONE,
            handle,
            body: ChunkBody::None,
        }
        .encode(&mut prefix),
        (Ok(None), _) => SimpleReplyHeader {
            error: ErrorCode::OK,
            handle,
        }
        .encode(&mut prefix),
        (Err((error, message)), true) => StructuredChunk {
            flags: ReplyFlags::DONE,
            handle,
            body: ChunkBody::Error {
                error: *error,
                message,
            },
        }
        .encode(&mut prefix),
        (Err((error, _)), false) => SimpleReplyHeader {
            error: *error,
            handle,
        }
        .encode(&mut prefix),
    }
    let mut writer = writer.lock().await;
    writer.write_all(&prefix).await?;
    writer.write_all(data).await?;
    writer.flush().await
}

/// Read sizes are bounded by the maximum block size (far below 4 GiB).
fn nbd_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

async fn send<W: AsyncWrite + Unpin>(io: &mut W, out: &mut Vec<u8>) -> std::io::Result<()> {
    let result = io.write_all(out).await;
    out.clear();
    result?;
    io.flush().await
}

/// Reads and drops `bytes` bytes.
async fn discard<R: AsyncRead + Unpin>(io: &mut R, bytes: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; DISCARD_CHUNK_BYTES.min(usize::try_from(bytes).unwrap_or(usize::MAX))];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let got = io.read(&mut buf[..n]).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= got as u64;
    }
    Ok(())
}

/// Closes the sending side, then drains what the client still sends for a bounded time, so
/// the last reply is not lost to a connection reset.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.shutdown().await;
    let _ = tokio::time::timeout(
        Duration::from_millis(LINGER_MS),
        discard(io, LINGER_BYTES_MAX),
    )
    .await;
}
