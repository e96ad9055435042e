//! Option haggling: the client's option requests (`EXPORT_NAME`, `ABORT`, `LIST`, `INFO`,
//! `GO`, `STRUCTURED_REPLY`, ...) and the server's option replies, including the `NBD_REP_INFO`
//! items. Pure codecs: framing errors are [`DecodeError`]s (the server hangs up), content
//! errors are [`OptionError`]s (the server answers `NBD_REP_ERR_INVALID` and carries on).

use thiserror::Error;

use crate::handshake::IHAVEOPT;
use crate::transmission::{BlockSizes, TransmissionFlags};
use crate::wire::{len_u16, len_u32, protocol_str, DecodeError, Invalid, Reader};

/// Magic number that starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// An option code (32 bits); unknown codes are kept so the server can answer `ERR_UNSUP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OptionCode(pub u32);

impl OptionCode {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: Self = Self(1);
    /// `NBD_OPT_ABORT`.
    pub const ABORT: Self = Self(2);
    /// `NBD_OPT_LIST`.
    pub const LIST: Self = Self(3);
    /// `NBD_OPT_PEEK_EXPORT` (withdrawn).
    pub const PEEK_EXPORT: Self = Self(4);
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: Self = Self(5);
    /// `NBD_OPT_INFO`.
    pub const INFO: Self = Self(6);
    /// `NBD_OPT_GO`.
    pub const GO: Self = Self(7);
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: Self = Self(8);
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: Self = Self(9);
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: Self = Self(10);
    /// `NBD_OPT_EXTENDED_HEADERS`.
    pub const EXTENDED_HEADERS: Self = Self(11);

    /// The protocol's name for the option, for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "EXPORT_NAME",
            2 => "ABORT",
            3 => "LIST",
            4 => "PEEK_EXPORT",
            5 => "STARTTLS",
            6 => "INFO",
            7 => "GO",
            8 => "STRUCTURED_REPLY",
            9 => "LIST_META_CONTEXT",
            10 => "SET_META_CONTEXT",
            11 => "EXTENDED_HEADERS",
            _ => "unknown",
        }
    }
}

/// The fixed part of an option request: `IHAVEOPT`, option code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option asked for.
    pub code: OptionCode,
    /// Length of the data that follows the header, in bytes.
    pub data_bytes: u32,
}

impl OptionHeader {
    /// Encoded length in bytes.
    pub const LEN: usize = 16;

    /// Decodes the 16-byte header, whatever the data length, so that a server can still
    /// read past (or refuse) data longer than it is willing to buffer.
    pub fn decode(buf: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        r.magic64(IHAVEOPT)?;
        let code = OptionCode(r.u32()?);
        let data_bytes = r.u32()?;
        Ok((Self { code, data_bytes }, r.position()))
    }

    /// Appends the header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.code.0.to_be_bytes());
        out.extend_from_slice(&self.data_bytes.to_be_bytes());
    }
}

/// A whole option request: header and data, not yet interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionRequest<'a> {
    /// The option asked for.
    pub code: OptionCode,
    /// The option's data.
    pub data: &'a [u8],
}

impl<'a> OptionRequest<'a> {
    /// Decodes a whole option request; data longer than `data_bytes_max` is
    /// [`Invalid::OptionTooLarge`] as soon as the header is seen.
    pub fn decode(buf: &'a [u8], data_bytes_max: u32) -> Result<(Self, usize), DecodeError> {
        let (header, _) = OptionHeader::decode(buf)?;
        if header.data_bytes > data_bytes_max {
            return Err(Invalid::OptionTooLarge {
                data_bytes: header.data_bytes,
                data_bytes_max,
            }
            .into());
        }
        let mut r = Reader::new(buf);
        r.bytes(OptionHeader::LEN)?;
        let data = r.bytes(header.data_bytes as usize)?;
        Ok((
            Self {
                code: header.code,
                data,
            },
            r.position(),
        ))
    }

    /// Appends the request to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        OptionHeader {
            code: self.code,
            data_bytes: len_u32(self.data.len()),
        }
        .encode(out);
        out.extend_from_slice(self.data);
    }
}

