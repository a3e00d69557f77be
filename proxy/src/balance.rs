//! Choosing a replica for a request.
//!
//! Without affinity: **least in-flight**, ties broken from a random starting point. An instance
//! has 2 to 8 replicas, so scanning all of them costs a few atomic loads and gives the exact
//! answer that power-of-two-choices only approximates (P2C pays off with large pools or many
//! independent balancers). Node-RED runs flows on one thread, so the number of unfinished
//! requests is a good measure of a replica's queue: one stuck on a slow flow gets fewer new
//! requests. The random start spreads load evenly when every replica is idle.
//!
//! With affinity: the client's cookie names its replica (by id, stable across the replica's
//! restarts). A client stays on its replica while it is available; when it is not, the client is
//! balanced like a new one and its cookie is rewritten to the replica it got, so it stays there
//! even after its old replica comes back (a dashboard's session is broken once, not twice). Only
//! the clients of a replica that leaves move; a replica that joins takes new clients only. (A
//! hash ring moves clients when a replica comes back, and a restarted replica comes back on a
//! new port, which moves other replicas' clients too.)

use tokio::time::Instant;

use crate::routes::Instance;

/// Picks an available replica not in `tried` (a bitmask of replica indexes).
pub(crate) fn pick(
    instance: &Instance,
    tried: u64,
    key: Option<&[u8]>,
    now: Instant,
) -> Option<usize> {
    let eligible = |i: usize| tried & (1 << i) == 0 && instance.replicas[i].state.is_available(now);
    if let Some(key) = key.filter(|_| instance.affinity) {
        if let Some(i) = instance
            .replicas
            .iter()
            .position(|r| r.id.as_bytes() == key)
            .filter(|i| eligible(*i))
        {
            return Some(i);
        }
    }
    let n = instance.replicas.len();
    if n == 0 {
        return None;
    }
    let start = if n == 1 { 0 } else { fastrand::usize(..n) };
    let mut best: Option<(usize, usize)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if !eligible(i) {
            continue;
        }
        let load = instance.replicas[i].state.in_flight();
        if best.is_none_or(|(_, l)| load < l) {
            best = Some((i, load));
            if load == 0 {
                break;
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{InstanceSpec, ReplicaSpec, Routes};

    fn spec(n: usize, affinity: bool) -> InstanceSpec {
        InstanceSpec {
            certificate: None,
            asleep: false,
            editor_secret: None,
            http_auth: Default::default(),
            name: "orders".into(),
            hosts: vec!["orders.localhost".into()],
            ha: true,
            affinity,
            hold: false,
            replicas: (0..n)
                .map(|i| ReplicaSpec {
                    id: format!("r{i}"),
                    addr: format!("127.0.0.1:{}", 20000 + i).parse().unwrap(),
                    ready: true,
                })
                .collect(),
            health: None,
        }
    }

    #[test]
    fn least_in_flight_wins_and_idle_replicas_share() {
        let routes = Routes::new();
        let table = routes.publish(&[spec(3, false)]).unwrap();
        let inst = &table.instances()[0];
        let now = Instant::now();
        let _a = inst.replicas[0].state.begin_request();
        let _b = inst.replicas[0].state.begin_request();
        let _c = inst.replicas[1].state.begin_request();
        for _ in 0..100 {
            assert_eq!(pick(inst, 0, None, now), Some(2));
        }
        assert_eq!(
            pick(inst, 0b100, None, now),
            Some(1),
            "tried replicas are skipped"
        );
        assert_eq!(pick(inst, 0b111, None, now), None);

        let table = routes.publish(&[spec(4, false)]).unwrap();
        let inst = &table.instances()[0];
        drop((_a, _b, _c));
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[pick(inst, 0, None, now).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|c| *c > 800),
            "idle replicas share evenly: {counts:?}"
        );
    }

    #[test]
    fn unready_replicas_get_nothing() {
        let routes = Routes::new();
        let mut s = spec(2, false);
        s.replicas[0].ready = false;
        let table = routes.publish(&[s]).unwrap();
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(pick(&table.instances()[0], 0, None, now), Some(1));
        }
    }

    #[test]
    fn a_cookie_keeps_its_replica_while_it_is_available_and_nothing_else_moves() {
        let routes = Routes::new();
        let table = routes.publish(&[spec(4, true)]).unwrap();
        let inst = &table.instances()[0];
        let now = Instant::now();
        for (i, id) in ["r0", "r1", "r2", "r3"].iter().enumerate() {
            for _ in 0..20 {
                assert_eq!(pick(inst, 0, Some(id.as_bytes()), now), Some(i));
            }
        }
        // r3 stops being ready: its clients go elsewhere, the others stay.
        let mut s = spec(4, true);
        s.replicas[3].ready = false;
        let table = routes.publish(&[s]).unwrap();
        let inst = &table.instances()[0];
        for _ in 0..20 {
            assert_ne!(pick(inst, 0, Some(b"r3"), now), Some(3));
            assert_eq!(pick(inst, 0, Some(b"r1"), now), Some(1));
        }
        // An unknown or forged cookie is a new client; without affinity cookies mean nothing.
        assert!(pick(inst, 0, Some(b"r9"), now).is_some());
        let plain = routes.publish(&[spec(4, false)]).unwrap();
        let inst = &plain.instances()[0];
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[pick(inst, 0, Some(b"r1"), now).unwrap()] += 1;
        }
        assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
    }
}
