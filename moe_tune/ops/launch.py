"""How moe-tune launches its Triton kernels: the public launchers of the grouped-GEMM kernels, and
how an op body that torch.compile sees launches them.

``grouped_mm`` and ``grouped_mm_dw`` turn tensors, a ``Routing`` and a ``KernelConfig`` into one
persistent-grid launch; they check nothing (callers validate: ``moe_tune.ops.grouped_gemm`` for
the public single-GEMM API, ``moe_tune.ops.block`` for the experts block). ``in_op=True`` marks
a call made from a ``torch.library`` op body (``register_op``).

The ops torch.compile sees (``register_op``, ``register_backward_op``) are opaque ``torch.library``
ops: Inductor calls each as a black box, and its body runs at run time with the same cached
launches as the eager path. Its fake implementation is the body itself: on fake tensors every
launch is skipped, and the body's torch ops produce outputs of the right shape, dtype and device.
(Registered as ``triton_op``s instead, Inductor traced into the bodies and replaced their torch ops
— the row gathers, the k-slot sums — with its own kernels, 0.9 ms slower per block fwd+bwd at
16384 tokens, H100.)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
import triton
from torch._subclasses.fake_tensor import is_fake

from moe_tune.device import DeviceInfo, interpreting
from moe_tune.kernels.grouped_mm import grouped_mm_dw_kernel, grouped_mm_kernel
from moe_tune.problem import KernelConfig

# Decided once, at import, like Triton's own choice between compiling and interpreting kernels.
INTERPRETED = interpreting()


def register_op(qualname: str, fn):
    """Register ``fn`` (type-annotated, no host sync, every kernel launched through
    ``launch_kernel`` with ``in_op=True``) as the opaque op ``qualname``, its own fake."""
    op = torch.library.custom_op(qualname, fn, mutates_args=())
    op.register_fake(fn)
    return op


_LIBRARIES: dict[str, torch.library.Library] = {}  # kept alive: a dropped Library removes its ops


def register_backward_op(qualname: str, fn):
    """``register_op`` for an op with no gradient of its own, which only a registered backward calls.

    A plain ``torch.library`` op: its call costs ~10 µs of dispatch against ~35 for a
    ``custom_op``'s Python wrappers (measured on a CPU host), paid per op at run time under
    torch.compile. Returns the op's overload, called like the function.
    """
    namespace, name = qualname.split("::")
    library = _LIBRARIES.get(namespace)
    if library is None:
        library = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    library.define(name + torch.library.infer_schema(fn, mutates_args=()))
    library.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fn, lib=library)
    return getattr(getattr(torch.ops, namespace), name).default


# -------------------------------------------------------------------------------------------------
# Grid arithmetic
# -------------------------------------------------------------------------------------------------

# triton.cdiv and triton.next_power_of_2 are ConstexprFunctions in Triton 3.6: ~2 µs of host time a
# call to unwrap their arguments, and an eager LoRA block pass made 19 such calls. These give the
# same values for the ints (and torch.SymInts, under torch.compile) the launchers pass.


def size_hint(n) -> int:
    """A size as a plain int. Under dynamic shapes it may be symbolic; where only speed depends on
    it (a config, a chunk), it follows the example size instead of guarding on it."""
    if isinstance(n, torch.SymInt):
        hint = n.node.hint
        return int(hint) if hint is not None else int(n)
    return int(n)


def cdiv(a, b):
    """⌈a / b⌉ for positive b."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, for n ≥ 1."""
    return 1 << (n - 1).bit_length()


# -------------------------------------------------------------------------------------------------
# Launchers
# -------------------------------------------------------------------------------------------------

def _descriptor_scratch(size: int, alignment: int, stream):
    # A fresh allocation per launch. Keeping one buffer per stream was tried: the warm-up run of
    # torch.compile(mode="reduce-overhead") allocates into its CUDA-graph pool, and a buffer kept
    # from there fails that pool's check for live tensors it does not own.
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:  # Triton's private allocator slot: read per launch, so looked up once here
    from triton.runtime import _allocation