/// An information item a client can ask for in `NBD_OPT_INFO`/`NBD_OPT_GO` (16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InfoType(pub u16);

impl InfoType {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: Self = Self(0);
    /// `NBD_INFO_NAME`: canonical export name.
    pub const NAME: Self = Self(1);
    /// `NBD_INFO_DESCRIPTION`: human-readable description.
    pub const DESCRIPTION: Self = Self(2);
    /// `NBD_INFO_BLOCK_SIZE`: block size constraints.
    pub const BLOCK_SIZE: Self = Self(3);
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: export name and the information asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery<'a> {
    /// Export name; empty means the default export.
    pub name: &'a str,
    /// Information items requested, in the client's order (bounded by the option's length).
    pub info_requests: Vec<InfoType>,
}

impl ExportQuery<'_> {
    /// Whether the client asked for `info`.
    pub fn requests(&self, info: InfoType) -> bool {
        self.info_requests.contains(&info)
    }

    fn encode_data(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&len_u32(self.name.len()).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&len_u16(self.info_requests.len()).to_be_bytes());
        for info in &self.info_requests {
            out.extend_from_slice(&info.0.to_be_bytes());
        }
    }
}

/// An option request interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption<'a> {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission on this export (no error reply possible).
    ExportName {
        /// Export name; empty means the default export.
        name: &'a str,
    },
    /// `NBD_OPT_ABORT` (any data is ignored, as the protocol asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(ExportQuery<'a>),
    /// `NBD_OPT_GO`.
    Go(ExportQuery<'a>),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// Any other option, known to the protocol or not; the server answers `ERR_UNSUP`.
    Other {
        /// The option code.
        code: OptionCode,
        /// Its data, uninterpreted.
        data: &'a [u8],
    },
}

/// Why the data of a known option is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionError {
    /// The option takes no data but some was sent.
    #[error("option {option} takes no data, got {data_bytes} bytes")]
    UnexpectedData {
        /// The option's name.
        option: &'static str,
        /// Bytes of data sent.
        data_bytes: usize,
    },
    /// The export name is not a protocol string (UTF-8, no NUL, at most 4096 bytes).
    #[error("export name is not a valid string")]
    BadName,
    /// The `INFO`/`GO` data is shorter or longer than its own length fields say.
    #[error("option data length does not match its name and information-request counts")]
    BadLength,
}

impl<'a> ClientOption<'a> {
    /// Interprets a request's data.
    pub fn parse(request: &OptionRequest<'a>) -> Result<Self, OptionError> {
        let data = request.data;
        let no_data = |option: ClientOption<'a>| {
            if data.is_empty() {
                Ok(option)
            } else {
                Err(OptionError::UnexpectedData {
                    option: request.code.name(),
                    data_bytes: data.len(),
                })
            }
        };
        match request.code {
            OptionCode::EXPORT_NAME => Ok(Self::ExportName {
                name: protocol_str(data).ok_or(OptionError::BadName)?,
            }),
            OptionCode::ABORT => Ok(Self::Abort),
            OptionCode::LIST => no_data(Self::List),
            OptionCode::STARTTLS => no_data(Self::StartTls),
            OptionCode::STRUCTURED_REPLY => no_data(Self::StructuredReply),
            OptionCode::INFO => Ok(Self::Info(parse_query(data)?)),
            OptionCode::GO => Ok(Self::Go(parse_query(data)?)),
            code => Ok(Self::Other { code, data }),
        }
    }

    /// The option code this request carries.
    pub fn code(&self) -> OptionCode {
        match self {
            Self::ExportName { .. } => OptionCode::EXPORT_NAME,
            Self::Abort => OptionCode::ABORT,
            Self::List => OptionCode::LIST,
            Self::StartTls => OptionCode::STARTTLS,
            Self::Info(_) => OptionCode::INFO,
            Self::Go(_) => OptionCode::GO,
            Self::StructuredReply => OptionCode::STRUCTURED_REPLY,
            Self::Other { code, .. } => *code,
        }
    }

    /// Appends the whole option request (header and data) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        match self {
            Self::ExportName { name } => data.extend_from_slice(name.as_bytes()),
            Self::Info(query) | Self::Go(query) => query.encode_data(&mut data),
            Self::Other { data: raw, .. } => data.extend_from_slice(raw),
            Self::Abort | Self::List | Self::StartTls | Self::StructuredReply => {}
        }
        OptionRequest {
            code: self.code(),
            data: &data,
        }
        .encode(out);
    }
}

