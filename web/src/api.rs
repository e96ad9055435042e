//! The REST API (`/api/v1/...`): its JSON types (DTOs), the [`Control`] trait the appliance
//! implements to fill them and act on requests (checkpoints, recovery views, pausing and
//! throttling a job), bearer-token authentication, and the router.
//!
//! The DTOs are this crate's own: the core crates' types are not `Serialize`, and the
//! appliance copies what it wants to show into them, and parses what it is asked. Must never
//! send a client an internal error's text (paths, OS errors, panics), never answer anything
//! to a caller without the token (an unauthenticated caller learns nothing, not even which
//! paths exist, and no body of theirs is read), and never read a request body beyond
//! [`REQUEST_BODY_BYTES_MAX`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
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
    /// `syncing`, `replicating`, `ahead`, `resyncing`, `paused`, `error`, `disconnected`,
    /// `refused`, `waiting`, … An open set: a client shows values it does not know as they
    /// are.
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
    /// The oldest seq the appliance's history still keeps for this job: the earliest point a
    /// recovery view can show. `None` while the history is empty.
    #[serde(default)]
    pub history_oldest_seq: Option<u64>,
    /// When the write at `history_oldest_seq` was made, RFC 3339 UTC on the agent's clock;
    /// `None` when unknown or when the history is empty.
    #[serde(default)]
    pub history_oldest_time: Option<String>,
    /// How many checkpoints (automatic and tagged) the history keeps for this job.
    #[serde(default)]
    pub checkpoints: u64,
    /// Whether the replica disks are a consistent image of the source at one point (no
    /// resync in progress). Checkpoints can only be made while it is true. An appliance
    /// that does not send it reads as `false`.
    #[serde(default)]
    pub consistent: bool,
    /// Bytes of dirty regions compared so far by the current initial sync or resync (as the
    /// agent last reported; 0 when none runs).
    #[serde(default)]
    pub resync_done_bytes: u64,
    /// Bytes of dirty regions the current initial sync or resync compares.
    #[serde(default)]
    pub resync_total_bytes: u64,
    /// Bytes of regions the agent has marked dirty (writes not journalled, to be resynced).
    #[serde(default)]
    pub dirty_bytes: u64,
    /// An operator paused the job (`cdp pause`).
    #[serde(default)]
    pub paused: bool,
    /// The job's bandwidth limit in stored bytes per second; 0 = none (`cdp throttle`).
    #[serde(default)]
    pub throttle_bytes_per_second: u64,
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

/// One checkpoint of a job: a point of its history that a recovery view can show exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    /// The seq the checkpoint sits at: its image holds every write up to and including it.
    pub seq: u64,
    /// When the agent recorded the checkpoint: RFC 3339 UTC with microseconds
    /// (`2025-06-01T12:00:05.000000Z`), on the agent's clock.
    pub time: String,
    /// The same instant as `time`, in microseconds since the Unix epoch.
    pub unix_micros: u64,
    /// `auto` (made on the appliance's schedule) or `tagged` (asked for by an operator). An
    /// open set: a client shows values it does not know as they are.
    pub kind: String,
    /// The agent's consistency hook ran and succeeded just before the checkpoint, so the
    /// image is application-consistent; otherwise it is crash-consistent.
    pub app_consistent: bool,
    /// The operator's tags, in the order given; empty for automatic checkpoints.
    pub tags: Vec<String>,
}

/// Body of `GET /api/v1/jobs/{job}/checkpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointList {
    /// Every checkpoint the history keeps for the job, oldest first.
    pub checkpoints: Vec<CheckpointStatus>,
}

/// Body of `POST /api/v1/jobs/{job}/checkpoints`: ask the job's agent for a checkpoint.
/// Unknown fields are refused (400), so that a misspelt option is not silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckpoint {
    /// Tags for the checkpoint; the appliance enforces their rules (how many, how long).
    pub tags: Vec<String>,
    /// Ask the agent to run its consistency hook first (quiesce the application). If the
    /// hook fails, or the agent has none, the checkpoint is still made, crash-consistent,
    /// and says so.
    #[serde(default)]
    pub app_consistent: bool,
}

/// Body of `POST /api/v1/jobs/{job}/link`: pause, resume or throttle a job's replication.
/// A field left out (or `null`) keeps its setting; at least one must be given. Unknown
/// fields are refused (400), so that a misspelt setting is not silently ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkChange {
    /// `true` pauses the job (the agent ships nothing, journals, and past its backlog
    /// bound tracks dirty regions); `false` resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// The job's bandwidth limit in stored bytes per second; 0 removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_bytes_per_second: Option<u64>,
}

impl LinkChange {
    /// Whether it changes nothing (neither field given).
    pub fn is_empty(&self) -> bool {
        self.paused.is_none() && self.throttle_bytes_per_second.is_none()
    }
}

/// One disk of a recovery view, served over NBD by the appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewExport {
    /// The disk's name in its job (`--disk NAME=PATH` on the agent).
    pub disk: String,
    /// The NBD export name that serves it.
    pub export: String,
    /// Where an NBD client finds it: `nbd://HOST:PORT/EXPORT`.
    pub uri: String,
    /// The disk's size.
    pub size_bytes: u64,
}

/// A recovery view: a job's disks as they were at one point of its history, served over NBD
/// until deleted. The replica and the history never change because of a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewStatus {
    /// The view's id, chosen by the appliance; unique among its views.
    pub id: u64,
    /// The id of the job it shows (32 lowercase hex digits).
    pub job: String,
    /// The name of the job it shows.
    pub job_name: String,
    /// The point it shows: every write of the job up to and including this seq.
    pub seq: u64,
    /// When that point was, RFC 3339 UTC on the agent's clock, when the appliance knows it
    /// (a checkpoint's time); `None` otherwise.
    pub time: Option<String>,
    /// Whether NBD clients may write. Writes go to a scratch layer that is dropped with the
    /// view; they never reach the replica or the history.
    pub writable: bool,
    /// One export per disk of the job, in disk id order.
    pub exports: Vec<ViewExport>,
}

/// Body of `GET /api/v1/views`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewList {
    /// Every view the appliance serves, in id order.
    pub views: Vec<ViewStatus>,
}

/// Body of `POST /api/v1/views`: open a recovery view. Unknown fields are refused (400).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateView {
    /// The job: its name, its id, or a unique prefix of its id.
    pub job: String,
    /// The point to show: `latest` (the last applied seq), `seq:N`, `checkpoint:SEQ` (the
    /// checkpoint at that seq), `tag:TAG` (the newest checkpoint with that tag), an RFC 3339
    /// time (`2025-06-01T12:00:00Z`: the newest checkpoint at or before it) or
    /// `@UNIX_SECONDS` (the same, in seconds since the Unix epoch).
    pub at: String,
    /// Let NBD clients write (to a scratch layer dropped with the view), e.g. to boot or
    /// repair a copy; read-only otherwise.
    #[serde(default)]
    pub writable: bool,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in words for the operator; never internal details.
    pub error: String,
}

