//! The appliance's side of a replication connection: a thin driver around the sans-IO
//! [`Lander`]. Each bidirectional stream an agent opens carries one job: the driver reads the
//! hello, finds or creates the job, then appends every record the lander verified to the
//! landing journal, syncs it (group commit: one fdatasync covers every batch appended while
//! the previous one ran) and lets the lander acknowledge what is durable.
//!
//! Must never: append a record the lander did not verify, acknowledge a seq the landing
//! journal has not made durable, or let two streams land one job at once (a newer stream from
//! the job's agent takes the job over; the older one stops first).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use journal::record::decode_header;
use journal::ship::{JobInfo, LandError, Lander, LandingState};
use journal::wire::{Frame, Refuse, RefuseCode};
use journal::{Seq, SyncError};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use transport::{Connection, FrameError, FrameReceiver, FrameSender, RecvStream, SendStream};

use crate::jobs::{Job, JobError, JobMeta, Jobs};

/// How long an agent has to send its hello after opening a stream.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Checkpoint requests waiting for the stream to send them, at most.
pub const CHECKPOINT_REQUESTS_MAX: usize = 16;
/// How long a new connection waits for the one it takes a job over from to stop.
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a stream ended other than by the agent finishing it.
#[derive(Debug, Error)]
pub enum LandingError {
    /// Moving frames failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The agent broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] LandError),
    /// The first frame was not a hello, or it did not come in time.
    #[error("expected a hello first")]
    NoHello,
    /// The job was refused.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Why.
        code: RefuseCode,
        /// The message sent to the agent.
        message: String,
    },
    /// The job's files failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The landing journal failed (it is poisoned until the appliance restarts).
    #[error("landing journal: {0}")]
    Landing(String),
}

/// Serves every stream of one agent's connection until it closes or `stop` fires.
pub async fn serve_connection(
    connection: Connection,
    jobs: Arc<Jobs>,
    stop: watch::Receiver<bool>,
) {
    let agent = connection.peer_name().as_str().to_owned();
    let remote = connection.remote_address();
    tracing::info!(%agent, %remote, "agent connected");
    let mut streams = tokio::task::JoinSet::new();
    let mut stop_conn = stop.clone();
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let (jobs, agent, stop) = (Arc::clone(&jobs), agent.clone(), stop.clone());
                    streams.spawn(async move {
                        if let Err(e) = serve_stream(send, recv, &agent, &jobs, stop).await {
                            tracing::warn!(%agent, error = %e, "replication stream ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::info!(%agent, %remote, reason = %e, "agent disconnected");
                    break;
                }
            },
            _ = stop_conn.changed() => {
                connection.close(transport::CloseCode::Done.code(), b"appliance stopping");
                break;
            }
        }
    }
    while streams.join_next().await.is_some() {}
}

async fn send_all(tx: &mut FrameSender, lander: &mut Lander) -> Result<(), FrameError> {
    while let Some(frame) = lander.poll_transmit() {
        tx.send(&frame).await?;
    }
    Ok(())
}

/// Refuses a hello the lander itself cannot judge (agent ownership, a failed takeover).
async fn refuse(tx: &mut FrameSender, code: RefuseCode, message: String) -> LandingError {
    let _ = tx
        .send(&Frame::Refuse(Refuse {
            code,
            message: message.clone(),
        }))
        .await;
    tx.finish();
    LandingError::Refused { code, message }
}

