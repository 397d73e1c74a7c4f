"""Which student layer is matched to which teacher layer.

A mapping is a tuple of `(student_layer, teacher_layer)` pairs of 0-based layer numbers, sorted by student layer,
with teacher layers strictly increasing (deeper student layers learn from deeper teacher layers). "Layer `i`'s
output" is `hidden_states[i + 1]` of the model output. The pair order, shallow to deep, is the order every other
part of `distill` (projections, EPLB stages, per-pair losses) indexes pairs in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .errors import ConfigError

STRATEGIES = ("uniform", "seed", "last_k", "explicit")

Pairs = tuple[tuple[int, int], ...]


def validate_pairs(pairs: Sequence[Sequence[int]], *, student_layers: int, teacher_layers: int) -> Pairs:
    """Checks a mapping and returns it as a sorted tuple of int pairs.

    **Arguments:**

    - `pairs`: `(student_layer, teacher_layer)` pairs, in any order.
    - `student_layers`, `teacher_layers`: the layer counts of the two models.

    **Returns:**

    The pairs sorted by student layer. Raises `ConfigError` naming the first bad pair: malformed, out of range
    (negative or `>=` the layer count), a student layer mapped twice, or teacher layers that do not strictly
    increase with the student layer.
    """
    _check_counts(student_layers, teacher_layers)
    if len(pairs) == 0:
        raise ConfigError("layer mapping: no pairs given; map at least one student layer")
    clean = []
    for pair in pairs:
        if (len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in pair)):
            raise ConfigError(f"layer mapping: pair {tuple(pair)!r} is not a (student_layer, teacher_layer) int pair")
        s, t = int(pair[0]), int(pair[1])
        if not 0 <= s < student_layers:
            raise ConfigError(f"layer mapping: pair {(s, t)}: student layer {s} out of range [0, {student_layers})")
        if not 0 <= t < teacher_layers:
            raise ConfigError(f"layer mapping: pair {(s, t)}: teacher layer {t} out of range [0, {teacher_layers})")
        clean.append((s, t))
    clean.sort()
    for (s0, t0), (s1, t1) in zip(clean, clean[1:]):
        if s0 == s1:
            raise ConfigError(f"layer mapping: student layer {s1} mapped twice, pairs {(s0, t0)} and {(s1, t1)}")
        if t1 <= t0:
            raise ConfigError(
                f"layer mapping: pair {(s1, t1)} is not monotone: teacher layer must be > {t0} "
                f"(the teacher layer of student layer {s0})"
            )
    return tuple(clean)


def layer_mapping(
    strategy: str,
    *,
    student_layers: int,
    teacher_layers: int,
    k: int | None = None,
    pairs: Sequence[Sequence[int]] | None = None,
) -> Pairs:
    """Builds a teacher-to-student layer mapping.

    With `S` student and `T` teacher layers:

    - `uniform`: student layer `i` <-> teacher layer `round((i + 1) * T / S) - 1` (halves round up), so the last
      layer maps to the last layer and the stride is `T / S`. Needs `S <= T`.
    - `seed`: the project's original plan; see `seed_layer_mapping`. `k` optionally sets the number of final
      (attention-matched) pairs. Needs `S <= T`.
    - `last_k`: the last `k` student layers <-> the last `k` teacher layers, one to one (the uniform map of `k`
      layers onto `k` layers): `(S - k + j, T - k + j)` for `j < k`. Needs `1 <= k <= min(S, T)`.
    - `explicit`: the given `pairs`, validated and sorted.

    **Arguments:**

    - `strategy`: one of `uniform`, `seed`, `last_k`, `explicit`.
    - `student_layers`, `teacher_layers`: the layer counts of the two models.
    - `k`: the number of pairs for `last_k`, the number of final pairs for `seed`; not allowed otherwise.
    - `pairs`: the pairs for `explicit`; not allowed otherwise.

    **Returns:**

    A tuple of `(student_layer, teacher_layer)` pairs, sorted by student layer, teacher layers strictly
    increasing. Raises `ConfigError` on any bad input, naming it.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"layer mapping: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    _check_counts(student_layers, teacher_layers)
    if pairs is not None and strategy != "explicit":
        raise ConfigError(f"layer mapping: `pairs` is only used by the explicit strategy, not {strategy!r}")
    if k is not None and strategy not in ("last_k", "seed"):
        raise ConfigError(f"layer mapping: `k` is only used by the last_k and seed strategies, not {strategy!r}")

    if strategy == "explicit":
        if pairs is None:
            raise ConfigError("layer mapping: the explicit strategy needs `pairs`")
        return validate_pairs(pairs, student_layers=student_layers, teacher_layers=teacher_layers)
    if strategy == "last_k":
        if k is None:
            raise ConfigError("layer mapping: the last_k strategy needs `k`")
        _check_k(k, min(student_layers, teacher_layers), "min(student_layers, teacher_layers)")
        out = tuple((student_layers - k + j, teacher_layers - k + j) for j in range(k))
    else:
        _check_injective(strategy, student_layers, teacher_layers)
        if strategy == "uniform":
            out = tuple(
                (i, _round_half_up((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)
            )
        else:
            out = seed_layer_mapping(student_layers=student_layers, teacher_layers=teacher_layers, k=k)
    return validate_pairs(out, student_layers=student_layers, teacher_layers=teacher_layers)


def seed_layer_mapping(*, student_layers: int, teacher_layers: int, k: int | None = None) -> Pairs:
    """The `seed` mapping: dense at the bottom, a growing stride through the middle, the top matched to the top.

    With `S <= T` layers, `tail = k if k is not None else max(1, S // 4)` and `head = min(S // 4, S - tail)`:

    1. dense: student layer `i` <-> teacher layer `i` for `i < head` (the first ~25% of student layers);
    2. final: the last `tail` student layers <-> the last `tail` teacher layers one to one,
       `(S - tail + j, T - tail + j)`; these are the attention pairs (`seed_attention_layers`);
    3. progressive: the `m = S - head - tail` middle student layers go between teacher layers `head - 1` and
       `T - tail` (a span of `D = T - tail - head + 1`) with gaps growing linearly: the `m + 1` gaps are in the
       ratio `1 : 2 : ... : m + 1`, so middle layer `j` sits at `head - 1 + round(D * (j+1)(j+2) / ((m+1)(m+2)))`.
       Where rounding collides, an index is pushed to the next free teacher layer (always possible as `S <= T`).

    For example `S = 8, T = 24` gives `(0,0) (1,1) (2,2) (3,5) (4,9) (5,15) (6,22) (7,23)`.

    **Arguments:**

    - `student_layers`, `teacher_layers`: the layer counts `S <= T`.
    - `k`: the number of final (attention) pairs, `1 <= k <= S`; default `max(1, S // 4)`.

    **Returns:**

    The pairs, sorted by student layer.
    """
    _check_counts(student_layers, teacher_layers)
    _check_injective("seed", student_layers, teacher_layers)
    s, t = student_layers, teacher_layers
    tail = _seed_tail(s, k)
    head = min(s // 4, s - tail)
    m = s - head - tail
    dense = [(i, i) for i in range(head)]
    final = [(s - tail + j, t - tail + j) for j in range(tail)]
    lo, hi = head, t - tail - 1  # the free teacher layers, inclusive
    span = t - tail - head + 1
    middle, prev = [], lo - 1
    for j in range(m):
        ideal = head - 1 + _round_half_up(span * (j + 1) * (j + 2) / ((m + 1) * (m + 2)))
        # At least one past the previous pick, and leave a free layer for each middle layer still to place.
        idx = min(max(ideal, prev + 1), hi - (m - 1 - j))
        middle.append((head + j, idx))
        prev = idx
    return tuple(dense + middle + final)


def seed_attention_layers(*, student_layers: int, teacher_layers: int, k: int | None = None) -> Pairs:
    """The pairs of the `seed` mapping matched on attention patterns: its final `k` (default `max(1, S // 4)`)
    pairs, the last student layers <-> the last teacher layers one to one.

    **Arguments:** as `seed_layer_mapping`.

    **Returns:**

    The final pairs of `seed_layer_mapping(...)`, a suffix of it.
    """
    _check_counts(student_layers, teacher_layers)
    _check_injective("seed", student_layers, teacher_layers)
    tail = _seed_tail(student_layers, k)
    return seed_layer_mapping(student_layers=student_layers, teacher_layers=teacher_layers, k=k)[-tail:]


def attention_pairs(pairs: Pairs, attention_layers: Sequence[int], *, strategy: str, k: int | None,
                    student_layers: int, teacher_layers: int) -> Pairs:
    """The pairs whose attention is matched.

    `attention_layers` (the config's `distillation_params.attention_layers`) names student layers; each is paired
    with its teacher layer in `pairs`, or, when the mapping leaves it out, with its `uniform` teacher layer.
    Without `attention_layers`: the `seed` strategy's final layers (`seed_attention_layers`), else the last pair.
    """
    if attention_layers:
        teacher_of = dict(pairs)
        uniform = dict(layer_mapping("uniform", student_layers=student_layers, teacher_layers=teacher_layers))
        for s in attention_layers:
            if not 0 <= s < student_layers:
                raise ConfigError(f"config key 'distillation_params.attention_layers' names student layer {s}, "
                                  f"out of range for {student_layers} layers")
        chosen = tuple((s, teacher_of.get(s, uniform[s])) for s in attention_layers)
    elif strategy == "seed":
        chosen = seed_attention_layers(student_layers=student_layers, teacher_layers=teacher_layers, k=k)
    else:
        chosen = tuple(pairs[-1:])
    return validate_pairs(chosen, student_layers=student_layers, teacher_layers=teacher_layers)


def _seed_tail(student_layers: int, k: int | None) -> int:
    if k is None:
        return max(1, student_layers // 4)
    _check_k(k, student_layers, "student_layers")
    return k


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even; a mapping should not depend on that.
    return math.floor(x + 0.5)


def _check_counts(student_layers: int, teacher_layers: int) -> None:
    for name, n in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"layer mapping: {name} must be a positive int, got {n!r}")


def _check_injective(strategy: str, student_layers: int, teacher_layers: int) -> None:
    if student_layers > teacher_layers:
        raise ConfigError(
            f"layer mapping: strategy {strategy!r} maps each student layer to its own teacher layer, but the "
            f"student has more layers ({student_layers}) than the teacher ({teacher_layers}); use last_k or explicit"
        )


def _check_k(k: int, upper: int, upper_name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= upper:
        raise ConfigError(f"layer mapping: k={k!r} out of range [1, {upper_name}={upper}]")
