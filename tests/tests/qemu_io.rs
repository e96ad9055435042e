//! `qemu-io` (QEMU's NBD client) against `cdp-agent`: patterned and random-content writes,
//! FUA, write-zeroes, discard, flush, pipelined async writes, random offsets and sizes from
//! 512 B to 4 MiB (seeded), several connections at once on disjoint ranges, and every
//! listener kind. Reads verify patterns; the export is also copied out and compared with the
//! model; every scenario ends by replaying the journal and comparing it with the backing file.
//!
//! Must never: pass when a read returns other bytes than were written, or leave the agent
//! running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use cdp_tests::workload::{self, verify_commands, Op, Source};
use cdp_tests::{export_to_file, Agent, Model, QemuIo, Rng, DEFAULT_DISK_BYTES, KIB, MIB};

/// Disk size for these scenarios.
const DISK_BYTES: u64 = DEFAULT_DISK_BYTES;

fn w(offset: u64, len: u64, byte: u8) -> Op {
    Op::Write {
        offset,
        len,
        byte,
        fua: false,
    }
}

#[test]
fn patterned_writes_fua_zeroes_discard_and_flush_read_back() -> Result<()> {
    let agent = Agent::one_disk()?;
    let uri = agent.uri("d0");
    let ops = vec![
        w(0, MIB, 0x11),
        // Sub-4 KiB writes at sector (not page) alignment.
        w(MIB, 512, 0x22),
        w(MIB + 4 * KIB + 512, 1536, 0x23),
        Op::Write {
            offset: 2 * MIB,
            len: 64 * KIB,
            byte: 0x33,
            fua: true,
        },
        // The largest request of the suite, then holes punched into it three ways.
        w(3 * MIB, 4 * MIB, 0x44),
        Op::Flush,
        Op::Zeroes {
            offset: 4 * MIB,
            len: MIB,
            unmap: false,
        },
        Op::Zeroes {
            offset: 5 * MIB + 512,
            len: 3584,
            unmap: true,
        },
        Op::Discard {
            offset: 6 * MIB,
            len: 512 * KIB,
        },
        w(6 * MIB + 128 * KIB, 4 * KIB, 0x45),
        // Sixteen writes in flight on one connection.
        Op::AioWrites(
            (0..16u8)
                .map(|i| (8 * MIB + u64::from(i) * 64 * KIB, 64 * KIB, 0x60 + i))
                .collect(),
        ),
        // The very last sector of the disk.
        Op::Write {
            offset: DISK_BYTES - 512,
            len: 512,
            byte: 0x77,
            fua: true,
        },
        Op::Flush,
    ];
    let mut model = Model::zeroed(DISK_BYTES);
    workload::apply(&mut model, &ops, None);

    let mut io = workload::script(&uri, &ops, None);
    for c in verify_commands(&model, 0, DISK_BYTES, 512) {
        io.push(c);
    }
    io.run()?;

    // A fresh connection sees the same content: nothing lives only in one connection.
    let mut reader = QemuIo::new(&uri);
    for c in verify_commands(&model, 0, DISK_BYTES, 512) {
        reader.push(c);
    }
    reader.run()?;

    // The checker itself: a wrong pattern must be reported.
    let wrong = QemuIo::new(&uri)
        .cmd("read -q -P 0x5a 0 4096")
        .tool()
        .run()?;
    assert!(
        !wrong.status.success() && wrong.stdout.contains("verification failed"),
        "a read with the wrong pattern was not reported:\n{}",
        wrong.describe()
    );

    let copy = agent.dir().join("export.img");
    export_to_file(&uri, &copy)?;
    model.assert_matches("export copied out with nbdcopy", &copy)?;
    model.assert_matches("backing file", &agent.disk("d0")?.backing)?;
    agent.finish()?;
    Ok(())
}