/// Serves one job's stream: hello, then batches and heartbeats until the agent finishes it.
async fn serve_stream(
    send: SendStream,
    recv: RecvStream,
    agent: &str,
    jobs: &Arc<Jobs>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), LandingError> {
    let mut rx = FrameReceiver::new(recv);
    let mut tx = FrameSender::new(send, None);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, rx.recv()).await {
        Ok(Ok(Some(Frame::Hello(hello)))) => hello,
        Ok(Err(e)) => return Err(e.into()),
        _ => return Err(LandingError::NoHello),
    };

    // An existing job belongs to the agent that created it; a newer stream takes it over.
    let existing = jobs.get(hello.job);
    let mut guard = None;
    if let Some(job) = &existing {
        if job.meta().agent != agent {
            let message = format!(
                "job {} belongs to agent {}, not {agent}",
                hello.job,
                job.meta().agent
            );
            return Err(refuse(&mut tx, RefuseCode::JobMismatch, message).await);
        }
        job.session.send_modify(|s| *s += 1);
        match tokio::time::timeout(TAKEOVER_TIMEOUT, Arc::clone(&job.writer).lock_owned()).await {
            Ok(g) => guard = Some(g),
            Err(_) => {
                let message = "another connection still carries this job".to_owned();
                return Err(refuse(&mut tx, RefuseCode::Busy, message).await);
            }
        }
    }
    let state = match &existing {
        Some(job) => LandingState {
            job: Some(job.meta().info.clone()),
            head: job.landing.head_seq(),
            durable: job.landing.durable_seq(),
            applied: job.applied(),
        },
        None => LandingState {
            job: None,
            head: Seq::NONE,
            durable: Seq::NONE,
            applied: Seq::NONE,
        },
    };
    let mut lander = Lander::new(state);
    let info: JobInfo = match lander.handle_hello(&hello) {
        Ok(info) => info,
        Err(refused) => {
            let _ = send_all(&mut tx, &mut lander).await;
            tx.finish();
            if let Some(job) = &existing {
                job.update_link(|l| l.last_error = Some(format!("refused: {}", refused.message)));
            }
            return Err(LandingError::Refused {
                code: refused.code,
                message: refused.message,
            });
        }
    };
    let job = match existing {
        Some(job) => job,
        None => {
            let meta = JobMeta {
                info: info.clone(),
                agent: agent.to_owned(),
            };
            let jobs = Arc::clone(jobs);
            let created = tokio::task::spawn_blocking(move || jobs.get_or_create(meta))
                .await
                .map_err(|e| LandingError::Landing(format!("creating the job: {e}")))?;
            match created {
                Ok(job) => job,
                Err(e) => {
                    let message = format!("creating the job failed: {e}");
                    return Err(refuse(&mut tx, RefuseCode::Internal, message).await);
                }
            }
        }
    };
    let _guard = match guard {
        Some(g) => g,
        None => Arc::clone(&job.writer).lock_owned().await,
    };
    lander.handle_job_known(info);
    let session = *job.session.borrow();
    let mut sessions = job.session.subscribe();
    let (checkpoint_tx, mut checkpoint_rx) = tokio::sync::mpsc::channel(CHECKPOINT_REQUESTS_MAX);
    job.set_checkpoint_channel(Some(checkpoint_tx));
    let (need_tx, mut need_rx) = tokio::sync::mpsc::channel(crate::jobs::RESYNC_NEEDS_QUEUED_MAX);
    job.set_resync_channel(Some(need_tx));
    let mut control = job.control.subscribe();
    lander.send_control(*control.borrow_and_update());
    job.update_link(|l| {
        l.connected = true;
        l.last_error = None;
    });
    tracing::info!(job = %job.id(), name = %job.meta().info.job_name, %agent, landed = %job.landing.durable_seq(), "streaming");

    let signals = Signals {
        sessions: &mut sessions,
        session,
        stop: &mut stop,
        checkpoints: &mut checkpoint_rx,
        needs: &mut need_rx,
        control: &mut control,
    };
    let result = land(&job, &mut lander, &mut rx, &mut tx, signals).await;
    job.set_checkpoint_channel(None);
    job.set_resync_channel(None);
    let corrupt = lander.corrupt_records_total();
    job.update_link(|l| {
        l.connected = false;
        if let Err(e) = &result {
            l.last_error = Some(e.to_string());
        }
    });
    tracing::info!(job = %job.id(), corrupt_records = corrupt, "stream closed");
    result
}

/// The streaming loop of one job.
/// What, besides the agent's frames, a streaming loop listens to.
struct Signals<'a> {
    /// Bumped when a newer connection takes the job over.
    sessions: &'a mut watch::Receiver<u64>,
    /// This stream's session.
    session: u64,
    /// The appliance is stopping.
    stop: &'a mut watch::Receiver<bool>,
    /// Checkpoints operators asked for, to send to the agent.
    checkpoints: &'a mut tokio::sync::mpsc::Receiver<journal::wire::CheckpointRequest>,
    /// The applier's answers to resync hashes records, to send to the agent.
    needs: &'a mut tokio::sync::mpsc::Receiver<journal::wire::ResyncNeed>,
    /// The operator's link settings; every change goes to the agent.
    control: &'a mut watch::Receiver<journal::wire::Control>,
}

