//! Replaying the journal reproduces every backing file exactly (blake3), after a workload of
//! concurrent, overlapping writes, trims and write-zeroes from several connections and
//! disks; and replay refuses to run while an agent holds the data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

mod common;

use common::{Harness, Setup};
use nbd::{Command, ErrorCode};
use source_agent::replay::replay;

/// Deterministic generator (xorshift64*), so a failure replays with the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const DISK: u64 = 2 << 20;

/// One connection's workload: batches of pipelined requests over a small hot area, so
/// writes from different connections overlap while in flight.
async fn workload(harness: &Harness, disk: &str, seed: u64, batches: usize) {
    let mut rng = Rng(seed);
    let mut client = harness.client(disk, seed.is_multiple_of(2)).await;
    for _ in 0..batches {
        let mut sent = 0;
        for _ in 0..16 {
            let blocks = 1 + rng.below(8) as u32;
            let offset = rng.below(64) * 4096;
            let length = blocks * 4096;
            let fua = (rng.below(8) == 0) as u16;
            match rng.below(10) {
                0 => client.send(Command::Trim, fua, offset, length, &[]).await,
                1 => {
                    client
                        .send(
                            Command::WriteZeroes,
                            fua | (2 * (rng.below(2) as u16)),
                            offset,
                            length,
                            &[],
                        )
                        .await
                }
                2 => client.send(Command::Flush, 0, 0, 0, &[]).await,
                3 => client.send(Command::Read, 0, offset, length, &[]).await,
                _ => {
                    let byte = rng.next() as u8;
                    let payload: Vec<u8> = (0..length).map(|i| byte ^ (i as u8)).collect();
                    client
                        .send(Command::Write, fua, offset, length, &payload)
                        .await
                }
            };
            sent += 1;
        }
        for _ in 0..sent {
            assert_eq!(client.reply().await.error, ErrorCode::OK);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_reproduces_the_backing_files_exactly() {
    let harness = Harness::with(Setup {
        disks: vec![("a", DISK), ("b", DISK)],
        ..Setup::default()
    })
    .await;
    let h = &harness;
    tokio::join!(
        workload(h, "a", 1, 12),
        workload(h, "a", 2, 12),
        workload(h, "a", 3, 12),
        workload(h, "b", 4, 12),
        workload(h, "b", 5, 12),
    );
    let head = harness.sink.head_seq();
    assert!(head.0 > 500, "workload too small: head {head}");
    let dir = harness.dir.path().to_owned();
    let data_dir = harness.config.data_dir.clone();
    let disks = harness.disks.clone();
    let bases: Vec<_> = disks.iter().map(|(n, _)| harness.base(n)).collect();
    let _dir = harness.stop().await.unwrap();

    for ((name, backing), base) in disks.iter().zip(&bases) {
        let out = dir.join(format!("{name}.replayed.img"));
        let mut lines = Vec::new();
        let summary = replay(&data_dir, name, &out, Some(base), &mut |l| {
            lines.push(l.to_owned())
        })
        .unwrap();
        assert!(summary.records > 100, "{name}: {summary:?}");
        assert_eq!(summary.last_seq, head);
        assert!(
            lines.last().unwrap().starts_with("replay: done"),
            "{lines:?}"
        );
        let expected = blake3::hash(&std::fs::read(backing).unwrap());
        let got = blake3::hash(&std::fs::read(&out).unwrap());
        assert_eq!(
            got, expected,
            "disk {name}: replay differs from the backing file"
        );
    }
}

#[tokio::test]
async fn replay_from_zeroes_and_its_refusals() {
    let harness = Harness::with(Setup {
        initial_pattern: false,
        ..Setup::default()
    })
    .await;
    let mut client = harness.client("d0", true).await;
    for i in 0..8u64 {
        let payload = vec![i as u8 + 1; 8192];
        assert_eq!(
            client
                .call(Command::Write, 0, i * 65536, 8192, &payload)
                .await
                .error,
            ErrorCode::OK
        );
    }
    assert_eq!(
        client
            .call(Command::WriteZeroes, 0, 65536, 4096, &[])
            .await
            .error,
        ErrorCode::OK
    );
    let out = harness.dir.path().join("d0.replayed.img");
    // An agent holds the data directory: refused.
    let err = replay(&harness.config.data_dir, "d0", &out, None, &mut |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("another cdp-agent is using this data directory"),
        "{err}"
    );
    let data_dir = harness.config.data_dir.clone();
    let backing = harness.backing("d0").to_owned();
    let wrong_base = harness.dir.path().join("small.img");
    std::fs::write(&wrong_base, [0u8; 512]).unwrap();
    let _dir = harness.stop().await.unwrap();

    let err = replay(&data_dir, "nope", &out, None, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("no disk named \"nope\""), "{err}");
    let err = replay(&data_dir, "d0", &out, Some(&wrong_base), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("base image"), "{err}");
    let summary = replay(&data_dir, "d0", &out, None, &mut |_| {}).unwrap();
    assert_eq!(summary.records, 9);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&backing).unwrap()
    );
}
