//! The REST API's client, used by `cdp status` and `cdp demo`: one plain HTTP/1.1 `GET` per
//! connection, bearer token, JSON body, bounded in size and time.
//!
//! Built on hyper's own client connection (`hyper::client::conn::http1`) rather than ureq
//! or reqwest: hyper is already in the tree through axum, so the client adds no TLS stack
//! and nothing that builds C (two tiny crates, `want` and `try-lock`). It is async because
//! `cdp demo` polls the API from inside its tokio runtime; `cdp status` drives it on a
//! current-thread runtime. Plain HTTP only: the API is meant for loopback or a trusted
//! management network until it gets TLS.
//!
//! Must never print or log the token, and never trust the server's words blindly: error
//! messages from the server are shortened and stripped of control characters before they
//! reach a terminal.

use std::pin::pin;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::api::{ErrorBody, JobList, JobStatus, API_PREFIX};
use crate::token::ApiToken;

/// How long one request may take, connection included.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Largest response body read; a larger one is an error, not an allocation.
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Longest server error message shown, in characters.
const SERVER_MESSAGE_CHARS_MAX: usize = 200;

/// A client of one appliance's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    /// `host:port` to connect to and to send as `Host`.
    authority: String,
    /// Path before `/api/v1` (empty, or `/prefix` behind a reverse proxy); no trailing `/`.
    path_prefix: String,
    token: ApiToken,
    request_timeout: Duration,
}

/// Why a request did not produce the answer asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API address is not a URL this client can use.
    #[error("invalid api url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No TCP connection could be made.
    #[error("cannot connect to the appliance api at {authority}: {source}")]
    Connect {
        /// `host:port`.
        authority: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed after connecting (connection reset, bad HTTP, …).
    #[error("http exchange with the appliance api at {authority} failed: {source}")]
    Http {
        /// `host:port`.
        authority: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// No full answer within the request timeout.
    #[error("the appliance api at {authority} did not answer within {seconds} s")]
    Timeout {
        /// `host:port`.
        authority: String,
        /// The timeout.
        seconds: u64,
    },
    /// The answer was larger than [`RESPONSE_BYTES_MAX`].
    #[error("the appliance api at {authority} sent more than {RESPONSE_BYTES_MAX} bytes")]
    TooLarge {
        /// `host:port`.
        authority: String,
    },
    /// The appliance refused the request (a 4xx status: bad token, no such job, …).
    #[error("the appliance refused the request ({status}): {message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The appliance's `error` message, sanitised.
        message: String,
    },
    /// The appliance failed (a 5xx status, or another status this client does not expect).
    #[error("the appliance failed to answer ({status}): {message}")]
    Server {
        /// The HTTP status.
        status: StatusCode,
        /// The appliance's `error` message, sanitised.
        message: String,
    },
    /// The answer is not the JSON this client expects (another version of cdp?).
    #[error("the appliance sent a response this cdp cannot read: {source}")]
    Decode {
        /// serde's error.
        source: serde_json::Error,
    },
}

