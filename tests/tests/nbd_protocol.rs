//! `cdp-agent` driven by a minimal NBD client written from the specification, for what the
//! real clients cannot do on demand (they flush when they close):
//! - a FUA write with no FLUSH after it survives kill -9 (DESIGN §3 invariant 1);
//! - with `NBD_FLAG_CAN_MULTI_CONN`, a FLUSH on one connection makes durable the writes
//!   another connection completed, and they survive kill -9;
//! - out-of-range and unknown requests get NBD errors, change nothing, and the connection
//!   and the agent keep working (invariant 5).
//!
//! Must never: assert more than the protocol promises (a write neither flushed nor FUA may be
//! lost by a crash, so it is not checked after one).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{ensure, Result};
use cdp_tests::raw_nbd::{cmd, errno, flags, NbdConn};
use cdp_tests::{blake3_file, Agent, Model, Rng, DEFAULT_DISK_BYTES, KIB, MIB};

fn socket(agent: &Agent) -> std::path::PathBuf {
    agent.listeners().nbd_unix[0].clone()
}

fn random(rng: &mut Rng, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rng.fill(&mut v);
    v
}

#[test]
fn fua_write_without_flush_survives_kill_9() -> Result<()> {
    let mut rng = Rng::for_test("fua_write_without_flush_survives_kill_9");
    let mut agent = Agent::one_disk()?;
    let mut conn = NbdConn::connect(&socket(&agent), "d0")?;
    assert_eq!(conn.size_bytes, DEFAULT_DISK_BYTES);
    ensure!(
        conn.flags & flags::SEND_FUA != 0,
        "FUA not advertised: flags {:#x}",
        conn.flags
    );
    let mut model = Model::zeroed(DEFAULT_DISK_BYTES);
    // FUA writes of several sizes, some unaligned to 4 KiB; no FLUSH at all.
    for (offset, len) in [
        (0, 4 * KIB),
        (MIB + 512, 512),
        (5 * MIB, 64 * KIB),
        (9 * MIB - 1536, MIB),
    ] {
        let data = random(&mut rng, len);
        conn.write(offset, &data, true)?;
        model.write(offset, &data);
    }
    // The connection stays open: the crash comes with the client still attached.
    agent.kill();
    drop(conn);
    let replayed = agent.replay("d0")?;
    model.assert_matches(
        "journal replayed after kill -9 following FUA writes",
        &replayed,
    )?;
    Ok(())
}

#[test]
fn flush_on_one_connection_covers_writes_completed_on_another() -> Result<()> {
    let mut rng = Rng::for_test("flush_on_one_connection_covers_writes_completed_on_another");
    let mut agent = Agent::one_disk()?;
    let sock = socket(&agent);
    let mut writers: Vec<NbdConn> = (0..3)
        .map(|_| NbdConn::connect(&sock, "d0"))
        .collect::<Result<_>>()?;
    let mut flusher = NbdConn::connect(&sock, "d0")?;
    ensure!(
        flusher.flags & flags::CAN_MULTI_CONN != 0,
        "NBD_FLAG_CAN_MULTI_CONN not advertised (flags {:#x}); the design promises multi-connection",
        flusher.flags
    );
    let mut model = Model::zeroed(DEFAULT_DISK_BYTES);
    for (i, w) in writers.iter_mut().enumerate() {
        for j in 0..8u64 {
            let offset = (i as u64 * 16 + j * 2) * MIB + 512 * j;
            let data = random(&mut rng, 128 * KIB + 512 * j);
            w.write(offset, &data, false)?;
            model.write(offset, &data);
        }
    }
    // Every write above has completed; one FLUSH on a fourth connection covers them all.
    flusher.flush()?;
    agent.kill();
    drop(writers);
    let replayed = agent.replay("d0")?;
    model.assert_matches(
        "journal replayed after kill -9 following a FLUSH on another connection",
        &replayed,
    )?;
    Ok(())
}

#[test]
fn out_of_range_and_unknown_requests_get_errors_and_change_nothing() -> Result<()> {
    const SIZE: u64 = 16 * MIB;
    let mut agent = Agent::one_disk_of(SIZE)?;
    let mut conn = NbdConn::connect(&socket(&agent), "d0")?;
    conn.write(SIZE - 4 * KIB, &[0x5a; 4096], false)?;
    conn.flush()?;
    let backing = agent.disk("d0")?.backing.clone();
    let before = blake3_file(&backing)?;

    // One row per case: name, command, flags, offset, length, payload, accepted errors.
    #[allow(clippy::type_complexity)]
    let cases: [(&str, u16, u16, u64, u32, Vec<u8>, &[u32]); 6] = [
        (
            "write past the end",
            cmd::WRITE,
            0,
            SIZE - 512,
            1024,
            vec![0xee; 1024],
            &[errno::ENOSPC, errno::EINVAL],
        ),
        (
            "write starting past the end",
            cmd::WRITE,
            cmd::FLAG_FUA,
            SIZE + MIB,
            512,
            vec![0xee; 512],
            &[errno::ENOSPC, errno::EINVAL],
        ),
        (
            "read past the end",
            cmd::READ,
            0,
            SIZE - 512,
            4096,
            vec![],
            &[errno::EINVAL, errno::EOVERFLOW],
        ),
        (
            "trim past the end",
            cmd::TRIM,
            0,
            SIZE - 4096,
            8192,
            vec![],
            &[errno::ENOSPC, errno::EINVAL],
        ),
        (
            "write-zeroes past the end",
            cmd::WRITE_ZEROES,
            0,
            u64::MAX - 511,
            512,
            vec![],
            &[errno::ENOSPC, errno::EINVAL],
        ),
        (
            "unknown command 0x42",
            0x42,
            0,
            0,
            0,
            vec![],
            &[errno::EINVAL, errno::ENOTSUP],
        ),
    ];
    for (what, kind, fl, offset, len, payload, allowed) in &cases {
        let (error, _) = conn.request(*kind, *fl, *offset, *len, payload)?;
        ensure!(
            allowed.contains(&error),
            "{what}: NBD error {error}, expected one of {allowed:?}"
        );
        // The same connection still works after each refused request.
        ensure!(
            conn.read(SIZE - 4 * KIB, 4096)? == vec![0x5a; 4096],
            "{what}: data changed or connection broken"
        );
    }
    conn.flush()?;
    ensure!(
        std::fs::metadata(&backing)?.len() == SIZE,
        "a refused request changed the backing file's size"
    );
    ensure!(
        blake3_file(&backing)? == before,
        "a refused request changed the backing file"
    );
    conn.disconnect()?;
    ensure!(
        agent.is_running(),
        "the agent died on refused requests\n{}",
        agent.diagnostics()
    );
    agent.finish()?;
    Ok(())
}
