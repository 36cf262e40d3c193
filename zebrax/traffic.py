"""The HBM traffic of a compiled TPU program, estimated from its optimised HLO text: what one chip reads from and
writes to HBM in one call.

The compiler's own figure (``cost_analysis()["bytes accessed"]``) counts every operand and result of every
instruction wherever it lives, so a weight prefetched into VMEM counts two or three times and a decode step
looks like several reads of its weights. Here each instruction that runs (loop bodies times their known trip
counts) counts the bytes of its operands and result that live in HBM (an array whose layout names no other
memory space, ``S(n)``), except where the instruction touches part of a buffer:

- a dynamic-update-slice (alone, or as the root of a fusion) writes its update in place: the update counts, the
  buffer does not;
- a slice, dynamic-slice or gather (alone, or as the only users of a fusion's operand) reads what it returns;
- ``copy-start`` reads its operand, ``copy-done`` writes its result (only where that is HBM).

It is an estimate of the program XLA built, not of a run; ``zebrax.aot`` compares a decode step's with the bytes
it must read (``must_read``: weights, cache and states, its arguments).
"""

from __future__ import annotations

import collections
import math
import re

_SIZES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_SIZES) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(, .*)?$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
_SLICING = {"slice", "dynamic-slice", "gather"}


def hbm_bytes(shape: str) -> int:
    """Bytes of the arrays in an HLO shape (a tuple's elements summed) that live in HBM."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if not re.search(r"S\(\d+\)", layout or ""):
            total += _SIZES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _computations(hlo: str) -> tuple[dict, str]:
    """({name: [instruction dicts]}, the entry computation's name)."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            head = re.match(r"(ENTRY )?%?([\w.\-]+)", line)
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif current and line.startswith("  ") and (m := _INSTRUCTION.match(line)):
            name, shape, op, args, rest = m.groups()
            comps[current].append({"name": name, "shape": shape, "op": op, "rest": rest or "",
                                   "args": re.findall(r"%([\w.\-]+)", args), "index": args,
                                   "root": line.lstrip().startswith("ROOT")})
    return comps, entry


def traffic(hlo: str) -> list[tuple[int, str, str]]:
    """``[(bytes, op, op_name)]`` for every instruction that runs, per call (see the module's rules)."""
    comps, entry = _computations(hlo)
    shapes = {i["name"]: i["shape"] for body in comps.values() for i in body}
    rows = []

    def fusion(instr, callee) -> int:
        body = comps[callee]
        users = collections.defaultdict(list)
        for i in body:
            for a in i["args"]:
                users[a].append(i)
        params = {int(i["index"]): i["name"] for i in body if i["op"] == "parameter"}
        root = next(i for i in body if i["root"])
        in_place = root["op"] == "dynamic-update-slice"
        written = hbm_bytes(instr["shape"])
        total = (hbm_bytes(shapes[root["args"][1]]) if written else 0) if in_place else written  # in place: the update
        for k, operand in enumerate(instr["args"]):
            whole, inner = hbm_bytes(shapes.get(operand, "")), params.get(k)
            if in_place and root["args"][0] == inner:
                continue
            reads = users.get(inner, [])
            if whole and reads and all(u["op"] in _SLICING and u["args"][0] == inner for u in reads):
                total += min(whole, sum(hbm_bytes(u["shape"]) for u in reads))
            else:
                total += whole
        return total

    def walk(name: str, times: int) -> None:
        for i in comps[name]:
            op, rest = i["op"], i["rest"]
            if op in _FREE:
                continue
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                walk(re.search(r"body=%([\w.\-]+)", rest).group(1), times * (int(trips.group(1)) if trips else 1))
                continue
            if op in ("conditional", "call"):
                for branch in re.findall(r"%([\w.\-]+)", re.search(r"(branch_computations=\{[^}]*\}|to_apply=%[\w."
                                                                   r"\-]+|true_computation=.*)", rest).group(1)):
                    if branch in comps:
                        walk(branch, times)
                continue
            callee = re.search(r"calls=%([\w.\-]+)", rest)
            if op == "fusion" and callee:
                moved = fusion(i, callee.group(1))
            elif op == "dynamic-update-slice":
                moved = 2 * hbm_bytes(shapes[i["args"][1]]) if hbm_bytes(i["shape"]) else 0
            elif op in _SLICING:
                moved = 2 * hbm_bytes(i["shape"])
            elif op == "copy-start":
                moved = sum(hbm_bytes(shapes.get(a, "")) for a in i["args"])
            elif op == "copy-done":
                moved = hbm_bytes(i["shape"])
            else:
                moved = hbm_bytes(i["shape"]) + sum(hbm_bytes(shapes.get(a, "")) for a in i["args"])
            where = re.search(r'op_name="([^"]*)"', rest)
            rows.append((moved * times, op, where.group(1) if where else ""))

    walk(entry, 1)
    return rows


def hbm_traffic(hlo: str) -> int:
    """Bytes one chip moves to and from HBM in one call of the compiled program ``hlo`` (``compiled.as_text()``)."""
    return sum(moved for moved, _, _ in traffic(hlo))
