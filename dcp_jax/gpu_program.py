"""What a compiled XLA:GPU program launches, read from XLA's dump, and an estimate of its time.

XLA writes, for a program compiled with `xla_dump_to=DIR`:
- `*thunk_sequence_after_thunk_passes.txt`: the executable's thunks as the GPU runs them, one line
  each, nested by indentation: kernels (kCustomKernel / kKernel), cuBLAS and cuDNN calls, copies,
  loops (kWhile: a condition and a body), and the CUDA graphs (kCommandBuffer) that hold some of them;
- `*thunk_metadata.txt`: each thunk's id and the HLO instruction it runs;
- `*gpu_after_optimizations.txt`: the optimised HLO, with each instruction's shapes, each loop's trip
  count and each library call's configuration.

`read_program(DIR)` joins the three: every kernel launch of one call of the program, with its kind,
whether it runs inside a CUDA graph, how many times it runs (loop bodies times their trip counts), its
FLOPs (matmuls, convolutions and attention, from the shapes) and the bytes it reads and writes.
`estimate(program, ...)` turns that into a time: per kernel the larger of FLOPs / peak and bytes /
bandwidth, plus a launch cost. It is an estimate: no kernel is run, XLA picked its library algorithms
without a device to time them on, and the roofline assumes every kernel reaches the peak.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

# Bytes per element of HLO's element types.
ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                 "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                 "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(ELEMENT_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of an HLO type ('bf16[4,577]{1,0}' or a tuple of them): [(element type, dims)]."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(type_text)]


def nbytes(array: tuple[str, tuple[int, ...]]) -> float:
    return ELEMENT_BYTES[array[0]] * math.prod(array[1])


# ---------------------------------------------------------------------------------------------
# The optimised HLO
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Instruction:
    name: str
    type: str  # the result type text
    opcode: str
    operands: list[str]  # operand instruction names
    attributes: str  # everything after the operand list
    computation: str

    @property
    def results(self) -> list[tuple[str, tuple[int, ...]]]:
        return arrays(self.type)

    def attribute(self, key: str) -> str | None:
        """The text of `key=...` up to the next top-level comma (braces balanced)."""
        start = self.attributes.find(f"{key}=")
        if start < 0:
            return None
        i, depth, text = start + len(key) + 1, 0, self.attributes
        for j in range(i, len(text)):
            c = text[j]
            depth += c in "{[("
            depth -= c in "}])"
            if c == "," and depth == 0:
                return text[i:j]
        return text[i:]

    def backend_config(self) -> dict:
        text = self.attribute("backend_config")
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {}


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes text[start] ('(' or '{')."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "({["
        depth -= text[i] in ")}]"
        if depth == 0:
            return i + 1
    return len(text)


_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")


class Hlo:
    """The instructions of an HLO module's text, by name (names are unique in a module), and which
    computation each belongs to; `roots[computation]`: its ROOT instruction's name."""

    def __init__(self, text: str):
        self.instructions: dict[str, Instruction] = {}
        self.computations: dict[str, list[str]] = {}
        self.roots: dict[str, str] = {}
        self.entry = ""
        computation = ""
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header and " = " not in line.split("(")[0]:
                computation = header.group(2)
                self.computations[computation] = []
                if header.group(1):
                    self.entry = computation
                continue
            definition = _DEFINITION.match(line)
            if not definition or not computation:
                continue
            rest = line[definition.end():]
            if rest.startswith("("):
                end = _matching(rest, 0)
            else:
                end = rest.find(" ")
            type_text, rest = rest[:end], rest[end:].lstrip()
            paren = rest.find("(")
            opcode = rest[:paren]
            close = _matching(rest, paren)
            operands = re.findall(r"%([\w.\-]+)", rest[paren:close])
            name = definition.group(1)
            self.instructions[name] = Instruction(name, type_text, opcode, operands, rest[close:], computation)
            self.computations[computation].append(name)
            if line.lstrip().startswith("ROOT "):
                self.roots[computation] = name

    def called(self, instruction: Instruction) -> list[str]:
        """The computations an instruction calls (a fusion's body, a call's target)."""
        names = []
        for key in ("calls", "to_apply", "body", "condition"):
            text = instruction.attribute(key)
            if text:
                names += re.findall(r"%([\w.\-]+)", text)
        return [n for n in names if n in self.computations]

    def operand_arrays(self, instruction: Instruction) -> list[tuple[str, tuple[int, ...]]]:
        found = []
        for name in instruction.operands:
            operand = self.instructions.get(name)
            found += operand.results if operand else []
        return found

    def trip_count(self, name: str) -> int | None:
        """A while loop's trip count, where XLA knows it."""
        instruction = self.instructions.get(name)
        count = instruction.backend_config().get("known_trip_count", {}).get("n") if instruction else None
        return int(count) if count is not None else None


