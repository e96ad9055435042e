//! Point-in-time recovery end to end: the real agent and appliance, `qemu-io` writing through
//! the agent, `cdp checkpoint`, `cdp view create`, and the views read by `qemu-img compare`,
//! `nbdcopy` and `qemu-io` over the appliance's NBD listener.
//!
//! Must never: sleep hoping something happened (it polls with deadlines), or leave a process
//! behind (the harnesses kill theirs on drop).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cdp_tests::appliance::{wait_drained, Appliance};
use cdp_tests::{blake3_file, poll_until, Agent, QemuIo, Tool, MIB};

const DISK_BYTES: u64 = 64 * MIB;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The NBD URIs of a view, by disk name, from `cdp view create --json`.
fn view_uris(view: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let exports = view["exports"]
        .as_array()
        .context("a view without exports")?;
    exports
        .iter()
        .map(|e| {
            Ok((
                e["disk"]
                    .as_str()
                    .context("export without disk")?
                    .to_owned(),
                e["uri"].as_str().context("export without uri")?.to_owned(),
            ))
        })
        .collect()
}

fn uri_of<'a>(uris: &'a [(String, String)], disk: &str) -> Result<&'a str> {
    uris.iter()
        .find(|(d, _)| d == disk)
        .map(|(_, u)| u.as_str())
        .with_context(|| format!("no export for disk {disk} in {uris:?}"))
}

/// `qemu-img compare` of an NBD export with an image file: identical or an error.
fn assert_identical(uri: &str, image: &Path) -> Result<()> {
    let out = Tool::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", uri])
        .arg(image)
        .timeout(Duration::from_secs(120))
        .run()?;
    ensure!(
        out.status.success() && out.stdout.contains("Images are identical"),
        "qemu-img compare {uri} {}:\n{}",
        image.display(),
        out.describe()
    );
    Ok(())
}

#[test]
fn views_at_a_checkpoint_read_the_disks_as_they_were() -> Result<()> {
    let mut appliance = Appliance::start()?;
    let mut agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .disk("d1", DISK_BYTES / 2)
        .replicate_to(&appliance)
        .start()?;
    let job = agent.job_id()?;
    let (d0, d1) = (agent.uri("d0"), agent.uri("d1"));

    // Pattern A on both disks, then a tagged checkpoint, then copies of the sources as A.
    QemuIo::new(&d0)
        .cmd("write -q -P 0xa1 0 4M")
        .cmd("write -q -P 0xa2 20M 3M")
        .cmd("write -q -P 0xa3 60M 1M")
        .run()?;
    QemuIo::new(&d1).cmd("write -q -P 0xa4 1M 2M").run()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    let checkpoint = appliance.cdp_json(&["checkpoint", "--tag", "before-b", &job])?;
    let seq = checkpoint["seq"]
        .as_u64()
        .context("checkpoint without seq")?;
    ensure!(checkpoint["kind"] == "tagged", "checkpoint {checkpoint}");
    let image_a0 = agent.dir().join("a-d0.img");
    let image_a1 = agent.dir().join("a-d1.img");
    std::fs::copy(&agent.disk("d0")?.backing, &image_a0)?;
    std::fs::copy(&agent.disk("d1")?.backing, &image_a1)?;

    // Pattern B: overwrites, zeroing, discard, on both disks.
    QemuIo::new(&d0)
        .cmd("write -q -P 0xb1 1M 4M")
        .cmd("write -q -z 20M 1M")
        .cmd("discard -q 60M 512k")
        .cmd("write -q -P 0xb2 40M 2M")
        .run()?;
    QemuIo::new(&d1).cmd("write -q -P 0xb3 0 2M").run()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    let checkpoints = appliance.cdp_json(&["checkpoints", &job])?;
    ensure!(
        checkpoints["checkpoints"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["seq"].as_u64() == Some(seq))),
        "`cdp checkpoints` does not list seq {seq}: {checkpoints}"
    );

    // A view at the checkpoint reads pattern A, on both disks (one point for the whole job).
    let view = appliance.cdp_json(&["view", "create", &job, "--at", "tag:before-b"])?;
    ensure!(
        view["seq"].as_u64() == Some(seq),
        "view at the wrong point: {view}"
    );
    let uris = view_uris(&view)?;
    assert_identical(uri_of(&uris, "d0")?, &image_a0)?;
    assert_identical(uri_of(&uris, "d1")?, &image_a1)?;
    let copied = agent.dir().join("view-d1.img");
    Tool::new("nbdcopy")
        .arg(uri_of(&uris, "d1")?)
        .arg(&copied)
        .run()?;
    ensure!(
        blake3_file(&copied)? == blake3_file(&image_a1)?,
        "nbdcopy of the view differs from pattern A"
    );
    // A read-only view refuses writes.
    let refused = QemuIo::new(uri_of(&uris, "d0")?)
        .cmd("write -q -P 0xee 0 4k")
        .tool()
        .run()?;
    let said = format!("{}{}", refused.stdout, refused.stderr).to_ascii_lowercase();
    ensure!(
        said.contains("read-only")
            || said.contains("permission denied")
            || said.contains("not permitted"),
        "a read-only view did not refuse a write:\n{}",
        refused.describe()
    );
    assert_identical(uri_of(&uris, "d0")?, &image_a0)?;

    // The latest view equals the sources now.
    let latest = appliance.cdp_json(&["view", "create", &job, "--at", "latest"])?;
    let latest_uris = view_uris(&latest)?;
    assert_identical(uri_of(&latest_uris, "d0")?, &agent.disk("d0")?.backing)?;

    // A writable view takes writes; the replica and the other view do not change.
    let replica0 = appliance.replica_path(&job, "d0");
    let replica_before = blake3_file(&replica0)?;
    let writable = appliance.cdp_json(&[
        "view",
        "create",
        &job,
        "--at",
        &format!("seq:{seq}"),
        "--writable",
    ])?;
    let w0 = uri_of(&view_uris(&writable)?, "d0")?.to_owned();
    QemuIo::new(&w0)
        .cmd("write -q -P 0xcc 2M 1M")
        .cmd("write -q -P 0xcd 513 1000")
        .run()?;
    QemuIo::new(&w0)
        .cmd("read -q -P 0xcc 2M 1M")
        .cmd("read -q -P 0xa1 0 512")
        .cmd("read -q -P 0xa1 3M 1M")
        .run()
        .context("the writable view does not read back its writes over pattern A")?;
    ensure!(
        blake3_file(&replica0)? == replica_before,
        "a write to a view changed the replica"
    );
    assert_identical(uri_of(&uris, "d0")?, &image_a0)?;

    // Replication goes on while views exist.
    QemuIo::new(&d0).cmd("write -q -P 0xd1 8M 1M").run()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    ensure!(
        blake3_file(&replica0)? == blake3_file(&agent.disk("d0")?.backing)?,
        "replica differs from the source"
    );
    assert_identical(uri_of(&uris, "d0")?, &image_a0)?;

    for v in [&view, &latest, &writable] {
        let id = v["id"].as_u64().context("view without id")?.to_string();
        appliance.cdp(&["view", "delete", &id])?;
    }
    let list = appliance.cdp_json(&["view", "list"])?;
    ensure!(
        list["views"].as_array().is_some_and(Vec::is_empty),
        "views left: {list}"
    );
    agent.stop()?;
    appliance.stop()?;
    Ok(())
}

