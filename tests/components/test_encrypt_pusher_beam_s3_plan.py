"""The plan of an S3 object assembled from a head and part objects
(`storage._assemble.plan_multipart`): which ranges are copied server-side,
which are fetched and joined by the driver. Pure: no store needed.

A Beam bundle on s3:// is its header (bytes the driver holds) followed by
every payload's part objects; S3 wants every multipart part but the last
to be at least 5 MiB, and a payload's last part (and the header) is
usually shorter.
"""

import random

import pytest

from tfx_encrypt import errors
from tfx_encrypt.storage import _assemble
from tfx_encrypt.storage._assemble import Piece, PlannedPart

MIB = 1 << 20
MIN = _assemble.S3_MIN_PART


def _check(plan, sizes, local=(0,), min_part=MIN, max_part=None):
  """The plan covers the sources exactly, in order; S3's limits hold; the
  driver never copies local bytes and holds < 2 * min_part at a time."""
  max_part = max_part or _assemble.S3_MAX_PART
  pieces = []
  for k, part in enumerate(plan):
    assert (part.copy is None) != (not part.join), part
    if k < len(plan) - 1:
      assert part.size >= min_part, (k, part)
    assert 0 < part.size <= max_part
    if part.copy:
      assert part.copy.source not in local
      pieces.append(part.copy)
    else:
      assert part.size < 2 * min_part, (k, part)
      pieces.extend(part.join)
  want = [(i, n) for i, n in enumerate(sizes) if n]
  pos = {}
  for p in pieces:
    assert p.end > p.start
    assert p.start == pos.get(p.source, 0), (p, pos)
    pos[p.source] = p.end
  assert sorted(pos.items()) == want
  order = [p.source for p in pieces]
  assert order == sorted(order)
  return plan


def _fetched(plan, local=(0,)):
  return sum(p.size for part in plan for p in part.join
             if p.source not in local)


def test_tiny_parts_are_one_joined_part():
  sizes = [1000, 100, 56, 300]
  plan = _check(_assemble.plan_multipart(sizes, local={0}), sizes)
  assert plan == [PlannedPart(join=(Piece(0, 0, 1000), Piece(1, 0, 100),
                                    Piece(2, 0, 56), Piece(3, 0, 300)))]


def test_single_part():
  # Alone, any size is fine: it is the last part.
  for n in (10, MIN - 1, MIN, 7 * MIB):
    assert _check(_assemble.plan_multipart([0, n], local={0}), [0, n]) == [
        PlannedPart(copy=Piece(1, 0, n))]
  # After a header: the header needs MIN - 500 bytes of it; the rest is
  # copied (the last part may be short).
  sizes = [500, 7 * MIB]
  assert _check(_assemble.plan_multipart(sizes, local={0}), sizes) == [
      PlannedPart(join=(Piece(0, 0, 500), Piece(1, 0, MIN - 500))),
      PlannedPart(copy=Piece(1, MIN - 500, 7 * MIB))]
  sizes = [500, 3 * MIB]  # too short to split: one joined part
  assert _check(_assemble.plan_multipart(sizes, local={0}), sizes) == [
      PlannedPart(join=(Piece(0, 0, 500), Piece(1, 0, 3 * MIB)))]


def test_parts_just_under_5_mib_are_joined():
  sizes = [1024, MIN - 1, MIN - 1, 10]
  plan = _check(_assemble.plan_multipart(sizes, local={0}), sizes)
  # 1024 + (MIN - 1) >= MIN: one part; the next alone is short: joined
  # with the last.
  assert plan == [
      PlannedPart(join=(Piece(0, 0, 1024), Piece(1, 0, MIN - 1))),
      PlannedPart(join=(Piece(2, 0, MIN - 1), Piece(3, 0, 10)))]