def _dot_flops(hlo: Hlo, dot: Instruction, contracting_key: str = "lhs_contracting_dims") -> float:
    operands = hlo.operand_arrays(dot)
    if not operands or not dot.results:
        return 0.0
    dims = re.findall(r"\d+", dot.attribute(contracting_key) or "")
    contracted = math.prod(operands[0][1][int(d)] for d in dims) if dims else 1
    return 2.0 * math.prod(dot.results[0][1]) * contracted


def _convolution_flops(hlo: Hlo, conv: Instruction) -> float:
    """2 x output elements x window size x input features per group, as XLA's cost analysis counts."""
    operands = hlo.operand_arrays(conv)
    labels = conv.attribute("dim_labels") or ""
    window = re.search(r"size=([\dx]+)", conv.attribute("window") or "")
    if len(operands) < 2 or "_" not in labels or not conv.results:
        return 0.0
    kernel_labels = labels.split("_")[1].split("->")[0]
    kernel = operands[1][1]
    in_features = kernel[kernel_labels.index("i")] if "i" in kernel_labels and len(kernel) == len(kernel_labels) else 1
    size = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
    # the kernel's input-feature dimension already counts one group's features
    return 2.0 * math.prod(conv.results[0][1]) * size * in_features


def _attention_flops(hlo: Hlo, call: Instruction) -> float:
    """cuDNN's fused attention: 2 matmuls of B x N x T x S x H forward; the backward pass recomputes the
    scores and computes 4 more (dQ, dK, dV and the probabilities' gradient)."""
    config = call.backend_config().get("cudnn_fmha_backend_config", {})
    dims = [int(d) for d in config.get("intermediate_tensor_shape", {}).get("dimensions", [])]
    operands = hlo.operand_arrays(call)
    if len(dims) != 4 or not operands:
        return 0.0
    head_dim = operands[0][1][-1]
    matmuls = 5 if "Backward" in (call.attribute("custom_call_target") or "") else 2
    return 2.0 * matmuls * math.prod(dims) * head_dim


def _gemm_flops(hlo: Hlo, call: Instruction) -> float:
    config = call.backend_config().get("gemm_backend_config", {})
    numbers = config.get("dot_dimension_numbers", {})
    operands = hlo.operand_arrays(call)
    if not operands or not call.results:
        return 0.0
    contracted = math.prod(operands[0][1][int(d)] for d in numbers.get("lhs_contracting_dimensions", []))
    return 2.0 * math.prod(call.results[0][1]) * contracted


def instruction_flops(hlo: Hlo, instruction: Instruction, _depth: int = 0) -> float:
    """Matmul, convolution and attention FLOPs of one instruction (inside a fusion: of its body).
    Elementwise work is left out: next to the bytes it moves it never sets a kernel's time."""
    op = instruction.opcode
    if op == "dot":
        return _dot_flops(hlo, instruction)
    if op == "convolution":
        return _convolution_flops(hlo, instruction)
    if op == "custom-call":
        target = instruction.attribute("custom_call_target") or ""
        if "fmha" in target:
            return _attention_flops(hlo, instruction)
        if "cublas" in target:
            return _gemm_flops(hlo, instruction)
        if "conv" in target:
            return _convolution_flops(hlo, instruction)
        return 0.0
    if op in ("fusion", "call") and _depth < 8:
        return sum(instruction_flops(hlo, hlo.instructions[name], _depth + 1)
                   for computation in hlo.called(instruction) for name in hlo.computations[computation])
    return 0.0


