"""Convert the official DeblurDiff checkpoint (``model.pth``, LDM layout) to diffusers components.

Names are translated with diffusers' single-file helpers; every architecture is read from the
tensor shapes except the attention head size (64). The text encoder keeps every layer but the
last, as the reference runs it. See the README's "Weights" section.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

from ..parsing import HUB_REPO_ID


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


class CheckpointError(ValueError):
    """The checkpoint does not match the DeblurDiff architecture; lists every problem."""

    def __init__(self, unknown=(), missing=(), mismatched=(), other=()):
        self.unknown_keys = sorted(unknown)
        self.missing_keys = sorted(missing)
        self.mismatched_keys = sorted(mismatched)  # (key, checkpoint shape, expected shape)
        self.other = list(other)
        shapes = [f"{k}: checkpoint {tuple(a)}, expected {tuple(b)}" for k, a, b in self.mismatched_keys]
        sections = (
            ("unknown keys", self.unknown_keys),
            ("missing keys (diffusers names)", self.missing_keys),
            ("mis-shaped keys", shapes),
            ("other problems", self.other),
        )
        lines = ["The checkpoint does not match the DeblurDiff architecture:"]
        for title, items in sections:
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {item}" for item in items]
        super().__init__("\n".join(lines))


class _ArchitectureError(Exception):
    """Raised while reading an architecture from shapes; turned into a CheckpointError entry."""

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict (a nested ``"state_dict"`` unwrapped) of a torch or safetensors file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path), device="cpu")
    elif suffix in (".pth", ".ckpt", ".pt", ".bin"):
        import pickle
        import zipfile

        try:
            # Legacy (non-zip) serialisation cannot be memory-mapped.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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


def _get(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise _ArchitectureError(f"cannot read the architecture without {key!r}", missing=key)
    return sd[key]


def _indices(sd: dict, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})
    if found != list(range(len(found))):
        raise _ArchitectureError(f"{prefix}* are not numbered 0..n-1: {found}")
    return found


def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise _ArchitectureError(
            f"{what}: width {width} is not a multiple of the attention head size {head_dim} "
            "(pass attention_head_dim / --attention-head-dim)"
        )
    return width // head_dim


def unet_config_from_ldm(sd: dict[str, torch.Tensor], head_dim: int) -> dict:
    """``UNet2DConditionModel`` keyword arguments (SD 2.1 conventions) read from the shapes of
    an LDM ``UNetModel``/``ControlNet`` state dict (no prefix)."""
    conv_in = _get(sd, "input_blocks.0.0.weight")
    blocks = _indices(sd, "input_blocks.")
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
    transformer_keys = [k for k in sd if ".transformer_blocks." in k]
    if not transformer_keys:
        raise _ArchitectureError("no attention layers (transformer_blocks) found")
    to_k = next(k for k in transformer_keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in sd if k.endswith(".proj_in.weight") and ".1.proj_in." in k)
    heads = [_heads(w, head_dim, f"level {i} ({w} channels)") if a else max(w // head_dim, 1)
             for i, (w, a) in enumerate(zip(widths, attention))]
    _heads(widths[-1], head_dim, "middle block")
    out = sd.get("out.2.weight")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    return dict(
        sample_size=64,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(out.shape[0]) if out is not None else None,
        block_out_channels=tuple(widths),
        down_block_types=down,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
        layers_per_block=layers,
        attention_head_dim=heads,  # diffusers reads this as heads per level
        cross_attention_dim=int(sd[to_k].shape[1]),
        use_linear_projection=sd[proj_in].ndim == 2,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _side_config(unet: dict, head_dim: int, **extra) -> dict:
    """The LKPN's or the ControlNet's configuration: the levels of its UNet, and ``extra``."""
    levels = ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim")
    return dict({k: unet[k] for k in levels}, attention_head_dim=head_dim, **extra)


def lkpn_config_from_ldm(unet: dict, head_dim: int) -> dict:
    latent = unet["in_channels"] // 2
    k2 = (unet["out_channels"] or 0) // max(latent, 1)
    k = int(round(k2**0.5))
    if unet["in_channels"] % 2 or k * k != k2 or k * k * latent != unet["out_channels"] or k % 2 == 0:
        raise _ArchitectureError(
            f"LKPN UNet with {unet['in_channels']} input and {unet['out_channels']} output channels: expected "
            "2·C inputs and C·k·k outputs with odd k"
        )
    return _side_config(unet, head_dim, latent_channels=latent, kernel_size=k)


def controlnet_config_from_ldm(unet: dict, head_dim: int, latent_channels: int = 4) -> dict:
    hint = unet["in_channels"] - latent_channels
    if hint <= 0:
        raise _ArchitectureError(f"ControlNet input has {unet['in_channels']} channels, expected {latent_channels} + hint")
    return _side_config(unet, head_dim, in_channels=latent_channels, hint_channels=hint,
                        use_linear_projection=unet["use_linear_projection"])


def vae_config_from_ldm(sd: dict[str, torch.Tensor]) -> dict:
    from .configs import vae_config

    conv_in = _get(sd, "encoder.conv_in.weight")
    levels = _indices(sd, "encoder.down.") or [0]  # none: reported as a missing key below
    widths = [int(_get(sd, f"encoder.down.{i}.block.0.conv2.weight").shape[0]) for i in levels]
    layers = len(_indices(sd, "encoder.down.0.block."))
    z = int(_get(sd, "encoder.conv_out.weight").shape[0]) // 2
    return vae_config(
        widths,
        layers,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(_get(sd, "decoder.conv_out.weight").shape[0]),
        latent_channels=z,
    )


def text_config_from_open_clip(sd: dict[str, torch.Tensor], head_dim: int):
    """``CLIPTextConfig`` of the penultimate-layer encoder of an OpenCLIP text tower
    (keys relative to ``clip.model.``), with the conventions of ``configs.text_config``."""
    from .configs import text_config

    embedding = _get(sd, "token_embedding.weight")
    vocab, width = (int(s) for s in embedding.shape)
    layers = len(_indices(sd, "transformer.resblocks."))
    if layers < 2:
        raise _ArchitectureError(f"the text tower has {layers} layers; the penultimate-layer encoder needs at least 2")
    heads = _heads(width, head_dim, f"text tower ({width} wide)")
    config = text_config(hidden_size=width, layers=layers - 1, heads=heads, vocab_size=vocab)
    config.intermediate_size = int(_get(sd, "transformer.resblocks.0.mlp.c_fc.weight").shape[0])
    config.max_position_embeddings = int(_get(sd, "positional_embedding").shape[0])
    return config


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def _prefix(component: str, state_dict: dict) -> str:
    """The checkpoint's own prefix for ``component``, else the official one (for messages)."""
    prefixes = [p for p, c in PREFIXES.items() if c == component]
    return next((p for p in prefixes if any(k.startswith(p) for k in state_dict)), prefixes[0])