impl ClientError {
    /// Whether the appliance answered and said no (as opposed to not answering properly).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

impl ApiClient {
    /// A client for the API at `url`: `http://HOST[:PORT][/PREFIX]`, or `HOST:PORT` alone
    /// (as in the appliance's `api.addr` file). `https` is refused: this client has no TLS.
    pub fn new(url: &str, token: ApiToken) -> Result<Self, ClientError> {
        let invalid = |reason| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let text = url.trim();
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|_| invalid("expected http://HOST:PORT"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "https is not supported yet; use http:// on loopback or a trusted network",
                ))
            }
            _ => return Err(invalid("the scheme must be http://")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("it has no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user information in the url is not supported"));
        }
        if uri.query().is_some() {
            return Err(invalid("it must not have a query"));
        }
        let authority = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.as_str()),
        };
        Ok(Self {
            authority,
            path_prefix: uri.path().trim_end_matches('/').to_owned(),
            token,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
        })
    }

    /// The same client with another request timeout.
    pub fn with_timeout(mut self, request_timeout: Duration) -> Self {
        self.request_timeout = request_timeout;
        self
    }

    /// `http://host:port[/prefix]`, for messages.
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.authority, self.path_prefix)
    }

    /// `GET /api/v1/jobs`.
    pub async fn jobs(&self) -> Result<Vec<JobStatus>, ClientError> {
        let list: JobList = self.get_json("/jobs").await?;
        Ok(list.jobs)
    }

    /// `GET /api/v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<JobStatus, ClientError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            // Not an id, and not something to paste into a path.
            return Err(ClientError::Refused {
                status: StatusCode::NOT_FOUND,
                message: "no such job".to_owned(),
            });
        }
        self.get_json(&format!("/jobs/{id}")).await
    }

    /// `GET /api/v1{path}`, decoded as `T` (`serde_json::Value` for the raw JSON).
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.get(path).await?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|source| ClientError::Decode { source });
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(error) => sanitise(&error.error),
            Err(_) => status
                .canonical_reason()
                .unwrap_or("no message")
                .to_lowercase(),
        };
        if status.is_client_error() {
            Err(ClientError::Refused { status, message })
        } else {
            Err(ClientError::Server { status, message })
        }
    }

    /// One `GET` on a fresh connection: status and the whole body.
    async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), ClientError> {
        let authority = &self.authority;
        let http = |source| ClientError::Http {
            authority: authority.clone(),
            source,
        };
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map_err(|source| ClientError::Connect {
                    authority: authority.clone(),
                    source,
                })?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(http)?;
            let request = Request::get(format!("{}{API_PREFIX}{path}", self.path_prefix))
                .header(HOST, authority.as_str())
                .header(ACCEPT, "application/json")
                .header(AUTHORIZATION, format!("Bearer {}", self.token.as_str()))
                .body(Empty::<Bytes>::new())
                .map_err(|_| ClientError::InvalidUrl {
                    url: self.base_url(),
                    reason: "it does not make a valid request path",
                })?;
            let response = async {
                let response = sender.send_request(request).await.map_err(http)?;
                let status = response.status();
                let body = Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
                    .collect()
                    .await
                    .map_err(|err| match err.downcast::<hyper::Error>() {
                        Ok(err) => http(*err),
                        Err(_) => ClientError::TooLarge {
                            authority: authority.clone(),
                        },
                    })?
                    .to_bytes();
                Ok((status, body))
            };
            // The connection future does the I/O; poll it alongside the exchange, and let
            // the exchange finish on its own if the connection ends first (the answer is
            // then already buffered).
            let mut response = pin!(response);
            let mut connection = pin!(connection);
            tokio::select! {
                biased;
                result = &mut response => result,
                driven = &mut connection => {
                    driven.map_err(http)?;
                    response.await
                }
            }
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                authority: authority.clone(),
                seconds: self.request_timeout.as_secs(),
            })?
    }
}

