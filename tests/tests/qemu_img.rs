//! `qemu-img` against `cdp-agent`: `info` reports the export's size, `convert -n` copies an
//! image with holes into the export (zeros included), `compare` finds the export identical
//! to the source and reports the exact offset of a one-sector change, and `convert` copies
//! the export back out. Also a disk whose backing file starts with content, replayed from
//! that base. Every scenario ends by replaying the journal against the backing file.
//!
//! Must never: accept a `compare` that did not run (exit codes are checked exactly).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{ensure, Context, Result};
use cdp_tests::image::{random_image_bytes, write_file};
use cdp_tests::{assert_same_content, Agent, Model, QemuIo, Rng, Tool, MIB};

const DISK_BYTES: u64 = 48 * MIB;

fn compare(source: &std::path::Path, uri: &str, code: i32) -> Result<cdp_tests::Output> {
    Tool::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(source)
        .arg(uri)
        .run_code(code)
}

#[test]
fn convert_compare_and_info_through_the_export() -> Result<()> {
    let mut rng = Rng::for_test("convert_compare_and_info_through_the_export");
    let agent = Agent::builder().disk("vm-disk", DISK_BYTES).start()?;
    let uri = agent.uri("vm-disk");

    let info = Tool::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(&uri)
        .run_ok()?;
    let info: serde_json::Value =
        serde_json::from_str(&info.stdout).context("qemu-img info JSON")?;
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(DISK_BYTES),
        "qemu-img info: {info:#}"
    );
    assert_eq!(
        info["format"].as_str(),
        Some("raw"),
        "qemu-img info: {info:#}"
    );

    let source = agent.dir().join("source.img");
    let bytes = random_image_bytes(&mut rng, DISK_BYTES);
    write_file(&source, &bytes)?;
    Tool::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&source)
        .arg(&uri)
        .run_ok()?;
    let same = compare(&source, &uri, 0)?;
    ensure!(
        same.stdout.contains("Images are identical"),
        "{}",
        same.describe()
    );

    // One sector changed through another client: compare must name its offset.
    let changed_at = 17 * MIB + 3 * 512;
    QemuIo::new(&uri)
        .cmd(format!("write -q -P 0xee {changed_at} 512"))
        .cmd("flush")
        .run()?;
    let differ = compare(&source, &uri, 1)?;
    ensure!(
        differ
            .stdout
            .contains(&format!("Content mismatch at offset {changed_at}!")),
        "qemu-img compare did not find the change at {changed_at}:\n{}",
        differ.describe()
    );

    // Copy the export back out: the source plus that sector.
    let mut model = Model::from_bytes(bytes);
    model.fill(changed_at, 512, 0xee);
    let copy = agent.dir().join("copy.img");
    Tool::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&copy)
        .run_ok()?;
    model.assert_matches("qemu-img convert out of the export", &copy)?;
    agent.finish()?;
    Ok(())
}

#[test]
fn convert_over_existing_content_and_replay_from_base() -> Result<()> {
    let mut rng = Rng::for_test("convert_over_existing_content_and_replay_from_base");
    let dir = cdp_tests::temp_dir("qemu-img-base-")?;
    // The disk starts full of data; the image converted onto it has holes, which must become
    // zeros on the export (qemu-img cannot assume a zeroed target with -n).
    let base = dir.path().join("base.img");
    let mut full = vec![0u8; DISK_BYTES as usize];
    rng.fill(&mut full);
    write_file(&base, &full)?;
    let source = dir.path().join("source.img");
    write_file(&source, &random_image_bytes(&mut rng, DISK_BYTES))?;

    let agent = Agent::builder().disk_image("d0", &base).start()?;
    let uri = agent.uri("d0");
    let before = compare(&base, &uri, 0)?;
    ensure!(
        before.stdout.contains("Images are identical"),
        "{}",
        before.describe()
    );
    // Out-of-order writes from 8 coroutines: many requests in flight on the connection.
    Tool::new("qemu-img")
        .args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw"])
        .arg(&source)
        .arg(&uri)
        .run_ok()?;
    compare(&source, &uri, 0)?;
    assert_same_content(
        "backing file after convert",
        &source,
        &agent.disk("d0")?.backing,
    )?;
    // finish() replays with `--base base.img`: the journal holds only what changed.
    agent.finish()?;
    Ok(())
}
