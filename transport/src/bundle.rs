//! The pairing bundle: what the appliance hands the operator to carry to the agent — where
//! the appliance is, which certificate it must present, a one-time 256-bit token and when
//! that token expires. A short text file, checked end to end so a damaged copy is refused
//! with a clear error rather than half-read. Format: `docs/pairing.md`.
//!
//! The bundle is a secret until it is used or expires: whoever holds it can pair once.
//! Never log it; [`PairingToken`]'s `Debug` is redacted for that reason.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use rustls_pki_types::UnixTime;

use crate::clock::Clock;
use crate::fingerprint::{hex_decode_32, hex_decode_into, hex_encode, Fingerprint};
use crate::identity::{provider, Identity};
use crate::pending::{AddTokenError, PendingTokens};
use crate::trust::PeerName;

/// Bytes in a pairing token.
pub const TOKEN_BYTES: usize = 32;
/// Most appliance addresses a bundle carries.
pub const BUNDLE_ADDRS_MAX: usize = 8;
/// Largest bundle accepted by [`PairingBundle::decode`].
pub const BUNDLE_BYTES_MAX: usize = 4096;
/// How long a bundle stays valid when the operator does not say.
pub const PAIRING_TTL_DEFAULT: Duration = Duration::from_secs(15 * 60);
/// Longest validity a bundle may be given.
pub const PAIRING_TTL_MAX: Duration = Duration::from_secs(24 * 60 * 60);

const HEADER_PREFIX: &str = "cdp-pairing-bundle ";
const VERSION: &str = "v1";
/// Hex digits of the blake3 check over the rest of the bundle.
const CHECK_HEX_DIGITS: usize = 16;

/// A random one-time secret proving the agent was given the bundle.
#[derive(Clone)]
pub struct PairingToken([u8; TOKEN_BYTES]);

impl PairingToken {
    /// A fresh token from the *ring* provider's system random source.
    pub fn random() -> Result<Self, rustls::crypto::GetRandomFailed> {
        let mut bytes = [0u8; TOKEN_BYTES];
        provider().secure_random.fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    pub(crate) fn from_bytes(bytes: [u8; TOKEN_BYTES]) -> Self {
        Self(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; TOKEN_BYTES] {
        &self.0
    }

    /// What the appliance stores and compares (in constant time) instead of the token.
    pub(crate) fn hash(&self) -> blake3::Hash {
        blake3::hash(&self.0)
    }
}

impl fmt::Debug for PairingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairingToken(<redacted>)")
    }
}

/// Everything an agent needs to pair with an appliance once.
#[derive(Debug, Clone)]
pub struct PairingBundle {
    /// The name the agent pins the appliance under.
    pub appliance: PeerName,
    /// Where the appliance listens, tried in order; 1 to [`BUNDLE_ADDRS_MAX`].
    pub addrs: Vec<SocketAddr>,
    /// The fingerprint the appliance's certificate must have.
    pub fingerprint: Fingerprint,
    /// The one-time secret.
    pub token: PairingToken,
    /// The token is refused at and after this time (whole seconds).
    pub expires_at: UnixTime,
}

/// Why a bundle could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateBundleError {
    /// No appliance address was given.
    #[error("a pairing bundle needs at least one appliance address")]
    NoAddrs,
    /// More than [`BUNDLE_ADDRS_MAX`] addresses were given.
    #[error("a pairing bundle carries at most {BUNDLE_ADDRS_MAX} addresses")]
    TooManyAddrs,
    /// The validity is zero or longer than [`PAIRING_TTL_MAX`].
    #[error("a pairing bundle must be valid for 1 s to {} s, not {} s", PAIRING_TTL_MAX.as_secs(), .0.as_secs())]
    Ttl(Duration),
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
    /// The token could not be recorded as outstanding.
    #[error(transparent)]
    Pending(#[from] AddTokenError),
}

