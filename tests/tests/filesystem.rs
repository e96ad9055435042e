//! A real file system on a `cdp-agent` export: `nbdfuse` presents the export as a file, a loop
//! device turns it into a block device, `mkfs.ext4` (which discards the whole device: NBD
//! TRIM) builds ext4 on it, files of random sizes are written, the file system is checked
//! with `fsck -f -n`, mounted again read-only and every file's blake3 verified. The journal
//! replay must rebuild the backing file exactly, and the backing file holds a clean ext4.
//!
//! Needs root and /dev/fuse (loop devices, mount): fails with a clear message otherwise,
//! never skips. Must never leave a mount, a loop device or nbdfuse behind: the guards undo
//! them on Drop, in reverse order, even when an assertion fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use cdp_tests::image::write_file;
use cdp_tests::mount::{require_root_and_fuse, FuseFile, LoopDevice, Mounted};
use cdp_tests::{blake3_file, Agent, Rng, Tool, KIB, MIB};

const DISK_BYTES: u64 = 128 * MIB;

#[test]
fn ext4_on_nbdfuse_loop_device_passes_fsck_and_keeps_files() -> Result<()> {
    require_root_and_fuse()?;
    let mut rng = Rng::for_test("ext4_on_nbdfuse_loop_device_passes_fsck_and_keeps_files");
    let agent = Agent::one_disk_of(DISK_BYTES)?;
    let work = agent.dir().join("fs");
    // Declared in creation order, so Drop undoes them in reverse: mount, loop, fuse.
    let mut fuse = FuseFile::mount(&agent.uri("d0"), &work.join("fuse"), DISK_BYTES)?;
    let mut lo = LoopDevice::attach(fuse.file())?;
    let dev = lo.device().to_owned();
    Tool::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "cdp-test"])
        .arg(&dev)
        .timeout(Duration::from_secs(180))
        .run_ok()?;

    let mnt = work.join("mnt");
    let mut files = BTreeMap::new();
    {
        let mut fs = Mounted::mount(&dev, &mnt, None)?;
        for i in 0..24 {
            let sub = fs.dir().join(format!("dir{}", i % 4));
            std::fs::create_dir_all(&sub)?;
            let len = match i % 3 {
                0 => rng.range(1, 4 * KIB),
                1 => rng.range(4 * KIB, 256 * KIB),
                _ => rng.range(256 * KIB, 3 * MIB),
            };
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            let path = sub.join(format!("file{i}.bin"));
            write_file(&path, &data)?;
            files.insert(
                path.strip_prefix(fs.dir())?.to_owned(),
                blake3::hash(&data).to_hex().to_string(),
            );
        }
        // Delete a few: the freed blocks get reused or discarded later.
        for i in [3, 10, 17] {
            let rel = std::path::PathBuf::from(format!("dir{}/file{i}.bin", i % 4));
            std::fs::remove_file(fs.dir().join(&rel))?;
            files.remove(&rel);
        }
        Tool::new("sync").arg("-f").arg(fs.dir()).run_ok()?;
        fs.unmount()?;
    }
    // A forced full check, read-only (-n): exit 0 means no problem found.
    Tool::new("fsck")
        .args(["-f", "-n"])
        .arg(&dev)
        .timeout(Duration::from_secs(120))
        .run_ok()?;

    {
        let mut fs = Mounted::mount(&dev, &mnt, Some("ro"))?;
        for (rel, expected) in &files {
            let actual = blake3_file(&fs.dir().join(rel))?;
            ensure!(
                &actual == expected,
                "{} changed after remount: {actual} != {expected}",
                rel.display()
            );
        }
        let listed = walk_files(fs.dir())?;
        let expected: Vec<_> = files.keys().cloned().collect();
        assert_eq!(listed, expected, "files on the remounted file system");
        fs.unmount()?;
    }
    lo.detach()?;
    fuse.unmount()?;

    // The agent's backing file is the disk the file system was built on.
    let backing = agent.disk("d0")?.backing.clone();
    Tool::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&backing)
        .timeout(Duration::from_secs(120))
        .run_ok()?;
    agent.finish()?;
    Ok(())
}

/// Regular files under `root`, relative, sorted (lost+found skipped).
fn walk_files(root: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                if entry.file_name() != "lost+found" {
                    stack.push(path);
                }
            } else {
                out.push(path.strip_prefix(root)?.to_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}