def _load(model_cls, config, converted: dict, sd: dict, prefix: str, used, problems: dict, component: str,
          dtype: torch.dtype):
    """The model loaded strictly from ``converted``, or None with every problem in ``problems``;
    ``used``: keys of ``sd`` consumed although no converted tensor is one of theirs."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls(**config) if isinstance(config, dict) else model_cls(config)
    expected = model.state_dict()
    # diffusers' helpers pass tensors through or take views of them (never copies, except
    # for the text tower's fused q/k/v, in ``used``), so a converted tensor's base object
    # names the checkpoint key it came from.
    source = {id(_root(v)): prefix + k for k, v in sd.items()}
    loaded = {id(_root(converted[k])) for k in expected if k in converted}
    problems["unknown"] += [prefix + k for k, v in sd.items() if id(_root(v)) not in loaded and k not in used]
    problems["unknown"] += [f"{component}.{k}" for k, v in converted.items()
                            if k not in expected and id(_root(v)) not in source]
    problems["missing"] += [f"{component}.{k}" for k in sorted(set(expected) - set(converted))]
    mismatched = [k for k in sorted(set(expected) & set(converted)) if converted[k].shape != expected[k].shape]
    for key in mismatched:
        src = source.get(id(_root(converted[key])))
        name = f"{src} (-> {component}.{key})" if src else f"{component}.{key}"
        problems["mismatched"].append((name, tuple(converted[key].shape), tuple(expected[key].shape)))
    if mismatched or set(expected) ^ set(converted):
        return None
    state = {k: converted[k].to(dtype=dtype if expected[k].is_floating_point() else expected[k].dtype).contiguous()
             for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def convert_deblurdiff_checkpoint(
    state_dict: dict[str, torch.Tensor],
    attention_head_dim: int = 64,
    torch_dtype: torch.dtype | None = None,
) -> dict:
    """The five networks (eval mode, default float32) from an LDM-layout state dict; raises one
    :class:`CheckpointError` listing every unknown, missing or mis-shaped key."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        LDM_UNET_KEY,
        convert_controlnet_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextModel

    from . import LatentControlNetModel, LKPNModel

    def unet_state(sd, config):
        return convert_ldm_unet_checkpoint({LDM_UNET_KEY + k: v for k, v in sd.items()}, config)

    parts, unknown = split_checkpoint(state_dict)
    problems = dict(unknown=list(unknown), missing=[], mismatched=[], other=[])
    components: dict = {}
    latent_channels = 4
    for component in ("unet", "lkpn", "controlnet", "vae", "text_encoder"):
        prefix = _prefix(component, state_dict)
        sd = parts.get(component)
        if not sd:
            problems["other"].append(f"no {component} weights (keys starting with {prefix!r})")
            continue
        used = ()
        try:
            if component == "unet":
                config = unet_config_from_ldm(sd, attention_head_dim)
                latent_channels = config["in_channels"]
                model_cls, converted = UNet2DConditionModel, unet_state(sd, config)
            elif component == "lkpn":
                inner = {k[len("unet.") :]: v for k, v in sd.items() if k.startswith("unet.")}
                unet = unet_config_from_ldm(inner, attention_head_dim)
                config = lkpn_config_from_ldm(unet, attention_head_dim)
                model_cls, converted = LKPNModel, {"unet." + k: v for k, v in unet_state(inner, unet).items()}
            elif component == "controlnet":
                unet = unet_config_from_ldm(sd, attention_head_dim)
                config = controlnet_config_from_ldm(unet, attention_head_dim, latent_channels)
                # Given the un-prefixed state dict (it starts with time_embed.*) the helper converts
                # it as is. This ControlNet has no input_hint_block: the hint is concatenated to x_t.
                layers = {"layers_per_block": unet["layers_per_block"]}
                converted = convert_controlnet_checkpoint(dict(sd), layers)
                model_cls = LatentControlNetModel
            elif component == "vae":
                config = vae_config_from_ldm(sd)
                ldm = {"first_stage_model." + k: v for k, v in sd.items()}
                converted = convert_ldm_vae_checkpoint(ldm, config)
                model_cls = AutoencoderKL
            else:
                converted, config, used = _text_state(sd, attention_head_dim)
                model_cls = CLIPTextModel
        except _ArchitectureError as exc:
            if exc.missing:
                problems["missing"].append(prefix + exc.missing)
            problems["other"].append(f"{component}: {exc}")
            continue
        converted = {k: v for k, v in converted.items() if v is not None}  # the helpers .get() absent keys
        model = _load(model_cls, config, converted, sd, prefix, used, problems, component,
                      torch_dtype or torch.float32)
        if model is not None:
            components[component] = model
    if any(problems.values()):
        raise CheckpointError(**problems)
    return {name: components[name] for name in COMPONENTS}


