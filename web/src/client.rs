//! The REST API's client, used by the `cdp` commands and `cdp demo`: one plain HTTP/1.1
//! request per connection (`GET`, `POST` with a JSON body, `DELETE`), bearer token, JSON
//! answer, bounded in size and time.
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

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{
    CheckpointList, CheckpointStatus, CreateCheckpoint, CreateView, ErrorBody, JobList, JobStatus,
    LinkChange, ViewList, ViewStatus, API_PREFIX, CHECKPOINT_WAIT_MAX,
};
use crate::token::ApiToken;

/// How long one request may take, connection included.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// How long a checkpoint request may take: longer than the appliance waits for the agent
/// ([`CHECKPOINT_WAIT_MAX`] at most), so that the appliance's answer arrives rather than
/// a timeout here.
pub const CHECKPOINT_TIMEOUT_DEFAULT: Duration =
    Duration::from_secs(CHECKPOINT_WAIT_MAX.as_secs() + 15);
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
    /// For `POST /jobs/{job}/checkpoints`, which waits for the agent.
    checkpoint_timeout: Duration,
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
    /// A request body could not be made into JSON.
    #[error("encoding the request: {source}")]
    Encode {
        /// serde's error.
        source: serde_json::Error,
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
            checkpoint_timeout: CHECKPOINT_TIMEOUT_DEFAULT,
        })
    }

    /// The same client with another request timeout (every request but a checkpoint's).
    pub fn with_timeout(mut self, request_timeout: Duration) -> Self {
        self.request_timeout = request_timeout;
        self
    }

    /// The same client with another timeout for creating a checkpoint.
    pub fn with_checkpoint_timeout(mut self, checkpoint_timeout: Duration) -> Self {
        self.checkpoint_timeout = checkpoint_timeout;
        self
    }

    /// How long a request may take (every request but a checkpoint's).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// How long a request for a checkpoint may take.
    pub fn checkpoint_timeout(&self) -> Duration {
        self.checkpoint_timeout
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

    /// `GET /api/v1/jobs/{job}/checkpoints`: `job` is a name, an id or an id prefix.
    pub async fn checkpoints(&self, job: &str) -> Result<Vec<CheckpointStatus>, ClientError> {
        let list: CheckpointList = self.get_json(&checkpoints_path(job)?).await?;
        Ok(list.checkpoints)
    }

    /// `POST /api/v1/jobs/{job}/checkpoints`; waits up to the checkpoint timeout.
    pub async fn create_checkpoint(
        &self,
        job: &str,
        request: &CreateCheckpoint,
    ) -> Result<CheckpointStatus, ClientError> {
        self.post_json(&checkpoints_path(job)?, request, self.checkpoint_timeout)
            .await
    }

    /// `POST /api/v1/jobs/{job}/link`: pauses, resumes or throttles `job` (a name, an id or
    /// an id prefix); answers the job after the change.
    pub async fn set_link(&self, job: &str, change: &LinkChange) -> Result<JobStatus, ClientError> {
        self.post_json(&link_path(job)?, change, self.request_timeout)
            .await
    }

    /// `GET /api/v1/views`.
    pub async fn views(&self) -> Result<Vec<ViewStatus>, ClientError> {
        let list: ViewList = self.get_json("/views").await?;
        Ok(list.views)
    }

    /// `POST /api/v1/views`.
    pub async fn create_view(&self, request: &CreateView) -> Result<ViewStatus, ClientError> {
        self.post_json("/views", request, self.request_timeout)
            .await
    }

    /// `DELETE /api/v1/views/{id}`.
    pub async fn delete_view(&self, id: u64) -> Result<(), ClientError> {
        let (status, body) = self
            .send(
                Method::DELETE,
                &format!("/views/{id}"),
                None,
                self.request_timeout,
            )
            .await?;
        // Whatever a success carries (a 204 carries nothing) is not needed.
        answer::<serde::de::IgnoredAny>(status, &body).map(|_| ())
    }

    /// `GET /api/v1{path}`, decoded as `T` (`serde_json::Value` for the raw JSON).
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self
            .send(Method::GET, path, None, self.request_timeout)
            .await?;
        answer(status, &body)
    }

    /// `POST /api/v1{path}` with `body` as JSON, the answer decoded as `T`
    /// (`serde_json::Value` for the raw JSON), within `timeout`.
    pub async fn post_json<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        // Cannot fail for the API's request types (plain structs, string keys); any other
        // `B` gets an error rather than a panic.
        let body = serde_json::to_vec(body).map_err(|source| ClientError::Encode { source })?;
        let (status, answered) = self.send(Method::POST, path, Some(body), timeout).await?;
        answer(status, &answered)
    }

    /// One request on a fresh connection, with `body` as JSON if given: status and the
    /// whole answer, within `timeout`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
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
            let mut request = Request::builder()
                .method(method)
                .uri(format!("{}{API_PREFIX}{path}", self.path_prefix))
                .header(HOST, authority.as_str())
                .header(ACCEPT, "application/json")
                .header(AUTHORIZATION, format!("Bearer {}", self.token.as_str()));
            if body.is_some() {
                request = request.header(CONTENT_TYPE, "application/json");
            }
            let request = request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
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
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                authority: authority.clone(),
                seconds: timeout.as_secs(),
            })?
    }
}

