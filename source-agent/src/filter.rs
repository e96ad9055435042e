//! Filter names and the rules a disk's filter chain must follow. Checked once at start-up so
//! a bad chain is a clear configuration error, never a surprise on the I/O path.
//!
//! Rules (documented in `docs/agent.md`):
//! 1. every name is a known filter (`stats`, `journal`); `encrypt` and `replicate` are
//!    reserved names of filters not built yet;
//! 2. no filter appears twice;
//! 3. the chain ends with `journal`: the journal must record exactly the bytes the backing
//!    disk receives (after any transforming filter such as a future `encrypt`), and a disk
//!    that is not journaled is not protected, so the agent refuses to serve it.

use thiserror::Error;

/// A filter that can sit in a disk's chain, ordered from the NBD server towards the backing
/// disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterKind {
    /// I/O analytics: operation counts, bytes, latency and request-size histograms.
    Stats,
    /// Appends every write, trim and write-zeroes to the job's journal before the backing
    /// disk sees it; makes FUA and FLUSH durable in the journal.
    Journal,
}

impl FilterKind {
    /// The name used in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stats => "stats",
            Self::Journal => "journal",
        }
    }
}

/// Why a filter chain is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    /// A name that is no filter.
    #[error("unknown filter `{0}` (known: stats, journal)")]
    Unknown(String),
    /// A reserved name of a filter that is not built yet.
    #[error("filter `{0}` is not available in this version")]
    NotBuilt(String),
    /// A filter listed twice.
    #[error("filter `{0}` appears twice")]
    Duplicate(String),
    /// No `journal` filter.
    #[error(
        "the chain must end with `journal`: a disk whose writes are not journaled is not protected"
    )]
    NoJournal,
    /// `journal` is not the last filter.
    #[error(
        "`journal` must be the last filter (next to the backing disk), found `{after}` after it"
    )]
    JournalNotLast {
        /// The first filter found after `journal`.
        after: String,
    },
}

/// Parses and validates a chain given by name.
pub fn parse_chain(names: &[String]) -> Result<Vec<FilterKind>, ChainError> {
    let mut chain = Vec::with_capacity(names.len());
    for name in names {
        let kind = match name.as_str() {
            "stats" => FilterKind::Stats,
            "journal" => FilterKind::Journal,
            "encrypt" | "replicate" => return Err(ChainError::NotBuilt(name.clone())),
            _ => return Err(ChainError::Unknown(name.clone())),
        };
        if chain.contains(&kind) {
            return Err(ChainError::Duplicate(name.clone()));
        }
        chain.push(kind);
    }
    match chain.iter().position(|&k| k == FilterKind::Journal) {
        None => Err(ChainError::NoJournal),
        Some(i) if i + 1 < chain.len() => Err(ChainError::JournalNotLast {
            after: chain[i + 1].name().to_owned(),
        }),
        Some(_) => Ok(chain),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses the comma-separated chain `input` and compares the outcome with `expected`.
    fn check(input: &str, expected: Result<&[FilterKind], &str>) {
        let names: Vec<String> = input
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let got = parse_chain(&names).map_err(|e| e.to_string());
        assert_eq!(
            got,
            expected.map(<[FilterKind]>::to_vec).map_err(str::to_owned),
            "chain {input:?}"
        );
    }

    #[test]
    fn chains() {
        use FilterKind::{Journal, Stats};
        check("stats,journal", Ok(&[Stats, Journal]));
        check("journal", Ok(&[Journal]));
        check("", Err("the chain must end with `journal`: a disk whose writes are not journaled is not protected"));
        check("stats", Err("the chain must end with `journal`: a disk whose writes are not journaled is not protected"));
        check(
            "journal,stats",
            Err("`journal` must be the last filter (next to the backing disk), found `stats` after it"),
        );
        check("stats,stats,journal", Err("filter `stats` appears twice"));
        check("journal,journal", Err("filter `journal` appears twice"));
        check(
            "stats,compress,journal",
            Err("unknown filter `compress` (known: stats, journal)"),
        );
        check(
            "Stats,journal",
            Err("unknown filter `Stats` (known: stats, journal)"),
        );
        check(
            "encrypt,journal",
            Err("filter `encrypt` is not available in this version"),
        );
        check(
            "stats,journal,replicate",
            Err("filter `replicate` is not available in this version"),
        );
    }
}