except ImportError:
    _allocation = None


def _allocator_missing() -> bool:
    # Triton keeps the allocator in a ContextVar: autograd's backward thread starts without the
    # one the forward's thread set. An allocator the user set is left alone.
    try:
        return _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    except AttributeError:
        return True


def ensure_allocator(cfg: KernelConfig, device: torch.device) -> None:
    """Device-side tensor descriptors need scratch memory from an allocator Triton can call."""
    if cfg.TMA_LOAD or cfg.TMA_STORE:
        ensure_descriptor_allocator(device)


def ensure_descriptor_allocator(device: torch.device) -> None:
    """Before a launch whose kernel makes tensor descriptors on the device."""
    if device.type == "cuda" and _allocator_missing():
        triton.set_allocator(_descriptor_scratch)


def rows_fit_descriptors(*tensors: torch.Tensor) -> bool:
    """Whether each 2-D tensor's rows suit a tensor descriptor: unit column stride, and row
    stride and start on 16-byte boundaries (allocations themselves are aligned). Reads no data
    pointer, so it also answers for the fake tensors of a torch.compile trace."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.stride(0) * t.element_size() % 16 == 0
               and t.storage_offset() * t.element_size() % 16 == 0 for t in tensors)


def current_device() -> int:
    """The current CUDA device's index, for launches on CUDA tensors (CUDA is initialised):
    ``torch.cuda.current_device()`` without its lazy-initialisation check, ~1 µs a call."""
    return torch._C._cuda_getDevice()


def _hooked(hook) -> bool:
    """Whether a Triton launch hook would call anything: 3.6 keeps an always-present chain of
    hooks (empty unless a profiler or tool added one), older versions None or a function."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _Launcher:
    """``kernel[grid](*args, **meta)`` for eager calls, minus Triton's per-call binding.

    Triton's ``JITFunction.run`` rebuilds the call's specialization and hashes it into a cache key
    on every launch. Here the key is cheaper and at least as fine: each tensor's dtype and address
    modulo 16 (Triton specialises on 16-byte alignment), every other argument's value, and the
    constexprs. The first launch with a key goes through Triton (compiling or loading as usual)
    and keeps what the ``CompiledKernel`` it returns needs to launch again: its launcher, function
    handle, packed metadata and the constexprs in parameter order. Later launches call that
    launcher directly with the argument list Triton would pass, and build Triton's launch metadata
    only when a launch hook (a profiler) would read it. A new token count is a new key: one Triton
    launch, then hits.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}
        self.constexprs = [p.name for p in kernel.params if p.is_constexpr]

    @staticmethod
    def key(grid: tuple, args: tuple, meta: dict) -> tuple:
        return (grid, *[(a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args],
                *meta.values())

    def __call__(self, grid: tuple, args: tuple, meta: dict) -> None:
        key = self.key(grid, args, meta)
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **meta)
            grid3 = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
            self.compiled[key] = (compiled, grid3, tuple(meta[name] for name in self.constexprs))
            return
        compiled, (gx, gy, gz), constexprs = entry
        stream = torch._C._cuda_getCurrentRawStream(current_device())
        enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
        full = args + constexprs
        if _hooked(enter) or _hooked(leave):
            metadata = compiled.launch_metadata(grid, stream, *full)
        else:  # nothing would read it: no metadata, no hook calls
            metadata = enter = leave = None
        compiled.run(gx, gy, gz, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *full)


class BoundLaunch:
    """One launch prepared for repeating with fresh tensors in the argument positions ``slots``
    each time (a graphed block's input copies, its weight gradients allocated per call): the
    arguments, the config and the cached launcher entry are found once, and each call swaps the
    tensors in and calls Triton's launcher. Through ``launch_kernel`` instead until an entry exists
    (the first call; always in the interpreter, which keeps none), in ``compile_only()``, while a
    launch hook is set, or for tensors whose 16-byte alignments differ from the entry's.

    A kernel that makes tensor descriptors on the device gets its scratch memory from this object
    rather than from an allocation per launch: one buffer, made on the first direct launch and
    used again by later ones on the same stream (stream order keeps two launches apart); a launch
    on another stream goes through Triton's launcher, which allocates."""

    def __init__(self, kernel, grid: tuple, args: tuple, meta: dict, slots: tuple[int, ...],
                 descriptors_on: torch.device | None):
        self.kernel, self.grid, self.meta = kernel, grid, meta
        self.args, self.slots = args, slots  # (the slots' tensors are not kept between calls)
        self.descriptors_on = descriptors_on  # a device whose launches make tensor descriptors
        self.entry = None
        self.alignments = None
        self.scratch = None
        self.direct = None  # (stream, launch function, its leading arguments) once prepared

    def __call__(self, *tensors: torch.Tensor) -> None:
        args = list(self.args)
        for slot, tensor in zip(self.slots, tensors):
            args[slot] = tensor
        entry = self.entry
        hooks = triton.knobs.runtime
        if (entry is None or [t.data_ptr() & 15 for t in tensors] != self.alignments
                or _hooked(hooks.launch_enter_hook) or _hooked(hooks.launch_exit_hook) or compiling_only()):
            self._through_triton(tuple(args), tensors)
            return
        stream = torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())
        direct = self.direct
        if direct is None or direct[0] != stream:
            direct = self._prepare(stream)
        if direct is False:  # Triton's launcher, which allocates the scratch it needs
            compiled, (gx, gy, gz), constexprs = entry
            self._allocator()
            compiled.run(gx, gy, gz, stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
                         *constexprs)
        else:  # its launch function itself: no launch metadata, no hooks, this object's scratch
            direct[1](*direct[2], *args, *entry[2])

    def _through_triton(self, args: tuple, tensors: tuple) -> None:
        self._allocator()
        launch_kernel(self.kernel, False, self.grid, args, self.meta, ())
        launcher = _LAUNCHERS.get(id(self.kernel))
        if self.entry is None and launcher is not None:
            self.entry = launcher.compiled.get(launcher.key(self.grid, args, self.meta))
            self.alignments = [t.data_ptr() & 15 for t in tensors]

    def _allocator(self) -> None:
        if self.descriptors_on is not None:
            ensure_descriptor_allocator(self.descriptors_on)

    def _prepare(self, stream: int):
        """The direct launch on ``stream``: (stream, launch function, its arguments before the
        kernel's), kept for the next call; or False where Triton's launcher must allocate the
        descriptor scratch (a stream other than the one this object's scratch was made for, or a
        launcher this does not know)."""
        compiled, (gx, gy, gz), _ = self.entry
        run = compiled.run
        try:
            size, align = run.global_scratch_size, run.global_scratch_align
            launch, cooperative, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
            if run.profile_scratch_size or pdl or align > 256:  # (allocations are 512-byte aligned)
                return False
        except AttributeError:
            return False
        if size:
            if self.scratch is None:
                self.scratch = (stream, torch.empty(gx * gy * gz * getattr(run, "num_ctas", 1) * size,
                                                    dtype=torch.int8, device=torch.device("cuda", current_device())))
            if self.scratch[0] != stream:
                return False
        scratch = self.scratch[1] if size else None
        self.direct = (stream, launch, (gx, gy, gz, stream, compiled.function, cooperative, pdl, scratch, None,
                                        compiled.packed_metadata, None, None, None))
        return self.direct


