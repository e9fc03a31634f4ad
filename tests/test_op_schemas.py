"""Every effops custom op states its schema explicitly (ops._common.custom_op), and that schema
is what the current torch infers from the function's annotations.

Why explicit: the ops modules use ``from __future__ import annotations``, and torch 2.4-2.5's
``infer_schema`` cannot read string annotations (``import effops`` failed there). Why compared
with inference: an explicit schema and the annotations could drift apart; on the torch the
tests run under, inference works, so the two must agree."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import effops  # registers the ops
import effops.ops
from effops.ops._common import OP_SCHEMAS


def _effops_ops():
    for m in pkgutil.iter_modules(effops.ops.__path__):  # ops modules effops loads lazily too (qconv)
        importlib.import_module(f"effops.ops.{m.name}")
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("effops::"))


def test_every_op_is_registered_through_custom_op_with_a_schema():
    ops = _effops_ops()
    assert len(ops) >= 13, ops  # nms x5, dwsep x6, bifpn x2 at least
    missing = [n for n in ops if n not in OP_SCHEMAS]
    assert not missing, (
        f"{missing}: register with effops.ops._common.custom_op(name, schema) (an explicit schema), "
        "not torch.library.custom_op: torch 2.4/2.5 cannot infer schemas from string annotations")


_effops_ops()


@pytest.mark.parametrize("name", sorted(OP_SCHEMAS))
def test_schema_matches_the_annotations(name):
    fn, schema = OP_SCHEMAS[name]
    if not hasattr(torch.library, "infer_schema"):
        pytest.skip("torch.library.infer_schema needs torch >= 2.5")
    try:
        inferred = torch.library.infer_schema(fn, mutates_args=())
    except ValueError as e:  # torch 2.5 reads string annotations only partly
        pytest.skip(f"this torch cannot infer the schema: {e}")
    assert schema == inferred, f"{name}: the explicit schema differs from the annotations"


@pytest.mark.parametrize("name", sorted(OP_SCHEMAS))
def test_registered_schema_is_the_explicit_one(name):
    fn, schema = OP_SCHEMAS[name]
    registered = str(getattr(torch.ops.effops, name.split("::")[1]).default._schema)
    assert registered == name + schema
    # The schema's argument names are the function's parameters, in order.
    args = schema[1:schema.index(") ->")].split(", ")
    names = [a.split("=")[0].split()[-1] for a in args]  # "Tensor? packed=None" -> packed
    assert names == list(inspect.signature(fn).parameters)