fn parse_query(data: &[u8]) -> Result<ExportQuery<'_>, OptionError> {
    let mut r = Reader::new(data);
    let name_bytes = r.u32().map_err(|_| OptionError::BadLength)? as usize;
    let name = r.bytes(name_bytes).map_err(|_| OptionError::BadLength)?;
    let name = protocol_str(name).ok_or(OptionError::BadName)?;
    let count = usize::from(r.u16().map_err(|_| OptionError::BadLength)?);
    if r.remaining() != count * 2 {
        return Err(OptionError::BadLength);
    }
    let mut info_requests = Vec::with_capacity(count);
    for _ in 0..count {
        info_requests.push(InfoType(r.u16().map_err(|_| OptionError::BadLength)?));
    }
    Ok(ExportQuery {
        name,
        info_requests,
    })
}

/// An option reply type (32 bits); errors have bit 31 set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyType(pub u32);

impl ReplyType {
    /// `NBD_REP_ACK`.
    pub const ACK: Self = Self(1);
    /// `NBD_REP_SERVER`.
    pub const SERVER: Self = Self(2);
    /// `NBD_REP_INFO`.
    pub const INFO: Self = Self(3);
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: Self = Self(4);
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: Self = Self((1 << 31) + 1);
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: Self = Self((1 << 31) + 2);
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: Self = Self((1 << 31) + 3);
    /// `NBD_REP_ERR_PLATFORM`.
    pub const ERR_PLATFORM: Self = Self((1 << 31) + 4);
    /// `NBD_REP_ERR_TLS_REQD`.
    pub const ERR_TLS_REQD: Self = Self((1 << 31) + 5);
    /// `NBD_REP_ERR_UNKNOWN`.
    pub const ERR_UNKNOWN: Self = Self((1 << 31) + 6);
    /// `NBD_REP_ERR_SHUTDOWN`.
    pub const ERR_SHUTDOWN: Self = Self((1 << 31) + 7);
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
    pub const ERR_BLOCK_SIZE_REQD: Self = Self((1 << 31) + 8);
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: Self = Self((1 << 31) + 9);

    /// Whether this reply type reports an error.
    pub fn is_error(self) -> bool {
        self.0 & (1 << 31) != 0
    }
}

/// One option reply: option echoed, reply type, data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply<'a> {
    /// The option this answers.
    pub option: OptionCode,
    /// The reply type.
    pub reply: ReplyType,
    /// The reply's data.
    pub data: &'a [u8],
}

impl<'a> OptionReply<'a> {
    /// Length of the fixed part in bytes.
    pub const HEADER_LEN: usize = 20;

