//! The journal on a real directory: reopen, torn tail cut on a real file, trim deleting whole
//! sealed segments, generations and the refusals of open.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::{check_reads, config, Model, JOB};
use journal::segment::SegmentId;
use journal::{Generation, JobId, Journal, JournalConfig, OpenError, ReadError, RecordKind, Seq};

fn segment_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn reopen_reads_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    {
        let mut journal = Journal::open(dir.path(), config(16 << 10)).unwrap();
        for i in 0..40u64 {
            let record = Model::new(
                RecordKind::ALL[(i % RecordKind::ALL.len() as u64) as usize],
                (i as usize * 997) % 20_000,
                i,
                i % 2 == 0,
                i % 3 == 0,
            );
            assert_eq!(journal.append(record.entry()).unwrap(), Seq(i + 1));
            model.push(record);
            if i % 7 == 0 {
                journal.sync().unwrap();
            }
        }
        journal.sync().unwrap();
        assert!(journal.stats().compressed_records > 0);
    }
    let journal = Journal::open(dir.path(), config(16 << 10)).unwrap();
    assert_eq!(journal.head_seq(), Seq(40));
    assert!(journal.recovery().torn_tail.is_none());
    for from in [1, 2, 17, 40, 41] {
        check_reads(&journal, Seq(from), &model);
    }
    assert!(matches!(
        journal.reader(Seq(42)),
        Err(ReadError::BeyondHead { .. })
    ));
    assert!(segment_files(dir.path()).len() > 2);
}

#[test]
fn torn_tail_on_a_real_file_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Vec::new();
    let mut journal = Journal::open(dir.path(), config(1 << 20)).unwrap();
    for i in 0..5 {
        let record = Model::write(3000, i, false);
        journal.append(record.entry()).unwrap();
        model.push(record);
    }
    journal.sync().unwrap();
    let record = Model::write(3000, 5, false);
    journal.append(record.entry()).unwrap();
    model.push(record);
    drop(journal);
    // Tear the last record: its second half never reached the disk.
    let name = segment_files(dir.path()).pop().unwrap();
    let path = dir.path().join(&name);
    let image = fs::read(&path).unwrap();
    let last = common::extents(&image).into_iter().last().unwrap();
    let common::Extent::Record { seq, start, end } = last else {
        panic!("last frame is {last:?}");
    };
    assert_eq!(seq, Seq(6));
    let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&vec![0u8; ((end - start) / 2) as usize], (start + end) / 2)
        .unwrap();
    drop(file);

    let mut journal = Journal::open(dir.path(), config(1 << 20)).unwrap();
    let torn = journal.recovery().torn_tail.clone().unwrap();
    assert_eq!(torn.segment, name);
    assert_eq!(torn.seq, Seq(6));
    assert_eq!(torn.offset, start);
    assert_eq!(journal.head_seq(), Seq(5));
    check_reads(&journal, Seq(1), &model);
    // The cut bytes are gone for good; appends continue at seq 6 on a fresh block.
    let record = Model::write(10, 77, false);
    assert_eq!(journal.append(record.entry()).unwrap(), Seq(6));
    journal.sync().unwrap();
    model[5] = record;
    drop(journal);
    let journal = Journal::open(dir.path(), config(1 << 20)).unwrap();
    assert!(journal.recovery().torn_tail.is_none());
    check_reads(&journal, Seq(1), &model);
}

#[test]
fn trim_deletes_whole_sealed_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), config(16 << 10)).unwrap();
    let mut model = Vec::new();
    for i in 0..30 {
        let record = Model::write(3000, i, false);
        journal.append(record.entry()).unwrap();
        model.push(record);
    }
    journal.sync().unwrap();
    let before = segment_files(dir.path());
    let firsts: Vec<Seq> = before
        .iter()
        .map(|n| SegmentId::parse_file_name(n).unwrap().first_seq)
        .collect();
    assert!(firsts.len() > 4);
    // Up to a seq in the middle of the third segment: the first two go.
    let up_to = Seq(firsts[2].0 + 1);
    assert_eq!(journal.trim(up_to).unwrap(), firsts[2]);
    assert_eq!(segment_files(dir.path()), before[2..].to_vec());
    assert!(matches!(
        journal.reader(Seq(1)),
        Err(ReadError::Trimmed { first, .. }) if first == firsts[2]
    ));
    check_reads(&journal, firsts[2], &model);
    // Trimming past the head never touches the active segment.
    journal.trim(Seq(1000)).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(journal.first_seq(), *firsts.last().unwrap());
    drop(journal);
    let journal = Journal::open(dir.path(), config(16 << 10)).unwrap();
    assert_eq!(journal.head_seq(), Seq(30));
    check_reads(&journal, journal.first_seq(), &model);
}

