"""The neighbour graph of SecAgg+ (Bell et al., 2020): who masks with and shares secrets to whom.

A Harary graph H(k, n) over a public pseudo-random permutation of the participants: ids are sorted
by SHA-256 of (seed, id), placed on a ring, and each is joined to the k/2 nearest on either side
(plus the opposite one when k is odd and n even; an odd k with an odd n is rounded up to k + 1,
since no k-regular graph exists then). The result is k-regular, connected and stays connected after
any k - 1 removals. When k >= n - 1 (or no degree is given) the graph is complete, which is the
original SecAgg of Bonawitz et al. (2017). Deterministic from public inputs, so every client
recomputes its own neighbourhood instead of trusting the server's word for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fedcore.secagg.primitives import PROTOCOL_LABEL


def graph_seed(round_id: str) -> bytes:
    """The public seed of a round's graph permutation."""
    return hashlib.sha256(PROTOCOL_LABEL + b"/graph\x00" + round_id.encode("utf-8")).digest()


def effective_degree(n: int, degree: int | None) -> int:
    """Degree each of ``n`` participants actually gets for a requested ``degree``."""
    if n < 1:
        raise ValueError("a graph needs at least one participant")
    if degree is None or degree >= n - 1:
        return n - 1
    if degree < 1:
        raise ValueError("degree must be at least 1")
    return degree + 1 if degree % 2 and n % 2 else degree


def neighbour_graph(
    client_ids: Iterable[int], degree: int | None, seed: bytes
) -> dict[int, frozenset[int]]:
    """Neighbours of every participant (never including itself).

    Args:
        client_ids: distinct participant ids.
        degree: requested degree k; None or k >= n - 1 gives the complete graph.
        seed: public seed of the permutation (``graph_seed(round_id)``).

    Returns:
        Each id's neighbour set; the relation is symmetric.
    """
    ids = sorted(set(client_ids))
    n = len(ids)
    k = effective_degree(n, degree)
    if k == n - 1:
        everyone = frozenset(ids)
        return {cid: everyone - {cid} for cid in ids}
    ring = sorted(ids, key=lambda cid: hashlib.sha256(seed + cid.to_bytes(4, "big")).digest())
    neighbours: dict[int, set[int]] = {cid: set() for cid in ids}
    offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
    for position, cid in enumerate(ring):
        for offset in offsets:
            other = ring[(position + offset) % n]
            neighbours[cid].add(other)
            neighbours[other].add(cid)
    return {cid: frozenset(peers) for cid, peers in neighbours.items()}
