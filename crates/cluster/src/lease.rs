//! The agent's etcd lease: one lease carries the agent's membership and every instance it
//! owns, as a ZooKeeper session carries ephemeral nodes. If the agent dies, etcd removes
//! them when the lease expires; instances that re-registered with another agent moved to
//! that agent's lease and stay.
//!
//! The lease id is kept in the data directory, so an agent restarted within the TTL takes
//! its lease back and nothing is deleted. Renewals go every third of the TTL; when etcd
//! says the lease is gone (the agent was cut off for longer than the TTL), a new one is
//! granted and its epoch moves, which tells the writer to write its instances again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::conn::Etcd;
use crate::metric as m;

/// The lease as the keeper last knew it.
#[derive(Clone, Debug)]
pub struct LeaseStatus {
    /// The lease id to attach owned keys to.
    pub id: i64,
    /// Moves each time a new lease replaces an expired one.
    pub epoch: u64,
    /// The last renewal etcd confirmed.
    pub renewed_at: Instant,
}

/// The lease could not be obtained.
#[derive(Debug, thiserror::Error)]
#[error("cannot obtain this agent's etcd lease: {0}")]
pub struct LeaseError(pub String);

/// What the keeper writes on the lease besides instances: the agent's membership.
#[derive(Clone, Debug)]
pub struct Membership {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
}

/// Takes the lease kept in `file` back if etcd still has it, or grants a new one, and
/// writes the membership on it. Returns the status and whether the lease was taken back.
pub async fn obtain(
    etcd: &Etcd,
    ttl: Duration,
    file: Option<&PathBuf>,
    membership: &Membership,
) -> Result<(LeaseStatus, bool), LeaseError> {
    let conn = etcd.conn().await.map_err(|e| LeaseError(e.to_string()))?;
    let mut lease = conn.client.lease_client();
    let saved = file.and_then(|f| std::fs::read_to_string(f).ok());
    let mut kept = None;
    if let Some(id) = saved.and_then(|s| s.trim().parse::<i64>().ok()) {
        match lease.time_to_live(id, None).await {
            Ok(r) if r.ttl() > 0 => kept = Some(id),
            Ok(_) => tracing::info!(lease = id, "the lease of the last run expired"),
            Err(e) => return Err(LeaseError(format!("asking etcd about lease {id}: {e}"))),
        }
    }
    let reused = kept.is_some();
    let id = match kept {
        Some(id) => id,
        None => grant(etcd, ttl, file).await?,
    };
    put_membership(etcd, id, membership).await?;
    Ok((
        LeaseStatus {
            id,
            epoch: 0,
            renewed_at: Instant::now(),
        },
        reused,
    ))
}

async fn grant(etcd: &Etcd, ttl: Duration, file: Option<&PathBuf>) -> Result<i64, LeaseError> {
    let conn = etcd.conn().await.map_err(|e| LeaseError(e.to_string()))?;
    let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
    let granted = conn
        .client
        .lease_client()
        .grant(secs, None)
        .await
        .map_err(|e| {
            etcd.fail(conn.generation, "lease grant failed");
            LeaseError(format!("granting a lease: {e}"))
        })?;
    let id = granted.id();
    if let Some(f) = file {
        // Written before anything is attached to it, so a crash cannot orphan keys.
        let tmp = f.with_extension("tmp");
        let written =
            std::fs::write(&tmp, format!("{id}\n")).and_then(|()| std::fs::rename(&tmp, f));
        if let Err(e) = written {
            return Err(LeaseError(format!(
                "cannot keep the lease id in {}: {e}",
                f.display()
            )));
        }
    }
    metrics::counter!(m::LEASE_GRANTS).increment(1);
    tracing::info!(lease = id, ttl_s = secs, "granted this agent's etcd lease");
    Ok(id)
}

async fn put_membership(etcd: &Etcd, id: i64, membership: &Membership) -> Result<(), LeaseError> {
    let conn = etcd.conn().await.map_err(|e| LeaseError(e.to_string()))?;
    conn.client
        .kv_client()
        .put(
            membership.key.clone(),
            membership.value.clone(),
            Some(PutOptions::new().with_lease(id)),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            etcd.fail(conn.generation, "membership write failed");
            LeaseError(format!("writing this agent's membership: {e}"))
        })
}

/// Renews the lease every third of `ttl` until `shutdown`, reconnecting to other members as
/// needed; replaces it when etcd says it expired. Publishes every confirmed renewal.
pub async fn keep(
    etcd: Arc<Etcd>,
    ttl: Duration,
    file: Option<PathBuf>,
    membership: Membership,
    status: watch::Sender<LeaseStatus>,
    shutdown: CancellationToken,
) {
    let every = (ttl / 3).max(Duration::from_millis(500));
    let mut stream = None;
    loop {
        let wait = if stream.is_some() {
            every
        } else {
            Duration::from_millis(500)
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        let id = status.borrow().id;
        if stream.is_none() {
            let conn = match etcd.conn().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the etcd lease");
                    continue;
                }
            };
            // After a failure, first ask whether the lease outlived it: renewing a lease
            // etcd no longer has is an error, not an answer.
            let left = tokio::time::timeout(
                etcd.settings().timeout,
                conn.client.lease_client().time_to_live(id, None),
            )
            .await;
            match left {
                Ok(Ok(r)) if r.ttl() > 0 => {}
                Ok(Ok(_)) => {
                    replace(&etcd, ttl, file.as_ref(), &membership, &status, id).await;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot ask etcd about this agent's lease");
                    etcd.fail(conn.generation, "lease query failed");
                    continue;
                }
                Err(_) => {
                    etcd.fail(conn.generation, "lease query timed out");
                    continue;
                }
            }
            match conn.client.lease_client().keep_alive(id).await {
                Ok(s) => stream = Some((s, conn.generation)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start renewing the etcd lease");
                    etcd.fail(conn.generation, "lease keep-alive failed");
                    continue;
                }
            }
        }
        let Some(((keeper, answers), generation)) = stream.as_mut() else {
            continue;
        };
        let generation = *generation;
        let timeout = etcd.settings().timeout;
        let renewed = tokio::time::timeout(timeout, async {
            keeper.keep_alive().await?;
            answers.message().await
        })
        .await;
        match renewed {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                metrics::counter!(m::LEASE_RENEWALS).increment(1);
                status.send_modify(|s| s.renewed_at = Instant::now());
            }
            Ok(Ok(Some(_))) => {
                stream = None;
                replace(&etcd, ttl, file.as_ref(), &membership, &status, id).await;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                stream = None;
                etcd.fail(generation, "lease renewal failed");
            }
        }
    }
}

/// Replaces an expired lease: grants a new one, writes the membership on it, and moves the
/// epoch so the writer puts this agent's instances on it.
async fn replace(
    etcd: &Etcd,
    ttl: Duration,
    file: Option<&PathBuf>,
    membership: &Membership,
    status: &watch::Sender<LeaseStatus>,
    old: i64,
) {
    tracing::warn!(
        lease = old,
        "this agent's etcd lease expired (cut off for longer than its TTL); granting a new \
         one and writing its instances again"
    );
    metrics::counter!(m::LEASE_EXPIRIES).increment(1);
    match grant(etcd, ttl, file).await {
        Ok(new) => {
            if let Err(e) = put_membership(etcd, new, membership).await {
                tracing::warn!("{e}");
            }
            status.send_modify(|s| {
                s.id = new;
                s.epoch += 1;
                s.renewed_at = Instant::now();
            });
        }
        Err(e) => tracing::warn!("{e}"),
    }
}
