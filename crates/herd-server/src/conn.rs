//! Accepting connections with bounds on slow and silent clients, and a bounded shutdown.
//!
//! hyper's HTTP/1 server drives each connection. A client gets [`Timeouts::header`] to send a
//! request's head (which also closes a keep-alive connection idle that long), the handlers give
//! it [`Timeouts::body`] to send the body, and a write that makes no progress for
//! [`Timeouts::write_stall`] (a client that stopped reading a stream) closes the connection,
//! which cancels the request's sequences. After the shutdown signal the listener closes, open
//! connections take no new request, and in-flight requests get [`Timeouts::shutdown_grace`] to
//! finish (connections that are idle or still sending a head are not waited for); then every
//! connection left is closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;

/// How long `herd serve` waits on a client, and on itself when stopping.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For a request's head (request line and headers), counted from when the connection waits
    /// for one: a keep-alive connection idle this long is closed.
    pub header: Duration,
    /// For a request's body, after its head.
    pub body: Duration,
    /// For a write to make progress: a client that stops reading is disconnected.
    pub write_stall: Duration,
    /// For in-flight requests to finish after the shutdown signal.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(30),
            body: Duration::from_secs(60),
            write_stall: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, then give the requests in flight
/// (`in_flight()` of them) `timeouts.shutdown_grace` to finish. Returns whether they all
/// finished in time.
pub async fn accept_loop(
    listener: TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()>,
    in_flight: impl Fn() -> usize,
) -> bool {
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteDeadline::new(stream, timeouts.write_stall));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.header)
            .keep_alive(true);
        let conn = builder.serve_connection(io, TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        // Forget connections that ended.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + timeouts.shutdown_grace;
    if in_flight() > 0 {
        tracing::info!(requests = in_flight(), "waiting for in-flight requests");
    }
    // Open connections finish their request and close; idle ones close now.
    let mut closed = std::pin::pin!(graceful.shutdown());
    let mut all_closed = false;
    let finished = loop {
        if in_flight() == 0 {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::select! {
            () = &mut closed, if !all_closed => all_closed = true,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    // The last responses' bytes reach their clients; a connection still sending a head (hyper
    // would wait for its header timeout) is not waited for.
    if !all_closed {
        let flush =
            Duration::from_secs(1).min(deadline - tokio::time::Instant::now().min(deadline));
        let _ = tokio::time::timeout(flush.max(Duration::from_millis(100)), &mut closed).await;
    }
    connections.abort_all();
    finished
}

/// A connection's I/O whose writes fail with `TimedOut` once one has waited `limit` without
/// progress (the client's receive window stayed shut: it stopped reading).
#[derive(Debug)]
pub struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Running while a write waits; reset by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `result` of a write-side poll: progress clears the deadline; waiting starts it, and a
    /// wait past it is an error.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.stalled = None;
            return result;
        }
        let limit = self.limit;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", limit.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A writer into a peer that never reads fails after the limit instead of waiting forever;
    /// one that keeps reading never does.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_cannot_progress_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, Duration::from_secs(5));
        let e = w.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        let (a, mut b) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut sink)
                .await
                .map(|_| sink.len())
        });
        let mut w = WriteDeadline::new(a, Duration::from_secs(5));
        w.write_all(&[1u8; 4096]).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(reader.await.unwrap().unwrap(), 4096);
    }
}
