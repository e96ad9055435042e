//! The REST API (`/api/v1/...`): its JSON types (DTOs), the [`Control`] trait the appliance
//! implements to fill them, bearer-token authentication, and the router.
//!
//! The DTOs are this crate's own: the core crates' types are not `Serialize`, and the
//! appliance copies what it wants to show into them. Must never send a client an internal
//! error's text (paths, OS errors, panics) and never answer anything to a caller without
//! the token: an unauthenticated caller learns nothing, not even which paths exist.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub use crate::token::ApiToken;

/// Every endpoint lives under this prefix; a breaking change gets a new one.
pub const API_PREFIX: &str = "/api/v1";

/// One replication job (a consistency group: one agent, its disks, one sequence of seqs),
/// as the appliance sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's id: 32 lowercase hex digits.
    pub id: String,
    /// The job's name, as given to the agent (`--job-name`).
    pub name: String,
    /// The paired agent's name (its pinned peer name).
    pub agent: String,
    /// `replicating`, `connecting`, `disconnected`, `refused`, `error`, … An open set: a
    /// client shows values it does not know as they are.
    pub state: String,
    /// Why the job is in this state, for states that have a reason (`refused`, `error`).
    pub state_reason: Option<String>,
    /// `async` or `sync`.
    pub mode: String,
    /// The job's generation: bumped when the source's history restarts (resync, failback).
    pub generation: u64,
    /// Whether the agent is connected now.
    pub connected: bool,
    /// Recovery point objective achieved now: age, on the source's clock, of the oldest
    /// write the appliance has not yet made durable.
    pub rpo_seconds: f64,
    /// Records the agent holds that the appliance has not made durable.
    pub lag_records: u64,
    /// Bytes the agent holds that the appliance has not made durable.
    pub lag_bytes: u64,
    /// The last seq the agent reported having journaled.
    pub agent_head_seq: u64,
    /// The last seq durable in the appliance's landing journal.
    pub landing_durable_seq: u64,
    /// The last seq applied to the replica disks.
    pub applied_seq: u64,
    /// Records landed but not yet applied (`landing_durable_seq - applied_seq`).
    pub apply_lag_records: u64,
    /// Seconds since the agent was last heard from; `None` if it never was.
    pub last_heartbeat_age_seconds: Option<f64>,
    /// The job's disks, in id order.
    pub disks: Vec<DiskStatus>,
}

/// One disk of a job and its replica on the appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The disk's id within its job.
    pub id: u32,
    /// The disk's name, as given to the agent (`--disk NAME=PATH`).
    pub name: String,
    /// The disk's size.
    pub size_bytes: u64,
    /// Where the replica disk is on the appliance's file system.
    pub replica_path: String,
}

/// Body of `GET /api/v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    /// Every job the appliance knows, in the order the appliance chooses (stable).
    pub jobs: Vec<JobStatus>,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in words for the operator; never internal details.
    pub error: String,
}

/// What the API asks of the appliance. Implementations must be cheap and must not block
/// the runtime: copy from state kept in memory (atomics, a lock held briefly).
///
/// More methods will come (checkpoints, recovery views, pause and resume); they will be
/// added with default implementations so that existing implementations keep compiling.
pub trait Control: Send + Sync + 'static {
    /// Every job, in a stable order.
    fn jobs(&self) -> Vec<JobStatus>;
}

