"""Speed and memory levers of the stages, each a model YAML default (`acceleration:`) that a
flag may override, each measured by `bench/gpu.py`:

- `compile`: regional `torch.compile` of the denoiser's repeated transformer blocks, through
  diffusers' `compile_repeated_blocks` (a family names the block class where diffusers' model
  class does not). The compile is paid on a stage's first job of a shape and kept for the
  actor's life; `DenoiserStage` reports each job's first step apart from the rest. On one
  process, the attention's Q, K and V projections are fused first where diffusers offers it
  (CogVideoX's `fuse_qkv_projections`): the compile does not merge separate matrix products.
- `attention`: the SDPA kernel, `auto` choosing by the device's capability and dtype
  (`choose_attention`); the ring path's log-sum-exp kernel is the same one.
- `fp8`: torchao's float8 dynamic quantisation of the denoiser's linear layers (Ada or Hopper).
- `offload`: weights kept in host memory and brought to the GPU by diffusers' offloading hooks:
  `model` (the whole network for a job, accelerate's hook as diffusers' model offload uses) or
  `group` (block by block during the forward pass, diffusers' group offloading), so that
  CogVideoX-5b can fit a 24 GB card when its jobs run one after another (docs/performance.md).
  The decoder also tiles by itself when the untiled decode would not fit in the device's free
  memory (`stages.decoder`).

Everything here is checked before any weights load (`check_acceleration`): a lever a device
cannot take is refused in one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Collection, Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from stages.errors import InvalidRequest

OFFLOAD_KINDS = ("model", "group")
# "default": PyTorch's own choice (on the CPU its flash kernel); the others force one SDPA kernel.
ATTENTION_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math")
# fp8 matrix products (torch._scaled_mm) need Ada (8.9) or Hopper (9.0) tensor cores.
FP8_CAPABILITY = (8, 9)

if TYPE_CHECKING:  # torch is imported where it is used: a driver or an API checks settings without it
    import torch


@dataclass(frozen=True)
class Acceleration:
    compile: bool = False
    attention: str = "auto"
    fp8: bool = False
    offload: str | None = None  # None, "model" or "group"

    def as_params(self) -> dict[str, str]:
        return {"compile": str(self.compile).lower(), "attention": self.attention, "fp8": str(self.fp8).lower(),
                "offload": self.offload or "none"}  # fmt: skip

    def with_overrides(self, **overrides: Any) -> Acceleration:
        """This one with the given fields replaced (None: kept), checked as a YAML's are."""
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return parse_acceleration(merged)


