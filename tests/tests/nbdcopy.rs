//! libnbd's clients against `cdp-agent`: `nbdinfo --list` shows every export with its size
//! and the capabilities the design promises (structured replies, flush, FUA, trim,
//! write-zeroes, multi-conn), an unknown export is refused without harming the agent, and
//! `nbdcopy` copies into, out of and between exports with several connections. Every
//! scenario ends by replaying the journal against the backing files.
//!
//! Must never: accept an export list that has extra, missing or mis-sized exports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use cdp_tests::image::{random_image_bytes, write_file};
use cdp_tests::{assert_same_content, export_size, Agent, Rng, Tool, MIB};

#[test]
fn nbdinfo_lists_every_export_with_size_and_capabilities() -> Result<()> {
    let disks = [
        ("d0", 64 * MIB),
        ("disk-b", 32 * MIB),
        ("vm.disk_3", 1024 * MIB + 512),
    ];
    let mut builder = Agent::builder();
    for (name, size) in disks {
        builder = builder.disk(name, size);
    }
    let agent = builder.start()?;
    let sock = &agent.listeners().nbd_unix[0];
    let any = format!("nbd+unix:///?socket={}", sock.display());
    let list = Tool::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(&any)
        .run_ok()?;
    let list: serde_json::Value =
        serde_json::from_str(&list.stdout).context("nbdinfo --list JSON")?;
    ensure!(
        list["structured"] == true,
        "structured replies not negotiated: {list:#}"
    );
    let exports = list["exports"].as_array().context("no exports array")?;
    let listed: BTreeMap<String, u64> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap_or_default().to_owned(),
                e["export-size"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let expected: BTreeMap<String, u64> =
        disks.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect();
    assert_eq!(listed, expected, "nbdinfo --list:\n{list:#}");
    for e in exports {
        let name = e["export-name"].as_str().unwrap_or_default();
        assert_eq!(
            e["is_read_only"], false,
            "export {name} is read-only: {e:#}"
        );
        for cap in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
        ] {
            assert_eq!(e[cap], true, "export {name} lacks {cap}: {e:#}");
        }
    }
    for (name, size) in disks {
        assert_eq!(
            export_size(&agent.uri(name))?,
            size,
            "nbdinfo --size {name}"
        );
    }

    // An export that does not exist is refused in the handshake; the agent keeps serving.
    let missing = Tool::new("nbdinfo")
        .arg("--size")
        .arg(agent.uri("no-such-disk"))
        .run_code(1)?;
    ensure!(
        missing.stderr.contains("no-such-disk"),
        "{}",
        missing.describe()
    );
    assert_eq!(export_size(&agent.uri("d0"))?, 64 * MIB);
    agent.finish()?;
    Ok(())
}

#[test]
fn nbdcopy_into_out_of_and_between_exports() -> Result<()> {
    const DISK_BYTES: u64 = 64 * MIB;
    let mut rng = Rng::for_test("nbdcopy_into_out_of_and_between_exports");
    let agent = Agent::builder()
        .disk("d0", DISK_BYTES)
        .disk("d1", DISK_BYTES)
        .start()?;
    let (d0, d1) = (agent.uri("d0"), agent.uri("d1"));
    let source = agent.dir().join("source.img");
    write_file(&source, &random_image_bytes(&mut rng, DISK_BYTES))?;

    // Into the export: 4 connections (multi-conn), 64 requests in flight each.
    Tool::new("nbdcopy")
        .args(["--connections=4", "--requests=64", "--flush", "--"])
        .arg(&source)
        .arg(&d0)
        .run_ok()?;
    // Out of it, into a file.
    let out = agent.dir().join("out.img");
    Tool::new("nbdcopy").arg("--").arg(&d0).arg(&out).run_ok()?;
    assert_same_content("nbdcopy round trip", &source, &out)?;
    // Between two exports of the same agent, one connection, small requests.
    Tool::new("nbdcopy")
        .args(["--connections=1", "--request-size=65536", "--flush", "--"])
        .arg(&d0)
        .arg(&d1)
        .run_ok()?;
    let out1 = agent.dir().join("out1.img");
    Tool::new("nbdcopy")
        .arg("--")
        .arg(&d1)
        .arg(&out1)
        .run_ok()?;
    assert_same_content("nbdcopy export to export", &source, &out1)?;
    assert_same_content("backing file of d1", &source, &agent.disk("d1")?.backing)?;
    agent.finish()?;
    Ok(())
}
