//! The server with in-memory backends over in-memory pipes (and one real Unix socket), driven
//! by a raw client on the `nbd` codecs: read-only exports refuse every write with `EPERM`
//! without calling the backend, exports come and go while the server runs, and a backend's
//! error text never reaches the client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

mod common;

use std::sync::Arc;

use common::{bounded, export, Client, MemBackend, Server};
use nbd::{
    BlockSizes, ClientOption, Command, ErrorCode, ExportQuery, Operation, ReplyType,
    TransmissionFlags,
};
use nbd_server::{
    AddExportError, BackendError, ServerLimits, READ_ONLY_EXPORT_FLAGS, WRITABLE_EXPORT_FLAGS,
};

const SIZE: usize = 1 << 20;

#[test]
fn advertised_flags() {
    use TransmissionFlags as T;
    // The writable flags are exactly what cdp-agent has always advertised.
    assert_eq!(
        WRITABLE_EXPORT_FLAGS.0,
        0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100
    );
    assert_eq!(READ_ONLY_EXPORT_FLAGS.0, 0x0001 | 0x0002 | 0x0100);
    for flag in [
        T::SEND_FLUSH,
        T::SEND_FUA,
        T::SEND_TRIM,
        T::SEND_WRITE_ZEROES,
    ] {
        assert!(!READ_ONLY_EXPORT_FLAGS.contains(flag));
    }
}

