//! Group commit.
//!
//! One task owns the writes to the store. Callers hand it their changes and wait; while
//! a durable commit is in progress, new changes queue up, and the next commit takes all of
//! them (up to `max_batch` writes) in one atomic, durable batch. Under load, thousands of
//! twins share each fsync; when idle, a lone change is committed at once.
//!
//! The queue is bounded: when it is full, `commit` waits, which pushes back on the twins
//! (which in turn reject new requests once their own bounds are reached).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{StoreError, TwinStore, Write};

/// A durable commit slower than this is logged: every change in it waited that long.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);

struct Job {
    writes: Vec<Write>,
    reply: oneshot::Sender<Result<(), Arc<StoreError>>>,
    /// The `traceparent` of the traced work that asked, for the latency's exemplar.
    trace: Option<Arc<str>>,
}

/// Counters of the commit loop.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub batches: AtomicU64,
    pub writes: AtomicU64,
    pub failures: AtomicU64,
}

/// A cloneable handle to the commit loop. The loop ends when the last handle is dropped,
/// after committing what was queued.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
    stats: Arc<CommitStats>,
    store: Arc<dyn TwinStore>,
    reachable: Arc<AtomicBool>,
}

impl Committer {
    /// Starts the commit loop over `store`, on the current tokio runtime. The returned
    /// task ends after the last handle is dropped and the store is flushed.
    pub fn start(
        store: Arc<dyn TwinStore>,
        queue: usize,
        max_batch: usize,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>(queue.max(1));
        let stats = Arc::new(CommitStats::default());
        let reachable = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(commit_loop(
            rx,
            store.clone(),
            stats.clone(),
            reachable.clone(),
            max_batch,
        ));
        let committer = Self {
            tx,
            stats,
            store,
            reachable,
        };
        (committer, task)
    }

    /// False from a commit that found the store unavailable until a commit or a
    /// [`probe`](Self::probe) reaches it again: what `/readyz` reports.
    pub fn store_reachable(&self) -> Arc<AtomicBool> {
        self.reachable.clone()
    }

    /// While the store is unreachable, tries a read every `every` and says when it answers
    /// again (so that readiness comes back on an idle server). Runs until the committer's
    /// last handle is gone.
    pub fn probe(&self, every: std::time::Duration) -> JoinHandle<()> {
        let (store, reachable, tx) = (
            self.store.clone(),
            self.reachable.clone(),
            self.tx.downgrade(),
        );
        tokio::spawn(async move {
            let probe = twin_model::DeviceId::parse("doppel-probe").expect("a valid id");
            while tx.upgrade().is_some() {
                if !reachable.load(Ordering::SeqCst) {
                    match store.thing(&probe).await {
                        Ok(_) => {
                            reachable.store(true, Ordering::SeqCst);
                            tracing::info!("the store answers again");
                        }
                        Err(e) => tracing::debug!(error = %e, "the store is still unavailable"),
                    }
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Commits `writes` atomically; returns once they are durable.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), Arc<StoreError>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                writes,
                reply,
                trace: twin_telemetry::trace::current(),
            })
            .await
            .map_err(|_| Arc::new(StoreError::Closed))?;
        rx.await.map_err(|_| Arc::new(StoreError::Closed))?
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// The store behind the committer, for reads.
    pub fn store(&self) -> &Arc<dyn TwinStore> {
        &self.store
    }
}

/// Takes what waits (up to `max_batch` writes) and commits it as one durable batch; new
/// changes queue up meanwhile.
async fn commit_loop(
    mut rx: mpsc::Receiver<Job>,
    store: Arc<dyn TwinStore>,
    stats: Arc<CommitStats>,
    reachable: Arc<AtomicBool>,
    max_batch: usize,
) {
    let mut replies = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut batch = first.writes;
        let mut trace = first.trace;
        replies.push((first.reply, batch.len()));
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => {
                    batch.extend(job.writes);
                    replies.push((job.reply, batch.len()));
                    trace = trace.or(job.trace);
                }
                Err(_) => break,
            }
        }
        let writes = batch.len();
        crate::telemetry::queued(rx.len());
        let started = std::time::Instant::now();
        let result = store.commit(batch).await.map_err(Arc::new);
        let took = started.elapsed();
        if took >= SLOW_COMMIT {
            tracing::warn!(
                ms = took.as_millis() as u64,
                writes,
                "slow durable commit: every change in it waited"
            );
        }
        crate::telemetry::committed(
            writes,
            took,
            result.as_ref().err().map(|e| e.is_unavailable()),
            trace.as_deref(),
        );
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.writes.fetch_add(writes as u64, Ordering::Relaxed);
        match &result {
            Err(e) if matches!(**e, StoreError::Fenced { .. } | StoreError::FencedSome(_)) => {
                tracing::warn!(error = %e, "changes refused: their twins are held by another node now");
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                if e.is_unavailable() && reachable.swap(false, Ordering::SeqCst) {
                    tracing::error!(error = %e, "the store is unavailable: changes are refused until it is back");
                }
                tracing::error!(error = %e, writes, "commit failed; the changes were refused");
            }
            Ok(()) => {
                if !reachable.swap(true, Ordering::SeqCst) {
                    tracing::info!("the store answers again");
                }
            }
        }
        let mut start = 0;
        for (reply, end) in replies.drain(..) {
            let _ = reply.send(answer(&result, start..end));
            start = end;
        }
    }
    if let Err(e) = store.flush().await {
        tracing::error!(error = %e, "final flush failed");
    }
}

