//! A minimal NBD client written from the protocol specification (NetworkBlockDevice/nbd
//! `doc/proto.md`): fixed-newstyle handshake with `NBD_OPT_GO`, simple replies, one request at
//! a time. It exists for what the real clients cannot do on demand: a FUA write with no flush
//! after it, a connection held open across a kill -9, out-of-range or unknown requests.
//!
//! Must never: block without a timeout, or trust a length from the server without a bound.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

/// Socket read and write timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest option reply data accepted during the handshake.
const OPTION_REPLY_BYTES_MAX: u32 = 64 * 1024;

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;

/// Transmission flags (`NBD_FLAG_*`) an export advertises.
pub mod flags {
    /// `NBD_FLAG_READ_ONLY`
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_SEND_TRIM`
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_CAN_MULTI_CONN`
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Request types (`NBD_CMD_*`).
pub mod cmd {
    /// `NBD_CMD_READ`
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_WRITE_ZEROES`
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_FLAG_FUA`
    pub const FLAG_FUA: u16 = 1;
}

/// NBD error numbers a server may reply with.
pub mod errno {
    /// `NBD_EIO`
    pub const EIO: u32 = 5;
    /// `NBD_EINVAL`
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`
    pub const ENOTSUP: u32 = 95;
}

/// One negotiated connection in the transmission phase.
#[derive(Debug)]
pub struct NbdConn {
    stream: UnixStream,
    /// Export size in bytes, from `NBD_INFO_EXPORT`.
    pub size_bytes: u64,
    /// Transmission flags, from `NBD_INFO_EXPORT`.
    pub flags: u16,
    next_cookie: u64,
}

impl NbdConn {
    /// Connects to the Unix socket `socket` and negotiates export `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> Result<NbdConn> {
        let mut stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut greeting = [0u8; 18];
        stream
            .read_exact(&mut greeting)
            .context("reading the greeting")?;
        ensure!(
            &greeting[..8] == NBDMAGIC && &greeting[8..16] == IHAVEOPT,
            "not a newstyle greeting: {greeting:02x?}"
        );
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        ensure!(
            server_flags & FLAG_FIXED_NEWSTYLE != 0,
            "server is not fixed-newstyle"
        );
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len()).context("export name too long")?;
        let mut msg = Vec::new();
        msg.extend_from_slice(&client_flags.to_be_bytes());
        msg.extend_from_slice(IHAVEOPT);
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(4 + name_len + 2).to_be_bytes());
        msg.extend_from_slice(&name_len.to_be_bytes());
        msg.extend_from_slice(name);
        msg.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&msg)?;
        let mut export_info = None;
        loop {
            let (option, kind, data) = read_option_reply(&mut stream)?;
            ensure!(
                option == OPT_GO,
                "reply to option {option}, expected NBD_OPT_GO"
            );
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                        let mut size = [0u8; 8];
                        size.copy_from_slice(&data[2..10]);
                        export_info = Some((
                            u64::from_be_bytes(size),
                            u16::from_be_bytes([data[10], data[11]]),
                        ));
                    }
                }
                k if k & 0x8000_0000 != 0 => {
                    bail!("NBD_OPT_GO {export:?} refused: reply type {k:#x}")
                }
                k => bail!("unexpected reply type {k:#x} to NBD_OPT_GO"),
            }
        }
        let (size_bytes, flags) =
            export_info.context("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")?;
        Ok(NbdConn {
            stream,
            size_bytes,
            flags,
            next_cookie: 1,
        })
    }

    /// Sends one request and reads its simple reply; returns the reply's error number (0 for
    /// success) and, for a successful read, the data.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<(u32, Vec<u8>)> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg).context("sending a request")?;
        if kind == cmd::DISC {
            return Ok((0, Vec::new()));
        }
        let mut reply = [0u8; 16];
        self.stream
            .read_exact(&mut reply)
            .context("reading a reply")?;
        let magic = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
        ensure!(
            magic == SIMPLE_REPLY_MAGIC,
            "reply magic {magic:#x}: not a simple reply"
        );
        let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        let mut got = [0u8; 8];
        got.copy_from_slice(&reply[8..16]);
        ensure!(
            u64::from_be_bytes(got) == cookie,
            "reply for cookie {}, sent {cookie}",
            u64::from_be_bytes(got)
        );
        let mut data = Vec::new();
        if kind == cmd::READ && error == 0 {
            data = vec![0u8; len as usize];
            self.stream
                .read_exact(&mut data)
                .context("reading read data")?;
        }
        Ok((error, data))
    }

    /// Writes `data` at `offset` (with FUA when `fua`); fails unless the server succeeds.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = u32::try_from(data.len()).context("write too large")?;
        let flags = if fua { cmd::FLAG_FUA } else { 0 };
        expect_ok(
            "write",
            self.request(cmd::WRITE, flags, offset, len, data)?.0,
        )
    }

    /// Reads `len` bytes at `offset`; fails unless the server succeeds.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        let (error, data) = self.request(cmd::READ, 0, offset, len, &[])?;
        expect_ok("read", error)?;
        Ok(data)
    }

    /// Flushes; fails unless the server succeeds.
    pub fn flush(&mut self) -> Result<()> {
        expect_ok("flush", self.request(cmd::FLUSH, 0, 0, 0, &[])?.0)
    }

    /// Sends `NBD_CMD_DISC` and waits (bounded) for the server to close the connection.
    pub fn disconnect(mut self) -> Result<()> {
        self.request(cmd::DISC, 0, 0, 0, &[])?;
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => bail!("{n} unexpected bytes after NBD_CMD_DISC"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e).context("waiting for the server to close after NBD_CMD_DISC"),
        }
    }
}

fn expect_ok(what: &str, error: u32) -> Result<()> {
    ensure!(error == 0, "{what} failed with NBD error {error}");
    Ok(())
}

/// Reads one option reply: (option, reply type, data), data bounded.
pub fn read_option_reply(stream: &mut UnixStream) -> Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    stream
        .read_exact(&mut h)
        .context("reading an option reply")?;
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&h[..8]);
    ensure!(
        u64::from_be_bytes(magic) == OPTION_REPLY_MAGIC,
        "bad option reply magic: {h:02x?}"
    );
    let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    ensure!(len <= OPTION_REPLY_BYTES_MAX, "option reply of {len} bytes");
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok((option, kind, data))
}
