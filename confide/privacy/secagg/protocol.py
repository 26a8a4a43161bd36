"""SecAgg+ (Bell et al. 2020) with dropout recovery; k = N-1 is SecAgg (Bonawitz et al. 2017).

Pure protocol, no transport: :class:`SecAggClient` and :class:`SecAggServer` exchange the
message dataclasses below; the coordinator and the in-process engine carry them.

Stages (one round):

1. **Advertise keys.** Each site makes two X25519 key pairs: ``c`` (to encrypt shares to
   a neighbour) and ``s`` (to agree pairwise mask seeds), and sends both public keys.
2. **Share keys.** Each site draws a 128-bit self-mask seed ``b``, splits ``b`` and its raw
   ``s`` private key t-of-k (Shamir, :mod:`.shamir`) among its k neighbours on a random
   k-regular graph, and seals each neighbour's shares with AES-GCM under
   HKDF(X25519(c_u, c_v)), so the coordinator relays what it cannot read. It also sends
   a commitment SHA-256(context, b), which lets the coordinator check what it recovers.
3. **Masked input.** Each site quantizes its update (:mod:`.masking`), appends its
   example count, and adds its self mask PRG(b) and, for every neighbour v that shared
   keys, +PRG(s_uv) if u < v else -PRG(s_uv), with s_uv = HKDF(X25519(s_u, s_v)). It
   opens the shares it received; a share that fails authentication is reported and its
   sender is excluded from the round (treated as dropped).
4. **Unmask.** The coordinator asks each surviving site for its shares of ``b`` of every
   surviving neighbour and of ``s`` of every dropped or excluded neighbour, never both
   for one site (the client refuses such a request). With t shares each it recovers the
   seeds, checks them (the recovered ``s`` must match its public key, ``b`` its
   commitment), and removes the self masks of survivors and the pairwise masks that
   survivors shared with dropped sites from the *sum* of the masked inputs.

The server only ever holds masked vectors and their sum; :meth:`SecAggServer.unmask`
returns the aggregate only. Fewer than t survivors, or a secret with fewer than t
shares, aborts the round with :class:`SecAggAborted`.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confide.errors import ConfideError, ConfigError
from confide.privacy.secagg import shamir
from confide.privacy.secagg.masking import (
    MaskExpander,
    QuantizationError,
    dequantize_sum,
    error_bound,
    quantize,
)

U32 = npt.NDArray[np.uint32]
KEY_BYTES = 32
SEED_BYTES = 16
_SK_LIMBS = KEY_BYTES // 2
_B_LIMBS = SEED_BYTES // 2
_SHARE = struct.Struct(f"<II{_SK_LIMBS + _B_LIMBS}I")  # sender, recipient, limbs
DEFAULT_CLIP = 8.0
DEFAULT_MAX_WEIGHT = 1 << 16  # examples; a site with more is refused (raise it in the config)


class SecAggError(ConfideError):
    """Base of the secure-aggregation errors."""


class SecAggAborted(SecAggError, RuntimeError):
    """The round cannot finish securely (too few sites or shares); nothing is revealed."""


class ProtocolViolation(SecAggError, ValueError):
    """A message that does not follow the protocol (wrong stage, site, size or request)."""


class MaskedInputError(ProtocolViolation):
    """A masked vector of the wrong length or dtype; its sender is treated as dropped."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SecAggConfig:
    """What every participant of one round agrees on (the coordinator sends it)."""

    sites: int  # N; site ids are 1..N
    dim: int  # length of the (flattened) update
    neighbours: int  # k: 2 <= k <= N-1, even unless k == N-1
    threshold: int  # t: k/2 < t <= k
    clip: float = DEFAULT_CLIP
    max_weight: int = DEFAULT_MAX_WEIGHT
    graph_seed: bytes = b"\x00" * 16
    context: bytes = b""  # binds keys, seeds and ciphertexts to one federation round

    @classmethod
    def build(
        cls,
        sites: int,
        dim: int,
        *,
        neighbours: int | None = None,
        threshold: int | None = None,
        clip: float = DEFAULT_CLIP,
        max_weight: int = DEFAULT_MAX_WEIGHT,
        context: bytes = b"",
        graph_seed: bytes | None = None,
    ) -> SecAggConfig:
        """A validated config with safe defaults: k = min(N-1, 2 ceil(log2 N)) (SecAgg+,
        Bell et al.), t = max(floor(k/2) + 1, ceil(2k/3))."""
        k = default_neighbours(sites) if neighbours is None else neighbours
        t = default_threshold(k) if threshold is None else threshold
        cfg = cls(
            sites=sites,
            dim=dim,
            neighbours=k,
            threshold=t,
            clip=clip,
            max_weight=max_weight,
            graph_seed=os.urandom(16) if graph_seed is None else graph_seed,
            context=context,
        )
        cfg.validate()
        return cfg

    @property
    def full(self) -> bool:
        """Whether this is full SecAgg (every site a neighbour of every other)."""
        return self.neighbours == self.sites - 1

    def validate(self) -> None:
        n, k, t = self.sites, self.neighbours, self.threshold
        if n < 3:
            raise ConfigError(
                "secure_aggregation", f"{n} sites cannot hide each other's update", "use >= 3"
            )
        if not 2 <= k <= n - 1:
            raise ConfigError(
                "secagg.neighbours", f"k = {k} with {n} sites", f"choose 2 <= k <= {n - 1}"
            )
        if k != n - 1 and k % 2:
            raise ConfigError(
                "secagg.neighbours",
                f"k = {k} is odd; the neighbour graph needs an even k (or k = N-1 = {n - 1})",
                f"use k = {k + 1} or {k - 1}",
            )
        if not k / 2 < t <= k:
            raise ConfigError(
                "secagg.threshold",
                f"t = {t} with k = {k}: t must exceed k/2 (else the coordinator could "
                "collect both secrets of a site) and be at most k",
                f"use the default (about 2k/3) = {default_threshold(k)}",
            )
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError("secagg.clip", f"{self.clip} is not a positive number", "e.g. 8.0")
        if not self.max_weight >= 1 or n * self.max_weight >= 1 << 32:
            raise ConfigError(
                "secagg.max_weight",
                f"{self.max_weight} x {n} sites does not fit the 32-bit example count",
                f"use at most {((1 << 32) - 1) // n}",
            )
        if self.dim < 1:
            raise ConfigError("secagg", "the model has no parameters", "aggregate a real model")
        if len(self.graph_seed) != 16:
            raise ConfigError("secagg.graph_seed", "must be 16 bytes", "use os.urandom(16)")

    def neighbours_of(self, site: int) -> tuple[int, ...]:
        return _graph(self.sites, self.neighbours, self.graph_seed)[site]

    def error_bound(self, count: int) -> float:
        """Largest error of one coordinate of the mean when the sites sum ``count`` examples."""
        return error_bound(
            clip=self.clip, max_weight=self.max_weight, sites=self.sites, count=count
        )