/// A future that can move between threads, boxed: what [`Control`]'s asynchronous methods
/// return (a trait used as `dyn Control` cannot have `async fn`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Largest request body accepted; a larger one is answered 413 without being read whole.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 << 10;

/// Longest the API waits for [`Control::create_checkpoint`] before answering 503. A bound
/// above the appliance's own wait (about 30 s, while the agent runs its hook), so that a
/// stuck implementation cannot hold a request forever.
pub const CHECKPOINT_WAIT_MAX: Duration = Duration::from_secs(45);

/// What the API asks of the appliance.
///
/// [`jobs`](Control::jobs) and [`views`](Control::views) must be cheap and must not block
/// the runtime: copy from state kept in memory (atomics, a lock held briefly). The other
/// synchronous methods may block briefly (read the history store, make or remove a view's
/// files): the router calls them on tokio's blocking pool.
///
/// A `job` argument is what the user gave, percent-decoded from the path or taken from the
/// body: a job's name, its id, or a prefix of its id; the appliance resolves it and answers
/// [`ApiError::NotFound`] when nothing matches.
///
/// Every method after `jobs` has a default implementation that answers 404 ("this
/// appliance does not support …"), so an implementation writes only what it supports; later
/// methods are added the same way.
pub trait Control: Send + Sync + 'static {
    /// Every job, in a stable order.
    fn jobs(&self) -> Vec<JobStatus>;

    /// The checkpoints `job`'s history keeps, oldest first.
    fn checkpoints(&self, job: &str) -> Result<Vec<CheckpointStatus>, ApiError> {
        let _ = job;
        Err(unsupported("checkpoints"))
    }

    /// Asks `job`'s agent for a checkpoint and completes once the checkpoint is in the
    /// history. May take up to about 30 s (the agent runs its hook first). The router
    /// drops the future after [`CHECKPOINT_WAIT_MAX`], or earlier if the client goes away,
    /// so it must be cancel-safe. Typical errors: `NotFound` (job), `BadRequest` (tags),
    /// `Conflict` (agent not connected, replicas inconsistent), `Unavailable` (no answer in
    /// time).
    fn create_checkpoint(
        &self,
        job: &str,
        request: CreateCheckpoint,
    ) -> BoxFuture<'_, Result<CheckpointStatus, ApiError>> {
        let _ = (job, request);
        Box::pin(std::future::ready(Err(unsupported("checkpoints"))))
    }

    /// Every recovery view, in id order.
    fn views(&self) -> Vec<ViewStatus> {
        Vec::new()
    }

    /// Opens a recovery view. Typical errors: `NotFound` (job, checkpoint, tag),
    /// `BadRequest` (a point that does not parse), `Conflict` (a point no longer, or not
    /// yet, in the history).
    fn create_view(&self, request: CreateView) -> Result<ViewStatus, ApiError> {
        let _ = request;
        Err(unsupported("recovery views"))
    }

    /// Closes view `id` and drops its scratch layer; `NotFound` if there is no such view.
    fn delete_view(&self, id: u64) -> Result<(), ApiError> {
        let _ = id;
        Err(unsupported("recovery views"))
    }

    /// Changes `job`'s link settings (paused, throttle), durably, and answers the job's
    /// status after the change. The router only passes a `change` with at least one field.
    /// Typical errors: `NotFound` (job), `Internal` (the settings could not be saved).
    fn set_link(&self, job: &str, change: LinkChange) -> Result<JobStatus, ApiError> {
        let _ = (job, change);
        Err(unsupported("pausing or throttling jobs"))
    }
}

/// What the default implementations of [`Control`]'s methods answer.
fn unsupported(what: &str) -> ApiError {
    ApiError::NotFound(format!("this appliance does not support {what}"))
}

/// Why the appliance did not do what a request asked: the error of [`Control`]'s fallible
/// methods. The message is for the operator and reaches the client as `{"error": message}`,
/// except `Internal`'s, which is logged and replaced by `internal error` (it may hold paths
/// or OS errors). Messages are lowercase, without a trailing period.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No such job, checkpoint, tag or view, or a feature this appliance lacks: 404.
    #[error("{0}")]
    NotFound(String),
    /// The request does not make sense: a point that does not parse, a bad tag: 400.
    #[error("{0}")]
    BadRequest(String),
    /// The request cannot be met in the current state: the agent is not connected, the
    /// point has left the history, a resync is in progress: 409.
    #[error("{0}")]
    Conflict(String),
    /// Timed out waiting (for the agent); the client may try again later: 503.
    #[error("{0}")]
    Unavailable(String),
    /// The appliance failed: 500. The message is logged on the appliance, never sent.
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match self {
            Self::NotFound(message) => (StatusCode::NOT_FOUND, message),
            Self::BadRequest(message) => (StatusCode::BAD_REQUEST, message),
            Self::Conflict(message) => (StatusCode::CONFLICT, message),
            Self::Unavailable(message) => (StatusCode::SERVICE_UNAVAILABLE, message),
            Self::Internal(message) => {
                tracing::error!(error = %message, "api request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        };
        (status, Json(ErrorBody { error })).into_response()
    }
}

/// The API's router. Every route, and the fallback for unknown paths, requires
/// `Authorization: Bearer <token>`.
///
/// - `GET /api/v1/jobs` → `200 {"jobs": [JobStatus, ...]}`
/// - `GET /api/v1/jobs/{id}` → `200 JobStatus`, or `404 {"error": ...}`
/// - `GET /api/v1/jobs/{job}/checkpoints` → `200 {"checkpoints": [CheckpointStatus, ...]}`
/// - `POST /api/v1/jobs/{job}/checkpoints` with `CreateCheckpoint` → `201 CheckpointStatus`
/// - `POST /api/v1/jobs/{job}/link` with `LinkChange` → `200 JobStatus` (the job after the
///   change); `400` when the change names neither setting
/// - `GET /api/v1/views` → `200 {"views": [ViewStatus, ...]}`
/// - `POST /api/v1/views` with `CreateView` → `201 ViewStatus`
/// - `DELETE /api/v1/views/{id}` → `204`
/// - a failed [`Control`] call → 404, 400, 409, 503 or 500 (see [`ApiError`])
/// - a body that is not JSON → 415; not the JSON expected → 400; larger than
///   [`REQUEST_BODY_BYTES_MAX`] → 413
/// - without a valid token → `401 {"error": ...}` with `WWW-Authenticate: Bearer ...`
/// - another path → `404 {"error": "not found"}`; another method → `405 {"error": ...}`
pub fn router(token: ApiToken, control: Arc<dyn Control>) -> Router {
    // One name for the job segment: the router refuses two names at one position.
    let routes = Router::new()
        .route("/jobs", get(list_jobs))
        .route("/jobs/{job}", get(show_job))
        .route(
            "/jobs/{job}/checkpoints",
            get(list_checkpoints).post(create_checkpoint),
        )
        .route("/jobs/{job}/link", post(change_link))
        .route("/views", get(list_views).post(create_view))
        .route("/views/{id}", delete(delete_view))
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(control);
    Router::new()
        .nest(API_PREFIX, routes)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Added last so that it wraps the fallbacks too, and runs before any body is read.
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
    Segment(id): Segment,
) -> Result<Json<JobStatus>, ApiError> {
    control
        .jobs()
        .into_iter()
        .find(|job| job.id == id)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("no such job".to_owned()))
}