_WORKSPACE = ("s8", "u8")


def instruction_bytes(hlo: Hlo, instruction: Instruction) -> float:
    """Bytes a kernel reads and writes: its operands and results. Inside a fusion, a parameter read only
    through slices counts the slices; a dynamic-update-slice (written in place) counts the update, not
    the buffer; library calls' scratch results (s8 / u8 workspaces) are left out."""
    op = instruction.opcode
    results = instruction.results
    if op == "custom-call" and len(results) > 1 and results[-1][0] in _WORKSPACE:
        results = results[:-1]
    written = sum(nbytes(a) for a in results)
    if op == "copy":
        return 2.0 * written
    if op != "fusion":
        return written + sum(nbytes(a) for a in hlo.operand_arrays(instruction))
    body = hlo.called(instruction)
    if not body:
        return written + sum(nbytes(a) for a in hlo.operand_arrays(instruction))
    names = hlo.computations[body[0]]
    users: dict[str, list[Instruction]] = {}
    for name in names:
        for operand in hlo.instructions[name].operands:
            users.setdefault(operand, []).append(hlo.instructions[name])
    read = 0.0
    for name in names:
        parameter = hlo.instructions[name]
        if parameter.opcode != "parameter":
            continue
        uses = users.get(name, [])
        if uses and all(u.opcode in ("dynamic-slice", "slice") for u in uses):
            read += sum(nbytes(u.results[0]) for u in uses)
        elif uses and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name for u in uses):
            pass  # the buffer updated in place: only the update moves (counted below)
        else:
            read += sum(nbytes(a) for a in parameter.results)
    root = hlo.instructions.get(hlo.roots.get(body[0], ""))
    updates = [root] if root is not None and root.opcode == "dynamic-update-slice" else []
    if root is not None and root.opcode == "tuple":
        updates = [hlo.instructions[n] for n in root.operands if hlo.instructions[n].opcode == "dynamic-update-slice"]
    for update in updates:  # in place: the written bytes are the update's, not the whole buffer's
        written -= nbytes(update.results[0])
        written += sum(nbytes(a) for a in hlo.operand_arrays(hlo.instructions[update.name])[1:2])
    return read + max(written, 0.0)


def dtype_of(hlo: Hlo, instruction: Instruction) -> str:
    """The element type a kernel's matmuls run in (its first operand's), for the FLOP rate."""
    operands = hlo.operand_arrays(instruction)
    return operands[0][0] if operands else (instruction.results[0][0] if instruction.results else "f32")


# ---------------------------------------------------------------------------------------------
# The thunks
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Thunk:
    id: int
    kind: str  # XLA's thunk kind: kCustomKernel, kCublasLtMatmul, kWhile, kCommandBuffer, ...
    depth: int
    children: list = dataclasses.field(default_factory=list)  # nested thunks (a graph's, a wrapper's)
    condition: list = dataclasses.field(default_factory=list)  # a while loop's
    body: list = dataclasses.field(default_factory=list)


_THUNK = re.compile(r"^( *)(\d+): (k\w+)")


