"""Vision-language alignment (paper eq. 9): MLP projector + a Qwen3 decoder, language-modelling loss.

The visual tokens of the last backbone layer are projected into the decoder's embedding space and put in
front of an instruction and the caption; only the caption tokens (and the end token) are predicted, and
the gradients flow through the decoder and the projector into the backbone.

``ByteTokenizer`` is a dependency-free stand-in for the Qwen tokenizer used by the tiny presets (no
network, no vocabulary file); pass ``tokenizer=<dir or hub id>`` to use a real one with a real Qwen3.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PROMPT = "Describe the scene."


class ByteTokenizer:
    """UTF-8 bytes offset by 3 special ids (pad 0, bos 1, eos 2): vocabulary 259, exact round trip."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


def load_tokenizer(name: str):
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


class MLPProjector(nn.Module):
    """Visual tokens (..., D) -> decoder embeddings (..., H): Linear-GELU-Linear (LLaVA's projector)."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.fc2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


@dataclass
class CaptionerConfig:
    language_model: str = "debug"  # "debug" (tiny random Qwen3) or a Qwen3 directory / hub id
    tokenizer: str = "bytes"  # "bytes" or a tokenizer directory / hub id
    hidden_size: int = 64  # tiny decoder only
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_caption_tokens: int = 96


class Captioner(nn.Module):
    """Projector + ``Qwen3ForCausalLM``; ``forward(visual_tokens, captions) -> LM loss``."""

    def __init__(self, vision_dim: int, config: CaptionerConfig, seed: int = 0) -> None:
        super().__init__()
        from transformers import Qwen3Config, Qwen3ForCausalLM

        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        if config.language_model == "debug":
            vocab = getattr(self.tokenizer, "vocab_size", None) or len(self.tokenizer)
            lm_config = Qwen3Config(
                vocab_size=vocab,
                hidden_size=config.hidden_size,
                intermediate_size=2 * config.hidden_size,
                num_hidden_layers=config.layers,
                num_attention_heads=config.heads,
                num_key_value_heads=config.kv_heads,
                head_dim=config.hidden_size // config.heads,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
            )
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.language_model = Qwen3ForCausalLM(lm_config)
        else:
            self.language_model = Qwen3ForCausalLM.from_pretrained(config.language_model, attn_implementation="sdpa")
        self.projector = MLPProjector(vision_dim, self.language_model.config.hidden_size)

    def _text_ids(self, text: str, add_eos: bool) -> list[int]:
        ids = list(self.tokenizer.encode(text))
        if (
            not isinstance(self.tokenizer, ByteTokenizer)
            and ids
            and ids[0] == getattr(self.tokenizer, "bos_token_id", -1)
        ):
            ids = ids[1:]
        ids = ids[: self.config.max_caption_tokens]
        return ids + ([self.tokenizer.eos_token_id] if add_eos else [])

    def forward(self, visual_tokens: torch.Tensor, captions: list[str], prompt: str = PROMPT) -> torch.Tensor:
        """visual_tokens (B, N, D) (e.g. all patch tokens of a clip); returns the mean LM loss per caption token."""
        if visual_tokens.shape[0] != len(captions):
            raise ValueError(f"{visual_tokens.shape[0]} visual sequences but {len(captions)} captions")
        device = visual_tokens.device
        embed = self.language_model.get_input_embeddings()
        visual = self.projector(visual_tokens)
        prompt_ids = self._text_ids(prompt, add_eos=False)
        captions_ids = [self._text_ids(c, add_eos=True) for c in captions]
        length = max(len(c) for c in captions_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        text = torch.full((len(captions), len(prompt_ids) + length), pad, dtype=torch.long, device=device)
        labels = torch.full_like(text, -100)
        attention = torch.zeros(len(captions), visual.shape[1] + text.shape[1], dtype=torch.long, device=device)
        for i, ids in enumerate(captions_ids):
            row = prompt_ids + ids
            text[i, : len(row)] = torch.tensor(row, device=device)
            labels[i, len(prompt_ids) : len(row)] = torch.tensor(ids, device=device)
            attention[i, : visual.shape[1] + len(row)] = 1
        inputs = torch.cat([visual.to(embed.weight.dtype), embed(text)], dim=1)
        full_labels = torch.cat(
            [torch.full((len(captions), visual.shape[1]), -100, dtype=torch.long, device=device), labels], 1
        )
        return self.language_model(inputs_embeds=inputs, attention_mask=attention, labels=full_labels).loss

    def save_pretrained(self, directory: str | Path) -> Path:
        """``captioner.json`` + ``projector.safetensors`` + the decoder in ``language_model/`` (transformers layout)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "captioner.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        save_file(state, str(directory / "projector.safetensors"))
        self.language_model.save_pretrained(directory / "language_model")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, vision_dim: int) -> Captioner:
        directory = Path(directory)
        config = CaptionerConfig(**json.loads((directory / "captioner.json").read_text()))
        config.language_model = str(directory / "language_model")
        model = cls(vision_dim, config)
        model.projector.load_state_dict(load_file(str(directory / "projector.safetensors")))
        return model
