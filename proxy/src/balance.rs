//! Choosing a replica for a request.
//!
//! Without affinity: **least in-flight**, ties broken from a random starting point. An instance
//! has 2 to 8 replicas, so scanning all of them costs a few atomic loads and gives the exact
//! answer that power-of-two-choices only approximates (P2C pays off with large pools or many
//! independent balancers). Node-RED runs flows on one thread, so the number of unfinished
//! requests is a good measure of a replica's queue: one stuck on a slow flow gets fewer new
//! requests. The random start spreads load evenly when every replica is idle.
//!
//! With affinity: the client's cookie is hashed onto a ketama ring of the replicas
//! (`pingora-ketama`, nginx-compatible). A client stays on its replica while it is available;
//! when it is not, the client moves to the next replica on the ring, and only the clients of a
//! removed or added replica move.

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
    if let (Some(key), Some(ring)) = (key, &instance.ring) {
        let all = if instance.replicas.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << instance.replicas.len()) - 1
        };
        let mut seen = 0u64;
        for addr in ring.0.node_iter(key) {
            let Some(&i) = instance.ring_index.get(addr) else {
                continue;
            };
            if eligible(i) {
                return Some(i);
            }
            seen |= 1 << i;
            if seen == all {
                return None;
            }
        }
        return None;
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
            editor_secret: None,
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
    fn affinity_is_sticky_and_moves_few_clients() {
        let routes = Routes::new();
        let table = routes.publish(&[spec(4, true)]).unwrap();
        let inst = &table.instances()[0];
        let now = Instant::now();
        let keys: Vec<String> = (0..2000).map(|i| format!("client-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| pick(inst, 0, Some(k.as_bytes()), now).unwrap())
            .collect();
        for (k, b) in keys.iter().zip(&before) {
            assert_eq!(
                pick(inst, 0, Some(k.as_bytes()), now),
                Some(*b),
                "same key, same replica"
            );
        }
        // Replica r3 stops being ready: only its clients move.
        let mut s = spec(4, true);
        s.replicas[3].ready = false;
        let table = routes.publish(&[s]).unwrap();
        let inst = &table.instances()[0];
        let mut moved = 0;
        for (k, b) in keys.iter().zip(&before) {
            let now_on = pick(inst, 0, Some(k.as_bytes()), now).unwrap();
            assert_ne!(now_on, 3);
            if *b != 3 {
                assert_eq!(now_on, *b, "clients of other replicas stay");
            } else {
                moved += 1;
            }
        }
        assert!(
            moved > 200 && moved < 900,
            "about a quarter of the clients move: {moved}"
        );
        // Adding a fifth replica moves about a fifth of the clients, not all.
        let table = routes.publish(&[spec(5, true)]).unwrap();
        let inst = &table.instances()[0];
        let changed = keys
            .iter()
            .zip(&before)
            .filter(|(k, b)| pick(inst, 0, Some(k.as_bytes()), now) != Some(**b))
            .count();
        assert!(
            changed < 700,
            "adding a replica moves few clients: {changed} of 2000"
        );
    }
}
