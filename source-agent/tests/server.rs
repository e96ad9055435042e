//! The agent's NBD server over a real Unix socket, driven by a raw client built on the `nbd`
//! codecs: every bad input gets its exact NBD error (or a close) and leaves the backing file
//! (blake3) and the journal (head seq) unchanged; many requests in flight, out-of-order
//! replies, multi-connection, FUA and FLUSH.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

mod common;

use std::sync::Arc;

use common::{bounded, Client, GatedDevice, Harness, Setup};
use nbd::{
    ClientOption, Command, ErrorCode, ExportQuery, OptionCode, OptionHeader, ReplyType,
    TransmissionFlags,
};
use source_agent::sink::{MemSink, Seq, SinkFault};
use source_agent::Overrides;

const MIB: u64 = 1 << 20;
const DISK: u64 = 4 * MIB;
const MAX: u32 = 32 << 20;

/// One bad (or empty) request and the reply it must get.
struct Case {
    name: &'static str,
    command: Command,
    flags: u16,
    offset: u64,
    length: u32,
    /// Payload bytes actually sent after the header.
    payload: usize,
    expected: ErrorCode,
}

fn cases() -> Vec<Case> {
    let case = |name, command, flags, offset, length, payload, expected| Case {
        name,
        command,
        flags,
        offset,
        length,
        payload,
        expected,
    };
    use Command::*;
    vec![
        case(
            "write past end",
            Write,
            0,
            DISK - 512,
            1024,
            1024,
            ErrorCode::ENOSPC,
        ),
        case(
            "write starting past end",
            Write,
            0,
            DISK,
            512,
            512,
            ErrorCode::ENOSPC,
        ),
        case(
            "write offset overflow",
            Write,
            0,
            u64::MAX - 511,
            1024,
            1024,
            ErrorCode::ENOSPC,
        ),
        case(
            "write-zeroes past end",
            WriteZeroes,
            0,
            DISK - 512,
            1024,
            0,
            ErrorCode::ENOSPC,
        ),
        case("read past end", Read, 0, DISK, 512, 0, ErrorCode::EINVAL),
        case(
            "trim past end",
            Trim,
            0,
            DISK - 512,
            4096,
            0,
            ErrorCode::EINVAL,
        ),
        case("zero-length write", Write, 0, 0, 0, 0, ErrorCode::OK),
        case("zero-length read", Read, 0, 4096, 0, 0, ErrorCode::OK),
        case("zero-length trim", Trim, 0, 0, 0, 0, ErrorCode::OK),
        case(
            "zero-length write-zeroes",
            WriteZeroes,
            0,
            0,
            0,
            0,
            ErrorCode::OK,
        ),
        case(
            "misaligned write offset",
            Write,
            0,
            100,
            512,
            512,
            ErrorCode::EINVAL,
        ),
        case(
            "misaligned write length",
            Write,
            0,
            0,
            100,
            100,
            ErrorCode::EINVAL,
        ),
        case("misaligned read", Read, 0, 1, 512, 0, ErrorCode::EINVAL),
        case("misaligned trim", Trim, 0, 512, 513, 0, ErrorCode::EINVAL),
        case(
            "misaligned write-zeroes",
            WriteZeroes,
            0,
            3,
            512,
            0,
            ErrorCode::EINVAL,
        ),
        case(
            "read larger than max",
            Read,
            0,
            0,
            MAX + 512,
            0,
            ErrorCode::EINVAL,
        ),
        case(
            "write larger than max",
            Write,
            0,
            0,
            MAX + 512,
            (MAX + 512) as usize,
            ErrorCode::EINVAL,
        ),
        case(
            "unknown command",
            Other(42),
            0,
            0,
            512,
            0,
            ErrorCode::EINVAL,
        ),
        case(
            "cache (not advertised)",
            Cache,
            0,
            0,
            512,
            0,
            ErrorCode::EINVAL,
        ),
        case(
            "block status (no meta context)",
            BlockStatus,
            0,
            0,
            512,
            0,
            ErrorCode::EINVAL,
        ),
        case(
            "unknown command flag",
            Write,
            0x40,
            0,
            512,
            512,
            ErrorCode::EINVAL,
        ),
        case(
            "NO_HOLE on a write",
            Write,
            2,
            0,
            512,
            512,
            ErrorCode::EINVAL,
        ),
        case(
            "FAST_ZERO not advertised",
            WriteZeroes,
            16,
            0,
            512,
            0,
            ErrorCode::EINVAL,
        ),
    ]
}