async fn land(
    job: &Arc<Job>,
    lander: &mut Lander,
    rx: &mut FrameReceiver,
    tx: &mut FrameSender,
    signals: Signals<'_>,
) -> Result<(), LandingError> {
    let Signals {
        sessions,
        session,
        stop,
        checkpoints,
        needs,
        control,
    } = signals;
    let mut sync_task: Option<JoinHandle<Result<Seq, SyncError>>> = None;
    let mut corrupt_seen = 0;
    loop {
        send_all(tx, lander).await?;
        let corrupt = lander.corrupt_records_total();
        if corrupt > corrupt_seen {
            job.corrupt_records
                .fetch_add(corrupt - corrupt_seen, Ordering::Relaxed);
            tracing::warn!(job = %job.id(), total = corrupt, "refused corrupt records; asked the agent to resend");
            corrupt_seen = corrupt;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => {
                tx.finish();
                return Ok(());
            }
            _ = sessions.changed() => {
                if *sessions.borrow() != session {
                    tracing::info!(job = %job.id(), "a newer connection took the job over");
                    tx.finish();
                    return Ok(());
                }
            }
            synced = async {
                match sync_task.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if sync_task.is_some() => {
                sync_task = None;
                let durable = synced
                    .map_err(|e| LandingError::Landing(format!("sync task failed: {e}")))?
                    .map_err(|e| LandingError::Landing(e.to_string()))?;
                lander.handle_durable(durable);
                job.landed.send_replace(durable);
                if job.landing.head_seq() > durable {
                    sync_task = Some(spawn_sync(job));
                }
            }
            Some(request) = checkpoints.recv() => lander.request_checkpoint(request),
            Some(need) = needs.recv() => lander.send_resync_need(need),
            Ok(()) = control.changed() => lander.send_control(*control.borrow_and_update()),
            frame = rx.recv() => match frame? {
                None => {
                    tx.finish();
                    return Ok(());
                }
                Some(Frame::Batch(batch)) => {
                    let landed = lander.handle_batch(&batch)?;
                    if landed.count > 0 {
                        let worker = Arc::clone(job);
                        let mut records = batch.records;
                        records.truncate(landed.bytes);
                        tokio::task::spawn_blocking(move || append_all(&worker, &records))
                            .await
                            .map_err(|e| LandingError::Landing(format!("append task failed: {e}")))??;
                        job.landed_bytes.fetch_add(landed.bytes as u64, Ordering::Relaxed);
                        if sync_task.is_none() {
                            sync_task = Some(spawn_sync(job));
                        }
                    }
                }
                Some(other) => {
                    let heartbeat = matches!(other, Frame::Heartbeat(_));
                    let status = matches!(other, Frame::AgentStatus(_));
                    lander.handle_frame(other)?;
                    if heartbeat {
                        if let Some(h) = lander.last_heartbeat() {
                            let h = *h;
                            job.update_link(|l| l.heartbeat = Some((h, Instant::now())));
                        }
                    }
                    if status {
                        if let Some(a) = lander.last_status() {
                            let a = a.clone();
                            if job.link().agent_status.as_ref().is_none_or(|old| old.state != a.state) {
                                tracing::info!(job = %job.id(), state = a.state.name(), reason = %a.reason, "agent reports a new job state");
                            }
                            job.update_link(|l| l.agent_status = Some(a));
                        }
                    }
                }
            }
        }
    }
}

fn spawn_sync(job: &Arc<Job>) -> JoinHandle<Result<Seq, SyncError>> {
    let landing = Arc::clone(&job.landing);
    tokio::task::spawn_blocking(move || landing.sync())
}

/// Appends verified records, back to back as shipped, to the landing journal.
fn append_all(job: &Job, records: &[u8]) -> Result<(), LandingError> {
    let mut at = 0;
    while at < records.len() {
        // The lander verified every record in `records`, so each header decodes; a failure
        // here is reported, never skipped.
        let header = decode_header(&records[at..])
            .map_err(|e| LandingError::Landing(format!("re-reading a verified record: {e}")))?;
        let end = at + header.record_bytes();
        let record = records
            .get(at..end)
            .ok_or_else(|| LandingError::Landing("a verified record is cut short".into()))?;
        job.landing
            .append_stored(record)
            .map_err(|e| LandingError::Landing(e.to_string()))?;
        at = end;
    }
    Ok(())
}
