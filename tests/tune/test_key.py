"""Study keys: the shape bucket rule, stable readable names, and what makes two studies different."""
from __future__ import annotations

import dataclasses

import pytest

from opgen.tune.key import GENERATOR_VERSION, KeyParts, StudyKey, bucket_dim, bucket_distance, study_key


def parts(**kw) -> KeyParts:
    base = dict(op_name="scan", op_fingerprint="ab" * 32, dims={"B": 2, "L": 1000, "D": 64}, dtypes=("float32",),
                target="tvm", target_fingerprint="cpu-1")
    base.update(kw)
    return KeyParts.of(**base)


def test_bucket_rule():
    assert [bucket_dim(n) for n in (1, 3, 7, 16)] == [1, 3, 7, 16]           # small dims are exact
    assert [bucket_dim(n) for n in (17, 32, 33, 1000, 1024, 1025)] == [32, 32, 64, 1024, 1024, 2048]
    with pytest.raises(ValueError):
        bucket_dim(0)


def test_name_is_readable_and_stable():
    k = study_key(parts(), "space-1")
    assert k.bucket == (("B", 2), ("L", 1024), ("D", 64))
    # a literal: the name must not change between processes, machines or Python versions
    assert k.name == f"opgen/scan/float32/B2-L1024-D64/tvm/g{GENERATOR_VERSION}/{k.digest}"
    assert k.digest == study_key(parts(), "space-1").digest and len(k.digest) == 12
    assert StudyKey.from_dict(k.as_dict()) == k


def test_same_bucket_same_study_and_what_separates_studies():
    k = study_key(parts(), "s")
    assert study_key(parts(dims={"B": 2, "L": 600, "D": 64}), "s").name == k.name
    others = [study_key(parts(dims={"B": 3, "L": 1000, "D": 64}), "s"),
              study_key(parts(dtypes=("bfloat16",)), "s"),
              study_key(parts(target_fingerprint="cpu-2"), "s"),
              study_key(parts(op_fingerprint="cd" * 32), "s"),
              study_key(parts(), "s2"),
              study_key(parts(), "s", generator=GENERATOR_VERSION + 1)]
    assert len({o.name for o in others} | {k.name}) == len(others) + 1
    # the family ignores only the bucket
    assert others[0].family == k.family and all(o.family != k.family for o in others[1:])


def test_exact_dims_are_not_rounded():
    k = study_key(parts(dims={"K": 31, "L": 1000}, exact={"K"}), "s")
    assert dict(k.bucket) == {"K": 31, "L": 1024}


def test_bucket_distance():
    assert bucket_distance((("L", 1024),), (("L", 1024),)) == 0
    assert bucket_distance((("L", 1024), ("B", 2)), (("L", 4096), ("B", 4))) == 3
    assert bucket_distance((("L", 1024),), (("M", 1024),)) == float("inf")


def test_key_parts_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts().op_name = "x"