/// Why text is not a valid bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeBundleError {
    /// Longer than [`BUNDLE_BYTES_MAX`].
    #[error("pairing bundle is {0} bytes; a bundle is at most {BUNDLE_BYTES_MAX}")]
    TooLarge(usize),
    /// Not UTF-8 text.
    #[error("not a cdp pairing bundle: it is not text")]
    NotText,
    /// The first line is not a bundle header.
    #[error("not a cdp pairing bundle: it must start with `{HEADER_PREFIX}{VERSION}`")]
    NotABundle,
    /// A bundle of another version.
    #[error("pairing bundle version `{0}` is not supported; this cdp reads {VERSION}")]
    UnsupportedVersion(String),
    /// The last line is not the check line: the bundle was cut short.
    #[error("pairing bundle is truncated: its last line must be `check <{CHECK_HEX_DIGITS} hex digits>`")]
    Truncated,
    /// The check does not match the contents: the copy was altered or damaged.
    #[error("pairing bundle is damaged: its check does not match its contents; copy it again")]
    Damaged,
    /// A line is not what the format expects there.
    #[error("pairing bundle line {line}: {reason}")]
    Line {
        /// One-based line number (blank lines count).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl PairingBundle {
    /// Creates a bundle for `identity` (the appliance's) reachable at `addrs`, valid for
    /// `ttl` from `clock`'s now, and records its token in `pending` so the running appliance
    /// accepts it. This is `cdp-receiver pair`.
    pub fn create(
        identity: &Identity,
        appliance: PeerName,
        addrs: Vec<SocketAddr>,
        ttl: Duration,
        pending: &PendingTokens,
        clock: &dyn Clock,
    ) -> Result<Self, CreateBundleError> {
        if addrs.is_empty() {
            return Err(CreateBundleError::NoAddrs);
        }
        if addrs.len() > BUNDLE_ADDRS_MAX {
            return Err(CreateBundleError::TooManyAddrs);
        }
        if ttl.as_secs() == 0 || ttl > PAIRING_TTL_MAX {
            return Err(CreateBundleError::Ttl(ttl));
        }
        let now = clock.now();
        let expires_at = UnixTime::since_unix_epoch(Duration::from_secs(
            now.as_secs().saturating_add(ttl.as_secs()),
        ));
        let token = PairingToken::random().map_err(|_| CreateBundleError::Random)?;
        pending.add(&token, expires_at, now)?;
        Ok(Self {
            appliance,
            addrs,
            fingerprint: identity.fingerprint(),
            token,
            expires_at,
        })
    }

    /// Whether the bundle's token has expired at `now`.
    pub fn is_expired(&self, now: UnixTime) -> bool {
        now >= self.expires_at
    }

    /// The bundle as text, ending in a newline.
    pub fn encode(&self) -> String {
        let body = self.encode_body();
        let check = check_of(&body);
        format!("{body}check {check}\n")
    }

    fn encode_body(&self) -> String {
        let mut body = format!("{HEADER_PREFIX}{VERSION}\nappliance {}\n", self.appliance);
        for addr in &self.addrs {
            body.push_str(&format!("addr {addr}\n"));
        }
        body.push_str(&format!(
            "fingerprint {}\ntoken {}\nexpires {}\n",
            self.fingerprint,
            hex_encode(self.token.as_bytes()),
            self.expires_at.as_secs()
        ));
        body
    }

    /// Reads a bundle. Surrounding whitespace, blank lines and CRLF line ends (a copy through
    /// an editor or a mail) are tolerated; anything else that differs is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeBundleError> {
        if bytes.len() > BUNDLE_BYTES_MAX {
            return Err(DecodeBundleError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeBundleError::NotText)?;
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(index, line)| (index + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty())
            .collect();
        let mut cursor = Cursor {
            lines: &lines,
            next: 0,
        };

        let (_, header) = cursor.peek().ok_or(DecodeBundleError::NotABundle)?;
        let version = header
            .strip_prefix(HEADER_PREFIX)
            .ok_or(DecodeBundleError::NotABundle)?;
        if version != VERSION {
            return Err(DecodeBundleError::UnsupportedVersion(version.to_owned()));
        }
        cursor.next += 1;

        // The check covers everything, so verify it before reading fields: a damaged copy
        // gets one clear message instead of a confusing field error.
        let (_, last) = lines.last().ok_or(DecodeBundleError::Truncated)?;
        let check = last
            .strip_prefix("check ")
            .filter(|check| check.len() == CHECK_HEX_DIGITS)
            .ok_or(DecodeBundleError::Truncated)?;
        let mut canonical = String::new();
        for (_, line) in &lines[..lines.len() - 1] {
            canonical.push_str(line);
            canonical.push('\n');
        }
        let mut expected = [0u8; CHECK_HEX_DIGITS / 2];
        let mut actual = [0u8; CHECK_HEX_DIGITS / 2];
        hex_decode_into(check, &mut expected).map_err(|_| DecodeBundleError::Truncated)?;
        hex_decode_into(&check_of(&canonical), &mut actual)
            .map_err(|_| DecodeBundleError::Damaged)?;
        if expected != actual {
            return Err(DecodeBundleError::Damaged);
        }

        let appliance = cursor.field("appliance", |value| {
            PeerName::new(value).map_err(|err| err.to_string())
        })?;
        let mut addrs = Vec::new();
        while cursor
            .peek()
            .is_some_and(|(_, line)| line.starts_with("addr "))
        {
            if addrs.len() == BUNDLE_ADDRS_MAX {
                return Err(cursor.error(format!("more than {BUNDLE_ADDRS_MAX} addresses")));
            }
            addrs.push(cursor.field("addr", |value| {
                value
                    .parse::<SocketAddr>()
                    .map_err(|_| format!("`{value}` is not a socket address"))
            })?);
        }
        if addrs.is_empty() {
            return Err(cursor.error("expected at least one `addr` line".to_owned()));
        }
        let fingerprint = cursor.field("fingerprint", |value| {
            value.parse::<Fingerprint>().map_err(|err| err.to_string())
        })?;
        let token = cursor.field("token", |value| {
            hex_decode_32(value)
                .map(PairingToken::from_bytes)
                .map_err(|err| format!("not a token: {err}"))
        })?;
        let expires_at = cursor.field("expires", |value| {
            value
                .parse::<u64>()
                .map(|unix_s| UnixTime::since_unix_epoch(Duration::from_secs(unix_s)))
                .map_err(|_| format!("`{value}` is not a time in unix seconds"))
        })?;
        // Only the check line, verified above, may follow.
        if cursor.next != lines.len() - 1 {
            return Err(cursor.error("unexpected line before `check`".to_owned()));
        }
        Ok(Self {
            appliance,
            addrs,
            fingerprint,
            token,
            expires_at,
        })
    }
}