# id(kernel) → its launcher (which keeps the kernel alive, so the id stays its own): hashing a
# JITFunction itself reads its cache key, ~2 µs a launch.
_LAUNCHERS: dict[int, _Launcher] = {}
_compile_only = threading.local()


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Within it, eager launches on this thread compile (or load) their kernels and launch
    nothing: the sweep's compile workers warm Triton's cache this way, with no GPU work."""
    _compile_only.on = True
    try:
        yield
    finally:
        _compile_only.on = False


def compiling_only() -> bool:
    """Whether this thread is inside ``compile_only()`` (launches compile and run nothing)."""
    return getattr(_compile_only, "on", False)


def launch_kernel(kernel, in_op: bool, grid: tuple, args: tuple, meta: dict, outputs: tuple) -> None:
    """Launch any of moe-tune's kernels: on a GPU through the kernel's cached launcher, in the
    interpreter plainly. ``in_op``: from an op body, ``outputs`` being the tensors the launch
    writes; the op's fake implementation (fake ``outputs``) launches nothing."""
    if in_op and any(is_fake(t) for t in outputs):
        return
    if compiling_only():
        kernel.warmup(*args, grid=grid, **meta)
    elif INTERPRETED:
        kernel[grid](*args, **meta)
    else:
        launcher = _LAUNCHERS.get(id(kernel))
        if launcher is None:
            launcher = _LAUNCHERS[id(kernel)] = _Launcher(kernel)
        launcher(grid, args, meta)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``. float32 follows torch's matmul
    setting: with ``torch.get_float32_matmul_precision() == "highest"`` (torch's default; TF32
    off) each product runs as three TF32 products ("tf32x3"), which keeps float32's accuracy on the
    tensor cores; with TF32 allowed, one TF32 product. bfloat16 and float16 products are exact
    either way, and "tf32" is Triton's default, so their kernels are unchanged by it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def programs(cfg: KernelConfig, info: DeviceInfo) -> int:
    """The persistent grid of a grouped-GEMM launch: ``PROGRAMS_PER_SM`` programs per SM (the
    kernels stride their tiles by it, as ``NUM_SMS``)."""
    return info.sm_count * cfg.PROGRAMS_PER_SM


