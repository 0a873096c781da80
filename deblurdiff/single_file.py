"""Convert the official DeblurDiff checkpoint (``model.pth``, LDM layout) to diffusers components.

The checkpoint holds the authors' ``ControlLDM``: ``unet.`` (SD 2.1 UNet), ``controlnet.``,
``kpn.`` (LKPN), ``vae.`` and ``clip.`` (OpenCLIP ViT-H/14 text tower). Names are translated
with diffusers' single-file helpers; every architecture is read from the tensor shapes
(so scaled-down checkpoints convert too), except the attention head size
(``attention_head_dim``, 64). The text encoder keeps what the reference runs: every layer
but the last, then the final layer norm. Every unknown, missing or mis-shaped tensor is
reported in one :class:`CheckpointError`.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch


# Checkpoint prefix -> component. The LDM names are accepted too.
PREFIXES = {
    "unet.": "unet",
    "controlnet.": "controlnet",
    "kpn.": "lkpn",
    "vae.": "vae",
    "clip.": "text_encoder",
    "model.diffusion_model.": "unet",
    "control_model.": "controlnet",
    "first_stage_model.": "vae",
    "cond_stage_model.": "text_encoder",
}
COMPONENTS = ("vae", "text_encoder", "unet", "controlnet", "lkpn")
# Text-tower entries the penultimate-layer encoder does not use (relative to ``clip.model.``).
_CLIP_IGNORED = ("text_projection", "logit_scale", "attn_mask")
_CLIP_IGNORED_PREFIXES = ("visual.",)


class CheckpointError(ValueError):
    """The checkpoint does not match the DeblurDiff architecture; lists every problem."""

    def __init__(self, unknown=(), missing=(), mismatched=(), other=()):
        self.unknown_keys = sorted(unknown)
        self.missing_keys = sorted(missing)
        self.mismatched_keys = sorted(mismatched)  # (key, checkpoint shape, expected shape)
        self.other = list(other)
        lines = ["The checkpoint does not match the DeblurDiff architecture:"]
        for title, items in (
            ("unknown keys", self.unknown_keys),
            ("missing keys (diffusers names)", self.missing_keys),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {k}" for k in items]
        if self.mismatched_keys:
            lines.append(f"  {len(self.mismatched_keys)} mis-shaped keys:")
            lines += [f"    {k}: checkpoint {tuple(a)}, expected {tuple(b)}" for k, a, b in self.mismatched_keys]
        if self.other:
            lines.append(f"  {len(self.other)} other problems:")
            lines += [f"    {m}" for m in self.other]
        super().__init__("\n".join(lines))

    @property
    def empty(self) -> bool:
        return not (self.unknown_keys or self.missing_keys or self.mismatched_keys or self.other)


class _ArchitectureError(Exception):
    """Raised while reading an architecture from shapes; turned into a CheckpointError entry."""

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


# ---------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a ``.pth``/``.ckpt``/``.pt`` (``torch.load``, weights only; a nested
    ``"state_dict"`` is unwrapped) or ``.safetensors`` file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path), device="cpu")
    elif suffix in (".pth", ".ckpt", ".pt", ".bin"):
        import pickle

        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                other=[f"{path} holds objects other than tensors and cannot be loaded safely: {exc}"]
            ) from exc
        state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    else:
        raise ValueError(f"Unsupported checkpoint format {suffix!r} (expected .pth, .ckpt, .pt or .safetensors): {path}")
    if not isinstance(state_dict, dict):
        raise CheckpointError(other=[f"{path} holds a {type(state_dict).__name__}, not a state dict"])
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(other=[f"entries that are not tensors: {', '.join(map(str, bad))}"])
    return state_dict


def split_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """``({component: {key without prefix: tensor}}, unknown keys)``."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DistributedDataParallel wrapper
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, value in state_dict.items():
        for prefix, component in PREFIXES.items():
            if key.startswith(prefix):
                parts[component][key[len(prefix) :]] = value
                break
        else:
            unknown.append(key)
    return dict(parts), unknown


