"""VNN-LIB properties (the VNN-COMP format) read into boxes and linear output constraints.

A VNN-LIB file is a small subset of SMT-LIB: ``(declare-const X_i Real)`` for the flattened
(row-major) network inputs, ``(declare-const Y_j Real)`` for the flattened outputs, and
``(assert F)`` statements whose formulas are comparisons (``<=``, ``>=``, ``<``, ``>``, ``=``)
between linear terms, combined with ``and`` and ``or``.

Semantics
---------
The assertions describe a **counterexample**, i.e. the *unsafe set*: the verification result
is ``sat`` when some input satisfying the input constraints produces outputs satisfying the
output constraints, and ``unsat`` -- the property holds -- when no such input exists.

Disjunctive normal form
-----------------------
All top-level assertions are conjoined and the resulting formula is rewritten into disjunctive
normal form (``or`` distributes over ``and``). Each conjunction of the DNF holds constraints on
single inputs, which make an axis-aligned box, and linear constraints on the outputs. The
conjunctions are grouped by their box into :class:`VnnlibCase` objects, in order of first
appearance: a case holds one box and the output constraints of every conjunction with that box,
as a tuple of :class:`OutputConstraint` disjuncts. So ``(or A B)`` on inputs alone yields two
cases (two boxes), ``(or (and box1 out1) (and box2 out2))`` yields one case per distinct box,
and a plain box with a disjunction of output constraints yields one case with several
disjuncts. The property is ``unsat`` iff, for every case, no input in its box makes any of its
disjuncts hold. A DNF with more than :data:`MAX_CONJUNCTIONS` conjunctions is refused rather
than enumerated.

Normal form
-----------
Every comparison is rewritten as ``a @ v <= b``: ``(<= s t)`` becomes ``s - t <= 0`` and
``(>= s t)`` becomes ``t - s <= 0`` (``>=`` is multiplied by -1); ``=`` gives both. Strictness is
irrelevant (``<`` is read as ``<=``, ``>`` as ``>=``), as for any verifier working on closed
sets. A comparison on one input ``X_i`` sets its lower or upper bound (intersected when
repeated); one on outputs only becomes a row of ``C @ y <= d``. In particular the usual
robustness disjunct ``(>= Y_j Y_label)`` ("class j scores at least as high as the label")
becomes the row ``C = e_label - e_j``, ``d = 0``, i.e. ``Y_label - Y_j <= 0``; this is the form
:meth:`VnnlibProperty.margin_form` recognises.

Variables must be declared before they are used, as in SMT-LIB, and numbered ``X_0..X_{n-1}``
and ``Y_0..Y_{m-1}``. The result classes hold arrays, so they compare by identity.

Not supported (each raises :class:`VnnlibError` with the file name and the line number):
linear constraints coupling several inputs, comparisons mixing inputs and outputs, products of
variables, ``not``/``=>``/``ite`` and other operators, and inputs left without a finite lower
and upper bound in some conjunction.
"""

from __future__ import annotations

import gc
import gzip
import math
import os
import re
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

__all__ = [
    "MAX_CONJUNCTIONS",
    "OutputConstraint",
    "VnnlibCase",
    "VnnlibError",
    "VnnlibProperty",
    "parse_vnnlib",
]

#: Largest number of DNF conjunctions :func:`parse_vnnlib` enumerates before it gives up.
MAX_CONJUNCTIONS = 100_000

# Blocks with more input constraints than this are turned into dense bound arrays once and
# reused: the input box of an image property is shared by every output disjunct.
_DENSE_BLOCK = 32

_COMMENT_RE = re.compile(r";[^\n]*")
_TOKEN_RE = re.compile(r"\(|\)|[^\s()]+")
_NAME_RE = re.compile(r"([XY])_(0|[1-9]\d*)")
_NUMERIC_START = frozenset("0123456789+-.")
_COMPARISONS = frozenset(("<=", ">=", "<", ">", "="))
_TERM_OPS = frozenset(("+", "-", "*", "/"))
# Plain SMT-LIB bookkeeping that some generators emit; it carries no constraint.
_IGNORED_COMMANDS = frozenset(
    ("check-sat", "get-model", "set-logic", "set-info", "set-option", "exit", "get-value")
)
_COMMANDS = frozenset(("assert", "declare-const", "declare-fun")) | _IGNORED_COMMANDS