#[test]
fn retention_keeps_what_an_open_view_reads_and_drops_it_after() -> Result<()> {
    // A 2 s window, retention every 200 ms: history behind the window goes quickly, unless a
    // view holds it.
    let mut appliance =
        Appliance::start_with(&["--history-window", "2s", "--retention-interval", "1s"])?;
    let mut agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .replicate_to(&appliance)
        .start()?;
    let job = agent.job_id()?;
    let d0 = agent.uri("d0");
    QemuIo::new(&d0).cmd("write -q -P 0xa1 0 2M").run()?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    let checkpoint = appliance.cdp_json(&["checkpoint", "--tag", "keep", &job])?;
    let seq = checkpoint["seq"]
        .as_u64()
        .context("checkpoint without seq")?;
    let image_a = agent.dir().join("a.img");
    std::fs::copy(&agent.disk("d0")?.backing, &image_a)?;
    let view = appliance.cdp_json(&["view", "create", &job, "--at", "tag:keep"])?;
    let uri = uri_of(&view_uris(&view)?, "d0")?.to_owned();

    // Overwrite the same blocks for longer than the window, until the catalog moved past the
    // checkpoint (automatic checkpoints every second push the window forward).
    let mut round = 0u32;
    poll_until(
        "retention to run past the checkpoint's window",
        Duration::from_secs(60),
        || {
            round += 1;
            QemuIo::new(&d0)
                .cmd(format!("write -q -P {} 0 2M", 0x10 + round % 200))
                .run()?;
            let status = appliance.cdp_json(&["status", &job])?;
            let checkpoints = status["checkpoints"].as_u64().unwrap_or(0);
            Ok((round >= 8 && checkpoints >= 3).then_some(()))
        },
    )?;
    wait_drained(&agent, &appliance, &job, DRAIN_TIMEOUT)?;
    // Give retention several passes with the view open: its bytes never change.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        assert_identical(&uri, &image_a)?;
    }
    let status = appliance.cdp_json(&["status", &job])?;
    let oldest = status["history_oldest_seq"].as_u64().unwrap_or(0);
    ensure!(
        oldest <= seq,
        "retention dropped history a view holds: oldest {oldest} > view at {seq}: {status}"
    );

    // Without the view, the floor passes the checkpoint and it cannot be viewed any more.
    appliance.cdp(&[
        "view",
        "delete",
        &view["id"].as_u64().context("view id")?.to_string(),
    ])?;
    poll_until(
        "retention to drop the checkpoint once its view is gone",
        Duration::from_secs(60),
        || {
            QemuIo::new(&d0).cmd("write -q -P 0x77 0 64k").run()?;
            let status = appliance.cdp_json(&["status", &job])?;
            Ok(status["history_oldest_seq"]
                .as_u64()
                .filter(|&o| o > seq)
                .map(|_| ()))
        },
    )?;
    let refused = Tool::new(cdp_tests::binary("cdp")?)
        .arg("--appliance-dir")
        .arg(appliance.data_dir())
        .args(["view", "create", &job, "--at", &format!("seq:{seq}")])
        .run()?;
    ensure!(
        refused.status.code() == Some(1) && refused.stderr.contains("no longer in the history"),
        "a view below the floor was not refused:\n{}",
        refused.describe()
    );
    agent.stop()?;
    appliance.stop()?;
    Ok(())
}