def _text_state(sd, head_dim: int):
    """Converted text-encoder state, its config, and the keys of ``sd`` left out or split into copies."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if not any(k.startswith("model.") for k in sd):
        raise _ArchitectureError("no OpenCLIP text model (keys starting with 'clip.model.')", missing="model.token_embedding.weight")
    text = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    config = text_config_from_open_clip(text, head_dim)
    last = config.num_hidden_layers  # index of the layer the penultimate output skips
    ignored = {
        k for k in text
        if k in _CLIP_IGNORED or k.startswith("visual.") or k.startswith(f"transformer.resblocks.{last}.")
    }
    kept = {"model." + k: v for k, v in text.items() if k not in ignored}
    # The helper's prefix is "model." here, so its SD 2 ignore list (the 24th layer under
    # "cond_stage_model.model.") does not apply: the unused layers are left out above. It
    # reads only the hidden size from the model it is given.
    converted = convert_open_clip_checkpoint(SimpleNamespace(config=config), kept, prefix="model.")
    # transformers >= 5 has no "text_model." level; the fused q/k/v projections become copies.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    fused = re.compile(r"model\.transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias)")
    split = {k for k in kept if fused.fullmatch(k)}
    return converted, config, {"model." + k for k in ignored} | split


class TokenizerUnavailableError(OSError):
    """The CLIP tokenizer could not be loaded; the message says how to pass one."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all: offline, download retries would take minutes to fail."""
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
    """A tokenizer object as is; None: the packaged OpenCLIP one; else a folder (its own or a
    pipeline's ``tokenizer/``) or a Hub repo id (from the Hub when it answers, else the cache)."""
    from transformers import CLIPTokenizer

    from .tokenizer import VOCAB_FILE, OpenCLIPTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is None:
        return OpenCLIPTokenizer()
    source = os.fspath(tokenizer)
    path = Path(source).expanduser()
    hint = (
        "Leave `--tokenizer` out to use the OpenCLIP tokenizer shipped with the package, or pass a folder "
        "with a saved tokenizer (or vocab.json and merges.txt), or a Hub repo id when online."
    )
    a_path = (os.sep in source or source.startswith((".", "~"))) and not HUB_REPO_ID.fullmatch(source)
    if a_path and not path.exists():
        raise TokenizerUnavailableError(f"Tokenizer folder not found: {source}. {hint}")
    errors = []
    if path.exists():
        own = any((path / name).is_file() for name in (VOCAB_FILE, "vocab.json", "tokenizer.json"))
        folder = path if own else path / "tokenizer"
        if (folder / VOCAB_FILE).is_file():
            return OpenCLIPTokenizer.from_pretrained(str(folder))
        attempts, sources = [(str(folder), {})], (True,)
    else:  # a Hub repo id, at its top or in a pipeline's subfolder: the cache first, then the Hub
        attempts, sources = [(source, {}), (source, {"subfolder": "tokenizer"})], (True, False)
    for local_only, (name, kwargs) in itertools.product(sources, attempts):
        if not local_only and not _hub_reachable():
            errors.append("the Hugging Face Hub cannot be reached")
            break  # the attempts left all need it
        try:
            tok = CLIPTokenizer.from_pretrained(name, local_files_only=local_only, **kwargs)
        except Exception as exc:  # missing files, bad repo id, network
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        # Offline, transformers may hand back an empty tokenizer (start/end of text only)
        # instead of raising: that would silently encode every prompt as nothing.
        if len(tok.get_vocab()) > 2:
            return tok
        errors.append("no vocabulary found" + (f" in subfolder {kwargs['subfolder']!r}" if kwargs else ""))
    reasons = "; ".join(dict.fromkeys(errors))
    raise TokenizerUnavailableError(f"Could not load a CLIP tokenizer from {source!r} ({reasons}).\n{hint}")


def load_single_file_components(path, tokenizer=None, attention_head_dim: int = 64, torch_dtype=None) -> dict:
    """The pipeline's components; the tokenizer first (cheap, and the usual offline failure)."""
    from .configs import make_scheduler

    tok = load_tokenizer(tokenizer)
    components = convert_deblurdiff_checkpoint(
        read_checkpoint(path), attention_head_dim=attention_head_dim, torch_dtype=torch_dtype
    )
    return dict(components, tokenizer=tok, scheduler=make_scheduler())


def file_sha256(path: str | os.PathLike) -> str:
    from huggingface_hub.utils.sha import sha_fileobj

    with open(path, "rb") as f:
        return sha_fileobj(f, chunk_size=1 << 24).hex()