# ---------------------------------------------------------------------------- architectures
def _get(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise _ArchitectureError(f"cannot read the architecture without {key!r}", missing=key)
    return sd[key]


def _indices(sd: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise _ArchitectureError(
            f"{what}: width {width} is not a multiple of the attention head size {head_dim} "
            "(pass attention_head_dim / --attention-head-dim)"
        )
    return width // head_dim


def read_ldm_unet_architecture(sd: dict[str, torch.Tensor], head_dim: int) -> dict:
    """Architecture of an LDM ``UNetModel``/``ControlNet`` state dict (no prefix) from its shapes.

    Returns in/out channels, ``block_out_channels``, ``layers_per_block``, which levels have
    attention, ``cross_attention_dim``, ``use_linear_projection`` and heads per level."""
    conv_in = _get(sd, "input_blocks.0.0.weight")
    blocks = _indices(sd, "input_blocks.")
    if blocks != list(range(len(blocks))):
        raise _ArchitectureError(f"input_blocks are not numbered 0..n-1: {blocks}")
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
    layers = downsamplers[0] - 1 if downsamplers else len(blocks) - 1
    if layers < 1 or len(blocks) % (layers + 1):
        raise _ArchitectureError(f"cannot read the levels from {len(blocks)} input blocks (downsamplers at {downsamplers})")
    levels = len(blocks) // (layers + 1)
    expected_down = [(level + 1) * (layers + 1) for level in range(levels - 1)]
    if downsamplers != expected_down:
        raise _ArchitectureError(f"downsamplers at input blocks {downsamplers}, expected {expected_down}")
    first = [1 + level * (layers + 1) for level in range(levels)]
    widths = [int(_get(sd, f"input_blocks.{i}.0.out_layers.3.weight").shape[0]) for i in first]
    attention = [f"input_blocks.{i}.1.proj_in.weight" in sd for i in first]
    emb = _get(sd, f"input_blocks.{first[0]}.0.emb_layers.1.weight")
    if emb.shape[0] != widths[0]:
        raise _ArchitectureError("scale-shift normalisation (use_scale_shift_norm) is not supported")
    transformer_keys = [k for k in sd if ".transformer_blocks." in k]
    if not transformer_keys:
        raise _ArchitectureError("no attention layers (transformer_blocks) found")
    depth = max(int(k.split(".transformer_blocks.")[1].split(".")[0]) for k in transformer_keys) + 1
    if depth != 1:
        raise _ArchitectureError(f"transformer depth {depth} is not supported (DeblurDiff uses 1)")
    to_k = next(k for k in transformer_keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in sd if k.endswith(".proj_in.weight") and ".1.proj_in." in k)
    heads = [_heads(w, head_dim, f"level {i} ({w} channels)") if a else max(w // head_dim, 1)
             for i, (w, a) in enumerate(zip(widths, attention))]
    _heads(widths[-1], head_dim, "middle block")
    out = sd.get("out.2.weight")
    return dict(
        in_channels=int(conv_in.shape[1]),
        out_channels=int(out.shape[0]) if out is not None else None,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        attention=tuple(attention),
        cross_attention_dim=int(sd[to_k].shape[1]),
        use_linear_projection=sd[proj_in].ndim == 2,
        heads=heads,
    )


def _down_types(arch: dict) -> tuple[str, ...]:
    return tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch["attention"])


def unet_config_from_ldm(arch: dict) -> dict:
    """``UNet2DConditionModel`` keyword arguments (SD 2.1 conventions) for an LDM UNet architecture."""
    down = _down_types(arch)
    return dict(
        sample_size=64,
        in_channels=arch["in_channels"],
        out_channels=arch["out_channels"],
        block_out_channels=arch["block_out_channels"],
        down_block_types=down,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
        layers_per_block=arch["layers_per_block"],
        attention_head_dim=list(arch["heads"]),  # diffusers reads this as heads per level
        cross_attention_dim=arch["cross_attention_dim"],
        use_linear_projection=arch["use_linear_projection"],
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _side_config(arch: dict, head_dim: int) -> dict:
    return dict(
        block_out_channels=arch["block_out_channels"],
        down_block_types=_down_types(arch),
        layers_per_block=arch["layers_per_block"],
        attention_head_dim=head_dim,
        cross_attention_dim=arch["cross_attention_dim"],
    )


def lkpn_config_from_ldm(arch: dict, head_dim: int) -> dict:
    latent = arch["in_channels"] // 2
    k2 = (arch["out_channels"] or 0) // max(latent, 1)
    k = int(round(k2**0.5))
    if arch["in_channels"] % 2 or k * k != k2 or k * k * latent != arch["out_channels"] or k % 2 == 0:
        raise _ArchitectureError(
            f"LKPN UNet with {arch['in_channels']} input and {arch['out_channels']} output channels: expected "
            "2·C inputs and C·k·k outputs with odd k"
        )
    if not arch["use_linear_projection"]:
        raise _ArchitectureError("LKPN with convolutional attention projections is not supported")
    return dict(latent_channels=latent, kernel_size=k, **_side_config(arch, head_dim))


def controlnet_config_from_ldm(arch: dict, head_dim: int, latent_channels: int = 4) -> dict:
    hint = arch["in_channels"] - latent_channels
    if hint <= 0:
        raise _ArchitectureError(f"ControlNet input has {arch['in_channels']} channels, expected {latent_channels} + hint")
    return dict(
        in_channels=latent_channels,
        hint_channels=hint,
        use_linear_projection=arch["use_linear_projection"],
        **_side_config(arch, head_dim),
    )


def vae_config_from_ldm(sd: dict[str, torch.Tensor]) -> dict:
    from .models.configs import vae_config

    conv_in = _get(sd, "encoder.conv_in.weight")
    levels = _indices(sd, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise _ArchitectureError(f"encoder.down levels are not numbered 0..n-1: {levels}")
    widths = [int(_get(sd, f"encoder.down.{i}.block.0.conv2.weight").shape[0]) for i in levels]
    layers = len(_indices(sd, "encoder.down.0.block."))
    z = int(_get(sd, "encoder.conv_out.weight").shape[0]) // 2
    embed = int(_get(sd, "quant_conv.weight").shape[0]) // 2
    if z != embed:
        raise _ArchitectureError(f"VAE with z_channels {z} != embed_dim {embed} is not supported")
    return vae_config(
        widths,
        layers,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(_get(sd, "decoder.conv_out.weight").shape[0]),
        latent_channels=z,
    )


def text_config_from_open_clip(sd: dict[str, torch.Tensor], head_dim: int = 64, num_heads: int | None = None):
    """``CLIPTextConfig`` of the penultimate-layer encoder of an OpenCLIP text tower
    (keys relative to ``clip.model.``), with the conventions of ``configs.text_config``."""
    from .models.configs import text_config

    embedding = _get(sd, "token_embedding.weight")
    vocab, width = (int(s) for s in embedding.shape)
    layers = len(_indices(sd, "transformer.resblocks."))
    if layers < 2:
        raise _ArchitectureError(f"the text tower has {layers} layers; the penultimate-layer encoder needs at least 2")
    heads = num_heads or _heads(width, head_dim, f"text tower ({width} wide)")
    kwargs = dict(hidden_size=width, layers=layers - 1, heads=heads)
    config = text_config(vocab_size=vocab, **kwargs)
    config.intermediate_size = int(_get(sd, "transformer.resblocks.0.mlp.c_fc.weight").shape[0])
    config.max_position_embeddings = int(_get(sd, "positional_embedding").shape[0])
    return config


# ---------------------------------------------------------------------------- conversion
def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


class _Tracker:
    """Which checkpoint tensors ended up in a converted state dict.

    diffusers' helpers pass tensors through or take views of them (never copies, except
    for the text tower's fused q/k/v, handled by the caller), so a converted tensor's
    base object identifies the checkpoint key it came from."""

    def __init__(self, source: dict[str, torch.Tensor], names: dict[str, str]):
        self.origin: dict[int, list[str]] = defaultdict(list)
        for key, value in source.items():
            self.origin[id(_root(value))].append(names[key])
        self.consumed: set[str] = set()

    def source_of(self, tensor: torch.Tensor) -> str | None:
        keys = self.origin.get(id(_root(tensor)))
        return keys[0] if keys else None

    def mark(self, converted: dict[str, torch.Tensor]) -> None:
        for value in converted.values():
            self.consumed.update(self.origin.get(id(_root(value)), ()))


def _independent(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy tensors that share a base tensor with another key, so each key is traceable."""
    counts = defaultdict(int)
    for v in sd.values():
        counts[id(_root(v))] += 1
    return {k: (v.clone() if counts[id(_root(v))] > 1 else v) for k, v in sd.items()}


def _convert_unet_like(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in sd.items()}, config)


def _convert_controlnet(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    # Given the un-prefixed state dict (it starts with time_embed.*) the helper converts it
    # as is. This ControlNet has no input_hint_block: the hint is concatenated to x_t.
    return convert_controlnet_checkpoint(dict(sd), {"layers_per_block": layers_per_block})


def _convert_vae(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in sd.items()}, config)


def _convert_text(sd: dict[str, torch.Tensor], text_model) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    # The helper's prefix is "model." here, so its SD 2 ignore list (the 24th layer under
    # "cond_stage_model.model.") does not apply: the unused layers are dropped by the caller.
    kept = {"model." + k: v for k, v in sd.items()}
    return convert_open_clip_checkpoint(text_model, kept, prefix="model.")


def _load(model_cls, config, converted: dict, tracker: _Tracker, component: str, problems: SimpleNamespace, dtype, build):
    """Instantiate (empty weights) and load strictly; record every problem instead of raising."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build(model_cls, config)
    expected = model.state_dict()

    def name(key):
        src = tracker.source_of(converted[key])
        return f"{src} (-> {component}.{key})" if src else f"{component}.{key}"

    ok = True
    for key in sorted(set(converted) - set(expected)):
        src = tracker.source_of(converted[key])
        if src:  # reported with the checkpoint's other unused keys
            tracker.consumed.discard(src)
        else:
            problems.unknown.append(f"{component}.{key}")
        ok = False
    for key in sorted(set(expected) - set(converted)):
        problems.missing.append(f"{component}.{key}")
        ok = False
    for key in sorted(set(expected) & set(converted)):
        if tuple(converted[key].shape) != tuple(expected[key].shape):
            problems.mismatched.append((name(key), tuple(converted[key].shape), tuple(expected[key].shape)))
            ok = False
    if not ok:
        return None
    state = {k: converted[k].to(dtype=dtype if expected[k].is_floating_point() else expected[k].dtype).contiguous()
             for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def convert_deblurdiff_checkpoint(
    state_dict: dict[str, torch.Tensor],
    attention_head_dim: int = 64,
    torch_dtype: torch.dtype | None = None,
    text_num_heads: int | None = None,
) -> dict:
    """The five networks, loaded (eval mode, ``torch_dtype``, default float32), from a
    DeblurDiff state dict in the LDM layout; the text tower gets ``width //
    attention_head_dim`` heads unless ``text_num_heads`` is given. Raises one
    :class:`CheckpointError` listing every unknown, missing or mis-shaped key."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .models import LatentControlNetModel, LKPNModel

    dtype = torch_dtype or torch.float32
    parts, unknown = split_checkpoint(state_dict)
    problems = SimpleNamespace(unknown=list(unknown), missing=[], mismatched=[], other=[])
    prefix_of = {}
    for prefix, component in PREFIXES.items():
        prefix_of.setdefault(component, prefix)
    # Keep the checkpoint's own prefix in messages.
    for key in state_dict:
        for prefix, component in PREFIXES.items():
            if key.startswith(prefix):
                prefix_of[component] = prefix
                break
    for component in COMPONENTS:
        if component not in parts:
            problems.other.append(f"no {component} weights (keys starting with {prefix_of[component]!r})")

    def by_kwargs(cls, cfg):
        return cls(**cfg)

    components: dict = {}
    unet_arch = None
    for component in ("unet", "lkpn", "controlnet", "vae", "text_encoder"):
        sd = parts.get(component)
        if not sd:
            continue
        sd = _independent(sd)
        prefix = prefix_of[component]
        names = {k: prefix + k for k in sd}
        tracker = _Tracker(sd, names)
        try:
            if component == "unet":
                unet_arch = arch = read_ldm_unet_architecture(sd, attention_head_dim)
                config = unet_config_from_ldm(arch)
                converted = _convert_unet_like(sd, config)
                cls, build = UNet2DConditionModel, by_kwargs
            elif component == "lkpn":
                inner = {k[len("unet.") :]: v for k, v in sd.items() if k.startswith("unet.")}
                arch = read_ldm_unet_architecture(inner, attention_head_dim)
                config = lkpn_config_from_ldm(arch, attention_head_dim)
                unet_config = unet_config_from_ldm(arch)
                converted = {"unet." + k: v for k, v in _convert_unet_like(inner, unet_config).items()}
                cls, build = LKPNModel, by_kwargs
            elif component == "controlnet":
                arch = read_ldm_unet_architecture(sd, attention_head_dim)
                latent = unet_arch["in_channels"] if unet_arch else 4
                config = controlnet_config_from_ldm(arch, attention_head_dim, latent)
                converted = _convert_controlnet(sd, arch["layers_per_block"])
                cls, build = LatentControlNetModel, by_kwargs
            elif component == "vae":
                config = vae_config_from_ldm(sd)
                converted = _convert_vae(sd, config)
                cls, build = AutoencoderKL, by_kwargs
            else:
                converted, config = _text_state(sd, tracker, attention_head_dim, text_num_heads)
                cls, build = CLIPTextModel, lambda c, cfg: c(cfg)
        except _ArchitectureError as exc:
            if exc.missing:
                problems.missing.append(prefix + exc.missing)
            problems.other.append(f"{component}: {exc}")
            continue
        converted = {k: v for k, v in converted.items() if v is not None}  # the helpers .get() absent keys
        tracker.mark(converted)
        model = _load(cls, config, converted, tracker, component, problems, dtype, build)
        problems.unknown += sorted(set(names.values()) - tracker.consumed)
        if model is not None:
            components[component] = model

    error = CheckpointError(problems.unknown, problems.missing, problems.mismatched, problems.other)
    if not error.empty:
        raise error
    return {name: components[name] for name in COMPONENTS}


def _text_state(sd, tracker: _Tracker, head_dim: int, num_heads: int | None):
    """Converted text-encoder state and config; marks the keys deliberately left out."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel

    if not any(k.startswith("model.") for k in sd):
        raise _ArchitectureError("no OpenCLIP text model (keys starting with 'clip.model.')", missing="model.token_embedding.weight")
    text = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    config = text_config_from_open_clip(text, head_dim, num_heads)
    last = config.num_hidden_layers  # index of the layer the penultimate output skips
    ignored = [
        k for k in text
        if k in _CLIP_IGNORED or k.startswith(_CLIP_IGNORED_PREFIXES) or k.startswith(f"transformer.resblocks.{last}.")
    ]
    tracker.consumed.update(tracker.source_of(text[k]) for k in ignored)
    used = {k: v for k, v in text.items() if k not in ignored}
    with init_empty_weights():
        probe = CLIPTextModel(config)
    converted = _convert_text(used, probe)
    # The fused q/k/v projections are split into copies: account for them by name.
    for key in used:
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m and f"text_model.encoder.layers.{m.group(1)}.self_attn.q_proj.{m.group(2)}" in converted:
            tracker.consumed.add(tracker.source_of(used[key]))
    if not any(k.startswith("text_model.") for k in probe.state_dict()):  # transformers >= 5 flattens it
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted, config


# ---------------------------------------------------------------------------- tokenizer and files
class TokenizerUnavailableError(OSError):
    """The CLIP tokenizer could not be loaded; the message says how to pass one."""


def _usable(tokenizer) -> bool:
    # Offline, transformers may hand back an empty tokenizer (start/end of text only)
    # instead of raising: that would silently encode every prompt as nothing.
    return tokenizer is not None and len(tokenizer.get_vocab()) > 2


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers at all; without this check an offline machine spends
    minutes in download retries before failing."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_tokenizer(tokenizer=None):
    """``tokenizer`` itself if it is an object; with none, the packaged OpenCLIP tokenizer;
    else loaded from a folder (an OpenCLIPTokenizer's, a CLIPTokenizer's, or a pipeline's
    ``tokenizer`` subfolder) or a Hub repo id (the local cache first, then the Hub)."""
    from transformers import CLIPTokenizer

    from .tokenizer import VOCAB_FILE, OpenCLIPTokenizer, is_open_clip_tokenizer_folder

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None:
        return OpenCLIPTokenizer()
    source = os.fspath(tokenizer)
    path = Path(source).expanduser()
    if not path.exists() and (os.sep in source or source.startswith((".", "~"))):
        raise TokenizerUnavailableError(
            f"Tokenizer folder not found: {source}. Leave `--tokenizer` out to use the tokenizer shipped with "
            "the package, or pass a folder holding a saved tokenizer (or vocab.json and merges.txt)."
        )
    if path.is_dir() and is_open_clip_tokenizer_folder(path):
        sub = path if (path / VOCAB_FILE).is_file() else path / "tokenizer"
        return OpenCLIPTokenizer.from_pretrained(str(sub))
    source = str(path) if path.exists() else source
    if path.is_dir() and not (path / "vocab.json").exists() and (path / "tokenizer").is_dir():
        subfolders = ["tokenizer"]
    else:
        subfolders = [None, "tokenizer"]
    modes = [True] if path.exists() else [True, False]  # local files only, then the Hub
    errors = []
    for local_only in modes:
        if not local_only and not _hub_reachable():
            errors.append("the Hugging Face Hub cannot be reached")
            break
        for sub in subfolders:
            kwargs = dict(local_files_only=local_only, **({"subfolder": sub} if sub else {}))
            try:
                tok = CLIPTokenizer.from_pretrained(source, **kwargs)
            except Exception as exc:  # missing files, bad repo id, network
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            if _usable(tok):
                return tok
            errors.append(f"no vocabulary found{f' in subfolder {sub!r}' if sub else ''}")
    raise TokenizerUnavailableError(
        f"Could not load a CLIP tokenizer from {source!r} ({'; '.join(dict.fromkeys(errors))}).\n"
        "Leave `--tokenizer` out to use the OpenCLIP tokenizer shipped with the package, or pass a folder "
        "with a saved tokenizer (or vocab.json and merges.txt), or a Hub repo id when online."
    )


def load_single_file_components(path, tokenizer=None, attention_head_dim: int = 64, torch_dtype=None) -> dict:
    """Everything ``DeblurDiffPipeline(**components)`` needs, from the official checkpoint.

    The tokenizer is resolved first (cheap, and the usual offline failure)."""
    from .models.configs import make_scheduler

    tok = load_tokenizer(tokenizer)
    components = convert_deblurdiff_checkpoint(
        read_checkpoint(path), attention_head_dim=attention_head_dim, torch_dtype=torch_dtype
    )
    return dict(components, tokenizer=tok, scheduler=make_scheduler())


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()
