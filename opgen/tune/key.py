"""The study key: which measurements may share one Optuna study, and the study's stable name.

A study holds the trials of one (op fingerprint, shape bucket, dtypes, target fingerprint, generator
version, space fingerprint). Anything that changes which configs exist or how fast they run gets a new
study: a new space changes the knobs (Optuna refuses a categorical whose choices changed), a new generator
renders different code, a new device or library version times differently.

Shape bucket rule (:func:`bucket_dim`): a dim ``n <= 16`` is kept exact (small dims such as a kernel
width, a head count or a state size change the code, not just the trip count); a larger dim is rounded
up to the next power of two (17..32 -> 32, 1025..2048 -> 2048). Dims named in ``KeyParts.exact`` are
never rounded (a conv kernel of 31 is not a kernel of 32). The trials of a study record the concrete
dims they were measured at (user attr ``dims``).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Iterable, Mapping

#: Bump when the code generator's output changes (old tuning results then stop matching).
GENERATOR_VERSION = 1
#: Bump when the tuner's param encoding changes (see :mod:`opgen.tune.encode`); old studies would not load.
TUNER_VERSION = 1
#: Dims up to this size are kept exact in the shape bucket.
EXACT_UP_TO = 16


def bucket_dim(n: int) -> int:
    """The bucket of one dim: exact up to :data:`EXACT_UP_TO`, else the next power of two (``n`` included)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"a dim must be a positive integer, got {n}")
    return n if n <= EXACT_UP_TO else 1 << (n - 1).bit_length()


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short hex sha256 of JSON-encodable ``parts`` (dataclasses are encoded as dicts)."""
    def enc(o: Any) -> Any:
        if is_dataclass(o) and not isinstance(o, type):
            return asdict(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o, key=repr)
        return repr(o)
    text = json.dumps(parts, sort_keys=True, default=enc, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def target_fingerprint(target: Any, versions: Mapping[str, str] | None = None) -> str:
    """A fingerprint of a target: its name, its capability record and the versions of its libraries."""
    caps = target.caps() if hasattr(target, "caps") else None
    return fingerprint(getattr(target, "name", str(target)), caps, dict(versions or {}))


@dataclass(frozen=True)
class KeyParts:
    """What a problem tells the tuner about itself; ``dims`` are the concrete sizes, in the op's order."""

    op_name: str
    op_fingerprint: str
    dims: tuple[tuple[str, int], ...]
    dtypes: tuple[str, ...]
    target: str
    target_fingerprint: str
    exact: frozenset[str] = field(default_factory=frozenset)

    @staticmethod
    def of(op_name: str, op_fingerprint: str, dims: Mapping[str, int], dtypes: Iterable[str] | str, target: str,
           target_fingerprint: str, exact: Iterable[str] = ()) -> "KeyParts":
        dtypes = (dtypes,) if isinstance(dtypes, str) else tuple(dtypes)
        return KeyParts(op_name, op_fingerprint, tuple((str(k), int(v)) for k, v in dims.items()), dtypes, target,
                        target_fingerprint, frozenset(exact))

    def bucket(self) -> tuple[tuple[str, int], ...]:
        return tuple((k, v if k in self.exact else bucket_dim(v)) for k, v in self.dims)


@dataclass(frozen=True)
class StudyKey:
    """The identity of one study. :attr:`name` is readable and stable across processes and machines."""

    op_name: str
    op_fingerprint: str
    bucket: tuple[tuple[str, int], ...]
    dtypes: tuple[str, ...]
    target: str
    target_fingerprint: str
    space_fingerprint: str
    generator: int = GENERATOR_VERSION
    tuner: int = TUNER_VERSION

    @property
    def digest(self) -> str:
        """12 hex digits over every field (the full fingerprints, not just the readable prefix)."""
        return fingerprint(self.as_dict(), length=12)

    @property
    def family(self) -> str:
        """A hash of everything but the bucket: studies of one family differ only in shape (warm start)."""
        d = self.as_dict()
        d.pop("bucket")
        return fingerprint(d, length=12)

    @property
    def name(self) -> str:
        """``opgen/<op>/<dtypes>/<bucket>/<target>/g<generator>/<digest>``, e.g.
        ``opgen/cumsum/f32/R64-L4096/torch/g1/0a1b2c3d4e5f``."""
        dims = "-".join(f"{k}{v}" for k, v in self.bucket) or "scalar"
        return "/".join(["opgen", _slug(self.op_name), "-".join(map(_slug, self.dtypes)) or "any", dims,
                         _slug(self.target), f"g{self.generator}", self.digest])

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stored as the study's user attr ``opgen.key``)."""
        return {"op_name": self.op_name, "op_fingerprint": self.op_fingerprint,
                "bucket": [[k, v] for k, v in self.bucket], "dtypes": list(self.dtypes), "target": self.target,
                "target_fingerprint": self.target_fingerprint, "space_fingerprint": self.space_fingerprint,
                "generator": self.generator, "tuner": self.tuner}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "StudyKey":
        return StudyKey(d["op_name"], d["op_fingerprint"], tuple((k, int(v)) for k, v in d["bucket"]),
                        tuple(d["dtypes"]), d["target"], d["target_fingerprint"], d["space_fingerprint"],
                        int(d["generator"]), int(d["tuner"]))

    def __str__(self) -> str:
        return self.name


def study_key(parts: KeyParts, space_fingerprint: str, generator: int = GENERATOR_VERSION) -> StudyKey:
    """The key of the study that tunes ``parts`` over a space with ``space_fingerprint``."""
    return StudyKey(parts.op_name, parts.op_fingerprint, parts.bucket(), parts.dtypes, parts.target,
                    parts.target_fingerprint, space_fingerprint, generator)


def bucket_distance(a: Iterable[tuple[str, int]], b: Iterable[tuple[str, int]]) -> float:
    """How far apart two buckets are: the sum of |log2| ratios of same-named dims (inf if the names differ)."""
    da, db = dict(a), dict(b)
    if set(da) != set(db):
        return float("inf")
    return float(sum(abs(da[k].bit_length() - db[k].bit_length()) if da[k] != db[k] else 0 for k in da))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(s)) or "_"
