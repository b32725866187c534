//! Leader election for the controllers and the scheduler when several API servers (or several
//! `weft controllers`) serve one cluster: whoever holds a `coordination.k8s.io/v1` Lease runs
//! them, the others wait, as kube-controller-manager and kube-scheduler elect their leader
//! (`--leader-elect`, Lease `kube-system/weft-controllers` by default).
//!
//! The rules are client-go's `leaderelection`: a candidate takes the Lease when nobody holds it
//! or when the holder has not renewed it for `leaseDurationSeconds` — measured on the
//! candidate's own monotonic clock from when it last *saw the record change*, so clocks that
//! disagree between machines do not matter —, and the holder renews it every retry period.
//! Every write names the resourceVersion it read, so two candidates cannot both take it. A
//! holder that cannot renew within the renew deadline stops leading before its Lease can
//! expire for the others (the deadline is shorter than the duration), and a holder that stops
//! gives the Lease up, so a successor need not wait.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::time::Instant;

/// Election settings (kube-controller-manager's `--leader-elect-*` flags).
#[derive(Clone, Debug)]
pub struct Election {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// Who this candidate is (kept in `holderIdentity`).
    pub identity: String,
    /// How long a Lease not renewed keeps the others waiting.
    pub lease_duration: Duration,
    /// How long the leader goes on trying to renew before it stops leading.
    pub renew_deadline: Duration,
    /// How often candidates try to take the Lease and the leader renews it.
    pub retry_period: Duration,
}

impl Election {
    /// kube-controller-manager's defaults (15 s, 10 s, 2 s) for the Lease `name` in
    /// `kube-system`, with a fresh identity: `<host>_<pid>_<random>` (client-go's
    /// `<host>_<uuid>`, with the process named so that an operator can tell which of several
    /// servers on one host leads).
    pub fn new(name: &str) -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "weft".to_owned());
        Self {
            namespace: "kube-system".to_owned(),
            name: name.to_owned(),
            identity: format!(
                "{host}_{}_{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate last saw of the Lease, and when (on its own clock).
#[derive(Default)]
struct Observed {
    record: Option<(String, String)>,
    at: Option<Instant>,
}

impl Observed {
    /// Notes the Lease as read now; returns whether its holder's time is up.
    fn expired(&mut self, lease: &Lease, duration: Duration) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (
            spec.holder_identity.clone().unwrap_or_default(),
            format!("{:?}", spec.renew_time),
        );
        let now = Instant::now();
        if self.record.as_ref() != Some(&record) {
            self.record = Some(record);
            self.at = Some(now);
        }
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(duration, Duration::from_secs);
        spec.holder_identity.as_deref().is_none_or(str::is_empty)
            || self.at.is_some_and(|at| now.duration_since(at) >= duration)
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Takes or renews the Lease; says whether this candidate holds it now.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    election: &Election,
    observed: &mut Observed,
) -> kube::Result<bool> {
    let seconds = i32::try_from(election.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&election.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(election.name.clone()),
                namespace: Some(election.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(election.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(election.identity.as_str());
    if !mine && !observed.expired(&lease, election.lease_duration) {
        return Ok(false);
    }
    let spec = lease.spec.get_or_insert_with(Default::default);
    if !mine {
        spec.holder_identity = Some(election.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(now());
    // The write names the resourceVersion read: a candidate that took it meanwhile wins.
    match api
        .replace(&election.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (empty holder), so that a successor takes it at once.
async fn release(api: &Api<Lease>, election: &Election) {
    let Ok(Some(mut lease)) = api.get_opt(&election.name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now());
    if let Err(e) = api
        .replace(&election.name, &PostParams::default(), &lease)
        .await
    {
        tracing::warn!(error = %e, lease = election.name, "releasing the leader Lease");
    }
}

/// Runs `work()` whenever this candidate leads, for ever: campaigns until it holds the Lease,
/// runs the work while renewing it, stops the work (drops its future) when a renewal has not
/// succeeded for the renew deadline, and campaigns again. `stop` ends it all and releases the
/// Lease.
pub async fn run<F, Fut>(
    client: Client,
    election: Election,
    mut work: F,
    stop: impl Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &election.namespace);
    let mut observed = Observed::default();
    tokio::pin!(stop);
    loop {
        // Campaign.
        loop {
            match try_acquire_or_renew(&api, &election, &mut observed).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "taking the leader Lease"),
            }
            tokio::select! {
                () = tokio::time::sleep(election.retry_period) => {}
                () = &mut stop => return,
            }
        }
        tracing::info!(
            identity = election.identity,
            lease = format!("{}/{}", election.namespace, election.name),
            "leading: starting the controllers"
        );
        let mut renewed = Instant::now();
        let job = work();
        tokio::pin!(job);
        let stopped = loop {
            tokio::select! {
                () = &mut job => {
                    tracing::warn!("the controllers ended while leading");
                    break false;
                }
                () = tokio::time::sleep(election.retry_period) => {
                    match try_acquire_or_renew(&api, &election, &mut observed).await {
                        Ok(true) => renewed = Instant::now(),
                        Ok(false) => {
                            tracing::warn!("another candidate holds the leader Lease: stopping the controllers");
                            break false;
                        }
                        Err(e) if renewed.elapsed() >= election.renew_deadline => {
                            tracing::warn!(error = %e, "could not renew the leader Lease in time: stopping the controllers");
                            break false;
                        }
                        Err(e) => tracing::debug!(error = %e, "renewing the leader Lease"),
                    }
                }
                () = &mut stop => break true,
            }
        };
        if stopped {
            release(&api, &election).await;
            return;
        }
    }
}
