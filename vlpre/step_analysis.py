"""What a traced or compiled step does: its matmul FLOPs (from the jaxpr) and its
collectives (from the compiled HLO text). `vlpre.compile` reports both for a TPU slice.
"""
from __future__ import annotations

import collections
import math
import re

import jax

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def jaxpr_flops(jaxpr) -> float:
  """Multiply-adds ×2 of every matmul and convolution of a jaxpr; scans times their length.

  A while loop's body counts once (its trip count is not static); vlpre's layer stacks
  are scans.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape  # [out features, in features / groups, *window]
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / out_features
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      for value in eqn.params.values():
        if isinstance(value, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          total += jaxpr_flops(value)
  return total


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][a-z\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _array_bytes(shape_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    bits = _DTYPE_BYTES.get(dtype, 0) * 8 or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
    sizes.append(math.prod(int(d) for d in dims.split(",") if d) * bits // 8)
  return sizes


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {"count": per step, "bytes": per step}} of the collectives in compiled HLO text.

  Asynchronous pairs (`all-gather-start` / `-done`) count once, at their start; bytes are
  the op's result (for an async start, whose result also holds its operands, the largest
  array of it: the gathered or permuted one). An op inside a while loop's body counts
  once per iteration, its trip count read off the loop condition (`counter < N`, as
  scans compile); loops nest.
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    if match := _COMPUTATION.match(line):
      current = match.group(1)
      computations[current] = []
    elif current is not None and line.strip() not in ("", "}"):
      computations[current].append(line)
  entry = next((m.group(1) for line in hlo_text.splitlines()
                if line.startswith("ENTRY") and (m := _COMPUTATION.match(line))), None)
  trips: dict[str, int] = {}  # loop body → iterations per execution of its loop
  children: dict[str, list[str]] = collections.defaultdict(list)
  for name, lines in computations.items():
    for line in lines:
      if " while(" in line and (body := re.search(r"body=%?([\w.\-]+)", line)):
        cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
        bound = [int(c) for c in re.findall(r"constant\((\d+)\)", "\n".join(
            computations.get(cond, [])))]
        trips[body.group(1)] = bound[0] if len(bound) == 1 else 1
        children[name] += [body.group(1), cond]
      else:
        children[name] += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)="
                                     r"\{?%?([\w.\-]+)", line)
  runs: dict[str, int] = collections.defaultdict(int)

  def visit(name, times, depth=0):
    if depth > 64:  # computation graphs are DAGs; this only guards a malformed text
      return
    runs[name] += times
    for child in set(children.get(name, ())):
      visit(child, times * trips.get(child, 1), depth + 1)
  if entry is not None:
    visit(entry, 1)
  found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, op = match.group(1), match.group(2)
      base = op.removesuffix("-start")
      if base not in found:
        continue
      sizes = _array_bytes(shape)
      size = max(sizes, default=0) if op.endswith("-start") and base != "all-reduce" else sum(sizes)
      found[base]["count"] += runs.get(name, 0)
      found[base]["bytes"] += runs.get(name, 0) * size
  return found