def parse_thunks(text: str) -> list[Thunk]:
    """The thunk tree of a `thunk_sequence_after_thunk_passes` dump."""
    top: list[Thunk] = []
    stack: list[tuple[int, list]] = [(-1, top)]  # (indentation, the list new thunks at deeper indentation join)
    for line in text.splitlines():
        label = line.strip()
        if label in ("condition:", "body:"):
            indent = len(line) - len(line.lstrip())
            while len(stack) > 1 and stack[-1][0] >= indent and not isinstance(stack[-1][1], Thunk):
                stack.pop()
            owner = _last_while(stack)
            if owner is not None:
                stack.append((indent, owner.condition if label == "condition:" else owner.body))
            continue
        match = _THUNK.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack[-1][0] >= indent:
            stack.pop()
        thunk = Thunk(int(match.group(2)), match.group(3), indent)
        stack[-1][1].append(thunk)
        stack.append((indent, thunk.children))
    return top


def _last_while(stack) -> Thunk | None:
    for _, items in reversed(stack):
        if items and isinstance(items[-1], Thunk) and items[-1].kind == "kWhile":
            return items[-1]
    return None


def parse_annotations(text: str) -> dict[int, str]:
    """thunk id -> the HLO instruction it runs, from a `thunk_metadata` dump."""
    found = re.findall(r'profile_annotation: "([^"]*)"\s*thunk_id: (\d+)', text)
    return {int(i): name for name, i in found}


# ---------------------------------------------------------------------------------------------
# Kernels of one call
# ---------------------------------------------------------------------------------------------

# Kernel kinds, in the order the plan prints them.
KINDS = ("fusion", "gemm", "convolution", "cudnn attention", "cudnn other", "copy", "dynamic slice", "other")
_CONTAINERS = {"kCommandBuffer", "kWhile", "kConditional", "kSequential", "kDynamicSliceFusion", "kAsyncStart",
               "kAsyncDone"}


@dataclasses.dataclass
class Kernel:
    name: str  # the HLO instruction
    kind: str  # one of KINDS
    runs: int  # launches per call of the program (loop trip counts multiplied)
    in_graph: bool
    flops: float  # per launch
    bytes: float
    dtype: str


@dataclasses.dataclass
class Program:
    kernels: list[Kernel]
    graph_launches: int  # CUDA graphs launched per call
    host_loop_iterations: int  # iterations of loops outside graphs (the host reads their condition)

    def launches(self, kind: str | None = None, in_graph: bool | None = None) -> int:
        return sum(k.runs for k in self.kernels
                   if (kind is None or k.kind == kind) and (in_graph is None or k.in_graph == in_graph))

    def flops(self) -> float:
        return sum(k.runs * k.flops for k in self.kernels)


def _kind(thunk: Thunk, instruction: Instruction | None, in_dynamic_slice: bool) -> str:
    kind = thunk.kind
    if kind in ("kCustomKernel", "kKernel"):
        triton_gemm = instruction is not None and (instruction.name.startswith("gemm_fusion")
                                                   or "__triton_gemm" in instruction.attributes)
        return "gemm" if triton_gemm else "fusion"
    if kind in ("kCublasLtMatmul", "kGemm"):
        return "gemm"
    if kind == "kConvolution":
        return "convolution"
    if kind == "kCuDnn":
        target = (instruction.attribute("custom_call_target") or "") if instruction is not None else ""
        return "cudnn attention" if "fmha" in target else "cudnn other"
    if kind == "kCopy":
        return "dynamic slice" if in_dynamic_slice else "copy"
    return "other"


