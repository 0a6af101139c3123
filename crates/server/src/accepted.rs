//! An accepted connection as both listeners serve it: it holds its slot under the listener's
//! connection cap until it closes, and its first bytes have a deadline. hyper starts its own
//! timers only once it knows the protocol: an HTTP listener reads up to 24 bytes to tell HTTP/1 from HTTP/2, and an HTTP/2
//! server waits for the client's 24-byte preface, both without a timer. A connection that
//! opened and then sent nothing (or half a preface) held its slot under the connection cap for
//! ever, so 4,096 silent sockets locked a listener.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// The connection cap of one listener: a slot is taken before each `accept`, so a listener at
/// its cap stops accepting and new connections wait in the kernel's backlog.
pub(crate) struct Slots {
    free: Arc<Semaphore>,
    max: usize,
    listener: &'static str,
    warned: Option<Instant>,
}

impl Slots {
    pub(crate) fn new(max: usize, listener: &'static str) -> Self {
        Slots {
            free: Arc::new(Semaphore::new(max.max(1))),
            max,
            listener,
            warned: None,
        }
    }

    /// A free slot, once there is one (`None` never happens: the semaphore is never closed).
    pub(crate) async fn take(&mut self) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.free.clone().try_acquire_owned() {
            return Some(slot);
        }
        // Once a minute at most: a listener held at its cap would log every connection.
        if self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            self.warned = Some(Instant::now());
            tracing::warn!(
                listener = self.listener,
                max_connections = self.max,
                "connection limit reached: new connections wait until one closes"
            );
        }
        self.free.clone().acquire_owned().await.ok()
    }
}

/// HTTP/2's client preface: once this much arrived, hyper's own timers (HTTP/1 head timeout,
/// HTTP/2 pings) have taken over.
const OPENING_BYTES: usize = 24;

/// `io` holding its slot, whose reads fail with `TimedOut` if its first [`OPENING_BYTES`] have
/// not arrived within the given time of its acceptance; afterwards a plain pass-through.
pub struct Accepted<IO> {
    io: IO,
    left: usize,
    deadline: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Accepted<IO> {
    pub(crate) fn new(io: IO, slot: OwnedSemaphorePermit, within: Duration) -> Self {
        Accepted {
            io,
            left: OPENING_BYTES,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            _slot: slot,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Accepted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = &mut this.deadline else {
            return polled;
        };
        match &polled {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                this.left = this.left.saturating_sub(read);
                // Enough to go on, or the end of the stream: the deadline has done its work.
                if this.left == 0 || read == 0 {
                    this.deadline = None;
                }
            }
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the connection sent no request in time",
                    )));
                }
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Accepted<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
