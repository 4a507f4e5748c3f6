"""VNN-LIB parsing: the forms used in VNN-COMP benchmarks, the DNF, and every error path.

The texts are small inline models of the real files (mnistfc, acasxu, nn4sys, ...), so the
tests need no benchmark checkout.
"""

from __future__ import annotations

import gzip
import itertools
import pathlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from certdistill.io.vnnlib import (
    MAX_CONJUNCTIONS,
    OutputConstraint,
    VnnlibError,
    VnnlibProperty,
    parse_vnnlib,
)


def declare(n_in: int, n_out: int) -> str:
    xs = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    ys = "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    return xs + ys


def box(lower, upper) -> str:
    return "".join(
        f"(assert (<= X_{i} {float(hi)!r}))\n(assert (>= X_{i} {float(lo)!r}))\n"
        for i, (lo, hi) in enumerate(zip(lower, upper, strict=True))
    )


def error_of(text, **kwargs) -> VnnlibError:
    with pytest.raises(VnnlibError) as info:
        parse_vnnlib(text, **kwargs)
    return info.value


# -- the benchmark forms ------------------------------------------------------------------


def mnist_text(label: int = 8, n_in: int = 6, eps: float = 0.03) -> str:
    x = np.linspace(0.1, 0.9, n_in)
    branches = "".join(f"    (and (>= Y_{j} Y_{label}))\n" for j in range(10) if j != label)
    return (
        f"; Mnist property with label: {label}.\n\n"
        + declare(n_in, 10)
        + box(np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1))
        + f"(assert (or\n{branches}))\n"
    )


def test_mnistfc_box_and_margin_disjunction():
    prop = parse_vnnlib(mnist_text(), n_inputs=6, n_outputs=10)
    assert isinstance(prop, VnnlibProperty)
    assert (prop.n_inputs, prop.n_outputs, prop.path) == (6, 10, None)
    (case,) = prop.cases
    x = np.linspace(0.1, 0.9, 6)
    np.testing.assert_array_equal(case.lower, np.clip(x - 0.03, 0, 1))
    np.testing.assert_array_equal(case.upper, np.clip(x + 0.03, 0, 1))
    assert case.lower.dtype == np.float64 and case.lower.shape == (6,)
    assert len(case.disjuncts) == 9
    first = case.disjuncts[0]
    # (>= Y_0 Y_8)  ->  Y_8 - Y_0 <= 0
    expected = np.zeros((1, 10))
    expected[0, 8], expected[0, 0] = 1.0, -1.0
    np.testing.assert_array_equal(first.C, expected)
    np.testing.assert_array_equal(first.d, [0.0])
    assert prop.margin_form() == (8, (0, 1, 2, 3, 4, 5, 6, 7, 9))
    # Y_0 beats the label: a counterexample output; the label winning is safe.
    assert case.is_unsafe(np.eye(10)[0])
    assert not case.is_unsafe(np.eye(10)[8])


def test_acasxu_top_level_output_asserts_are_one_conjunction():
    text = (
        "; acas xu property 3\n"
        + declare(5, 5)
        + box([-0.3035, -0.0095, 0.4934, 0.3, 0.3], [-0.2986, 0.0095, 0.5, 0.5, 0.5])
        + "".join(f"(assert (<= Y_0 Y_{j}))\n" for j in range(1, 5))
    )
    prop = parse_vnnlib(text)
    (case,) = prop.cases
    (disjunct,) = case.disjuncts
    expected = np.zeros((4, 5))
    expected[:, 0] = 1.0
    expected[np.arange(4), np.arange(1, 5)] = -1.0
    np.testing.assert_array_equal(disjunct.C, expected)
    np.testing.assert_array_equal(disjunct.d, np.zeros(4))
    assert prop.margin_form() is None


