"""Secure aggregation: the server learns the sum of the sites' updates and nothing else.

Implements SecAgg (Bonawitz et al., 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS) with the sparse neighbour graph of SecAgg+ (Bell et al., 2020, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS). Pure Python over
``cryptography`` and numpy: no I/O, no clock, no Django.

The round, in four stages (``SecAggClient`` and ``SecAggServer`` hold one state machine each):

0. advertise keys: each client sends two fresh X25519 public keys, c (to receive shares) and s
   (for pairwise masks).
1. share keys: the server sends each client its neighbours' keys; the client Shamir-shares its
   s private key and a fresh 32-byte self-mask seed b_u (threshold t, over GF(2^255 - 19)) among
   its closed neighbourhood, each share encrypted with ChaCha20-Poly1305 under an HKDF-SHA256 key
   from the c-key agreement, bound to round, sender and receiver; the server relays the
   ciphertexts and cannot read them.
2. masked input: each client sends y_u = q(x_u) + PRG(b_u) + sum_v (+/-) PRG(s_uv) mod 2^32,
   where q is the fixed-point quantiser, PRG is ChaCha20 and s_uv is the HKDF of the s-key
   agreement with the neighbour v (bound to round and the ordered pair). Pairwise masks cancel in
   the sum; the server adds each y_u to one running sum and keeps nothing else.
3. unmasking: each surviving client reveals, for every neighbour, the share of its b-seed if it
   survived or the share of its s-key if it dropped; never both. The server reconstructs them,
   removes the self masks and the orphaned pairwise masks, and dequantises the sum.

Threat model and guarantees:

- The server is honest-but-curious: it runs the protocol faithfully and relays messages
  unchanged, but tries to learn individual inputs from everything it sees. Against it, and any
  coalition of it with fewer than t clients of a neighbourhood (the whole round for the complete
  graph), nothing about honest inputs is revealed beyond the sum of the contributors' inputs
  (Bonawitz et al.'s honest-but-curious theorem; for a sparse graph Bell et al.'s, which holds
  with high probability when the degree grows like log n and t is set as they prescribe). The
  sum itself still reveals what sums reveal: with t contributors and t - 1 colluders it is the
  one honest input. Compose with client-level DP.
- Dropouts: any client may vanish at any stage. The round completes while at least t clients
  remain at each stage and, for a sparse graph, every neighbourhood keeps t share holders: up
  to n - t dropouts for the complete graph. Otherwise it aborts with ``NotEnoughSurvivorsError``,
  before any share is revealed where the shortfall is already known.
- Not covered: a malicious server (the consistency-check round with signatures of Bonawitz et
  al.'s actively secure variant is not implemented, though clients keep the checks that blunt
  the known active attacks: they recompute their neighbourhood from public data, require
  distinct keys, refuse to reveal both shares of a client and refuse to unmask with fewer than
  t survivors; the graph seed is the round id, which a malicious server could grind); malicious
  clients poisoning the sum (inputs are only bounded by the clip; the server cannot inspect
  them); Sybil clients (the transport must authenticate every silo and pass the authenticated
  id to ``SecAggServer.collect``).

Deliberate differences from Flower's SecAgg+: mask seeds are 256-bit keys expanded by ChaCha20,
never 32-bit seeds for numpy's ``RandomState`` (searchable in 2^32 steps), and masking is
exact arithmetic in Z_{2^32} on fixed-point values, never float64 addition, which neither
cancels exactly nor hides magnitudes.

Quantisation: coordinates are clipped to [-clip, clip]; 4 bytes per parameter on the wire; the
precision is the most that lets n vectors sum without wrapping (see ``Quantizer``).

Transport: messages are plain dicts (str, int, float, bytes, lists of dicts); the caller encodes
them and keeps time (``SecAggServer.collect(..., now)``, ``ready(now)``, ``advance(now)``; ``drop``
when it knows a client is gone, so the stage need not wait for its deadline); ``wire`` carries the
messages as JSON (bytes as base64).
``simulate`` runs a whole round in-process; ``bytes_per_client`` gives its wire cost.
"""

from fedcore.secagg.client import SecAggClient
from fedcore.secagg.errors import (
    NotEnoughSurvivorsError,
    ProtocolError,
    ReconstructionError,
    RevealRefusedError,
    SecAggError,
    StageError,
)
from fedcore.secagg.graph import effective_degree, neighbour_graph
from fedcore.secagg.messages import SecAggConfig, Stage, message_nbytes, session_id
from fedcore.secagg.quantize import Quantizer
from fedcore.secagg.server import SecAggServer
from fedcore.secagg.simulation import (
    SimulationResult,
    bytes_per_client,
    run_simulation,
    simulate,
)

__all__ = [
    "NotEnoughSurvivorsError",
    "ProtocolError",
    "Quantizer",
    "ReconstructionError",
    "RevealRefusedError",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "SimulationResult",
    "Stage",
    "StageError",
    "bytes_per_client",
    "effective_degree",
    "message_nbytes",
    "neighbour_graph",
    "run_simulation",
    "session_id",
    "simulate",
]