async fn read_only_export(structured: bool) {
    let server = Server::new();
    let backend = Arc::new(MemBackend::new(SIZE, 0x5a));
    server
        .ctx
        .add_export(export("view", &backend, true))
        .unwrap();
    let mut client = server.client("view", structured).await;
    let mut expected = READ_ONLY_EXPORT_FLAGS;
    if structured {
        expected = expected | TransmissionFlags::SEND_DF;
    }
    assert_eq!(client.flags, expected, "structured {structured}");
    assert_eq!(client.size_bytes, SIZE as u64);

    // (command, flags, offset, length, payload bytes) and the error it must get.
    let cases: &[(&str, Command, u16, u64, u32, usize, ErrorCode)] = &[
        ("write", Command::Write, 0, 0, 4096, 4096, ErrorCode::EPERM),
        (
            "write with FUA",
            Command::Write,
            1,
            4096,
            512,
            512,
            ErrorCode::EPERM,
        ),
        (
            "write past the end",
            Command::Write,
            0,
            SIZE as u64,
            512,
            512,
            ErrorCode::EPERM,
        ),
        (
            "zero-length write",
            Command::Write,
            0,
            0,
            0,
            0,
            ErrorCode::EPERM,
        ),
        ("trim", Command::Trim, 0, 0, 4096, 0, ErrorCode::EPERM),
        (
            "write-zeroes",
            Command::WriteZeroes,
            0,
            0,
            4096,
            0,
            ErrorCode::EPERM,
        ),
        (
            "write-zeroes NO_HOLE FUA",
            Command::WriteZeroes,
            3,
            0,
            4096,
            0,
            ErrorCode::EPERM,
        ),
        (
            "flush (not advertised)",
            Command::Flush,
            0,
            0,
            0,
            0,
            ErrorCode::EINVAL,
        ),
        (
            "read with FUA (not advertised)",
            Command::Read,
            1,
            0,
            512,
            0,
            ErrorCode::EINVAL,
        ),
    ];
    for &(name, command, flags, offset, length, payload, error) in cases {
        let reply = client
            .call(command, flags, offset, length, &vec![0xee; payload])
            .await;
        assert_eq!(reply.error, error, "{name} (structured {structured})");
    }
    // The connection is still in step, reads work, and the backend saw only the read.
    let read = client.call(Command::Read, 0, 8192, 4096, &[]).await;
    assert_eq!((read.error, read.data), (ErrorCode::OK, vec![0x5a; 4096]));
    assert_eq!(
        backend.calls(),
        vec![Operation::Read {
            offset: 8192,
            length: 4096
        }]
    );
    assert_eq!(backend.snapshot(), vec![0x5a; SIZE]);
    let rejected = server.events.rejected.lock().unwrap().clone();
    assert_eq!(rejected.len(), cases.len());
    assert_eq!(
        rejected
            .iter()
            .filter(|(name, e)| name == "view" && *e == ErrorCode::EPERM)
            .count(),
        7
    );
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm_simple() {
    read_only_export(false).await;
}

#[tokio::test]
async fn read_only_export_refuses_writes_with_eperm_structured() {
    read_only_export(true).await;
}

#[tokio::test]
async fn read_only_flag_with_export_name_and_info() {
    let server = Server::new();
    let backend = Arc::new(MemBackend::new(SIZE, 0));
    server
        .ctx
        .add_export(export("view", &backend, true))
        .unwrap();
    server
        .ctx
        .add_export(export("disk", &backend, false))
        .unwrap();
    for (name, flags) in [
        ("view", READ_ONLY_EXPORT_FLAGS),
        ("disk", WRITABLE_EXPORT_FLAGS),
    ] {
        // NBD_OPT_INFO.
        let mut client = server.connect().await;
        let replies = client
            .option(ClientOption::Info(ExportQuery {
                name,
                info_requests: vec![],
            }))
            .await;
        let info = nbd::InfoReply::parse(&replies[0].1).unwrap();
        assert_eq!(
            info,
            nbd::InfoReply::Export {
                size_bytes: SIZE as u64,
                flags
            }
        );
        // NBD_OPT_EXPORT_NAME.
        let mut out = Vec::new();
        ClientOption::ExportName { name }.encode(&mut out);
        client.send_raw(&out).await;
        let mut reply = [0u8; 10];
        use tokio::io::AsyncReadExt;
        bounded("export name reply", client.stream.read_exact(&mut reply))
            .await
            .unwrap();
        let (reply, _) = nbd::ExportNameReply::decode(&reply, false).unwrap();
        assert_eq!((reply.size_bytes, reply.flags), (SIZE as u64, flags));
    }
}

#[tokio::test]
async fn exports_are_added_and_removed_while_serving() {
    let server = Server::new();
    let a = Arc::new(MemBackend::new(SIZE, 0xaa).gated(0));
    let b = Arc::new(MemBackend::new(SIZE, 0xbb));
    server.ctx.add_export(export("a", &a, true)).unwrap();
    let mut on_a = server.client("", false).await; // the only export is the default
    let mut idle_on_a = server.client("a", true).await;

    // Adding: new connections see it at once; the default name is now ambiguous.
    server.ctx.add_export(export("b", &b, false)).unwrap();
    assert_eq!(
        server.ctx.add_export(export("b", &b, false)).unwrap_err(),
        AddExportError::Exists { name: "b".into() }
    );
    let mut lister = server.connect().await;
    assert_eq!(lister.list().await, vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(
        lister.try_go("").await.last().unwrap().0,
        ReplyType::ERR_UNKNOWN
    );
    let mut on_b = server.client("b", true).await;
    assert_eq!(
        on_b.call(Command::Write, 0, 0, 512, &[1; 512]).await.error,
        ErrorCode::OK
    );

    // Removing `a` while one of its reads is held in the backend.
    let held = on_a.send(Command::Read, 0, 0, 4096, &[]).await;
    bounded("read reaches the backend", async {
        while a.calls().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let removed = server.ctx.remove_export("a").unwrap();
    assert_eq!(removed.export.name, "a");
    assert!(server.ctx.remove_export("a").is_none());
    assert!(server.ctx.export("a").is_none());
    // New connections no longer find it.
    let mut late = server.connect().await;
    assert_eq!(late.list().await, vec!["b".to_owned()]);
    assert_eq!(
        late.try_go("a").await,
        vec![(ReplyType::ERR_UNKNOWN, b"no export named \"a\"".to_vec())]
    );
    // Its idle connection is closed; the busy one finishes the read in flight, then closes.
    assert!(idle_on_a.closed().await);
    let pending = tokio::spawn(async move { removed.closed().await });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !pending.is_finished(),
        "closed() must wait for the request in flight"
    );
    a.release();
    let reply = on_a.reply().await;
    assert_eq!(
        (reply.handle, reply.error, reply.data),
        (held, ErrorCode::OK, vec![0xaa; 4096])
    );
    assert!(on_a.closed().await);
    bounded("removed export closed", pending).await.unwrap();
    assert_eq!(a.calls().len(), 1);

    // `b` is untouched, and `a` can come back (a new export under the old name).
    assert_eq!(
        on_b.call(Command::Read, 0, 0, 512, &[]).await.data,
        vec![1; 512]
    );
    server.ctx.add_export(export("a", &b, true)).unwrap();
    let mut again = server.client("a", false).await;
    assert_eq!(
        again.call(Command::Read, 0, 0, 512, &[]).await.data,
        vec![1; 512]
    );
    server.wait_open(4).await; // lister, late, on_b, again
}

#[tokio::test]
async fn removing_an_export_nobody_uses_is_closed_at_once() {
    let server = Server::new();
    let backend = Arc::new(MemBackend::new(SIZE, 0));
    server.ctx.add_export(export("v", &backend, true)).unwrap();
    let removed = server.ctx.remove_export("v").unwrap();
    bounded("closed", removed.closed()).await;
    assert!(server.ctx.exports().is_empty());
}

async fn backend_errors(structured: bool) {
    let server = Server::new();
    let backend = Arc::new(MemBackend::new(SIZE, 0));
    server.ctx.add_export(export("d", &backend, false)).unwrap();
    let mut client = server.client("d", structured).await;
    let secret = "backing disk d: /dev/mapper/secret-volume: No space left on device (os error 28)";
    // (error the backend returns, error the client must get)
    for (code, expected) in [
        (ErrorCode::ENOSPC, ErrorCode::ENOSPC),
        (ErrorCode::EIO, ErrorCode::EIO),
        (ErrorCode::OK, ErrorCode::EIO),
    ] {
        *backend.fail.lock().unwrap() = Some(BackendError::new(code, secret));
        for (command, payload) in [
            (Command::Write, vec![7; 4096]),
            (Command::Read, vec![]),
            (Command::Flush, vec![]),
        ] {
            let length = if command == Command::Flush { 0 } else { 4096 };
            let reply = client.call(command, 0, 0, length, &payload).await;
            let what = format!(
                "{command:?} failing with {} (structured {structured})",
                code.name()
            );
            assert_eq!(reply.error, expected, "{what}");
            assert_eq!(reply.message, "", "{what}: the message reached the client");
            assert!(reply.data.is_empty(), "{what}");
            let raw = String::from_utf8_lossy(&reply.raw);
            assert!(
                !raw.contains("secret") && !raw.contains("os error"),
                "{what}: {raw:?}"
            );
        }
    }
    // A read answered with the wrong length is an EIO, not a desynchronised stream.
    *backend.fail.lock().unwrap() = None;
    *backend.short_reads.lock().unwrap() = Some(100);
    assert_eq!(
        client.call(Command::Read, 0, 0, 4096, &[]).await.error,
        ErrorCode::EIO
    );
    *backend.short_reads.lock().unwrap() = None;
    let read = client.call(Command::Read, 0, 0, 4096, &[]).await;
    assert_eq!((read.error, read.data.len()), (ErrorCode::OK, 4096));
    // Requests `nbd::judge` refuses keep the protocol's reason (it is not internal).
    let refused = client.call(Command::Read, 0, 1, 512, &[]).await;
    assert_eq!(refused.error, ErrorCode::EINVAL);
    if structured {
        assert_eq!(
            refused.message,
            "request not aligned to the minimum block size"
        );
    }
}

#[tokio::test]
async fn backend_error_text_never_reaches_the_client_simple() {
    backend_errors(false).await;
}

#[tokio::test]
async fn backend_error_text_never_reaches_the_client_structured() {
    backend_errors(true).await;
}

#[test]
fn exports_that_break_a_rule_are_refused() {
    let server = Server::with_limits(ServerLimits {
        inflight_bytes_max: 1 << 20,
        ..ServerLimits::default()
    });
    let backend = Arc::new(MemBackend::new(SIZE, 0));
    let check = |name: &str, description: &str, block_sizes: BlockSizes, expected: &str| {
        let mut e = export(name, &backend, false);
        e.description = description.to_owned();
        e.block_sizes = block_sizes;
        let got = match server.ctx.add_export(e) {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "{name:?}");
    };
    let sizes = common::BLOCK_SIZES;
    check(
        "",
        "",
        sizes,
        "export \"\": the empty name is reserved for the default export",
    );
    check(
        "a\0b",
        "",
        sizes,
        "export \"a\\0b\": a name is at most 4096 bytes without NUL",
    );
    check(
        &"n".repeat(4097),
        "",
        sizes,
        &format!(
            "export {:?}: a name is at most 4096 bytes without NUL",
            "n".repeat(4097)
        ),
    );
    check(
        "d",
        "x\0",
        sizes,
        "export \"d\": a description is at most 4096 bytes without NUL",
    );
    check(
        "d",
        "",
        BlockSizes {
            min_bytes: 3,
            ..sizes
        },
        "export \"d\": minimum block size must be a power of two no larger than 65536",
    );
    check(
        "d",
        "",
        BlockSizes {
            max_bytes: 2 << 20,
            ..sizes
        },
        "export \"d\": the maximum block size exceeds the server's inflight_bytes_max",
    );
    check("d", "", sizes, "ok");
    check("d", "", sizes, "export \"d\" already exists");
    assert_eq!(server.ctx.exports().len(), 1);
}

#[tokio::test]
async fn unix_listener_serves_until_shutdown_then_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let server = Server::new();
    let backend = Arc::new(MemBackend::new(SIZE, 0x11));
    server.ctx.add_export(export("d", &backend, false)).unwrap();
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let accept = tokio::spawn(nbd_server::serve_unix(
        listener,
        path.clone(),
        Arc::clone(&server.ctx),
    ));
    let stream = bounded("connect", tokio::net::UnixStream::connect(&path))
        .await
        .unwrap();
    let mut client = Client::greet(stream).await;
    client.go("d").await;
    assert_eq!(client.flags, WRITABLE_EXPORT_FLAGS);
    let write = client.call(Command::Write, 1, 0, 512, &[9; 512]).await;
    assert_eq!(write.error, ErrorCode::OK);
    assert_eq!(
        backend.calls(),
        vec![Operation::Write {
            offset: 0,
            length: 512,
            fua: true
        }]
    );
    server.wait_open(1).await;
    server.stop.send(true).unwrap();
    bounded("accept loop stops", accept).await.unwrap();
    assert!(!path.exists(), "the socket file is removed");
    assert!(client.closed().await);
    bounded("drained", server.ctx.drained()).await;
    server.wait_open(0).await;
}