def parse_acceleration(raw: dict[str, Any] | None, where: str = "acceleration") -> Acceleration:
    """A YAML's `acceleration:` section (or flags), every key and value checked."""
    raw = dict(raw or {})
    known = {f.name for f in fields(Acceleration)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidRequest(f"{where}: unknown setting {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
    offload = raw.get("offload")
    offload = None if offload in (None, "none", False) else offload
    if offload is not None and offload not in OFFLOAD_KINDS:
        raise InvalidRequest(f"{where}: offload {offload!r} is not one of none, {', '.join(OFFLOAD_KINDS)}")
    attention = raw.get("attention", "auto")
    if attention not in ATTENTION_BACKENDS:
        raise InvalidRequest(f"{where}: attention {attention!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    for flag in ("compile", "fp8"):
        if not isinstance(raw.get(flag, False), bool):
            raise InvalidRequest(f"{where}: {flag} must be true or false, not {raw[flag]!r}")
    return Acceleration(compile=raw.get("compile", False), attention=attention, fp8=raw.get("fp8", False),
                        offload=offload)  # fmt: skip


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_acceleration(
    acceleration: Acceleration,
    device_type: str | None,
    capability: tuple[int, int] | None = None,
    has_torchao: bool | None = None,
    available: Collection[str] | None = None,
    dtype: str | None = None,
) -> str | None:
    """Why a stage cannot take these levers (one line naming the lever and what would allow it),
    or None. What is not known is not checked: `device_type` None (a driver before its cluster),
    `capability` None on CUDA (a driver whose actors hold the GPUs), `available` None (the SDPA
    kernels the stage's PyTorch has), `dtype` None (the model's, e.g. "bfloat16")."""
    has_torchao = torchao_available() if has_torchao is None else has_torchao
    kernel = acceleration.attention
    if dtype is not None and kernel in ("cudnn", "flash") and dtype not in ("float16", "bfloat16"):
        return f"attention {kernel} takes fp16 or bf16 and this model runs in {dtype}: use auto or efficient"
    if acceleration.fp8:
        if dtype is not None and dtype != "bfloat16":
            return f"fp8's per-row scales need bf16 weights and this model runs in {dtype}: drop --fp8"
        if not has_torchao:
            return "fp8 needs torchao (pip install torchao); it is not installed"
        if acceleration.offload:
            return "fp8 with offload is not supported: torchao's float8 weights are not moved by the offload hooks"
    if device_type is None:
        return None
    if acceleration.offload and device_type != "cuda":
        return (f"offload {acceleration.offload} moves weights between host memory and a CUDA GPU; "
                f"this stage runs on {device_type}: drop --offload")  # fmt: skip
    if kernel in ("cudnn", "flash") and device_type != "cuda":
        return f"attention {kernel} is a CUDA kernel; on {device_type} use auto, default or math"
    if available is not None and kernel != "auto" and kernel not in available:
        return f"attention {kernel} is not in this PyTorch for {device_type} (it has {', '.join(sorted(available))})"
    if acceleration.fp8 and (device_type != "cuda" or (capability is not None and capability < FP8_CAPABILITY)):
        found = device_type if device_type != "cuda" else f"a GPU of compute capability {capability}"
        return (f"fp8 needs a CUDA GPU of compute capability {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer "
                f"(Ada, Hopper); this stage has {found}: drop --fp8")  # fmt: skip
    return None


# -- attention ------------------------------------------------------------------------------------


def available_kernels(device: torch.device) -> set[str]:
    """The SDPA kernels this PyTorch build has for the device."""
    import torch

    if device.type != "cuda":
        return {"default", "math"}
    kernels = {"default", "math", "efficient"}
    if torch.backends.cuda.is_flash_attention_available():
        kernels.add("flash")
    # cuDNN's fused attention is PyTorch's from cuDNN 9 on.
    if torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000:
        kernels.add("cudnn")
    return kernels


def choose_attention(
    requested: str,
    device_type: str,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    available: Collection[str],
) -> str:
    """The SDPA kernel for `auto` (anything else is taken as asked).

    On the CPU, PyTorch's own choice (its flash kernel). On CUDA in half precision: cuDNN's fused
    attention on Hopper and later (faster than FlashAttention-2 there: it uses the wgmma and TMA
    units), FlashAttention-2 on Ampere and Ada, the memory-efficient kernel before them. In fp32
    only the memory-efficient kernel is fused. FlashAttention-3 has no pip wheel (it is built from
    its repository's hopper/ folder), so it is not a choice here. `bench/gpu.py` times each kernel
    at the model's real shapes, so this rule is checked on the device it runs on.
    """
    import torch

    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "default"
    half = dtype in (torch.float16, torch.bfloat16)
    if half and capability is not None and capability >= (9, 0) and "cudnn" in available:
        return "cudnn"
    if half and capability is not None and capability >= (8, 0) and "flash" in available:
        return "flash"
    return "efficient" if "efficient" in available else "default"


def _sdpa_backend(name: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]  # fmt: skip


@contextlib.contextmanager
def attention_kernel(name: str) -> Iterator[None]:
    """Within it, `scaled_dot_product_attention` prefers kernel `name`, falling back to the
    memory-efficient and math kernels for inputs it does not take (a mask, an odd head size)."""
    if name == "default":
        yield
        return
    from torch.nn.attention import sdpa_kernel

    order = [name] + [k for k in ("efficient", "math") if k != name]
    with sdpa_kernel([_sdpa_backend(k) for k in order], set_priority=True):
        yield


# diffusers' attention dispatcher backends of the same kernels, those that take its context
# parallelism (Wan's attention goes through it, and its ring needs the log-sum-exp).
DIFFUSERS_BACKENDS = {"cudnn": "_native_cudnn", "flash": "_native_flash"}


# -- compile, fp8, offload ------------------------------------------------------------------------


def compile_repeated_blocks(network: torch.nn.Module, block_classes: Collection[str] = ()) -> None:
    """Regional compilation: every repeated transformer block compiled once (all blocks share the
    compiled code), through diffusers' `compile_repeated_blocks`. A model class that names no
    repeated blocks (CogVideoX's, in diffusers 0.42) is told the family's `block_classes`.
    Graph breaks are allowed: a denoiser group's attention calls collectives inside a block."""
    if not getattr(network, "_repeated_blocks", None):
        if not block_classes:
            raise InvalidRequest(f"{type(network).__name__} names no repeated blocks to compile")
        network._repeated_blocks = list(block_classes)  # this instance only; the class is untouched
    network.compile_repeated_blocks(fullgraph=False, dynamic=False)


def _fp8_linear(module: torch.nn.Module, name: str) -> bool:
    """The linear layers fp8 matrix products take: both sizes multiples of 16."""
    import torch

    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def quantize_fp8(network: torch.nn.Module) -> None:
    """torchao's float8 dynamic quantisation (activations and weights, per-row scales) of the
    network's linear layers."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(network, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_fp8_linear)


class Offload:
    """A network's weights in host memory, brought to `device` by diffusers' offloading hooks.

    `model`: accelerate's `cpu_offload_with_hook` (what diffusers' `enable_model_cpu_offload`
    puts on each model): the whole network moves to the GPU at its first call of a job and back
    at `after_job`. `group`: diffusers' group offloading, one transformer block at a time, the
    next one's copy overlapped with compute on a CUDA stream; nothing to do after a job.
    """

    def __init__(self, network: torch.nn.Module, kind: str, device: torch.device, previous: Offload | None = None):
        """`previous`: the offload of the network called before this one in a job (Wan 2.2's
        high-noise expert before the low-noise one): its weights leave the GPU when these come,
        as diffusers chains its model offload hooks."""
        import torch

        self.hook = None
        network.to("cpu")
        if kind == "model":
            from accelerate import cpu_offload_with_hook

            _, self.hook = cpu_offload_with_hook(network, execution_device=device,
                                                 prev_module_hook=previous.hook if previous else None)  # fmt: skip
        else:  # a denoiser is a diffusers model: block by block
            network.enable_group_offload(device, offload_device=torch.device("cpu"), offload_type="block_level",
                                         num_blocks_per_group=1, use_stream=True)  # fmt: skip

    def after_job(self) -> None:
        if self.hook is not None:
            self.hook.offload()


def prepare_network(
    networks: list[torch.nn.Module],
    acceleration: Acceleration,
    device: torch.device,
    block_classes: Collection[str] = (),
) -> list[Offload]:
    """Apply the denoiser's levers to each of its networks, in the order they compose: fp8
    weights, then the offload hooks, then the compiled blocks (compiling last traces what the
    others put in place)."""
    offloads = []
    for network in networks:
        if acceleration.fp8:
            quantize_fp8(network)
        if acceleration.offload:
            offloads.append(Offload(network, acceleration.offload, device, offloads[-1] if offloads else None))
        if acceleration.compile:
            compile_repeated_blocks(network, block_classes)
    return offloads
