//! The leader's `coordination.k8s.io` Lease (`tandem-leader`), for control planes on a cluster:
//! one attempt at a time to take or renew it, each a read and a write that the API server
//! accepts only if nobody wrote the Lease in between (its `resourceVersion`), as client-go's
//! leader election does.
//!
//! A Lease's `renewTime` is written by its holder's clock, which another machine cannot trust.
//! So expiry is judged by this control plane's own monotonic clock: a Lease whose record has not
//! changed for its `leaseDurationSeconds`, since this control plane first saw that record, has
//! lapsed and may be taken. The holder itself stops acting earlier than that (the control
//! plane's leader module counts its validity from before each renewal, less a margin).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;

use crate::objects::MANAGED_BY;

/// The Lease's name.
pub const LEASE_NAME: &str = "tandem-leader";

/// The annotation holding the holder's API address (followers forward to it).
pub const ADDRESS: &str = "tandem.dev/address";

/// Who holds the Lease after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's id (`holderIdentity`).
    pub id: String,
    /// Where its API listens.
    pub address: String,
    /// The term: `leaseTransitions` + 1, growing with every new holder.
    pub term: i64,
}

/// The Lease, and what this control plane has seen of it.
pub struct KubeLease {
    api: Api<Lease>,
    /// The record last seen (its `resourceVersion`) and when it was first seen.
    seen: Mutex<Option<(String, Instant)>>,
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or could not be reached.
    #[error("the leader's Lease: {0}")]
    Api(#[from] kube::Error),
    /// A Lease of that name exists and is not Tandem's: it is left alone.
    #[error("a Lease named {LEASE_NAME} exists and is not Tandem's (no label {}={}); rename or remove it", MANAGED_BY.0, MANAGED_BY.1)]
    NotOurs,
}

impl KubeLease {
    /// The Lease [`LEASE_NAME`] in `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            seen: Mutex::new(None),
        }
    }

    /// One attempt to take or renew the Lease for `id` (whose API is at `address`), which lasts
    /// `ttl` unrenewed; who holds it afterwards. Losing a race to another writer is not an
    /// error: the other one holds it.
    pub async fn attempt(
        &self,
        id: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<Holder, LeaseError> {
        let now = Instant::now();
        let Some(current) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = lease(id, address, ttl, 0, None);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => Ok(self.holder_of(&created, now)),
                Err(e) if conflict(&e) => self.reread(now).await,
                Err(e) => Err(e.into()),
            };
        };
        if !crate::objects::owned(&current) {
            return Err(LeaseError::NotOurs);
        }
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let rv = current.resource_version().unwrap_or_default();
        let unchanged_since = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            match &*seen {
                Some((v, since)) if *v == rv => *since,
                _ => {
                    *seen = Some((rv.clone(), now));
                    now
                }
            }
        };
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        let lapsed = holder.is_empty() || now.duration_since(unchanged_since) >= duration;
        if holder != id && !lapsed {
            return Ok(self.holder_of(&current, now));
        }
        let (transitions, acquired) = if holder == id {
            (transitions, spec.acquire_time.clone())
        } else {
            (transitions + 1, None)
        };
        let mut next = lease(id, address, ttl, transitions, acquired);
        next.metadata.resource_version = Some(rv);
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &next)
            .await
        {
            Ok(written) => Ok(self.holder_of(&written, now)),
            Err(e) if conflict(&e) => self.reread(now).await,
            Err(e) => Err(e.into()),
        }
    }

    /// After a lost race: whoever wrote the Lease holds it.
    async fn reread(&self, now: Instant) -> Result<Holder, LeaseError> {
        let lease = self.api.get(LEASE_NAME).await?;
        Ok(self.holder_of(&lease, now))
    }

    /// The holder a Lease names, and the record noted as seen now.
    fn holder_of(&self, lease: &Lease, now: Instant) -> Holder {
        let rv = lease.resource_version().unwrap_or_default();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.as_ref().is_none_or(|(v, _)| *v != rv) {
                *seen = Some((rv, now));
            }
        }
        let spec = lease.spec.clone().unwrap_or_default();
        Holder {
            id: spec.holder_identity.unwrap_or_default(),
            address: lease
                .annotations()
                .get(ADDRESS)
                .cloned()
                .unwrap_or_default(),
            term: i64::from(spec.lease_transitions.unwrap_or(0)) + 1,
        }
    }
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The Lease as `id` writes it.
fn lease(
    id: &str,
    address: &str,
    ttl: Duration,
    transitions: i32,
    acquired: Option<MicroTime>,
) -> Lease {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let mut lease = Lease::default();
    lease.metadata.name = Some(LEASE_NAME.into());
    lease.metadata.labels = Some(BTreeMap::from([(
        MANAGED_BY.0.to_string(),
        MANAGED_BY.1.to_string(),
    )]));
    lease.metadata.annotations = Some(BTreeMap::from([(ADDRESS.to_string(), address.to_string())]));
    lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
        holder_identity: Some(id.into()),
        lease_duration_seconds: Some(i32::try_from(ttl.as_secs().max(1)).unwrap_or(i32::MAX)),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..Default::default()
    });
    lease
}