#[test]
fn random_offsets_and_sizes_match_the_model() -> Result<()> {
    let mut rng = Rng::for_test("random_offsets_and_sizes_match_the_model");
    let agent = Agent::one_disk()?;
    let uri = agent.uri("d0");
    let source = Source::create(&mut rng, &agent.dir().join("source.bin"))?;
    let ops = workload::random_ops(&mut rng, 0, DISK_BYTES, 150);
    let mut model = Model::zeroed(DISK_BYTES);
    workload::apply(&mut model, &ops, Some(&source));

    let mut io = workload::script(&uri, &ops, Some(&source));
    for c in verify_commands(&model, 0, DISK_BYTES, 4 * KIB) {
        io.push(c);
    }
    io.run()?;

    let copy = agent.dir().join("export.img");
    export_to_file(&uri, &copy)?;
    model.assert_matches("export copied out with nbdcopy", &copy)?;
    model.assert_matches("backing file", &agent.disk("d0")?.backing)?;
    agent.finish()?;
    Ok(())
}

#[test]
fn parallel_connections_on_disjoint_ranges() -> Result<()> {
    const CLIENTS: u64 = 4;
    let mut rng = Rng::for_test("parallel_connections_on_disjoint_ranges");
    let agent = Agent::one_disk()?;
    let uri = agent.uri("d0");
    let source = Source::create(&mut rng, &agent.dir().join("source.bin"))?;
    let slice = DISK_BYTES / CLIENTS;
    let mut model = Model::zeroed(DISK_BYTES);
    let mut scripts = Vec::new();
    for i in 0..CLIENTS {
        let (start, end) = (i * slice, (i + 1) * slice);
        let ops = workload::random_ops(&mut rng, start, end, 60);
        // Each client owns its range, so the model is the same whatever the interleaving.
        workload::apply(&mut model, &ops, Some(&source));
        let mut io = workload::script(&uri, &ops, Some(&source));
        for c in verify_commands(&model, start, end, 4 * KIB) {
            io.push(c);
        }
        scripts.push(io);
    }
    std::thread::scope(|s| -> Result<()> {
        let running: Vec<_> = scripts.iter().map(|io| s.spawn(move || io.run())).collect();
        for (i, r) in running.into_iter().enumerate() {
            r.join()
                .map_err(|_| anyhow::anyhow!("client {i} panicked"))?
                .map_err(|e| e.context(format!("client {i}")))?;
        }
        Ok(())
    })?;

    let mut reader = QemuIo::new(&uri);
    for c in verify_commands(&model, 0, DISK_BYTES, 4 * KIB) {
        reader.push(c);
    }
    reader.run()?;
    let copy = agent.dir().join("export.img");
    export_to_file(&uri, &copy)?;
    model.assert_matches("export copied out with nbdcopy", &copy)?;
    agent.finish()?;
    Ok(())
}

#[test]
fn tcp_and_unix_listeners_serve_the_same_disk() -> Result<()> {
    let agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .unix_sockets(2)
        .tcp("127.0.0.1:0")
        .start()?;
    let uris = [
        agent.tcp_uri("d0", 0)?,
        agent.unix_uri("d0", 0)?,
        agent.unix_uri("d0", 1)?,
    ];
    let mut model = Model::zeroed(DISK_BYTES);
    // Each listener writes its own range...
    for (i, uri) in uris.iter().enumerate() {
        let ops = [
            w(i as u64 * 8 * MIB + 4096, 3 * MIB + 512, 0xa0 + i as u8),
            Op::Flush,
        ];
        workload::apply(&mut model, &ops, None);
        workload::script(uri, &ops, None).run()?;
    }
    // ...and each one reads what all of them wrote.
    for uri in &uris {
        let mut io = QemuIo::new(uri);
        for c in verify_commands(&model, 0, DISK_BYTES, 512) {
            io.push(c);
        }
        io.run()?;
    }
    let tcp_port = agent.listeners().nbd_tcp[0].port();
    assert_ne!(
        tcp_port, 0,
        "the agent must report the port it bound, not 0"
    );
    agent.finish()?;
    Ok(())
}