def default_neighbours(sites: int) -> int:
    return min(sites - 1, 2 * math.ceil(math.log2(max(sites, 2))))


def default_threshold(neighbours: int) -> int:
    """About 2/3 of the neighbours, and always more than half (see ``validate``)."""
    return max(neighbours // 2 + 1, math.ceil(2 * neighbours / 3))


_GRAPHS: dict[tuple[int, int, bytes], dict[int, tuple[int, ...]]] = {}


def _graph(n: int, k: int, seed: bytes) -> dict[int, tuple[int, ...]]:
    """A k-regular graph on 1..N: a Harary circle over a seeded random permutation."""
    key = (n, k, seed)
    if key not in _GRAPHS:
        ids = np.arange(1, n + 1)
        if k == n - 1:
            order = ids
        else:
            stream = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
            keys = np.frombuffer(stream.update(bytes(8 * n)), dtype="<u8")
            order = ids[np.argsort(keys, kind="stable")]
        pos = {int(s): i for i, s in enumerate(order)}
        half = k // 2
        graph: dict[int, tuple[int, ...]] = {}
        for s in ids:
            if k == n - 1:
                graph[int(s)] = tuple(int(v) for v in ids if v != s)
            else:
                i = pos[int(s)]
                around = [int(order[(i + d) % n]) for d in range(-half, half + 1) if d]
                graph[int(s)] = tuple(sorted(around))
        if len(_GRAPHS) > 64:
            _GRAPHS.clear()
        _GRAPHS[key] = graph
    return _GRAPHS[key]


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class KeyAdvert:
    site: int
    c_public: bytes  # X25519, raw 32 bytes: encrypts shares
    s_public: bytes  # X25519, raw 32 bytes: agrees mask seeds


@dataclass(frozen=True)
class SharedKeys:
    site: int
    ciphertexts: Mapping[int, bytes]  # recipient -> nonce || AES-GCM(shares)
    b_commitment: bytes  # SHA-256(context || site || b)


@dataclass(frozen=True)
class MaskedInput:
    site: int
    vector: U32  # dim + 1 ring elements: the masked, quantized update and its count
    bad_senders: tuple[int, ...] = ()  # neighbours whose share failed authentication


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: tuple[int, ...]  # reveal your share of their self-mask seed b
    dropped: tuple[int, ...]  # reveal your share of their mask key s


@dataclass(frozen=True)
class UnmaskReply:
    site: int
    b_shares: Mapping[int, bytes]  # survivor -> 8 limbs (uint32 LE)
    s_shares: Mapping[int, bytes]  # dropped -> 16 limbs (uint32 LE)


@dataclass
class Aggregate:
    """What the coordinator learns: the weighted mean, the total count, who took part."""

    mean: npt.NDArray[np.float64]
    count: int
    total: U32  # the ring sum of the survivors' quantized vectors (count last)
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    excluded: tuple[int, ...]
    error_bound: float


# --------------------------------------------------------------------------- primitives


def _kdf(secret: bytes, length: int, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _mask_seed(private: X25519PrivateKey, public: bytes, lo: int, hi: int, ctx: bytes) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return _kdf(shared, SEED_BYTES, b"confide/secagg/v1/mask|" + ctx + struct.pack("<II", lo, hi))


def _box_key(private: X25519PrivateKey, public: bytes, lo: int, hi: int, ctx: bytes) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return _kdf(shared, 32, b"confide/secagg/v1/share|" + ctx + struct.pack("<II", lo, hi))


def _commit(ctx: bytes, site: int, b: bytes) -> bytes:
    return hashlib.sha256(b"confide/secagg/v1/b|" + ctx + struct.pack("<I", site) + b).digest()


def _raw_private(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    return key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization as ser

    return key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


# --------------------------------------------------------------------------- client


@dataclass
class _ClientState:
    neighbour_keys: dict[int, KeyAdvert] = field(default_factory=dict)
    # sender -> (s-key share limbs, b share limbs) that this site holds for it
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    revealed_b: set[int] = field(default_factory=set)
    revealed_s: set[int] = field(default_factory=set)


class SecAggClient:
    """One site's side of one round. Call the stages in order; each checks its input."""

    def __init__(self, config: SecAggConfig, site: int) -> None:
        config.validate()
        if not 1 <= site <= config.sites:
            raise ProtocolViolation(f"site id {site} is outside 1..{config.sites}")
        self.cfg = config
        self.site = site
        self.neighbours = frozenset(config.neighbours_of(site))
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = os.urandom(SEED_BYTES)
        self._state = _ClientState()
        self._stage = 0

    def _enter(self, stage: int) -> None:
        if self._stage != stage - 1:
            raise ProtocolViolation(f"stage {stage} called after stage {self._stage}")
        self._stage = stage

    def advertise(self) -> KeyAdvert:
        self._enter(1)
        return KeyAdvert(self.site, _raw_public(self._c), _raw_public(self._s))

    def share_keys(self, adverts: Iterable[KeyAdvert]) -> SharedKeys:
        """Split this site's secrets among the neighbours that advertised keys."""
        self._enter(2)
        keys: dict[int, KeyAdvert] = {}
        for a in adverts:
            if a.site not in self.neighbours:
                raise ProtocolViolation(f"site {a.site} is not a neighbour of site {self.site}")
            if len(a.c_public) != KEY_BYTES or len(a.s_public) != KEY_BYTES:
                raise ProtocolViolation(f"site {a.site} advertised malformed keys")
            keys[a.site] = a
        t = self.cfg.threshold
        if len(keys) < t:
            raise SecAggAborted(
                f"site {self.site}: only {len(keys)} neighbours advertised keys, "
                f"the threshold is {t}"
            )
        self._state.neighbour_keys = keys
        recipients = sorted(keys)
        limbs = shamir.to_limbs([_raw_private(self._s), self._b + bytes(KEY_BYTES - SEED_BYTES)])
        shares = shamir.share(limbs, recipients, t)  # (2, k, 16)
        ctx = self.cfg.context
        out: dict[int, bytes] = {}
        for j, v in enumerate(recipients):
            sk_part = shares[0, j]
            b_part = shares[1, j, :_B_LIMBS]
            plain = _SHARE.pack(self.site, v, *sk_part.tolist(), *b_part.tolist())
            lo, hi = min(self.site, v), max(self.site, v)
            key = _box_key(self._c, keys[v].c_public, lo, hi, ctx)
            nonce = os.urandom(12)
            aad = ctx + struct.pack("<II", self.site, v)
            out[v] = nonce + AESGCM(key).encrypt(nonce, plain, aad)
        return SharedKeys(self.site, out, _commit(ctx, self.site, self._b))

    def masked_input(
        self,
        ciphertexts: Mapping[int, bytes],
        update: npt.ArrayLike,
        num_examples: int,
        *,
        rng: np.random.Generator | None = None,
    ) -> MaskedInput:
        """Open the shares addressed to this site, then mask the quantized update."""
        self._enter(3)
        ctx = self.cfg.context
        keys = self._state.neighbour_keys
        bad: list[int] = []
        for u, box in ciphertexts.items():
            if u not in keys:
                raise ProtocolViolation(f"a share from site {u}, which did not advertise keys")
            lo, hi = min(self.site, u), max(self.site, u)
            try:
                plain = AESGCM(_box_key(self._c, keys[u].c_public, lo, hi, ctx)).decrypt(
                    box[:12], box[12:], ctx + struct.pack("<II", u, self.site)
                )
                fields = _SHARE.unpack(plain)
            except (InvalidTag, struct.error, ValueError):
                bad.append(u)
                continue
            if fields[0] != u or fields[1] != self.site:
                bad.append(u)
                continue
            limbs = np.asarray(fields[2:], dtype="<u4")
            self._state.held[u] = (limbs[:_SK_LIMBS].tobytes(), limbs[_SK_LIMBS:].tobytes())
        vec = np.asarray(update).reshape(-1)
        if vec.size != self.cfg.dim:
            raise ProtocolViolation(f"the update has {vec.size} values, the round {self.cfg.dim}")
        if isinstance(num_examples, bool) or not 0 < num_examples <= self.cfg.max_weight:
            raise QuantizationError(
                f"site {self.site}: {num_examples} examples; secure aggregation weights at "
                f"most {self.cfg.max_weight} (secagg.max_weight) and at least 1"
            )
        out = np.empty(self.cfg.dim + 1, dtype=np.uint32)
        out[:-1] = quantize(
            vec,
            clip=self.cfg.clip,
            weight=num_examples / self.cfg.max_weight,
            sites=self.cfg.sites,
            rng=rng,
        )
        out[-1] = num_examples
        expander = MaskExpander(self.cfg.dim + 1)
        expander.add(out, self._b)
        for v in sorted(ciphertexts):  # neighbours that shared keys (U2)
            lo, hi = min(self.site, v), max(self.site, v)
            seed = _mask_seed(self._s, keys[v].s_public, lo, hi, ctx)
            expander.add(out, seed, 1 if self.site < v else -1)
        return MaskedInput(self.site, out, tuple(sorted(bad)))

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal the requested shares; never both secrets of one site."""
        self._enter(4)
        st = self._state
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        both |= (survivors & st.revealed_s) | (dropped & st.revealed_b)
        if both:
            raise ProtocolViolation(
                f"site {self.site} refuses to reveal both secrets of sites {sorted(both)}"
            )
        if self.site in survivors | dropped:
            raise ProtocolViolation("a site is never asked for shares of its own secrets")
        b = {u: st.held[u][1] for u in sorted(survivors) if u in st.held}
        s = {u: st.held[u][0] for u in sorted(dropped) if u in st.held}
        st.revealed_b |= set(b)
        st.revealed_s |= set(s)
        return UnmaskReply(self.site, b, s)


# --------------------------------------------------------------------------- server


class SecAggServer:
    """The coordinator's side of one round: relays, sums masked inputs, unmasks the sum."""

    def __init__(self, config: SecAggConfig) -> None:
        config.validate()
        self.cfg = config
        self.adverts: dict[int, KeyAdvert] = {}
        self.shared: dict[int, SharedKeys] = {}
        self._masked: dict[int, U32] = {}
        self._bad: dict[int, set[int]] = {}  # accused sender -> accusers
        self._requests: dict[int, UnmaskRequest] = {}
        self._stage = 1

    # stage 1 -> 2
    def add_advert(self, advert: KeyAdvert) -> None:
        self._expect(1)
        if not 1 <= advert.site <= self.cfg.sites:
            raise ProtocolViolation(f"site id {advert.site} is outside 1..{self.cfg.sites}")
        if len(advert.c_public) != KEY_BYTES or len(advert.s_public) != KEY_BYTES:
            raise ProtocolViolation(f"site {advert.site} advertised malformed keys")
        self.adverts[advert.site] = advert

    def key_lists(self) -> dict[int, list[KeyAdvert]]:
        """For each advertising site, its neighbours' adverts (sent to it for stage 2)."""
        self._expect(1)
        self._stage = 2
        self._check_alive(self.adverts, "advertised keys")
        return {
            u: [self.adverts[v] for v in self.cfg.neighbours_of(u) if v in self.adverts]
            for u in sorted(self.adverts)
        }

    # stage 2 -> 3
    def add_shared(self, msg: SharedKeys) -> None:
        self._expect(2)
        if msg.site not in self.adverts:
            raise ProtocolViolation(f"site {msg.site} shares keys without having advertised")
        allowed = set(self.cfg.neighbours_of(msg.site)) & set(self.adverts)
        if set(msg.ciphertexts) != allowed:
            raise ProtocolViolation(
                f"site {msg.site} must send one share box to each of its {len(allowed)} "
                "advertising neighbours"
            )
        if len(msg.b_commitment) != 32:
            raise ProtocolViolation(f"site {msg.site}: malformed commitment")
        self.shared[msg.site] = msg

    def share_boxes(self) -> dict[int, dict[int, bytes]]:
        """For each site that shared keys: {sender: box} from neighbours that also did."""
        self._expect(2)
        self._stage = 3
        self._check_alive(self.shared, "shared keys")
        return {
            v: {u: self.shared[u].ciphertexts[v] for u in self._u2(v)} for v in sorted(self.shared)
        }

    def _u2(self, site: int) -> list[int]:
        return [u for u in self.cfg.neighbours_of(site) if u in self.shared]

    # stage 3 -> 4
    def add_masked(self, msg: MaskedInput) -> None:
        """Keep one masked vector; a malformed one raises and its sender counts as dropped."""
        self._expect(3)
        if msg.site not in self.shared:
            raise ProtocolViolation(f"site {msg.site} sent a masked input without sharing keys")
        vec = msg.vector
        if not isinstance(vec, np.ndarray) or vec.dtype != np.uint32 or vec.ndim != 1:
            raise MaskedInputError(
                f"site {msg.site}: a masked vector must be 1-D uint32, got "
                f"{getattr(vec, 'dtype', type(vec).__name__)}"
            )
        if vec.size != self.cfg.dim + 1:
            raise MaskedInputError(
                f"site {msg.site}: masked vector of {vec.size} values, expected {self.cfg.dim + 1}"
            )
        neighbours = set(self._u2(msg.site))
        for u in msg.bad_senders:
            if u not in neighbours:
                raise ProtocolViolation(f"site {msg.site} accuses site {u}, not its neighbour")
        for u in msg.bad_senders:
            self._bad.setdefault(u, set()).add(msg.site)
        self._masked[msg.site] = vec

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Close stage 3: who survived, who dropped; what each survivor must reveal."""
        self._expect(3)
        self._stage = 4
        survivors = self.survivors()
        t = self.cfg.threshold
        if len(survivors) < t:
            raise SecAggAborted(
                f"only {len(survivors)} sites sent a valid masked input; the threshold is {t}"
            )
        dropped = set(self.shared) - set(survivors)
        self._requests = {
            v: UnmaskRequest(
                survivors=tuple(u for u in self._u2(v) if u in survivors),
                dropped=tuple(u for u in self._u2(v) if u in dropped),
            )
            for v in survivors
        }
        return dict(self._requests)

    def survivors(self) -> tuple[int, ...]:
        return tuple(sorted(u for u in self._masked if u not in self._bad))

    def unmask(self, replies: Iterable[UnmaskReply]) -> Aggregate:
        """Recover the seeds, remove every mask from the sum, return the weighted mean."""
        self._expect(4)
        self._stage = 5
        cfg = self.cfg
        survivors = self.survivors()
        dropped = tuple(sorted(set(self.shared) - set(survivors)))
        b_shares: dict[int, list[tuple[int, bytes]]] = {u: [] for u in survivors}
        s_shares: dict[int, list[tuple[int, bytes]]] = {u: [] for u in dropped}
        for r in replies:
            req = self._requests.get(r.site)
            if req is None:
                continue  # not a survivor: nothing was asked of it
            if not set(r.b_shares) <= set(req.survivors) or not set(r.s_shares) <= set(req.dropped):
                raise ProtocolViolation(f"site {r.site} revealed shares it was not asked for")
            for u, share in r.b_shares.items():
                if u not in self._bad or r.site not in self._bad[u]:
                    b_shares[u].append((r.site, share))
            for u, share in r.s_shares.items():
                if r.site not in self._bad.get(u, set()):
                    s_shares[u].append((r.site, share))
        b_seeds = self._recover(b_shares, _B_LIMBS, "self-mask seed")
        s_keys = self._recover(s_shares, _SK_LIMBS, "mask key")
        for u, b in b_seeds.items():
            if _commit(cfg.context, u, b) != self.shared[u].b_commitment:
                raise SecAggAborted(f"the shares of site {u}'s self-mask seed are inconsistent")
        for u, sk in s_keys.items():
            if _raw_public(X25519PrivateKey.from_private_bytes(sk)) != self.adverts[u].s_public:
                raise SecAggAborted(f"the shares of site {u}'s mask key are inconsistent")

        total = np.zeros(cfg.dim + 1, dtype=np.uint32)
        for u in survivors:  # masked vectors only; no single update is ever unmasked
            np.add(total, self._masked[u], out=total)
        expander = MaskExpander(cfg.dim + 1)
        for u in survivors:
            expander.add(total, b_seeds[u], -1)
        for u, sk in s_keys.items():
            private = X25519PrivateKey.from_private_bytes(sk)
            for w in self._u2(u):
                if w not in survivors:
                    continue
                lo, hi = min(u, w), max(u, w)
                seed = _mask_seed(private, self.adverts[w].s_public, lo, hi, cfg.context)
                # survivor w added +mask if w < u else -mask; take it out again
                expander.add(total, seed, -1 if w < u else 1)
        count = int(total[-1])
        mean = dequantize_sum(
            total[:-1], clip=cfg.clip, max_weight=cfg.max_weight, sites=cfg.sites, count=count
        )
        return Aggregate(
            mean=mean,
            count=count,
            total=total,
            survivors=survivors,
            dropped=tuple(u for u in dropped if u not in self._bad),
            excluded=tuple(sorted(u for u in self._bad if u in self.shared)),
            error_bound=cfg.error_bound(count),
        )

    def _recover(
        self, shares: Mapping[int, list[tuple[int, bytes]]], limbs: int, what: str
    ) -> dict[int, bytes]:
        t = self.cfg.threshold
        short = [u for u, got in shares.items() if len(got) < t]
        if short:
            raise SecAggAborted(
                f"fewer than t = {t} shares of the {what} of sites {short}; "
                "the round cannot be unmasked"
            )
        order = sorted(shares)
        if not order:
            return {}
        xs = np.array([[x for x, _ in shares[u][:t]] for u in order], dtype=np.int64)
        ys = np.array(
            [[np.frombuffer(s, dtype="<u4") for _, s in shares[u][:t]] for u in order],
            dtype=np.int64,
        )
        if ys.shape[2] != limbs:
            raise ProtocolViolation(f"a share of a {what} has the wrong size")
        try:
            secrets = shamir.from_limbs(shamir.recover(xs, ys, t))
        except shamir.ShamirError as e:
            raise SecAggAborted(f"the {what} shares do not recover: {e}") from None
        return {u: secrets[i] for i, u in enumerate(order)}

    def _expect(self, stage: int) -> None:
        if self._stage != stage:
            raise ProtocolViolation(f"the server is at stage {self._stage}, not {stage}")

    def _check_alive(self, present: Mapping[int, object], what: str) -> None:
        if len(present) < self.cfg.threshold:
            raise SecAggAborted(
                f"only {len(present)} sites {what}; the threshold is {self.cfg.threshold}"
            )