    /// Appends the reply to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.0.to_be_bytes());
        out.extend_from_slice(&self.reply.0.to_be_bytes());
        out.extend_from_slice(&len_u32(self.data.len()).to_be_bytes());
        out.extend_from_slice(self.data);
    }

    /// Decodes one reply; data longer than `data_bytes_max` is invalid.
    pub fn decode(buf: &'a [u8], data_bytes_max: u32) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(buf);
        r.magic64(OPTION_REPLY_MAGIC)?;
        let option = OptionCode(r.u32()?);
        let reply = ReplyType(r.u32()?);
        let data_bytes = r.u32()?;
        if data_bytes > data_bytes_max {
            return Err(Invalid::PayloadTooLarge {
                payload_bytes: u64::from(data_bytes),
                payload_bytes_max: u64::from(data_bytes_max),
            }
            .into());
        }
        let data = r.bytes(data_bytes as usize)?;
        Ok((
            Self {
                option,
                reply,
                data,
            },
            r.position(),
        ))
    }

    /// Appends an `NBD_REP_ACK` for `option`.
    pub fn encode_ack(option: OptionCode, out: &mut Vec<u8>) {
        OptionReply {
            option,
            reply: ReplyType::ACK,
            data: &[],
        }
        .encode(out);
    }

    /// Appends an error reply with a message for humans (truncated to the string limit).
    pub fn encode_error(option: OptionCode, reply: ReplyType, message: &str, out: &mut Vec<u8>) {
        let message = crate::wire::truncate_str(message, crate::wire::STRING_BYTES_MAX);
        OptionReply {
            option,
            reply,
            data: message.as_bytes(),
        }
        .encode(out);
    }

    /// Appends an `NBD_REP_SERVER` entry for `NBD_OPT_LIST`.
    pub fn encode_server(entry: &ServerEntry<'_>, out: &mut Vec<u8>) {
        let mut data = Vec::with_capacity(4 + entry.name.len() + entry.description.len());
        data.extend_from_slice(&len_u32(entry.name.len()).to_be_bytes());
        data.extend_from_slice(entry.name.as_bytes());
        data.extend_from_slice(entry.description.as_bytes());
        OptionReply {
            option: OptionCode::LIST,
            reply: ReplyType::SERVER,
            data: &data,
        }
        .encode(out);
    }

    /// Appends an `NBD_REP_INFO` reply to `option` (`INFO` or `GO`).
    pub fn encode_info(option: OptionCode, info: &InfoReply<'_>, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        info.encode(&mut data);
        OptionReply {
            option,
            reply: ReplyType::INFO,
            data: &data,
        }
        .encode(out);
    }
}

/// The data of an `NBD_REP_SERVER` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerEntry<'a> {
    /// Export name.
    pub name: &'a str,
    /// Description for humans (may be empty).
    pub description: &'a str,
}

impl<'a> ServerEntry<'a> {
    /// Parses the data of an `NBD_REP_SERVER` reply.
    pub fn parse(data: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let name_bytes = r.u32()? as usize;
        let bad = Invalid::Malformed {
            what: "export list entry",
        };
        let name = protocol_str(r.bytes(name_bytes)?).ok_or(bad.clone())?;
        let description = protocol_str(r.bytes(r.remaining())?).ok_or(bad)?;
        Ok(Self { name, description })
    }
}

