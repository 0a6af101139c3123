//! Free requests' usage rows, sent to the ledger in groups (issue 16): rows that are ready at the
//! same moment go out as one `RecordUsageBatch` call instead of one `RecordUsage` call each, so a
//! busy free service pays one RPC per group. Each caller still waits until the ledger answered for
//! its row (the ledger answers after the row's batch committed), so a free answer is released only
//! after its row is durable, as before.
//!
//! One call is out at a time ([`IN_FLIGHT`]): rows that arrive meanwhile wait and leave together
//! in the next call, as a database's group commit does, so under load the groups grow with the
//! arrival rate instead of every few rows paying a call, a ledger batch and a commit of their own.
//! A group waits for the call out at most [`MAX_WAIT`], then goes out anyway in a call of its
//! own, so a slow ledger gets more calls at once, and one that hangs holds rows back by one call
//! timeout, never by a queue of them. When no call is out (light load) a row leaves at once; a
//! lone row goes out alone (plain `RecordUsage`). A ledger without the batch call
//! (`UNIMPLEMENTED`) or a group with an invalid row (`INVALID_ARGUMENT`) is sent again row by row,
//! so each row gets its own answer.

use std::sync::Arc;
use std::time::Duration;
use syft_proto::ledger::{RecordUsageBatchRequest, RecordUsageRequest, Usage};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Code;

use crate::error::RouterError;
use crate::ledger::{map_status, rpc, Calls, Op};

/// Rows per call: the ledger accepts up to 1,000 (`MAX_USAGE_BATCH`).
const MAX_ROWS: usize = 256;

/// Calls out at once before rows start waiting for one. A free router over `wrk` c=32
/// (docs/benchmarks.md): 7.1 – 7.4k req/s with every group sent at once, 8.7 – 9.2k with two out
/// at a time, 9.9 – 11.4k with one.
const IN_FLIGHT: usize = 1;

/// The longest a group waits for the call out to come back. A healthy ledger answers a group in
/// 1 – 2 ms; past this the ledger is slow or gone, and waiting longer would only add a call's
/// timeout to every row behind it.
const MAX_WAIT: Duration = Duration::from_millis(5);

type Reply = oneshot::Sender<Result<(), RouterError>>;

async fn one(calls: &Calls, usage: Usage) -> Result<(), RouterError> {
    let msg = RecordUsageRequest { usage: Some(usage) };
    calls
        .call(Op::RecordUsage, None, msg, rpc!(record_usage))
        .await
        .map(|_| ())
        .map_err(|s| map_status(Op::RecordUsage, s))
}

/// The queue of rows to send; cheap to clone.
#[derive(Clone)]
pub(crate) struct UsageSender {
    queue: mpsc::UnboundedSender<(Usage, Reply)>,
}

impl UsageSender {
    /// Starts the sender task. Must run inside a Tokio runtime.
    pub(crate) fn start(calls: Calls) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(group(calls, rx));
        Self { queue }
    }

    /// Sends one row; returns once the ledger answered for it.
    pub(crate) async fn send(&self, usage: Usage) -> Result<(), RouterError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((usage, tx))
            .map_err(|_| RouterError::Internal("usage sender stopped".into()))?;
        rx.await
            .map_err(|_| RouterError::Internal("usage sender stopped".into()))?
    }
}

async fn group(calls: Calls, mut rx: mpsc::UnboundedReceiver<(Usage, Reply)>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Rows that arrive while the calls are out wait here and leave together; `None`: the
        // ledger is slow to answer, so this group goes out without waiting any longer.
        let permit = tokio::time::timeout(MAX_WAIT, in_flight.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let mut rows = vec![first];
        while rows.len() < MAX_ROWS {
            let Ok(row) = rx.try_recv() else { break };
            rows.push(row);
        }
        let calls = calls.clone();
        tokio::spawn(async move {
            send(calls, rows).await;
            drop(permit);
        });
    }
}

async fn send(calls: Calls, rows: Vec<(Usage, Reply)>) {
    if rows.len() > 1 {
        let usages = rows.iter().map(|(u, _)| u.clone()).collect();
        let msg = RecordUsageBatchRequest { usages };
        let sent = calls
            .call(Op::RecordUsage, None, msg, rpc!(record_usage_batch))
            .await;
        match sent {
            Ok(_) => {
                for (_, tx) in rows {
                    let _ = tx.send(Ok(()));
                }
                return;
            }
            Err(s) if matches!(s.code(), Code::Unimplemented | Code::InvalidArgument) => {
                tracing::debug!(code = ?s.code(), "usage group refused, sending its rows one by one");
            }
            Err(s) => {
                for (_, tx) in rows {
                    let _ = tx.send(Err(map_status(Op::RecordUsage, s.clone())));
                }
                return;
            }
        }
    }
    let sends = rows.into_iter().map(|(usage, tx)| {
        let calls = calls.clone();
        async move {
            let _ = tx.send(one(&calls, usage).await);
        }
    });
    futures::future::join_all(sends).await;
}
