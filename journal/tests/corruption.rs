//! Flipped bytes: a byte of a segment file is flipped (media corruption) at every position of
//! every header, record and sync frame, and at a sample of the padding; opening and reading
//! must report an error naming the segment (and, inside a record, its seq) or return exactly
//! the original records. Flipped data is never returned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{check_reads, config, extents, Extent, Model};
use journal::segment::{SegmentId, SEGMENT_HEADER_BYTES};
use journal::{
    Corruption, CorruptionReason, Crash, Journal, MemStorage, OpenError, ReadError, Record,
    RecordKind, Seq,
};

const SEGMENT_BYTES: u64 = 16 << 10;

fn build(close: bool) -> (MemStorage, Vec<Model>) {
    let storage = MemStorage::new();
    let mut journal = Journal::open(storage.clone(), config(SEGMENT_BYTES)).unwrap();
    let mut model = Vec::new();
    let records = [
        Model::write(200, 1, false),
        Model::write(5000, 2, true),
        Model::new(RecordKind::Trim, 4096, 3, false, false),
        Model::write(7000, 4, false),
        Model::write(3000, 5, true),
        Model::write(9000, 6, false),
        Model::new(RecordKind::Checkpoint, 0, 7, false, false),
        Model::write(100, 8, false),
        Model::write(2500, 9, true),
    ];
    for (i, record) in records.into_iter().enumerate() {
        journal.append(record.entry()).unwrap();
        model.push(record);
        if i % 2 == 1 {
            journal.sync().unwrap();
        }
    }
    if close {
        journal.close().unwrap();
    } else {
        journal.sync().unwrap();
    }
    (storage, model)
}

/// Opens and reads everything; Ok(records) or the corruption reported.
fn open_and_read(image: MemStorage) -> Result<Vec<Record>, Corruption> {
    let journal = match Journal::open(image, config(SEGMENT_BYTES)) {
        Ok(journal) => journal,
        Err(OpenError::Corrupt(c)) => return Err(c),
        Err(e) => panic!("unexpected open error: {e}"),
    };
    let mut out = Vec::new();
    for record in journal.reader(journal.first_seq()).unwrap() {
        match record {
            Ok(record) => out.push(record),
            Err(ReadError::Corrupt(c)) => return Err(c),
            Err(e) => panic!("unexpected read error: {e}"),
        }
    }
    Ok(out)
}

/// Positions to flip in a segment image: every byte of the segment header, of every record
/// and of every sync frame's header, and a sample of the padding and zero tail.
fn positions(image: &[u8]) -> Vec<(usize, Option<Seq>)> {
    let mut out: Vec<(usize, Option<Seq>)> = (0..SEGMENT_HEADER_BYTES).map(|i| (i, None)).collect();
    let mut data_end = 0;
    for extent in extents(image) {
        match extent {
            Extent::Record { seq, start, end } => {
                let (start, end) = (start as usize, end as usize);
                out.extend((start..end).map(|i| (i, Some(seq))));
                data_end = end;
            }
            Extent::Sync {
                start,
                header_end,
                end,
            } => {
                out.extend((start as usize..header_end as usize).map(|i| (i, None)));
                out.extend(
                    (header_end as usize..end as usize)
                        .step_by(97)
                        .map(|i| (i, None)),
                );
                data_end = end as usize;
            }
        }
    }
    out.extend((SEGMENT_HEADER_BYTES..4096).step_by(211).map(|i| (i, None)));
    out.extend((data_end..image.len()).step_by(509).map(|i| (i, None)));
    out
}

