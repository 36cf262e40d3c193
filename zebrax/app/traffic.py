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
- ``copy-start`` reads its operand, ``copy-done`` writes its result (only where that is HBM);
- an asynchronous slice (``slice-start`` … ``slice-done``, the weight-slice prefetches a v5e or v6e decode step
  makes into VMEM) reads what it returns, counted at its ``-done``, and writes it only where that is HBM; its
  ``-start``'s tuple, which repeats the whole operand, moves nothing;
- a loop whose trip count depends on data (attention over the filled part of a cache) is taken to walk the largest
  buffer its body slices once: as many trips as the slices fit in it, shared with the sibling loops that walk the
  same buffer, followed through the loops that carry it (the blocked attention's loops over full and diagonal
  blocks). A decode step is so counted with its cache full; a causal pass over a sequence, at most twice what it
  reads.

It is an estimate of the program XLA built, not of a run; ``zebrax.app.aot`` compares a decode step's with the bytes
it must read (``must_read``: weights, cache and states, its arguments).
"""

from __future__ import annotations

import collections
import functools
import math
import re

_SIZES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_SIZES) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(, .*)?$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
_SLICING = {"slice", "dynamic-slice", "gather"}
_ASYNC_SLICING = {"slice-start": "slice-done", "dynamic-slice-start": "dynamic-slice-done"}


def hbm_bytes(shape: str, anywhere: bool = False) -> int:
    """Bytes of the arrays in an HLO shape (a tuple's elements summed) that live in HBM (``anywhere``: all)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(shape):
        if anywhere or not re.search(r"S\(\d+\)", layout or ""):
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
    operands = {i["name"]: i["args"] for body in comps.values() for i in body}
    rows = []

    @functools.cache
    def sliced(callee) -> dict[int, int]:
        """{operand index: bytes its slices read} for the operands of fusion ``callee`` read only by slicing."""
        body = comps[callee]
        users = collections.defaultdict(list)
        for i in body:
            for a in i["args"]:
                users[a].append(i)

        def slice_read(user, param) -> int | None:  # what ``user`` reads of ``param`` if it only slices it
            if user["op"] in _SLICING:
                only = user["args"][0] == param and param not in user["args"][1:]
                return hbm_bytes(user["shape"], anywhere=True) if only else None
            inner = re.search(r"calls=%([\w.\-]+)", user["rest"])
            if user["op"] != "fusion" or not inner or user["args"].count(param) != 1:
                return None
            return sliced(inner.group(1)).get(user["args"].index(param))  # a nested fusion

        out = {}
        for i in body:
            reads = [slice_read(u, i["name"]) for u in users.get(i["name"], [])]
            if i["op"] == "parameter" and reads and None not in reads:
                out[int(i["index"])] = sum(reads)
        return out

    def fusion(instr, callee) -> int:
        body = comps[callee]
        params = {int(i["index"]): i["name"] for i in body if i["op"] == "parameter"}
        root = next(i for i in body if i["root"])
        in_place = root["op"] == "dynamic-update-slice"
        written = hbm_bytes(instr["shape"])
        total = (hbm_bytes(shapes[root["args"][1]]) if written else 0) if in_place else written  # in place: the update
        reads = sliced(callee)
        for k, operand in enumerate(instr["args"]):
            whole = hbm_bytes(shapes.get(operand, ""))
            if in_place and root["args"][0] == params.get(k):
                continue
            total += min(whole, reads[k]) if whole and k in reads else whole
        return total

    def walked(body: str) -> tuple[float, int | None]:
        """(trips, index) of a loop that walks the largest buffer its body slices, element ``index`` of the loop's
        state: as many trips as the body's slices fit in it (1, None: it slices no part of its state)."""
        by_name = {i["name"]: i for i in comps[body]}

        def element(name):  # the state element an operand of the body is, through bitcasts
            i = by_name.get(name)
            while i is not None and i["op"] == "bitcast":
                i = by_name.get(i["args"][0])
            return int(re.search(r"index=(\d+)", i["rest"]).group(1)) if i and i["op"] == "get-tuple-element" else None

        best = (1.0, 0, None)
        for i in comps[body]:
            callee = re.search(r"calls=%([\w.\-]+)", i["rest"])
            if i["op"] == "fusion" and callee:
                pairs = [(i["args"][k], b) for k, b in sliced(callee.group(1)).items()]
            elif i["op"] in _SLICING:
                pairs = [(i["args"][0], hbm_bytes(i["shape"], anywhere=True))]
            else:
                continue
            for operand, read in pairs:
                whole, k = hbm_bytes(shapes.get(operand, "")), element(operand)
                if read and whole > read and k is not None:
                    best = max(best, (whole / read, whole, k))
        return best[0], best[2]

    def walk(name: str, times: float) -> None:
        here = {i["name"]: i for i in comps[name]}

        def origin(value):  # a buffer through bitcasts and the loops that carry it
            i = here.get(value)
            while i is not None and i["op"] in ("bitcast", "get-tuple-element"):
                source = here.get(i["args"][0])
                if i["op"] == "bitcast":
                    value, i = i["args"][0], source
                elif source is not None and source["op"] == "while" and here.get(source["args"][0], {}).get("op") \
                        == "tuple":
                    value = here[source["args"][0]]["args"][int(re.search(r"index=(\d+)", i["rest"]).group(1))]
                    i = here.get(value)
                else:
                    break
            return value

        unknown = {}  # the loops of data-dependent trip count: name → (trips, the buffer they walk)
        for i in comps[name]:
            if i["op"] == "while" and '"known_trip_count"' not in i["rest"]:
                trips, k = walked(re.search(r"body=%([\w.\-]+)", i["rest"]).group(1))
                state = here.get(i["args"][0])
                walks = origin(state["args"][k]) if k is not None and state and state["op"] == "tuple" else None
                unknown[i["name"]] = (trips, walks)
        siblings = collections.Counter(walks for _, walks in unknown.values())
        for i in comps[name]:
            op, rest = i["op"], i["rest"]
            if op in _FREE:
                continue
            if op == "while":
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trips, walks = unknown.get(i["name"], (1, None))
                trips = int(known.group(1)) if known else trips / siblings[walks] if walks else trips
                walk(re.search(r"body=%([\w.\-]+)", rest).group(1), times * trips)
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
            elif op in _ASYNC_SLICING:
                moved = 0  # counted when it lands
            elif op in _ASYNC_SLICING.values():  # the slice of an operand in HBM read, written where it lands
                source = operands.get(i["args"][0], [""])[0]
                moved = (hbm_bytes(i["shape"], anywhere=True) if hbm_bytes(shapes.get(source, "")) else 0) + \
                    hbm_bytes(i["shape"])
            elif op == "copy-start":
                moved = sum(hbm_bytes(shapes.get(a, "")) for a in i["args"])
            elif op == "copy-done":
                moved = hbm_bytes(i["shape"])
            else:
                moved = hbm_bytes(i["shape"]) + sum(hbm_bytes(shapes.get(a, "")) for a in i["args"])
            where = re.search(r'op_name="([^"]*)"', rest)
            rows.append((round(moved * times), op, where.group(1) if where else ""))

    walk(entry, 1)
    return rows


def hbm_traffic(hlo: str) -> int:
    """Bytes one chip moves to and from HBM in one call of the compiled program ``hlo`` (``compiled.as_text()``)."""
    return sum(moved for moved, _, _ in traffic(hlo))
