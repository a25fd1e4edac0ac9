//! Which live node each shard should live on: rendezvous (highest-random-weight) hashing.
//!
//! Every node computes the same answer from the same member list, with nothing to agree
//! on: a shard goes to the node with the highest weight for it. When a node joins it
//! takes exactly the shards it now weighs highest on (about 1/N of them, from every other
//! node evenly); when one leaves only its own shards move, each to its runner-up. The
//! weight is a fixed function of the node's id and the shard (not Rust's `Hash`, which
//! may change between releases): every node of a cluster, of any build, agrees.

use crate::NodeId;

/// The weight of `node` for `shard`: FNV-1a of the id, mixed with the shard by
/// SplitMix64's finaliser (FNV alone spreads ids that differ in their last byte poorly).
fn weight(node: &NodeId, shard: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h ^ mix(u64::from(shard).wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The node `shard` should live on among `nodes` (`None` when there is none). Ties,
/// which need two ids of the same weight, go to the smaller id.
pub fn owner(shard: u16, nodes: &[NodeId]) -> Option<&NodeId> {
    nodes
        .iter()
        .max_by(|a, b| weight(a, shard).cmp(&weight(b, shard)).then(b.cmp(a)))
}

/// The node each shard should live on, indexed by shard.
pub fn assignment(nodes: &[NodeId]) -> Vec<Option<&NodeId>> {
    (0..twin_model::PARTITIONS)
        .map(|s| owner(s, nodes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(names: &[String]) -> Vec<NodeId> {
        names.iter().map(|n| NodeId::parse(n).unwrap()).collect()
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,12}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn a_joining_node_takes_only_shards_it_now_owns(
            names in proptest::collection::btree_set(name(), 1..6),
            joiner in name(),
        ) {
            prop_assume!(!names.contains(&joiner));
            let before = nodes(&names.iter().cloned().collect::<Vec<_>>());
            let mut after = before.clone();
            after.push(NodeId::parse(&joiner).unwrap());
            for (shard, (was, is)) in assignment(&before).into_iter().zip(assignment(&after)).enumerate() {
                let is = is.unwrap();
                prop_assert!(was == Some(is) || is.as_str() == joiner, "shard {shard} moved from {was:?} to {is}");
            }
        }

        #[test]
        fn a_leaving_node_gives_up_only_its_own_shards(
            names in proptest::collection::btree_set(name(), 2..7),
            leaving in any::<prop::sample::Index>(),
        ) {
            let before = nodes(&names.iter().cloned().collect::<Vec<_>>());
            let gone = before[leaving.index(before.len())].clone();
            let after: Vec<NodeId> = before.iter().filter(|n| **n != gone).cloned().collect();
            for (shard, (was, is)) in assignment(&before).into_iter().zip(assignment(&after)).enumerate() {
                let was = was.unwrap();
                prop_assert!(was == &gone || Some(was) == is, "shard {shard} of {was} moved to {is:?}");
            }
        }

        #[test]
        fn the_order_of_the_member_list_does_not_matter(
            names in proptest::collection::vec(name(), 1..6),
        ) {
            let list = nodes(&names);
            let mut reversed = list.clone();
            reversed.reverse();
            prop_assert_eq!(assignment(&list), assignment(&reversed));
        }
    }

    #[test]
    fn shards_spread_evenly_over_similar_names() {
        for n in [2usize, 3, 5, 8] {
            let list: Vec<NodeId> = (0..n)
                .map(|i| NodeId::parse(&format!("doppel-{i}")).unwrap())
                .collect();
            let plan = assignment(&list);
            let fair = usize::from(twin_model::PARTITIONS) / n;
            for node in &list {
                let owned = plan.iter().filter(|o| **o == Some(node)).count();
                // Binomial spread: within 25 % of the fair share for these sizes.
                assert!(
                    owned * 4 >= fair * 3 && owned * 4 <= fair * 5,
                    "{node} owns {owned} of {} with {n} nodes",
                    twin_model::PARTITIONS
                );
            }
        }
    }

    #[test]
    fn no_nodes_no_owner() {
        assert_eq!(owner(0, &[]), None);
    }
}