/// First [`CHECK_HEX_DIGITS`] hex digits of the blake3 hash of `body`.
fn check_of(body: &str) -> String {
    let mut check = hex_encode(blake3::hash(body.as_bytes()).as_bytes());
    check.truncate(CHECK_HEX_DIGITS);
    check
}

/// Walks the non-blank lines of a bundle, remembering their original numbers for errors.
struct Cursor<'a> {
    lines: &'a [(usize, &'a str)],
    next: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<(usize, &str)> {
        self.lines.get(self.next).copied()
    }

    fn error(&self, reason: String) -> DecodeBundleError {
        let line = self.peek().map_or_else(
            || self.lines.last().map_or(1, |(line, _)| *line),
            |(line, _)| line,
        );
        DecodeBundleError::Line { line, reason }
    }

    /// Reads the line `<key> <value>` and parses the value.
    fn field<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, DecodeBundleError> {
        let Some((line, content)) = self.peek() else {
            return Err(self.error(format!("expected `{key}`")));
        };
        let value = content
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(' '))
            .ok_or_else(|| {
                let found = content.split(' ').next().unwrap_or(content);
                self.error(format!("expected `{key}`, found `{found}`"))
            })?;
        let parsed = parse(value.trim()).map_err(|reason| DecodeBundleError::Line {
            line,
            reason: format!("{key}: {reason}"),
        })?;
        self.next += 1;
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn sample() -> PairingBundle {
        PairingBundle {
            appliance: PeerName::new("dr-1").unwrap(),
            addrs: vec![
                "192.0.2.10:7443".parse().unwrap(),
                "[2001:db8::10]:7443".parse().unwrap(),
            ],
            fingerprint: Fingerprint::of_certificate(b"appliance"),
            token: PairingToken::from_bytes([7; TOKEN_BYTES]),
            expires_at: UnixTime::since_unix_epoch(Duration::from_secs(1_767_225_600)),
        }
    }

    /// Re-signs an edited body, so a test reaches the field checks behind the check line.
    fn with_check(body: &str) -> String {
        let canonical: String = body
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(|line| format!("{line}\n"))
            .collect();
        format!("{body}check {}\n", check_of(&canonical))
    }

    fn check(input: &[u8], expected: Result<(), &str>) {
        let got = PairingBundle::decode(input)
            .map(|_| ())
            .map_err(|err| err.to_string());
        assert_eq!(
            got,
            expected.map_err(str::to_owned),
            "{}",
            String::from_utf8_lossy(input)
        );
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let bundle = sample();
        let text = bundle.encode();
        assert_eq!(
            text.lines().collect::<Vec<_>>()[..3],
            [
                "cdp-pairing-bundle v1",
                "appliance dr-1",
                "addr 192.0.2.10:7443"
            ]
        );
        let decoded = PairingBundle::decode(text.as_bytes()).unwrap();
        assert_eq!(decoded.encode(), text);
        assert_eq!(decoded.addrs, bundle.addrs);
        assert_eq!(decoded.fingerprint, bundle.fingerprint);
        assert_eq!(decoded.token.as_bytes(), bundle.token.as_bytes());
        assert_eq!(decoded.expires_at, bundle.expires_at);
        // A copy through an editor or a mail client still decodes.
        let mangled = format!("\n  {}  \n\n", text.replace('\n', "\r\n"));
        assert_eq!(
            PairingBundle::decode(mangled.as_bytes()).unwrap().encode(),
            text
        );
    }

    #[test]
    fn garbage_and_damaged_bundles_give_clear_errors() {
        let good = sample().encode();
        let body = good.rsplit_once("check ").unwrap().0.to_owned();
        check(good.as_bytes(), Ok(()));
        check(
            b"",
            Err("not a cdp pairing bundle: it must start with `cdp-pairing-bundle v1`"),
        );
        check(
            b"\xff\xfe\x00garbage",
            Err("not a cdp pairing bundle: it is not text"),
        );
        check(
            b"hello world\n",
            Err("not a cdp pairing bundle: it must start with `cdp-pairing-bundle v1`"),
        );
        check(
            b"cdp-pairing-bundle v2\nfoo\n",
            Err("pairing bundle version `v2` is not supported; this cdp reads v1"),
        );
        check(
            &vec![b'a'; 5000],
            Err("pairing bundle is 5000 bytes; a bundle is at most 4096"),
        );
        let truncated = &good[..good.len() / 2];
        check(
            truncated.as_bytes(),
            Err("pairing bundle is truncated: its last line must be `check <16 hex digits>`"),
        );
        // One changed digit anywhere is caught by the check.
        let damaged = good.replacen("token 07", "token 08", 1);
        check(
            damaged.as_bytes(),
            Err("pairing bundle is damaged: its check does not match its contents; copy it again"),
        );
        let damaged_check = format!("{body}check 0000000000000000\n");
        check(
            damaged_check.as_bytes(),
            Err("pairing bundle is damaged: its check does not match its contents; copy it again"),
        );
        // Well-checked but malformed content (an encoder bug, or a hand-made bundle).
        let fields = [
            (
                body.replace("appliance dr-1", "appliance -x"),
                "pairing bundle line 2: appliance: peer name may hold only ascii letters, digits, '.', '_' and '-', and must start with a letter or digit",
            ),
            (
                body.replace("addr 192.0.2.10:7443\n", "addr nowhere\n"),
                "pairing bundle line 3: addr: `nowhere` is not a socket address",
            ),
            (
                body.replace("addr 192.0.2.10:7443\naddr [2001:db8::10]:7443\n", ""),
                "pairing bundle line 3: expected at least one `addr` line",
            ),
            (
                body.replace("fingerprint ", "fingerprnt "),
                "pairing bundle line 5: expected `fingerprint`, found `fingerprnt`",
            ),
            (
                body.replace("token 0707", "token zz07"),
                "pairing bundle line 6: token: not a token: character 0 is not a hex digit",
            ),
            (
                body.replace("expires 1767225600", "expires soon"),
                "pairing bundle line 7: expires: `soon` is not a time in unix seconds",
            ),
            (
                format!("{body}extra line\n"),
                "pairing bundle line 8: unexpected line before `check`",
            ),
            (
                body.replace("expires 1767225600\n", ""),
                "pairing bundle line 7: expected `expires`, found `check`",
            ),
        ];
        for (edited, message) in fields {
            check(with_check(&edited).as_bytes(), Err(message));
        }
    }

    #[test]
    fn create_records_a_pending_token_and_bounds_its_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let pending = PendingTokens::new(dir.path());
        let identity = Identity::generate().unwrap();
        let clock = ManualClock::new(UnixTime::since_unix_epoch(Duration::from_secs(1000)));
        let name = PeerName::new("dr-1").unwrap();
        let addrs = vec!["127.0.0.1:7443".parse().unwrap()];
        let bundle = PairingBundle::create(
            &identity,
            name.clone(),
            addrs.clone(),
            PAIRING_TTL_DEFAULT,
            &pending,
            &clock,
        )
        .unwrap();
        assert_eq!(bundle.fingerprint, identity.fingerprint());
        assert_eq!(bundle.expires_at.as_secs(), 1000 + 15 * 60);
        assert!(pending.outstanding(clock.now()));
        assert!(!bundle.is_expired(clock.now()));
        clock.advance(PAIRING_TTL_DEFAULT);
        assert!(bundle.is_expired(clock.now()));
        assert!(!pending.outstanding(clock.now()));

        let create = |addrs: Vec<SocketAddr>, ttl| {
            PairingBundle::create(&identity, name.clone(), addrs, ttl, &pending, &clock)
                .map(|_| ())
                .map_err(|err| err.to_string())
        };
        assert_eq!(
            create(Vec::new(), PAIRING_TTL_DEFAULT),
            Err("a pairing bundle needs at least one appliance address".to_owned())
        );
        assert_eq!(
            create(vec![addrs[0]; 9], PAIRING_TTL_DEFAULT),
            Err("a pairing bundle carries at most 8 addresses".to_owned())
        );
        assert_eq!(
            create(addrs.clone(), Duration::from_secs(25 * 3600)),
            Err("a pairing bundle must be valid for 1 s to 86400 s, not 90000 s".to_owned())
        );
    }
}