def read_program(directory: str | Path) -> Program:
    """The kernels one call of the program in XLA's dump `directory` launches (one module per directory)."""
    directory = Path(directory)

    def one(pattern: str) -> str:
        found = sorted(directory.glob(pattern))
        if not found:
            raise FileNotFoundError(f"{directory}: no {pattern} (was the program compiled with xla_dump_to?)")
        return found[-1].read_text()

    hlo = Hlo(one("*gpu_after_optimizations.txt"))
    names = parse_annotations(one("*thunk_metadata.txt"))
    thunks = parse_thunks(one("*thunk_sequence_after_thunk_passes.txt"))
    kernels: list[Kernel] = []
    totals = {"graphs": 0, "host_loops": 0}

    def visit(items, runs: int, in_graph: bool, in_dynamic_slice: bool = False):
        for thunk in items:
            name = names.get(thunk.id, "")
            instruction = hlo.instructions.get(name)
            if thunk.kind == "kWhile":
                trips = hlo.trip_count(name) or 1
                if not in_graph:
                    totals["host_loops"] += runs * trips
                visit(thunk.condition, runs * (trips + 1), in_graph)
                visit(thunk.body, runs * trips, in_graph)
            elif thunk.kind == "kCommandBuffer":
                if not in_graph:
                    totals["graphs"] += runs
                visit(thunk.children, runs, True)
            elif thunk.kind in _CONTAINERS or thunk.children:
                visit(thunk.children, runs, in_graph, in_dynamic_slice or thunk.kind == "kDynamicSliceFusion")
            else:
                flops = instruction_flops(hlo, instruction) if instruction is not None else 0.0
                moved = instruction_bytes(hlo, instruction) if instruction is not None else 0.0
                dtype = dtype_of(hlo, instruction) if instruction is not None else "f32"
                kernels.append(Kernel(name, _kind(thunk, instruction, in_dynamic_slice), runs, in_graph, flops,
                                      moved, dtype))

    visit(thunks, 1, False)
    return Program(kernels, totals["graphs"], totals["host_loops"])


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchCosts:
    """Microseconds a launch costs beyond its kernel's roofline time. Rough public figures for Hopper
    with CUDA 12: a kernel node inside a CUDA graph starts about 1 us after the previous one; a kernel or
    library call issued by the host (XLA's thunk executor, cuBLAS's own checks) about 4 us; a graph launch
    about 5 us; a loop outside a graph copies its condition to the host at every iteration (about 10 us)."""
    in_graph_us: float = 1.0
    host_us: float = 4.0
    graph_us: float = 5.0
    host_loop_iteration_us: float = 10.0


# FLOP rate by the matmul's element type, as a fraction of the chip's dense bfloat16 peak: float32
# matmuls run as TF32 on tensor cores at default precision (half the rate), FP8 at twice.
RATE_BY_DTYPE = {"bf16": 1.0, "f16": 1.0, "f32": 0.5, "f8e4m3fn": 2.0, "f8e5m2": 2.0}


def kernel_seconds(kernel: Kernel, peak_flops: float, bandwidth: float) -> float:
    """The roofline time of one launch: the larger of FLOPs / peak and bytes / bandwidth."""
    rate = peak_flops * RATE_BY_DTYPE.get(kernel.dtype, 0.5)
    return max(kernel.flops / rate, kernel.bytes / bandwidth)


def estimate(program: Program, peak_tflops: float, bandwidth: float,
             costs: LaunchCosts = LaunchCosts()) -> dict:
    """Estimated seconds of one call: the kernels' roofline times plus launch costs (LaunchCosts), and
    what each part contributes."""
    peak = peak_tflops * 1e12
    compute = sum(k.runs * kernel_seconds(k, peak, bandwidth) for k in program.kernels)
    by_kind = {kind: sum(k.runs * kernel_seconds(k, peak, bandwidth) for k in program.kernels if k.kind == kind)
               for kind in KINDS}
    launch = 1e-6 * (costs.in_graph_us * program.launches(in_graph=True)
                     + costs.host_us * program.launches(in_graph=False)
                     + costs.graph_us * program.graph_launches
                     + costs.host_loop_iteration_us * program.host_loop_iterations)
    return {"seconds": compute + launch, "kernel_seconds": compute, "launch_seconds": launch,
            "seconds_by_kind": by_kind}


def top_kernels(program: Program, peak_tflops: float, bandwidth: float, n: int = 8) -> list[tuple[Kernel, float]]:
    """The n kernels that take the most estimated time per call (runs included)."""
    timed = [(k, k.runs * kernel_seconds(k, peak_tflops * 1e12, bandwidth)) for k in program.kernels]
    return sorted(timed, key=lambda kt: -kt[1])[:n]