def test_acasxu_single_output_threshold():
    text = declare(5, 5) + box([0.6, -0.5, -0.5, 0.45, -0.5], [0.68, 0.5, 0.5, 0.5, -0.45])
    prop = parse_vnnlib(text + "(assert (>= Y_0 3.991125645861615))\n")
    (disjunct,) = prop.cases[0].disjuncts
    np.testing.assert_array_equal(disjunct.C, [[-1.0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(disjunct.d, [-3.991125645861615])


def test_disjunctive_input_boxes_give_one_case_each():
    # acasxu prop_6 / nn4sys style: an `or` of pure input boxes, conjoined with an `or` of
    # outputs: 2 x 3 conjunctions, grouped into 2 cases of 3 disjuncts.
    text = (
        declare(2, 3)
        + "(assert (or\n"
        + "    (and (<= X_0 0.7) (>= X_0 -0.1) (<= X_1 0.5) (>= X_1 0.1))\n"
        + "    (and (<= X_0 0.7) (>= X_0 -0.1) (<= X_1 -0.1) (>= X_1 -0.5))\n"
        + "))\n"
        + "(assert (or\n    (and (<= Y_1 Y_0))\n    (and (<= Y_2 Y_0))\n    (and (<= Y_1 -3))\n))\n"
    )
    prop = parse_vnnlib(text)
    assert len(prop.cases) == 2
    np.testing.assert_array_equal(prop.cases[0].lower, [-0.1, 0.1])
    np.testing.assert_array_equal(prop.cases[0].upper, [0.7, 0.5])
    np.testing.assert_array_equal(prop.cases[1].lower, [-0.1, -0.5])
    np.testing.assert_array_equal(prop.cases[1].upper, [0.7, -0.1])
    for case in prop.cases:
        assert [d.C.tolist() for d in case.disjuncts] == [
            [[-1.0, 1.0, 0.0]],
            [[-1.0, 0.0, 1.0]],
            [[0.0, 1.0, 0.0]],
        ]
        assert [d.d.tolist() for d in case.disjuncts] == [[0.0], [0.0], [-3.0]]
    # Disjuncts are separate arrays, not views of one another.
    assert prop.cases[0].disjuncts[0].C is not prop.cases[1].disjuncts[0].C


def test_mixed_input_output_branches_nn4sys_style():
    text = (
        declare(1, 1)
        + "(assert (or\n"
        + "    (and (>= X_0 111) (<= X_0 184) (<= Y_0 -57))\n"
        + "    (and (>= X_0 111) (<= X_0 184) (>= Y_0 202))\n"
        + "    (and (>= X_0 200) (<= X_0 210) (>= Y_0 7.5))\n"
        + "))\n"
    )
    prop = parse_vnnlib(text, n_inputs=1, n_outputs=1)
    assert len(prop.cases) == 2
    first, second = prop.cases
    assert (first.lower.tolist(), first.upper.tolist()) == ([111.0], [184.0])
    assert [(d.C.tolist(), d.d.tolist()) for d in first.disjuncts] == [
        ([[1.0]], [-57.0]),
        ([[-1.0]], [-202.0]),
    ]
    assert (second.lower.tolist(), second.upper.tolist()) == ([200.0], [210.0])
    assert [(d.C.tolist(), d.d.tolist()) for d in second.disjuncts] == [([[-1.0]], [-7.5])]


def test_box_only_branch_means_every_output_is_unsafe():
    text = declare(1, 2) + "(assert (and (>= X_0 0) (<= X_0 1)))\n"
    (case,) = parse_vnnlib(text).cases
    (disjunct,) = case.disjuncts
    assert disjunct.C.shape == (0, 2) and disjunct.d.shape == (0,)
    assert case.is_unsafe(np.array([5.0, -5.0]))


def test_dnf_distributes_nested_or_and():
    text = (
        declare(1, 2)
        + "(assert (<= X_0 1)) (assert (>= X_0 0))\n"
        + "(assert (and (or (<= Y_0 1) (<= Y_1 2)) (or (>= Y_0 3) (and (>= Y_1 4) (<= Y_0 5)))))\n"
    )
    (case,) = parse_vnnlib(text).cases
    rows = [(d.C.tolist(), d.d.tolist()) for d in case.disjuncts]
    assert rows == [
        ([[1.0, 0.0], [-1.0, 0.0]], [1.0, -3.0]),
        ([[1.0, 0.0], [0.0, -1.0], [1.0, 0.0]], [1.0, -4.0, 5.0]),
        ([[0.0, 1.0], [-1.0, 0.0]], [2.0, -3.0]),
        ([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]], [2.0, -4.0, 5.0]),
    ]


def test_linear_terms_normal_form():
    text = (
        declare(1, 3)
        + "(assert (and (<= X_0 1) (>= X_0 0)))\n"
        + "(assert (<= (+ Y_0 (* 2 Y_1)) 3))\n"
        + "(assert (>= (- Y_0 Y_1 1.5) (* Y_2 -0.5)))\n"
        + "(assert (<= (- Y_2) (/ Y_1 4)))\n"
        + "(assert (<= (* 2 (+ Y_0 1)) Y_0))\n"
        + "(assert (> Y_1 (+ Y_1 Y_2 (- 0.25))))\n"
    )
    (disjunct,) = parse_vnnlib(text).cases[0].disjuncts
    np.testing.assert_array_equal(
        disjunct.C,
        [
            [1.0, 2.0, 0.0],  # Y_0 + 2 Y_1 <= 3
            [-1.0, 1.0, -0.5],  # -0.5 Y_2 <= Y_0 - Y_1 - 1.5
            [0.0, -0.25, -1.0],  # -Y_2 <= Y_1 / 4
            [1.0, 0.0, 0.0],  # 2 Y_0 + 2 <= Y_0
            [0.0, 0.0, 1.0],  # Y_1 + Y_2 - 0.25 < Y_1
        ],
    )
    np.testing.assert_array_equal(disjunct.d, [3.0, -1.5, 0.0, -2.0, 0.25])


def test_scaled_input_bound_and_equality():
    text = declare(3, 1) + (
        "(assert (<= (* 2 X_0) 1)) (assert (>= (* -4 X_0) 2))\n"  # X_0 <= 0.5, X_0 <= -0.5
        "(assert (>= X_0 -1))\n"
        "(assert (= X_1 0.25))\n"
        "(assert (<= -1 X_2 1))\n"  # chained: -1 <= X_2 <= 1
        "(assert (< Y_0 0))\n"
    )
    (case,) = parse_vnnlib(text).cases
    np.testing.assert_array_equal(case.lower, [-1.0, 0.25, -1.0])
    np.testing.assert_array_equal(case.upper, [-0.5, 0.25, 1.0])


def test_numbers_scientific_and_negative():
    text = declare(4, 1) + (
        "(assert (>= X_0 -0.5)) (assert (<= X_0 5.8147645177086815e-05))\n"
        "(assert (>= X_1 (- 0.5))) (assert (<= X_1 1E+2))\n"
        "(assert (>= X_2 -1.5e-3)) (assert (<= X_2 +2))\n"
        "(assert (>= X_3 (- 3))) (assert (<= X_3 .5))\n"
        "(assert (>= Y_0 -1e300))\n"
    )
    (case,) = parse_vnnlib(text).cases
    np.testing.assert_array_equal(case.lower, [-0.5, -0.5, -1.5e-3, -3.0])
    np.testing.assert_array_equal(case.upper, [5.8147645177086815e-05, 100.0, 2.0, 0.5])
    np.testing.assert_array_equal(case.disjuncts[0].d, [1e300])


def test_repeated_bounds_intersect():
    text = declare(1, 1) + (
        "(assert (<= X_0 1)) (assert (<= X_0 0.5)) (assert (<= X_0 2))\n"
        "(assert (>= X_0 -1)) (assert (>= X_0 -3)) (assert (>= X_0 0.25))\n"
        "(assert (>= Y_0 0))\n"
    )
    (case,) = parse_vnnlib(text).cases
    assert (case.lower.tolist(), case.upper.tolist()) == ([0.25], [0.5])


def test_comments_declare_fun_ignored_commands_and_booleans():
    text = (
        "(set-logic QF_LRA) ; bookkeeping\n"
        "(declare-fun X_0 () Real)\n"
        "(declare-const Y_0 Real) ; output\n"
        "(assert (and true (>= X_0 0) (<= X_0 1))) ; box\n"
        "(assert (or false (>= Y_0 1)))\n"
        "(assert (<= 0 1))\n"
        "(check-sat)\n(get-model)\n(exit)\n"
    )
    (case,) = parse_vnnlib(text).cases
    assert (case.lower.tolist(), case.upper.tolist()) == ([0.0], [1.0])
    assert [(d.C.tolist(), d.d.tolist()) for d in case.disjuncts] == [([[-1.0]], [-1.0])]


def test_unsatisfiable_formula_has_no_cases():
    text = declare(1, 1) + "(assert (>= X_0 0)) (assert (<= X_0 1)) (assert (or))\n"
    assert parse_vnnlib(text).cases == ()
    assert parse_vnnlib(text.replace("(or)", "(<= 1 0)")).cases == ()


def test_declarations_may_come_in_any_order():
    text = "(declare-const Y_0 Real)\n(declare-const X_1 Real)\n(declare-const X_0 Real)\n"
    prop = parse_vnnlib(text + box([0, 1], [2, 3]) + "(assert (<= Y_0 0))\n")
    np.testing.assert_array_equal(prop.cases[0].lower, [0.0, 1.0])


def test_margin_form_rejections():
    base = declare(1, 3) + "(assert (>= X_0 0)) (assert (<= X_0 1))\n"
    two_labels = base + "(assert (or (>= Y_0 Y_2) (>= Y_1 Y_0)))\n"
    assert parse_vnnlib(two_labels).margin_form() is None
    offset = base + "(assert (or (>= Y_0 (+ Y_2 1)) (>= Y_1 Y_2)))\n"
    assert parse_vnnlib(offset).margin_form() is None
    scaled = base + "(assert (or (>= (* 2 Y_0) (* 2 Y_2)) (>= (- Y_1 Y_2) 0)))\n"
    assert parse_vnnlib(scaled).margin_form() == (2, (0, 1))
    per_box = declare(1, 3) + (
        "(assert (or (and (>= X_0 0) (<= X_0 1) (>= Y_0 Y_2))\n"
        "            (and (>= X_0 2) (<= X_0 3) (>= Y_1 Y_2))))\n"
    )
    # Different classes in different boxes: not one robustness query.
    assert parse_vnnlib(per_box).margin_form() is None


def test_output_constraint_checks_shapes():
    with pytest.raises(ValueError, match="OutputConstraint"):
        OutputConstraint(C=np.zeros((2, 3)), d=np.zeros(3))


# -- sources --------------------------------------------------------------------------------


def test_paths_gzip_and_text_detection(tmp_path: pathlib.Path):
    text = mnist_text(label=3)
    plain = tmp_path / "prop.vnnlib"
    plain.write_text(text)
    packed = tmp_path / "prop.vnnlib.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    from_text = parse_vnnlib(text)
    for source in (plain, str(plain), packed, str(packed)):
        prop = parse_vnnlib(source)
        assert prop.path == str(source)
        assert prop.margin_form() == (3, (0, 1, 2, 4, 5, 6, 7, 8, 9))
        np.testing.assert_array_equal(prop.cases[0].lower, from_text.cases[0].lower)
    one_line = "(declare-const X_0 Real) (declare-const Y_0 Real) (assert (= X_0 1))"
    assert parse_vnnlib(one_line).cases[0].upper.tolist() == [1.0]
    with pytest.raises(FileNotFoundError):
        parse_vnnlib(str(tmp_path / "missing.vnnlib"))
    with pytest.raises(TypeError):
        parse_vnnlib(b"(declare-const X_0 Real)")


def test_errors_from_files_name_the_file(tmp_path: pathlib.Path):
    path = tmp_path / "broken.vnnlib.gz"
    path.write_bytes(
        gzip.compress(
            b"(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 Y_9))\n"
        )
    )
    err = error_of(path)
    assert (err.path, err.line) == (str(path), 3)
    assert str(err).startswith(f"{path}:3: ") and "Y_9" in str(err)
    assert isinstance(err, ValueError)


# -- errors, each with its line -------------------------------------------------------------

HEAD = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"  # lines 1-2
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n"  # lines 3-4


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (HEAD + BOX + "(assert (<= Y_0 1)))\n", 5, "unexpected ')'"),
        (HEAD + BOX + "(assert (or\n  (<= Y_0 1)\n  (>= Y_0 2)\n", 5, "never closed"),
        (HEAD + "(assert (and (>= X_0 0)\n(assert (<= X_0 1))\n", 3, "not closed before"),
        (HEAD + BOX + "(assrt (<= Y_0 1))\n", 5, "unknown command 'assrt'"),
        (HEAD + BOX + "Y_0\n", 5, "expected a command"),
        (HEAD + BOX + "(assert (not (<= Y_0 1)))\n", 5, "unsupported operator 'not'"),
        (
            HEAD + BOX + "(assert\n  (or (<= Y_0 1)\n      (=> (<= Y_0 1) (>= Y_0 2))))\n",
            7,
            "operator '=>'",
        ),
        (HEAD + BOX + "(assert (<= (max Y_0 1) 1))\n", 5, "operator 'max'"),
        (HEAD + BOX + "(assert (+ Y_0 1))\n", 5, "arithmetic term"),
        (HEAD + BOX + "(assert (<= Y_0 (<= Y_0 1)))\n", 5, "term was expected"),
        (HEAD + BOX + "(assert (<= Y_1 1))\n", 5, "undeclared variable 'Y_1'"),
        (HEAD + BOX + "(assert (or (<= Y_0 1)\n(>= X_3 2)))\n", 6, "undeclared variable 'X_3'"),
        (HEAD + BOX + "(assert (<= Y_0 eps))\n", 5, "undeclared symbol 'eps'"),
        (HEAD + "(declare-const X_0 Real)\n", 3, "declared twice (first at line 1)"),
        (HEAD + "(declare-const Z_0 Real)\n", 3, "invalid variable name 'Z_0'"),
        (HEAD + "(declare-const X_01 Real)\n", 3, "invalid variable name 'X_01'"),
        (HEAD + "(declare-const X_1 Int)\n", 3, "unsupported sort 'Int'"),
        (HEAD + "(declare-const X_1)\n", 3, "expected (declare-const NAME Real)"),
        (HEAD + "(declare-const X_2 Real)\n" + BOX, 3, "X_2 is declared but X_1 is not"),
        (
            "(declare-const X_0 Real)\n(declare-const Y_1 Real)\n" + BOX,
            2,
            "Y_1 is declared but Y_0 is not",
        ),
        (HEAD + BOX + "(assert (<= Y_0 0.5.3))\n", 5, "invalid numeric constant '0.5.3'"),
        (HEAD + BOX + "(assert (<= Y_0 nan))\n", 5, "invalid numeric constant 'nan'"),
        (HEAD + BOX + "(assert (<= Y_0 inf))\n", 5, "invalid numeric constant 'inf'"),
        (HEAD + BOX + "(assert (<= Y_0 1e999))\n", 5, "invalid numeric constant '1e999'"),
        (HEAD + BOX + "(assert (<= Y_0 1_0))\n", 5, "invalid numeric constant '1_0'"),
        (HEAD + BOX + "(assert (<= (* Y_0 Y_0) 1))\n", 5, "product of variables"),
        (HEAD + BOX + "(assert (<= (/ 1 Y_0) 1))\n", 5, "division by a variable"),
        (HEAD + BOX + "(assert (<= (/ Y_0 0) 1))\n", 5, "division by zero"),
        (HEAD + BOX + "(assert\n  (<= X_0 Y_0))\n", 6, "mixing inputs (X) and outputs (Y)"),
        (
            "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
            "(assert (<= (+ X_0 X_1) 1))\n",
            4,
            "coupling several inputs",
        ),
        (HEAD + "(assert (>= X_0 0))\n(assert (<= Y_0 1))\n", 1, "X_0 has no finite upper"),
        (HEAD + "(assert (<= X_0 0))\n(assert (<= Y_0 1))\n", 1, "X_0 has no finite lower"),
        (HEAD + "(assert (or (and (>= X_0 0) (<= X_0 1))\n(>= X_0 2)))\n", 1, "conjunction 1 of 2"),
        (
            HEAD + "(assert (>= X_0 0.5))\n(assert (<= X_0 1))\n\n(assert (<= X_0 0.25))\n",
            6,
            "empty input box",
        ),
        (HEAD + BOX + "(assert)\n", 5, "exactly one formula"),
        (HEAD + BOX + "(assert (<= Y_0))\n", 5, "at least two arguments"),
        (HEAD + BOX + "(assert ((<= Y_0 1)))\n", 5, "expected an operator"),
        ("; nothing declared\n(declare-const Y_0 Real)\n", 2, "no input variables"),
        ("(declare-const X_0 Real)\n" + BOX, 3, "no output variables"),
    ],
)
def test_error_line_numbers(text: str, line: int, words: str):
    err = error_of(text)
    assert err.line == line, str(err)
    assert words in err.reason, str(err)
    assert f"line {line}:" in str(err) and err.path is None