def test_parts_just_over_5_mib():
  sizes = [1024, MIN + 1, MIN + 1, 10]
  plan = _check(_assemble.plan_multipart(sizes, local={0}), sizes)
  # The header takes MIN - 1024 bytes of part 1; what is left of it (1025
  # bytes) cannot be copied alone, so part 1 is joined whole; part 2 is
  # copied, and the last one too.
  assert plan == [
      PlannedPart(join=(Piece(0, 0, 1024), Piece(1, 0, MIN + 1))),
      PlannedPart(copy=Piece(2, 0, MIN + 1)),
      PlannedPart(copy=Piece(3, 0, 10))]
  # Without a header, parts of >= MIN are copied as they are (the
  # directory form: no byte through the driver).
  sizes = [0, MIN, MIN + 1, 10]
  plan = _check(_assemble.plan_multipart(sizes, local={0}), sizes)
  assert all(p.copy for p in plan) and len(plan) == 3


def test_no_cascade_through_parts_of_exactly_5_mib():
  """A payload cut into 5 MiB parts after a short header: only the first
  part is joined; the others are copied (never the whole payload through
  the driver)."""
  sizes = [3000] + [MIN] * 20 + [123]
  plan = _check(_assemble.plan_multipart(sizes, local={0}), sizes)
  assert plan[0] == PlannedPart(join=(Piece(0, 0, 3000), Piece(1, 0, MIN)))
  assert all(p.copy for p in plan[1:])
  assert _fetched(plan) == MIN


def test_header_bigger_than_5_mib():
  head = 12 * MIB + 3
  sizes = [head, 6 * MIB, 100]
  plan = _check(_assemble.plan_multipart(sizes, local={0}), sizes)
  assert plan[0] == PlannedPart(join=(Piece(0, 0, MIN),))
  assert plan[1] == PlannedPart(join=(Piece(0, MIN, 2 * MIN),))
  # 2 MiB + 3 of header left; 6 MiB of part 1 minus what fills the part
  # is 3 MiB + 3: too short to copy, so part 1 is joined whole.
  assert plan[2] == PlannedPart(join=(Piece(0, 2 * MIN, head),
                                      Piece(1, 0, 6 * MIB)))
  assert plan[3] == PlannedPart(copy=Piece(2, 0, 100))


def test_many_payloads_fetch_less_than_10_mib_each():
  """A bundle of many payloads, each with a short last part: per payload
  boundary the driver fetches less than 2 x 5 MiB."""
  rng = random.Random(7)
  sizes = [40_000]
  for _ in range(50):
    sizes += [MIN] * rng.randrange(0, 4) + [rng.randrange(56, MIN)]
  plan = _check(_assemble.plan_multipart(sizes, local={0}), sizes)
  assert _fetched(plan) < 50 * 2 * MIN
  assert max(p.size for p in plan if p.join) < 2 * MIN


def test_copies_larger_than_the_part_maximum_are_split():
  plan = _check(_assemble.plan_multipart([0, 23, 3], min_part=5,
                                         max_part=10), [0, 23, 3],
                min_part=5, max_part=10)
  assert plan == [PlannedPart(copy=Piece(1, 0, 7)),
                  PlannedPart(copy=Piece(1, 7, 15)),
                  PlannedPart(copy=Piece(1, 15, 23)),
                  PlannedPart(copy=Piece(2, 0, 3))]


def test_random_plans_keep_the_limits():
  rng = random.Random(1)
  for _ in range(3000):
    min_part = rng.randrange(1, 9)
    max_part = rng.randrange(2 * min_part, 6 * min_part + 1)
    sizes = [rng.choice([0, rng.randrange(0, 4 * min_part)])]
    sizes += [rng.choice([0, 1, min_part - 1, min_part, min_part + 1,
                          rng.randrange(1, 5 * max_part)])
              for _ in range(rng.randrange(0, 8))]
    if not any(sizes):
      continue
    plan = _assemble.plan_multipart(sizes, local={0}, min_part=min_part,
                                    max_part=max_part)
    _check(plan, sizes, min_part=min_part, max_part=max_part)


def test_too_many_parts_is_refused_up_front():
  with pytest.raises(errors.UsageError, match='10000'):
    _assemble.plan_multipart([0] + [MIN] * 10001, local={0})
  with pytest.raises(ValueError):
    _assemble.plan_multipart([1], min_part=0)
