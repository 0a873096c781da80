"""Ahead-of-time compilation of the UNet, ControlNet and LKPN (for ZeroGPU).

ZeroGPU workers cannot use ``torch.compile``, but load programs exported with
``torch.export`` and compiled by Inductor (``spaces.aoti_compile``).
:func:`compile_for_zerogpu` does that at start-up for every network and batch size, the
latent height and width dynamic (``8 * Dim``, up to :data:`MAX_LATENT_SIDE`, every 4-D
input scaled by its level). The batch is static (1, and 2 for guidance); larger batches
run in chunks, which is exact. EAC exports as one custom-operator node.

Export runs with ``backed_size_oblivious`` and a large example input (:data:`EXAMPLE_LATENT`).
The replaced ``forward`` (:class:`CompiledNetwork`) keeps the pipeline's call signature and
refuses arguments and sizes outside the compiled range with a clear message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx.experimental._config as fx_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..models.controlnet import batched_timesteps

logger = logging.getLogger(__name__)

__all__ = ["BATCH_SIZES", "LATENT_MULTIPLE", "MAX_LATENT_SIDE", "CompiledNetwork", "apply_compiled",
           "compile_for_zerogpu", "example_inputs", "export_network", "export_networks"]

#: Latent sides are multiples of this (images are padded to multiples of 64 pixels).
LATENT_MULTIPLE = 8
#: Largest latent side compiled for: 4096-pixel images, the app's limit.
MAX_LATENT_SIDE = 512
#: Batch sizes compiled by default: one sample, and two with classifier-free guidance.
BATCH_SIZES = (1, 2)
#: Example latent size used while exporting. Inductor specialises its code on the
#: example's sizes where it may (ahead of time, nothing checks that later inputs agree):
#: with one attention window in the example it drops the window index altogether, and
#: larger images come out as NaN. So the example has at least two windows along both
#: sides at every level, the ControlNet's deepest included (window 64 at 1/8 of the
#: latent: more than 512), with distinct height and width. Code made for several
#: windows is also right for one.
EXAMPLE_LATENT = (520, 528)

NETWORKS = ("lkpn", "controlnet", "unet")


# Export-friendly call signatures ---------------------------------------------------------


class _ControlNetCall(nn.Module):
    """The ControlNet with ``conditioning_scale`` as a tensor input (a Python float
    would be baked into the program as a constant)."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, hint, conditioning_scale):
        return self.controlnet(sample, timestep, encoder_hidden_states, hint=hint,
                               conditioning_scale=conditioning_scale)


class _UNetCall(nn.Module):
    """The UNet with the ControlNet residuals as positional inputs, returning the tensor."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, down_residuals, mid_residual):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=tuple(down_residuals),
            mid_block_additional_residual=mid_residual,
            return_dict=False,
        )[0]


def _modules(pipe) -> dict[str, nn.Module]:
    return {"lkpn": pipe.lkpn, "controlnet": _ControlNetCall(pipe.controlnet), "unet": _UNetCall(pipe.unet)}


@torch.no_grad()
def example_inputs(pipe, batch: int, height: int = EXAMPLE_LATENT[0], width: int = EXAMPLE_LATENT[1]) -> dict:
    """Positional inputs of each network's exported call for a ``batch`` x ``height`` x
    ``width`` latent, on the pipeline's device and in its dtype (the UNet's residuals
    come from running the ControlNet)."""
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    channels = unet.config.in_channels
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    sample, condition = randn(batch, channels, height, width), randn(batch, channels, height, width)
    timestep = torch.full((batch,), 500, dtype=torch.long, device=device)
    text = randn(batch, 77, unet.config.cross_attention_dim)
    restored = pipe.lkpn(condition, sample, timestep, text)
    hint = torch.cat([condition, restored], dim=1)
    scale = torch.ones((), device=device, dtype=dtype)
    down, mid = pipe.controlnet(sample, timestep, text, hint=hint, conditioning_scale=scale)
    return {
        "lkpn": (condition, sample, timestep, text),
        "controlnet": (sample, timestep, text, hint, scale),
        "unet": (sample, timestep, text, tuple(down), mid),
    }


def _dynamic_shapes(args: tuple, height: int, width: int, h: Dim, w: Dim):
    """Height and width of every 4-D input as a multiple of the latent's (``h``, ``w``
    count latent sides in units of :data:`LATENT_MULTIPLE`), everything else static."""

    def side(size: int, full: int, root: Dim, name: str):
        if full % size or (LATENT_MULTIPLE * size) % full:
            raise ValueError(f"cannot express a {name} of {size} at a latent {name} of {full} as a multiple of it")
        factor = LATENT_MULTIPLE * size // full  # sides per unit of `root`
        return root if factor == 1 else factor * root

    def spec(x):
        if torch.is_tensor(x) and x.ndim == 4:
            return {2: side(x.shape[2], height, h, "height"), 3: side(x.shape[3], width, w, "width")}
        return None

    return tuple(pytree.tree_map(spec, arg) if isinstance(arg, (tuple, list)) else spec(arg) for arg in args)


def export_network(module: nn.Module, args: tuple, max_side: int = MAX_LATENT_SIDE) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module(*args)`` with the latent height and width dynamic
    (multiples of :data:`LATENT_MULTIPLE` up to ``max_side``) and the batch static."""
    height, width = args[0].shape[-2:]
    units = max(max_side, height, width) // LATENT_MULTIPLE
    h, w = Dim("latent_height_units", min=1, max=units), Dim("latent_width_units", min=1, max=units)
    shapes = _dynamic_shapes(args, height, width, h, w)
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(module, args, dynamic_shapes=shapes)


