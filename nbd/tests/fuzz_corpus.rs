//! Runs the fuzz bodies (`nbd::fuzz`) over every seed in `fuzz/corpus/<target>/`, so the
//! corpus the nightly fuzzer starts from is also a regression suite on stable.
//! `cargo test -p nbd --test fuzz_corpus -- --ignored write_seed_corpus` rewrites the seeds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure

use std::path::{Path, PathBuf};

use nbd::{
    ClientFlags, ClientOption, Command, CommandFlags, ExportQuery, Handle, InfoType, OptionCode,
    OptionHeader, Request, RequestHeader,
};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn run_corpus(target: &str, body: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        body(&data);
        nbd::fuzz::decode_any(&data);
        count += 1;
    }
    assert!(count >= 10, "only {count} seeds in {}", dir.display());
}

#[test]
fn request_corpus() {
    run_corpus("decode_request", nbd::fuzz::decode_request);
}

#[test]
fn option_corpus() {
    run_corpus("decode_option", nbd::fuzz::decode_option);
}

fn request(command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Request {
        header: RequestHeader {
            flags: CommandFlags(flags),
            command: Command::from_code(command),
            handle: Handle(0xc0ffee),
            offset,
            length,
        },
        payload,
    }
    .encode(&mut out);
    out
}

fn option(option: ClientOption<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    option.encode(&mut out);
    out
}

fn raw_option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    nbd::OptionRequest {
        code: OptionCode(code),
        data,
    }
    .encode(&mut out);
    out
}

fn flags(bits: u32) -> Vec<u8> {
    bits.to_be_bytes().to_vec()
}

fn go<'a>(name: &'a str, infos: &[u16]) -> ExportQuery<'a> {
    ExportQuery {
        name,
        info_requests: infos.iter().map(|&i| InfoType(i)).collect(),
    }
}

fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let page = vec![0xab; 4096];
    let mut bad_magic = request(0, 0, 0, 4096, &[]);
    bad_magic[0] = 0x12;
    let mut historic_magic = request(0, 0, 0, 512, &[]);
    historic_magic[..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
    let mut extended_magic = request(0, 0, 0, 512, &[]);
    extended_magic[..4].copy_from_slice(&0x21e4_1c71u32.to_be_bytes());
    let write = request(1, 0, 4096, 4096, &page);
    vec![
        ("read_4k", request(0, 0, 0, 4096, &[])),
        ("read_df", request(0, 4, 0, 65536, &[])),
        ("read_past_end", request(0, 0, 1 << 20, 512, &[])),
        ("read_misaligned", request(0, 0, 1, 511, &[])),
        ("read_too_large", request(0, 0, 0, (32 << 20) + 512, &[])),
        ("read_zero_length", request(0, 0, 0, 0, &[])),
        ("write_4k", write.clone()),
        ("write_fua", request(1, 1, 0, 512, &page[..512])),
        ("write_zero_length", request(1, 0, 0, 0, &[])),
        ("write_truncated_payload", write[..28 + 100].to_vec()),
        ("write_too_large_header", request(1, 0, 0, 64 << 20, &[])),
        ("write_bad_flag", request(1, 2, 0, 512, &page[..512])),
        ("flush", request(3, 0, 0, 0, &[])),
        ("flush_fua_nonzero", request(3, 1, 5, 5, &[])),
        ("trim", request(4, 0, 0, 1 << 20, &[])),
        ("write_zeroes_no_hole_fua", request(6, 3, 8192, 8192, &[])),
        ("write_zeroes_fast_zero", request(6, 16, 0, 4096, &[])),
        ("disc", request(2, 0, 0, 0, &[])),
        ("cache", request(5, 0, 0, 4096, &[])),
        ("block_status", request(7, 8, 0, 4096, &[])),
        ("unknown_command", request(0x4242, 0, 0, 4096, &[])),
        (
            "all_flags_max_values",
            request(0xffff, 0xffff, u64::MAX, u32::MAX, &[]),
        ),
        ("bad_magic", bad_magic),
        ("historic_magic", historic_magic),
        ("extended_header_magic", extended_magic),
        (
            "truncated_header",
            request(0, 0, 0, 4096, &[])[..13].to_vec(),
        ),
        ("empty", Vec::new()),
        (
            "pipeline",
            concat(&[
                request(1, 0, 0, 4096, &page),
                request(0, 0, 0, 4096, &[]),
                request(6, 0, 4096, 4096, &[]),
                request(3, 0, 0, 0, &[]),
                request(2, 0, 0, 0, &[]),
            ]),
        ),
    ]
}