/// One information item of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoReply<'a> {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size_bytes: u64,
        /// Transmission flags.
        flags: TransmissionFlags,
    },
    /// `NBD_INFO_NAME`.
    Name(&'a str),
    /// `NBD_INFO_DESCRIPTION`.
    Description(&'a str),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(BlockSizes),
    /// An item this codec does not know; clients must ignore it.
    Other {
        /// Its information type.
        info: InfoType,
        /// Its payload.
        data: &'a [u8],
    },
}

impl<'a> InfoReply<'a> {
    /// Appends the item (type and payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Export { size_bytes, flags } => {
                out.extend_from_slice(&InfoType::EXPORT.0.to_be_bytes());
                out.extend_from_slice(&size_bytes.to_be_bytes());
                out.extend_from_slice(&flags.0.to_be_bytes());
            }
            Self::Name(name) => {
                out.extend_from_slice(&InfoType::NAME.0.to_be_bytes());
                out.extend_from_slice(name.as_bytes());
            }
            Self::Description(text) => {
                out.extend_from_slice(&InfoType::DESCRIPTION.0.to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
            Self::BlockSize(sizes) => {
                out.extend_from_slice(&InfoType::BLOCK_SIZE.0.to_be_bytes());
                out.extend_from_slice(&sizes.min_bytes.to_be_bytes());
                out.extend_from_slice(&sizes.preferred_bytes.to_be_bytes());
                out.extend_from_slice(&sizes.max_bytes.to_be_bytes());
            }
            Self::Other { info, data } => {
                out.extend_from_slice(&info.0.to_be_bytes());
                out.extend_from_slice(data);
            }
        }
    }

    /// Parses the data of an `NBD_REP_INFO` reply.
    pub fn parse(data: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data);
        let info = InfoType(r.u16()?);
        let exact = |r: &Reader<'_>, what| {
            if r.remaining() == 0 {
                Ok(())
            } else {
                Err(DecodeError::from(Invalid::Malformed { what }))
            }
        };
        let item = match info {
            InfoType::EXPORT => {
                let size_bytes = r.u64()?;
                let flags = TransmissionFlags(r.u16()?);
                exact(&r, "NBD_INFO_EXPORT length")?;
                Self::Export { size_bytes, flags }
            }
            InfoType::NAME | InfoType::DESCRIPTION => {
                let text = protocol_str(r.bytes(r.remaining())?).ok_or(Invalid::Malformed {
                    what: "information string",
                })?;
                if info == InfoType::NAME {
                    Self::Name(text)
                } else {
                    Self::Description(text)
                }
            }
            InfoType::BLOCK_SIZE => {
                let sizes = BlockSizes {
                    min_bytes: r.u32()?,
                    preferred_bytes: r.u32()?,
                    max_bytes: r.u32()?,
                };
                exact(&r, "NBD_INFO_BLOCK_SIZE length")?;
                Self::BlockSize(sizes)
            }
            info => Self::Other {
                info,
                data: r.bytes(r.remaining())?,
            },
        };
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(code: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        OptionRequest {
            code: OptionCode(code),
            data,
        }
        .encode(&mut out);
        out
    }

    fn query_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name);
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    /// Decodes `input` as one option request (bound 4 KiB) and interprets it; the outcome is
    /// compared as text so each case reads on one line.
    fn check(input: &[u8], expected: &str) {
        let got = match OptionRequest::decode(input, 4096) {
            Err(e) => format!("decode: {e}"),
            Ok((req, used)) => match ClientOption::parse(&req) {
                Ok(option) => format!("{used}: {option:?}"),
                Err(e) => format!("{used}: parse: {e}"),
            },
        };
        assert_eq!(got, expected, "input {input:02x?}");
    }

    #[test]
    fn option_requests() {
        check(&request(1, b"disk0"), r#"21: ExportName { name: "disk0" }"#);
        check(&request(1, b""), r#"16: ExportName { name: "" }"#);
        check(
            &request(1, b"a\0b"),
            "19: parse: export name is not a valid string",
        );
        check(
            &request(1, &[0xff, 0xfe]),
            "18: parse: export name is not a valid string",
        );
        check(&request(2, b""), "16: Abort");
        check(&request(2, b"junk"), "20: Abort");
        check(&request(3, b""), "16: List");
        check(
            &request(3, b"x"),
            "17: parse: option LIST takes no data, got 1 bytes",
        );
        check(&request(5, b""), "16: StartTls");
        check(&request(8, b""), "16: StructuredReply");
        check(
            &request(8, b"zz"),
            "18: parse: option STRUCTURED_REPLY takes no data, got 2 bytes",
        );
        check(
            &request(7, &query_data(b"vm", &[3, 1])),
            r#"28: Go(ExportQuery { name: "vm", info_requests: [InfoType(3), InfoType(1)] })"#,
        );
        check(
            &request(6, &query_data(b"", &[])),
            r#"22: Info(ExportQuery { name: "", info_requests: [] })"#,
        );
        let mut short = query_data(b"vm", &[3, 1]);
        short.pop();
        check(
            &request(7, &short),
            "27: parse: option data length does not match its name and information-request counts",
        );
        let mut long_name = query_data(b"vm", &[]);
        long_name[3] = 200;
        check(
            &request(7, &long_name),
            "24: parse: option data length does not match its name and information-request counts",
        );
        check(
            &request(7, &[0, 0]),
            "18: parse: option data length does not match its name and information-request counts",
        );
        check(
            &request(99, b"abc"),
            r#"19: Other { code: OptionCode(99), data: [97, 98, 99] }"#,
        );
        check(
            &request(10, b""),
            "16: Other { code: OptionCode(10), data: [] }",
        );
        // Framing errors.
        check(
            &request(1, b"disk0")[..20],
            "decode: incomplete frame: need at least 21 bytes",
        );
        check(
            &request(1, b"")[..15],
            "decode: incomplete frame: need at least 16 bytes",
        );
        let mut bad_magic = request(1, b"");
        bad_magic[0] = b'X';
        check(
            &bad_magic,
            "decode: invalid frame: bad magic 0x58484156454f5054, expected 0x49484156454f5054",
        );
        let mut huge = request(1, b"");
        huge[12..16].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        check(
            &huge,
            "decode: invalid frame: option data of 4294967295 bytes exceeds the bound of 4096 bytes",
        );
        check(
            &request(1, &[b'a'; 4097]),
            "decode: invalid frame: option data of 4097 bytes exceeds the bound of 4096 bytes",
        );
    }

    #[test]
    fn option_round_trip() {
        let options = [
            ClientOption::ExportName { name: "x" },
            ClientOption::Abort,
            ClientOption::List,
            ClientOption::StartTls,
            ClientOption::StructuredReply,
            ClientOption::Go(ExportQuery {
                name: "vm1",
                info_requests: vec![InfoType::BLOCK_SIZE, InfoType::NAME],
            }),
            ClientOption::Info(ExportQuery {
                name: "",
                info_requests: vec![],
            }),
            ClientOption::Other {
                code: OptionCode(77),
                data: b"hi",
            },
        ];
        for option in options {
            let mut out = Vec::new();
            option.encode(&mut out);
            let (req, used) = OptionRequest::decode(&out, 4096).unwrap();
            assert_eq!(used, out.len());
            assert_eq!(ClientOption::parse(&req).unwrap(), option);
        }
    }

    #[test]
    fn replies_round_trip() {
        let mut out = Vec::new();
        OptionReply::encode_ack(OptionCode::GO, &mut out);
        OptionReply::encode_server(
            &ServerEntry {
                name: "vm1",
                description: "disk",
            },
            &mut out,
        );
        let infos = [
            InfoReply::Export {
                size_bytes: 4096,
                flags: TransmissionFlags(0x16d),
            },
            InfoReply::Name("vm1"),
            InfoReply::Description("a disk"),
            InfoReply::BlockSize(BlockSizes {
                min_bytes: 512,
                preferred_bytes: 4096,
                max_bytes: 1 << 25,
            }),
            InfoReply::Other {
                info: InfoType(9),
                data: b"?",
            },
        ];
        for info in &infos {
            OptionReply::encode_info(OptionCode::INFO, info, &mut out);
        }
        OptionReply::encode_error(OptionCode(99), ReplyType::ERR_UNSUP, "no", &mut out);

        let mut rest = &out[..];
        let (ack, n) = OptionReply::decode(rest, 1 << 16).unwrap();
        assert_eq!(
            (ack.option, ack.reply, ack.data.len()),
            (OptionCode::GO, ReplyType::ACK, 0)
        );
        rest = &rest[n..];
        let (server, n) = OptionReply::decode(rest, 1 << 16).unwrap();
        assert_eq!(
            ServerEntry::parse(server.data).unwrap(),
            ServerEntry {
                name: "vm1",
                description: "disk"
            }
        );
        rest = &rest[n..];
        for info in &infos {
            let (reply, n) = OptionReply::decode(rest, 1 << 16).unwrap();
            assert_eq!(reply.reply, ReplyType::INFO);
            assert_eq!(&InfoReply::parse(reply.data).unwrap(), info);
            rest = &rest[n..];
        }
        let (err, n) = OptionReply::decode(rest, 1 << 16).unwrap();
        assert!(err.reply.is_error());
        assert_eq!(err.data, b"no");
        assert_eq!(n, rest.len());
    }

    #[test]
    fn info_reply_lengths_are_exact() {
        assert!(InfoReply::parse(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 9]).is_err());
        assert!(InfoReply::parse(&[0, 3, 0, 0, 0, 1]).is_err());
        assert!(InfoReply::parse(&[0]).is_err());
    }
}