/// A server's message made safe for a terminal: control characters replaced, length bounded.
fn sanitise(message: &str) -> String {
    let mut clean: String = message
        .chars()
        .take(SERVER_MESSAGE_CHARS_MAX)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if message.chars().count() > SERVER_MESSAGE_CHARS_MAX {
        clean.push('…');
    }
    clean
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::{two_jobs, FakeControl, ID_DB, TOKEN};
    use crate::api::{router, serve};
    use std::sync::Arc;

    fn token() -> ApiToken {
        ApiToken::parse(TOKEN).unwrap()
    }

    #[test]
    fn urls_are_parsed_or_refused_with_a_reason() {
        let check = |url: &str, expected: Result<&str, &str>| {
            let got = ApiClient::new(url, token());
            let got = match &got {
                Ok(client) => Ok(client.base_url()),
                Err(ClientError::InvalidUrl { reason, .. }) => Err(*reason),
                Err(other) => panic!("{url}: {other}"),
            };
            assert_eq!(got.as_deref().map_err(|e| *e), expected, "{url}");
        };
        check("http://127.0.0.1:7444", Ok("http://127.0.0.1:7444"));
        check("http://127.0.0.1:7444/", Ok("http://127.0.0.1:7444"));
        check("127.0.0.1:7444\n", Ok("http://127.0.0.1:7444"));
        check("[::1]:7444", Ok("http://[::1]:7444"));
        check("http://appliance", Ok("http://appliance:80"));
        check("http://proxy:8080/cdp/", Ok("http://proxy:8080/cdp"));
        check(
            "https://appliance:7444",
            Err("https is not supported yet; use http:// on loopback or a trusted network"),
        );
        check("ftp://appliance", Err("the scheme must be http://"));
        check(
            "http://a:b@appliance",
            Err("user information in the url is not supported"),
        );
        check("http://appliance/?x=1", Err("it must not have a query"));
        check("http://bad host", Err("expected http://HOST:PORT"));
    }

    #[test]
    fn server_messages_are_sanitised() {
        assert_eq!(sanitise("no such job"), "no such job");
        assert_eq!(sanitise("a\x1b[2Jb\n"), "a?[2Jb?");
        let long = "x".repeat(500);
        assert_eq!(
            sanitise(&long).chars().count(),
            SERVER_MESSAGE_CHARS_MAX + 1
        );
    }

    /// A real server on loopback serving the fake jobs; returns its client and a stopper.
    async fn served(client_token: ApiToken) -> (ApiClient, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(token(), Arc::new(FakeControl(two_jobs())));
        tokio::spawn(serve(listener, app, async move {
            let _ = stopped.await;
        }));
        (
            ApiClient::new(&addr.to_string(), client_token).unwrap(),
            stop,
        )
    }

    #[tokio::test]
    async fn fetches_jobs_over_http() {
        let (client, _stop) = served(token()).await;
        assert_eq!(client.jobs().await.unwrap(), two_jobs());
        assert_eq!(client.job(ID_DB).await.unwrap(), two_jobs()[1]);
        let raw: serde_json::Value = client.get_json("/jobs").await.unwrap();
        assert_eq!(raw["jobs"][0]["name"], "demo");
    }

    #[tokio::test]
    async fn refusals_carry_the_status_and_the_servers_message() {
        let (client, _stop) = served(token()).await;
        let err = client
            .job("ffffffffffffffffffffffffffffffff")
            .await
            .unwrap_err();
        assert!(err.is_refusal());
        assert_eq!(
            err.to_string(),
            "the appliance refused the request (404 Not Found): no such job"
        );
        let err = client.job("../metrics").await.unwrap_err();
        assert!(
            matches!(err, ClientError::Refused { status, .. } if status == StatusCode::NOT_FOUND)
        );

        let (client, _stop) = served(ApiToken::from_bytes(&[7; 32])).await;
        let err = client.jobs().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the appliance refused the request (401 Unauthorized): invalid token"
        );
    }

    #[tokio::test]
    async fn connection_failures_are_errors_not_refusals() {
        // Bind then drop a listener: its port is (almost certainly) closed now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = ApiClient::new(&addr.to_string(), token()).unwrap();
        let err = client.jobs().await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(!err.is_refusal());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_out() {
        // Accepts connections (the kernel does, via the backlog) but never answers; the
        // paused clock jumps to the deadline as soon as the runtime has nothing to do.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = ApiClient::new(&addr.to_string(), token()).unwrap();
        let err = client.jobs().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the appliance api at {addr} did not answer within 10 s")
        );
        drop(listener);
    }

    #[tokio::test]
    async fn non_json_errors_use_the_status_reason() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 4\r\n\r\noops")
                .await
                .unwrap();
        });
        let client = ApiClient::new(&addr.to_string(), token()).unwrap();
        let err = client.jobs().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the appliance failed to answer (502 Bad Gateway): bad gateway"
        );
    }
}
