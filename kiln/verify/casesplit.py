"""Equivalence by case splitting on ``If`` conditions, with the exp axioms instantiated on the terms that occur.

Softmax and its online (blocked) form are full of ``If`` terms (every ``max``, every ``-inf`` mask) and of
``exp`` applications whose arguments are differences of those maxima. Given to z3 as one formula, the
combination (nonlinear arithmetic, an uninterpreted ``exp`` and nested ``If``\\ s) does not finish. Split
instead:

1. pick an ``If`` condition of the goal ``OR(left != right)`` that holds no ``If`` and no ``exp`` (a comparison
   of inputs, or a mask boolean); keep only the branches consistent with the path so far (a solver check of the
   path), substitute the branch's truth value and simplify; repeat until no such condition is left. Ties need no
   special case: ``max(a, b) = If(a >= b, a, b)`` and the ``a == b`` points lie in the ``a >= b`` branch.
2. at each leaf, the goal holds no ``max`` any more (``If`` s on ``exp`` terms, like ``l > 0 ? acc / l : 0``,
   stay for the solver); the exp axioms are instantiated on the ``exp`` terms of that leaf (:func:`exp_axioms`)
   and z3 must find the leaf unsatisfiable. The leaf goes to the solver with ``exp``
   eliminated by Ackermann's reduction (each ``exp(t_i)`` a fresh real ``E_i``, plus ``t_i = t_j -> E_i = E_j``
   for every pair: exactly what "exp is a function" means), because z3's nonlinear arithmetic decides such
   leaves in milliseconds without an uninterpreted function and times out with one.

The goal is proved when every leaf is; a satisfiable leaf is a counterexample (an input and values of ``exp`` on
its terms meeting the axioms: for a true statement about the real exp that needs more axioms, it would show the
axioms are too weak, never a false proof).
"""
from __future__ import annotations

import time
from fractions import Fraction

import z3

__all__ = ["prove_by_cases", "exp_axioms", "poly_form", "ackermann", "variables"]


def poly_form(t) -> tuple | None:
    """``t`` as a polynomial in its variables, ``((monomial, coeff), ...)`` sorted (a monomial: the sorted tuple
    of its variables' names, with repeats), or ``None`` when it is not a polynomial (an ``If``, a function
    application, a division by a non-constant)."""

    def mul(a: dict, b: dict) -> dict:
        out: dict = {}
        for ma, ca in a.items():
            for mb, cb in b.items():
                m = tuple(sorted(ma + mb))
                out[m] = out.get(m, Fraction(0)) + ca * cb
        return out

    def add(a: dict, b: dict, k: Fraction = Fraction(1)) -> dict:
        out = dict(a)
        for m, c in b.items():
            out[m] = out.get(m, Fraction(0)) + k * c
        return out

    def walk(e):
        if z3.is_rational_value(e):
            return {(): e.as_fraction()}
        if z3.is_const(e) and e.decl().kind() == z3.Z3_OP_UNINTERPRETED:
            return {(e.decl().name(),): Fraction(1)}
        kids = [walk(c) for c in e.children()] if z3.is_app(e) else [None]
        if any(k is None for k in kids):
            return None
        kind = e.decl().kind()
        if kind == z3.Z3_OP_ADD:
            out: dict = {}
            for k in kids:
                out = add(out, k)
            return out
        if kind == z3.Z3_OP_SUB:
            out = kids[0]
            for k in kids[1:]:
                out = add(out, k, Fraction(-1))
            return out
        if kind == z3.Z3_OP_UMINUS:
            return add({}, kids[0], Fraction(-1))
        if kind == z3.Z3_OP_MUL:
            out = {(): Fraction(1)}
            for k in kids:
                out = mul(out, k)
            return out
        if kind == z3.Z3_OP_DIV and set(kids[1]) <= {()} and kids[1].get((), 0) != 0:
            return add({}, kids[0], 1 / kids[1][()])
        return None

    p = walk(t)
    return None if p is None else tuple(sorted((m, c) for m, c in p.items() if c != 0))


