"""Teacher -> student layer mappings: known answers and validation errors."""

import pytest

from distill.mapping import layer_mapping, seed_attention_layers, seed_layer_mapping, validate_pairs
from vishwam.errors import ConfigError


@pytest.mark.parametrize(
    "s, t, expected",
    [
        (4, 8, ((0, 1), (1, 3), (2, 5), (3, 7))),
        (3, 7, ((0, 1), (1, 4), (2, 6))),  # 7/3 = 2.33: round(2.33)-1, round(4.67)-1, 7-1
        (4, 6, ((0, 1), (1, 2), (2, 4), (3, 5))),  # 1.5 and 4.5 round half up
        (5, 5, tuple((i, i) for i in range(5))),
        (1, 9, ((0, 8),)),
    ],
)
def test_uniform_known(s, t, expected):
    assert layer_mapping("uniform", student_layers=s, teacher_layers=t) == expected


def test_seed_known():
    pairs = layer_mapping("seed", student_layers=8, teacher_layers=24)
    assert pairs == ((0, 0), (1, 1), (2, 2), (3, 5), (4, 9), (5, 15), (6, 22), (7, 23))
    assert seed_attention_layers(student_layers=8, teacher_layers=24) == ((6, 22), (7, 23))
    assert layer_mapping("seed", student_layers=4, teacher_layers=8) == ((0, 0), (1, 1), (2, 4), (3, 7))
    assert layer_mapping("seed", student_layers=1, teacher_layers=3) == ((0, 2),)
    assert layer_mapping("seed", student_layers=8, teacher_layers=24, k=3)[-3:] == ((5, 21), (6, 22), (7, 23))
    assert seed_attention_layers(student_layers=8, teacher_layers=24, k=3) == ((5, 21), (6, 22), (7, 23))


@pytest.mark.parametrize("s", range(1, 13))
@pytest.mark.parametrize("extra", [0, 1, 2, 5, 17])
def test_seed_properties(s, extra):
    t = s + extra
    pairs = seed_layer_mapping(student_layers=s, teacher_layers=t)
    assert [p[0] for p in pairs] == list(range(s))
    teach = [p[1] for p in pairs]
    assert all(a < b for a, b in zip(teach, teach[1:])) and 0 <= teach[0] and teach[-1] == t - 1
    head = min(s // 4, s - max(1, s // 4))
    assert pairs[:head] == tuple((i, i) for i in range(head))
    tail = seed_attention_layers(student_layers=s, teacher_layers=t)
    assert pairs[-len(tail):] == tail
    assert tail == tuple((s - len(tail) + j, t - len(tail) + j) for j in range(len(tail)))
    # Progressive: gaps through the middle never shrink by more than rounding (checked on a roomy case below).


def test_seed_middle_stride_grows():
    pairs = seed_layer_mapping(student_layers=12, teacher_layers=48)
    head = 3
    teach = [t for _, t in pairs[head - 1 : -2]]  # last dense, the middle, first final
    gaps = [b - a for a, b in zip(teach, teach[1:])]
    assert all(b >= a for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] > gaps[0]


def test_last_k():
    assert layer_mapping("last_k", student_layers=4, teacher_layers=8, k=2) == ((2, 6), (3, 7))
    assert layer_mapping("last_k", student_layers=6, teacher_layers=3, k=3) == ((3, 0), (4, 1), (5, 2))


def test_explicit_sorts_and_validates():
    pairs = layer_mapping("explicit", student_layers=4, teacher_layers=8, pairs=[(3, 7), (0, 1), [1, 4]])
    assert pairs == ((0, 1), (1, 4), (3, 7))


@pytest.mark.parametrize(
    "pairs, match",
    [
        ([(0, 1), (4, 7)], r"\(4, 7\).*student layer 4 out of range"),
        ([(-1, 1)], r"student layer -1 out of range"),
        ([(0, 8)], r"\(0, 8\).*teacher layer 8 out of range"),
        ([(1, 2), (1, 5)], r"student layer 1 mapped twice"),
        ([(0, 5), (1, 5)], r"pair \(1, 5\) is not monotone"),
        ([(0, 5), (2, 3)], r"pair \(2, 3\) is not monotone"),
        ([], r"no pairs given"),
        ([(0, 1, 2)], r"not a \(student_layer, teacher_layer\)"),
    ],
)
def test_explicit_errors(pairs, match):
    with pytest.raises(ConfigError, match=match):
        layer_mapping("explicit", student_layers=4, teacher_layers=8, pairs=pairs)


def test_strategy_errors():
    with pytest.raises(ConfigError, match="unknown strategy 'zigzag'"):
        layer_mapping("zigzag", student_layers=2, teacher_layers=4)
    with pytest.raises(ConfigError, match=r"strategy 'uniform' .* more layers \(5\) than the teacher \(4\)"):
        layer_mapping("uniform", student_layers=5, teacher_layers=4)
    with pytest.raises(ConfigError, match=r"strategy 'seed' .* more layers \(5\) than the teacher \(4\)"):
        layer_mapping("seed", student_layers=5, teacher_layers=4)
    with pytest.raises(ConfigError, match=r"k=5 out of range"):
        layer_mapping("last_k", student_layers=4, teacher_layers=8, k=5)
    with pytest.raises(ConfigError, match=r"k=0 out of range"):
        layer_mapping("last_k", student_layers=4, teacher_layers=8, k=0)
    with pytest.raises(ConfigError, match="needs `k`"):
        layer_mapping("last_k", student_layers=4, teacher_layers=8)
    with pytest.raises(ConfigError, match="needs `pairs`"):
        layer_mapping("explicit", student_layers=4, teacher_layers=8)
    with pytest.raises(ConfigError, match="`k` is only used"):
        layer_mapping("uniform", student_layers=4, teacher_layers=8, k=2)
    with pytest.raises(ConfigError, match="`pairs` is only used"):
        layer_mapping("uniform", student_layers=4, teacher_layers=8, pairs=[(0, 0)])
    with pytest.raises(ConfigError, match="student_layers must be a positive int, got 0$"):
        layer_mapping("uniform", student_layers=0, teacher_layers=8)
    with pytest.raises(ConfigError, match=r"k=9 out of range"):
        seed_attention_layers(student_layers=8, teacher_layers=24, k=9)


def test_validate_pairs_returns_tuple():
    assert validate_pairs([[2, 3], [0, 0]], student_layers=3, teacher_layers=4) == ((0, 0), (2, 3))
