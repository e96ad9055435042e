//! Accept loops: one task per bound listener hands every accepted socket to
//! [`spawn_connection`] until the server stops. Binding stays with the caller, which announces
//! the bound addresses its own way.
//!
//! Must never stop on a failed `accept` (out of file descriptors is temporary), and never
//! remove a socket file other than the one its listener is bound to.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::connection::spawn_connection;
use crate::context::ServerContext;

/// Pause after a failed `accept`, in milliseconds.
const ACCEPT_RETRY_MS: u64 = 100;

/// Accepts NBD connections on `listener` until the server stops (Nagle off: replies are
/// small and latency-bound).
pub async fn serve_tcp(listener: TcpListener, ctx: Arc<ServerContext>) {
    let mut shutdown = ctx.shutdown();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_connection(stream, peer.to_string(), &ctx);
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }
}

/// Accepts NBD connections on `listener`, bound at `path`, until the server stops; then
/// removes the socket file.
pub async fn serve_unix(listener: UnixListener, path: PathBuf, ctx: Arc<ServerContext>) {
    let mut shutdown = ctx.shutdown();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(stream, path.display().to_string(), &ctx),
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

/// Completes once the server is stopping (or its stop signal is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Backs off after a failed accept (for example out of file descriptors).
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
}