async fn bad_requests(structured: bool) {
    let harness = Harness::start().await;
    let before = harness.state();
    let mut client = harness.client("d0", structured).await;
    assert_eq!(client.block_sizes.unwrap().max_bytes, MAX);
    for case in cases() {
        let payload = vec![0xee; case.payload];
        let reply = client
            .call(case.command, case.flags, case.offset, case.length, &payload)
            .await;
        assert_eq!(
            reply.error, case.expected,
            "{} (structured {structured})",
            case.name
        );
        assert!(reply.data.is_empty(), "{}: data in reply", case.name);
        assert_eq!(
            harness.state(),
            before,
            "{} changed the disk or the journal",
            case.name
        );
    }
    // The stream stayed in sync: a valid request on the same connection still works.
    let reply = client.call(Command::Read, 0, 0, 4096, &[]).await;
    assert_eq!(reply.error, ErrorCode::OK);
    assert_eq!(reply.data, vec![0x5a; 4096]);
    assert_eq!(harness.state(), before);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_exact_errors_and_change_nothing_simple() {
    bad_requests(false).await;
}

#[tokio::test]
async fn bad_requests_get_exact_errors_and_change_nothing_structured() {
    bad_requests(true).await;
}

#[tokio::test]
async fn bad_options_get_exact_errors() {
    let harness = Harness::start().await;
    let before = harness.state();
    let mut client = Client::greet(harness.connect().await).await;

    let unknown = client
        .option(ClientOption::Other {
            code: OptionCode(99),
            data: b"abc",
        })
        .await;
    assert_eq!(unknown.last().unwrap().0, ReplyType::ERR_UNSUP);
    let meta = client
        .option(ClientOption::Other {
            code: OptionCode::SET_META_CONTEXT,
            data: &[],
        })
        .await;
    assert_eq!(meta.last().unwrap().0, ReplyType::ERR_UNSUP);
    let mut list_with_data = Vec::new();
    nbd::OptionRequest {
        code: OptionCode::LIST,
        data: b"x",
    }
    .encode(&mut list_with_data);
    client.send_raw(&list_with_data).await;
    assert_eq!(
        client.replies_until_final().await.last().unwrap().0,
        ReplyType::ERR_INVALID
    );
    let mut bad_go = Vec::new();
    nbd::OptionRequest {
        code: OptionCode::GO,
        data: &[0, 0, 0, 9, b'd'],
    }
    .encode(&mut bad_go);
    client.send_raw(&bad_go).await;
    assert_eq!(
        client.replies_until_final().await.last().unwrap().0,
        ReplyType::ERR_INVALID
    );
    let unknown_export = client
        .option(ClientOption::Info(ExportQuery {
            name: "nope",
            info_requests: vec![],
        }))
        .await;
    assert_eq!(
        unknown_export,
        vec![(ReplyType::ERR_UNKNOWN, b"no export named \"nope\"".to_vec())]
    );
    let tls = client.option(ClientOption::StartTls).await;
    assert_eq!(tls.last().unwrap().0, ReplyType::ERR_POLICY);
    assert_eq!(
        client.option(ClientOption::StructuredReply).await[0].0,
        ReplyType::ACK
    );
    assert_eq!(
        client.option(ClientOption::StructuredReply).await[0].0,
        ReplyType::ERR_INVALID
    );

    // Oversize option data within the discard bound: ERR_TOO_BIG, and the handshake goes on.
    let mut big = Vec::new();
    nbd::OptionRequest {
        code: OptionCode::GO,
        data: &vec![0u8; 20 << 10],
    }
    .encode(&mut big);
    client.send_raw(&big).await;
    assert_eq!(
        client.replies_until_final().await.last().unwrap().0,
        ReplyType::ERR_TOO_BIG
    );

    let list = client.option(ClientOption::List).await;
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].0, ReplyType::SERVER);
    let entry = nbd::ServerEntry::parse(&list[0].1).unwrap();
    assert_eq!(entry.name, "d0");

    // The default (empty) name selects the only export.
    client.go("").await;
    client.structured = true;
    assert!(client.flags.contains(TransmissionFlags::SEND_DF));
    assert_eq!(client.size_bytes, DISK);
    assert_eq!(
        client.call(Command::Read, 0, 0, 512, &[]).await.error,
        ErrorCode::OK
    );
    assert_eq!(harness.state(), before);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn huge_option_data_is_refused_and_the_connection_closed() {
    let harness = Harness::start().await;
    let mut client = Client::greet(harness.connect().await).await;
    let mut header = Vec::new();
    OptionHeader {
        code: OptionCode::INFO,
        data_bytes: u32::MAX,
    }
    .encode(&mut header);
    client.send_raw(&header).await;
    client.send_raw(&[0u8; 4096]).await;
    let (kind, option, _) = client.option_reply().await;
    assert_eq!((kind, option), (ReplyType::ERR_TOO_BIG, OptionCode::INFO));
    assert!(client.closed().await);
    // EXPORT_NAME cannot be answered with an error: oversize means a close.
    let mut client = Client::greet(harness.connect().await).await;
    let mut header = Vec::new();
    OptionHeader {
        code: OptionCode::EXPORT_NAME,
        data_bytes: 1 << 20,
    }
    .encode(&mut header);
    client.send_raw(&header).await;
    assert!(client.closed().await);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_client_flags_and_bad_magic_close_the_connection() {
    let harness = Harness::start().await;
    let mut stream = harness.connect().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.unwrap();
    stream.write_all(&[0, 0, 0, 0x81]).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(bounded("eof", stream.read(&mut buf)).await.unwrap(), 0);

    let mut client = harness.client("d0", false).await;
    let before = harness.state();
    let mut garbage = vec![0u8; 28];
    garbage[..4].copy_from_slice(b"JUNK");
    client.send_raw(&garbage).await;
    assert!(client.closed().await);
    assert_eq!(harness.state(), before);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn client_vanishing_mid_payload_leaves_disk_and_journal_unchanged() {
    let harness = Harness::start().await;
    let before = harness.state();
    {
        let mut client = harness.client("d0", true).await;
        let mut out = Vec::new();
        nbd::RequestHeader {
            flags: nbd::CommandFlags(1),
            command: Command::Write,
            handle: nbd::Handle(1),
            offset: 4096,
            length: 65536,
        }
        .encode(&mut out);
        out.extend_from_slice(&[0xcc; 65535]);
        client.send_raw(&out).await;
    } // dropped: the socket closes one byte short of the payload
    harness.wait_connections(0).await;
    assert_eq!(harness.state(), before);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn write_payload_beyond_the_discard_bound_is_refused_then_closed() {
    let limits = source_agent::config::Limits {
        request_bytes_max: 1 << 20,
        write_discard_bytes_max: 2 << 20,
        ..Default::default()
    };
    let harness = Harness::with(Setup {
        limits: Some(limits),
        ..Setup::default()
    })
    .await;
    let before = harness.state();
    let mut client = harness.client("d0", false).await;
    // Over the maximum but within the discard bound: EINVAL, connection lives.
    let payload = vec![0xdd; (1 << 20) + 512];
    let reply = client
        .call(Command::Write, 0, 0, (1 << 20) + 512, &payload)
        .await;
    assert_eq!(reply.error, ErrorCode::EINVAL);
    // Beyond the discard bound: EINVAL, then the server hangs up.
    let handle = client.send(Command::Write, 0, 0, 3 << 20, &[]).await;
    let reply = client.reply().await;
    assert_eq!((reply.handle, reply.error), (handle, ErrorCode::EINVAL));
    assert!(client.closed().await);
    assert_eq!(harness.state(), before);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn writes_reach_journal_then_disk_fua_and_flush_make_them_durable() {
    let harness = Harness::start().await;
    let mut client = harness.client("d0", true).await;
    let head = harness.sink.head_seq();
    let reply = client.call(Command::Write, 0, 8192, 4096, &[1; 4096]).await;
    assert_eq!(reply.error, ErrorCode::OK);
    assert_eq!(harness.sink.head_seq(), Seq(head.0 + 1));
    let reply = client
        .call(Command::Write, 1, 12288, 4096, &[2; 4096])
        .await;
    assert_eq!(reply.error, ErrorCode::OK);
    assert!(
        harness.sink.durable_seq() >= Seq(head.0 + 2),
        "FUA write durable in the journal"
    );
    let reply = client.call(Command::Trim, 0, 16384, 4096, &[]).await;
    assert_eq!(reply.error, ErrorCode::OK);
    let reply = client.call(Command::WriteZeroes, 2, 0, 4096, &[]).await;
    assert_eq!(reply.error, ErrorCode::OK);
    assert_eq!(
        client.call(Command::Flush, 0, 0, 0, &[]).await.error,
        ErrorCode::OK
    );
    assert_eq!(
        harness.sink.durable_seq(),
        Seq(head.0 + 4),
        "FLUSH covers everything answered"
    );
    let data = std::fs::read(harness.backing("d0")).unwrap();
    assert_eq!(&data[..4096], &[0; 4096]);
    assert_eq!(&data[4096..8192], &[0x5a; 4096]);
    assert_eq!(&data[8192..12288], &[1; 4096]);
    assert_eq!(&data[12288..16384], &[2; 4096]);
    assert_eq!(&data[16384..20480], &[0; 4096]);
    let read = client.call(Command::Read, 4, 8192, 8192, &[]).await;
    assert_eq!(
        read.error,
        ErrorCode::OK,
        "DF is accepted with structured replies"
    );
    assert_eq!(&read.data[..4096], &[1; 4096]);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn many_requests_in_flight_replies_out_of_order() {
    let device = Arc::new(GatedDevice::new(DISK as usize, 0));
    let mut overrides = Overrides::default();
    overrides.devices.insert("d0".into(), device.clone());
    let harness = Harness::with(Setup {
        overrides,
        ..Setup::default()
    })
    .await;
    let mut client = harness.client("d0", false).await;
    // The read at offset 0 blocks in the device; everything sent after it completes first.
    let gated = client.send(Command::Read, 0, 0, 4096, &[]).await;
    let mut others = Vec::new();
    for i in 1..=16u64 {
        let payload = vec![i as u8; 4096];
        others.push(
            client
                .send(Command::Write, 0, i * 4096, 4096, &payload)
                .await,
        );
        others.push(client.send(Command::Read, 0, i * 4096, 4096, &[]).await);
    }
    let mut answered = Vec::new();
    for _ in 0..others.len() {
        let reply = client.reply().await;
        assert_eq!(reply.error, ErrorCode::OK);
        answered.push(reply.handle);
    }
    answered.sort();
    others.sort();
    assert_eq!(
        answered, others,
        "every request after the blocked read was answered first"
    );
    device.release();
    let reply = client.reply().await;
    assert_eq!((reply.handle, reply.error), (gated, ErrorCode::OK));
    assert_eq!(reply.data.len(), 4096);
    let live = device.inner.live();
    for i in 1..=16usize {
        assert!(live[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8));
    }
    assert_eq!(harness.sink.head_seq(), Seq(16));
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn multi_connection_flush_covers_writes_of_other_connections() {
    let harness = Harness::with(Setup {
        disks: vec![("a", DISK), ("b", DISK)],
        ..Setup::default()
    })
    .await;
    let mut a1 = harness.client("a", true).await;
    let mut a2 = harness.client("a", false).await;
    let mut b = harness.client("b", true).await;
    assert!(a1.flags.contains(TransmissionFlags::CAN_MULTI_CONN));
    assert_eq!(
        a1.call(Command::Write, 0, 0, 512, &[7; 512]).await.error,
        ErrorCode::OK
    );
    assert_eq!(
        b.call(Command::Write, 0, 0, 512, &[8; 512]).await.error,
        ErrorCode::OK
    );
    assert_eq!(
        harness.sink.head_seq(),
        Seq(2),
        "one sequencer for all disks"
    );
    assert_eq!(
        a2.call(Command::Flush, 0, 0, 0, &[]).await.error,
        ErrorCode::OK
    );
    assert_eq!(harness.sink.durable_seq(), Seq(2));
    let read = a2.call(Command::Read, 0, 0, 512, &[]).await;
    assert_eq!(read.data, vec![7; 512]);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn disconnect_finishes_in_flight_requests() {
    let harness = Harness::start().await;
    let mut client = harness.client("d0", false).await;
    let w1 = client.send(Command::Write, 0, 0, 4096, &[3; 4096]).await;
    let w2 = client.send(Command::Write, 0, 4096, 4096, &[4; 4096]).await;
    client.send(Command::Disc, 0, 0, 0, &[]).await;
    let mut handles = vec![client.reply().await.handle, client.reply().await.handle];
    handles.sort();
    assert_eq!(handles, vec![w1, w2]);
    assert!(client.closed().await);
    let data = std::fs::read(harness.backing("d0")).unwrap();
    assert_eq!(&data[..8192], &[[3u8; 4096], [4u8; 4096]].concat()[..]);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn export_name_with_and_without_zero_padding() {
    let harness = Harness::start().await;
    for no_zeroes in [true, false] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = harness.connect().await;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.unwrap();
        let mut out = Vec::new();
        nbd::ClientFlags {
            fixed_newstyle: true,
            no_zeroes,
        }
        .encode(&mut out);
        ClientOption::ExportName { name: "d0" }.encode(&mut out);
        stream.write_all(&out).await.unwrap();
        let len = if no_zeroes { 10 } else { 134 };
        let mut reply = vec![0u8; len];
        bounded("export name reply", stream.read_exact(&mut reply))
            .await
            .unwrap();
        let (reply, _) = nbd::ExportNameReply::decode(&reply, !no_zeroes).unwrap();
        assert_eq!(reply.size_bytes, DISK);
        assert!(reply.flags.contains(TransmissionFlags::SEND_FUA));
        assert!(!reply.flags.contains(TransmissionFlags::READ_ONLY));
    }
    // Unknown export with EXPORT_NAME: the only answer is a close.
    let mut client = Client::greet(harness.connect().await).await;
    let mut out = Vec::new();
    ClientOption::ExportName { name: "nope" }.encode(&mut out);
    client.send_raw(&out).await;
    assert!(client.closed().await);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn journal_failure_is_eio_and_the_disk_is_untouched() {
    let sink = Arc::new(MemSink::new());
    let overrides = Overrides {
        sink: Some(sink.clone()),
        ..Overrides::default()
    };
    let harness = Harness::with(Setup {
        overrides,
        ..Setup::default()
    })
    .await;
    let before = harness.state();
    sink.inject(Some(SinkFault::Append));
    let mut client = harness.client("d0", true).await;
    let reply = client.call(Command::Write, 0, 0, 4096, &[9; 4096]).await;
    assert_eq!(reply.error, ErrorCode::EIO);
    assert_eq!(harness.state(), before);
    sink.inject(Some(SinkFault::Sync));
    assert_eq!(
        client.call(Command::Flush, 0, 0, 0, &[]).await.error,
        ErrorCode::EIO
    );
    sink.inject(None);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn stopping_closes_idle_connections_and_syncs() {
    let harness = Harness::start().await;
    let mut client = harness.client("d0", false).await;
    assert_eq!(
        client
            .call(Command::Write, 0, 0, 512, &[1; 512])
            .await
            .error,
        ErrorCode::OK
    );
    let sink = harness.sink.clone();
    harness.stop().await.unwrap();
    assert!(client.closed().await);
    assert_eq!(sink.durable_seq(), sink.head_seq());
}