/// The answer to the change whose writes were at `range` of a commit: on a commit that
/// refused some twins' writes, refused when one of them is the change's, else applied.
fn answer(
    result: &Result<(), Arc<StoreError>>,
    range: std::ops::Range<usize>,
) -> Result<(), Arc<StoreError>> {
    let Err(e) = result else {
        return Ok(());
    };
    let StoreError::FencedSome(refused) = &**e else {
        return Err(e.clone());
    };
    match refused
        .iter()
        .find(|r| r.positions.iter().any(|p| range.contains(p)))
    {
        Some(r) => Err(Arc::new(StoreError::Fenced {
            thing: r.thing.clone(),
            reason: r.reason.clone(),
        })),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThingRecord;
    use crate::testing::GatedStore;
    use twin_model::DeviceId;

    fn write(i: usize) -> Write {
        Write::Thing(ThingRecord {
            id: DeviceId::parse(&format!("t{i}")).unwrap(),
            secret_hash: String::new(),
            enabled: true,
            created_at: 0,
            attributes: Default::default(),
            certificates: Vec::new(),
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiting_changes_share_one_commit() {
        let store = Arc::new(GatedStore::default());
        let (committer, task) = Committer::start(store.clone(), 1024, 10_000);
        let mut waiting = Vec::new();
        for i in 0..50 {
            let c = committer.clone();
            waiting.push(tokio::spawn(async move { c.commit(vec![write(i)]).await }));
        }
        // On a current-thread runtime one yield polls every spawned task once, and each
        // send completes on its first poll: all 50 changes are queued (or taken by the
        // blocked first commit) before that commit is released.
        tokio::task::yield_now().await;
        store.released.store(true, Ordering::SeqCst);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        let batches = store.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 50);
        assert!(
            batches.len() <= 2,
            "50 waiting changes took {} commits",
            batches.len()
        );
        drop(committer);
        task.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_commit_that_refused_some_twins_answers_each_change_for_its_own() {
        let store = Arc::new(GatedStore::default());
        *store.fenced.lock().unwrap() = vec![
            DeviceId::parse("t3").unwrap(),
            DeviceId::parse("t7").unwrap(),
        ];
        let (committer, task) = Committer::start(store.clone(), 1024, 10_000);
        let mut waiting = Vec::new();
        for i in 0..10 {
            let c = committer.clone();
            let writes = vec![write(i), write(i)];
            waiting.push(tokio::spawn(async move { c.commit(writes).await }));
        }
        tokio::task::yield_now().await;
        store.released.store(true, Ordering::SeqCst);
        for (i, w) in waiting.into_iter().enumerate() {
            match (i, w.await.unwrap()) {
                (3 | 7, Err(e)) => assert!(
                    matches!(&*e, StoreError::Fenced { thing, .. } if *thing == format!("t{i}")),
                    "t{i}: {e}"
                ),
                (_, result) => assert!(result.is_ok(), "t{i}: {result:?}"),
            }
        }
        assert!(store.batches.lock().unwrap().len() <= 2);
        drop(committer);
        task.await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_commit_is_reported_to_every_waiter() {
        let store = Arc::new(GatedStore::default());
        store.released.store(true, Ordering::SeqCst);
        store.fail.store(true, Ordering::SeqCst);
        let (committer, _task) = Committer::start(store, 16, 100);
        let err = committer.commit(vec![write(1)]).await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"));
        assert_eq!(committer.stats().failures.load(Ordering::Relaxed), 1);
    }
}