def export_networks(pipe, batch_sizes: Sequence[int] = BATCH_SIZES, max_side: int = MAX_LATENT_SIDE) -> dict:
    """``{(network, batch): ExportedProgram}`` for the LKPN, the ControlNet and the UNet."""
    programs = {}
    modules = _modules(pipe)
    for batch in batch_sizes:
        inputs = example_inputs(pipe, batch)
        for name in NETWORKS:
            logger.info("exporting %s (batch %d)", name, batch)
            programs[name, batch] = export_network(modules[name], inputs[name], max_side)
    return programs


# The replaced forward ---------------------------------------------------------------------


@dataclass
class CompiledNetwork:
    """Replacement ``forward`` of one network: the compiled program for the call's batch
    size (a larger batch in chunks), with the network's own call signature."""

    name: str
    programs: dict  # batch size -> callable taking the exported positional inputs
    max_side: int = MAX_LATENT_SIDE

    def _check(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The latent's size checked; the timesteps as the programs take them (long, one per sample)."""
        h, w = sample.shape[-2:]
        if h % LATENT_MULTIPLE or w % LATENT_MULTIPLE or max(h, w) > self.max_side:
            raise ValueError(
                f"the compiled {self.name} takes latents with sides that are multiples of {LATENT_MULTIPLE} "
                f"up to {self.max_side} (images up to {8 * self.max_side} px padded to multiples of 64); "
                f"got a {h}x{w} latent"
            )
        t = batched_timesteps(timestep, sample.shape[0], sample.device)
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError(f"the compiled networks take integer timesteps, got {t.unique().tolist()}")
        return t.long()

    def _run(self, inputs: list, batch: int):
        """Run on the batch, in chunks of the largest compiled batch size that fits."""
        sizes = sorted(self.programs, reverse=True)
        outputs, start = [], 0
        while start < batch:
            size = next((s for s in sizes if s <= batch - start), None)
            if size is None:
                raise ValueError(f"no compiled {self.name} for a batch of {batch - start}")

            def part(x, start=start, size=size):
                return x[start : start + size] if torch.is_tensor(x) and x.ndim > 0 else x

            chunk = [pytree.tree_map(part, x) for x in inputs]
            outputs.append(self.programs[size](*chunk))
            start += size
        if len(outputs) == 1:
            return outputs[0]
        flat = [pytree.tree_flatten(o) for o in outputs]
        spec = flat[0][1]
        return pytree.tree_unflatten([torch.cat(parts) for parts in zip(*(f[0] for f in flat))], spec)

    def __call__(self, *args, **kwargs):
        return getattr(self, f"_call_{self.name}")(*args, **kwargs)

    def _call_lkpn(self, condition, sample, timestep, encoder_hidden_states):
        t = self._check(sample, timestep)
        return self._run([condition, sample, t, encoder_hidden_states], sample.shape[0])

    def _call_controlnet(self, sample, timestep, encoder_hidden_states, hint, conditioning_scale=1.0):
        t = self._check(sample, timestep)
        scale = torch.as_tensor(conditioning_scale, dtype=sample.dtype, device=sample.device).reshape(())
        down, mid = self._run([sample, t, encoder_hidden_states, hint, scale], sample.shape[0])
        return tuple(down), mid

    def _call_unet(self, sample, timestep, encoder_hidden_states=None, down_block_additional_residuals=None,
                   mid_block_additional_residual=None, return_dict=True, **unsupported):
        unsupported = {k: v for k, v in unsupported.items() if v is not None}
        if unsupported or down_block_additional_residuals is None or mid_block_additional_residual is None:
            raise ValueError(
                "the compiled UNet takes sample, timestep, encoder_hidden_states and the ControlNet residuals only"
                + (f"; got {sorted(unsupported)}" if unsupported else "")
            )
        t = self._check(sample, timestep)
        eps = self._run(
            [sample, t, encoder_hidden_states, tuple(down_block_additional_residuals), mid_block_additional_residual],
            sample.shape[0],
        )
        return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)


def apply_compiled(pipe, compiled: dict, apply: Callable | None = None, max_side: int = MAX_LATENT_SIDE):
    """Make ``pipe.lkpn``, ``pipe.controlnet`` and ``pipe.unet`` call the compiled
    programs ``{(network, batch): callable}``. ``apply(forward, module)`` installs each
    forward (``spaces.aoti_apply``, which also frees the module's own weights); by
    default the forward is set and the weights are kept."""
    for name in NETWORKS:
        programs = {batch: program for (network, batch), program in compiled.items() if network == name}
        if not programs:
            raise ValueError(f"no compiled program for the {name}")
        forward = CompiledNetwork(name, programs, max_side)
        module = getattr(pipe, name)
        if apply is None:
            module.forward = forward
        else:
            apply(forward, module)
    return pipe


def compile_for_zerogpu(pipe, batch_sizes: Sequence[int] = BATCH_SIZES, duration: int | None = None):
    """Export and compile the networks in one ZeroGPU call of ``duration`` seconds (default:
    what start-up may book) and make ``pipe`` use them; returns ``pipe``. Call it at import
    time, with the pipeline on ``cuda``."""
    import spaces

    from .zerogpu import startup_request_seconds

    duration = startup_request_seconds() if duration is None else duration

    @spaces.GPU(duration=duration)
    def export_and_compile():
        programs = export_networks(pipe, batch_sizes)
        compiled = {}
        for key, program in programs.items():
            logger.info("compiling %s (batch %d)", *key)
            compiled[key] = spaces.aoti_compile(program)
        return compiled

    return apply_compiled(pipe, export_and_compile(), apply=spaces.aoti_apply)