fn option_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut bad_magic = option(ClientOption::List);
    bad_magic[7] ^= 1;
    let mut huge = Vec::new();
    OptionHeader {
        code: OptionCode::GO,
        data_bytes: u32::MAX,
    }
    .encode(&mut huge);
    let nul_name = raw_option(7, &[0, 0, 0, 3, b'a', 0, b'b', 0, 0]);
    vec![
        ("flags_fixed", flags(1)),
        ("flags_fixed_no_zeroes", flags(3)),
        ("flags_unknown", flags(0x8000_0001)),
        ("flags_truncated", vec![0, 0]),
        (
            "qemu_like_handshake",
            concat(&[
                flags(3),
                option(ClientOption::StructuredReply),
                option(ClientOption::Go(go("disk0", &[3]))),
            ]),
        ),
        (
            "libnbd_like_handshake",
            concat(&[
                flags(3),
                option(ClientOption::StructuredReply),
                raw_option(10, &[0, 0, 0, 5, b'd', b'i', b's', b'k', b'0', 0, 0, 0, 0]),
                option(ClientOption::Info(go("disk0", &[1, 2, 3]))),
                option(ClientOption::Go(go("disk0", &[1, 2, 3]))),
            ]),
        ),
        ("list", concat(&[flags(1), option(ClientOption::List)])),
        ("list_with_data", concat(&[flags(1), raw_option(3, b"x")])),
        ("abort", concat(&[flags(1), option(ClientOption::Abort)])),
        (
            "abort_with_data",
            concat(&[flags(1), raw_option(2, b"bye")]),
        ),
        (
            "export_name",
            concat(&[flags(3), option(ClientOption::ExportName { name: "disk0" })]),
        ),
        (
            "export_name_default",
            concat(&[flags(1), option(ClientOption::ExportName { name: "" })]),
        ),
        (
            "export_name_bad_utf8",
            concat(&[flags(1), raw_option(1, &[0xc3, 0x28])]),
        ),
        (
            "starttls",
            concat(&[flags(1), option(ClientOption::StartTls)]),
        ),
        (
            "structured_reply_with_data",
            concat(&[flags(1), raw_option(8, &[1])]),
        ),
        (
            "info_empty_name",
            concat(&[flags(1), option(ClientOption::Info(go("", &[])))]),
        ),
        (
            "go_bad_length",
            concat(&[flags(1), raw_option(7, &[0, 0, 0, 9, b'a'])]),
        ),
        (
            "go_odd_info_list",
            concat(&[flags(1), raw_option(7, &[0, 0, 0, 0, 0, 2, 0, 3])]),
        ),
        ("go_name_with_nul", concat(&[flags(1), nul_name])),
        (
            "unknown_option",
            concat(&[flags(1), raw_option(0x1234, b"data")]),
        ),
        ("extended_headers", concat(&[flags(1), raw_option(11, b"")])),
        ("option_data_too_large", concat(&[flags(1), huge])),
        (
            "option_truncated",
            concat(&[flags(1), option(ClientOption::List)[..10].to_vec()]),
        ),
        ("option_bad_magic", concat(&[flags(1), bad_magic])),
        (
            "options_without_flags",
            option(ClientOption::Go(go("x", &[0]))),
        ),
        (
            "client_flags_only_len",
            ClientFlags::default().bits().to_be_bytes().to_vec(),
        ),
    ]
}

#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("decode_request", request_seeds()),
        ("decode_option", option_seeds()),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

#[test]
fn seeds_in_code_pass_the_bodies() {
    for (_, seed) in request_seeds() {
        nbd::fuzz::decode_request(&seed);
    }
    for (_, seed) in option_seeds() {
        nbd::fuzz::decode_option(&seed);
    }
}
