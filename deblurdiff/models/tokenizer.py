"""The text tokenizer DeblurDiff was trained with, shipped with the package (no download).

OpenCLIP's tokenizer as a ``transformers`` tokenizer: byte-level BPE over OpenAI CLIP's
vocabulary (package data, MIT licence) on text cleaned as the reference does (ftfy, HTML
entities unescaped twice, whitespace collapsed, lower-cased), cut to 77 ids with the end token
kept last, padded with id 0. transformers' ``CLIPTokenizer`` skips ftfy and the unescaping.
"""

from __future__ import annotations

import gzip
import html
import os
import shutil
from functools import lru_cache
from pathlib import Path

import regex
from tokenizers.models import BPE

# Imported under this name on purpose: diffusers finds how to save and load a pipeline
# component by looking the base class up by name in the component's module.
from transformers import PreTrainedTokenizer
# GPT-2's byte table, which CLIP uses too: its order is the order of the first 256 ids.
from transformers.convert_slow_tokenizer import bytes_to_unicode

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_VOCAB_PATH = Path(__file__).resolve().parents[1] / "data" / VOCAB_FILE
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
PAD_TOKEN = "!"  # id 0: OpenCLIP pads with zeros
CONTEXT_LENGTH = 77
# The merges OpenAI's vocabulary uses: 49,408 ids = 256 bytes x 2 (with and without the
# end-of-word mark) + these merges + 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
_WORDS = regex.compile(
    rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def clean_text(text: str) -> str:
    """The reference's text cleaning (see the module docstring)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


@lru_cache(maxsize=4)
def _read_vocabulary(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not the CLIP BPE vocabulary ({NUM_MERGES} merges expected)")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
    return {t: i for i, t in enumerate(tokens)}, merges


class OpenCLIPTokenizer(PreTrainedTokenizer):
    """``tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids`` gives
    the reference's ``tokenize(prompts)``; ``OpenCLIPTokenizer()`` uses the packaged vocabulary."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        bos_token: str = START_OF_TEXT,
        eos_token: str = END_OF_TEXT,
        pad_token: str = PAD_TOKEN,
        model_max_length: int = CONTEXT_LENGTH,
        **kwargs,
    ):
        self.vocab_file = str(vocab_file or DEFAULT_VOCAB_PATH)
        self.encoder, merges = _read_vocabulary(self.vocab_file)
        # The merge loop of CLIP's BPE (with an end-of-word mark), from the tokenizers library.
        self._bpe = BPE(self.encoder, merges, end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="")
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        kwargs.setdefault("special_tokens_pattern", "bos_eos")
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            model_max_length=model_max_length,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder[index]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = Path(save_directory) / f"{filename_prefix + '-' if filename_prefix else ''}{VOCAB_FILE}"
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Words (the special tokens too, in any case) of the cleaned text, bytes as characters, then BPE."""
        tokens = []
        for word in _WORDS.findall(clean_text(text)):
            if word in (START_OF_TEXT, END_OF_TEXT):
                tokens.append(word)
                continue
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            tokens += [t.value for t in self._bpe.tokenize(chars)]
        return tokens

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.tokenize(text)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # The special tokens are words of their own (their characters stand for themselves).
        text = "".join(t + END_OF_WORD if t in (START_OF_TEXT, END_OF_TEXT) else t for t in tokens)
        data = bytearray(self.byte_decoder[c] for c in text if c in self.byte_decoder)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            # The pad id 0 is also the text token "!": drop what follows the end token instead.
            ids = ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids
            ids = [i for i in ids if i != self.bos_token_id]
        return super()._decode(ids, **kwargs)