#[test]
fn a_new_generation_starts_a_new_segment_and_an_old_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), config(64 << 10)).unwrap();
    let a = Model::write(100, 1, false);
    journal.append(a.entry()).unwrap();
    journal.sync().unwrap();
    drop(journal);
    let next = JournalConfig {
        generation: Generation(2),
        ..config(64 << 10)
    };
    let mut journal = Journal::open(dir.path(), next.clone()).unwrap();
    let b = Model::write(100, 2, false);
    assert_eq!(journal.append(b.entry()).unwrap(), Seq(2));
    journal.sync().unwrap();
    let records: Vec<_> = journal
        .reader(Seq(1))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(records[0].header.generation, Generation(1));
    assert_eq!(records[1].header.generation, Generation(2));
    drop(journal);
    assert_eq!(segment_files(dir.path()).len(), 2);
    match Journal::open(dir.path(), config(64 << 10)) {
        Err(OpenError::StaleGeneration { found, configured }) => {
            assert_eq!((found, configured), (Generation(2), Generation(1)));
        }
        other => panic!("{other:?}"),
    }
    let other_job = JournalConfig {
        job: JobId([1; 16]),
        ..next
    };
    assert!(matches!(
        Journal::open(dir.path(), other_job),
        Err(OpenError::ForeignJob { expected, .. }) if expected == JobId([1; 16])
    ));
    assert_ne!(JOB, JobId([1; 16]));
}

#[test]
fn leftover_temporary_segment_is_removed_and_unknown_files_ignored() {
    let dir = tempfile::tempdir().unwrap();
    drop(Journal::open(dir.path(), config(64 << 10)).unwrap());
    let id = SegmentId {
        job: JOB,
        generation: Generation(1),
        first_seq: Seq(9),
    };
    fs::write(dir.path().join(id.tmp_file_name()), b"half made").unwrap();
    fs::write(dir.path().join("README"), b"not a segment").unwrap();
    let journal = Journal::open(dir.path(), config(64 << 10)).unwrap();
    assert_eq!(
        journal.recovery().removed_tmp_files,
        vec![id.tmp_file_name()]
    );
    assert!(dir.path().join("README").exists());
}

#[test]
fn bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Journal::open(dir.path(), config(4096)),
        Err(OpenError::Config { .. })
    ));
    let zstd_too_high = JournalConfig {
        compression: journal::Compression::Zstd { level: 1000 },
        ..config(64 << 10)
    };
    assert!(matches!(
        Journal::open(dir.path(), zstd_too_high),
        Err(OpenError::Config { .. })
    ));
}

/// A landing journal takes records exactly as another journal stored them: same bytes, same
/// seqs; a record with the wrong seq, generation or length is refused and nothing changes.
#[test]
fn append_stored_keeps_records_as_shipped() {
    let source_dir = tempfile::tempdir().unwrap();
    let landing_dir = tempfile::tempdir().unwrap();
    let mut source = Journal::open(source_dir.path(), config(16 << 10)).unwrap();
    let mut model = Vec::new();
    for i in 0..30u64 {
        let record = Model::new(
            RecordKind::ALL[(i % RecordKind::ALL.len() as u64) as usize],
            (i as usize * 1231) % 9000,
            i,
            i % 2 == 0,
            false,
        );
        source.append(record.entry()).unwrap();
        model.push(record);
    }
    source.sync().unwrap();
    let mut stored = Vec::new();
    let mut reader = source.raw_reader(Seq(1)).unwrap();
    while let Some((_, bytes)) = reader.next_stored().unwrap() {
        stored.push(bytes.to_vec());
    }
    assert_eq!(stored.len(), 30);

    let mut landing = Journal::open(landing_dir.path(), config(16 << 10)).unwrap();
    // Not the next seq: refused, and the journal stays usable.
    let err = landing.append_stored(&stored[1]).unwrap_err();
    assert!(
        err.to_string().contains("seq 2, the journal expects 1"),
        "{err}"
    );
    // Trailing bytes: refused.
    let mut longer = stored[0].clone();
    longer.push(0);
    assert!(landing
        .append_stored(&longer)
        .unwrap_err()
        .to_string()
        .contains("header says"));
    // A damaged header: refused.
    let mut damaged = stored[0].clone();
    damaged[30] ^= 1;
    assert!(landing.append_stored(&damaged).is_err());
    for (i, bytes) in stored.iter().enumerate() {
        assert_eq!(landing.append_stored(bytes).unwrap(), Seq(i as u64 + 1));
    }
    landing.sync().unwrap();
    drop(landing);
    let landing = Journal::open(landing_dir.path(), config(16 << 10)).unwrap();
    assert_eq!(landing.head_seq(), Seq(30));
    check_reads(&landing, Seq(1), &model);

    // Another generation: refused.
    let mut other = JournalConfig::new(JOB, Generation(7));
    other.segment_bytes_max = 16 << 10;
    let other_dir = tempfile::tempdir().unwrap();
    let mut landing = Journal::open(other_dir.path(), other).unwrap();
    let err = landing.append_stored(&stored[0]).unwrap_err();
    assert!(err.to_string().contains("generation"), "{err}");
}