class VnnlibError(ValueError):
    """A VNN-LIB file that cannot be read as a property.

    Attributes
    ----------
    reason : str
        What is wrong, without the location.
    path : str or None
        The file parsed, ``None`` when the text was given directly.
    line : int or None
        1-based line of the offending token.
    """

    def __init__(self, reason: str, *, path: str | None = None, line: int | None = None):
        self.reason = reason
        self.path = path
        self.line = line
        where = path if path is not None else "<vnnlib text>"
        if line is not None:
            where = f"{where}:{line}" if path is not None else f"{where}, line {line}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, eq=False)
class OutputConstraint:
    """One conjunction of the unsafe output set: every row holds, ``C @ y <= d``.

    Parameters
    ----------
    C : numpy.ndarray
        ``(m, n_outputs)`` float64 coefficients; ``m = 0`` means every output is unsafe.
    d : numpy.ndarray
        ``(m,)`` float64 right-hand sides.
    """

    C: np.ndarray
    d: np.ndarray

    def __post_init__(self) -> None:
        if self.C.ndim != 2 or self.d.ndim != 1 or self.C.shape[0] != self.d.shape[0]:
            raise ValueError(
                f"OutputConstraint needs C of shape (m, n) and d of shape (m,), got "
                f"{self.C.shape} and {self.d.shape}"
            )

    def holds(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """Whether the output vector ``y`` lies in this unsafe set (up to ``tol``)."""
        return bool(np.all(self.C @ np.asarray(y, dtype=np.float64) <= self.d + tol))


@dataclass(frozen=True, eq=False)
class VnnlibCase:
    """One input box and the unsafe output set that goes with it.

    Parameters
    ----------
    lower, upper : numpy.ndarray
        ``(n_inputs,)`` float64 bounds of the box, finite, ``lower <= upper``.
    disjuncts : tuple of OutputConstraint
        An output is unsafe iff ANY disjunct holds.
    """

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: tuple[OutputConstraint, ...]

    def is_unsafe(self, y: np.ndarray, tol: float = 0.0) -> bool:
        """Whether the output vector ``y`` satisfies some disjunct (a counterexample)."""
        return any(c.holds(y, tol) for c in self.disjuncts)


@dataclass(frozen=True, eq=False)
class VnnlibProperty:
    """A parsed VNN-LIB property, in disjunctive normal form grouped by input box.

    The property holds (the verification answer is ``unsat``) iff for EVERY case no input in
    its box makes ANY of its disjuncts hold. An empty ``cases`` tuple means the formula is
    unsatisfiable by itself (e.g. ``(assert (or))``).

    Parameters
    ----------
    n_inputs, n_outputs : int
        Numbers of declared ``X_i`` and ``Y_j`` variables.
    cases : tuple of VnnlibCase
        One per distinct input box.
    path : str or None
        The file the property was read from.
    """

    n_inputs: int
    n_outputs: int
    cases: tuple[VnnlibCase, ...]
    path: str | None = None

    def margin_form(self) -> tuple[int, tuple[int, ...]] | None:
        """Recognise a classification robustness property.

        Returns ``(label, classes)`` when every disjunct of every case is a single row
        ``c * (Y_label - Y_j) <= 0`` with ``c > 0`` (the normal form of ``(>= Y_j Y_label)``,
        "class j is at least as good as the label"), with the same label and the same set of
        classes ``j`` in all cases; ``classes`` is sorted. Otherwise ``None``.

        Returns
        -------
        tuple of (int, tuple of int) or None
        """
        label: int | None = None
        classes: tuple[int, ...] | None = None
        for case in self.cases:
            found: set[int] = set()
            for disjunct in case.disjuncts:
                if disjunct.C.shape[0] != 1 or disjunct.d[0] != 0.0:
                    return None
                row = disjunct.C[0]
                nz = np.flatnonzero(row)
                if nz.size != 2 or row[nz[0]] != -row[nz[1]]:
                    return None
                pos, neg = (nz[0], nz[1]) if row[nz[0]] > 0 else (nz[1], nz[0])
                if label is None:
                    label = int(pos)
                elif label != pos:
                    return None
                found.add(int(neg))
            current = tuple(sorted(found))
            if not current or (classes is not None and classes != current):
                return None
            classes = current
        if label is None or classes is None:
            return None
        return label, classes


class _Fail(Exception):
    """Internal: a parse error at token index ``tok`` (line computed only when raised)."""

    def __init__(self, reason: str, tok: int | None):
        super().__init__(reason)
        self.reason = reason
        self.tok = tok


class _XAtom:
    """``X_idx <= value`` (upper) or ``X_idx >= value`` (lower)."""

    __slots__ = ("idx", "upper", "value", "tok")

    def __init__(self, idx: int, upper: bool, value: float, tok: int):
        self.idx, self.upper, self.value, self.tok = idx, upper, value, tok


class _YAtom:
    """``sum(c * Y_j for j, c in coeffs) <= rhs``."""

    __slots__ = ("coeffs", "rhs", "tok")

    def __init__(self, coeffs: list[tuple[int, float]], rhs: float, tok: int):
        self.coeffs, self.rhs, self.tok = coeffs, rhs, tok


class _Node:
    """``and`` / ``or`` of sub-formulas (an empty ``and`` is true, an empty ``or`` false)."""

    __slots__ = ("is_and", "children", "tok")

    def __init__(self, is_and: bool, children: list, tok: int):
        self.is_and, self.children, self.tok = is_and, children, tok


class _Block:
    """The atoms directly under one ``and`` (or one lone atom): shared by DNF conjunctions."""

    __slots__ = ("xs", "ys", "dense", "rows")

    def __init__(self, xs: list[_XAtom], ys: list[_YAtom]):
        self.xs, self.ys = xs, ys
        self.dense: tuple[np.ndarray, np.ndarray] | None = None
        self.rows: tuple[np.ndarray, np.ndarray] | None = None


def _first(node) -> int:
    """The first token of a tree node (an atom's index, a list's '(' or a formula's)."""
    if isinstance(node, int):
        return node
    if isinstance(node, list):
        return node[0]
    return node.tok


def _make_node(is_and: bool, children: list, tok: int):
    # Flattening nested and/or and collapsing one-child nodes keeps the DNF products to the
    # genuine multi-branch disjunctions; without it thousands of `(or (and ...))` wrappers
    # would each cost a copy of every conjunction.
    flat = []
    for child in children:
        if isinstance(child, _Node) and child.is_and == is_and:
            flat.extend(child.children)
        else:
            flat.append(child)
    if len(flat) == 1:
        return flat[0]
    return _Node(is_and, flat, tok)


#: Declared variables: name -> (is_output, index, token of the name in its declaration).
_Declarations = dict[str, tuple[bool, int, int]]
#: A linear term: (coefficients by variable name, constant).
_Linear = tuple[dict[str, float], float]


class _Source:
    """The comment-free text of a VNN-LIB file and its tokens."""

    __slots__ = ("text", "tokens")

    def __init__(self, text: str):
        # Removing comments keeps every newline, so line numbers are those of the original.
        self.text = _COMMENT_RE.sub("", text)
        self.tokens: list[str] = _TOKEN_RE.findall(self.text)

    def line_of(self, tok: int | None) -> int:
        """1-based line of token ``tok``; found again only on errors, to keep parsing lean."""
        if tok is None or not self.tokens:
            return 1
        tok = min(tok, len(self.tokens) - 1)
        for k, match in enumerate(_TOKEN_RE.finditer(self.text)):
            if k == tok:
                return self.text.count("\n", 0, match.start()) + 1
        return self.text.count("\n") + 1  # pragma: no cover - tok is always in range


class _CommandReader:
    """Reads the commands of a file as s-expressions: declarations and asserted formulas."""

    def __init__(self, source: _Source):
        self.source = source
        self.tokens = source.tokens
        self.decls: _Declarations = {}
        self.formulas: list = []
        self.expressions = _ExpressionParser(self.tokens, self.decls)

    def run(self) -> None:
        """Read the commands one at a time, so that no tree of the whole file is kept."""
        tokens = self.tokens
        compare = self.expressions.compare
        n = len(tokens)
        parens = ("(", ")")
        i = 0
        while i < n:
            tok = tokens[i]
            if tok != "(":
                if tok == ")":
                    raise _Fail("unbalanced parentheses: unexpected ')'", i)
                raise _Fail(f"expected a command in parentheses, got '{tok}'", i)
            head = tokens[i + 1] if i + 1 < n else None
            # Fast paths for the two forms that make up nearly all of every real file,
            # `(declare-const X_0 Real)` and `(assert (<= X_0 0.5))`, skipping the tree.
            if (
                head == "declare-const"
                and i + 4 < n
                and tokens[i + 4] == ")"
                and tokens[i + 2] not in parens
                and tokens[i + 3] not in parens
            ):
                self.declare(i + 2, i + 3)
                i += 5
                continue
            if (
                head == "assert"
                and i + 7 < n
                and tokens[i + 2] == "("
                and tokens[i + 3] in _COMPARISONS
                and tokens[i + 6] == ")"
                and tokens[i + 7] == ")"
                and tokens[i + 4] not in parens
                and tokens[i + 5] not in parens
            ):
                self.formulas.append(compare(tokens[i + 3], i + 4, i + 5, i + 3, i + 2))
                i += 8
                continue
            node, i = self.sexpr(i)
            self.command(node)

    def sexpr(self, start: int) -> tuple[list, int]:
        """The command opened at token ``start`` as nested lists ``[open_token, child, ...]``
        (an atom child is its token index, a simple comparison its formula already), and the
        index of the token after it."""
        tokens = self.tokens
        compare = self.expressions.compare
        n = len(tokens)
        parens = ("(", ")")
        root = [start]
        cur = root
        stack: list = []
        i = start + 1
        while i < n:
            tok = tokens[i]
            if tok == "(":
                # `(op a b)` comparisons are read straight into atoms: in nn4sys-style files
                # with tens of thousands of branches they are nearly every node.
                if (
                    i + 4 < n
                    and tokens[i + 4] == ")"
                    and tokens[i + 1] in _COMPARISONS
                    and tokens[i + 2] not in parens
                    and tokens[i + 3] not in parens
                ):
                    cur.append(compare(tokens[i + 1], i + 2, i + 3, i + 1, i))
                    i += 5
                    continue
                # A command inside an unfinished expression almost always means a ')' is
                # missing above it: say so here instead of failing at the end of the file.
                if i + 1 < n and tokens[i + 1] in _COMMANDS:
                    line_of = self.source.line_of
                    raise _Fail(
                        f"unbalanced parentheses: '(' opened at line {line_of(start)}"
                        f" is not closed before '{tokens[i + 1]}' at line {line_of(i)}",
                        start,
                    )
                node = [i]
                cur.append(node)
                stack.append(cur)
                cur = node
            elif tok == ")":
                if not stack:
                    return root, i + 1
                cur = stack.pop()
            else:
                cur.append(i)
            i += 1
        raise _Fail("unbalanced parentheses: '(' is never closed", start)

    def command(self, node: list) -> None:
        """Carry out one command read as a tree by :meth:`sexpr`."""
        tokens = self.tokens
        if len(node) < 2 or not isinstance(node[1], int):
            raise _Fail("expected a command name after '('", node[0])
        cmd = tokens[node[1]]
        if cmd == "assert":
            if len(node) != 3:
                raise _Fail("'assert' takes exactly one formula", node[1])
            self.formulas.append(self.expressions.formula(node[2]))
        elif cmd == "declare-const":
            if len(node) != 4:
                raise _Fail("expected (declare-const NAME Real)", node[1])
            self.declare(node[2], node[3])
        elif cmd == "declare-fun":
            if len(node) != 5 or not isinstance(node[3], list) or len(node[3]) != 1:
                raise _Fail("expected (declare-fun NAME () Real)", node[1])
            self.declare(node[2], node[4])
        elif cmd not in _IGNORED_COMMANDS:
            raise _Fail(f"unknown command '{cmd}'", node[1])

    def declare(self, name_node, sort_node) -> None:
        """Record the variable declared by the name and sort nodes of a declaration."""
        tokens = self.tokens
        if not isinstance(name_node, int):
            raise _Fail("expected a variable name", _first(name_node))
        if not isinstance(sort_node, int) or tokens[sort_node] != "Real":
            tok = _first(sort_node)
            raise _Fail(f"unsupported sort '{tokens[tok]}' (only Real)", tok)
        name = tokens[name_node]
        match = _NAME_RE.fullmatch(name)
        if match is None:
            raise _Fail(
                f"invalid variable name '{name}': VNN-LIB variables are X_<i> (inputs) and "
                "Y_<j> (outputs)",
                name_node,
            )
        if name in self.decls:
            first = self.source.line_of(self.decls[name][2])
            raise _Fail(f"variable '{name}' declared twice (first at line {first})", name_node)
        self.decls[name] = (match.group(1) == "Y", int(match.group(2)), name_node)


class _ExpressionParser:
    """Reads asserted formulas into ``and``/``or`` nodes of input bounds and output rows."""

    def __init__(self, tokens: list[str], decls: _Declarations):
        self.tokens = tokens
        # Shared with the command reader, which fills it as declarations are read.
        self.decls = decls

    def formula(self, node):
        """The formula of a tree node: a :class:`_Node`, an :class:`_XAtom` or a :class:`_YAtom`."""
        tokens = self.tokens
        if isinstance(node, int):
            word = tokens[node]
            if word == "true":
                return _Node(True, [], node)
            if word == "false":
                return _Node(False, [], node)
            raise _Fail(f"expected a Boolean formula, got '{word}'", node)
        if not isinstance(node, list):
            return node
        if len(node) < 2 or not isinstance(node[1], int):
            raise _Fail("expected an operator after '('", node[0])
        op = tokens[node[1]]
        if op == "and" or op == "or":
            children = [self.formula(child) for child in node[2:]]
            return _make_node(op == "and", children, node[0])
        if op in _COMPARISONS:
            return self.comparison(op, node)
        if op in _TERM_OPS:
            raise _Fail(
                f"expected a Boolean formula, got the arithmetic term '({op} ...)'", node[1]
            )
        raise _Fail(f"unknown or unsupported operator '{op}'", node[1])

    def comparison(self, op: str, node: list):
        """The formula for ``(op a b ...)`` with any number of arguments."""
        args = node[2:]
        if len(args) < 2:
            raise _Fail(f"'{op}' needs at least two arguments", node[1])
        if len(args) == 2:
            return self.compare(op, args[0], args[1], node[1], node[0])
        # SMT-LIB chains (<= a b c) as (and (<= a b) (<= b c)).
        parts = [self.compare(op, a, b, node[1], node[0]) for a, b in pairwise(args)]
        return _make_node(True, parts, node[0])

    def compare(self, op: str, left, right, op_tok: int, open_tok: int):
        """The formula for ``(op left right)``."""
        if op == "<=" or op == "<":
            return self.inequality(left, right, op_tok)
        if op == ">=" or op == ">":
            return self.inequality(right, left, op_tok)
        both = [self.inequality(left, right, op_tok), self.inequality(right, left, op_tok)]
        return _make_node(True, both, open_tok)

    def inequality(self, small, large, op_tok: int):
        """The atom for ``small <= large``."""
        tokens = self.tokens
        # Fast path for the overwhelmingly common `(<= X_3 0.5)` / `(>= Y_0 Y_8)` forms.
        if isinstance(small, int) and isinstance(large, int):
            s, big = tokens[small], tokens[large]
            ds, dl = self.decls.get(s), self.decls.get(big)
            if ds is not None and dl is None:
                value = self.number(large)
                if not ds[0]:
                    return _XAtom(ds[1], True, value, op_tok)
                return _YAtom([(ds[1], 1.0)], value, op_tok)
            if ds is None and dl is not None:
                value = self.number(small)
                if not dl[0]:
                    return _XAtom(dl[1], False, value, op_tok)
                return _YAtom([(dl[1], -1.0)], -value + 0.0, op_tok)
        coeffs, const = self.linear(small)
        c_large, k_large = self.linear(large)
        for name, c in c_large.items():
            coeffs[name] = coeffs.get(name, 0.0) - c
        rhs = k_large - const + 0.0
        terms = [(name, c) for name, c in coeffs.items() if c != 0.0]
        if not terms:
            # A comparison of constants is just true or false.
            return _Node(0.0 <= rhs, [], op_tok)
        kinds = {self.decls[name][0] for name, _ in terms}
        if len(kinds) > 1:
            raise _Fail("a comparison mixing inputs (X) and outputs (Y) is not supported", op_tok)
        if kinds == {False}:
            if len(terms) > 1:
                raise _Fail(
                    "linear constraints coupling several inputs are not supported (only "
                    "bounds on single X variables)",
                    op_tok,
                )
            name, c = terms[0]
            return _XAtom(self.decls[name][1], c > 0, rhs / c + 0.0, op_tok)
        return _YAtom([(self.decls[name][1], c) for name, c in terms], rhs, op_tok)

    def number(self, tok: int) -> float:
        """The numeral at token ``tok``."""
        word = self.tokens[tok]
        try:
            value = float(word)
        except ValueError:
            raise self.not_a_number(tok) from None
        # float() is the fast check; it also takes 'inf', 'nan', '1_0' and non-ASCII digits,
        # which are not SMT-LIB numerals (and an overflow to inf is no usable bound).
        if value - value != 0.0 or not word.isascii() or "_" in word:
            raise _Fail(f"invalid numeric constant '{word}'", tok)
        return value

    def not_a_number(self, tok: int) -> _Fail:
        """The error for an atom that is neither a declared variable nor a number."""
        word = self.tokens[tok]
        if word in self.decls:
            return _Fail(f"expected a number, got the variable '{word}'", tok)
        if _NAME_RE.fullmatch(word):
            return _Fail(f"undeclared variable '{word}'", tok)
        if word[0] in _NUMERIC_START:
            return _Fail(f"invalid numeric constant '{word}'", tok)
        if word in ("true", "false"):
            return _Fail(f"Boolean '{word}' where a term was expected", tok)
        return _Fail(f"undeclared symbol '{word}'", tok)

    def linear(self, node) -> _Linear:
        """``node`` as ``(coefficients by variable name, constant)``."""
        tokens = self.tokens
        if isinstance(node, int):
            word = tokens[node]
            if word in self.decls:
                return {word: 1.0}, 0.0
            return {}, self.number(node)
        if not isinstance(node, list):
            raise _Fail("a Boolean formula where a term was expected", node.tok)
        if len(node) < 2 or not isinstance(node[1], int):
            raise _Fail("expected an operator after '('", node[0])
        op = tokens[node[1]]
        args = node[2:]
        if op not in _TERM_OPS:
            if op in _COMPARISONS or op in ("and", "or"):
                raise _Fail(f"Boolean '({op} ...)' where a term was expected", node[1])
            raise _Fail(f"unknown or unsupported operator '{op}' in a term", node[1])
        if not args:
            raise _Fail(f"'{op}' needs at least one argument", node[1])
        parts = [self.linear(arg) for arg in args]
        if op == "+" or op == "-":
            return _linear_sum(op == "-", parts)
        if op == "*":
            return _linear_product(args, parts)
        return _linear_quotient(args, parts)


def _linear_sum(subtract: bool, parts: list[_Linear]) -> _Linear:
    """``(+ a b ...)``, or ``(- a b ...)`` when ``subtract`` (``(- a)`` negates)."""
    if subtract and len(parts) == 1:
        coeffs, const = parts[0]
        return {k: -c for k, c in coeffs.items()}, -const
    coeffs, const = dict(parts[0][0]), parts[0][1]
    sign = -1.0 if subtract else 1.0
    for c_part, k_part in parts[1:]:
        for name, c in c_part.items():
            coeffs[name] = coeffs.get(name, 0.0) + sign * c
        const += sign * k_part
    return coeffs, const


def _linear_product(args: list, parts: list[_Linear]) -> _Linear:
    """``(* a b ...)``, linear only while at most one factor holds variables."""
    factor = 1.0
    variable: dict[str, float] | None = None
    for arg, (c_part, k_part) in zip(args, parts, strict=True):
        if any(c != 0.0 for c in c_part.values()):
            if variable is not None:
                raise _Fail(
                    "unsupported term: a product of variables is not linear",
                    _first(arg),
                )
            variable = dict(c_part)
            variable_const = k_part
        else:
            factor *= k_part
    if variable is None:
        return {}, factor
    return {k: factor * c for k, c in variable.items()}, factor * variable_const


def _linear_quotient(args: list, parts: list[_Linear]) -> _Linear:
    """``(/ a b ...)``: only division by constants keeps the term linear."""
    coeffs, const = dict(parts[0][0]), parts[0][1]
    for arg, (c_part, k_part) in zip(args[1:], parts[1:], strict=True):
        tok = _first(arg)
        if any(c != 0.0 for c in c_part.values()):
            raise _Fail("unsupported term: division by a variable is not linear", tok)
        if k_part == 0.0:
            raise _Fail("division by zero", tok)
        coeffs = {k: c / k_part for k, c in coeffs.items()}
        const /= k_part
    return coeffs, const


class _PropertyBuilder:
    """Turns the asserted formulas into a :class:`VnnlibProperty`: the disjunctive normal
    form, one input box per conjunction, and its output rows grouped by box."""

    def __init__(
        self, decls: _Declarations, last_token: int, path: str | None, max_conjunctions: int
    ):
        self.decls = decls
        # Where errors about the file as a whole (a missing declaration) point.
        self.last_token = last_token
        self.path = path
        self.max_conjunctions = max_conjunctions

    def build(self, formulas: list, n_inputs: int | None, n_outputs: int | None) -> VnnlibProperty:
        """The property of the conjunction of ``formulas``."""
        n_in = self.count(False, n_inputs)
        n_out = self.count(True, n_outputs)
        root = _make_node(True, formulas, 0)
        conjunctions = self.dnf(root)
        # Cases in order of first appearance of their box; identical boxes share one case.
        groups: dict[bytes, tuple[np.ndarray, np.ndarray, list[OutputConstraint]]] = {}
        for k, conj in enumerate(conjunctions):
            lower, upper = self.box(conj, n_in, k, len(conjunctions))
            parts = [self.rows(b, n_out) for b in conj if b.ys]
            if parts:
                C = np.concatenate([p[0] for p in parts])
                d = np.concatenate([p[1] for p in parts])
            else:
                C, d = np.zeros((0, n_out)), np.zeros(0)
            key = lower.tobytes() + upper.tobytes()
            if key not in groups:
                groups[key] = (lower, upper, [])
            groups[key][2].append(OutputConstraint(C=C, d=d))
        cases = tuple(
            VnnlibCase(lower=lo, upper=hi, disjuncts=tuple(ds)) for lo, hi, ds in groups.values()
        )
        return VnnlibProperty(n_inputs=n_in, n_outputs=n_out, cases=cases, path=self.path)

    def count(self, is_output: bool, expected: int | None) -> int:
        """The number of declared outputs (or inputs), checked to be ``0..n-1``."""
        kind, what, arg = ("Y", "output", "n_outputs") if is_output else ("X", "input", "n_inputs")
        decls = [(idx, tok) for out, idx, tok in self.decls.values() if out == is_output]
        n = len(decls)
        if n == 0:
            raise _Fail(
                f"no {what} variables ({kind}_0, {kind}_1, ...) are declared", self.last_token
            )
        for idx, tok in decls:
            if idx >= n:
                missing = min(set(range(n)) - {i for i, _ in decls})
                raise _Fail(
                    f"{what} variables must be numbered {kind}_0..{kind}_{n - 1} (there are "
                    f"{n}): {kind}_{idx} is declared but {kind}_{missing} is not",
                    tok,
                )
        if expected is not None and expected != n:
            last = max(decls)[1]
            raise _Fail(
                f"the file declares {n} {what} variables ({kind}_0..{kind}_{n - 1}) but "
                f"{arg}={expected} was expected",
                last,
            )
        return n

    def dnf(self, node) -> list[tuple[_Block, ...]]:
        """Conjunctions of ``node``, each a tuple of blocks whose atoms all hold."""
        if not isinstance(node, _Node):
            return [(self.block([node]),)]
        limit = self.max_conjunctions
        if node.is_and:
            lone = [c for c in node.children if not isinstance(c, _Node)]
            result: list[tuple[_Block, ...]] = [(self.block(lone),)] if lone else [()]
            for child in node.children:
                if not isinstance(child, _Node):
                    continue
                sub = self.dnf(child)
                if len(result) * len(sub) > limit:
                    raise _Fail(
                        f"the formula has more than {limit} conjunctions in disjunctive "
                        "normal form",
                        child.tok,
                    )
                result = [r + s for r in result for s in sub]
            return result
        result = []
        for child in node.children:
            result.extend(self.dnf(child))
            if len(result) > limit:
                raise _Fail(
                    f"the formula has more than {limit} conjunctions in disjunctive normal form",
                    node.tok,
                )
        return result

    @staticmethod
    def block(atoms: list) -> _Block:
        """The block of the atoms directly under one ``and``."""
        xs = [a for a in atoms if type(a) is _XAtom]
        ys = [a for a in atoms if type(a) is _YAtom]
        return _Block(xs, ys)

    @staticmethod
    def dense(block: _Block, n_in: int) -> tuple[np.ndarray, np.ndarray]:
        """The bounds ``block`` sets on every input (cached on the block)."""
        if block.dense is None:
            lower = np.full(n_in, -np.inf)
            upper = np.full(n_in, np.inf)
            idx = np.array([a.idx for a in block.xs], dtype=np.intp)
            val = np.array([a.value for a in block.xs], dtype=np.float64)
            is_upper = np.array([a.upper for a in block.xs], dtype=bool)
            np.maximum.at(lower, idx[~is_upper], val[~is_upper])
            np.minimum.at(upper, idx[is_upper], val[is_upper])
            block.dense = (lower, upper)
        return block.dense

    @staticmethod
    def rows(block: _Block, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        """The output rows ``C @ y <= d`` of ``block`` (cached on the block)."""
        if block.rows is None:
            C = np.zeros((len(block.ys), n_out))
            d = np.empty(len(block.ys))
            for r, atom in enumerate(block.ys):
                for j, c in atom.coeffs:
                    C[r, j] += c
                d[r] = atom.rhs
            block.rows = (C, d)
        return block.rows

    def box(
        self, conj: tuple[_Block, ...], n_in: int, number: int, total: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The input box of conjunction ``number`` of ``total``, checked finite and non-empty."""
        lower = np.full(n_in, -np.inf)
        upper = np.full(n_in, np.inf)
        for block in conj:
            if len(block.xs) > _DENSE_BLOCK:
                lo, hi = self.dense(block, n_in)
                np.maximum(lower, lo, out=lower)
                np.minimum(upper, hi, out=upper)
                continue
            for a in block.xs:
                if a.upper:
                    if a.value < upper[a.idx]:
                        upper[a.idx] = a.value
                elif a.value > lower[a.idx]:
                    lower[a.idx] = a.value
        where = f" (in DNF conjunction {number} of {total})" if total > 1 else ""
        if not (np.isfinite(lower).all() and np.isfinite(upper).all()):
            i = int(np.flatnonzero(~(np.isfinite(lower) & np.isfinite(upper)))[0])
            side = "lower" if not math.isfinite(lower[i]) else "upper"
            raise _Fail(f"input X_{i} has no finite {side} bound{where}", self.decls[f"X_{i}"][2])
        if (lower > upper).any():
            i = int(np.flatnonzero(lower > upper)[0])
            # Point at the bound that came last in the file: the one that emptied the box.
            atoms = [a for b in conj for a in b.xs if a.idx == i]
            lo_atom = max((a for a in atoms if not a.upper), key=lambda a: a.value)
            hi_atom = min((a for a in atoms if a.upper), key=lambda a: a.value)
            raise _Fail(
                f"empty input box: X_{i} >= {float(lower[i])!r} and X_{i} <= "
                f"{float(upper[i])!r}{where}",
                max(lo_atom.tok, hi_atom.tok),
            )
        return lower, upper


def _read(source: str | os.PathLike) -> tuple[str, str | None]:
    """The text of ``source`` and the path it came from (``None`` for literal text)."""
    if isinstance(source, str):
        head = source.lstrip()
        if "\n" in source or head.startswith(("(", ";")) or not head:
            return source, None
    elif not isinstance(source, os.PathLike):
        raise TypeError(
            f"parse_vnnlib expects a path or the VNN-LIB text, got {type(source).__name__}"
        )
    path = os.fspath(source)
    with open(path, "rb") as fh:
        data = fh.read()
    # By content, not by suffix: archives renamed to .vnnlib (and the reverse) are common.
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8"), str(path)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise VnnlibError("the file is not UTF-8 text", path=str(path), line=line) from None


def parse_vnnlib(
    path_or_text: str | os.PathLike,
    *,
    n_inputs: int | None = None,
    n_outputs: int | None = None,
    max_conjunctions: int = MAX_CONJUNCTIONS,
) -> VnnlibProperty:
    """Read a VNN-LIB property.

    Parameters
    ----------
    path_or_text : str or os.PathLike
        A path to a ``.vnnlib`` file (gzip-compressed files such as ``.vnnlib.gz`` are
        decompressed), or the VNN-LIB text itself: a ``str`` that contains a newline or starts
        with ``(`` or ``;`` is taken as text.
    n_inputs, n_outputs : int, optional
        The network's numbers of (flattened) inputs and outputs; when given, a file declaring
        another number of ``X_i`` / ``Y_j`` variables is an error.
    max_conjunctions : int, default MAX_CONJUNCTIONS
        Largest disjunctive normal form enumerated before giving up.

    Returns
    -------
    VnnlibProperty
        The unsafe set as cases (input boxes) of output-constraint disjuncts; see the module
        docstring for the semantics and the normal form.

    Raises
    ------
    VnnlibError
        On any syntax or semantic problem, with the file name and the line number.
    """
    text, path = _read(path_or_text)
    source = _Source(text)
    # The parse allocates one long-lived object per constraint and creates no reference
    # cycles, so the cyclic collector has nothing to reclaim; left on, its full passes over
    # the whole process (torch included) took more than half the time on large files.
    collecting = gc.isenabled()
    gc.disable()
    try:
        reader = _CommandReader(source)
        reader.run()
        builder = _PropertyBuilder(reader.decls, len(source.tokens) - 1, path, max_conjunctions)
        return builder.build(reader.formulas, n_inputs, n_outputs)
    except _Fail as fail:
        raise VnnlibError(fail.reason, path=path, line=source.line_of(fail.tok)) from None
    except RecursionError:
        raise VnnlibError("expressions nested too deeply", path=path) from None
    finally:
        if collecting:
            gc.enable()