async fn list_checkpoints(
    State(control): State<Arc<dyn Control>>,
    Segment(job): Segment,
) -> Result<Json<CheckpointList>, ApiError> {
    let checkpoints = blocking(control, move |control| control.checkpoints(&job)).await?;
    Ok(Json(CheckpointList { checkpoints }))
}

async fn create_checkpoint(
    State(control): State<Arc<dyn Control>>,
    Segment(job): Segment,
    JsonBody(request): JsonBody<CreateCheckpoint>,
) -> Result<(StatusCode, Json<CheckpointStatus>), ApiError> {
    let created = tokio::time::timeout(
        CHECKPOINT_WAIT_MAX,
        control.create_checkpoint(&job, request),
    )
    .await
    .map_err(|_| {
        ApiError::Unavailable(format!(
            "the checkpoint was not confirmed within {} s; it may still be made (see the \
             job's checkpoints)",
            CHECKPOINT_WAIT_MAX.as_secs()
        ))
    })??;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn change_link(
    State(control): State<Arc<dyn Control>>,
    Segment(job): Segment,
    JsonBody(change): JsonBody<LinkChange>,
) -> Result<Json<JobStatus>, ApiError> {
    if change.is_empty() {
        return Err(ApiError::BadRequest(
            "a link change needs `paused` or `throttle_bytes_per_second`".to_owned(),
        ));
    }
    // The appliance writes the settings to a file before answering.
    let status = blocking(control, move |control| control.set_link(&job, change)).await?;
    Ok(Json(status))
}

async fn list_views(State(control): State<Arc<dyn Control>>) -> Json<ViewList> {
    Json(ViewList {
        views: control.views(),
    })
}

async fn create_view(
    State(control): State<Arc<dyn Control>>,
    JsonBody(request): JsonBody<CreateView>,
) -> Result<(StatusCode, Json<ViewStatus>), ApiError> {
    let view = blocking(control, move |control| control.create_view(request)).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn delete_view(
    State(control): State<Arc<dyn Control>>,
    Segment(id): Segment,
) -> Result<StatusCode, ApiError> {
    // Not a number: it cannot name a view, just as an id prefix cannot name a job.
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::NotFound("no such view".to_owned()))?;
    blocking(control, move |control| control.delete_view(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a [`Control`] method that may block on tokio's blocking pool. A panic in it
/// becomes a 500 (logged), not a dropped connection.
async fn blocking<T: Send + 'static>(
    control: Arc<dyn Control>,
    call: impl FnOnce(&dyn Control) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || call(control.as_ref()))
        .await
        .map_err(|err| ApiError::Internal(format!("control call failed: {err}")))?
}

async fn not_found() -> Refusal {
    Refusal::NotFound
}

async fn method_not_allowed() -> Refusal {
    Refusal::MethodNotAllowed
}

/// One path parameter, percent-decoded; a segment that does not decode to UTF-8 names
/// nothing (404) rather than getting axum's plain-text rejection.
#[derive(Debug)]
struct Segment(String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Refusal> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(segment)| Segment(segment))
            .map_err(|_| Refusal::NotFound)
    }
}

/// A JSON request body decoded as `T`, with the refusals in this API's JSON shape (axum's
/// own `Json` rejections are plain text).
#[derive(Debug)]
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Refusal;

    async fn from_request(request: Request, state: &S) -> Result<Self, Refusal> {
        if !is_json(request.headers().get(CONTENT_TYPE)) {
            return Err(Refusal::NotJson);
        }
        // Bounded by the router's `DefaultBodyLimit`.
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    Refusal::BodyTooLarge
                } else {
                    Refusal::MalformedBody("the body could not be read".to_owned())
                }
            })?;
        serde_json::from_slice(&body)
            .map(JsonBody)
            .map_err(|err| Refusal::MalformedBody(err.to_string()))
    }
}

/// Whether a `Content-Type` is JSON: `application/json` or `application/*+json`, with any
/// parameters (`; charset=utf-8`).
fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(Ok(value)) = content_type.map(HeaderValue::to_str) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype
                .get(subtype.len().saturating_sub(5)..)
                .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json")))
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
        Ok(_) => Refusal::InvalidToken.into_response(),
    }
}

/// The token in an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC
/// 7235 §2.1), or why there is none.
fn bearer(header: Option<&HeaderValue>) -> Result<&[u8], Refusal> {
    let value = header.ok_or(Refusal::MissingToken)?.as_bytes();
    let scheme = b"bearer ";
    if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return Err(Refusal::MalformedAuthorization);
    }
    let token = value[scheme.len()..].trim_ascii();
    if token.is_empty() {
        return Err(Refusal::MalformedAuthorization);
    }
    Ok(token)
}

