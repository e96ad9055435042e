//! Property: no byte string panics any decoder of the crate, whether it is noise or starts
//! with a valid magic number (so the decoders get past their first check).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

use proptest::prelude::*;

const MAGICS: [&[u8]; 6] = [
    b"IHAVEOPT",
    &[0x25, 0x60, 0x95, 0x13],
    &[0x67, 0x44, 0x66, 0x98],
    &[0x66, 0x8e, 0x33, 0xef],
    &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9],
    b"NBDMAGICIHAVEOPT",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        nbd::fuzz::decode_any(&data);
    }

    #[test]
    fn bytes_after_a_magic_never_panic(
        magic in 0..MAGICS.len(),
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut data = MAGICS[magic].to_vec();
        data.extend_from_slice(&tail);
        nbd::fuzz::decode_any(&data);
        // The client-flags prefix the option target expects.
        let mut with_flags = vec![0, 0, 0, 3];
        with_flags.extend_from_slice(&data);
        nbd::fuzz::decode_option(&with_flags);
    }

    #[test]
    fn judge_never_panics(
        command in any::<u16>(), flags in any::<u16>(), offset in any::<u64>(),
        length in any::<u32>(), size in any::<u64>(), min_shift in 0u32..17, tflags in any::<u16>(),
    ) {
        let header = nbd::RequestHeader {
            command: nbd::Command::from_code(command),
            flags: nbd::CommandFlags(flags),
            handle: nbd::Handle(0),
            offset,
            length,
        };
        let export = nbd::ExportParams {
            size_bytes: size,
            block_sizes: nbd::BlockSizes {
                min_bytes: 1 << min_shift,
                preferred_bytes: 4096,
                max_bytes: 32 << 20,
            },
            flags: nbd::TransmissionFlags(tflags),
        };
        let _ = nbd::judge(&header, &export);
    }
}