def _expert_order(t, routing, div: int, in_op: bool):
    """``GATHER_COPY``'s copy: the rows ``slot // div`` of ``t``, in expert order."""
    from moe_tune.ops.rows import gather_rows  # rows launches through this module

    return gather_rows(t, routing.sorted_slots, div, in_op=in_op)


def grouped_mm(a, w, c, routing, weights, *, trans_w: bool, gather_a: bool, gather_div: int, scatter_c: bool,
               cfg: KernelConfig, info: DeviceInfo, sorted_a=None, in_op: bool = False) -> None:
    """One launch of ``grouped_mm_kernel``: C = A·W[e]ᵀ (``trans_w``: A·W[e]) per expert, rows of A
    gathered as ``slot // gather_div`` when ``gather_a``, rows of C scattered to slot order when
    ``scatter_c``, multiplied by ``weights`` when given. ``sorted_a`` [M, RED], when given, receives
    A's gathered rows in expert order. With ``cfg.GATHER_COPY`` gathered A rows are first copied
    to expert order (``gather_rows``), so the kernel reads A through TMA (and may warp-specialise)."""
    E, N, K = w.shape
    if cfg.GATHER_COPY and gather_a:
        a, gather_a, gather_div = _expert_order(a, routing, gather_div, in_op), False, 1
    out_cols, red = (K, N) if trans_w else (N, K)
    if trans_w:
        stride_w_red, stride_w_out = w.stride(1), w.stride(2)
    else:
        stride_w_red, stride_w_out = w.stride(2), w.stride(1)
    ensure_allocator(cfg, w.device)
    grid = programs(cfg, info)
    if cfg.WARP_SPEC:  # check_config: nothing gathered, so no sorted_a either; the slot takes the table
        sorted_a = routing.block_table(cfg.BLOCK_M, in_op=in_op)
    args = (
        a, w, c, routing.expert_offsets, routing.sorted_slots, weights if weights is not None else c,
        sorted_a if sorted_a is not None else a,
        a.shape[0], out_cols, red, gather_div,
        a.stride(0), a.stride(1),
        w.stride(0), stride_w_red, stride_w_out,
        c.stride(0), c.stride(1),
    )
    meta = dict(
        E=E, E_POW2=next_power_of_2(E + 1),
        TRANS_W=trans_w, GATHER_A=gather_a, SCATTER_C=scatter_c, WEIGHTED=weights is not None,
        SORT_A=sorted_a is not None and not cfg.WARP_SPEC,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        TMA_LOAD=cfg.TMA_LOAD, TMA_STORE=cfg.TMA_STORE, NUM_SMS=grid, DOT_PRECISION=dot_precision(a.dtype),
        WARP_SPEC=cfg.WARP_SPEC, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    outputs = (a, c) if sorted_a is None else (a, c, sorted_a)
    launch_kernel(grouped_mm_kernel, in_op, (grid,), args, meta, outputs)


def grouped_mm_dw(dy, x, dw, routing, weights, *, gather_dy: bool, dy_div: int, gather_x: bool, x_div: int,
                  cfg: KernelConfig, info: DeviceInfo, in_op: bool = False) -> None:
    """dW[e] = dY_eᵀ·X_e into ``dw`` [E, N, K]; a gathered row is ``slot // div``. With
    ``cfg.GATHER_COPY`` the gathered operands are first copied into expert order (folding the
    routing weight into dY's copy), so the kernel streams both through TMA."""
    if cfg.GATHER_COPY and (gather_dy or gather_x):
        if gather_x:
            x, gather_x, x_div = _expert_order(x, routing, x_div, in_op), False, 1
        if gather_dy:
            dy = _expert_order(dy, routing, dy_div, in_op)
            if weights is not None:
                slots = routing.sorted_slots.long()
                dy = (dy.float() * weights.float().index_select(0, slots)[:, None]).to(dy.dtype)
                weights = None
            gather_dy, dy_div = False, 1
    ensure_allocator(cfg, dw.device)
    grid, args, meta = _dw_launch(dy, x, dw, routing, weights, gather_dy, dy_div, gather_x, x_div, cfg, info)
    launch_kernel(grouped_mm_dw_kernel, in_op, grid, args, meta, (dy, dw))


def _dw_launch(dy, x, dw, routing, weights, gather_dy, dy_div, gather_x, x_div, cfg, info) -> tuple:
    """(grid, args, meta) of one ``grouped_mm_dw_kernel`` launch; ``dw`` is argument 2."""
    E, N, K = dw.shape
    grid = programs(cfg, info)
    args = (
        dy, x, dw, routing.expert_offsets, routing.sorted_slots, weights if weights is not None else dy,
        N, K, dy_div, x_div,
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
    )
    meta = dict(
        E=E, GATHER_DY=gather_dy, GATHER_X=gather_x, WEIGHTED=weights is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        TMA_LOAD=cfg.TMA_LOAD, TMA_STORE=cfg.TMA_STORE, NUM_SMS=grid, DOT_PRECISION=dot_precision(dy.dtype),
        WARP_SPEC=cfg.WARP_SPEC, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (grid,), args, meta


def bind_grouped_mm_dw(dy, x, weight, routing, cfg: KernelConfig, info: DeviceInfo) -> BoundLaunch:
    """``grouped_mm_dw`` of ``dy`` against ``x``, both already in expert order, as a
    ``BoundLaunch`` whose calls take the dW tensor (shaped, strided and typed like ``weight``)."""
    grid, args, meta = _dw_launch(dy, x, weight, routing, None, False, 1, False, 1, cfg, info)
    descriptors_on = weight.device if cfg.TMA_LOAD or cfg.TMA_STORE else None
    return BoundLaunch(grouped_mm_dw_kernel, grid, args, meta, (2,), descriptors_on)
