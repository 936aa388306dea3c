"""Which collectives can reach which outputs of a jaxpr (for the overlap-safety tests)."""

from __future__ import annotations

import itertools

import jax
from jax.extend import core

from distrifusion_jax.parallel.comm import sub_jaxprs

COLLECTIVES = ("ppermute", "all_gather", "psum", "all_to_all", "reduce_scatter", "psum_scatter")

_ids = itertools.count()


def collective_taint(jaxpr, in_labels=None, found=None):
    """Propagate, for every variable, the set of collective equations it depends on.

    Returns (labels of each outvar, {label: primitive name} of every collective seen).
    Sub-jaxprs whose inputs line up with the equation's are followed exactly; others
    (loops, conds) are over-approximated: every output depends on every input and on every
    collective inside. Over-approximation can only make the test stricter.
    """
    found = {} if found is None else found
    env = {}
    in_labels = in_labels or [frozenset()] * len(jaxpr.invars)
    for v, lab in zip(jaxpr.invars, in_labels):
        env[v] = lab
    read = lambda v: env.get(v, frozenset()) if not isinstance(v, core.Literal) else frozenset()
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        union = frozenset().union(*ins) if ins else frozenset()
        subs = list(sub_jaxprs(eqn))
        if eqn.primitive.name in COLLECTIVES:
            label = next(_ids)
            found[label] = eqn.primitive.name
            outs = [union | {label}] * len(eqn.outvars)
        elif len(subs) == 1 and len(subs[0].invars) == len(eqn.invars) and len(
            subs[0].outvars
        ) == len(eqn.outvars):
            outs, _ = collective_taint(subs[0], ins, found)
        elif subs:
            inner = frozenset()
            for sub in subs:
                before = set(found)
                collective_taint(sub, None, found)
                inner |= set(found) - before  # any collective inside may reach any output
            outs = [union | inner] * len(eqn.outvars)
        else:
            outs = [union] * len(eqn.outvars)
        for v, lab in zip(eqn.outvars, outs):
            env[v] = lab
    return [read(v) for v in jaxpr.outvars], found


def eps_collectives(step, *args):
    """Primitive names of the collectives that the eps output (first output) depends on, and
    `{label: name}` of every collective in the step. Arguments may be shapes only."""
    closed = jax.make_jaxpr(step)(*args)
    labels, found = collective_taint(closed.jaxpr)
    return sorted(found[k] for k in labels[0]), found


def _walk(jaxpr, tainted_inputs, found: list[str]) -> list[bool]:
    """Propagate "depends on a marked input" through a jaxpr; append to `found` the name of
    every collective whose operands do. Returns the taint of the outputs. Sub-jaxprs whose
    inputs line up with the equation's are followed exactly; in others (loops, conds) any
    tainted input taints every output and every collective inside: stricter, never laxer."""
    env = dict(zip(jaxpr.invars, tainted_inputs))
    read = lambda v: False if isinstance(v, core.Literal) else env.get(v, False)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        subs = list(sub_jaxprs(eqn))
        outs = [any(ins)] * len(eqn.outvars)
        if eqn.primitive.name in COLLECTIVES:
            if any(ins):
                found.append(eqn.primitive.name)
        elif len(subs) == 1 and len(subs[0].invars) == len(eqn.invars):
            sub_outs = _walk(subs[0], ins, found)
            if len(sub_outs) == len(eqn.outvars):
                outs = sub_outs
        else:
            for sub in subs:
                _walk(sub, [any(ins)] * len(sub.invars), found)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def latent_collectives(step, args, argnum: int) -> list[str]:
    """Sorted names of the collectives of `step(*args)` whose operands depend on `args[argnum]`
    (e.g. this step's latents). Arguments may be shapes only."""
    closed = jax.make_jaxpr(step)(*args)
    leaves = [len(jax.tree.leaves(a)) for a in args]
    first = sum(leaves[:argnum])
    marks = [first <= i < first + leaves[argnum] for i in range(sum(leaves))]
    found: list[str] = []
    _walk(closed.jaxpr, marks, found)
    return sorted(found)
