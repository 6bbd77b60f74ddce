"""Reads an optimized HLO module's text: its matmuls, their FLOPs and sources.

XLA's `cost_analysis()` counts the body of a `while` loop once, however many
times it runs, so for a model whose layers are a `jax.lax.scan`
(`model.scan_layers`), with micro-batches (`train.grad_accum_steps`) or a
chunked loss it reports a fraction of the FLOPs a step performs. This module
counts them itself from the optimized (per-device, after SPMD partitioning)
HLO text of `compiled.as_text()`:

  * each computation's multiplicity is how often one step runs it: a `while`
    body and condition run `trip count` times per run of their caller, the
    trip count being the loop bound of the condition (`counter < N`, the
    form `jax.lax.scan` and `fori_loop` lower to); fusions, calls and
    branches run once per run of their caller;
  * each `dot` costs 2 x prod(output) x prod(contracting dims) FLOPs and
    each `convolution` (the TPU compiler's form of a dot) 2 x batch x
    output features x input features x the window taps that meet real
    input (`_convolution_flops`), the usual multiply-add count;
  * each matmul is attributed to the innermost bitnet_jax function in its
    `stack_frame_id` (the Python source that made it).

Only matmuls are counted (the MFU convention: elementwise work is not
model FLOPs).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ARRAY = r"(\w+)\[([\d,]*)\](?:\{[^}]*\})?"
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*" + _ARRAY + r"\s+([\w\-]+)\((.*)$")
_MATMUL = re.compile(r"^%([\w.\-]+), %([\w.\-]+)\)")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"=\s*[su](?:32|64)\[\]\S*\s+constant\((-?\d+)\)")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TABLE_ROW = re.compile(r"^(\d+)\s+(.*)$")
# XLA's GPU compiler records a while loop's count on the loop and moves the
# bound of its condition into a fusion
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# any instruction: name, shape (an array or a tuple), opcode, the rest
_ANY = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_ARRAYS = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
          "f64": 8, "s4": 0.5, "u4": 0.5, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One dot or convolution of the optimized HLO.

  Attributes:
    name: the HLO instruction name.
    lhs_dtype, rhs_dtype, out_dtype: HLO element types ("s8", "bf16",
      "f32", "s32").
    flops: multiply-adds x 2 of one execution.
    count: executions per step (the multiplicity of its computation).
    source: "file.py:line function" of the innermost bitnet_jax frame that
      made it, preceded by its bitnet_jax caller ("caller < callee"), or ""
      when the HLO carries no such frame.
    op_name: JAX's name of the operation ("jit(train_step)/jvp()/...";
      "transpose(" marks the backward pass, "rematted" or "checkpoint" a
      recomputation of the forward).
    kind: "dot" (a dot, on GPU usually inside a Triton GEMM fusion),
      "convolution" (the TPU compiler's form of a dot) or "cublas" (a
      cuBLAS / cuBLASLt custom call, `__cublas$gemm`,
      `__cublas$lt$matmul`).
  """
  name: str
  lhs_dtype: str
  rhs_dtype: str
  out_dtype: str
  flops: float
  count: int
  source: str
  op_name: str = ""
  kind: str = "dot"

  @property
  def backward(self) -> bool:
    """Part of the gradient (JAX's transpose of the forward)."""
    return "transpose(" in self.op_name

  @property
  def is_int8(self) -> bool:
    """int8 x int8 -> int32: the MXU's integer path."""
    return (self.lhs_dtype, self.rhs_dtype, self.out_dtype) == ("s8", "s8",
                                                                "s32")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


