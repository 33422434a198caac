//! Directed graphs over nodes `0..node_count`: cycle detection and topological order.
//!
//! Both functions are iterative (no recursion), so graphs of any size and depth are fine.
//! Edges whose endpoints are out of range are ignored.

/// Builds adjacency lists, dropping out-of-range edges.
fn adjacency(node_count: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut adj = vec![Vec::new(); node_count];
    for &(from, to) in edges {
        if to < node_count
            && let Some(out) = adj.get_mut(from)
        {
            out.push(to);
        }
    }
    adj
}

/// Finds one cycle of the directed graph with `node_count` nodes and the given `(from, to)`
/// edges.
///
/// Returns the nodes of the cycle in order: for the result `[a, b, c]` the graph has the edges
/// `a → b`, `b → c` and `c → a`. A self-loop `a → a` is returned as `[a]`. `None` means the graph
/// is acyclic.
#[must_use]
pub fn find_cycle(node_count: usize, edges: &[(usize, usize)]) -> Option<Vec<usize>> {
    const WHITE: u8 = 0;
    const GREY: u8 = 1;
    const BLACK: u8 = 2;

    let adj = adjacency(node_count, edges);
    let mut color = vec![WHITE; node_count];
    // Position of each grey node in `path`.
    let mut position = vec![0usize; node_count];
    // The current DFS path: (node, index of the next outgoing edge to follow).
    let mut path: Vec<(usize, usize)> = Vec::new();

    for root in 0..node_count {
        if color[root] != WHITE {
            continue;
        }
        color[root] = GREY;
        position[root] = 0;
        path.push((root, 0));
        while let Some(top) = path.last_mut() {
            let (node, next) = *top;
            if let Some(&succ) = adj[node].get(next) {
                top.1 += 1;
                match color[succ] {
                    WHITE => {
                        color[succ] = GREY;
                        position[succ] = path.len();
                        path.push((succ, 0));
                    }
                    GREY => {
                        let start = position[succ];
                        return Some(path[start..].iter().map(|&(n, _)| n).collect());
                    }
                    _ => {}
                }
            } else {
                color[node] = BLACK;
                path.pop();
            }
        }
    }
    None
}

/// Orders the nodes so that for every edge `(from, to)`, `from` comes before `to` (Kahn's
/// algorithm; among ready nodes the lowest index goes first, so the result is deterministic).
///
/// # Errors
/// Returns the nodes of one cycle (as [`find_cycle`] does) when the graph is not acyclic.
pub fn topo_order(node_count: usize, edges: &[(usize, usize)]) -> Result<Vec<usize>, Vec<usize>> {
    let adj = adjacency(node_count, edges);
    let mut indegree = vec![0usize; node_count];
    for out in &adj {
        for &to in out {
            indegree[to] += 1;
        }
    }
    let mut ready: std::collections::BinaryHeap<core::cmp::Reverse<usize>> =
        indegree.iter().enumerate().filter(|(_, d)| **d == 0).map(|(n, _)| core::cmp::Reverse(n)).collect();
    let mut order = Vec::with_capacity(node_count);
    while let Some(core::cmp::Reverse(node)) = ready.pop() {
        order.push(node);
        for &to in &adj[node] {
            indegree[to] -= 1;
            if indegree[to] == 0 {
                ready.push(core::cmp::Reverse(to));
            }
        }
    }
    if order.len() == node_count { Ok(order) } else { Err(find_cycle(node_count, edges).unwrap_or_default()) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_real_cycle(cycle: &[usize], edges: &[(usize, usize)]) -> bool {
        !cycle.is_empty() && (0..cycle.len()).all(|i| edges.contains(&(cycle[i], cycle[(i + 1) % cycle.len()])))
    }

    #[test]
    fn small_graphs() {
        assert_eq!(find_cycle(0, &[]), None);
        assert_eq!(find_cycle(3, &[(0, 1), (1, 2)]), None);
        assert_eq!(find_cycle(1, &[(0, 0)]), Some(vec![0]));
        assert_eq!(find_cycle(3, &[(0, 1), (1, 2), (2, 1)]), Some(vec![1, 2]));
        assert_eq!(find_cycle(2, &[(0, 5), (7, 1)]), None);
        assert_eq!(topo_order(3, &[(2, 1), (1, 0)]), Ok(vec![2, 1, 0]));
        assert_eq!(topo_order(3, &[]), Ok(vec![0, 1, 2]));
        assert_eq!(topo_order(2, &[(0, 1), (1, 0)]), Err(vec![0, 1]));
    }

    #[test]
    fn ten_thousand_node_cycle() {
        let n = 10_000;
        let edges: Vec<(usize, usize)> = (0..n).map(|i| (i, (i + 1) % n)).collect();
        let cycle = find_cycle(n, &edges).unwrap();
        assert_eq!(cycle.len(), n);
        assert!(is_real_cycle(&cycle, &edges));
        assert_eq!(topo_order(n, &edges).unwrap_err().len(), n);
        // And a 100,000-node chain is fine too.
        let chain: Vec<(usize, usize)> = (0..99_999).map(|i| (i, i + 1)).collect();
        assert_eq!(find_cycle(100_000, &chain), None);
        assert_eq!(topo_order(100_000, &chain).unwrap().len(), 100_000);
    }

    /// A random DAG: a permutation of the nodes and edges that go forward in it.
    fn dag() -> impl Strategy<Value = (usize, Vec<usize>, Vec<(usize, usize)>)> {
        (1usize..60).prop_flat_map(|n| {
            (
                Just(n),
                Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                proptest::collection::vec((0..n, 0..n), 0..(n * 3)),
            )
                .prop_map(|(n, perm, pairs)| {
                    let edges = pairs
                        .into_iter()
                        .filter(|(a, b)| a != b)
                        .map(|(a, b)| (perm[a.min(b)], perm[a.max(b)]))
                        .collect();
                    (n, perm, edges)
                })
        })
    }

    proptest! {
        #[test]
        fn dags_are_accepted((n, _perm, edges) in dag()) {
            prop_assert_eq!(find_cycle(n, &edges), None);
            let order = topo_order(n, &edges).unwrap();
            prop_assert_eq!(order.len(), n);
            let mut rank = vec![0; n];
            for (i, node) in order.iter().enumerate() {
                rank[*node] = i;
            }
            for (a, b) in &edges {
                prop_assert!(rank[*a] < rank[*b]);
            }
        }

        #[test]
        fn injected_cycles_are_found(
            (n, perm, mut edges) in dag(),
            kind in 0u8..3,
            x in any::<proptest::sample::Index>(),
            y in any::<proptest::sample::Index>(),
        ) {
            let i = x.index(n);
            let j = y.index(n);
            let (lo, hi) = (i.min(j), i.max(j));
            match kind {
                // Self-loop.
                0 => edges.push((perm[i], perm[i])),
                // 2-cycle.
                1 => {
                    edges.push((perm[lo], perm[hi]));
                    edges.push((perm[hi], perm[lo]));
                }
                // A back edge closing a forward chain.
                _ => {
                    for k in lo..hi {
                        edges.push((perm[k], perm[k + 1]));
                    }
                    edges.push((perm[hi], perm[lo]));
                }
            }
            let cycle = find_cycle(n, &edges);
            prop_assert!(cycle.is_some());
            let cycle = cycle.unwrap();
            prop_assert!(is_real_cycle(&cycle, &edges), "{:?} in {:?}", cycle, edges);
            let err = topo_order(n, &edges).unwrap_err();
            prop_assert!(is_real_cycle(&err, &edges));
        }
    }
}