fn flip_every_segment(close: bool) -> usize {
    let (base, model) = build(close);
    let names = base.file_names();
    assert!(
        names.len() >= 3,
        "the journal spans several segments: {names:?}"
    );
    let mut flips = 0;
    for name in &names {
        let image = base.file(name).unwrap();
        let first_seq = SegmentId::parse_file_name(name).unwrap().first_seq;
        let active = name == names.last().unwrap();
        for (at, record_seq) in positions(&image) {
            let copy = base.crash(Crash::DropUnsynced);
            assert!(copy.corrupt(name, at, 0x5a));
            let what = format!("{name} byte {at}");
            match open_and_read(copy) {
                Err(c) => {
                    assert_eq!(&c.segment, name, "{what}: {c}");
                    if let Some(seq) = record_seq {
                        assert_eq!(c.seq, seq, "{what}: {c}");
                    }
                    if at < SEGMENT_HEADER_BYTES {
                        assert_eq!(c.seq, first_seq, "{what}: {c}");
                        assert!(matches!(c.reason, CorruptionReason::SegmentHeader(_)));
                    }
                }
                Ok(records) => {
                    // Only bytes no record depends on may be flipped without an error: the
                    // header block's padding, sync-frame padding, the zero tail, or (without
                    // a final sync frame) the last batch of the active segment, cut as a torn
                    // tail. Either way no flipped data is returned.
                    let torn_ok = !close && active;
                    assert!(
                        record_seq.is_none() || torn_ok,
                        "{what}: flipped record {record_seq:?} read without error"
                    );
                    assert!(records.len() <= model.len());
                    if !torn_ok {
                        assert_eq!(records.len(), model.len(), "{what}");
                    }
                    for (i, record) in records.iter().enumerate() {
                        let seq = Seq(i as u64 + 1);
                        model[i].check(record, seq, record.header.generation);
                    }
                }
            }
            flips += 1;
        }
    }
    flips
}

#[test]
fn flipped_bytes_after_close_are_always_reported() {
    let flips = flip_every_segment(true);
    assert!(flips > 15_000, "{flips} positions");
}

#[test]
fn flipped_bytes_without_close_are_reported_or_cut_never_returned() {
    let flips = flip_every_segment(false);
    assert!(flips > 15_000, "{flips} positions");
}

/// A corrupt record in a sealed segment is an error at read time that names the segment and
/// the seq; records before it are returned, nothing after it.
#[test]
fn reader_stops_at_the_corrupt_record() {
    let (base, model) = build(true);
    let names = base.file_names();
    let image = base.file(&names[0]).unwrap();
    let Some(Extent::Record { seq, start, end }) = extents(&image)
        .into_iter()
        .filter(|e| matches!(e, Extent::Record { .. }))
        .nth(1)
    else {
        panic!("no second record");
    };
    assert!(base.corrupt(&names[0], ((start + end) / 2) as usize, 0x01));
    let journal = Journal::open(base, config(SEGMENT_BYTES)).unwrap();
    let mut reader = journal.reader(Seq(1)).unwrap();
    let first = reader.next().unwrap().unwrap();
    model[0].check(&first, Seq(1), first.header.generation);
    match reader.next() {
        Some(Err(ReadError::Corrupt(c))) => {
            assert_eq!(c.segment, names[0]);
            assert_eq!(c.seq, seq);
            assert!(
                matches!(
                    c.reason,
                    CorruptionReason::Record(journal::InvalidRecord::StoredChecksum { .. })
                ),
                "{c}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(reader.next().is_none(), "nothing after the corruption");
    // Reading from after the damaged record still works.
    check_reads(&journal, seq.next(), &model);
}

/// A bad record followed by valid, durable ones in the active segment is corruption at open:
/// the journal is not truncated and stays as it was.
#[test]
fn corruption_in_the_active_segment_refuses_to_open_and_changes_nothing() {
    let (base, _) = build(true);
    let names = base.file_names();
    let active = names.last().unwrap();
    let image = base.file(active).unwrap();
    let Some(Extent::Record { seq, start, .. }) = extents(&image)
        .into_iter()
        .find(|e| matches!(e, Extent::Record { .. }))
    else {
        panic!("no record in the active segment");
    };
    assert!(base.corrupt(active, start as usize + 30, 0xff));
    for _ in 0..2 {
        match Journal::open(base.clone(), config(SEGMENT_BYTES)) {
            Err(OpenError::Corrupt(c)) => {
                assert_eq!(&c.segment, active);
                assert_eq!(c.seq, seq);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(base.file(active).unwrap().len(), image.len());
}