def test_size_mismatch_with_the_network():
    text = declare(783, 10) + box(np.zeros(783), np.ones(783)) + "(assert (>= Y_0 Y_1))\n"
    err = error_of(text, n_inputs=784)
    assert err.line == 783 and "declares 783 input variables" in err.reason
    assert "n_inputs=784" in err.reason
    err = error_of(text, n_inputs=783, n_outputs=9)
    assert err.line == 793 and "declares 10 output variables" in err.reason
    assert parse_vnnlib(text, n_inputs=783, n_outputs=10).n_inputs == 783


def test_dnf_blow_up_is_refused():
    ors = "".join(f"(assert (or (<= Y_{k} 1) (>= Y_{k} 2)))\n" for k in range(17))
    text = declare(1, 17) + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n" + ors
    # 2**17 = 131072 > MAX_CONJUNCTIONS: the 17th `or`, on line 18 + 2 + 17, tips it over.
    assert 2**16 <= MAX_CONJUNCTIONS < 2**17
    err = error_of(text)
    assert err.line == 37 and f"more than {MAX_CONJUNCTIONS} conjunctions" in err.reason
    err = error_of(text, max_conjunctions=10)
    assert err.line == 24  # the 4th or: 2**4 = 16 > 10
    wide = declare(1, 1) + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (or\n"
    wide += "(<= Y_0 1)\n" * 11 + "))\n"
    assert error_of(wide, max_conjunctions=10).line == 5
    assert len(parse_vnnlib(wide, max_conjunctions=11).cases[0].disjuncts) == 11


def test_deep_nesting_is_an_error_not_a_crash():
    term = "Y_0"
    for _ in range(5000):
        term = f"(+ {term} 0)"
    err = error_of(HEAD + BOX + f"(assert (<= {term} 1))\n")
    assert "nested too deeply" in err.reason


# -- properties -----------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=True)


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=12), st.data())
def test_random_boxes_round_trip(bounds, data):
    lower = np.array([min(a, b) for a, b in bounds])
    upper = np.array([max(a, b) for a, b in bounds])
    n_out = data.draw(st.integers(2, 5))
    label = data.draw(st.integers(0, n_out - 1))
    style = data.draw(st.sampled_from(["plain", "sci", "neg"]))

    def fmt(v: float) -> str:
        v = float(v)
        if style == "sci":
            return f"{v:.17e}"
        if style == "neg" and v < 0:
            return f"(- {-v!r})"
        return repr(v)

    lines = [declare(len(bounds), n_out)]
    for i in data.draw(st.permutations(range(len(bounds)))):
        lines.append(f"(assert (>= X_{i} {fmt(lower[i])}))\n(assert (<= X_{i} {fmt(upper[i])}))\n")
    branches = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_out) if j != label)
    lines.append(f"(assert (or {branches}))\n")
    prop = parse_vnnlib("".join(lines), n_inputs=len(bounds), n_outputs=n_out)
    (case,) = prop.cases
    np.testing.assert_array_equal(case.lower, lower)
    np.testing.assert_array_equal(case.upper, upper)
    assert prop.margin_form() == (label, tuple(j for j in range(n_out) if j != label))