/// An answer's body decoded as `T` if its status is a success, else the error it carries:
/// [`ClientError::Refused`] for a 4xx, [`ClientError::Server`] for anything else. An empty
/// success body (204) decodes as JSON `null`.
fn answer<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, ClientError> {
    if status.is_success() {
        let body = if body.is_empty() { &b"null"[..] } else { body };
        return serde_json::from_slice(body).map_err(|source| ClientError::Decode { source });
    }
    let message = match serde_json::from_slice::<ErrorBody>(body) {
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

/// `/jobs/{job}/checkpoints` (under `/api/v1`) with `job` percent-encoded, for
/// [`ApiClient::get_json`] and [`ApiClient::post_json`]. An empty `job` names no job: it is
/// refused here, as the appliance would.
pub fn checkpoints_path(job: &str) -> Result<String, ClientError> {
    job_path(job, "checkpoints")
}

/// `/jobs/{job}/link` (under `/api/v1`), as [`checkpoints_path`].
pub fn link_path(job: &str) -> Result<String, ClientError> {
    job_path(job, "link")
}

/// `/jobs/{job}/{what}` with `job` percent-encoded; an empty `job` is refused.
fn job_path(job: &str, what: &str) -> Result<String, ClientError> {
    if job.is_empty() {
        return Err(ClientError::Refused {
            status: StatusCode::NOT_FOUND,
            message: "no such job".to_owned(),
        });
    }
    Ok(format!("/jobs/{}/{what}", path_segment(job)))
}

/// `text` as one path segment: every byte but RFC 3986's unreserved characters
/// percent-encoded, and `.` too when the segment is all dots (`..` must not climb).
fn path_segment(text: &str) -> String {
    let all_dots = text.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let unreserved = byte.is_ascii_alphanumeric() || b"-_~".contains(&byte);
        if unreserved || (byte == b'.' && !all_dots) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
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
    use crate::api::tests::{
        demo_checkpoints, nightly_view, two_jobs, FakeControl, ID_DB, ID_DEMO, TOKEN,
    };
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
        let app = router(token(), Arc::new(FakeControl::new(two_jobs())));
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

    #[test]
    fn path_segments_are_percent_encoded() {
        let check = |text: &str, expected: &str| {
            assert_eq!(path_segment(text), expected, "{text}");
        };
        check("demo", "demo");
        check(ID_DB, ID_DB);
        check("v1.2_x-y~z", "v1.2_x-y~z");
        check("my job", "my%20job");
        check("a/b?c#d%e", "a%2Fb%3Fc%23d%25e");
        check("ü", "%C3%BC");
        check(".", "%2E");
        check("..", "%2E%2E");
        check("..x", "..x");
        assert_eq!(
            checkpoints_path("my job").unwrap(),
            "/jobs/my%20job/checkpoints"
        );
        assert_eq!(link_path("../x").unwrap(), "/jobs/..%2Fx/link");
        for err in [
            checkpoints_path("").unwrap_err(),
            link_path("").unwrap_err(),
        ] {
            assert_eq!(
                err.to_string(),
                "the appliance refused the request (404 Not Found): no such job"
            );
        }
    }

    #[tokio::test]
    async fn makes_checkpoints_and_views_over_http() {
        let (client, _stop) = served(token()).await;
        assert_eq!(
            client.checkpoints("demo").await.unwrap(),
            demo_checkpoints()
        );
        let request = CreateCheckpoint {
            tags: vec!["before upgrade".to_owned()],
            app_consistent: true,
        };
        let made = client.create_checkpoint("demo", &request).await.unwrap();
        assert_eq!(
            (made.seq, made.tags, made.app_consistent),
            (1_241, vec!["before upgrade".to_owned()], true)
        );
        assert_eq!(client.checkpoints(ID_DEMO).await.unwrap().len(), 3);

        assert_eq!(client.views().await.unwrap(), []);
        let request = CreateView {
            job: "demo".to_owned(),
            at: "tag:nightly".to_owned(),
            writable: false,
        };
        assert_eq!(client.create_view(&request).await.unwrap(), nightly_view());
        assert_eq!(client.views().await.unwrap(), [nightly_view()]);
        // A 204 without a body is a success.
        client.delete_view(1).await.unwrap();
        assert_eq!(client.views().await.unwrap(), []);
    }

    #[tokio::test]
    async fn checkpoint_and_view_refusals_carry_the_appliances_words() {
        let (client, _stop) = served(token()).await;
        let refusal = |err: ClientError| {
            assert!(err.is_refusal(), "{err}");
            err.to_string()
        };
        let tagged = CreateCheckpoint {
            tags: vec!["x".to_owned()],
            app_consistent: false,
        };
        assert_eq!(
            refusal(client.create_checkpoint("db", &tagged).await.unwrap_err()),
            "the appliance refused the request (409 Conflict): the agent is not connected"
        );
        assert_eq!(
            refusal(client.checkpoints("nope").await.unwrap_err()),
            "the appliance refused the request (404 Not Found): no such job"
        );
        let expired = CreateView {
            job: "demo".to_owned(),
            at: "seq:5".to_owned(),
            writable: true,
        };
        assert_eq!(
            refusal(client.create_view(&expired).await.unwrap_err()),
            "the appliance refused the request (409 Conflict): seq 5 is no longer in the history"
        );
        assert_eq!(
            refusal(client.delete_view(9).await.unwrap_err()),
            "the appliance refused the request (404 Not Found): no such view"
        );
    }

    #[tokio::test]
    async fn changes_a_jobs_link_over_http() {
        let (client, _stop) = served(token()).await;
        let pause = LinkChange {
            paused: Some(true),
            ..LinkChange::default()
        };
        let job = client.set_link("demo", &pause).await.unwrap();
        assert_eq!((job.name.as_str(), job.paused), ("demo", true));
        let throttle = LinkChange {
            throttle_bytes_per_second: Some(10 << 20),
            ..LinkChange::default()
        };
        let job = client.set_link(ID_DEMO, &throttle).await.unwrap();
        assert_eq!(
            (job.paused, job.throttle_bytes_per_second),
            (true, 10 << 20)
        );
        assert_eq!(client.job(ID_DEMO).await.unwrap(), job);
        let err = client.set_link("nope", &pause).await.unwrap_err();
        assert!(err.is_refusal(), "{err}");
        assert_eq!(
            err.to_string(),
            "the appliance refused the request (404 Not Found): no such job"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_waits_longer_than_the_appliance() {
        assert!(CHECKPOINT_TIMEOUT_DEFAULT > CHECKPOINT_WAIT_MAX);
        // A server that never answers, as in `a_silent_server_times_out`.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let request = CreateCheckpoint {
            tags: vec!["x".to_owned()],
            app_consistent: false,
        };
        let client = ApiClient::new(&addr.to_string(), token()).unwrap();
        let err = client
            .create_checkpoint("demo", &request)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the appliance api at {addr} did not answer within 60 s")
        );
        let client = client.with_checkpoint_timeout(Duration::from_secs(90));
        let err = client
            .create_checkpoint("demo", &request)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("the appliance api at {addr} did not answer within 90 s")
        );
        drop(listener);
    }
}