class _Scan:
    """Walks z3 ASTs through the C API (the Python wrappers cost ~10x more per node), with per-proof caches
    keyed by AST id; the goals of the proof are kept alive so that ids are not reused."""

    def __init__(self, fn):
        self.ctx = fn.ctx
        self.c = fn.ctx.ref()
        self.fn_id = z3.Z3_get_ast_id(self.c, z3.Z3_func_decl_to_ast(self.c, fn.ast))
        self.dirty_cache: dict = {}
        self.poly_cache: dict = {}
        self.alive: list = []

    def _kids(self, a):
        if z3.Z3_get_ast_kind(self.c, a) != z3.Z3_APP_AST:
            return []
        return [z3.Z3_get_app_arg(self.c, a, i) for i in range(z3.Z3_get_app_num_args(self.c, a))]

    def _is(self, a, what) -> bool:
        """``a`` is an ``If`` (``what="ite"``) or an application of the function (``what="fn"``)."""
        if z3.Z3_get_ast_kind(self.c, a) != z3.Z3_APP_AST:
            return False
        d = z3.Z3_get_app_decl(self.c, a)
        if what == "ite":
            return z3.Z3_get_decl_kind(self.c, d) == z3.Z3_OP_ITE
        return z3.Z3_get_ast_id(self.c, z3.Z3_func_decl_to_ast(self.c, d)) == self.fn_id

    def dirty(self, a) -> bool:
        """``a`` holds an ``If`` or an application of the function."""
        i = z3.Z3_get_ast_id(self.c, a)
        if i not in self.dirty_cache:
            self.dirty_cache[i] = self._is(a, "ite") or self._is(a, "fn") or any(self.dirty(k) for k in self._kids(a))
        return self.dirty_cache[i]

    def condition(self, goal):
        """The condition of some ``If`` of ``goal`` that holds no ``If`` and no application of the function."""
        self.alive.append(goal)
        stack, seen = [goal.as_ast()], set()
        while stack:
            a = stack.pop()
            i = z3.Z3_get_ast_id(self.c, a)
            if i in seen or not self.dirty(a):
                continue
            seen.add(i)
            if self._is(a, "ite"):
                cond = z3.Z3_get_app_arg(self.c, a, 0)
                if not self.dirty(cond):
                    return z3.BoolRef(cond, self.ctx)
            stack.extend(self._kids(a))
        return None

    def apps(self, goal) -> list:
        """The applications of the function in ``goal`` (each once)."""
        out, stack, seen = [], [goal.as_ast()], set()
        while stack:
            a = stack.pop()
            i = z3.Z3_get_ast_id(self.c, a)
            if i in seen or not self.dirty(a):
                continue
            seen.add(i)
            if self._is(a, "fn"):
                out.append(z3.ArithRef(a, self.ctx))
            stack.extend(self._kids(a))
        return out

    def poly(self, app):
        i = app.get_id()
        if i not in self.poly_cache:
            self.poly_cache[i] = poly_form(app.arg(0))
        return self.poly_cache[i]


def variables(e) -> list:
    """The uninterpreted constants of ``e`` in first-occurrence (depth-first, left to right) order."""
    c = e.ctx.ref()
    out, seen, stack = [], set(), [e.as_ast()]
    while stack:
        a = stack.pop()
        i = z3.Z3_get_ast_id(c, a)
        if i in seen:
            continue
        seen.add(i)
        if z3.Z3_get_ast_kind(c, a) != z3.Z3_APP_AST:
            continue
        n = z3.Z3_get_app_num_args(c, a)
        if n == 0:
            d = z3.Z3_get_app_decl(c, a)
            if z3.Z3_get_decl_kind(c, d) == z3.Z3_OP_UNINTERPRETED:
                out.append(z3.z3._to_expr_ref(a, e.ctx))
            continue
        stack.extend(z3.Z3_get_app_arg(c, a, k) for k in range(n - 1, -1, -1))
    return out