def formulas(depth: int):
    """Random and/or trees over output comparisons, as (vnnlib text, evaluator)."""
    coeff = st.integers(-3, 3)
    atom = st.tuples(coeff, coeff, st.integers(-3, 3), st.sampled_from(["<=", ">="])).map(
        lambda t: (
            f"({t[3]} (+ (* {t[0]} Y_0) (* {t[1]} Y_1)) {t[2]})",
            lambda y, t=t: (
                t[0] * y[0] + t[1] * y[1] <= t[2]
                if t[3] == "<="
                else t[0] * y[0] + t[1] * y[1] >= t[2]
            ),
        )
    )
    if depth == 0:
        return atom
    sub = formulas(depth - 1)

    def combine(args):
        op, children = args
        text = f"({op} {' '.join(c[0] for c in children)})"
        join = all if op == "and" else any
        return text, lambda y: join(c[1](y) for c in children)

    return st.one_of(
        atom,
        st.tuples(st.sampled_from(["and", "or"]), st.lists(sub, min_size=1, max_size=3)).map(
            combine
        ),
    )


@given(st.lists(formulas(3), min_size=1, max_size=3))
def test_dnf_agrees_with_direct_evaluation(asserts):
    text = declare(1, 2) + "(assert (>= X_0 0))\n(assert (<= X_0 1))\n"
    text += "".join(f"(assert {t})\n" for t, _ in asserts)
    prop = parse_vnnlib(text)
    # Small integer coefficients and bounds: points on and off every boundary.
    for y in itertools.product(np.arange(-3.0, 3.5, 0.5), repeat=2):
        direct = all(check(y) for _, check in asserts)
        parsed = any(case.is_unsafe(np.array(y)) for case in prop.cases)
        assert direct == parsed, (text, y)
