//! Scraping a Prometheus `/metrics` endpoint with a plain HTTP/1.0 GET over TCP and reading
//! the samples out of the text exposition format.
//!
//! Must never: block without a timeout on a socket, or accept a reply that is not `200`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Connect, read and write timeout for one scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest reply accepted from `/metrics`.
const SCRAPE_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, with any `_total`/`_bucket` suffix as exposed.
    pub name: String,
    /// Label names to values.
    pub labels: BTreeMap<String, String>,
    /// The sample value.
    pub value: f64,
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Samples in exposition order.
    pub samples: Vec<Sample>,
    /// The body as received, for error messages.
    pub text: String,
}

impl Metrics {
    /// The value of `name` whose labels include every `(label, value)` in `labels`; fails if
    /// there is none or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        match found.as_slice() {
            [one] => Ok(one.value),
            [] => bail!("no sample {name}{labels:?} in /metrics:\n{}", self.text),
            _ => bail!(
                "{} samples match {name}{labels:?} in /metrics:\n{}",
                found.len(),
                self.text
            ),
        }
    }

    /// The sum of every sample of `name` (any labels), or `None` if there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut matched = self.samples.iter().filter(|s| s.name == name).peekable();
        matched.peek()?;
        Some(matched.map(|s| s.value).sum())
    }
}

/// GETs `http://addr/metrics` and parses it.
pub fn scrape(addr: SocketAddr) -> Result<Metrics> {
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)
        .with_context(|| format!("connecting to metrics listener {addr}"))?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n")
                .as_bytes(),
        )
        .with_context(|| format!("sending GET /metrics to {addr}"))?;
    let mut reply = Vec::new();
    stream
        .take(SCRAPE_BYTES_MAX)
        .read_to_end(&mut reply)
        .with_context(|| format!("reading /metrics from {addr}"))?;
    let reply = String::from_utf8(reply).context("/metrics reply is not UTF-8")?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .or_else(|| reply.split_once("\n\n"))
        .with_context(|| format!("no end of headers in /metrics reply: {reply:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1);
    if code != Some("200") {
        bail!("GET /metrics from {addr}: {status_line:?}\n{body}");
    }
    parse(body)
}

/// Parses the Prometheus text format (comments and `# HELP`/`# TYPE` lines are skipped).
pub fn parse(text: &str) -> Result<Metrics> {
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples
            .push(parse_line(line).with_context(|| format!("/metrics line {}: {line:?}", n + 1))?);
    }
    Ok(Metrics {
        samples,
        text: text.to_owned(),
    })
}

fn parse_line(line: &str) -> Result<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}').context("unclosed label set")?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace).context("no value")?;
            (name, BTreeMap::new(), rest)
        }
    };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.trim().to_owned(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').context("label without '='")?;
        let after = after
            .trim_start()
            .strip_prefix('"')
            .context("label value not quoted")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("dangling escape"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = after[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_counters_labels_and_comments() {
        let m = parse(
            "# HELP cdp_disk_writes_total Writes.\n# TYPE cdp_disk_writes_total counter\n\
             cdp_disk_writes_total{disk=\"d0\"} 12\ncdp_disk_writes_total{disk=\"d,1\",x=\"a\\\"b\"} 3\n\
             cdp_journal_head_seq 15 1700000000\nh_bucket{le=\"+Inf\"} 2\n",
        )
        .unwrap();
        assert_eq!(
            m.value("cdp_disk_writes_total", &[("disk", "d0")]).unwrap(),
            12.0
        );
        assert_eq!(
            m.value("cdp_disk_writes_total", &[("x", "a\"b")]).unwrap(),
            3.0
        );
        assert_eq!(m.value("cdp_journal_head_seq", &[]).unwrap(), 15.0);
        assert_eq!(m.sum("cdp_disk_writes_total"), Some(15.0));
        assert_eq!(m.value("h_bucket", &[("le", "+Inf")]).unwrap(), 2.0);
        assert!(m.value("cdp_disk_writes_total", &[]).is_err());
        assert!(m.value("absent", &[]).is_err());
    }
}