/// The API's router. Every route, and the fallback for unknown paths, requires
/// `Authorization: Bearer <token>`.
///
/// - `GET /api/v1/jobs` → `200 {"jobs": [JobStatus, ...]}`
/// - `GET /api/v1/jobs/{id}` → `200 JobStatus`, or `404 {"error": ...}`
/// - without a valid token → `401 {"error": ...}` with `WWW-Authenticate: Bearer ...`
/// - another path → `404 {"error": "not found"}`; another method → `405 {"error": ...}`
pub fn router(token: ApiToken, control: Arc<dyn Control>) -> Router {
    let routes = Router::new()
        .route("/jobs", get(list_jobs))
        .route("/jobs/{id}", get(show_job))
        .with_state(control);
    Router::new()
        .nest(API_PREFIX, routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Added last so that it wraps the fallbacks too.
        .layer(middleware::from_fn_with_state(
            Arc::new(token),
            authenticate,
        ))
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes in-flight
/// requests and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn list_jobs(State(control): State<Arc<dyn Control>>) -> Json<JobList> {
    Json(JobList {
        jobs: control.jobs(),
    })
}

async fn show_job(
    State(control): State<Arc<dyn Control>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    control
        .jobs()
        .into_iter()
        .find(|job| job.id == id)
        .map(Json)
        .ok_or(ApiError::NoSuchJob)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Lets the request through only with the right bearer token.
async fn authenticate(
    State(token): State<Arc<ApiToken>>,
    request: Request,
    next: Next,
) -> Response {
    match bearer(request.headers().get(AUTHORIZATION)) {
        Err(refusal) => refusal.into_response(),
        Ok(presented) if token.matches(presented) => next.run(request).await,
        Ok(_) => ApiError::InvalidToken.into_response(),
    }
}

/// The token in an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC
/// 7235 §2.1), or why there is none.
fn bearer(header: Option<&HeaderValue>) -> Result<&[u8], ApiError> {
    let value = header.ok_or(ApiError::MissingToken)?.as_bytes();
    let scheme = b"bearer ";
    if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return Err(ApiError::MalformedAuthorization);
    }
    let token = value[scheme.len()..].trim_ascii();
    if token.is_empty() {
        return Err(ApiError::MalformedAuthorization);
    }
    Ok(token)
}

/// Every error the API answers with. The messages are what clients see: fixed words,
/// never an internal error's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum ApiError {
    /// No `Authorization` header.
    #[error("missing bearer token")]
    MissingToken,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("malformed authorization header; expected `Bearer <token>`")]
    MalformedAuthorization,
    /// A bearer token that is not the appliance's.
    #[error("invalid token")]
    InvalidToken,
    /// `GET /api/v1/jobs/{id}` for an id no job has.
    #[error("no such job")]
    NoSuchJob,
    /// A path the API does not have.
    #[error("not found")]
    NotFound,
    /// A method the path does not accept.
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            Self::MissingToken | Self::MalformedAuthorization | Self::InvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::NoSuchJob | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        };
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
        // RFC 6750 §3: a 401 names the scheme; a presented but unusable token also gets
        // `error="invalid_token"`.
        let challenge = match self {
            Self::MissingToken => Some("Bearer realm=\"cdp\""),
            Self::MalformedAuthorization | Self::InvalidToken => {
                Some("Bearer realm=\"cdp\", error=\"invalid_token\"")
            }
            _ => None,
        };
        match challenge {
            Some(challenge) => (
                status,
                [(WWW_AUTHENTICATE, HeaderValue::from_static(challenge))],
                body,
            )
                .into_response(),
            None => (status, body).into_response(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::body::{to_bytes, Body};
    use axum::http::Method;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    pub(crate) const TOKEN: &str =
        "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e";
    const WRONG: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    pub(crate) const ID_DEMO: &str = "0123456789abcdef0123456789abcdef";
    pub(crate) const ID_DB: &str = "fedcba9876543210fedcba9876543210";

    /// A fixed appliance with two jobs.
    #[derive(Debug)]
    pub(crate) struct FakeControl(pub(crate) Vec<JobStatus>);

    impl Control for FakeControl {
        fn jobs(&self) -> Vec<JobStatus> {
            self.0.clone()
        }
    }

    pub(crate) fn two_jobs() -> Vec<JobStatus> {
        vec![
            JobStatus {
                id: ID_DEMO.to_owned(),
                name: "demo".to_owned(),
                agent: "demo-agent".to_owned(),
                state: "replicating".to_owned(),
                state_reason: None,
                mode: "async".to_owned(),
                generation: 1,
                connected: true,
                rpo_seconds: 0.25,
                lag_records: 12,
                lag_bytes: 49_152,
                agent_head_seq: 1_240,
                landing_durable_seq: 1_228,
                applied_seq: 1_200,
                apply_lag_records: 28,
                last_heartbeat_age_seconds: Some(0.5),
                disks: vec![DiskStatus {
                    id: 0,
                    name: "disk0".to_owned(),
                    size_bytes: 256 << 20,
                    replica_path: "/var/lib/cdp/replica/demo/disk0.img".to_owned(),
                }],
            },
            JobStatus {
                id: ID_DB.to_owned(),
                name: "db".to_owned(),
                agent: "db-host".to_owned(),
                state: "refused".to_owned(),
                state_reason: Some("agent is not paired".to_owned()),
                mode: "sync".to_owned(),
                generation: 3,
                connected: false,
                rpo_seconds: 4_000.0,
                lag_records: 0,
                lag_bytes: 0,
                agent_head_seq: 0,
                landing_durable_seq: 77,
                applied_seq: 77,
                apply_lag_records: 0,
                last_heartbeat_age_seconds: None,
                disks: vec![
                    DiskStatus {
                        id: 0,
                        name: "sys".to_owned(),
                        size_bytes: 20 << 30,
                        replica_path: "/var/lib/cdp/replica/db/sys.img".to_owned(),
                    },
                    DiskStatus {
                        id: 1,
                        name: "data".to_owned(),
                        size_bytes: 1 << 40,
                        replica_path: "/var/lib/cdp/replica/db/data.img".to_owned(),
                    },
                ],
            },
        ]
    }

    fn app() -> Router {
        router(
            ApiToken::parse(TOKEN).unwrap(),
            Arc::new(FakeControl(two_jobs())),
        )
    }

    fn get(path: &str, authorization: Option<&str>) -> Request {
        let mut request = Request::get(path);
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        request.body(Body::empty()).unwrap()
    }

    fn authorized(path: &str) -> Request {
        get(path, Some(&format!("Bearer {TOKEN}")))
    }

    /// Sends `request` to the router and compares the status and the JSON body; every
    /// answer must be JSON, and every 401 must carry a Bearer challenge.
    async fn check(request: Request, expected_status: StatusCode, expected_json: Value) {
        let response = app().oneshot(request).await.unwrap();
        let status = response.status();
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{status}"
        );
        let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
        if status == StatusCode::UNAUTHORIZED {
            let challenge = challenge.expect("a 401 carries WWW-Authenticate");
            assert!(challenge.to_str().unwrap().starts_with("Bearer "));
        } else {
            assert_eq!(challenge, None);
        }
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, body), (expected_status, expected_json));
    }

    fn error(message: &str) -> Value {
        json!({ "error": message })
    }

    #[tokio::test]
    async fn every_endpoint_requires_the_token() {
        let unauthorized = StatusCode::UNAUTHORIZED;
        let jobs = "/api/v1/jobs";
        check(get(jobs, None), unauthorized, error("missing bearer token")).await;
        let malformed = error("malformed authorization header; expected `Bearer <token>`");
        for header in [
            TOKEN.to_owned(),
            format!("Basic {TOKEN}"),
            "Bearer".to_owned(),
            "Bearer    ".to_owned(),
            format!("Bearer{TOKEN}"),
        ] {
            check(get(jobs, Some(&header)), unauthorized, malformed.clone()).await;
        }
        let invalid = error("invalid token");
        for header in [
            format!("Bearer {WRONG}"),
            format!("Bearer {}", &TOKEN[1..]),
            format!("Bearer {TOKEN}0"),
            format!("Bearer {}", TOKEN.to_uppercase()),
        ] {
            check(get(jobs, Some(&header)), unauthorized, invalid.clone()).await;
        }
        // Other paths and methods learn nothing either.
        let one = format!("/api/v1/jobs/{ID_DEMO}");
        check(get(&one, None), unauthorized, error("missing bearer token")).await;
        check(
            get("/nowhere", None),
            unauthorized,
            error("missing bearer token"),
        )
        .await;
        let post = Request::builder()
            .method(Method::POST)
            .uri(jobs)
            .header(AUTHORIZATION, format!("Bearer {WRONG}"))
            .body(Body::empty())
            .unwrap();
        check(post, unauthorized, invalid).await;
    }

    #[tokio::test]
    async fn lists_and_shows_jobs_with_the_token() {
        let jobs = serde_json::to_value(two_jobs()).unwrap();
        check(
            authorized("/api/v1/jobs"),
            StatusCode::OK,
            json!({ "jobs": jobs }),
        )
        .await;
        // The scheme is case-insensitive.
        check(
            get("/api/v1/jobs", Some(&format!("bearer {TOKEN}"))),
            StatusCode::OK,
            json!({ "jobs": jobs }),
        )
        .await;
        check(
            authorized(&format!("/api/v1/jobs/{ID_DB}")),
            StatusCode::OK,
            jobs[1].clone(),
        )
        .await;
    }

    #[tokio::test]
    async fn unknown_ids_paths_and_methods_are_json_errors() {
        check(
            authorized("/api/v1/jobs/ffffffffffffffffffffffffffffffff"),
            StatusCode::NOT_FOUND,
            error("no such job"),
        )
        .await;
        // An id prefix is not an id (prefix matching is the CLI's job).
        check(
            authorized("/api/v1/jobs/0123"),
            StatusCode::NOT_FOUND,
            error("no such job"),
        )
        .await;
        for path in [
            "/",
            "/api/v1",
            "/api/v2/jobs",
            "/api/v1/jobs/x/y",
            "/metrics",
        ] {
            check(authorized(path), StatusCode::NOT_FOUND, error("not found")).await;
        }
        let post = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/jobs")
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap();
        check(
            post,
            StatusCode::METHOD_NOT_ALLOWED,
            error("method not allowed"),
        )
        .await;
    }

    #[test]
    fn job_status_json_has_the_documented_field_names() {
        let job = &two_jobs()[1];
        let value = serde_json::to_value(job).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "agent",
                "agent_head_seq",
                "applied_seq",
                "apply_lag_records",
                "connected",
                "disks",
                "generation",
                "id",
                "lag_bytes",
                "lag_records",
                "landing_durable_seq",
                "last_heartbeat_age_seconds",
                "mode",
                "name",
                "rpo_seconds",
                "state",
                "state_reason",
            ]
        );
        assert_eq!(value["state_reason"], "agent is not paired");
        assert_eq!(value["last_heartbeat_age_seconds"], Value::Null);
        assert_eq!(
            value["disks"][1],
            json!({
                "id": 1,
                "name": "data",
                "size_bytes": 1u64 << 40,
                "replica_path": "/var/lib/cdp/replica/db/data.img"
            })
        );
        let back: JobStatus = serde_json::from_value(value).unwrap();
        assert_eq!(&back, job);
    }

    #[tokio::test]
    async fn serve_answers_over_tcp_and_stops_on_shutdown() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app(), async move {
            let _ = stopped.await;
        }));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /api/v1/jobs/{ID_DEMO} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("\"name\":\"demo\""), "{response}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
