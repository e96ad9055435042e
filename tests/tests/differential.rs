//! Differential test: one seeded random workload (patterned and random-content writes, FUA,
//! write-zeroes, flushes, pipelined async writes) sent by `qemu-io` to `qemu-nbd` and to
//! `cdp-agent`; the two files must end byte-for-byte identical, and the agent's journal must
//! replay to the same bytes. Discards are left out: NBD lets a server keep or zero trimmed
//! bytes, so two correct servers may differ there.
//!
//! Must never: compare against a model alone; the reference here is a server QEMU ships.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Result;
use cdp_tests::workload::{self, Op, Source};
use cdp_tests::{assert_same_content, create_sparse, Agent, QemuNbd, Rng, DEFAULT_DISK_BYTES};

#[test]
fn same_random_workload_same_image_as_qemu_nbd() -> Result<()> {
    let mut rng = Rng::for_test("same_random_workload_same_image_as_qemu_nbd");
    let agent = Agent::one_disk()?;
    let source = Source::create(&mut rng, &agent.dir().join("source.bin"))?;
    let ops: Vec<Op> = workload::random_ops(&mut rng, 0, DEFAULT_DISK_BYTES, 200)
        .into_iter()
        .filter(|op| !matches!(op, Op::Discard { .. }))
        .collect();

    let reference_image = agent.dir().join("reference.img");
    create_sparse(&reference_image, DEFAULT_DISK_BYTES)?;
    let mut reference = QemuNbd::start(&reference_image, "d0")?;
    workload::script(&reference.uri(), &ops, Some(&source)).run()?;
    reference.stop()?;

    workload::script(&agent.uri("d0"), &ops, Some(&source)).run()?;
    let backing = agent.disk("d0")?.backing.clone();
    assert_same_content(
        "cdp-agent backing file vs qemu-nbd image",
        &reference_image,
        &backing,
    )?;
    agent.finish()?;
    Ok(())
}
