"""``python -m deblurdiff.convert model.pth out_dir [--dtype fp16] [--push-to-hub owner/name]``.

Writes the diffusers folder that :mod:`deblurdiff.models.single_file` converts, and uploads it with a model card.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .parsing import DTYPES, HUB_REPO_ID
from .models.single_file import COMPONENTS, CheckpointError, TokenizerUnavailableError, file_sha256


PAPER_URL = "https://arxiv.org/abs/2502.03810"
REFERENCE_URL = "https://github.com/kkkls/DeblurDiff"
CITATION = """@article{kong2025deblurdiff,
  title   = {DeblurDiff: Real-World Image Deblurring with Generative Diffusion Models},
  author  = {Kong, Lingshun and Zhang, Jiawei and Zou, Dongqing and Ren, Jimmy and Wu, Xiaohe and Dong, Jiangxin and Pan, Jinshan},
  journal = {arXiv preprint arXiv:2502.03810},
  year    = {2025}
}"""


class HubPushError(RuntimeError):
    """Uploading to the Hub failed; the message says why and what to do."""


def model_card(repo_id: str, dtype: str, source_name: str, source_sha256: str | None = None) -> str:
    """The README.md of an uploaded folder; the licences are as the weights' publishers state them."""
    provenance = f"`{source_name}`" + (f" (SHA-256 `{source_sha256}`)" if source_sha256 else "")
    return f"""---
license: openrail++
library_name: diffusers
pipeline_tag: image-to-image
tags:
- deblurring
- image-restoration
- diffusion
- controlnet
---

# DeblurDiff ({dtype})

DeblurDiff ([Kong et al., 2025]({PAPER_URL})) deblurs real-world photos with Stable Diffusion
2.1's generative prior. A Latent Kernel Prediction Network (LKPN) predicts a 5×5 kernel for
every latent pixel at each diffusion step; element-wise adaptive convolution applies them to
the blurry image's latent, and a ControlNet fed that latent steers the frozen SD 2.1 UNet.

These are the authors' trained weights ({REFERENCE_URL}), converted from {provenance} to the
diffusers layout (safetensors, {dtype}) with `python -m deblurdiff.convert`. The conversion
renames and reshapes tensors only. Loading needs the `deblurdiff` package (the LKPN, the
ControlNet and the pipeline are defined there); its OpenCLIP tokenizer is included here.

## What it is for

It removes **blur**: camera shake, motion blur and defocus (out-of-focus) blur, including
blur that varies across the photo. It will **not** fix noise alone (a sharp but grainy photo
comes back almost unchanged) or low resolution (it does not upscale). A photo without blur
shows little change.

## Usage

```python
import torch
from PIL import Image
from deblurdiff import DeblurDiffPipeline

pipe = DeblurDiffPipeline.from_pretrained("{repo_id}", torch_dtype=torch.float16).to("cuda")
image = Image.open("blurry.jpg").convert("RGB")
sharp = pipe(image, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images[0]
sharp.save("sharp.png")
```

## Licences

- The authors' repository ({REFERENCE_URL}) is released under the **MIT License**
  (Copyright (c) 2025 kkkls); it names no separate licence for the checkpoint.
- The checkpoint contains, and was trained around, **Stable Diffusion 2.1-base** (UNet, VAE
  and the OpenCLIP ViT-H/14 text encoder), which Stability AI released under the
  **CreativeML Open RAIL++-M License**. That licence's use restrictions (its Attachment A)
  apply to derivatives of those weights, so this card declares `openrail++`.
- The tokenizer vocabulary is OpenAI CLIP's (MIT License).

## Citation

```bibtex
{CITATION}
```
"""


def describe_hub_error(error: Exception) -> str:
    """What a Hub client error means, in one line, and what to do about it."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, LocalTokenNotFoundError) or status == 401:
        return "not logged in to the Hugging Face Hub (or the token is invalid): run `hf auth login` or set HF_TOKEN"
    if status == 403:
        return f"the token may not write to this repo (it needs write access to the owner's repositories): {error}"
    if isinstance(error, RepositoryNotFoundError):
        return f"the repo was not found or is not accessible with this token: {error}"
    if isinstance(error, HfHubHTTPError):
        return f"the Hub answered with an error: {error}"
    return f"{type(error).__name__}: {error}"


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, card: str, private: bool = False, api=None) -> str:
    """Upload ``folder`` with ``card`` as README.md to the model repo (made if needed); returns its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")
    api = api or HfApi()
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model",
            commit_message="DeblurDiff pipeline converted from the authors' checkpoint",
        )
    except Exception as exc:  # authentication, permissions, network: say which, and how to retry
        raise HubPushError(
            f"Could not upload to {repo_id}: {describe_hub_error(exc).splitlines()[0]}\nThe converted folder is "
            f"kept in {folder}: once that is fixed, upload it with `hf upload {repo_id} {folder}`."
        ) from None
    return str(url)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deblurdiff.convert",
        description="Convert the official DeblurDiff checkpoint (model.pth, LDM layout) to a diffusers pipeline folder.",
    )
    parser.add_argument("checkpoint", help=".pth / .ckpt / .safetensors file")
    parser.add_argument("out_dir", help="folder to write (diffusers layout, safetensors weights)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default fp32)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub repo id (default: the packaged one)")
    parser.add_argument("--attention-head-dim", type=int, default=64, help="channels per attention head (default 64)")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME",
                        help="then upload the folder, with a model card, to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    args = parser.parse_args(argv)
    if args.push_to_hub and not HUB_REPO_ID.fullmatch(args.push_to_hub):
        print(f"error: --push-to-hub needs a repo id like owner/name, got {args.push_to_hub!r}", file=sys.stderr)
        return 1

    from .pipeline.pipeline_deblurdiff import DeblurDiffPipeline

    try:
        pipe = DeblurDiffPipeline.from_single_file(
            args.checkpoint, tokenizer=args.tokenizer, attention_head_dim=args.attention_head_dim,
            torch_dtype=DTYPES[args.dtype],
        )
    except (CheckpointError, TokenizerUnavailableError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pipe.save_pretrained(args.out_dir, safe_serialization=True)
    counts = ", ".join(f"{name} {getattr(pipe, name).num_parameters() / 1e6:.1f}M" for name in COMPONENTS)
    print(f"wrote {args.out_dir} ({args.dtype}): {counts}")
    if args.push_to_hub:
        card = model_card(args.push_to_hub, args.dtype, Path(args.checkpoint).name, file_sha256(args.checkpoint))
        try:
            url = push_to_hub(args.out_dir, args.push_to_hub, card=card, private=args.private)
        except HubPushError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