# A report reads one module several times (matmuls, fused attention, bytes):
# the parse and the counts are made once per text. Callers only read them.
@functools.lru_cache(maxsize=2)
def _split(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """(computation name -> its instruction lines, table name -> its rows)."""
  computations: dict[str, list[str]] = {}
  tables: dict[str, list[str]] = collections.defaultdict(list)
  current, table = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current, table = header.group(1), None
      computations[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
    elif line.strip() in ("FileNames", "FunctionNames", "FileLocations",
                          "StackFrames"):
      table = line.strip()
    elif table and _TABLE_ROW.match(line):
      tables[table].append(line)
  return computations, tables


def _entry_name(text: str) -> str:
  for line in text.splitlines():
    if line.startswith("ENTRY"):
      return _HEADER.match(line).group(1)
  raise ValueError("the HLO text has no ENTRY computation")


def _trip_count(condition: list[str]) -> int:
  """The loop bound of a while condition: its largest integer constant (1 if
  it has none: a loop of unknown count is counted once, as XLA does)."""
  bounds = [int(m.group(1)) for line in condition
            for m in [_CONSTANT.search(line)] if m]
  return max(bounds) if bounds and max(bounds) > 0 else 1


@functools.lru_cache(maxsize=2)
def multiplicities(text: str) -> dict[str, int]:
  """How many times one execution of the module runs each computation."""
  computations, _ = _split(text)
  calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  for name, lines in computations.items():
    for line in lines:
      callees = dict((kind, callee) for kind, callee in
                     _CALLEE.findall(line))
      known = _KNOWN_TRIPS.search(line)
      trips = (int(known.group(1)) if known and "body" in callees else
               _trip_count(computations.get(callees["condition"], []))
               if "body" in callees else 1)
      for kind, callee in callees.items():
        calls[name].append((callee, trips if kind in ("body", "condition")
                            else 1))
      for branches in _BRANCHES.findall(line):
        for callee in re.findall(r"%([\w.\-]+)", branches):
          calls[name].append((callee, 1))
  counts: dict[str, int] = collections.defaultdict(int)

  def visit(name: str, times: int, depth: int) -> None:
    if depth > 64:
      raise ValueError(f"HLO call depth over 64 at {name}")
    counts[name] += times
    for callee, trips in calls.get(name, ()):
      visit(callee, times * trips, depth + 1)

  visit(_entry_name(text), 1, 0)
  return dict(counts)


def _sources(tables: dict[str, list[str]]) -> dict[int, str]:
  """stack_frame_id -> "caller < file.py:line function" of its two innermost
  bitnet_jax frames ("" if none)."""

  def rows(name):
    return {int(m.group(1)): m.group(2) for m in
            map(_TABLE_ROW.match, tables.get(name, ()))}

  files = {i: v.strip('"') for i, v in rows("FileNames").items()}
  functions = {i: v.strip('"') for i, v in rows("FunctionNames").items()}
  locations = {}
  for i, v in rows("FileLocations").items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    locations[i] = (files.get(int(fields["file_name_id"]), "?"),
                    functions.get(int(fields["function_name_id"]), "?"),
                    int(fields["line"]))
  frames = {}
  for i, v in rows("StackFrames").items():
    fields = dict(re.findall(r"(\w+)=(\d+)", v))
    frames[i] = (int(fields["file_location_id"]),
                 int(fields["parent_frame_id"]))
  resolved = {}
  for frame in frames:
    chain, seen, current = [], set(), frame
    while current in frames and current not in seen and len(chain) < 2:
      seen.add(current)
      location_id, parent = frames[current]
      file, function, line = locations.get(location_id, ("", "", 0))
      if "/bitnet_jax/" in file:
        chain.append(f"{file.rsplit('/bitnet_jax/', 1)[1]}:{line} "
                     f"{function}")
      current = parent
    resolved[frame] = " < ".join(reversed(chain))
  return resolved


def _real_pairs(out: int, size: int, inp: int, stride: int, pad_low: int,
                lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one window dimension that meet
  a real input element, not padding or a dilation's inserted zero."""
  last = (inp - 1) * lhs_dilate
  pairs = 0
  for o in range(out):
    for t in range(size):
      p = o * stride + t * rhs_dilate - pad_low
      pairs += 0 <= p <= last and p % lhs_dilate == 0
  return pairs


def _convolution_flops(rest: str, lhs_dims: list[int], out_dims: list[int],
                       rhs_dims: list[int]) -> float:
  """2 x batch x output features x input features x the real (output,
  tap) pairs of each window dimension. The TPU compiler writes dots as
  convolutions whose window holds batch dims (dilated, strided or padded so
  that each output meets one input) or contracting dims (a plain window)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
  if not labels:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", rest)
  fields = dict(f.split("=", 1) for f in window.group(1).split()) if window \
      else {}

  def per_dim(key, default):
    text = fields.get(key)
    return [default] * 8 if text is None else text.split("x")

  sizes, strides = per_dim("size", "1"), per_dim("stride", "1")
  pads, lhs_dilates = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1")
  rhs_dilates = per_dim("rhs_dilate", "1")
  pairs = 1
  for d, label in enumerate(sorted(c for c in out_labels if c.isdigit())):
    pairs *= _real_pairs(
        out_dims[out_labels.index(label)], int(sizes[d]),
        lhs_dims[lhs_labels.index(label)], int(strides[d]),
        int(pads[d].split("_")[0]), int(lhs_dilates[d]), int(rhs_dilates[d]))
  batch = out_dims[out_labels.index("b")]
  features = out_dims[out_labels.index("f")]
  inputs = math.prod(n for n, c in zip(rhs_dims, rhs_labels) if c == "i")
  return 2.0 * batch * features * inputs * pairs


def _module(text: str) -> tuple[dict[str, list[str]], dict[str, int],
                                dict[int, str],
                                dict[str, tuple[str, list[int]]]]:
  """(computation -> lines, computation -> runs per step, stack frame ->
  source, instruction -> (element type, dims)) of an HLO module's text."""
  computations, tables = _split(text)
  return (computations, multiplicities(text), _sources(tables),
          _shapes(computations))


def matmuls(text: str) -> list[Matmul]:
  """Every dot and convolution of the module, with its per-step count."""
  computations, counts, sources, shapes = _module(text)
  found = []
  for computation, lines in computations.items():
    for line in lines:
      gemm = _cublas_gemm(line, shapes, counts.get(computation, 0), sources)
      if gemm:
        found.append(gemm)
        continue
      m = _INSTRUCTION.match(line)
      if not m or m.group(4) not in ("dot", "convolution"):
        continue
      name, out_dtype, out_dims, op, rest = m.groups()
      operands = _MATMUL.match(rest)
      if not operands:
        continue
      lhs, rhs = (shapes.get(o, ("?", [])) for o in operands.groups())
      if op == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        k = math.prod(lhs[1][d] for d in _dims(contracting.group(1))
                      ) if contracting else 1
        flops = 2.0 * math.prod(_dims(out_dims)) * k
      else:
        flops = _convolution_flops(rest, lhs[1], _dims(out_dims), rhs[1])
      frame = _FRAME_ID.search(rest)
      op_name = _OP_NAME.search(rest)
      found.append(Matmul(
          name=name, lhs_dtype=lhs[0], rhs_dtype=rhs[0],
          out_dtype=out_dtype, flops=flops,
          count=counts.get(computation, 0),
          source=sources.get(int(frame.group(1)), "") if frame else "",
          op_name=op_name.group(1) if op_name else "", kind=op))
  return found


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction's text after its opcode's "(",
  up to the closing parenthesis."""
  depth, end = 1, 0
  for end, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def _metadata(rest: str, sources: dict[int, str]) -> tuple[str, str]:
  frame = _FRAME_ID.search(rest)
  op_name = _OP_NAME.search(rest)
  return (sources.get(int(frame.group(1)), "") if frame else "",
          op_name.group(1) if op_name else "")


def _cublas_gemm(line: str, shapes: dict[str, tuple[str, list[int]]],
                 count: int, sources: dict[int, str]) -> Matmul | None:
  """A cuBLAS GEMM custom call as a `Matmul` (None for any other line).
  Its result is the first element of the output tuple (the second is the
  workspace); the contracting dimensions are in `gemm_backend_config`."""
  target = _CUSTOM_TARGET.search(line)
  if not target or not target.group(1).startswith("__cublas$"):
    return None
  m = _ANY.match(line)
  if not m or m.group(3) != "custom-call":
    return None
  name, shape, _, rest = m.groups()
  out = _ARRAYS.search(shape)
  operands = _operands(rest)
  if not out or len(operands) < 2:
    return None
  lhs, rhs = (shapes.get(o, ("?", [])) for o in operands[:2])
  contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
  dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))
          ] if contracting else []
  k = math.prod(lhs[1][d] for d in dims if d < len(lhs[1]))
  source, op_name = _metadata(rest, sources)
  return Matmul(name=name, lhs_dtype=lhs[0], rhs_dtype=rhs[0],
                out_dtype=out.group(1),
                flops=2.0 * math.prod(_dims(out.group(2))) * k, count=count,
                source=source, op_name=op_name, kind="cublas")


@dataclasses.dataclass(frozen=True)
class FusedAttention:
  """One cuDNN fused-attention custom call (`__cudnn$fmha...`).

  Attributes:
    target: the custom-call target ("__cudnn$fmhaSoftmax",
      "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmax", ...).
    count: executions per step.
    flops: the matmul FLOPs of one execution (4 x batch x heads x q_len x
      kv_len x head_dim forward, 2.5 times that backward: the FLOP
      convention of FlashAttention, Dao et al. 2022, with no causal
      halving), from the query's `[batch, seq, heads, head_dim]` operand.
    op_name: JAX's name of the operation.
  """
  target: str
  count: int
  flops: float
  op_name: str

  @property
  def backward(self) -> bool:
    return self.target.endswith("Backward")


def fused_attention(text: str) -> list[FusedAttention]:
  """Every cuDNN fused-attention call of the module with its per-step
  count."""
  computations, counts, sources, shapes = _module(text)
  found = []
  for computation, lines in computations.items():
    for line in lines:
      target = _CUSTOM_TARGET.search(line)
      if not target or not target.group(1).startswith("__cudnn$fmha"):
        continue
      m = _ANY.match(line)
      operands = _operands(m.group(4)) if m else []
      query = shapes.get(operands[0], ("?", []))[1] if operands else []
      flops = 0.0
      if len(query) == 4:  # [batch, seq, heads, head_dim]
        batch, seq, heads, dim = query
        flops = 4.0 * batch * heads * seq * seq * dim
        if target.group(1).endswith("Backward"):
          flops *= 2.5
      found.append(FusedAttention(target.group(1), counts.get(computation, 0),
                                  flops, _metadata(line, sources)[1]))
  return found


def _shapes(computations: dict[str, list[str]]
            ) -> dict[str, tuple[str, list[int]]]:
  """instruction name -> (element type, dims) of every array-shaped one."""
  shapes = {}
  for lines in computations.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        shapes[m.group(1)] = (m.group(2), _dims(m.group(3)))
  return shapes


def _shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape (an array or a tuple of arrays)."""
  return sum(_BYTES.get(dtype, 4) * math.prod(_dims(dims))
             for dtype, dims in _ARRAYS.findall(shape))


# instructions that move no data of their own
_FREE = frozenset((
    "parameter", "get-tuple-element", "tuple", "constant", "bitcast",
    "while", "conditional", "call", "after-all", "partition-id",
    "replica-id", "opt-barrier", "add-dependency", "domain",
    "async-done", "all-reduce-done", "all-gather-done",
    "collective-permute-done", "copy-done", "send-done", "recv-done"))


_SLICING = frozenset(("dynamic-slice", "slice", "gather"))


def _fusion_bytes(lines: list[str], operand_bytes: list[float],
                  output_bytes: float) -> float:
  """Bytes a fusion kernel moves: each operand read whole, except one only
  sliced inside (`dynamic-slice`, `slice`, `gather`: the slices are read)
  or updated in place (`dynamic-update-slice`'s buffer: nothing read); its
  result written whole, except an in-place update (the update is
  written)."""
  parsed = [m for m in map(_ANY.match, lines) if m]
  size = {m.group(1): _shape_bytes(m.group(2)) for m in parsed}
  users: dict[str, list[tuple[str, str, int]]] = collections.defaultdict(list)
  params: dict[str, int] = {}
  root = None
  for m, line in zip(parsed, [line for line in lines if _ANY.match(line)]):
    name, _, op, rest = m.groups()
    if op == "parameter":
      index = re.match(r"(\d+)\)", rest)
      params[name] = int(index.group(1)) if index else -1
    for position, operand in enumerate(_operands(rest)):
      users[operand].append((name, op, position))
    if line.lstrip().startswith("ROOT"):
      root = m
  def through_bitcasts(name: str) -> list[tuple[str, str, int]]:
    found = []
    for user in users.get(name, []):
      found.extend(through_bitcasts(user[0]) if user[1] == "bitcast"
                   else [user])
    return found

  moved = 0.0
  for name, index in params.items():
    uses = through_bitcasts(name)
    if uses and all(op in _SLICING and position == 0
                    for _, op, position in uses):
      moved += sum(size[user] for user, _, _ in uses)
    elif uses and all(op == "dynamic-update-slice" and position == 0
                      for _, op, position in uses):
      continue
    elif 0 <= index < len(operand_bytes):
      moved += operand_bytes[index]

  def written(m) -> float:
    if m.group(3) == "dynamic-update-slice":
      operands = _operands(m.group(4))
      return size.get(operands[1], 0.0) if len(operands) > 1 else 0.0
    if m.group(3) == "tuple":
      by_name = {p.group(1): p for p in parsed}
      return sum(written(by_name[o]) if o in by_name else 0.0
                 for o in _operands(m.group(4)))
    return size[m.group(1)]
  return moved + (written(root) if root else output_bytes)


def kernel_bytes(text: str) -> float:
  """Device-memory bytes one step moves, an estimate: every kernel (each
  instruction of the entry computation, loop bodies and branches: fusions,
  custom calls, copies, collectives) reads its operands and writes its
  result once, times how often the step runs it; slices read only the
  slice and in-place updates write only the update (`_fusion_bytes`).
  Fusion internals stay in registers and shared memory; instructions that
  move nothing (`_FREE`) count nothing. The roofline's memory side."""
  computations, _ = _split(text)
  counts = multiplicities(text)
  fused = set()
  for lines in computations.values():
    for line in lines:
      m = _ANY.match(line)
      if not m:
        continue
      called = dict(_CALLEE.findall(line))
      if m.group(3) == "fusion" and "calls" in called:
        fused.add(called["calls"])
      if "to_apply" in called:
        fused.add(called["to_apply"])
  sizes: dict[str, float] = {}
  parsed = []
  for computation, lines in computations.items():
    for line in lines:
      m = _ANY.match(line)
      if m:
        shape = m.group(2)
        if "__cublas$" in line:  # (result, workspace): the result only
          shape = _ARRAYS.search(shape).group(0)
        sizes[m.group(1)] = _shape_bytes(shape)
        parsed.append((computation, m))
  total = 0.0
  for computation, m in parsed:
    if computation in fused or m.group(3) in _FREE:
      continue
    name, _, op, rest = m.groups()
    operands = [sizes.get(o, 0.0) for o in _operands(rest)]
    called = dict(_CALLEE.findall(rest))
    if op == "fusion" and called.get("calls") in computations:
      moved = _fusion_bytes(computations[called["calls"]], operands,
                            sizes[name])
    elif op in _SLICING:
      moved = 2 * sizes[name]
    elif op == "dynamic-update-slice":
      moved = 2 * (operands[1] if len(operands) > 1 else 0.0)
    else:
      moved = sizes[name] + sum(operands)
    total += moved * counts.get(computation, 0)
  return total