def exp_axioms(apps: list, poly=None) -> list:
    """The exp axioms the proof may use, instantiated on the terms ``apps`` (the ``exp(t)`` of a goal):

    * ``exp(t) > 0`` for every such ``t``;
    * ``exp(a) * exp(b) = exp(c)`` for every two such terms whose arguments add up to a third one's,
      ``a + b = c`` as polynomials (``exp(a + b) = exp(a) exp(b)``, on terms that occur: no new ``exp`` term).
    """
    poly = poly or (lambda app: poly_form(app.arg(0)))
    forms: dict = {}
    for app in apps:
        f = poly(app)
        if f is not None:
            forms.setdefault(f, app)
    out = [app > 0 for app in apps]
    items = list(forms.items())
    for i, (fa, ea) in enumerate(items):
        for fb, eb in items[i:]:
            coeffs = dict(fa)
            for m, c in fb:
                coeffs[m] = coeffs.get(m, Fraction(0)) + c
            fc = tuple(sorted((m, c) for m, c in coeffs.items() if c != 0))
            if fc in forms:
                out.append(ea * eb == forms[fc])
    return out


def ackermann(formulas: list, apps: list) -> list:
    """``formulas`` with every application ``f(t)`` in ``apps`` (all the applications of one unary function in
    them) replaced by a fresh real, plus the functional-consistency constraints ``t_i = t_j -> f_i = f_j`` for
    each pair (an equisatisfiable formula without the function)."""
    if not apps:
        return list(formulas)
    pairs = list(zip(apps, [z3.FreshReal(a.decl().name()) for a in apps]))
    out = [z3.substitute(f, *pairs) for f in formulas]
    args = [z3.substitute(a.arg(0), *pairs) for a, _ in pairs]
    for i, (_, fa) in enumerate(pairs):
        for j in range(i + 1, len(pairs)):
            out.append(z3.Implies(args[i] == args[j], fa == pairs[j][1]))
    return out


def prove_by_cases(goal, assumptions: list, exp, timeout_ms: int = 20000, max_leaves: int = 4096) -> dict:
    """Prove ``goal`` (a z3 boolean: "some output differs") unsatisfiable under ``assumptions`` by case splits
    (``exp``: the uninterpreted exp function).

    Returns ``{"status": proved|failed|unknown, "leaves": n, "model": z3 model or None, "detail": str,
    "seconds": s}``.
    """
    t0 = time.perf_counter()
    path_solver = z3.Solver()
    path_solver.add(*assumptions)
    scan = _Scan(exp)
    leaves = [0]

    def leaf(g, path):
        leaves[0] += 1
        if leaves[0] > max_leaves:
            return ("unknown", None, f"more than {max_leaves} cases")
        apps = scan.apps(g)
        s = z3.Solver()
        s.set("timeout", timeout_ms)
        s.add(*ackermann([*assumptions, *path, *exp_axioms(apps, scan.poly), g], apps))
        r = s.check()
        if r == z3.unsat:
            return None
        if r == z3.sat:
            return ("failed", s.model(), "the solver found differing outputs")
        return ("unknown", None, f"a case was not decided ({s.reason_unknown()})")

    def rec(g, path):
        g = z3.simplify(g)
        if z3.is_false(g):
            return None
        c = scan.condition(g)
        if c is None:
            return leaf(g, path)
        for val in (True, False):
            lit = c if val else z3.Not(c)
            path_solver.push()
            path_solver.add(*path, lit)
            feasible = path_solver.check() != z3.unsat
            path_solver.pop()
            if not feasible:
                continue
            res = rec(z3.substitute(g, (c, z3.BoolVal(val))), path + [lit])
            if res is not None:
                return res
        return None

    res = rec(goal, [])
    secs = time.perf_counter() - t0
    if res is None:
        return {"status": "proved", "leaves": leaves[0], "model": None, "detail": f"{leaves[0]} cases", "seconds": secs}
    status, model, detail = res
    return {"status": status, "leaves": leaves[0], "model": model, "detail": detail, "seconds": secs}