/// What the API itself refuses, before any [`Control`] call: authentication, routing and
/// request bodies. The messages are what clients see: fixed words, or serde's description
/// of what is wrong with the client's own JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    /// No `Authorization` header.
    #[error("missing bearer token")]
    MissingToken,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("malformed authorization header; expected `Bearer <token>`")]
    MalformedAuthorization,
    /// A bearer token that is not the appliance's.
    #[error("invalid token")]
    InvalidToken,
    /// A path the API does not have.
    #[error("not found")]
    NotFound,
    /// A method the path does not accept.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A body without a JSON `Content-Type`.
    #[error("the request body must be json (content-type: application/json)")]
    NotJson,
    /// A body larger than [`REQUEST_BODY_BYTES_MAX`].
    #[error("the request body is larger than {REQUEST_BODY_BYTES_MAX} bytes")]
    BodyTooLarge,
    /// A body that is not the JSON the endpoint takes.
    #[error("invalid request body: {0}")]
    MalformedBody(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = match self {
            Self::MissingToken | Self::MalformedAuthorization | Self::InvalidToken => {
                StatusCode::UNAUTHORIZED
            }
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MalformedBody(_) => StatusCode::BAD_REQUEST,
        };
        // RFC 6750 §3: a 401 names the scheme; a presented but unusable token also gets
        // `error="invalid_token"`.
        let challenge = match self {
            Self::MissingToken => Some("Bearer realm=\"cdp\""),
            Self::MalformedAuthorization | Self::InvalidToken => {
                Some("Bearer realm=\"cdp\", error=\"invalid_token\"")
            }
            _ => None,
        };
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
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

    /// A fixed appliance with two jobs, whose checkpoints and views live in memory. Jobs are
    /// found by exact name or id (the real appliance also takes id prefixes).
    ///
    /// `demo` is connected and has two checkpoints; `db` is not connected (checkpoints are
    /// refused) and has none. A checkpoint tagged `hang` never completes. Link changes
    /// (pause, throttle) show in the jobs listed afterwards.
    #[derive(Debug)]
    pub(crate) struct FakeControl {
        jobs: Vec<JobStatus>,
        state: std::sync::Mutex<FakeState>,
    }

    #[derive(Debug)]
    struct FakeState {
        /// Per job id, oldest first.
        checkpoints: std::collections::HashMap<String, Vec<CheckpointStatus>>,
        views: Vec<ViewStatus>,
        next_view_id: u64,
        /// Checkpoints made through the API so far: spaces their seqs and times.
        created: u64,
        /// Per job id, the link settings changed through the API: (paused, throttle).
        links: std::collections::HashMap<String, (bool, u64)>,
    }

    /// 2025-06-01T12:00:00Z in microseconds since the Unix epoch.
    const NOON_MICROS: u64 = 1_748_779_200_000_000;

    /// The checkpoints `demo` starts with.
    pub(crate) fn demo_checkpoints() -> Vec<CheckpointStatus> {
        vec![
            CheckpointStatus {
                seq: 1_000,
                time: "2025-06-01T11:00:00.000000Z".to_owned(),
                unix_micros: NOON_MICROS - 3_600_000_000,
                kind: "auto".to_owned(),
                app_consistent: false,
                tags: Vec::new(),
            },
            CheckpointStatus {
                seq: 1_100,
                time: "2025-06-01T11:30:00.250000Z".to_owned(),
                unix_micros: NOON_MICROS - 1_799_750_000,
                kind: "tagged".to_owned(),
                app_consistent: true,
                tags: vec!["nightly".to_owned(), "before upgrade".to_owned()],
            },
        ]
    }

    /// The view the fake makes first: `demo` at its `nightly` checkpoint, read-only.
    pub(crate) fn nightly_view() -> ViewStatus {
        ViewStatus {
            id: 1,
            job: ID_DEMO.to_owned(),
            job_name: "demo".to_owned(),
            seq: 1_100,
            time: Some("2025-06-01T11:30:00.250000Z".to_owned()),
            writable: false,
            exports: vec![ViewExport {
                disk: "disk0".to_owned(),
                export: "view1-disk0".to_owned(),
                uri: "nbd://127.0.0.1:10809/view1-disk0".to_owned(),
                size_bytes: 256 << 20,
            }],
        }
    }

    impl FakeControl {
        pub(crate) fn new(jobs: Vec<JobStatus>) -> Self {
            let checkpoints = jobs
                .iter()
                .map(|job| {
                    let list = if job.name == "demo" {
                        demo_checkpoints()
                    } else {
                        Vec::new()
                    };
                    (job.id.clone(), list)
                })
                .collect();
            Self {
                jobs,
                state: std::sync::Mutex::new(FakeState {
                    checkpoints,
                    views: Vec::new(),
                    next_view_id: 1,
                    created: 0,
                    links: std::collections::HashMap::new(),
                }),
            }
        }

        fn job(&self, query: &str) -> Result<&JobStatus, ApiError> {
            self.jobs
                .iter()
                .find(|job| job.name == query || job.id == query)
                .ok_or_else(|| ApiError::NotFound("no such job".to_owned()))
        }

        /// The seq and time `at` names in `job`.
        fn point(&self, job: &JobStatus, at: &str) -> Result<(u64, Option<String>), ApiError> {
            let state = self.state.lock().unwrap();
            let checkpoints = &state.checkpoints[&job.id];
            let not_a_point = || ApiError::BadRequest(format!("{at:?} is not a point"));
            if at == "latest" {
                return Ok((job.applied_seq, None));
            }
            if let Some(seq) = at.strip_prefix("seq:") {
                let seq: u64 = seq.parse().map_err(|_| not_a_point())?;
                if job.history_oldest_seq.is_none_or(|oldest| seq < oldest) {
                    return Err(ApiError::Conflict(format!(
                        "seq {seq} is no longer in the history"
                    )));
                }
                if seq > job.applied_seq {
                    return Err(ApiError::Conflict(format!("seq {seq} is not applied yet")));
                }
                return Ok((seq, None));
            }
            let found = if let Some(seq) = at.strip_prefix("checkpoint:") {
                let seq: u64 = seq.parse().map_err(|_| not_a_point())?;
                checkpoints.iter().find(|c| c.seq == seq)
            } else if let Some(tag) = at.strip_prefix("tag:") {
                checkpoints
                    .iter()
                    .rev()
                    .find(|c| c.tags.iter().any(|t| t == tag))
            } else {
                return Err(not_a_point());
            };
            found
                .map(|c| (c.seq, Some(c.time.clone())))
                .ok_or_else(|| ApiError::NotFound(format!("no checkpoint matches {at:?}")))
        }

        /// `job` with the link settings changed through the API.
        fn with_link(&self, job: &JobStatus) -> JobStatus {
            let state = self.state.lock().unwrap();
            let (paused, throttle_bytes_per_second) = state
                .links
                .get(&job.id)
                .copied()
                .unwrap_or((job.paused, job.throttle_bytes_per_second));
            JobStatus {
                paused,
                throttle_bytes_per_second,
                ..job.clone()
            }
        }
    }

    impl Control for FakeControl {
        fn jobs(&self) -> Vec<JobStatus> {
            self.jobs.iter().map(|job| self.with_link(job)).collect()
        }

        fn checkpoints(&self, job: &str) -> Result<Vec<CheckpointStatus>, ApiError> {
            let job = self.job(job)?;
            Ok(self.state.lock().unwrap().checkpoints[&job.id].clone())
        }

        fn create_checkpoint(
            &self,
            job: &str,
            request: CreateCheckpoint,
        ) -> BoxFuture<'_, Result<CheckpointStatus, ApiError>> {
            if request.tags.iter().any(|tag| tag == "hang") {
                return Box::pin(std::future::pending());
            }
            let made = self.job(job).and_then(|job| {
                if !job.connected {
                    return Err(ApiError::Conflict("the agent is not connected".to_owned()));
                }
                if request.tags.is_empty() {
                    return Err(ApiError::BadRequest(
                        "a checkpoint needs at least one tag".to_owned(),
                    ));
                }
                let mut state = self.state.lock().unwrap();
                state.created += 1;
                let n = state.created;
                let checkpoint = CheckpointStatus {
                    seq: job.agent_head_seq + n,
                    time: format!("2025-06-01T12:00:{n:02}.000000Z"),
                    unix_micros: NOON_MICROS + n * 1_000_000,
                    kind: "tagged".to_owned(),
                    app_consistent: request.app_consistent,
                    tags: request.tags,
                };
                if let Some(list) = state.checkpoints.get_mut(&job.id) {
                    list.push(checkpoint.clone());
                }
                Ok(checkpoint)
            });
            Box::pin(std::future::ready(made))
        }

        fn views(&self) -> Vec<ViewStatus> {
            self.state.lock().unwrap().views.clone()
        }

        fn create_view(&self, request: CreateView) -> Result<ViewStatus, ApiError> {
            let job = self.job(&request.job)?;
            let (seq, time) = self.point(job, &request.at)?;
            let mut state = self.state.lock().unwrap();
            let id = state.next_view_id;
            state.next_view_id += 1;
            let view = ViewStatus {
                id,
                job: job.id.clone(),
                job_name: job.name.clone(),
                seq,
                time,
                writable: request.writable,
                exports: job
                    .disks
                    .iter()
                    .map(|disk| {
                        let export = format!("view{id}-{}", disk.name);
                        ViewExport {
                            disk: disk.name.clone(),
                            uri: format!("nbd://127.0.0.1:10809/{export}"),
                            export,
                            size_bytes: disk.size_bytes,
                        }
                    })
                    .collect(),
            };
            state.views.push(view.clone());
            Ok(view)
        }

        fn delete_view(&self, id: u64) -> Result<(), ApiError> {
            let mut state = self.state.lock().unwrap();
            let before = state.views.len();
            state.views.retain(|view| view.id != id);
            if state.views.len() == before {
                return Err(ApiError::NotFound("no such view".to_owned()));
            }
            Ok(())
        }

        fn set_link(&self, job: &str, change: LinkChange) -> Result<JobStatus, ApiError> {
            let job = self.job(job)?;
            let current = self.with_link(job);
            let link = (
                change.paused.unwrap_or(current.paused),
                change
                    .throttle_bytes_per_second
                    .unwrap_or(current.throttle_bytes_per_second),
            );
            self.state
                .lock()
                .unwrap()
                .links
                .insert(job.id.clone(), link);
            Ok(self.with_link(job))
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
                history_oldest_seq: Some(1_000),
                history_oldest_time: Some("2025-06-01T11:00:00.000000Z".to_owned()),
                checkpoints: 2,
                consistent: true,
                resync_done_bytes: 0,
                resync_total_bytes: 0,
                dirty_bytes: 0,
                paused: false,
                throttle_bytes_per_second: 0,
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
                history_oldest_seq: None,
                history_oldest_time: None,
                checkpoints: 0,
                consistent: false,
                resync_done_bytes: 0,
                resync_total_bytes: 0,
                dirty_bytes: 0,
                paused: false,
                throttle_bytes_per_second: 0,
            },
        ]
    }

    fn app() -> Router {
        app_with(Arc::new(FakeControl::new(two_jobs())))
    }

    fn app_with(control: Arc<dyn Control>) -> Router {
        router(ApiToken::parse(TOKEN).unwrap(), control)
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

    /// An authorized request with `body` sent as `content_type` (none if `None`).
    fn with_body(method: Method, path: &str, content_type: Option<&str>, body: &str) -> Request {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"));
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    }

    /// An authorized request with a JSON body.
    fn send(method: Method, path: &str, body: Value) -> Request {
        with_body(method, path, Some("application/json"), &body.to_string())
    }

    /// An authorized request without a body.
    fn bare(method: Method, path: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(path)
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap()
    }

    /// Sends `request` to a fresh router over the fake appliance; see [`check_on`].
    async fn check(request: Request, expected_status: StatusCode, expected_json: Value) {
        check_on(&app(), request, expected_status, expected_json).await;
    }

    /// Sends `request` to `app` and compares the status and the JSON body (`null` for a 204,
    /// which must have no body). Every other answer must be JSON, and every 401 must carry
    /// a Bearer challenge.
    async fn check_on(
        app: &Router,
        request: Request,
        expected_status: StatusCode,
        expected_json: Value,
    ) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let challenge = response.headers().get(WWW_AUTHENTICATE).cloned();
        if status == StatusCode::UNAUTHORIZED {
            let challenge = challenge.expect("a 401 carries WWW-Authenticate");
            assert!(challenge.to_str().unwrap().starts_with("Bearer "));
        } else {
            assert_eq!(challenge, None);
        }
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let body: Value = if status == StatusCode::NO_CONTENT {
            assert_eq!((content_type, body.len()), (None, 0));
            Value::Null
        } else {
            assert_eq!(content_type.unwrap(), "application/json", "{status}");
            serde_json::from_slice(&body).unwrap()
        };
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

        // The endpoints that change things too, before any body is read: a caller without
        // the token can neither make the appliance buffer a body nor change anything.
        let control = Arc::new(FakeControl::new(two_jobs()));
        let app = app_with(control.clone());
        let missing = error("missing bearer token");
        for (method, path, body) in [
            (Method::GET, "/api/v1/jobs/demo/checkpoints", String::new()),
            (
                Method::POST,
                "/api/v1/jobs/demo/checkpoints",
                r#"{"tags":["x"]}"#.to_owned(),
            ),
            (Method::GET, "/api/v1/views", String::new()),
            (
                Method::POST,
                "/api/v1/views",
                r#"{"job":"demo","at":"latest"}"#.to_owned(),
            ),
            (
                Method::POST,
                "/api/v1/views",
                "x".repeat(REQUEST_BODY_BYTES_MAX * 2),
            ),
            (Method::DELETE, "/api/v1/views/1", String::new()),
            (
                Method::POST,
                "/api/v1/jobs/demo/link",
                r#"{"paused":true}"#.to_owned(),
            ),
        ] {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header(CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap();
            check_on(&app, request, unauthorized, missing.clone()).await;
        }
        assert_eq!(control.views(), []);
        assert_eq!(control.checkpoints("demo").unwrap(), demo_checkpoints());
        assert_eq!(control.jobs(), two_jobs());
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

    #[tokio::test]
    async fn checkpoints_are_listed_and_created() {
        let app = app();
        let path = "/api/v1/jobs/demo/checkpoints";
        let listed = |checkpoints: &[CheckpointStatus]| json!({ "checkpoints": checkpoints });
        let demo = demo_checkpoints();
        check_on(&app, authorized(path), StatusCode::OK, listed(&demo)).await;
        // By id, and percent-decoded: the appliance gets what the user typed.
        let by_id = format!("/api/v1/jobs/{ID_DEMO}/checkpoints");
        check_on(&app, authorized(&by_id), StatusCode::OK, listed(&demo)).await;
        let encoded = "/api/v1/jobs/d%65mo/checkpoints";
        check_on(&app, authorized(encoded), StatusCode::OK, listed(&demo)).await;
        let db = "/api/v1/jobs/db/checkpoints";
        check_on(&app, authorized(db), StatusCode::OK, listed(&[])).await;

        let first = CheckpointStatus {
            seq: 1_241,
            time: "2025-06-01T12:00:01.000000Z".to_owned(),
            unix_micros: NOON_MICROS + 1_000_000,
            kind: "tagged".to_owned(),
            app_consistent: true,
            tags: vec!["before-upgrade".to_owned()],
        };
        let body = json!({ "tags": ["before-upgrade"], "app_consistent": true });
        let created = serde_json::to_value(&first).unwrap();
        check_on(
            &app,
            send(Method::POST, path, body),
            StatusCode::CREATED,
            created,
        )
        .await;
        // `app_consistent` may be left out.
        let second = CheckpointStatus {
            seq: 1_242,
            time: "2025-06-01T12:00:02.000000Z".to_owned(),
            unix_micros: NOON_MICROS + 2_000_000,
            app_consistent: false,
            tags: vec!["a".to_owned(), "b".to_owned()],
            ..first.clone()
        };
        let body = json!({ "tags": ["a", "b"] });
        let created = serde_json::to_value(&second).unwrap();
        check_on(
            &app,
            send(Method::POST, path, body),
            StatusCode::CREATED,
            created,
        )
        .await;
        let all = [demo, vec![first, second]].concat();
        check_on(&app, authorized(path), StatusCode::OK, listed(&all)).await;
    }

    #[tokio::test]
    async fn checkpoint_refusals_carry_the_appliances_words() {
        let create = |job: &str, body: Value| {
            send(
                Method::POST,
                &format!("/api/v1/jobs/{job}/checkpoints"),
                body,
            )
        };
        let tagged = json!({ "tags": ["x"] });
        let no_job = error("no such job");
        check(
            create("nope", tagged.clone()),
            StatusCode::NOT_FOUND,
            no_job.clone(),
        )
        .await;
        let list = authorized("/api/v1/jobs/nope/checkpoints");
        check(list, StatusCode::NOT_FOUND, no_job).await;
        let not_connected = error("the agent is not connected");
        check(create("db", tagged), StatusCode::CONFLICT, not_connected).await;
        let untagged = json!({ "tags": [] });
        let needs_tag = error("a checkpoint needs at least one tag");
        check(create("demo", untagged), StatusCode::BAD_REQUEST, needs_tag).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_that_never_completes_is_unavailable() {
        let request = send(
            Method::POST,
            "/api/v1/jobs/demo/checkpoints",
            json!({ "tags": ["hang"] }),
        );
        let started = tokio::time::Instant::now();
        check(
            request,
            StatusCode::SERVICE_UNAVAILABLE,
            error(
                "the checkpoint was not confirmed within 45 s; it may still be made (see the \
                 job's checkpoints)",
            ),
        )
        .await;
        assert_eq!(started.elapsed(), CHECKPOINT_WAIT_MAX);
    }

    #[tokio::test]
    async fn views_are_created_listed_and_deleted() {
        let app = app();
        let views = "/api/v1/views";
        check_on(
            &app,
            authorized(views),
            StatusCode::OK,
            json!({ "views": [] }),
        )
        .await;
        let nightly = serde_json::to_value(nightly_view()).unwrap();
        let body = json!({ "job": "demo", "at": "tag:nightly" });
        let request = send(Method::POST, views, body);
        check_on(&app, request, StatusCode::CREATED, nightly.clone()).await;
        let latest = json!({
            "id": 2,
            "job": ID_DB,
            "job_name": "db",
            "seq": 77,
            "time": null,
            "writable": true,
            "exports": [
                {
                    "disk": "sys",
                    "export": "view2-sys",
                    "uri": "nbd://127.0.0.1:10809/view2-sys",
                    "size_bytes": 20u64 << 30
                },
                {
                    "disk": "data",
                    "export": "view2-data",
                    "uri": "nbd://127.0.0.1:10809/view2-data",
                    "size_bytes": 1u64 << 40
                }
            ]
        });
        let body = json!({ "job": ID_DB, "at": "latest", "writable": true });
        let request = send(Method::POST, views, body);
        check_on(&app, request, StatusCode::CREATED, latest.clone()).await;
        let both = json!({ "views": [nightly, latest] });
        check_on(&app, authorized(views), StatusCode::OK, both).await;

        let one = "/api/v1/views/1";
        check_on(
            &app,
            bare(Method::DELETE, one),
            StatusCode::NO_CONTENT,
            Value::Null,
        )
        .await;
        let left = json!({ "views": [latest] });
        check_on(&app, authorized(views), StatusCode::OK, left).await;
        let no_view = error("no such view");
        let again = bare(Method::DELETE, one);
        check_on(&app, again, StatusCode::NOT_FOUND, no_view.clone()).await;
        // What is not a u64 names no view.
        for id in ["x", "-2", "2.0", "18446744073709551616"] {
            let request = bare(Method::DELETE, &format!("/api/v1/views/{id}"));
            check_on(&app, request, StatusCode::NOT_FOUND, no_view.clone()).await;
        }
        let left = json!({ "views": [latest] });
        check_on(&app, authorized(views), StatusCode::OK, left).await;
    }

    #[tokio::test]
    async fn a_job_is_paused_throttled_and_resumed() {
        let app = app();
        let link = "/api/v1/jobs/demo/link";
        let demo = |paused: bool, throttle_bytes_per_second: u64| {
            let job = JobStatus {
                paused,
                throttle_bytes_per_second,
                ..two_jobs()[0].clone()
            };
            serde_json::to_value(job).unwrap()
        };
        for (body, expected) in [
            (json!({ "paused": true }), demo(true, 0)),
            // A setting left out, or null, is kept.
            (
                json!({ "throttle_bytes_per_second": 10u64 << 20 }),
                demo(true, 10 << 20),
            ),
            (
                json!({ "paused": false, "throttle_bytes_per_second": null }),
                demo(false, 10 << 20),
            ),
            (
                json!({ "paused": false, "throttle_bytes_per_second": 0 }),
                demo(false, 0),
            ),
            (json!({ "paused": true }), demo(true, 0)),
        ] {
            let request = send(Method::POST, link, body);
            check_on(&app, request, StatusCode::OK, expected).await;
        }
        // By id too, and the change shows in the job's status afterwards; the other job is
        // untouched.
        let by_id = format!("/api/v1/jobs/{ID_DEMO}/link");
        let body = json!({ "throttle_bytes_per_second": 1_000_000 });
        let request = send(Method::POST, &by_id, body);
        check_on(&app, request, StatusCode::OK, demo(true, 1_000_000)).await;
        let shown = authorized(&format!("/api/v1/jobs/{ID_DEMO}"));
        check_on(&app, shown, StatusCode::OK, demo(true, 1_000_000)).await;
        let db = serde_json::to_value(&two_jobs()[1]).unwrap();
        check_on(
            &app,
            authorized(&format!("/api/v1/jobs/{ID_DB}")),
            StatusCode::OK,
            db,
        )
        .await;
    }

    #[tokio::test]
    async fn link_changes_that_name_nothing_are_refused() {
        let link = "/api/v1/jobs/demo/link";
        let json = Some("application/json");
        let nothing = error("a link change needs `paused` or `throttle_bytes_per_second`");
        let invalid = |message: &str| error(&format!("invalid request body: {message}"));
        for (path, body, status, expected) in [
            (link, "{}", StatusCode::BAD_REQUEST, nothing.clone()),
            (
                link,
                r#"{"paused":null,"throttle_bytes_per_second":null}"#,
                StatusCode::BAD_REQUEST,
                nothing,
            ),
            (
                link,
                "",
                StatusCode::BAD_REQUEST,
                invalid("EOF while parsing a value at line 1 column 0"),
            ),
            (
                link,
                r#"{"pause":true}"#,
                StatusCode::BAD_REQUEST,
                invalid(
                    "unknown field `pause`, expected `paused` or `throttle_bytes_per_second` at \
                     line 1 column 8",
                ),
            ),
            (
                link,
                r#"{"throttle_bytes_per_second":-1}"#,
                StatusCode::BAD_REQUEST,
                invalid("invalid value: integer `-1`, expected u64 at line 1 column 31"),
            ),
            (
                "/api/v1/jobs/nope/link",
                r#"{"paused":true}"#,
                StatusCode::NOT_FOUND,
                error("no such job"),
            ),
        ] {
            let request = with_body(Method::POST, path, json, body);
            check(request, status, expected).await;
        }
    }

    #[tokio::test]
    async fn view_refusals_carry_the_appliances_words() {
        let create = |job: &str, at: &str| {
            send(
                Method::POST,
                "/api/v1/views",
                json!({ "job": job, "at": at }),
            )
        };
        for (job, at, status, message) in [
            ("nope", "latest", StatusCode::NOT_FOUND, "no such job"),
            (
                "demo",
                "tag:weekly",
                StatusCode::NOT_FOUND,
                "no checkpoint matches \"tag:weekly\"",
            ),
            (
                "demo",
                "yesterday",
                StatusCode::BAD_REQUEST,
                "\"yesterday\" is not a point",
            ),
            (
                "demo",
                "seq:5",
                StatusCode::CONFLICT,
                "seq 5 is no longer in the history",
            ),
            (
                "demo",
                "seq:5000",
                StatusCode::CONFLICT,
                "seq 5000 is not applied yet",
            ),
        ] {
            check(create(job, at), status, error(message)).await;
        }
    }

    #[tokio::test]
    async fn bad_bodies_are_json_errors() {
        let checkpoints = "/api/v1/jobs/demo/checkpoints";
        let views = "/api/v1/views";
        let json = Some("application/json");
        let invalid = |message: &str| error(&format!("invalid request body: {message}"));
        let not_json = error("the request body must be json (content-type: application/json)");
        let too_large = error("the request body is larger than 65536 bytes");
        let view = r#"{"job":"demo","at":"latest"}"#;
        for (path, content_type, body, status, expected) in [
            (
                checkpoints,
                json,
                "{",
                StatusCode::BAD_REQUEST,
                invalid("EOF while parsing an object at line 1 column 1"),
            ),
            (
                checkpoints,
                json,
                "",
                StatusCode::BAD_REQUEST,
                invalid("EOF while parsing a value at line 1 column 0"),
            ),
            (
                checkpoints,
                json,
                "{}",
                StatusCode::BAD_REQUEST,
                invalid("missing field `tags` at line 1 column 2"),
            ),
            (
                checkpoints,
                json,
                r#"{"tags":"x"}"#,
                StatusCode::BAD_REQUEST,
                invalid("invalid type: string \"x\", expected a sequence at line 1 column 11"),
            ),
            // A misspelt option is refused, not ignored.
            (
                checkpoints,
                json,
                r#"{"tags":["x"],"app_consistant":true}"#,
                StatusCode::BAD_REQUEST,
                invalid(
                    "unknown field `app_consistant`, expected `tags` or `app_consistent` at \
                     line 1 column 30",
                ),
            ),
            (
                views,
                json,
                r#"{"job":"demo","at":"latest","writeable":true}"#,
                StatusCode::BAD_REQUEST,
                invalid(
                    "unknown field `writeable`, expected one of `job`, `at`, `writable` at \
                     line 1 column 39",
                ),
            ),
            (
                views,
                None,
                view,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                not_json.clone(),
            ),
            (
                views,
                Some("application/x-www-form-urlencoded"),
                view,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                not_json,
            ),
        ] {
            let request = with_body(Method::POST, path, content_type, body);
            check(request, status, expected).await;
        }

        // The bound is on bytes, whatever they hold: exactly the limit is read, one more
        // is not.
        let padded = format!("{view}{}", " ".repeat(REQUEST_BODY_BYTES_MAX - view.len()));
        let request = with_body(Method::POST, views, json, &padded);
        let created = serde_json::to_value(
            FakeControl::new(two_jobs())
                .create_view(CreateView {
                    job: "demo".to_owned(),
                    at: "latest".to_owned(),
                    writable: false,
                })
                .unwrap(),
        )
        .unwrap();
        check(request, StatusCode::CREATED, created).await;
        let request = with_body(Method::POST, views, json, &format!("{padded} "));
        check(request, StatusCode::PAYLOAD_TOO_LARGE, too_large).await;
    }

    #[test]
    fn json_content_types_are_recognised() {
        let check = |value: &str, expected: bool| {
            let header = HeaderValue::from_str(value).unwrap();
            assert_eq!(is_json(Some(&header)), expected, "{value:?}");
        };
        check("application/json", true);
        check("Application/JSON; charset=utf-8", true);
        check("application/vnd.cdp+json", true);
        check("application/jsonx", false);
        check("text/json", false);
        check("application/x-www-form-urlencoded", false);
        check("json", false);
        check("", false);
        assert!(!is_json(None));
    }

    #[tokio::test]
    async fn other_methods_on_the_new_paths_are_405() {
        for (method, path) in [
            (Method::PUT, "/api/v1/jobs/demo/checkpoints"),
            (Method::DELETE, "/api/v1/jobs/demo/checkpoints"),
            (Method::POST, "/api/v1/jobs/demo"),
            (Method::PUT, "/api/v1/views"),
            (Method::DELETE, "/api/v1/views"),
            (Method::GET, "/api/v1/views/1"),
            (Method::POST, "/api/v1/views/1"),
            (Method::GET, "/api/v1/jobs/demo/link"),
            (Method::PUT, "/api/v1/jobs/demo/link"),
            (Method::DELETE, "/api/v1/jobs/demo/link"),
        ] {
            let expected = error("method not allowed");
            check(bare(method, path), StatusCode::METHOD_NOT_ALLOWED, expected).await;
        }
        // A segment that does not decode to UTF-8 names nothing, in JSON too.
        for path in [
            "/api/v1/views/1/x",
            "/api/v1/jobs/demo/checkpoints/1",
            "/api/v1/jobs/demo/link/x",
            "/api/v1/jobs/%FF/checkpoints",
            "/api/v1/jobs/%FF",
        ] {
            check(authorized(path), StatusCode::NOT_FOUND, error("not found")).await;
        }
    }

    /// An appliance that implements only what the first API version needed.
    #[derive(Debug)]
    struct JobsOnly;

    impl Control for JobsOnly {
        fn jobs(&self) -> Vec<JobStatus> {
            two_jobs()
        }
    }

    #[tokio::test]
    async fn an_appliance_without_checkpoints_views_or_links_says_so() {
        let app = app_with(Arc::new(JobsOnly));
        let checkpoints = "/api/v1/jobs/demo/checkpoints";
        let no_checkpoints = error("this appliance does not support checkpoints");
        let no_views = error("this appliance does not support recovery views");
        for (request, status, expected) in [
            (
                authorized(checkpoints),
                StatusCode::NOT_FOUND,
                no_checkpoints.clone(),
            ),
            (
                send(Method::POST, checkpoints, json!({ "tags": ["x"] })),
                StatusCode::NOT_FOUND,
                no_checkpoints,
            ),
            (
                authorized("/api/v1/views"),
                StatusCode::OK,
                json!({ "views": [] }),
            ),
            (
                send(
                    Method::POST,
                    "/api/v1/views",
                    json!({ "job": "demo", "at": "latest" }),
                ),
                StatusCode::NOT_FOUND,
                no_views.clone(),
            ),
            (
                bare(Method::DELETE, "/api/v1/views/1"),
                StatusCode::NOT_FOUND,
                no_views,
            ),
            (
                send(
                    Method::POST,
                    "/api/v1/jobs/demo/link",
                    json!({ "paused": true }),
                ),
                StatusCode::NOT_FOUND,
                error("this appliance does not support pausing or throttling jobs"),
            ),
        ] {
            check_on(&app, request, status, expected).await;
        }
    }

    /// An appliance whose calls fail inside, time out, or panic.
    #[derive(Debug)]
    struct Broken;

    impl Control for Broken {
        fn jobs(&self) -> Vec<JobStatus> {
            Vec::new()
        }

        fn checkpoints(&self, _job: &str) -> Result<Vec<CheckpointStatus>, ApiError> {
            Err(ApiError::Internal(
                "reading /var/lib/cdp/history: Input/output error (os error 5)".to_owned(),
            ))
        }

        fn create_checkpoint(
            &self,
            _job: &str,
            _request: CreateCheckpoint,
        ) -> BoxFuture<'_, Result<CheckpointStatus, ApiError>> {
            Box::pin(std::future::ready(Err(ApiError::Unavailable(
                "the agent did not answer within 30 s".to_owned(),
            ))))
        }

        fn create_view(&self, _request: CreateView) -> Result<ViewStatus, ApiError> {
            panic!("the view table at /var/lib/cdp/views is poisoned");
        }

        fn set_link(&self, _job: &str, _change: LinkChange) -> Result<JobStatus, ApiError> {
            Err(ApiError::Internal(
                "/var/lib/cdp/jobs/x/control.toml: No space left on device (os error 28)"
                    .to_owned(),
            ))
        }
    }

    #[tokio::test]
    async fn internal_failures_hide_their_details() {
        let app = app_with(Arc::new(Broken));
        let internal = error("internal error");
        let list = authorized("/api/v1/jobs/demo/checkpoints");
        check_on(
            &app,
            list,
            StatusCode::INTERNAL_SERVER_ERROR,
            internal.clone(),
        )
        .await;
        // A panic in the appliance's code is a 500 too, not a dropped connection.
        let create = send(
            Method::POST,
            "/api/v1/views",
            json!({ "job": "demo", "at": "latest" }),
        );
        check_on(&app, create, StatusCode::INTERNAL_SERVER_ERROR, internal).await;
        let checkpoint = send(
            Method::POST,
            "/api/v1/jobs/demo/checkpoints",
            json!({ "tags": ["x"] }),
        );
        let waited = error("the agent did not answer within 30 s");
        check_on(&app, checkpoint, StatusCode::SERVICE_UNAVAILABLE, waited).await;
        let link = send(
            Method::POST,
            "/api/v1/jobs/demo/link",
            json!({ "paused": true }),
        );
        let internal = error("internal error");
        check_on(&app, link, StatusCode::INTERNAL_SERVER_ERROR, internal).await;
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
                "checkpoints",
                "connected",
                "consistent",
                "dirty_bytes",
                "disks",
                "generation",
                "history_oldest_seq",
                "history_oldest_time",
                "id",
                "lag_bytes",
                "lag_records",
                "landing_durable_seq",
                "last_heartbeat_age_seconds",
                "mode",
                "name",
                "paused",
                "resync_done_bytes",
                "resync_total_bytes",
                "rpo_seconds",
                "state",
                "state_reason",
                "throttle_bytes_per_second",
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
        let back: JobStatus = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(&back, job);

        // JSON from an appliance that predates checkpoints, resyncs and link settings
        // still reads.
        let mut older = value;
        for key in [
            "history_oldest_seq",
            "history_oldest_time",
            "checkpoints",
            "consistent",
            "resync_done_bytes",
            "resync_total_bytes",
            "dirty_bytes",
            "paused",
            "throttle_bytes_per_second",
        ] {
            older.as_object_mut().unwrap().remove(key);
        }
        let back: JobStatus = serde_json::from_value(older).unwrap();
        assert_eq!(
            (
                back.history_oldest_seq,
                back.history_oldest_time,
                back.checkpoints,
                back.consistent
            ),
            (None, None, 0, false)
        );
        assert_eq!(
            (
                back.resync_done_bytes,
                back.resync_total_bytes,
                back.dirty_bytes,
                back.paused,
                back.throttle_bytes_per_second
            ),
            (0, 0, 0, false, 0)
        );
    }

    #[test]
    fn link_change_json_carries_only_what_changes() {
        let check = |change: LinkChange, expected: Value| {
            let value = serde_json::to_value(change).unwrap();
            assert_eq!(value, expected, "{change:?}");
            let back: LinkChange = serde_json::from_value(value).unwrap();
            assert_eq!(back, change);
        };
        check(
            LinkChange {
                paused: Some(true),
                throttle_bytes_per_second: None,
            },
            json!({ "paused": true }),
        );
        check(
            LinkChange {
                paused: None,
                throttle_bytes_per_second: Some(0),
            },
            json!({ "throttle_bytes_per_second": 0 }),
        );
        check(LinkChange::default(), json!({}));
        assert!(LinkChange::default().is_empty());
        assert!(!LinkChange {
            throttle_bytes_per_second: Some(0),
            ..LinkChange::default()
        }
        .is_empty());
    }

    #[test]
    fn checkpoint_and_view_json_are_as_documented() {
        assert_eq!(
            serde_json::to_value(&demo_checkpoints()[1]).unwrap(),
            json!({
                "seq": 1100,
                "time": "2025-06-01T11:30:00.250000Z",
                "unix_micros": 1_748_777_400_250_000u64,
                "kind": "tagged",
                "app_consistent": true,
                "tags": ["nightly", "before upgrade"]
            })
        );
        assert_eq!(
            serde_json::to_value(nightly_view()).unwrap(),
            json!({
                "id": 1,
                "job": ID_DEMO,
                "job_name": "demo",
                "seq": 1100,
                "time": "2025-06-01T11:30:00.250000Z",
                "writable": false,
                "exports": [{
                    "disk": "disk0",
                    "export": "view1-disk0",
                    "uri": "nbd://127.0.0.1:10809/view1-disk0",
                    "size_bytes": 268_435_456
                }]
            })
        );
        // In requests, the flags may be left out.
        assert_eq!(
            serde_json::from_value::<CreateCheckpoint>(json!({ "tags": ["a"] })).unwrap(),
            CreateCheckpoint {
                tags: vec!["a".to_owned()],
                app_consistent: false
            }
        );
        assert_eq!(
            serde_json::from_value::<CreateView>(json!({ "job": "db", "at": "seq:77" })).unwrap(),
            CreateView {
                job: "db".to_owned(),
                at: "seq:77".to_owned(),
                writable: false
            }
        );
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
